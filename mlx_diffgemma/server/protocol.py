"""Request bodies of the three endpoints, checked field by field into one `GenRequest`.

Every field a body may carry is either used or refused: an unknown field, or a known one
this model cannot honour (`top_p`, `logprobs`, `n > 1`, ...), is a `RequestError` that
names it. Sampling: the model samples with a temperature that falls linearly from
`t_max` at a canvas' first denoising step towards `t_min`; an OpenAI `temperature` T
sets `t_max = T` and `t_min = T * (t_min / t_max of the checkpoint)`, keeping the
schedule's shape. T = 0 (greedy) maps to T = 1e-3, where sampling is argmax in practice.
"""

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..config import FAST_SETTINGS, MODES, DiffusionConfig

GREEDY_TEMPERATURE = 1e-3
THINKING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


class RequestError(ValueError):
    """A bad request: HTTP `status`, a message, and the offending field (`param`)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass
class Message:
    """A chat message in one shape for both APIs.

    `tool_calls` holds `(id, name, arguments dict)`; a tool result has role "tool".
    """

    role: str
    content: str = ""
    tool_calls: List[tuple] = field(default_factory=list)
    tool_call_id: Optional[str] = None


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
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    return data


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


def _positive_int(data, name):
    value = _typed(data, name, (int,), "a positive integer")
    if value is not None and value <= 0:
        raise RequestError(f"'{name}' must be a positive integer (got {value}).", name)
    return value


def _common(data: Dict[str, Any], req: GenRequest, tokens_field: str = "max_tokens"):
    _typed(data, "model", (str,), "a string")
    req.max_tokens = _positive_int(data, tokens_field)
    req.stream = _typed(data, "stream", (bool,), "true or false", False)
    req.seed = _typed(data, "seed", (int,), "an integer")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise RequestError(f"'seed' must be in [0, 2**63) (got {req.seed}).", "seed")
    t = _typed(data, "temperature", (int, float), "a number in [0, 2]")
    if t is not None and not 0 <= t <= 2:
        raise RequestError(f"'temperature' must be in [0, 2] (got {t}).", "temperature")
    req.temperature = t
    req.max_denoising_steps = _positive_int(data, "max_denoising_steps")
    eb = _typed(data, "entropy_bound", (int, float), "a number > 0")
    if eb is not None and not eb > 0:
        raise RequestError(f"'entropy_bound' must be > 0 (got {eb}).", "entropy_bound")
    req.entropy_bound = eb
    req.mode = _typed(data, "mode", (str,), "'exact' or 'fast'")
    if req.mode is not None and req.mode not in MODES:
        raise RequestError(f"'mode' must be 'exact' or 'fast' (got {req.mode!r}).", "mode")
    req.fast_settings = _fast_settings(data, req.mode)
    req.include_drafts = _typed(data, "include_drafts", (bool,), "true or false", False)
    meta = data.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise RequestError("'metadata' must be an object.", "metadata")


def _fast_settings(data: Dict[str, Any], mode: Optional[str]) -> Dict[str, Any]:
    """The fast-mode settings of a body, checked as `DiffusionConfig` checks them."""
    given = {name: data[name] for name in FAST_SETTINGS if data.get(name) is not None}
    try:
        DiffusionConfig(mode=mode or "exact", **given)
    except ValueError as e:
        param = next((n for n in given if str(e).startswith(n)), None)
        message = str(e).replace(" (CLI: --mode fast)", "").replace("mode='fast'", '"mode": "fast"')
        raise RequestError(message, param) from None
    return given


def _stop(value, name="stop") -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"'{name}' must be a non-empty string or a list of them.", name)
    if len(value) > 4 and name == "stop":
        raise RequestError("'stop' takes at most 4 strings.", name)
    return value


def _text(content, where: str) -> str:
    """A message content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    f"{where}[{i}] has type {kind!r}; this model takes text parts only.", where
                )
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{i}].text must be a string.", where)
            out.append(part["text"])
        return "".join(out)
    raise RequestError(f"{where} must be a string or a list of text parts.", where)


def _arguments(raw, where: str) -> Dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw or "{}")
    except (TypeError, ValueError):
        raise RequestError(f"{where} is not a JSON object string.", where) from None
    if not isinstance(args, dict):
        raise RequestError(f"{where} must encode a JSON object.", where)
    return args


def _openai_messages(raw) -> List[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list.", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a 'role'.", where)
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(f"{where}.role {role!r} is not supported.", where)
        msg = Message("system" if role == "developer" else role, _text(m.get("content"), where))
        for j, tc in enumerate(m.get("tool_calls") or ()):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise RequestError(f"{where}.tool_calls[{j}] needs function.name.", where)
            args = _arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")
            msg.tool_calls.append((tc.get("id"), fn["name"], args))
        if role == "tool":
            msg.tool_call_id = m.get("tool_call_id")
        out.append(msg)
    return out


def _openai_tools(data) -> List[Dict[str, Any]]:
    tools = data.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list.", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(
                f"tools[{i}] must be {{type: function, function: {{name, ...}}}}.", "tools"
            )
        out.append(
            {
                "name": fn["name"],
                "description": fn.get("description") or "",
                "parameters": fn.get("parameters") or {},
            }
        )
    return out


def _tool_choice(value, param: str) -> str:
    if value in (None, "auto"):
        return "auto"
    if value == "none":
        return "none"
    raise RequestError(
        f"'{param}'={json.dumps(value)} is not supported: the model decides whether to call a "
        "tool; use auto or none.",
        param,
    )


def _response_format(data, req: GenRequest):
    rf = data.get("response_format")
    if rf is None:
        return
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError(
            "'response_format.type' must be text, json_object or json_schema.", "response_format"
        )
    if rf["type"] == "json_object":
        req.json_object = True
    elif rf["type"] == "json_schema":
        js = rf.get("json_schema")
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
            if effort is not None and THINKING_EFFORTS.get(effort) != flag:
                raise RequestError(
                    "reasoning_effort and chat_template_kwargs.enable_thinking disagree; give one.",
                    "reasoning_effort",
                )
            return flag
    if effort is None:
        return None
    if effort not in THINKING_EFFORTS:
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
    req.tool_choice = _tool_choice(data.get("tool_choice"), "tool_choice")
    _response_format(data, req)
    req.enable_thinking = _thinking_openai(data)
    return req


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
    req.stop = _stop(data.get("stop_sequences"), "stop_sequences")
    req.include_usage = True
    messages = []
    if data.get("system") is not None:
        messages.append(Message("system", _text(data["system"], "system")))
    messages += _anthropic_messages(data.get("messages"))
    req.messages = messages
    req.tools = _anthropic_tools(data.get("tools"))
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("auto", "none"):
        if set(choice) - {"type", "disable_parallel_tool_use"}:
            raise RequestError("'tool_choice' takes type auto or none here.", "tool_choice")
        choice = choice["type"]
    req.tool_choice = _tool_choice(choice, "tool_choice")
    thinking = data.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled"):
            raise RequestError("'thinking.type' must be enabled or disabled.", "thinking")
        req.enable_thinking = kind == "enabled"
    return req


def _anthropic_tools(tools) -> List[Dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list.", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"tools[{i}] needs a name and an input_schema.", "tools")
        out.append(
            {
                "name": t["name"],
                "description": t.get("description") or "",
                "parameters": t.get("input_schema") or {},
            }
        )
    return out


def _anthropic_messages(raw) -> List[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list.", "messages")
    out: List[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"{where} must have role user or assistant.", where)
        content = m.get("content")
        if isinstance(content, str):
            out.append(Message(m["role"], content))
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content must be a string or a list of blocks.", where)
        out += _anthropic_blocks(m["role"], content, where)
    return out


def _anthropic_blocks(role: str, blocks: list, where: str) -> List[Message]:
    out: List[Message] = []
    msg = Message(role)
    for j, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            msg.content += _text([b], f"{where}.content")
        elif kind == "thinking" and role == "assistant":
            continue  # earlier thoughts are not re-rendered (the chat template drops them)
        elif kind == "tool_use" and role == "assistant":
            msg.tool_calls.append((b.get("id"), b.get("name"), b.get("input") or {}))
        elif kind == "tool_result" and role == "user":
            result = b.get("content")
            text = result if isinstance(result, str) else _text(result, f"{where}.content[{j}]")
            out.append(Message("tool", text, tool_call_id=b.get("tool_use_id")))
        else:
            raise RequestError(f"{where}.content[{j}] has unsupported type {kind!r}.", where)
    if msg.content or msg.tool_calls or not out:
        out.append(msg)
    return out
