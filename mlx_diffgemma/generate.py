"""Block-diffusion generation: a token-level loop (`generate_step`), a text-level stream
(`stream_generate`) and `generate`, which drains the stream.

The loop mirrors transformers' `DiffusionGemmaGenerationMixin.generate`:
1. a. encode the prompt (then each appended canvas) into the cache;
   b. start a canvas from uniform random ids;
   c. per denoising step: denoise, temperature, sample, argmax, entropy-bound accept,
      renoise the rest, stable-and-confident stop;
   d. append the argmax canvas; e. pad after EOS and stop when every row has ended.
"""

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Generator, List, Optional, Sequence, Union

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
            `initial_canvas(shape)`, `noise(shape)`, `sample(logprobs)`), e.g. to replay.
        canvas: (B, C) starting canvas of the first block instead of random ids.
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

    prefill(model, prompt, cache, prefill_step_size)
    finished = mx.zeros((B,), dtype=mx.bool_)
    forwards = mx.zeros((B,), dtype=mx.int32)
    last = None
    for block in range(math.ceil(config.max_new_tokens / C)):
        if last is not None:
            # Re-encode the appended canvas at the positions the decoder used.
            model.encode(last, cache)
        x = canvas if block == 0 and canvas is not None else draws.initial_canvas((B, C))
        argmax, probs = x, None
        history = [mx.full((B, C), -1, dtype=x.dtype)] * config.stability_threshold
        done = mx.zeros((B,), dtype=mx.bool_)
        steps = 0
        for n in range(N, 0, -1):
            forwards = forwards + (~(done | finished)).astype(mx.int32)
            logits = model.denoise(x, cache, self_conditioning_probs=probs)
            logits = logits / S.temperature(n, N, config.t_min, config.t_max)
            # One log-softmax serves sampling, entropy, the stop test and self-conditioning.
            logp = S.log_softmax(logits)
            ent = S.entropy(logp)
            accepted = S.entropy_bound_accept(ent, config.entropy_bound)
            new_x = S.renoise(accepted, draws.sample(logp), draws.noise((B, C)))
            new_argmax = mx.argmax(logits, axis=-1).astype(x.dtype)
            new_probs = mx.exp(logp)
            # Rows that already stopped keep their canvas, argmax and conditioning.
            keep = done[:, None]
            new_argmax = mx.where(keep, argmax, new_argmax)
            x = mx.where(keep, x, new_x)
            if probs is not None:
                new_probs = mx.where(keep[..., None], probs, new_probs)
            stable = S.is_stable(history, new_argmax)
            history = history[1:] + [new_argmax] if history else history
            done = done | (stable & S.is_confident(ent, config.confidence_threshold))
            argmax, probs = new_argmax, new_probs
            steps += 1
            mx.async_eval(x, argmax, probs, done, forwards)
            if drafts:
                yield DenoiseStep(block, steps, argmax, accepted, x)
            if mx.all(done).item():  # the one host sync per step
                break
        tokens, has_eos = S.pad_after_eos(argmax, eos, config.pad_token_id)
        # Rows that ended in an earlier canvas get a canvas of pad.
        tokens = mx.where(finished[:, None], config.pad_token_id, tokens)
        finished = finished | has_eos
        last = tokens
        yield Block(block, tokens, steps, finished, forwards)
        if mx.all(finished).item():
            break


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed response.

    Attributes:
        kind: "draft" (one denoising step, only when drafts are requested) or "commit"
            (one committed canvas).
        text: committed text added by this response ("" for drafts).
        draft_text: the whole current canvas's argmax text (drafts only).
        block_index: canvas index, from 0.
        step: denoising steps run on this canvas so far.
        token_ids: ids committed by this response (trimmed to max_tokens, EOS excluded).
        prompt_tokens / prompt_tps: prompt length and its encode speed.
        generation_tokens / generation_tps: tokens committed so far and their rate.
        denoising_steps: steps per canvas so far.
        tokens_per_forward: committed tokens per decoder forward (transformers' metric).
        peak_memory: peak memory in GB.
        seed: the seed used (drawn at random when none was given).
        finish_reason: on the last response, "stop" (EOS) or "length".
    """

    kind: str
    text: str
    draft_text: Optional[str]
    block_index: int
    step: int
    token_ids: List[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    denoising_steps: List[int] = field(default_factory=list)
    tokens_per_forward: float = 0.0
    peak_memory: float = 0.0
    seed: Optional[int] = None
    finish_reason: Optional[str] = None


def _as_ids(tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        bos = tokenizer.bos_token_id
        return ids if ids[:1] == [bos] else [bos] + ids
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    return list(prompt)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    max_tokens: Optional[int] = None,
    config: Optional[DiffusionConfig] = None,
    seed: Optional[int] = None,
    drafts: bool = False,
    cache: Optional[List[Any]] = None,
    canvas: Optional[Sequence[int]] = None,
    **settings,
) -> Generator[GenerationResponse, None, None]:
    """Stream a generation: a "commit" response per canvas (and a "draft" per step if asked).

    Args:
        prompt: text (encoded as is, with BOS) or token ids; apply a chat template first
            for chat models (`tokenizer.apply_chat_template`).
        max_tokens: output is trimmed to this many tokens (whole canvases are computed).
        config: sampler settings; defaults to the checkpoint's (`model.generation_config`).
        seed: seed for all random draws; a random one is drawn (and reported) if None.
        drafts: yield the argmax canvas after every denoising step.
        cache: a cache holding earlier tokens; `prompt` then holds only the new ones.
        canvas: starting canvas ids of the first block.
        settings: overrides of `DiffusionConfig` fields (e.g. max_denoising_steps=16).
    """
    config = config or getattr(model, "generation_config", None) or DiffusionConfig()
    config = config.replace(max_new_tokens=max_tokens, **settings)
    seed = secrets.randbits(31) if seed is None else seed
    ids = _as_ids(tokenizer, prompt)
    if not ids:
        raise ValueError("The prompt is empty; give at least one token.")
    prompt_arr = mx.array([ids], dtype=mx.int32)
    canvas_arr = None if canvas is None else mx.array([list(canvas)], dtype=mx.int32)
    eos = set(config.eos_token_id or ())

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, gen_start = 0.0, None
    n_out, steps, committed = 0, [], False
    detok = tokenizer.detokenizer()

    def response(kind, text="", draft_text=None, block=0, step=0, token_ids=(), finish=None, fwd=0):
        elapsed = time.perf_counter() - gen_start
        return GenerationResponse(
            kind=kind,
            text=text,
            draft_text=draft_text,
            block_index=block,
            step=step,
            token_ids=list(token_ids),
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n_out,
            generation_tps=n_out / elapsed if elapsed > 0 else 0.0,
            denoising_steps=list(steps),
            tokens_per_forward=n_out / fwd if fwd else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            seed=seed,
            finish_reason=finish,
        )

    events = generate_step(
        prompt_arr,
        model,
        config=config,
        cache=cache,
        key=mx.random.key(seed),
        canvas=canvas_arr,
        drafts=drafts,
    )
    for ev in events:
        if gen_start is None:
            # generate_step prefills before its first event.
            gen_start = time.perf_counter()
            prompt_tps = len(ids) / (gen_start - tic)
        if isinstance(ev, DenoiseStep):
            yield response(
                "draft",
                draft_text=tokenizer.decode(ev.argmax[0].tolist()),
                block=ev.block,
                step=ev.step,
            )
            continue
        steps.append(ev.steps)
        block = ev.tokens[0].tolist()
        stop = next((i for i, t in enumerate(block) if t in eos), None)
        keep = block[: stop if stop is not None else len(block)]
        keep = keep[: config.max_new_tokens - n_out]
        n_out += len(keep)
        text = detok.add_tokens(keep)
        ended = stop is not None or n_out >= config.max_new_tokens
        last_block = ended or ev.block + 1 >= math.ceil(config.max_new_tokens / model.args.canvas_length)
        finish = None
        if last_block:
            text += detok.finalize()
            finish = "stop" if stop is not None else "length"
        yield response(
            "commit",
            text=text,
            block=ev.block,
            step=ev.steps,
            token_ids=keep,
            finish=finish,
            fwd=ev.decoder_forwards[0].item(),
        )
        if last_block:
            events.close()
            return


def generate(model, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generate and return the text; `kwargs` as for `stream_generate`."""
    text, last = [], None
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        if r.kind == "commit":
            text.append(r.text)
            if verbose:
                print(r.text, end="", flush=True)
        last = r
    if verbose and last is not None:
        print()
        print(
            f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec\n"
            f"Denoising steps per canvas: {last.denoising_steps}, "
            f"tokens per forward: {last.tokens_per_forward:.2f}\n"
            f"Peak memory: {last.peak_memory:.3f} GB"
        )
    return "".join(text)
