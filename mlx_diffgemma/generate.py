"""Text-level generation: `stream_generate` yields responses, `generate` drains it.

`stream_generate` maps the token-level events of `block_diffusion.generate_step` to text:
one "commit" response per canvas (and one "draft" per denoising step when asked), the
thinking block split from the answer, the output trimmed to `max_tokens`. A `PromptCache`
carries a conversation from one call to the next. A `CanvasLayout` fixes, seeds or limits
output positions (infill, structured output, puzzles).
"""

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from . import sampler as S
from .block_diffusion import DenoiseStep, generate_step, prefill
from .config import DiffusionConfig
from .images import prompt_images
from .tokenizer import split_thinking

Prompt = Union[str, Sequence[int], mx.array, Sequence[Dict[str, Any]]]

# A model turn's answer, stood in by this text, to render only what follows it.
_ANSWER = "ANSWER-PLACEHOLDER-5e1f"
# Headers that `split_thinking` removes from the start of an answer. Text that is still a
# proper prefix of one may become a header with the next canvas, so it is held back.
_HEADERS = ("<|channel>thought\n", "<|channel>final\n", "thought\n", "final\n")


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed response.

    Attributes:
        kind: "draft" (one denoising step; only when drafts are requested) or "commit"
            (one committed canvas).
        text: answer text committed by this response ("" for drafts).
        thinking: thinking text committed by this response (the `<|channel>thought`
            block, markers removed; "" for drafts and plain answers).
        token_ids: ids committed by this response, trimmed to max_tokens, EOS excluded.
        block_index: canvas index, from 0.
        step: denoising steps run on this canvas so far.
        draft_text: drafts only: the argmax canvas of this step, as text.
        draft_tokens: drafts only: the argmax canvas of this step, as ids.
        draft_accepted: drafts only: per position, whether this step accepted its sample
            (it survives into the next step's canvas; the others are renoised).
        prompt_tokens: tokens encoded before denoising (for a cached conversation, only
            the new ones).
        prompt_tps: prompt tokens per second.
        generation_tokens: tokens committed so far.
        generation_tps: committed tokens per second since the prompt was encoded.
        canvases: canvases committed so far.
        denoising_steps: steps run on each committed canvas.
        tokens_per_forward: non-pad canvas tokens per decoder forward, as transformers
            counts it (whole canvases, EOS included, before max_tokens trimming).
        peak_memory: peak memory in GB.
        seed: the seed of all random draws (drawn at random when none was given).
        finish_reason: on the last response only: "stop" (EOS) or "length".
    """

    kind: str
    text: str
    thinking: str
    token_ids: Tuple[int, ...]
    block_index: int
    step: int
    draft_text: Optional[str]
    draft_tokens: Optional[Tuple[int, ...]]
    draft_accepted: Optional[Tuple[bool, ...]]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    canvases: int
    denoising_steps: Tuple[int, ...]
    tokens_per_forward: float
    peak_memory: float
    seed: int
    finish_reason: Optional[str] = None


class PromptCache:
    """The encoder cache of a conversation, kept by an app from one call to the next.

    A call encodes only what the cache does not hold yet. The last canvas of a call is
    never encoded (`generate_step` encodes a canvas only before denoising the next one),
    so its kept tokens wait in `pending` and go first into the next call's prompt, at
    the positions where they were denoised. `pending` holds the answer without its EOS;
    a chat-message prompt then closes the model turn as the chat template does
    (`<turn|>\\n`), so the history reads as the template renders it.

    Thinking: the cache keeps the thought tokens of earlier answers. Re-rendering the
    chat template would drop them; keeping them is what the model saw, and it saves
    re-encoding the history. So a cached conversation differs from a re-rendered one
    by those thoughts.

    If a call stops early (the consumer stops iterating), the cache keeps what the call
    fed and committed so far.

    Attributes:
        layers: the per-layer K/V caches (`model.make_cache()`).
        tokens: the ids whose K/V `layers` hold, in order.
        pending: ids the next call encodes before its prompt.
        enable_thinking: the thinking mode of the chat template, once a chat-message
            prompt started the conversation; None before.
    """

    def __init__(self, model):
        self.layers = model.make_cache()
        self.tokens: List[int] = []
        self.pending: List[int] = []
        self.enable_thinking: Optional[bool] = None
        self._broken = False

    @property
    def offset(self) -> int:
        """Tokens encoded so far: the position of the next one."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens) + len(self.pending)

    def _check(self):
        if self._broken:
            raise ValueError(
                "This PromptCache was interrupted while it was being written; start a new one."
            )

    def _update(self, conversation: List[int]):
        # The layers know how much was encoded; a call interrupted inside an encode leaves
        # layers at different offsets, and such a cache cannot be continued.
        offsets = {c.offset for c in self.layers}
        if len(offsets) > 1:
            self._broken = True
            return
        n = offsets.pop()
        self.tokens, self.pending = conversation[:n], conversation[n:]


@dataclass(frozen=True)
class CanvasLayout:
    """What the output positions hold before denoising, from the first output token on.

    Fixed positions are clamped: they start as their id, are never renoised or
    resampled, are always accepted, use none of the entropy bound, and appear as is in
    the output. Seeded positions start as their id instead of random noise and then
    denoise like any other (a warm start: after the first step the seed survives only
    where it is accepted). A position with a token class samples only from that row of
    `token_masks`. Positions past the end of the layout are free.

    Attributes:
        ids: per position, the fixed or seed token id (ignored at free positions).
        fixed: per position, True where the id is clamped.
        seeded: per position, True where the canvas starts from the id; () for none.
        token_class: per position, a row of `token_masks`, or -1 for no limit; () for none.
        token_masks: (K, V) bool, the allowed tokens of each class; None without classes.
    """

    ids: Tuple[int, ...]
    fixed: Tuple[bool, ...]
    seeded: Tuple[bool, ...] = ()
    token_class: Tuple[int, ...] = ()
    token_masks: Optional[mx.array] = None

    def __post_init__(self):
        n = len(self.ids)
        for name in ("fixed", "seeded", "token_class"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if value and len(value) != n:
                raise ValueError(f"CanvasLayout.{name} has {len(value)} entries; ids has {n}.")
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        if any(f and s for f, s in zip(self.fixed, self.seeded)):
            raise ValueError("A CanvasLayout position cannot be both fixed and seeded.")
        if self.token_class and any(c >= 0 for c in self.token_class):
            if self.token_masks is None or self.token_masks.ndim != 2:
                raise ValueError("token_class needs token_masks, a (K, V) bool array.")
            if max(self.token_class) >= self.token_masks.shape[0]:
                raise ValueError(
                    f"token_class {max(self.token_class)} is out of range for "
                    f"{self.token_masks.shape[0]} token_masks rows."
                )
            empty = (~mx.any(self.token_masks, axis=1)).tolist()
            if any(empty):
                raise ValueError(f"token_masks row {empty.index(True)} allows no token.")

    def __len__(self) -> int:
        return len(self.ids)

    def _block(self, values, block: int, C: int, fill):
        part = list(values[block * C : (block + 1) * C])
        return mx.array([part + [fill] * (C - len(part))])

    def _per_canvas(self, flags, canvases: int, C: int):
        # Per canvas None (no flagged position) or (mask, ids), each (1, C).
        return [
            (self._block(flags, b, C, False), self._block(self.ids, b, C, 0))
            if any(flags[b * C : (b + 1) * C])
            else None
            for b in range(canvases)
        ]

    def clamps(self, canvases: int, C: int) -> List[Optional[Tuple[mx.array, mx.array]]]:
        """`generate_step`'s clamps: per canvas None or (mask, ids), each (1, C)."""
        return self._per_canvas(self.fixed, canvases, C)

    def seeds(self, canvases: int, C: int) -> List[Optional[Tuple[mx.array, mx.array]]]:
        """Per canvas None or (mask, ids), each (1, C): where the canvas starts from `ids`."""
        return self._per_canvas(self.seeded, canvases, C)

    def classes(self, canvases: int, C: int):
        """`generate_step`'s (token_masks, token_classes), or (None, ()) without classes.

        An all-allowed row is appended for the positions with no limit.
        """
        if not self.token_class or all(c < 0 for c in self.token_class):
            return None, ()
        K, V = self.token_masks.shape
        masks = mx.concatenate([self.token_masks.astype(mx.bool_), mx.ones((1, V), mx.bool_)])
        classes = [c if c >= 0 else K for c in self.token_class]
        out = []
        for b in range(canvases):
            limited = any(c >= 0 for c in self.token_class[b * C : (b + 1) * C])
            out.append(self._block(classes, b, C, K) if limited else None)
        return masks, out


class _SeededDraws(S.RandomDraws):
    """Random draws whose canvas `b` starts from `seeds[b]` (mask, ids) where given."""

    def __init__(self, key, vocab_size, seeds):
        super().__init__(key, vocab_size)
        self.seeds = list(seeds)
        self.block = 0

    def initial_canvas(self, shape):
        x = super().initial_canvas(shape)  # drawn anyway: the other draws stay as unseeded
        seed = self.seeds[self.block] if self.block < len(self.seeds) else None
        self.block += 1
        return x if seed is None else mx.where(seed[0], seed[1].astype(x.dtype), x)


def resolve_config(
    model, config: Optional[DiffusionConfig] = None, max_tokens: Optional[int] = None, **settings
) -> DiffusionConfig:
    """The sampler settings of a call (precedence in `config.py`).

    Args:
        model: a loaded model; its `generation_config` is the base unless `config` is given.
        config: explicit base settings.
        max_tokens: overrides `max_new_tokens`.
        settings: overrides of other `DiffusionConfig` fields; None keeps the base value.

    Returns:
        The validated settings.

    Raises:
        ValueError: a setting is invalid (the message names it).
    """
    base = config or getattr(model, "generation_config", None) or DiffusionConfig()
    return base.replace(max_new_tokens=max_tokens, **settings)


def ineffective_settings(config: DiffusionConfig) -> Dict[str, str]:
    """Settings that cannot change the output under `config`, with the reason.

    Args:
        config: resolved settings.

    Returns:
        A dict from `DiffusionConfig` field name to a one-line reason.
    """
    out = {}
    n = config.max_denoising_steps
    if n == 1:
        out["t_min"] = "with 1 denoising step the only step runs at t_max"
    if config.stability_threshold + 1 >= n:
        # The argmax must repeat stability_threshold + 1 times, so no step is ever saved.
        why = (
            f"a canvas can stop early only after stability_threshold + 1 = "
            f"{config.stability_threshold + 1} steps, and at most {n} run"
        )
        out["stability_threshold"] = out["confidence_threshold"] = why
    return out


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def _continue_chat(tokenizer, messages) -> List[int]:
    # Render the new messages after a stand-in model turn and keep what follows its
    # answer: the turn close plus the new turns, exactly as the template writes them.
    if any(m.get("role") in ("system", "developer") for m in messages):
        raise ValueError(
            "A system message can only start a conversation, and this prompt cache "
            "already holds one; start a new PromptCache to change the system prompt."
        )
    history = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER}]
    text = tokenizer.apply_chat_template(
        history + list(messages), add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text[text.index(_ANSWER) + len(_ANSWER) :])


def _prompt_ids(tokenizer, prompt: Prompt, cache: PromptCache, enable_thinking) -> List[int]:
    """Ids of `prompt` to encode after what `cache` holds."""
    started = len(cache) > 0
    if _is_messages(prompt):
        if not started:
            cache.enable_thinking = bool(enable_thinking)
            return tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, enable_thinking=cache.enable_thinking
            )
        if enable_thinking is not None and enable_thinking != cache.enable_thinking:
            raise ValueError(
                f"enable_thinking={enable_thinking} has no effect after the first turn "
                "(the switch is in the system turn); start a new PromptCache to change it."
            )
        return _continue_chat(tokenizer, prompt)
    if enable_thinking is not None:
        raise ValueError(
            "enable_thinking applies to chat-message prompts only; pass a list of messages, "
            "or render the template with tokenizer.apply_chat_template."
        )
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("The prompt is empty; give some text.")
        ids = tokenizer.encode(prompt)
        bos = tokenizer.bos_token_id
        return ids if started or ids[:1] == [bos] else [bos] + ids
    ids = prompt.reshape(-1).tolist() if isinstance(prompt, mx.array) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("The prompt is empty; give at least one token.")
    return ids


def _check_context(model, cache: PromptCache, new: int, config: DiffusionConfig):
    limit = model.args.max_position_embeddings
    C = model.args.canvas_length
    canvases = math.ceil(config.max_new_tokens / C)
    held = cache.offset + new
    if held > limit:
        raise ValueError(
            f"The prompt is {held} tokens long (with {cache.offset} already in the cache), "
            f"more than the model's context of {limit} tokens (max_position_embeddings)."
        )
    if held + canvases * C > limit:
        raise ValueError(
            f"The prompt ({held} tokens) plus {canvases} canvases of {C} tokens for "
            f"max_tokens={config.max_new_tokens} need {held + canvases * C} positions, more "
            f"than the model's context of {limit} (max_position_embeddings); lower max_tokens."
        )


class _ThinkingSplit:
    """Splits committed text, block by block, into thinking and answer deltas."""

    def __init__(self):
        self.raw = ""
        self.sent = [0, 0]  # characters of thinking and answer already emitted

    def add(self, delta: str, final: bool) -> Tuple[str, str]:
        self.raw += delta
        thinking, answer = split_thinking(self.raw)
        start = self.raw if thinking is None else self.raw.partition("<channel|>")[2]
        if not final and any(h != start and h.startswith(start) for h in _HEADERS):
            answer = ""  # nothing was emitted yet: the answer start is still undecided
        thinking = thinking or ""
        out = thinking[self.sent[0] :], answer[self.sent[1] :]
        self.sent = [len(thinking), len(answer)]
        return out


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: Optional[int] = None,
    config: Optional[DiffusionConfig] = None,
    seed: Optional[int] = None,
    drafts: bool = False,
    prompt_cache: Optional[PromptCache] = None,
    enable_thinking: Optional[bool] = None,
    layout: Optional[CanvasLayout] = None,
    **settings,
) -> Generator[GenerationResponse, None, None]:
    """Stream a generation: a "commit" response per canvas, and a "draft" per step if asked.

    Whole canvases are always computed; the output is trimmed to `max_tokens`, which
    therefore never changes what the model computes. The last response alone carries
    `finish_reason`. Stopping the iteration stops the work: no further forward runs.

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        prompt: chat messages (dicts with `role` and `content`, rendered with the
            checkpoint's chat template; content parts may be images, see `images.py`),
            text (encoded as is, BOS added) or token ids.
            With a `prompt_cache` that holds a conversation, give only the new messages.
        max_tokens: output tokens at most; defaults to the checkpoint's `max_new_tokens`.
        config: sampler settings; defaults to the checkpoint's (`model.generation_config`).
        seed: seed of all random draws; drawn at random (and reported) if None.
        drafts: also yield the argmax canvas after every denoising step.
        prompt_cache: a `PromptCache` to continue and update; a fresh one if None.
        enable_thinking: chat messages only: ask for a thinking block (first turn).
        layout: fixed, seeded and token-limited output positions (see `CanvasLayout`);
            `max_tokens` then defaults to its length. EOS still ends the output: fixed
            positions after an EOS the model wrote are not returned; pass
            `eos_token_id=()` to run every canvas, or limit the free positions to
            tokens other than EOS.
        settings: overrides of `DiffusionConfig` fields, e.g. `max_denoising_steps=16`.

    Yields:
        `GenerationResponse`s.

    Raises:
        ValueError: empty prompt, invalid setting, prompt and canvases longer than the
            model's context, a layout longer than `max_tokens`, or an unusable image.
    """
    if layout is not None and max_tokens is None:
        max_tokens = len(layout)
    config = resolve_config(model, config, max_tokens, **settings)
    if layout is not None and len(layout) > config.max_new_tokens:
        raise ValueError(
            f"The layout has {len(layout)} positions but max_tokens is "
            f"{config.max_new_tokens}; raise max_tokens or leave it unset."
        )
    cache = prompt_cache if prompt_cache is not None else PromptCache(model)
    cache._check()
    ids = _prompt_ids(tokenizer, prompt, cache, enable_thinking)
    new, images = prompt_images(model, prompt, cache.pending, ids, cache.offset, config)
    _check_context(model, cache, len(new), config)
    seed = secrets.randbits(31) if seed is None else seed
    C = model.args.canvas_length
    n_canvases = math.ceil(config.max_new_tokens / C)
    eos = set(config.eos_token_id or ())
    pad = config.pad_token_id
    conversation = cache.tokens + new  # plus the committed tokens, as they come

    detok = tokenizer.detokenizer()
    split = _ThinkingSplit()
    n_out, non_pad, forwards, steps = 0, 0, 0, []

    def response(kind, block, step, text="", thinking="", ids=(), draft=None, finish=None):
        elapsed = time.perf_counter() - gen_start
        tokens, accepted = draft or (None, None)
        return GenerationResponse(
            kind=kind,
            text=text,
            thinking=thinking,
            token_ids=tuple(ids),
            block_index=block,
            step=step,
            draft_text=None if draft is None else tokenizer.decode(tokens),
            draft_tokens=tokens,
            draft_accepted=accepted,
            prompt_tokens=len(new),
            prompt_tps=prompt_tps,
            generation_tokens=n_out,
            generation_tps=n_out / elapsed if elapsed > 0 else 0.0,
            canvases=len(steps),
            denoising_steps=tuple(steps),
            tokens_per_forward=non_pad / forwards if forwards else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            seed=seed,
            finish_reason=finish,
        )

    mx.reset_peak_memory()
    events = None
    try:
        tic = time.perf_counter()
        if images is None:
            prefill(model, mx.array([new], dtype=mx.int32), cache.layers)
        else:  # soft tokens in, each image's run whole in one chunk
            images.prefill(model, new, cache.layers)
        gen_start = time.perf_counter()
        prompt_tps = len(new) / (gen_start - tic)
        key, draws, canvas = mx.random.key(seed), None, {}
        if layout is not None:
            seeds = layout.seeds(n_canvases, C)
            if any(s is not None for s in seeds):
                key, draws = None, _SeededDraws(key, model.args.vocab_size, seeds)
            masks, classes = layout.classes(n_canvases, C)
            canvas = dict(
                clamps=layout.clamps(n_canvases, C), token_masks=masks, token_classes=classes
            )
        events = generate_step(
            mx.zeros((1, 0), dtype=mx.int32),  # the prompt is in the cache already
            model,
            config=config,
            cache=cache.layers,
            key=key,
            draws=draws,
            drafts=drafts,
            **canvas,
        )
        for ev in events:
            if isinstance(ev, DenoiseStep):
                draft = (tuple(ev.argmax[0].tolist()), tuple(ev.accepted[0].tolist()))
                yield response("draft", ev.block, ev.step, draft=draft)
                continue
            block = ev.tokens[0].tolist()
            steps.append(ev.steps)
            non_pad += sum(t != pad for t in block)
            forwards = ev.decoder_forwards[0].item()
            stop = next((i for i, t in enumerate(block) if t in eos), None)
            budget = config.max_new_tokens - n_out
            keep = block[: budget if stop is None else min(stop, budget)]
            finish = None
            if stop is not None and stop <= budget:
                finish = "stop"
            elif stop is not None or ev.block + 1 >= n_canvases:
                finish = "length"
            n_out += len(keep)
            conversation += keep
            text = detok.add_tokens(keep) + (detok.finalize() if finish else "")
            thinking, answer = split.add(text, final=finish is not None)
            yield response("commit", ev.block, ev.steps, answer, thinking, keep, finish=finish)
            if finish:
                return
    finally:
        if events is not None:
            events.close()
        cache._update(conversation)


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False, **kwargs) -> str:
    """Generate and return the answer text (thinking excluded).

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        prompt: as for `stream_generate`.
        verbose: print the text as it is committed, then the statistics.
        kwargs: as for `stream_generate`.

    Returns:
        The answer: the concatenated `text` of the commit responses.
    """
    text, last = [], None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if last.kind == "commit":
            text.append(last.text)
            if verbose:
                print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return "".join(text)


def format_stats(response: GenerationResponse) -> str:
    """The statistics of a (final) response, one per line."""
    r = response
    steps = r.denoising_steps
    mean = sum(steps) / len(steps) if steps else 0.0
    return "\n".join(
        [
            "=" * 10,
            f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
            f"Canvases: {r.canvases}, denoising steps per canvas: "
            f"{' '.join(map(str, steps))} (mean {mean:.1f})",
            f"Tokens per forward: {r.tokens_per_forward:.2f}",
            f"Peak memory: {r.peak_memory:.3f} GB",
            f"Seed: {r.seed}, finish: {r.finish_reason}",
        ]
    )


def main(args: Optional[List[str]] = None) -> None:
    """Command-line entry point (`python -m mlx_diffgemma.generate`); see `cli.py`."""
    from .cli import generate_command

    generate_command.main(args=args, prog_name="python -m mlx_diffgemma.generate")


if __name__ == "__main__":
    main()
