"""One request on the model: a generator of `Event`s, API-neutral.

Events: "reasoning" and "content" text deltas (each committed canvas, as soon as it is
committed), "draft" (one denoising step, opt-in), and a last "done" with the finish
reason, tool calls and token counts. Closing the generator stops the model's work.
"""

import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List

from ..diffusion.config import FAST_SETTINGS
from ..generate import PromptCache, resolve_config, stream_generate
from ..tasks.infill import Hole, InfillTemplate, stream_infill
from ..tasks.json_schema import JsonFrame, SchemaError, json_frame
from ..tasks.structured import token_class
from .prompt import has_images, has_tools, plain_messages, tool_prompt_ids
from .protocol import GREEDY_TEMPERATURE, GenRequest, RequestError
from .textstream import TextStream, clean
from .tools import ToolCall

SETTING_NAMES = {"max_denoising_steps", "entropy_bound", "seed", "temperature", *FAST_SETTINGS}
JSON_OBJECT_TOKENS = 64  # the canvas budget of response_format json_object without max_tokens
JSON_ATTEMPTS = 3  # seeds tried before a json_object reply that does not parse is an error

log = logging.getLogger("mlx_diffgemma.server")


@dataclass
class Event:
    kind: str  # "reasoning", "content", "draft" or "done"
    text: str = ""
    data: Dict[str, Any] = field(default_factory=dict)


class GenerationError(RuntimeError):
    """The model's output could not be made valid (HTTP 500)."""


class CacheStore:
    """A few `PromptCache`s, most recent last, each found by the ids its K/V hold.

    A request reuses a cache whose encoded ids (`PromptCache.tokens`) begin its own
    prompt's ids, and encodes only the rest: the chat template renders the whole history,
    so a follow-up turn reuses the earlier prompt, and the earlier answer as far as the
    cache encoded it (the last canvas of an answer is never encoded: see `PromptCache`).
    The ids that reach the model are the same with or without the cache, so a seed
    gives the same reply either way. A cache's `pending` ids are dropped: the new prompt
    carries the history as the template renders it.
    """

    def __init__(self, model, size: int):
        self.model, self.size = model, size
        self.entries: List[PromptCache] = []

    def take(self, ids: List[int]):
        """`(cache, ids still to encode)`: a stored cache that prefixes `ids`, or a fresh one."""
        for cache in reversed(self.entries):
            held = cache.tokens
            if 0 < len(held) < len(ids) and ids[: len(held)] == held:
                self.entries.remove(cache)
                cache.pending = []
                return cache, ids[len(held) :]
        return PromptCache(self.model), ids

    def put(self, cache: PromptCache):
        if self.size > 0 and cache.tokens:
            self.entries.append(cache)
            del self.entries[: -self.size]


def sampler_settings(model, req: GenRequest) -> Dict[str, Any]:
    """DiffusionConfig overrides of a request (temperature mapping in protocol.py)."""
    out = {
        "max_denoising_steps": req.max_denoising_steps,
        "entropy_bound": req.entropy_bound,
        "mode": req.mode,
        **req.fast_settings,
    }
    if req.temperature is not None:
        base = resolve_config(model)
        t = max(req.temperature, GREEDY_TEMPERATURE)
        out.update(t_max=t, t_min=t * base.t_min / base.t_max)
    return out


def run(model, tokenizer, req: GenRequest, caches: CacheStore, should_stop=None) -> Iterator[Event]:
    """The events of one request (see the module docstring); `should_stop()` is polled once
    per denoising step, and the generation raises `Cancelled` when it says so.

    Raises:
        RequestError: before the first event, for requests the model cannot run.
        GenerationError: a structured reply failed validation on every attempt.
    """
    limit = model.args.max_position_embeddings
    if req.max_tokens is not None and req.max_tokens > limit:
        raise RequestError(
            f"'max_tokens' is {req.max_tokens}, more than the model's context of {limit} "
            "tokens; lower it.",
            "max_tokens",
        )
    kwargs = dict(sampler_settings(model, req), seed=req.seed, should_stop=should_stop)
    if req.seed is None:
        kwargs["seed"] = secrets.randbits(31)
    if has_images(req):
        return _generate_with_images(model, tokenizer, req, kwargs)
    if req.forced_tool is not None:
        return _call_tool(model, tokenizer, req, kwargs)
    if req.schema is not None or req.json_object:
        return _structured(model, tokenizer, req, kwargs)
    if req.suffix is not None:
        return _fill_in_middle(model, tokenizer, req, kwargs)
    return _generate(model, tokenizer, req, caches, kwargs)


def _usage(last, cached: int) -> Dict[str, int]:
    prompt = cached + (last.prompt_tokens if last else 0)
    done = last.generation_tokens if last else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": done,
        "total_tokens": prompt + done,
        "cached_tokens": cached,
    }


def _done(reason, last, cached, calls, stop_hit) -> Event:
    data = {
        "finish_reason": reason,
        "tool_calls": calls,
        "usage": _usage(last, cached),
        "seed": last.seed if last else None,
        "stop_sequence": stop_hit,
    }
    return Event("done", data=data)


def _draft(r) -> Event:
    accepted = [i for i, a in enumerate(r.draft_accepted) if a]
    return Event(
        "draft",
        r.draft_text,
        {"block": r.block_index, "step": r.step, "accepted": accepted},
    )


def prompt_ids(tokenizer, req: GenRequest) -> List[int]:
    """The whole prompt of a request as token ids (chat: through the chat template)."""
    if req.api == "completions":
        ids = tokenizer.encode(req.prompt)
        bos = tokenizer.bos_token_id
        return ids if ids[:1] == [bos] else [bos] + ids
    thinking = bool(req.enable_thinking)
    if has_tools(req):
        return tool_prompt_ids(tokenizer, req, thinking)
    try:
        return tokenizer.apply_chat_template(
            plain_messages(req.messages), add_generation_prompt=True, enable_thinking=thinking
        )
    except ValueError as e:
        raise RequestError(str(e), "messages") from None


def _generate(model, tokenizer, req, caches, kwargs) -> Iterator[Event]:
    cache, ids = caches.take(prompt_ids(tokenizer, req))
    cached = cache.offset
    events = stream_generate(
        model,
        tokenizer,
        ids,
        max_tokens=req.max_tokens,
        prompt_cache=cache,
        drafts=req.include_drafts,
        **kwargs,
    )
    stream = TextStream(req.stop, tools=has_tools(req))
    param = "prompt" if req.api == "completions" else "messages"
    return drive(events, stream, lambda: caches.put(cache), cached, param)


def _generate_with_images(model, tokenizer, req, kwargs) -> Iterator[Event]:
    """A chat with image parts: the messages go to `stream_generate` as they are, which
    expands each image's placeholder into its soft tokens (no prompt cache is kept)."""
    if has_tools(req) or req.schema is not None or req.json_object:
        raise RequestError(
            "Images cannot be combined with tools or response_format; send them apart.",
            "messages",
        )
    events = stream_generate(
        model,
        tokenizer,
        plain_messages(req.messages),
        max_tokens=req.max_tokens,
        enable_thinking=bool(req.enable_thinking),
        drafts=req.include_drafts,
        **kwargs,
    )
    return drive(events, TextStream(req.stop, tools=False), lambda: None, 0)


def drive(events, stream, keep_cache, cached, param="messages") -> Iterator[Event]:
    last, finished, calls = None, False, []
    try:
        for r in _checked(events, param):
            last = r
            if r.kind == "draft":
                yield _draft(r)
                continue
            if r.thinking:
                yield Event("reasoning", clean(r.thinking))
            text = stream.add(r.text)
            if text:
                yield Event("content", text)
            if stream.stopped:
                break
        content, calls = stream.finish()
        if content:
            yield Event("content", content)
        finished = True
    finally:
        events.close()
        if finished:  # not after a hang-up: the client will not continue this conversation
            keep_cache()
    reason = "stop" if stream.stopped else (last.finish_reason if last else "stop")
    if calls:
        reason = "tool_calls"
    yield _done(reason, last, cached, calls, stream.hit)


def _checked(events, param: str = "messages"):
    """`events`, with the errors of its first step (validation) as RequestErrors naming
    `param`, or the setting the message starts with."""
    try:
        first = next(events)
    except StopIteration:
        return
    except ValueError as e:
        name = str(e).split(" ", 1)[0].strip("'")
        raise RequestError(str(e), name if name in SETTING_NAMES else param) from None
    yield first
    yield from events


def _fill_in_middle(model, tokenizer, req, kwargs) -> Iterator[Event]:
    budget = req.max_tokens or resolve_config(model).max_new_tokens
    try:
        template = InfillTemplate(tokenizer, req.prompt, [Hole(budget), req.suffix])
    except ValueError as e:
        raise RequestError(str(e), "suffix") from None
    kwargs.pop("max_tokens", None)
    events = stream_infill(model, tokenizer, template, drafts=req.include_drafts, **kwargs)
    return _drive_fill(events, template, budget, TextStream(req.stop, tools=False))


def _drive_fill(events, template, budget, stream) -> Iterator[Event]:
    ids, sent, last, end = [], "", None, None
    try:
        for r in _checked(events):
            last = r
            if r.kind == "draft":
                yield _draft(r)
                continue
            ids += r.token_ids
            slots = ids[:budget]
            # A pad or EOS id ends the fill (see tasks/infill.py); so does the hole's end.
            end = next((i for i, t in enumerate(slots) if t in template.fillers), None)
            done = end is not None or len(ids) >= budget
            text = template.tokenizer.decode(slots[:end])
            if not done:
                text = text.rstrip("\ufffd")  # a character split across canvases waits
            delta, sent = text[len(sent) :], text
            out = stream.add(delta)
            if out:
                yield Event("content", out)
            if done or stream.stopped:
                break
        out, _ = stream.finish()
        if out:
            yield Event("content", out)
    finally:
        events.close()
    reason = "stop" if stream.stopped or end is not None else "length"
    yield _done(reason, last, 0, [], stream.hit)


def json_frame_of(tokenizer, req: GenRequest, limit: int) -> JsonFrame:
    """The frame of a response_format json_schema request (SchemaError -> 400)."""
    try:
        return json_frame(tokenizer, req.schema, limit)
    except SchemaError as e:
        raise RequestError(str(e), "response_format.json_schema.schema") from None


def _structured(model, tokenizer, req, kwargs) -> Iterator[Event]:
    if has_tools(req):
        raise RequestError("tools and response_format cannot be combined.", "response_format")
    if req.enable_thinking:
        raise RequestError(
            "Thinking and response_format cannot be combined (the canvas starts with the "
            "JSON); turn thinking off.",
            "reasoning_effort",
        )
    messages = plain_messages(req.messages)
    if req.json_object:
        return drive_json_object(model, tokenizer, messages, req, kwargs)
    frame = json_frame_of(tokenizer, req, model.args.max_position_embeddings)
    if frame.template is not None and req.max_tokens is not None:
        n = frame.template.positions(model.args.canvas_length)
        if req.max_tokens < n:
            raise RequestError(
                f"The schema's frame takes {n} tokens (whole canvases), more than "
                f"max_tokens={req.max_tokens}; raise max_tokens or lower the schema's "
                "x-max-tokens, maxItems or x-max-items.",
                "max_tokens",
            )
    return _drive_json(model, tokenizer, frame, messages, req, kwargs)


def _run_template(model, tokenizer, template, messages, req, kwargs, seed, ids, head=None):
    """Generate a template's layout; yields draft events, appends the ids to `ids`;
    returns the last response."""
    events = stream_infill(
        model,
        tokenizer,
        template,
        messages=messages,
        head=head,
        seed=seed,
        drafts=req.include_drafts,
        **kwargs,
    )
    last = None
    try:
        for r in _checked(events):
            last = r
            if r.kind == "draft":
                yield _draft(r)
            else:
                ids += r.token_ids
    finally:
        events.close()
    return last


def _call_tool(model, tokenizer, req, kwargs) -> Iterator[Event]:
    """tool_choice naming a tool: the call's input is generated in the frame of the tool's
    parameters schema (tasks/json_schema.py), so it always validates."""
    if req.schema is not None or req.json_object:
        raise RequestError(
            "A forced tool call and response_format cannot be combined.", "tool_choice"
        )
    name = req.forced_tool
    tool = next(t for t in req.tools if t["name"] == name)
    schema = tool["parameters"] or {"type": "object", "properties": {}}
    if schema.get("type", "object") != "object":
        raise RequestError(f"The parameters of tool {name!r} must be an object schema.", "tools")
    try:
        frame = json_frame(tokenizer, schema, model.args.max_position_embeddings)
    except SchemaError as e:
        raise RequestError(f"tool {name!r} parameters: {e}", "tools") from None
    call = tokenizer.encode_rendered("<|tool_call>call:" + tokenizer.protect(name))
    head = tool_prompt_ids(tokenizer, req, bool(req.enable_thinking)) + call
    seed, ids, last = kwargs.pop("seed"), [], None
    if frame.template is not None:
        last = yield from _run_template(
            model, tokenizer, frame.template, None, req, kwargs, seed, ids, head=head
        )
    yield _done("tool_calls", last, 0, [ToolCall(name, frame.value(ids))], None)


def _drive_json(model, tokenizer, frame, messages, req, kwargs) -> Iterator[Event]:
    """One generation: every reading of the frame is valid (tasks/json_schema.py)."""
    seed, ids, last = kwargs.pop("seed"), [], None
    if frame.template is not None:
        last = yield from _run_template(
            model, tokenizer, frame.template, messages, req, kwargs, seed, ids
        )
    yield Event("content", json.dumps(frame.value(ids), ensure_ascii=False))
    yield _done("stop", last, 0, [], None)


def drive_json_object(model, tokenizer, messages, req, kwargs) -> Iterator[Event]:
    """response_format json_object: `{` clamped, the rest the model's own; the text must
    parse as an object, re-sampled with the next seeds up to JSON_ATTEMPTS times."""
    n = max(2, (req.max_tokens or JSON_OBJECT_TOKENS) - 1)
    free = token_class(tokenizer, "cell") | token_class(tokenizer, "string")
    template = InfillTemplate(tokenizer, "{", [Hole(n, first=free, rest=free)])
    seed, problem = kwargs.pop("seed"), ""
    for attempt in range(JSON_ATTEMPTS):
        ids = []
        last = yield from _run_template(
            model, tokenizer, template, messages, req, kwargs, seed + attempt, ids
        )
        text, _ = template.complete(ids)
        try:
            value = json.loads(text)
            if isinstance(value, dict):
                yield Event("content", json.dumps(value, ensure_ascii=False))
                yield _done("stop", last, 0, [], None)
                return
            problem = f"it wrote a JSON {type(value).__name__}"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg} at character {e.pos})"
        log.warning("json_object with seed %d: %s; trying the next seed", seed + attempt, problem)
    raise GenerationError(
        f"The model did not write a JSON object in {JSON_ATTEMPTS} attempts (last: {problem}); "
        "give it an instruction to answer in JSON, or use a json_schema response_format, "
        "whose replies are always valid."
    )
