"""Entropy-bound sampler math (transformers' `DiffusionGemmaGenerationMixin`), on arrays only.

Nothing here knows the model or the tokenizer. Steps count down: `step` is the number of
denoising steps *remaining* (N at the first step of a canvas, 1 at the last).
"""

from typing import Tuple

import mlx.core as mx


def temperature(step, num_steps: int, t_min: float, t_max: float) -> mx.array:
    """Linear schedule t_min + (t_max - t_min) * step / N, in float32 as transformers does.

    It starts at t_max (step = N) and ends at t_min + (t_max - t_min) / N, never at t_min.
    """
    frac = mx.array(step, dtype=mx.float32) / num_steps
    return (t_max - t_min) * frac + t_min


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def entropy(logprobs: mx.array) -> mx.array:
    """Per-position entropy in nats from log-probabilities (B, C, V) -> (B, C)."""
    return -(mx.exp(logprobs) * logprobs).sum(axis=-1)


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
    per position and a uniform canvas to renoise the rejected positions.
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

    def sample(self, logprobs: mx.array) -> mx.array:
        return mx.random.categorical(logprobs, key=self._next())


