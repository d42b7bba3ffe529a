"""The block-diffusion loop on token ids (transformers' `DiffusionGemmaGenerationMixin.generate`).

1. a. encode the prompt (then each appended canvas) into the cache;
   b. start a canvas from uniform random ids (fixed and seeded ids from a `CanvasLayout`);
   c. per denoising step: denoise, temperature, sample, argmax, accept (entropy bound by
      default), renoise the rest, stable-and-confident stop (fast mode: on each
      position's top k tokens, gathered self-conditioning, optionally monotone commit,
      compaction and a repair pass; see
      `DiffusionConfig`);
   d. append the argmax canvas; e. pad after EOS and stop when every row has ended.

The work runs on a stream of its own (as mlx-lm's `generation_stream`), one per thread
and device, so a generation may run from any thread and leaves the caller's default
stream alone.
"""

import functools
import math
import os
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generator, List, Optional, Tuple, Union

import mlx.core as mx

from . import sampler as S
from . import topk as T
from .cache import CacheRows
from .canvas import CanvasLayout, CanvasPlan, check_token_ids
from .config import DiffusionConfig


@dataclass(frozen=True)
class DenoiseStep:
    """One denoising step of block `block` (token-level event)."""

    block: int
    step: int  # 1-based count of steps run on this canvas
    argmax: mx.array  # (B, C) the draft: argmax of this step's logits
    accepted: mx.array  # (B, C) bool, positions kept from this step's samples
    canvas: mx.array  # (B, C) the next step's input (accepted samples + fresh noise)


@dataclass(frozen=True)
class Block:
    """A committed canvas (token-level event)."""

    block: int
    tokens: mx.array  # (B, C) argmax canvas, pad after the first EOS
    steps: int  # denoising steps run on this canvas
    finished: mx.array  # (B,) bool, rows that have emitted EOS
    eos_index: Tuple[int, ...]  # per row, the first EOS in `tokens`; -1 for none
    decoder_forwards: mx.array  # (B,) int, counted as transformers' tokens_per_forward does
    encode_seconds: float  # re-encoding the previous canvas into the cache
    denoise_seconds: float  # this canvas's denoising steps
    step_syncs: int  # device->host waits in denoising steps so far: one per step
    encode_syncs: int  # waits for re-encoded canvases so far: one per canvas after the first
    positions_forwarded: mx.array  # (B,) int, canvas positions the decoder ran on so far
    forward_shapes: int  # distinct decoder input widths so far (compaction: its buckets)


_streams = {}


def generation_stream() -> mx.ThreadLocalStream:
    """The stream generation runs on: one per device, unique per thread (as mlx-lm's)."""
    device = mx.default_device()
    if str(device) not in _streams:
        _streams[str(device)] = mx.new_thread_local_stream(device)
    return _streams[str(device)]


_step_stats = mx.compile(S.step_stats)
_lane_streams = []


def _cpu_lanes(stream):
    """Streams to split a step's vocabulary pass over, on the CPU only.

    MLX runs a CPU stream's element-wise ops on one thread, and the pass over the
    vocabulary (tanh, exp) is most of a CPU step after the matmuls; rows are independent,
    so halves of the canvas run in parallel, bit for bit the same. The extra streams are
    thread-local, like the generation stream, so any thread may generate.
    """
    if stream.device != mx.cpu:
        return None
    n = min(os.cpu_count() or 1, 4)
    while len(_lane_streams) < n - 1:
        _lane_streams.append(mx.new_thread_local_stream(mx.cpu))
    return [stream] + _lane_streams[: n - 1] if n > 1 else None


def _stats(logits, temp, cap, allowed, lanes, fn=_step_stats):
    """`fn(logits, temp, cap, allowed)` (a stats function), rows split over `lanes`."""
    C = logits.shape[1]
    if lanes is None or C < len(lanes):
        return fn(logits, temp, cap, allowed)
    cuts = [C * i // len(lanes) for i in range(len(lanes) + 1)]
    parts = []
    for stream, a, b in zip(lanes, cuts, cuts[1:]):
        with mx.stream(stream):
            part = None if allowed is None else allowed[:, a:b]
            parts.append(fn(logits[:, a:b], temp, cap, part))
    return [mx.concatenate(p, axis=1) for p in zip(*parts)]


@functools.lru_cache(maxsize=8)
def _top_k_stats(k: int):
    return functools.partial(T.top_k_stats, k=k)


def _compile_update(accept: S.Accept, confidence_threshold: float):
    step = functools.partial(
        S.step_update, accept=accept, confidence_threshold=confidence_threshold
    )
    return mx.compile(step)


# One compiled step per (rule, threshold): equal frozen rules share it.
_compiled_update = functools.lru_cache(maxsize=32)(_compile_update)


def _update_for(accept: S.Accept, confidence_threshold: float):
    if isinstance(accept, Hashable):
        return _compiled_update(accept, confidence_threshold)
    return _compile_update(accept, confidence_threshold)  # compiled for this call only


def prefill(model, prompt: mx.array, cache: List[Any], step_size: int = 512) -> None:
    """Encode `prompt` (B, L) in chunks; chunking is exact (see SlidingWindowCache).

    Raises:
        ValueError: an id of `prompt` is outside the model's vocabulary.
    """
    check_token_ids(prompt, model.args.vocab_size, "Prompt token id")
    with mx.stream(generation_stream()):
        for i in range(0, prompt.shape[1], step_size):
            model.encode(prompt[:, i : i + step_size], cache)
            mx.eval([c.state for c in cache])
    # The prompt's activations have shapes the canvases never reuse.
    mx.clear_cache()


def generate_step(
    prompt: mx.array,
    model,
    *,
    config: DiffusionConfig,
    cache: Optional[List[Any]] = None,
    key: Optional[mx.array] = None,
    draws: Optional[Any] = None,
    layout: Optional[CanvasLayout] = None,
    accept: Optional[S.Accept] = None,
    drafts: bool = False,
    prefill_step_size: int = 512,
) -> Generator[Union[DenoiseStep, Block], None, None]:
    """Generate canvases for `prompt` (B, L) token ids; yields `Block`s (and `DenoiseStep`s
    when `drafts`).

    Args:
        prompt: tokens not yet in `cache`.
        model: a `Model`.
        config: sampler settings.
        cache: from `model.make_cache()`, possibly holding earlier turns; a new one if None.
            On return it holds the prompt and every canvas but the last.
        key: `mx.random.key` for all random draws; or pass `draws` (an object with
            `initial_canvas(shape)`, `noise(shape)`, `sample(probs)`), e.g. to replay.
            Each canvas draws its random start even where a layout fixes or seeds it, so
            a layout changes no other draw.
        layout: fixed, seeded and token-limited output positions, shared by every row
            (see `CanvasLayout`); None for none.
        accept: the acceptance rule (see `sampler.Accept`); defaults to
            `sampler.make_accept(config)`, transformers' entropy bound.
        drafts: also yield every denoising step.
        prefill_step_size: prompt tokens encoded per chunk.

    Raises:
        ValueError: both or neither of key and draws, a prompt id outside the vocabulary,
            or a layout that does not fit the model or `config.max_new_tokens`.
    """
    if (key is None) == (draws is None):
        raise ValueError("Pass exactly one of key or draws.")
    if layout is not None:
        layout.check(model.args.vocab_size, config.max_new_tokens)
    C = model.args.canvas_length
    draws = draws or S.RandomDraws(key, model.args.vocab_size)
    cache = model.make_cache() if cache is None else cache
    loop = _Loop(model, config, draws, accept or S.make_accept(config), prompt.shape[0])
    prefill(model, prompt, cache, prefill_step_size)
    for block in range(math.ceil(config.max_new_tokens / C)):
        plan = (
            CanvasPlan.free(_length(config, block, C)) if layout is None else layout.plan(block, C)
        )
        yield (yield from loop.canvas(block, plan, cache, drafts))
        if loop.ended:
            break


def bucket(n: int, C: int) -> int:
    """The forward width for n live positions of a C-position canvas (fast mode's
    compaction): a power of two from 16 on, at most C, so MLX compiles few shapes."""
    return min(C, max(16, 1 << max(0, n - 1).bit_length()))


def _length(config: DiffusionConfig, block: int, C: int) -> int:
    """Canvas `block`'s length: C, or with fast mode's canvas_shrink the tokens left."""
    if not config.canvas_shrink:
        return C
    return min(C, max(config.canvas_shrink, config.max_new_tokens - block * C))


class _Loop:
    """One generation's denoising loop and the counters its `Block`s report."""

    def __init__(self, model, config: DiffusionConfig, draws, accept: S.Accept, batch: int):
        self.model, self.config, self.draws = model, config, draws
        self.update = _update_for(accept, config.confidence_threshold)
        self.stream = generation_stream()
        self.lanes = _cpu_lanes(self.stream)
        self.eos = mx.array(config.eos_token_id or (), dtype=mx.int32)
        self.finished = mx.zeros((batch,), dtype=mx.bool_)
        self.forwards = mx.zeros((batch,), dtype=mx.int32)
        self.positions_forwarded = mx.zeros((batch,), dtype=mx.int32)
        self.shapes = set()  # decoder input widths used
        # Compaction: the pending forward's canvas positions (B, n), the canvas K/V per
        # layer, and the positions still to forward after this step.
        self.active = self.canvas_kv = self.live = None
        self.step_syncs = self.encode_syncs = 0
        self.ended = False  # every row has emitted EOS (as of the last sync)
        self.last: Optional[mx.array] = None  # the previous canvas, not yet encoded

    def encode_last(self, cache) -> float:
        """Re-encode the previous canvas at the positions the decoder used; seconds."""
        tic = time.perf_counter()
        if self.last is not None:
            # What the last canvas allocated (attention over a shorter cache, a K/V
            # buffer before it grew) has shapes the next one does not reuse.
            mx.clear_cache()
            with mx.stream(self.stream):
                self.model.encode(self.last, cache)
                mx.eval([c.state for c in cache])
            self.encode_syncs += 1
        return time.perf_counter() - tic

    def start(self, plan: CanvasPlan, cache):
        """The first state of a canvas and its first forward's logits."""
        k = self.config.stability_threshold
        x = plan.start(self.draws.initial_canvas((self.finished.shape[0], plan.ids.shape[1])))
        blank = mx.full(x.shape, -1, dtype=x.dtype)
        done = mx.zeros(self.finished.shape, dtype=mx.bool_)
        state = S.StepState(x, x, None, done, (blank,) * k, plan.fixed, plan.ids.astype(x.dtype))
        with mx.stream(self.stream):
            if self.config.compact:  # a new canvas: every position is forwarded
                return state, self.forward_all(x, None, cache)
            self.shapes.add(x.shape[1])
            return state, self.denoise(x, cache)

    def step(self, state: S.StepState, logits, allowed, n: int):
        """Build denoising step `n` (steps left) from `logits`: (next state, accepted)."""
        cfg = self.config
        with mx.stream(self.stream):
            self.count(~(state.done | self.finished), logits.shape[1])
            temp = S.temperature(n, cfg.max_denoising_steps, cfg.t_min, cfg.t_max)
            if cfg.compact and allowed is not None:
                B, C, V = state.canvas.shape + allowed.shape[-1:]
                allowed = mx.take_along_axis(
                    mx.broadcast_to(allowed, (B, C, V)), self.active[..., None], axis=1
                )
            proposal = self.propose(logits, temp, allowed, mx.array(n, mx.int32))
            if cfg.compact:
                proposal = self.spread(proposal, state)
            cond = proposal.probs if proposal.conditioning is None else proposal.conditioning
            state = state if state.probs is not None else state._replace(probs=cond)
            previous = state.argmax if cfg.commit_stable else None
            fixed_before = state.fixed
            state, accepted = self.update(state, proposal, self.draws.noise(state.canvas.shape))
            if cfg.monotone_commit:
                state = S.commit(state, accepted, cfg.commit_argmax, previous)
            if cfg.eos_tail_cut and self.eos.size:
                state = S.cut_eos_tail(state, self.eos, cfg.pad_token_id)
            if cfg.compact:  # what was undecided before this step's commit
                self.live = ~fixed_before & ~state.done[:, None]
            return state, accepted

    def spread(self, proposal: S.Proposal, state: S.StepState) -> S.Proposal:
        """Compaction: the forwarded positions' proposal over the whole canvas."""
        cond = state.probs
        if cond is None:  # the first step forwards every position
            B, C = state.canvas.shape
            H = proposal.conditioning.shape[-1]
            cond = mx.zeros((B, C, H), proposal.conditioning.dtype)
        return S.scatter_proposal(proposal, self.active, state, cond)

    def propose(self, logits, temp, allowed, steps_left) -> S.Proposal:
        """The step's statistics: one pass over the vocabulary (softcap, temperature, one
        exp) in exact mode; in fast mode, per its settings, a top-k instead."""
        cap = self.model.args.final_logit_softcapping
        k, sc_k = self.config.top_k, self.config.self_conditioning_top_k
        if not k:
            p, ent, argmax = _stats(logits, temp, cap, allowed, self.lanes)
            cond = self._gathered(p, sc_k, None) if sc_k else None
            return S.Proposal(p, ent, argmax, self.draws.sample(p), steps_left, cond)
        p, ent, argmax, ids = _stats(logits, temp, cap, allowed, self.lanes, _top_k_stats(k))
        sampled = mx.take_along_axis(ids, self.draws.sample(p)[..., None], axis=-1)[..., 0]
        if sc_k:
            cond = self._gathered(p, sc_k, ids)
        else:  # top_k alone: condition on the whole vocabulary's probabilities
            cond = _stats(logits, temp, cap, allowed, self.lanes)[0]
        return S.Proposal(p, ent, argmax, sampled, steps_left, cond)

    def _gathered(self, probs, k: int, ids):
        weights, ids = T.top_k_weights(probs, k, ids)
        return self.model.gathered_self_conditioning(ids, weights)

    def sync(self, state: S.StepState):
        """The one host sync per step: (tokens, first EOS, canvas stopped, every row
        ended); with compaction also the most live positions of a row (else 0)."""
        with mx.stream(self.stream):
            tokens, first = S.pad_after_eos(state.argmax, self.eos, self.config.pad_token_id)
            first = mx.where(self.finished, -1, first)  # rows that ended get a canvas of pad
            ended = mx.all(self.finished | (first >= 0))
            live = mx.array(0) if self.live is None else self.live.sum(axis=-1).max()
            flags = mx.stack([mx.all(state.done), ended, live]).astype(mx.int32)
            flags = mx.concatenate([flags, first])
        stop, ended, live, *eos_index = flags.tolist()
        self.step_syncs += 1
        self.ended = bool(ended)
        return tokens, first, eos_index, bool(stop), live

    def count(self, running: mx.array, width: int):
        """Count one decoder forward of `width` positions for the `running` (B,) rows."""
        running = running.astype(mx.int32)
        self.forwards = self.forwards + running
        self.positions_forwarded = self.positions_forwarded + running * width

    def soft(self, conditioning) -> dict:
        """`denoise`'s keyword for the conditioning a step built: the soft embedding
        (fast mode's gathered self-conditioning) or the probabilities."""
        name = "embeddings" if self.config.self_conditioning_top_k else "probs"
        return {f"self_conditioning_{name}": conditioning}

    def forward_all(self, ids, cond, cache) -> mx.array:
        """Compaction: the logits of every position, with fresh K/V for all of them."""
        self.canvas_kv = None
        every = mx.broadcast_to(mx.arange(ids.shape[1], dtype=mx.int32), ids.shape)
        return self.forward_active(ids, cond, every, cache)

    def forward_active(self, ids, cond, positions, cache) -> mx.array:
        """Compaction: the logits of canvas `positions` (B, n) holding `ids`, the other
        positions seen through the canvas K/V of earlier steps (stale)."""
        self.shapes.add(positions.shape[1])
        self.active = positions
        logits, self.canvas_kv = self.model.denoise_active(
            ids, positions, cache, self.canvas_kv, cond
        )
        return logits

    def forward(self, state: S.StepState, cache, live: int = 0) -> mx.array:
        """The next step's logits, conditioned on this step's probabilities; with
        compaction, of a bucket of positions holding the `live` ones of each row."""
        with mx.stream(self.stream):
            if self.config.compact:
                positions = S.active_positions(self.live, bucket(live, state.canvas.shape[1]))
                ids = mx.take_along_axis(state.canvas, positions, axis=1)
                cond = mx.take_along_axis(state.probs, positions[..., None], axis=1)
                return self.forward_active(ids, cond, positions, cache)
            return self.denoise(state.canvas, cache, **self.soft(state.probs))

    def denoise(self, canvas, cache, **soft) -> mx.array:
        """`model.denoise` (logits before the softcap); on the CPU, a batch of at least
        two rows per lane is split over the lanes: rows are independent, and MLX runs a
        CPU stream's element-wise ops (the experts' GELU, attention's exp) on one thread."""
        B = canvas.shape[0]
        if self.lanes is None or B < 2 * len(self.lanes):
            return self.model.denoise(canvas, cache, apply_softcap=False, **soft)
        cuts = [B * i // len(self.lanes) for i in range(len(self.lanes) + 1)]
        parts = []
        for stream, a, b in zip(self.lanes, cuts, cuts[1:]):
            with mx.stream(stream):
                rows = slice(a, b)
                part = {k: v[rows] for k, v in soft.items()}
                views = [CacheRows(c, rows) for c in cache]
                parts.append(self.model.denoise(canvas[rows], views, apply_softcap=False, **part))
        return mx.concatenate(parts)

    def full_pass(self, state: S.StepState, plan: CanvasPlan, cache):
        """One forward of the whole canvas on its draft (fresh K/V everywhere, the last
        conditioning), after a canvas stopped: (logits, argmax), the argmax keeping the
        layout's fixed ids and token classes."""
        C = plan.ids.shape[1]
        with mx.stream(self.stream):
            self.count(~self.finished, C)
            if self.config.compact:  # fresh K/V for the steps that may follow
                logits = self.forward_all(state.argmax, state.probs, cache)
            else:
                self.shapes.add(C)
                logits = self.denoise(state.argmax, cache, **self.soft(state.probs))
            masked = logits if plan.allowed is None else mx.where(plan.allowed, logits, -mx.inf)
            argmax = mx.where(plan.fixed, plan.ids, mx.argmax(masked, axis=-1))
            return logits, argmax.astype(state.argmax.dtype)

    def repair(self, state: S.StepState, plan: CanvasPlan, cache) -> S.StepState:
        """Fast mode's repair pass: the argmax of a `full_pass` becomes the draft."""
        return state._replace(argmax=self.full_pass(state, plan, cache)[1])

    def reopen(self, state: S.StepState, plan: CanvasPlan, cache):
        """Fast mode's reopening repair pass: committed positions whose argmax a
        `full_pass` changes are reopened, and the canvas goes on denoising from its logits.

        Returns (state, the logits for the next step, whether any position reopened).
        """
        logits, argmax = self.full_pass(state, plan, cache)
        with mx.stream(self.stream):
            changed = (argmax != state.argmax) & ~self.finished[:, None]
            state = state._replace(
                fixed=state.fixed & ~changed, done=state.done & ~mx.any(changed, axis=-1)
            )
            reopened = mx.any(changed)
        self.step_syncs += 1
        return state, logits, reopened.item()

    def canvas(self, block: int, plan: CanvasPlan, cache, drafts: bool):
        """Denoise one canvas; yields its `DenoiseStep`s if `drafts`, returns its `Block`."""
        encode_s = self.encode_last(cache)
        tic = time.perf_counter()
        state, logits = self.start(plan, cache)
        cfg = self.config
        N, passes = cfg.max_denoising_steps, cfg.repair
        n = N  # steps left
        while n > 0:
            state, accepted = self.step(state, logits, plan.allowed, n)
            mx.async_eval(state.canvas, state.argmax, state.probs, state.done, self.forwards)
            # Build the next step's forward while this one runs; it is only evaluated
            # (and its random draws made) if the stop test below says to go on. With
            # compaction its width is known only after the sync.
            if n > 1 and not cfg.compact:
                logits = self.forward(state, cache)
            if drafts:
                yield DenoiseStep(block, N - n + 1, state.argmax, accepted, state.canvas)
            tokens, first, eos_index, stop, live = self.sync(state)
            n -= 1
            if stop and cfg.reopen and passes and n > 0:
                passes -= 1
                state, logits, reopened = self.reopen(state, plan, cache)
                if not reopened:  # the pass agrees with every committed token
                    passes = 0
                    break
            elif stop:
                break
            elif n > 0 and cfg.compact:
                logits = self.forward(state, cache, live)
        for _ in range(passes):
            state = self.repair(state, plan, cache)
            tokens, first, eos_index, _, _ = self.sync(state)
        tokens = mx.where(self.finished[:, None], self.config.pad_token_id, tokens)
        self.finished = self.finished | (first >= 0)
        self.last = tokens
        seconds = (encode_s, time.perf_counter() - tic)
        counts = (self.forwards, *seconds, self.step_syncs, self.encode_syncs)
        counts += (self.positions_forwarded, len(self.shapes))
        return Block(block, tokens, N - n, self.finished, tuple(eos_index), *counts)
