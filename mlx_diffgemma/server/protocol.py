"""Request bodies of the three endpoints, checked field by field into one `GenRequest`.

Every field a body may carry is either used or refused: an unknown field, or a known one
this model cannot honour (`top_p`, `logprobs`, `n > 1`, ...), is a `RequestError` that
names it. Sampling: the model samples with a temperature that falls linearly from
`t_max` at a canvas' first denoising step towards `t_min`; an OpenAI `temperature` T
sets `t_max = T` and `t_min = T * (t_min / t_max of the checkpoint)`, keeping the
schedule's shape. T = 0 (greedy) maps to T = 1e-3, where sampling is argmax in practice.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..diffusion.config import FAST_SETTINGS, MODES, DiffusionConfig
from ..tokenizer import check_text
from . import images as images_of_request
from . import limits
from .errors import RequestError

GREEDY_TEMPERATURE = 1e-3
THINKING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


@dataclass
class Message:
    """A chat message in one shape for both APIs.

    `tool_calls` holds `(id, name, arguments dict)`; a tool result has role "tool".
    """

    role: str
    content: str = ""
    tool_calls: List[tuple] = field(default_factory=list)
    tool_call_id: Optional[str] = None
    # Text and image parts in order (vision/prompt.py's shape), when the message has images.
    parts: Optional[List[Dict[str, Any]]] = None


@dataclass
class GenRequest:
    """What the worker runs, whichever endpoint it came from."""

    api: str  # "chat", "completions" or "messages"
    messages: Optional[List[Message]] = None
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    max_tokens: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    temperature: Optional[float] = None
    tools: List[Dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    # A tool the reply must call (tool_choice naming it): its input is generated in the
    # frame of its parameters' schema, so it always validates (tasks/json_schema.py).
    forced_tool: Optional[str] = None
    schema: Optional[Dict[str, Any]] = None  # response_format: the JSON Schema to enforce
    json_object: bool = False
    enable_thinking: Optional[bool] = None
    max_denoising_steps: Optional[int] = None
    entropy_bound: Optional[float] = None
    mode: Optional[str] = None  # "exact" (default) or "fast" (DiffusionConfig.mode)
    # Fast mode's settings given (DiffusionConfig's names: top_k, repair, ...).
    fast_settings: Dict[str, Any] = field(default_factory=dict)
    include_drafts: bool = False


# Fields every endpoint takes, and the diffusion extensions.
_COMMON = {"model", "max_tokens", "stream", "seed", "temperature", "metadata", "user"}
_DIFFUSION = {"max_denoising_steps", "entropy_bound", "include_drafts", "mode", *FAST_SETTINGS}
# Known fields this model cannot honour unless they hold the neutral value.
_NEUTRAL = {
    "top_p": (None, 1, 1.0),
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "parallel_tool_calls": (None, True),
    "echo": (None, False),
    "best_of": (None, 1),
    "service_tier": (None, "auto"),
    "store": (None, False),
}
_WHY = {
    "top_p": "the entropy-bound sampler has no nucleus cut-off",
    "n": "one choice per request",
    "logprobs": "log-probabilities are not reported",
    "top_logprobs": "log-probabilities are not reported",
    "parallel_tool_calls": "calls are parsed as the model writes them",
    "best_of": "one choice per request",
}


def parse_json(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object whose nesting is bounded and whose strings are all valid
    Unicode (a lone surrogate such as "\\ud800" is refused here, naming its field)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError(
            f"The request body nests deeper than {limits.MAX_JSON_DEPTH} levels."
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    _check_tree(data)
    return data


def _check_tree(data):
    """Depth and Unicode of every value, iteratively (no recursion on hostile input)."""
    todo = [(data, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > limits.MAX_JSON_DEPTH:
            raise RequestError(
                f"'{path}' nests deeper than {limits.MAX_JSON_DEPTH} levels.", _top(path)
            )
        if isinstance(value, dict):
            for k, v in value.items():
                where = f"{path}.{k}" if path else str(k)
                _check_text(k, where)
                todo.append((v, where, depth + 1))
        elif isinstance(value, list):
            todo += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, where: str):
    try:
        check_text(text, f"'{where}'")
    except ValueError as e:
        raise RequestError(str(e), _top(where)) from None


def _top(path: str) -> Optional[str]:
    """The request field a path lies in (`messages[0].content` -> `messages`)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def _neutral(name: str, value) -> bool:
    return any(
        value == v and isinstance(value, bool) == isinstance(v, bool) for v in _NEUTRAL[name]
    )


def _check_fields(data: Dict[str, Any], allowed: set):
    for name, value in data.items():
        if name in _NEUTRAL and name not in allowed:
            if not _neutral(name, value):
                why = _WHY.get(name, "this server does not support it")
                raise RequestError(f"'{name}'={value!r} is not supported ({why}).", name)
        elif name not in allowed:
            raise RequestError(f"Unknown or unsupported field '{name}'.", name)


def _typed(data, name, kinds, what, default=None):
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(f"'{name}' must be {what} (got {value!r}).", name)
    if not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {what} (got {value!r}).", name)
    return value


def _positive_int(data, name, most: Optional[int] = None):
    value = _typed(data, name, (int,), "a positive integer")
    if value is not None and value <= 0:
        raise RequestError(f"'{name}' must be a positive integer (got {value}).", name)
    if value is not None and most is not None and value > most:
        raise RequestError(f"'{name}' must be at most {most} (got {value}).", name)
    return value


def _common(data: Dict[str, Any], req: GenRequest, tokens_field: str = "max_tokens"):
    _typed(data, "model", (str,), "a string")
    req.max_tokens = _positive_int(data, tokens_field)
    req.stream = _typed(data, "stream", (bool,), "true or false", False)
    req.seed = _typed(data, "seed", (int,), "an integer")
    if req.seed is not None and not 0 <= req.seed < 2**32:
        raise RequestError(f"'seed' must be in [0, 2**32) (got {req.seed}).", "seed")
    t = _typed(data, "temperature", (int, float), "a number in [0, 2]")
    if t is not None and not 0 <= t <= 2:
        raise RequestError(f"'temperature' must be in [0, 2] (got {t}).", "temperature")
    req.temperature = t
    req.max_denoising_steps = _positive_int(data, "max_denoising_steps", limits.MAX_DENOISING_STEPS)
    eb = _typed(data, "entropy_bound", (int, float), "a number > 0")
    if eb is not None and not eb > 0:
        raise RequestError(f"'entropy_bound' must be > 0 (got {eb}).", "entropy_bound")
    req.entropy_bound = eb
    _typed(data, "user", (str,), "a string")
    req.mode = _typed(data, "mode", (str,), "'exact' or 'fast'")
    if req.mode is not None and req.mode not in MODES:
        raise RequestError(f"'mode' must be 'exact' or 'fast' (got {req.mode!r}).", "mode")
    req.fast_settings = _fast_settings(data, req.mode)
    req.include_drafts = _typed(data, "include_drafts", (bool,), "true or false", False)
    meta = data.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise RequestError("'metadata' must be an object.", "metadata")


_FAST_CAPS = {
    "top_k": limits.MAX_TOP_K,
    "self_conditioning_top_k": limits.MAX_TOP_K,
    "canvas_shrink": limits.MAX_CANVAS_SHRINK,
    "repair": limits.MAX_REPAIR,
}


def _fast_settings(data: Dict[str, Any], mode: Optional[str]) -> Dict[str, Any]:
    """The fast-mode settings of a body, checked as `DiffusionConfig` checks them."""
    given = {name: data[name] for name in FAST_SETTINGS if data.get(name) is not None}
    for name, most in _FAST_CAPS.items():
        v = given.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > most:
            raise RequestError(f"'{name}' must be at most {most} (got {v}).", name)
    try:
        DiffusionConfig().replace(mode=mode or "exact", **given)
    except ValueError as e:
        param = next((n for n in given if str(e).startswith(n)), None)
        message = str(e).replace(" (CLI: --mode fast)", "").replace("mode='fast'", '"mode": "fast"')
        raise RequestError(message, param) from None
    return given


def _stop(value, name="stop", most=limits.MAX_STOP) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"'{name}' must be a non-empty string or a list of them.", name)
    if len(value) > most:
        raise RequestError(f"'{name}' takes at most {most} strings (got {len(value)}).", name)
    if any(len(s) > limits.MAX_STOP_CHARS for s in value):
        raise RequestError(
            f"Each of '{name}' must be at most {limits.MAX_STOP_CHARS} characters.", name
        )
    return value


def _list(value, where: str, most: int, param: Optional[str] = None, empty=False) -> list:
    """`value` as a list of at most `most` items (a missing value is an empty list)."""
    if value is None:
        value = []
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be a list (got {type(value).__name__}).", param)
    if not value and not empty:
        raise RequestError(f"'{where}' must not be empty.", param)
    if len(value) > most:
        raise RequestError(
            f"'{where}' has {len(value)} items; at most {most} are accepted.", param or where
        )
    return value


def _text(content, where: str) -> str:
    """A message content: a string or a list of text parts."""
    return _content(content, where, images=False)[0]


def _content(content, where: str, images: bool = True):
    """`(text, parts)` of an OpenAI message content: a string, or a list of text parts and
    (with `images`) `image_url` parts; `parts` is None when there is no image."""
    if content is None:
        return "", None
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts.", _top(where))
    _list(content, where, limits.MAX_CONTENT_PARTS, _top(where), empty=True)
    texts, parts = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "image_url" and images:
            parts.append(images_of_request.openai_image(part, f"{where}[{i}]"))
            continue
        if kind != "text":
            what = "text and image_url parts" if images else "text parts only"
            raise RequestError(f"{where}[{i}] has type {kind!r}; use {what}.", _top(where))
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{i}].text must be a string.", _top(where))
        texts.append(part["text"])
        parts.append({"type": "text", "text": part["text"]})
    has_image = any(p["type"] == "image" for p in parts)
    return "".join(texts), parts if has_image else None


def _arguments(raw, where: str) -> Dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is not None and not isinstance(raw, str):
        raise RequestError(f"{where} must be a JSON object string.", _top(where))
    try:
        args = json.loads(raw or "{}")
    except (ValueError, RecursionError):
        raise RequestError(f"{where} is not a JSON object string.", _top(where)) from None
    if not isinstance(args, dict):
        raise RequestError(f"{where} must encode a JSON object.", _top(where))
    _check_tree(args)
    return args


def _openai_messages(raw) -> List[Message]:
    out = []
    for i, m in enumerate(_list(raw, "messages", limits.MAX_MESSAGES, "messages")):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a 'role'.", "messages")
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"{where}.role {role!r} is not supported.", "messages")
        content, parts = _content(m.get("content"), f"{where}.content", role == "user")
        msg = Message("system" if role == "developer" else role, content, parts=parts)
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise RequestError(
                f"{where}.tool_calls: only assistant messages have them.", "messages"
            )
        for j, tc in enumerate(
            _list(calls, f"{where}.tool_calls", limits.MAX_TOOL_CALLS, "messages", True)
        ):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise RequestError(f"{where}.tool_calls[{j}] needs function.name.", "messages")
            args = _arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")
            msg.tool_calls.append((_optional_str(tc, "id", where), fn["name"], args))
        if role == "tool":
            msg.tool_call_id = _optional_str(m, "tool_call_id", where)
        out.append(msg)
    return out


def _optional_str(obj: dict, name: str, where: str) -> Optional[str]:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{where}.{name} must be a string.", _top(where))
    return value


def _schema_object(value, where: str, param: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON Schema object.", param)
    return value


def _openai_tools(data) -> List[Dict[str, Any]]:
    out = []
    for i, t in enumerate(_list(data.get("tools"), "tools", limits.MAX_TOOLS, "tools", True)):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(
                f"tools[{i}] must be {{type: function, function: {{name, ...}}}}.", "tools"
            )
        where = f"tools[{i}].function"
        out.append(
            {
                "name": fn["name"],
                "description": _optional_str(fn, "description", where) or "",
                "parameters": _schema_object(fn.get("parameters"), f"{where}.parameters", "tools"),
            }
        )
    return out


def _tool_choice(value, param: str) -> str:
    if value in (None, "auto"):
        return "auto"
    if value == "none":
        return "none"
    raise RequestError(
        f"'{param}'={json.dumps(value)} is not supported: use auto, none, a named tool, or "
        "required/any with one tool declared.",
        param,
    )


def _forced_tool(req: GenRequest, name: Optional[str]):
    """Set the tool the reply must call (`name`; None: the only tool declared)."""
    names = [t["name"] for t in req.tools]
    if name is None:
        if len(names) != 1:
            raise RequestError(
                f"tool_choice required/any needs exactly one tool declared (got {len(names)}); "
                "name the tool instead.",
                "tool_choice",
            )
        name = names[0]
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not in tools.", "tool_choice")
    req.forced_tool, req.tool_choice = name, "auto"


def _response_format(data, req: GenRequest):
    rf = data.get("response_format")
    if rf is None:
        return
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError(
            "'response_format.type' must be text, json_object or json_schema.", "response_format"
        )
    extra = set(rf) - {"type", "json_schema"}
    if extra:
        raise RequestError(
            f"'response_format' has unknown keys {sorted(extra)}.", "response_format"
        )
    if rf["type"] == "json_object":
        req.json_object = True
    elif rf["type"] == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict) and set(js) - {"name", "schema", "strict", "description"}:
            raise RequestError(
                f"'response_format.json_schema' has unknown keys "
                f"{sorted(set(js) - {'name', 'schema', 'strict', 'description'})}.",
                "response_format",
            )
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise RequestError(
                "'response_format.json_schema.schema' must be a JSON Schema object.",
                "response_format.json_schema.schema",
            )
        req.schema = js["schema"]


def _thinking_openai(data) -> Optional[bool]:
    effort = data.get("reasoning_effort")
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"enable_thinking"}:
            raise RequestError(
                "'chat_template_kwargs' takes only enable_thinking.", "chat_template_kwargs"
            )
        flag = _typed(kwargs, "enable_thinking", (bool,), "true or false")
        if flag is not None:
            if effort is not None and (
                not isinstance(effort, str) or THINKING_EFFORTS.get(effort) != flag
            ):
                raise RequestError(
                    "reasoning_effort and chat_template_kwargs.enable_thinking disagree; give one.",
                    "reasoning_effort",
                )
            return flag
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in THINKING_EFFORTS:
        raise RequestError(
            f"'reasoning_effort' must be one of {sorted(THINKING_EFFORTS)} (got {effort!r}).",
            "reasoning_effort",
        )
    return THINKING_EFFORTS[effort]


CHAT_FIELDS = (
    _COMMON
    | _DIFFUSION
    | {
        "messages",
        "max_completion_tokens",
        "stream_options",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
        "reasoning_effort",
        "chat_template_kwargs",
    }
)


def _count_images(req: GenRequest) -> GenRequest:
    n = sum(p["type"] == "image" for m in req.messages for p in m.parts or ())
    if n > limits.MAX_IMAGES:
        raise RequestError(
            f"The request has {n} images; at most {limits.MAX_IMAGES} are accepted.", "messages"
        )
    return req


def parse_chat(data: Dict[str, Any]) -> GenRequest:
    """POST /v1/chat/completions."""
    _check_fields(data, CHAT_FIELDS)
    req = GenRequest("chat")
    both = data.get("max_tokens") is not None and data.get("max_completion_tokens") is not None
    if both and data["max_tokens"] != data["max_completion_tokens"]:
        raise RequestError("Give max_tokens or max_completion_tokens, not both.", "max_tokens")
    _common(data, req)
    req.max_tokens = _positive_int(data, "max_completion_tokens") or req.max_tokens
    req.messages = _openai_messages(data.get("messages"))
    _stream_options(data, req)
    req.stop = _stop(data.get("stop"))
    req.tools = _openai_tools(data)
    choice = data.get("tool_choice")
    fn = choice.get("function") if isinstance(choice, dict) else None
    if choice == "required":
        _forced_tool(req, None)
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict):
        _forced_tool(req, fn.get("name") if isinstance(fn.get("name"), str) else "")
    else:
        req.tool_choice = _tool_choice(choice, "tool_choice")
    _response_format(data, req)
    req.enable_thinking = _thinking_openai(data)
    return _count_images(req)


def _stream_options(data, req: GenRequest):
    so = data.get("stream_options")
    if so is None:
        return
    if not isinstance(so, dict) or set(so) - {"include_usage"}:
        raise RequestError("'stream_options' takes only include_usage.", "stream_options")
    req.include_usage = _typed(so, "include_usage", (bool,), "true or false", False)


COMPLETION_FIELDS = _COMMON | _DIFFUSION | {"prompt", "suffix", "stop", "stream_options"}


def parse_completion(data: Dict[str, Any]) -> GenRequest:
    """POST /v1/completions (`suffix`: fill in the middle)."""
    _check_fields(data, COMPLETION_FIELDS)
    req = GenRequest("completions")
    _common(data, req)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string.", "prompt")
    req.prompt = prompt
    req.suffix = _typed(data, "suffix", (str,), "a string") or None
    req.stop = _stop(data.get("stop"))
    _stream_options(data, req)
    return req


MESSAGES_FIELDS = (
    _COMMON
    | _DIFFUSION
    | {
        "messages",
        "system",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
    }
)


def parse_messages(data: Dict[str, Any]) -> GenRequest:
    """POST /v1/messages (Anthropic)."""
    _check_fields(data, MESSAGES_FIELDS)
    req = GenRequest("messages")
    _common(data, req)
    if req.max_tokens is None:
        raise RequestError("'max_tokens' is required.", "max_tokens")
    req.stop = _stop(data.get("stop_sequences"), "stop_sequences", limits.MAX_STOP_SEQUENCES)
    req.include_usage = True
    messages = []
    if data.get("system") is not None:
        messages.append(Message("system", _text(data["system"], "system")))
    messages += _anthropic_messages(data.get("messages"))
    req.messages = messages
    req.tools = _anthropic_tools(data.get("tools"))
    choice = data.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and set(choice) - {"type", "name", "disable_parallel_tool_use"}:
        raise RequestError("'tool_choice' takes type and name.", "tool_choice")
    if kind == "tool":
        _forced_tool(req, choice.get("name") if isinstance(choice.get("name"), str) else "")
    elif kind == "any":
        _forced_tool(req, None)
    else:
        req.tool_choice = _tool_choice(kind if kind in ("auto", "none") else choice, "tool_choice")
    thinking = data.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled"):
            raise RequestError("'thinking.type' must be enabled or disabled.", "thinking")
        req.enable_thinking = kind == "enabled"
    return _count_images(req)


def _anthropic_tools(tools) -> List[Dict[str, Any]]:
    out = []
    for i, t in enumerate(_list(tools, "tools", limits.MAX_TOOLS, "tools", True)):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] needs a name and an input_schema.", "tools")
        where = f"tools[{i}]"
        out.append(
            {
                "name": t["name"],
                "description": _optional_str(t, "description", where) or "",
                "parameters": _schema_object(
                    t.get("input_schema"), f"{where}.input_schema", "tools"
                ),
            }
        )
    return out


def _anthropic_messages(raw) -> List[Message]:
    out: List[Message] = []
    for i, m in enumerate(_list(raw, "messages", limits.MAX_MESSAGES, "messages")):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where} must have role user or assistant.", "messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append(Message(m["role"], content))
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of blocks.", "messages")
        _list(content, f"{where}.content", limits.MAX_CONTENT_PARTS, "messages")
        out += _anthropic_blocks(m["role"], content, where)
    return out


def _anthropic_blocks(role: str, blocks: list, where: str) -> List[Message]:
    out: List[Message] = []
    msg = Message(role)
    parts: List[Dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            text = _text([b], f"{where}.content")
            msg.content += text
            parts.append({"type": "text", "text": text})
        elif kind == "image" and role == "user":
            parts.append(images_of_request.anthropic_image(b, f"{where}.content[{j}]"))
        elif kind == "thinking" and role == "assistant":
            continue  # earlier thoughts are not re-rendered (the chat template drops them)
        elif kind == "tool_use" and role == "assistant":
            at = f"{where}.content[{j}]"
            args = b.get("input")
            if not isinstance(b.get("name"), str) or not isinstance(args, (dict, type(None))):
                raise RequestError(f"{at} needs a string name and an object input.", "messages")
            msg.tool_calls.append((_optional_str(b, "id", at), b["name"], args or {}))
        elif kind == "tool_result" and role == "user":
            at = f"{where}.content[{j}]"
            result = b.get("content")
            text = result if isinstance(result, str) else _text(result, f"{at}.content")
            out.append(Message("tool", text, tool_call_id=_optional_str(b, "tool_use_id", at)))
        else:
            raise RequestError(f"{where}.content[{j}] has unsupported type {kind!r}.", "messages")
    if any(p["type"] == "image" for p in parts):
        msg.parts = parts
    if msg.content or msg.tool_calls or msg.parts or not out:
        out.append(msg)
    return out
