"""The exact block-diffusion loop on token ids (transformers' `DiffusionGemmaGenerationMixin.generate`).

`DenoisingLoop.generate` runs, in transformers' order:
  1. encode the prompt into the cache;
  2. per canvas: encode the previous canvas (if any); start from uniform random ids
     (fixed and seeded ids from a `CanvasPlan`); then per denoising step: denoise,
     temperature, sample, accept, renoise, stop test (`sampler.py`'s math);
  3. append the argmax canvas, pad after EOS, and stop when every row has ended.

Nothing here is an approximation: fast mode's loop is a subclass (`fast.py`), and
`steps.generate_step` picks one loop per generation. The work runs on a stream of its
own (as mlx-lm's `generation_stream`), one per thread and device, so a generation may
run from any thread and leaves the caller's default stream alone.
"""

import functools
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Tuple

import mlx.core as mx

from . import sampler as S
from .canvas import CanvasPlan, check_token_ids
from .config import DiffusionConfig
from .lanes import cpu_lanes, split_denoise, split_stats


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


class Sync(NamedTuple):
    """What a step's one device->host wait brings back."""

    tokens: mx.array  # (B, C) the draft, pad after each row's first EOS
    first: mx.array  # (B,) its first EOS per row, -1 for none (and for rows that ended)
    eos_index: List[int]  # `first` on the host
    stop: bool  # every row's canvas has stopped
    extra: List[int]  # what a subclass asked for in `watch` (fast mode's compaction)


_streams = {}


def generation_stream() -> mx.ThreadLocalStream:
    """The stream generation runs on: one per device, unique per thread (as mlx-lm's)."""
    device = mx.default_device()
    if str(device) not in _streams:
        _streams[str(device)] = mx.new_thread_local_stream(device)
    return _streams[str(device)]


compiled_stats = mx.compile(S.step_stats)


def _compile_update(accept: S.Accept, confidence_threshold: float):
    step = functools.partial(
        S.step_update, accept=accept, confidence_threshold=confidence_threshold
    )
    return mx.compile(step)


# One compiled step per (rule, threshold): equal frozen rules share it.
compiled_update = functools.lru_cache(maxsize=32)(_compile_update)


def update_for(accept: S.Accept, confidence_threshold: float):
    """The compiled `sampler.step_update` of an acceptance rule (shared when hashable)."""
    if isinstance(accept, Hashable):
        return compiled_update(accept, confidence_threshold)
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


class DenoisingLoop:
    """transformers' denoising loop for one generation, and the counters its `Block`s
    report.

    Args:
        model: a `Model`.
        config: the sampler's settings.
        draws: the random draws (`sampler.RandomDraws` or a replay).
        accept: the acceptance rule (`sampler.Accept`).
        batch: rows of the prompt.
    """

    def __init__(self, model, config: DiffusionConfig, draws, accept: S.Accept, batch: int):
        self.model, self.config, self.draws = model, config, draws
        self.update = update_for(accept, config.confidence_threshold)
        self.stream = generation_stream()
        self.lanes = cpu_lanes(self.stream)
        self.eos = mx.array(config.eos_token_id or (), dtype=mx.int32)
        self.finished = mx.zeros((batch,), dtype=mx.bool_)  # rows that emitted EOS
        self.forwards = mx.zeros((batch,), dtype=mx.int32)
        self.positions_forwarded = mx.zeros((batch,), dtype=mx.int32)
        self.shapes = set()  # decoder input widths used
        self.step_syncs = self.encode_syncs = 0
        self.ended = False  # every row has emitted EOS (as of the last sync)
        self.last: Optional[mx.array] = None  # the previous canvas, not yet encoded

    def generate(self, prompt, cache, layout=None, drafts=False, prefill_step_size=512):
        """Encode `prompt`, then denoise canvases until max_new_tokens or every row's EOS;
        yields each canvas's `Block` (and its `DenoiseStep`s when `drafts`)."""
        C = self.model.args.canvas_length
        prefill(self.model, prompt, cache, prefill_step_size)
        for block in range(math.ceil(self.config.max_new_tokens / C)):
            if layout is None:
                plan = CanvasPlan.free(self.canvas_length(block))
            else:
                plan = layout.plan(block, C)
            yield (yield from self.canvas(block, plan, cache, drafts))
            if self.ended:
                break

    def canvas_length(self, block: int) -> int:
        """The length of canvas `block` with no layout: the model's canvas_length."""
        return self.model.args.canvas_length

    def canvas(self, block: int, plan: CanvasPlan, cache, drafts: bool):
        """Denoise one canvas; yields its `DenoiseStep`s if `drafts`, returns its `Block`."""
        encode_s = self.encode_last(cache)
        tic = time.perf_counter()
        state = self.start(plan)
        logits = self.forward(state, cache)
        N = self.config.max_denoising_steps
        for n in range(N, 0, -1):  # n: steps left, this one included
            state, accepted = self.step(state, logits, plan.allowed, n)
            mx.async_eval(state.canvas, state.argmax, state.conditioning, state.done, self.forwards)
            if n > 1:
                # Build the next forward while this step runs; it is only evaluated if
                # the stop test below says to go on.
                logits = self.forward(state, cache)
            if drafts:
                yield DenoiseStep(block, N - n + 1, state.argmax, accepted, state.canvas)
            end = self.sync(state)
            if end.stop:
                break
        return self.finish(block, end, N - n + 1, encode_s, tic)

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

    def start(self, plan: CanvasPlan) -> S.StepState:
        """A canvas's first state: uniform random ids, the plan's fixed and seed ids."""
        k = self.config.stability_threshold
        noise = self.draws.initial_canvas((self.finished.shape[0], plan.ids.shape[1]))
        x = plan.start(noise)
        blank = mx.full(x.shape, -1, dtype=x.dtype)
        done = mx.zeros(self.finished.shape, dtype=mx.bool_)
        return S.StepState(x, x, None, done, (blank,) * k, plan.fixed, plan.ids.astype(x.dtype))

    def forward(self, state: S.StepState, cache) -> mx.array:
        """Denoise: the logits (before the softcap) of the canvas, conditioned on the last
        step's probabilities (none at a canvas's first step)."""
        with mx.stream(self.stream):
            self.shapes.add(state.canvas.shape[1])
            cond = state.conditioning  # None at a canvas's first step: no conditioning
            kw = {} if cond is None else self.conditioning(cond)
            return split_denoise(self.model, state.canvas, cache, self.lanes, **kw)

    def conditioning(self, conditioning) -> dict:
        """`model.denoise`'s self-conditioning keyword for a state's conditioning."""
        return {"self_conditioning_probs": conditioning}

    def step(self, state: S.StepState, logits, allowed, n: int):
        """Denoising step `n` (steps left) from `logits`: temperature, sample, accept,
        renoise, stop test. Returns (the next state, the accepted mask)."""
        cfg = self.config
        with mx.stream(self.stream):
            self.count(~(state.done | self.finished), logits.shape[1])
            temp = S.temperature(n, cfg.max_denoising_steps, cfg.t_min, cfg.t_max)
            proposal = self.propose(state, logits, temp, allowed, n)
            if state.conditioning is None:  # rows that stop keep their last conditioning
                state = state._replace(conditioning=proposal.next_conditioning)
            return self.update(state, proposal, self.draws.noise(state.canvas.shape))

    def propose(self, state, logits, temp, allowed, n: int) -> S.Proposal:
        """The step's statistics (softcap, temperature and one exp over the vocabulary)
        and one sample per position."""
        cap = self.model.args.final_logit_softcapping
        p, ent, argmax = split_stats(compiled_stats, logits, temp, cap, allowed, self.lanes)
        return S.Proposal(p, ent, argmax, self.draws.sample(p), mx.array(n, mx.int32))

    def count(self, running: mx.array, width: int):
        """Count one decoder forward of `width` positions for the `running` (B,) rows."""
        running = running.astype(mx.int32)
        self.forwards = self.forwards + running
        self.positions_forwarded = self.positions_forwarded + running * width

    def watch(self, state: S.StepState) -> List[mx.array]:
        """Scalars a subclass needs on the host after each step (in `Sync.extra`)."""
        return []

    def sync(self, state: S.StepState) -> Sync:
        """The one host sync per step: the draft's EOS, the stop test, every row ended."""
        with mx.stream(self.stream):
            tokens, first = S.pad_after_eos(state.argmax, self.eos, self.config.pad_token_id)
            first = mx.where(self.finished, -1, first)  # rows that ended get a canvas of pad
            ended = mx.all(self.finished | (first >= 0))
            extra = self.watch(state)
            flags = mx.stack([mx.all(state.done), ended, *extra]).astype(mx.int32)
            flags = mx.concatenate([flags, first]).tolist()
        self.step_syncs += 1
        self.ended = bool(flags[1])
        n = 2 + len(extra)
        return Sync(tokens, first, flags[n:], bool(flags[0]), flags[2:n])

    def finish(self, block: int, end: Sync, steps: int, encode_s: float, tic: float) -> Block:
        """Append the canvas: its draft, pad for rows that had ended; its `Block`."""
        tokens = mx.where(self.finished[:, None], self.config.pad_token_id, end.tokens)
        self.finished = self.finished | (end.first >= 0)
        self.last = tokens
        return Block(
            block=block,
            tokens=tokens,
            steps=steps,
            finished=self.finished,
            eos_index=tuple(end.eos_index),
            decoder_forwards=self.forwards,
            encode_seconds=encode_s,
            denoise_seconds=time.perf_counter() - tic,
            step_syncs=self.step_syncs,
            encode_syncs=self.encode_syncs,
            positions_forwarded=self.positions_forwarded,
            forward_shapes=len(self.shapes),
        )
