"""Entropy-bound sampler math (transformers' `DiffusionGemmaGenerationMixin`), on arrays only.

Nothing here knows the model or the tokenizer. Steps count down: `step` is the number of
denoising steps *remaining* (N at the first step of a canvas, 1 at the last).
"""

import math
from typing import Optional, Tuple

import mlx.core as mx


def temperature(step, num_steps: int, t_min: float, t_max: float) -> mx.array:
    """Linear schedule t_min + (t_max - t_min) * step / N, in float32 as transformers does.

    It starts at t_max (step = N) and ends at t_min + (t_max - t_min) / N, never at t_min.
    """
    frac = mx.array(step, dtype=mx.float32) / num_steps
    return (t_max - t_min) * frac + t_min


def step_stats(logits: mx.array, temp: mx.array, softcap: Optional[float] = None, allowed=None):
    """What a step needs from its logits (B, C, V), with a single exp over the vocabulary.

    Returns (probs, entropy, argmax) of the temperature-scaled logits: probs feed the
    sample and the next step's self-conditioning, the entropy (nats) the acceptance and
    the stop test. `softcap` applies the model's tanh cap here, fused into the same pass
    (for logits from `denoise(..., apply_softcap=False)`). `allowed` (B, C, V) bool
    restricts each position's tokens: the others get -inf after the temperature, so
    probs, entropy (hence acceptance and the stop test), sample and argmax all see the
    renormalised distribution; every position must allow at least one token.
    """
    if softcap is not None:
        logits = mx.tanh(logits / softcap) * softcap
    x = logits / temp
    if allowed is not None:
        x = mx.where(allowed, x, -mx.inf)
    m = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - m)
    total = e.sum(axis=-1, keepdims=True)
    probs = e / total
    logprobs = x - (m + mx.log(total))
    if allowed is not None:
        logprobs = mx.where(allowed, logprobs, 0.0)  # 0 * -inf is nan
    entropy = -(probs * logprobs).sum(axis=-1)
    return probs, entropy, mx.argmax(x, axis=-1)


def sample_categorical(probs: mx.array, u: mx.array, block: int = 512) -> mx.array:
    """One categorical sample per row of `probs` (..., V) by inverting the CDF at `u` (...,).

    A two-level search (block sums, then one block's prefix sums) keeps the cost at one
    pass over the vocabulary, instead of a random number per token as Gumbel-max needs.
    """
    *lead, V = probs.shape
    bs = math.gcd(V, block)
    blocks = probs.reshape(*lead, V // bs, bs)
    cdf = mx.cumsum(blocks.sum(axis=-1), axis=-1)
    target = u * cdf[..., -1]
    b = mx.minimum((cdf <= target[..., None]).sum(axis=-1), V // bs - 1)
    before = mx.where(b > 0, mx.take_along_axis(cdf, mx.maximum(b - 1, 0)[..., None], -1)[..., 0], 0)
    within = mx.take_along_axis(blocks, b[..., None, None], axis=-2)[..., 0, :]
    cdf_in = before[..., None] + mx.cumsum(within, axis=-1)
    t = mx.minimum((cdf_in <= target[..., None]).sum(axis=-1), bs - 1)
    return b * bs + t


def entropy_bound_accept(entropies: mx.array, entropy_bound: float) -> mx.array:
    """Accept the lowest-entropy positions whose summed entropy minus their max is <= bound.

    That sum bounds the joint mutual information of the accepted tokens
    (arXiv 2505.24857); the lowest-entropy position is always accepted.
    """
    order = mx.argsort(entropies, axis=-1)
    sorted_ent = mx.take_along_axis(entropies, order, axis=-1)
    # Sorted ascending, so each sorted entry is the running max.
    keep = (mx.cumsum(sorted_ent, axis=-1) - sorted_ent) <= entropy_bound
    return mx.put_along_axis(mx.zeros(keep.shape, dtype=mx.bool_), order, keep, axis=-1)


def renoise(accepted: mx.array, sampled: mx.array, noise: mx.array) -> mx.array:
    """Keep accepted samples; every other position gets a fresh uniform token."""
    return mx.where(accepted, sampled, noise)


def is_stable(history: Tuple[mx.array, ...], argmax: mx.array) -> mx.array:
    """(B,) True where the argmax canvas equals each of the last `len(history)` ones."""
    stable = mx.ones(argmax.shape[:1], dtype=mx.bool_)
    for h in history:
        stable = stable & mx.all(h == argmax, axis=-1)
    return stable


def is_confident(entropies: mx.array, confidence_threshold: float) -> mx.array:
    """(B,) True where the mean entropy of the temperature-scaled logits is below threshold."""
    return mx.mean(entropies, axis=-1) < confidence_threshold


def step_update(
    probs, entropy, new_argmax, sampled, noise, canvas, argmax, prev_probs, done, history,
    clamp_mask, clamp_ids, entropy_bound: float, confidence_threshold: float,
):
    """Accept, renoise and the stop test for one step; arrays are (B, C[, V]).

    Clamped positions (`clamp_mask`, ids `clamp_ids`) are decided: they are always accepted,
    keep their ids, and count as zero entropy, so they use none of the entropy bound and do
    not hold back the confidence test. With no clamp this is transformers' step exactly.
    Rows that already stopped (`done`) keep their canvas, argmax and conditioning.
    Returns (canvas, argmax, probs, done, history, accepted).
    """
    entropy = mx.where(clamp_mask, 0.0, entropy)
    accepted = entropy_bound_accept(entropy, entropy_bound) | clamp_mask
    sampled = mx.where(clamp_mask, clamp_ids, sampled.astype(canvas.dtype))
    new_canvas = renoise(accepted, sampled, noise.astype(canvas.dtype))
    new_argmax = mx.where(clamp_mask, clamp_ids, new_argmax.astype(argmax.dtype))
    keep = done[:, None]
    new_argmax = mx.where(keep, argmax, new_argmax)
    new_canvas = mx.where(keep, canvas, new_canvas)
    if probs.shape[0] > 1:  # a single row never runs past its stop
        probs = mx.where(keep[..., None], prev_probs, probs)
    stable = is_stable(history, new_argmax)
    history = history[1:] + [new_argmax] if history else history
    done = done | (stable & is_confident(entropy, confidence_threshold))
    return new_canvas, new_argmax, probs, done, history, accepted


def pad_after_eos(tokens: mx.array, eos_ids: mx.array, pad_id: int) -> Tuple[mx.array, mx.array]:
    """Keep everything up to and including the first EOS of each row; pad the rest.

    Returns (tokens, has_eos) for a (B, C) block.
    """
    is_eos = mx.any(tokens[..., None] == eos_ids, axis=-1)
    seen = mx.cumsum(is_eos.astype(mx.int32), axis=-1)
    after = (seen > 1) | ((seen == 1) & ~is_eos)
    return mx.where(after, pad_id, tokens), mx.any(is_eos, axis=-1)


class RandomDraws:
    """The sampler's random draws, all from one explicit key.

    Each canvas starts from uniform random ids; each step draws one categorical sample
    per position from the step's probabilities and a uniform canvas to renoise the
    rejected positions. Tests replay transformers' draws through the same three methods.
    """

    def __init__(self, key: mx.array, vocab_size: int):
        self.key = key
        self.vocab_size = vocab_size

    def _next(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def initial_canvas(self, shape) -> mx.array:
        return mx.random.randint(0, self.vocab_size, shape, key=self._next())

    def noise(self, shape) -> mx.array:
        return mx.random.randint(0, self.vocab_size, shape, key=self._next())

    def sample(self, probs: mx.array) -> mx.array:
        u = mx.random.uniform(shape=probs.shape[:-1], key=self._next())
        return _sample_categorical(probs, u)


_sample_categorical = mx.compile(sample_categorical)


