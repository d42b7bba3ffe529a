"""The block-diffusion loop on token ids (transformers' `DiffusionGemmaGenerationMixin.generate`).

1. a. encode the prompt (then each appended canvas) into the cache;
   b. start a canvas from uniform random ids;
   c. per denoising step: denoise, temperature, sample, argmax, entropy-bound accept,
      renoise the rest, stable-and-confident stop;
   d. append the argmax canvas; e. pad after EOS and stop when every row has ended.
"""

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from . import sampler as S
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
    decoder_forwards: mx.array  # (B,) int, counted as transformers' tokens_per_forward does
    encode_seconds: float  # re-encoding the previous canvas into the cache
    denoise_seconds: float  # this canvas's denoising steps
    step_syncs: int  # device->host waits in denoising steps so far: one per step
    encode_syncs: int  # waits for re-encoded canvases so far: one per canvas after the first


_step_stats = mx.compile(S.step_stats)
_lanes = threading.local()


def _cpu_lanes():
    """One stream per core to split a step's vocabulary pass over, on the CPU only.

    MLX runs a CPU stream's element-wise ops on one thread, and the pass over the
    vocabulary (tanh, exp) is most of a CPU step after the matmuls; rows are independent,
    so halves of the canvas run in parallel, bit for bit the same. Streams belong to the
    thread that made them, hence one set per thread.
    """
    if mx.default_device() != mx.cpu:
        return None
    if not hasattr(_lanes, "streams"):
        n = min(os.cpu_count() or 1, 4)
        _lanes.streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)]
    return _lanes.streams if len(_lanes.streams) > 1 else None


def _stats(logits, temp, cap, allowed, lanes):
    C = logits.shape[1]
    if lanes is None or C < len(lanes):
        return _step_stats(logits, temp, cap, allowed)
    cuts = [C * i // len(lanes) for i in range(len(lanes) + 1)]
    parts = []
    for stream, a, b in zip(lanes, cuts, cuts[1:]):
        with mx.stream(stream):
            part = None if allowed is None else allowed[:, a:b]
            parts.append(_step_stats(logits[:, a:b], temp, cap, part))
    return [mx.concatenate(p, axis=1) for p in zip(*parts)]
_step_update = mx.compile(S.step_update)


def _clamp(clamps, block, shape, dtype):
    clamp = clamps[block] if block < len(clamps) else None
    if clamp is None:
        return mx.zeros(shape, dtype=mx.bool_), mx.zeros(shape, dtype=dtype)
    mask, ids = clamp
    if mask.shape != shape or ids.shape != shape:
        raise ValueError(f"Clamp mask and ids must have shape {shape}, got {mask.shape} and {ids.shape}.")
    return mask.astype(mx.bool_), ids.astype(dtype)


def _allowed(token_masks, token_classes, block, shape):
    classes = token_classes[block] if block < len(token_classes) else None
    if classes is None:
        return None
    if token_masks is None:
        raise ValueError("token_classes index token_masks; pass token_masks (K, V) as well.")
    if classes.shape != shape:
        raise ValueError(f"token_classes must have shape {shape}, got {classes.shape}.")
    # (B, C, V) bool, gathered once per canvas rather than at every step.
    return mx.take(token_masks.astype(mx.bool_), classes.astype(mx.int32), axis=0)


def prefill(model, prompt: mx.array, cache: List[Any], step_size: int = 512) -> None:
    """Encode `prompt` (B, L) in chunks; chunking is exact (see SlidingWindowCache)."""
    for i in range(0, prompt.shape[1], step_size):
        model.encode(prompt[:, i : i + step_size], cache)
        mx.eval([c.state for c in cache])


def generate_step(
    prompt: mx.array,
    model,
    *,
    config: DiffusionConfig,
    cache: Optional[List[Any]] = None,
    key: Optional[mx.array] = None,
    draws: Optional[Any] = None,
    canvas: Optional[mx.array] = None,
    clamps: Sequence[Optional[Tuple[mx.array, mx.array]]] = (),
    token_masks: Optional[mx.array] = None,
    token_classes: Sequence[Optional[mx.array]] = (),
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
        canvas: (B, C) starting canvas of the first block instead of random ids.
        clamps: per block, None or `(mask, ids)`, both (B, C): positions whose ids are
            fixed. They start as `ids`, are never renoised or resampled, are always
            accepted and appear as is in the output; the rest denoises as usual.
        token_masks: (K, V) bool, rows of allowed tokens for `token_classes`.
        token_classes: per block, None (no limit) or (B, C) int: the row of `token_masks`
            each position samples from. The logits of other tokens are -inf before the
            temperature, so sampling, argmax, entropy and the stop test all use the
            restricted distribution. Each row must allow at least one token.
        drafts: also yield every denoising step.
    """
    if (key is None) == (draws is None):
        raise ValueError("Pass exactly one of key or draws.")
    draws = draws or S.RandomDraws(key, model.args.vocab_size)
    cache = model.make_cache() if cache is None else cache
    B = prompt.shape[0]
    C = model.args.canvas_length
    N = config.max_denoising_steps
    if canvas is not None and canvas.shape != (B, C):
        raise ValueError(f"canvas must have shape {(B, C)}, got {tuple(canvas.shape)}.")
    eos = mx.array(config.eos_token_id or (), dtype=mx.int32)
    cap = model.args.final_logit_softcapping
    lanes = _cpu_lanes()

    prefill(model, prompt, cache, prefill_step_size)
    finished = mx.zeros((B,), dtype=mx.bool_)
    forwards = mx.zeros((B,), dtype=mx.int32)
    step_syncs = encode_syncs = 0
    last = None
    for block in range(math.ceil(config.max_new_tokens / C)):
        tic = time.perf_counter()
        if last is not None:
            # Re-encode the appended canvas at the positions the decoder used.
            model.encode(last, cache)
            mx.eval([c.state for c in cache])
            encode_syncs += 1
        encode_s = time.perf_counter() - tic
        tic = time.perf_counter()
        x = canvas if block == 0 and canvas is not None else draws.initial_canvas((B, C))
        clamp_mask, clamp_ids = _clamp(clamps, block, (B, C), x.dtype)
        x = mx.where(clamp_mask, clamp_ids, x)
        allowed = _allowed(token_masks, token_classes, block, (B, C))
        argmax, probs = x, None
        history = [mx.full((B, C), -1, dtype=x.dtype)] * config.stability_threshold
        done = mx.zeros((B,), dtype=mx.bool_)
        logits = model.denoise(x, cache, apply_softcap=False)
        steps = 0
        for n in range(N, 0, -1):
            forwards = forwards + (~(done | finished)).astype(mx.int32)
            temp = S.temperature(n, N, config.t_min, config.t_max)
            # One pass over the vocabulary (softcap, temperature, one exp) serves sampling,
            # entropy, the stop test and self-conditioning.
            p, ent, new_argmax = _stats(logits, temp, cap, allowed, lanes)
            x, argmax, probs, done, history, accepted = _step_update(
                p, ent, new_argmax, draws.sample(p), draws.noise((B, C)), x, argmax,
                p if probs is None else probs, done, history, clamp_mask, clamp_ids,
                config.entropy_bound, config.confidence_threshold,
            )
            steps += 1
            mx.async_eval(x, argmax, probs, done, forwards)
            # Build the next step's forward while this one runs; it is only evaluated
            # (and its random draws made) if the stop test below says to go on.
            if n > 1:
                logits = model.denoise(
                    x, cache, self_conditioning_probs=probs, apply_softcap=False
                )
            if drafts:
                yield DenoiseStep(block, steps, argmax, accepted, x)
            # The one host sync per step: the stop test, and whether every row has
            # emitted EOS if this is the canvas's last step.
            step_syncs += 1
            tokens, has_eos = S.pad_after_eos(argmax, eos, config.pad_token_id)
            stop, ended = mx.stack([mx.all(done), mx.all(finished | has_eos)]).tolist()
            if stop:
                break
        # Rows that ended in an earlier canvas get a canvas of pad.
        tokens = mx.where(finished[:, None], config.pad_token_id, tokens)
        finished = finished | has_eos
        last = tokens
        denoise_s = time.perf_counter() - tic
        yield Block(
            block, tokens, steps, finished, forwards, encode_s, denoise_s, step_syncs, encode_syncs
        )
        if ended:
            break
