"""Text-level generation: `stream_generate` yields responses, `generate` drains it."""

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Generator, List, Optional, Sequence, Union

import mlx.core as mx

from .block_diffusion import Block, DenoiseStep, generate_step
from .config import DiffusionConfig


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
