"""Entropy-bound sampler math (transformers' `DiffusionGemmaGenerationMixin`), on arrays only.

A denoising step is `step_update` over a small `StepState`, with the acceptance rule an
argument (`Accept`; `make_accept` picks it from the config, as mlx-lm's `sampler=`).
Nothing here knows the model or the tokenizer. Steps count down: `step` is the number of
denoising steps *remaining* (N at the first step of a canvas, 1 at the last).
"""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

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
    before = mx.where(
        b > 0, mx.take_along_axis(cdf, mx.maximum(b - 1, 0)[..., None], -1)[..., 0], 0
    )
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


class StepState(NamedTuple):
    """What a canvas carries from one denoising step to the next; arrays (B, C[, V]).

    Attributes:
        canvas: the next forward's input (accepted samples and fresh noise).
        argmax: the draft: the argmax canvas of the last step.
        conditioning: the next forward's self-conditioning: the last step's
            probabilities (fast mode: `Proposal.conditioning`); None before the first step.
        done: (B,) bool, rows whose canvas has stopped.
        history: the last `stability_threshold` argmax canvases, oldest first.
        fixed: bool (B or 1, C), decided positions: always accepted, never resampled.
        fixed_ids: their ids.
    """

    canvas: mx.array
    argmax: mx.array
    conditioning: Optional[mx.array]
    done: mx.array
    history: Tuple[mx.array, ...]
    fixed: mx.array
    fixed_ids: mx.array


class Proposal(NamedTuple):
    """What one denoising step proposes, as an acceptance rule sees it; (B, C[, V]).

    Attributes:
        probs: the step's probabilities (temperature-scaled, token-limited).
        entropy: their entropy in nats; 0 at fixed positions.
        argmax: their argmax; the fixed id at fixed positions.
        sampled: one sample per position; the fixed id at fixed positions.
        steps_left: int32 scalar, denoising steps left including this one (N .. 1).
        conditioning: what the next forward is conditioned on, when not `probs` (fast
            mode: the soft embedding (B, C, H) or the full probabilities); None: `probs`.

    `probs` may cover each position's k most likely tokens only (fast mode's `top_k`):
    its last axis is then k, not the vocabulary.
    """

    probs: mx.array
    entropy: mx.array
    argmax: mx.array
    sampled: mx.array
    steps_left: mx.array
    conditioning: Optional[mx.array] = None

    @property
    def next_conditioning(self) -> mx.array:
        """What the next forward is conditioned on."""
        return self.probs if self.conditioning is None else self.conditioning


# An acceptance rule: (proposal, state before the step) -> (B, C) bool, the positions
# whose sample survives into the next canvas (the others are renoised). Fixed positions
# are accepted whatever it returns. The rule runs inside `mx.compile`: array ops only.
Accept = Callable[[Proposal, StepState], mx.array]


@dataclass(frozen=True)
class EntropyBound:
    """transformers' rule: accept the lowest-entropy positions within `entropy_bound` nats.

    Frozen, so equal rules share one compiled step.
    """

    entropy_bound: float

    def __call__(self, proposal: Proposal, state: StepState) -> mx.array:
        return entropy_bound_accept(proposal.entropy, self.entropy_bound)


@dataclass(frozen=True)
class ConfidenceThreshold:
    """mlx-vlm's default rule: accept positions whose max probability is >= `threshold`.

    At least one position is accepted each step (the most confident undecided one), so
    a canvas always progresses. An approximation of transformers' sampler (fast mode's
    `commit_rule="confidence"`); frozen, so equal rules share one compiled step.
    """

    threshold: float

    def __call__(self, proposal: Proposal, state: StepState) -> mx.array:
        top = mx.max(proposal.probs, axis=-1)
        accept = top >= self.threshold
        best = mx.argmax(mx.where(state.fixed, -1.0, top), axis=-1, keepdims=True)
        return accept | (mx.arange(top.shape[-1]) == best)


def make_accept(config) -> Accept:
    """The acceptance rule of a `DiffusionConfig`: its entropy bound (the default) or,
    with `commit_rule="confidence"`, the confidence threshold `commit_threshold`."""
    fast = config.fast
    if fast is not None and fast.commit_rule == "confidence":
        return ConfidenceThreshold(fast.commit_threshold)
    return EntropyBound(config.entropy_bound)


def commit(
    state: StepState,
    accepted: mx.array,
    use_argmax: bool = False,
    previous: Optional[mx.array] = None,
) -> StepState:
    """Monotone commit (fast mode): accepted positions become fixed at their sample (or,
    with `use_argmax`, at the step's argmax, as a temperature-0 sampler would commit).
    With `previous` (the draft before this step), only accepted positions whose argmax
    did not change are committed: the self-conditioned step gets to revise a token once.

    Later steps keep them (zero entropy, never renoised), so, unlike transformers'
    sampler, a token once accepted is never revised. Rows that stopped are unchanged; a
    row whose every position is decided stops now (as mlx-vlm's confidence sampler does),
    instead of one step later by the stability test.
    """
    accepted = accepted & ~state.done[:, None]
    if previous is not None:
        accepted = accepted & (state.argmax == previous)
    fixed = state.fixed | accepted
    token = state.argmax if use_argmax else state.canvas
    ids = mx.where(accepted, token, state.fixed_ids)
    # The input and the draft show the committed tokens from now on (the stop test
    # compares the draft).
    canvas = mx.where(accepted, token, state.canvas)
    argmax = mx.where(accepted, token, state.argmax)
    history = state.history[:-1] + (argmax,) if state.history else state.history
    done = state.done | mx.all(fixed, axis=-1)
    return state._replace(
        canvas=canvas, argmax=argmax, history=history, done=done, fixed=fixed, fixed_ids=ids
    )


def scatter_proposal(
    proposal: Proposal, positions: mx.array, state: StepState, conditioning: mx.array
) -> Proposal:
    """A proposal for positions `positions` (B, n) only, spread over the whole canvas
    (fast mode's active-set compaction); `conditioning` (B, C, H) holds the other
    positions' soft embeddings (their last ones).

    The other positions must be decided (fixed) or in rows that stopped, which
    `step_update` keeps as they are: so what they get here (no entropy, the state's
    argmax and canvas, zero probabilities) is never read.
    """
    B, C = state.canvas.shape

    def put(full, part):
        idx = positions.reshape(*positions.shape, *([1] * (part.ndim - 2)))
        idx = mx.broadcast_to(idx, part.shape)
        return mx.put_along_axis(full, idx, part.astype(full.dtype), axis=1)

    k = proposal.probs.shape[-1]
    return proposal._replace(
        probs=put(mx.zeros((B, C, k), proposal.probs.dtype), proposal.probs),
        entropy=put(mx.zeros((B, C), proposal.entropy.dtype), proposal.entropy),
        argmax=put(state.argmax, proposal.argmax),
        sampled=put(state.canvas, proposal.sampled),
        conditioning=put(conditioning, proposal.conditioning),
    )


def active_positions(live: mx.array, n: int) -> mx.array:
    """(B, n) canvas positions to forward (fast mode's active-set compaction), in canvas
    order: each row's `live` (B, C) positions, and the first decided ones to fill the
    bucket of n (at least the most live positions of any row). In canvas order, a
    bucket of the whole canvas forwards it as is (same draws as without compaction)."""
    C = live.shape[-1]
    order = mx.arange(C) + mx.where(live, 0, C)
    return mx.sort(mx.argsort(order, axis=-1)[:, :n], axis=-1).astype(mx.int32)


def step_update(
    state: StepState, proposal: Proposal, noise: mx.array, accept: Accept, confidence_threshold
) -> Tuple[StepState, mx.array]:
    """Accept, renoise and the stop test for one step.

    `proposal` holds the step's raw statistics; fixed positions (`state.fixed`) are
    decided first: they keep their ids and count as zero entropy, so they use none of
    the entropy bound and do not hold back the confidence test. `accept` then picks the
    positions whose sample survives; the others get `noise`. With no fixed position and
    the entropy-bound rule this is transformers' step exactly. Rows that already stopped
    (`state.done`) keep their canvas, argmax and conditioning.

    Returns:
        (the next state, the (B, C) accepted mask).
    """
    fixed, ids = state.fixed, state.fixed_ids
    canvas, argmax, prev = state.canvas, state.argmax, state.conditioning
    proposal = proposal._replace(
        entropy=mx.where(fixed, 0.0, proposal.entropy),
        argmax=mx.where(fixed, ids, proposal.argmax.astype(argmax.dtype)),
        sampled=mx.where(fixed, ids, proposal.sampled.astype(canvas.dtype)),
    )
    accepted = accept(proposal, state) | fixed
    new_canvas = renoise(accepted, proposal.sampled, noise.astype(canvas.dtype))
    keep = state.done[:, None]
    new_argmax = mx.where(keep, argmax, proposal.argmax)
    new_canvas = mx.where(keep, canvas, new_canvas)
    cond = proposal.next_conditioning
    if cond.shape[0] > 1:  # a single row never runs past its stop
        cond = mx.where(keep[..., None], prev, cond)
    stable = is_stable(state.history, new_argmax)
    history = state.history[1:] + (new_argmax,) if state.history else state.history
    done = state.done | (stable & is_confident(proposal.entropy, confidence_threshold))
    return StepState(new_canvas, new_argmax, cond, done, history, fixed, ids), accepted


def pad_after_eos(tokens: mx.array, eos_ids: mx.array, pad_id: int) -> Tuple[mx.array, mx.array]:
    """Keep everything up to and including the first EOS of each row; pad the rest.

    Returns (tokens, first_eos) for a (B, C) block: first_eos (B,) int32 is the index of
    each row's first EOS, -1 where the row has none.
    """
    is_eos = mx.any(tokens[..., None] == eos_ids, axis=-1)
    seen = mx.cumsum(is_eos.astype(mx.int32), axis=-1)
    after = (seen > 1) | ((seen == 1) & ~is_eos)
    first = mx.argmax(is_eos.astype(mx.int32), axis=-1).astype(mx.int32)
    return mx.where(after, pad_id, tokens), mx.where(seen[..., -1] > 0, first, -1)


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
