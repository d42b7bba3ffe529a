"""Text-level generation: `stream_generate` yields responses, `generate` drains it.

`stream_generate` maps the token-level events of `diffusion.steps.generate_step` to text:
one "commit" response per canvas (and one "draft" per denoising step when asked), the
thinking block split from the answer, the output trimmed to `max_tokens`. A `PromptCache`
carries a conversation from one call to the next. A `CanvasLayout` (from the token layer,
`diffusion/canvas.py`) fixes, seeds or limits output positions (infill, structured output, puzzles).

As mlx-lm's `stream_generate`, a generation runs under `wired_limit`: on Metal the
model's weights stay wired in memory for its duration (a no-op elsewhere).
"""

import math
import numbers
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple, Union

import click
import mlx.core as mx
from mlx_lm.generate import wired_limit

from .diffusion.canvas import CanvasLayout, check_token_ids
from .diffusion.config import DiffusionConfig
from .diffusion.steps import Block, DenoiseStep, generate_step, generation_stream, prefill
from .options import (
    CONTEXT_SETTINGS,
    SAMPLER_FLAGS,
    adapter_option,
    interrupted,
    model_option,
    one_line,
    read_stdin,
    sampler_flags,
    sampler_options,
    seed_option,
)
from .render import RESET, SHOW_CURSOR, Output
from .tokenizer import check_text, split_thinking
from .vision.prompt import prompt_images, user_message

Prompt = Union[str, Sequence[int], mx.array, Sequence[Dict[str, Any]]]

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
        generation_tokens: output tokens so far: the `token_ids` of the commits so far,
            together (trimmed to max_tokens, EOS excluded).
        generation_tps: generation_tokens per second since the prompt was encoded.
        canvases: canvases committed so far.
        denoising_steps: steps run on each committed canvas.
        tokens_per_forward: generation_tokens / decoder_forwards: output tokens per
            decoder forward. (transformers' `tokens_per_forward` counts whole canvases
            instead, EOS included, before any trimming; the token-level `Block`s give it.)
        peak_memory: peak memory in GB.
        seed: the seed of all random draws (drawn at random when none was given).
        finish_reason: on the last response only: "stop" (EOS) or "length".
        decoder_forwards: decoder forwards (denoising steps) run so far; each is a pass
            over a whole canvas.
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
    decoder_forwards: int = 0


class Cancelled(RuntimeError):
    """A generation stopped by its `should_stop` callback."""


class PromptCache:
    """The encoder cache of a conversation, kept by an app from one call to the next.

    A call encodes only what the cache does not hold yet. The last canvas of a call is
    never encoded (`generate_step` encodes a canvas only before denoising the next one),
    so its kept tokens wait in `pending` and go first into the next call's prompt, at
    the positions where they were denoised. `pending` holds the answer without its EOS;
    a chat-message prompt then closes the model turn as the chat template does
    (`<turn|>\\n`), so the history reads as the template renders it.

    Chat: the cache keeps the conversation's messages (each answer as its text, thinking
    excluded). A new turn renders the whole conversation with the chat template and
    encodes only the ids past those the cache holds, once it checked that the cache
    holds exactly the start of that rendering. Where it does not (a template that drops
    or rewrites earlier answers, thinking, a re-tokenized answer), the conversation is
    encoded afresh and `reencoded` is set: the model always sees what a fresh encoding
    of the whole conversation gives.

    If a call stops early (the consumer stops iterating), the cache keeps what the call
    fed and committed so far.

    Attributes:
        layers: the per-layer K/V caches (`model.make_cache()`).
        tokens: the ids whose K/V `layers` hold, in order.
        pending: ids the next call encodes before its prompt.
        enable_thinking: the thinking mode of the chat template, once a chat-message
            prompt started the conversation; None before.
        messages: the conversation's chat messages so far, answers included.
        reencoded: the last call encoded the whole conversation afresh, because the
            chat template does not render it as the cache holds it.
    """

    def __init__(self, model):
        self._make_cache = model.make_cache
        self.layers = model.make_cache()
        self.tokens: List[int] = []
        self.pending: List[int] = []
        self.enable_thinking: Optional[bool] = None
        self.messages: List[dict] = []
        self.reencoded = False
        self._broken = False

    def _reset(self):
        """Empty the cache (the conversation is encoded afresh)."""
        self.layers = self._make_cache()
        self.tokens, self.pending = [], []

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


def resolve_config(
    model, config: Optional[DiffusionConfig] = None, max_tokens: Optional[int] = None, **settings
) -> DiffusionConfig:
    """The sampler settings of a call (precedence in `diffusion/config.py`).

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
    fast = config.fast
    if fast is None:
        return out  # exact mode refuses fast-mode settings (DiffusionConfig.replace)
    if fast.commit_rule != "confidence":
        out["commit_threshold"] = "only the confidence commit rule uses it"
    else:
        out["entropy_bound"] = "the confidence commit rule does not use it"
    return out


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def _continue_chat(tokenizer, messages, cache: PromptCache) -> Tuple[List[int], bool]:
    """Ids of the next turn of a cached chat, and whether they are the whole conversation
    (the cache does not hold the start of the template's rendering; see `PromptCache`)."""
    if any(m.get("role") in ("system", "developer") for m in messages):
        raise ValueError(
            "A system message can only start a conversation, and this prompt cache "
            "already holds one; start a new PromptCache to change the system prompt."
        )
    if not cache.messages:
        raise ValueError(
            "This PromptCache holds a text or token prompt, not a chat; continue it with "
            "text or token ids, or start a new PromptCache for chat messages."
        )
    full = tokenizer.apply_chat_template(
        cache.messages + list(messages),
        add_generation_prompt=True,
        enable_thinking=cache.enable_thinking,
    )
    held = cache.tokens + cache.pending
    if held and full[: len(held)] == held and len(full) > len(held):
        return full[len(held) :], False
    return full, True


def _check_prompt_text(prompt: Prompt):
    """ValueError naming where a prompt's text holds a lone surrogate or undecodable byte."""
    if isinstance(prompt, str):
        check_text(prompt, "The prompt")
    elif _is_messages(prompt):
        for i, m in enumerate(prompt):
            content = m.get("content")
            parts = [content] if isinstance(content, str) else content or []
            for part in parts:
                text = part if isinstance(part, str) else part.get("text")
                if isinstance(text, str):
                    check_text(text, f"Message {i}'s text")


def _prompt_ids(
    tokenizer, prompt: Prompt, cache: PromptCache, enable_thinking
) -> Tuple[List[int], bool]:
    """Ids of `prompt` to encode after what `cache` holds, and whether they replace it
    (the whole conversation, encoded afresh)."""
    started = len(cache) > 0
    _check_prompt_text(prompt)
    if _is_messages(prompt):
        if not started:
            cache.enable_thinking = bool(enable_thinking)
            ids = tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, enable_thinking=cache.enable_thinking
            )
            return ids, False
        if enable_thinking is not None and enable_thinking != cache.enable_thinking:
            raise ValueError(
                f"enable_thinking={enable_thinking} has no effect after the first turn "
                "(the switch is in the system turn); start a new PromptCache to change it."
            )
        return _continue_chat(tokenizer, prompt, cache)
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
        return (ids if started or ids[:1] == [bos] else [bos] + ids), False
    ids = prompt.reshape(-1).tolist() if isinstance(prompt, mx.array) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("The prompt is empty; give at least one token.")
    return ids, False


def _check_context(model, offset: int, new: int, config: DiffusionConfig, layout=None):
    limit = model.args.max_position_embeddings
    C = model.args.canvas_length
    canvases = math.ceil(config.max_new_tokens / C)
    held = offset + new
    what, fix = f"max_tokens={config.max_new_tokens}", "lower max_tokens"
    if layout is not None:
        what = f"a layout of {config.max_new_tokens} tokens"
        fix = "make the holes or the text after them shorter"
    if held > limit:
        raise ValueError(
            f"The prompt is {held} tokens long (with {offset} already in the cache), "
            f"more than the model's context of {limit} tokens (max_position_embeddings)."
        )
    if held + canvases * C > limit:
        raise ValueError(
            f"The prompt ({held} tokens) plus {canvases} canvases of {C} tokens for "
            f"{what} need {held + canvases * C} positions, more than the model's context of "
            f"{limit} (max_position_embeddings); {fix}."
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


def check_seed(seed) -> int:
    """`seed` as an int, or ValueError: every random draw comes from `mx.random.key(seed)`."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must be an integer from 0 to {2**32 - 1} (2**32 - 1); got {seed!r}."
        )
    return int(seed)


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
    should_stop: Optional[Callable[[], bool]] = None,
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
            checkpoint's chat template; content parts may be images, see `vision/prompt.py`),
            text (encoded as is, BOS added) or token ids.
            With a `prompt_cache` that holds a conversation, give only the new messages.
        max_tokens: output tokens at most; defaults to the checkpoint's `max_new_tokens`.
        config: sampler settings; defaults to the checkpoint's (`model.generation_config`).
        seed: seed of all random draws, 0 to 2**32 - 1; drawn at random (and reported)
            if None.
        drafts: also yield the argmax canvas after every denoising step.
        prompt_cache: a `PromptCache` to continue and update; a fresh one if None.
        enable_thinking: chat messages only: ask for a thinking block (first turn).
        layout: fixed, seeded and token-limited output positions (see `CanvasLayout`);
            `max_tokens` then defaults to its length. EOS still ends the output: fixed
            positions after an EOS the model wrote are not returned; pass
            `eos_token_id=()` to run every canvas, or limit the free positions to
            tokens other than EOS.
        should_stop: polled on the host once per denoising step (no device sync); when it
            returns True the generation raises `Cancelled` at that step. A server passes
            its client's hang-up and deadline here, so no request outlives them by more
            than one step.
        settings: overrides of `DiffusionConfig` fields, e.g. `max_denoising_steps=16`.

    Yields:
        `GenerationResponse`s.

    Raises:
        ValueError: empty prompt, a token id outside the vocabulary, invalid seed or
            setting, prompt and canvases longer than the model's context, a layout
            longer than `max_tokens` or not fitting the model, or an unusable image.
        Cancelled: `should_stop()` said so.
    """
    if layout is not None and max_tokens is None:
        max_tokens = len(layout)
    config = resolve_config(model, config, max_tokens, **settings)
    seed = secrets.randbits(31) if seed is None else check_seed(seed)
    cache = prompt_cache if prompt_cache is not None else PromptCache(model)
    new, images = _new_ids(model, tokenizer, prompt, cache, config, layout, enable_thinking)
    answer = []
    try:
        with wired_limit(model, [generation_stream()]):
            for r in _stream(
                model, tokenizer, cache, new, images, config, seed, layout, drafts, should_stop
            ):
                answer.append(r.text)
                yield r
    finally:
        if _is_messages(prompt):  # the next turn renders it (see `PromptCache`)
            cache.messages.append({"role": "assistant", "content": "".join(answer)})


def _new_ids(model, tokenizer, prompt, cache, config, layout, enable_thinking):
    """The ids a call encodes and their images (None without), once every check passed
    (before the first encode, so a refused call leaves the cache as it was)."""
    if layout is not None:
        layout.check(model.args.vocab_size, config.max_new_tokens)
    cache._check()
    ids, afresh = _prompt_ids(tokenizer, prompt, cache, enable_thinking)
    pending, offset = ([], 0) if afresh else (cache.pending, cache.offset)
    check_token_ids(pending + ids, model.args.vocab_size, "Prompt token id")
    new, images = prompt_images(model, prompt, pending, ids, offset, config)
    _check_context(model, offset, len(new), config, layout)
    if afresh:
        cache._reset()
    cache.reencoded = afresh
    if _is_messages(prompt):
        cache.messages = cache.messages + list(prompt)
    return new, images


class _Stats:
    """The running statistics of one call, and the responses that report them."""

    def __init__(self, tokenizer, prompt_tokens: int, seed: int):
        self.tokenizer, self.prompt_tokens, self.seed = tokenizer, prompt_tokens, seed
        self.prompt_tps, self.start = 0.0, time.perf_counter()
        self.n_out, self.forwards, self.steps = 0, 0, []

    def prompt_done(self, tic: float):
        self.start = time.perf_counter()
        self.prompt_tps = self.prompt_tokens / (self.start - tic)

    def add(self, block: Block, kept: int):
        self.steps.append(block.steps)
        self.forwards = block.decoder_forwards[0].item()
        self.n_out += kept

    def draft(self, ev: DenoiseStep) -> GenerationResponse:
        tokens, accepted = tuple(ev.argmax[0].tolist()), tuple(ev.accepted[0].tolist())
        draft = (self.tokenizer.decode(tokens), tokens, accepted)
        return self.response("draft", ev.block, ev.step, draft=draft)

    def response(
        self, kind, block, step, text="", thinking="", ids=(), finish=None, draft=(None,) * 3
    ) -> GenerationResponse:
        elapsed = time.perf_counter() - self.start
        return GenerationResponse(
            kind=kind,
            text=text,
            thinking=thinking,
            token_ids=tuple(ids),
            block_index=block,
            step=step,
            draft_text=draft[0],
            draft_tokens=draft[1],
            draft_accepted=draft[2],
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=self.n_out,
            generation_tps=self.n_out / elapsed if elapsed > 0 else 0.0,
            canvases=len(self.steps),
            denoising_steps=tuple(self.steps),
            tokens_per_forward=self.n_out / self.forwards if self.forwards else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            seed=self.seed,
            finish_reason=finish,
            decoder_forwards=self.forwards,
        )


def _kept(block: Block, budget: int, last_canvas: bool) -> Tuple[int, Optional[str]]:
    """How many of a canvas's tokens the output keeps (up to EOS and `budget`), and the
    finish reason if this canvas ends the output."""
    stop = block.eos_index[0]
    if 0 <= stop <= budget:
        return stop, "stop"
    return budget, "length" if stop >= 0 or last_canvas else None


def _stream(
    model, tokenizer, cache: PromptCache, new, images, config, seed, layout, drafts, should_stop
):
    """`stream_generate` once its arguments are checked."""
    n_canvases = math.ceil(config.max_new_tokens / model.args.canvas_length)
    conversation = cache.tokens + new  # plus the committed tokens, as they come
    detok, split = tokenizer.detokenizer(), _ThinkingSplit()
    hidden = {tokenizer.pad_token_id, tokenizer.bos_token_id}
    stats = _Stats(tokenizer, len(new), seed)
    mx.reset_peak_memory()
    events = None
    try:
        tic = time.perf_counter()
        if images is None:
            prefill(model, mx.array([new], dtype=mx.int32), cache.layers)
        else:  # soft tokens in, each image's run whole in one chunk
            images.prefill(model, new, cache.layers)
        stats.prompt_done(tic)
        events = generate_step(
            mx.zeros((1, 0), dtype=mx.int32),  # the prompt is in the cache already
            model,
            config=config,
            cache=cache.layers,
            key=mx.random.key(seed),
            layout=layout,
            # The loop yields a step (lazily: nothing is evaluated for it) only when asked;
            # a stop test needs one per step to get control back.
            drafts=drafts or should_stop is not None,
        )
        for ev in events:
            if isinstance(ev, DenoiseStep):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped at step {ev.step} of canvas {ev.block}")
                if drafts:
                    yield stats.draft(ev)
                continue
            budget = config.max_new_tokens - stats.n_out
            n, finish = _kept(ev, budget, ev.block + 1 >= n_canvases)
            keep = ev.tokens[0, :n].tolist()
            stats.add(ev, len(keep))
            conversation += keep
            # Text never shows pad or BOS pieces (as mlx-lm's detokenizer skips special
            # tokens); EOS already ended `keep`. The ids keep them.
            shown = [t for t in keep if t not in hidden]
            text = detok.add_tokens(shown) + (detok.finalize() if finish else "")
            thinking, answer = split.add(text, final=finish is not None)
            yield stats.response("commit", ev.block, ev.steps, answer, thinking, keep, finish)
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


# --------------------------------------------------------------------------- command line
# `mlx_diffgemma generate` / `python -m mlx_diffgemma.generate`: parse, call the API above,
# print. The answer goes to stdout; statistics, notes and errors go to stderr.


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None:
        raise click.UsageError(
            "Missing --prompt: give the message, - to read it from stdin, or use --chat."
        )
    if prompt == "-":
        prompt = read_stdin()
    if not prompt.strip():
        raise click.BadParameter(
            "the prompt is empty; give some text (or - to read it from stdin).",
            param_hint="'--prompt'",
        )
    return prompt


def _answer(model, tokenizer, prompt, out: Output, verbose: bool, **kwargs):
    """Stream one answer to `out`; statistics to stderr."""
    last = None
    try:
        for last in stream_generate(model, tokenizer, prompt, drafts=out.live, **kwargs):
            out.show(last)
    except ValueError as e:  # prompt or settings rejected before any work
        raise click.ClickException(one_line(e)) from None
    finally:
        out.end()
    if last.finish_reason == "stop" and last.generation_tokens == 0:
        click.echo(
            "[WARNING] The answer is empty: the model put EOS first. Another --seed may help.",
            err=True,
        )
    if verbose:
        cache = kwargs.get("prompt_cache")
        if cache is not None and cache.reencoded:
            click.echo(
                "[The chat template does not render the conversation as the cache holds it "
                f"(it rewrites earlier answers); encoded all {last.prompt_tokens} tokens afresh.]",
                err=True,
            )
        click.echo(format_stats(last), err=True)


def _after_interrupt(
    cache: PromptCache, before: Tuple[List[int], List[dict]], model
) -> PromptCache:
    """The cache to go on with after Ctrl-C stopped an answer.

    Stopped while denoising, the cache holds the conversation with the answer so far.
    Stopped inside an encode, its layers disagree and it cannot go on: a new cache then
    holds the conversation before this turn, to encode with the next message.
    """
    if not cache._broken:
        return cache
    fresh = PromptCache(model)
    ids, messages = before
    if ids:
        fresh.pending, fresh.messages = list(ids), messages
        fresh.enable_thinking = cache.enable_thinking
    return fresh


def _chat(answer, model, system: Optional[str], think: bool, images=()):
    cache = PromptCache(model)
    click.echo(
        "Chat: type a message and press Enter; Ctrl-C stops an answer, Ctrl-D ends the chat.",
        err=True,
    )
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo(err=True)
            return
        except UnicodeDecodeError as e:  # a line that is not UTF-8: say so, go on
            click.echo(f"Error: the line is not UTF-8 text ({e.reason}); type it again.", err=True)
            continue
        if not line.strip():
            continue
        first = len(cache) == 0
        messages = [user_message(line, images if first else ())]
        if first and system:
            messages.insert(0, {"role": "system", "content": system})
        before = (cache.tokens + cache.pending, list(cache.messages))
        try:
            answer(messages, prompt_cache=cache, enable_thinking=think if first else None)
        except click.ClickException as e:  # refused before any work (e.g. too long)
            e.show()
        except KeyboardInterrupt:
            cache = _after_interrupt(cache, before, model)
            click.echo("[Stopped: the answer so far stays in the conversation.]", err=True)


def _warn_ineffective(config: DiffusionConfig, given: Dict[str, Any]):
    no_effect = ineffective_settings(config)
    for flag, value in given.items():
        if value is not None and SAMPLER_FLAGS[flag] in no_effect:
            click.echo(
                f"[WARNING] {flag} has no effect: {no_effect[SAMPLER_FLAGS[flag]]}.", err=True
            )


def _load_for_generation(
    model_path: str, adapter_path: Optional[str], max_tokens: Optional[int], given: Dict[str, Any]
):
    """(model, tokenizer, config), or a one-line error."""
    # Imported here: mlx-lm (and the transformers it imports) take seconds to import, and
    # `--help` or a usage error should not wait for them; a Ctrl-C meanwhile is handled.
    from .loader import load

    try:
        model, tokenizer = load(model_path, adapter_path=adapter_path)
    except (OSError, ValueError) as e:
        raise click.ClickException(one_line(e)) from None
    settings = {SAMPLER_FLAGS[f]: v for f, v in given.items()}
    try:
        config = resolve_config(model, max_tokens=max_tokens, **settings)
    except ValueError as e:
        raise click.UsageError(one_line(e)) from None
    _warn_ineffective(config, given)
    return model, tokenizer, config


@click.command(name="generate", context_settings=CONTEXT_SETTINGS)
@model_option
@adapter_option
@click.option("--prompt", "-p", default=None, help="The user message; - reads it from stdin.")
@click.option("--system", "--system-prompt", default=None, help="System prompt.")
@click.option(
    "--max-tokens",
    "-m",
    type=click.IntRange(min=1),
    default=None,
    help="Output tokens at most; whole canvases are computed and the output is trimmed "
    "[default: the checkpoint's max_new_tokens].",
)
@sampler_options
@seed_option
@click.option("--think/--no-think", default=False, help="Thinking mode.  [default: no-think]")
@click.option(
    "--show-thinking/--hide-thinking",
    default=True,
    help="Show the thinking (dimmed; on stderr when stdout is not a terminal) or hide it.",
)
@click.option(
    "--chat", is_flag=True, help="Multi-turn chat on stdin; each turn encodes only its new tokens."
)
@click.option(
    "--live", is_flag=True, help="Redraw the canvas at every denoising step (terminals only)."
)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="An image file for the (first) user message; repeat for several.",
)
@click.option("--verbose", "-v", is_flag=True, help="Print statistics to stderr.")
def generate_command(
    model_path,
    adapter_path,
    prompt,
    system,
    max_tokens,
    seed,
    think,
    show_thinking,
    chat,
    live,
    images,
    verbose,
    **kw,
):
    """Generate text with DiffusionGemma."""
    if chat and prompt is not None:
        raise click.UsageError("--prompt cannot be used with --chat; type the messages instead.")
    if not chat:
        prompt = _read_prompt(prompt)
    out = None
    try:
        model, tokenizer, config = _load_for_generation(
            model_path, adapter_path, max_tokens, sampler_flags(kw)
        )
        if live and not sys.stdout.isatty():
            click.echo("[WARNING] --live has no effect: stdout is not a terminal.", err=True)
        out = Output(tokenizer, show_thinking, live and sys.stdout.isatty())

        def answer(messages, **kwargs):
            _answer(model, tokenizer, messages, out, verbose, config=config, seed=seed, **kwargs)

        if chat:
            _chat(answer, model, system, think, images)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            answer(messages + [user_message(prompt, images)], enable_thinking=think)
    except KeyboardInterrupt:
        if out is not None and out.live:
            click.echo(RESET + SHOW_CURSOR, nl=False)
        interrupted()


def main(args: Optional[List[str]] = None) -> None:
    """Command-line entry point (`python -m mlx_diffgemma.generate`)."""
    generate_command.main(args=args, prog_name="python -m mlx_diffgemma.generate")


if __name__ == "__main__":
    main()
