"""`run.Event`s -> the wire formats: OpenAI chat and text completions, Anthropic messages.

Each format gives `chunks(event)` (SSE lines for a streamed reply, in order) and
`body(events)` (a whole reply). Drafts are an opt-in extension (`include_drafts`):
OpenAI chunks with an empty delta and a top-level `draft` object, Anthropic `data:`
lines without an `event:` name, which both official clients skip.
"""

import json
import time
import uuid
from typing import Any, Dict, List

_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def sse(obj: Dict[str, Any], event: str = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _openai_usage(usage: Dict[str, int]) -> Dict[str, Any]:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
    }


def _openai_calls(calls, stream: bool) -> List[Dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        item = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        out.append({"index": i, **item} if stream else item)
    return out


def _draft(ev) -> Dict[str, Any]:
    return {"text": ev.text, **ev.data}


class OpenAIChat:
    """`chat.completion` / `chat.completion.chunk`."""

    object = "chat.completion"

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _chunk(self, delta, finish=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse(self._head(self.object + ".chunk", choices=[choice], **extra))

    def _head(self, obj: str, **fields) -> Dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**head, **fields}

    def start(self) -> List[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def chunks(self, ev) -> List[str]:
        if ev.kind == "reasoning":
            return [self._chunk({"reasoning_content": ev.text, "reasoning": ev.text})]
        if ev.kind == "content":
            return [self._chunk({"content": ev.text})]
        if ev.kind == "draft":
            return [self._chunk({}, draft=_draft(ev))]
        d = ev.data
        out = []
        if d["tool_calls"]:
            out.append(self._chunk({"tool_calls": _openai_calls(d["tool_calls"], True)}))
        out.append(self._chunk({}, d["finish_reason"]))
        if self.include_usage:
            usage = _openai_usage(d["usage"])
            out.append(sse(self._head(self.object + ".chunk", choices=[], usage=usage)))
        return out + ["data: [DONE]\n\n"]

    def body(self, events) -> Dict[str, Any]:
        thinking = "".join(e.text for e in events if e.kind == "reasoning")
        text = "".join(e.text for e in events if e.kind == "content")
        d = events[-1].data
        message = {"role": "assistant", "content": text or None}
        if thinking:
            message.update(reasoning_content=thinking, reasoning=thinking)
        if d["tool_calls"]:
            message["tool_calls"] = _openai_calls(d["tool_calls"], False)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": d["finish_reason"],
        }
        return self._head(
            self.object, choices=[choice], usage=_openai_usage(d["usage"]), seed=d["seed"]
        )


class OpenAICompletion(OpenAIChat):
    """`text_completion` (thinking, if the model writes any, is part of the text)."""

    object = "text_completion"

    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def _text(self, text, finish=None, **extra) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return sse(self._head(self.object, choices=[choice], **extra))

    def start(self) -> List[str]:
        return []

    def chunks(self, ev) -> List[str]:
        if ev.kind in ("reasoning", "content"):
            return [self._text(ev.text)]
        if ev.kind == "draft":
            return [self._text("", draft=_draft(ev))]
        d = ev.data
        out = [self._text("", d["finish_reason"])]
        if self.include_usage:
            usage = _openai_usage(d["usage"])
            out.append(sse(self._head(self.object, choices=[], usage=usage)))
        return out + ["data: [DONE]\n\n"]

    def body(self, events) -> Dict[str, Any]:
        text = "".join(e.text for e in events if e.kind in ("reasoning", "content"))
        d = events[-1].data
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": d["finish_reason"]}
        return self._head(
            self.object, choices=[choice], usage=_openai_usage(d["usage"]), seed=d["seed"]
        )


class AnthropicMessages:
    """`message` and the Anthropic streaming events."""

    def __init__(self, model: str, include_usage: bool = True):
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.block = -1  # index of the open content block
        self.kind = None  # its type

    def _message(self, content, stop_reason, stop_sequence, usage) -> Dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    @staticmethod
    def _usage(u) -> Dict[str, int]:
        return {
            "input_tokens": u["prompt_tokens"] - u["cached_tokens"],
            "output_tokens": u["completion_tokens"],
            "cache_read_input_tokens": u["cached_tokens"],
            "cache_creation_input_tokens": 0,
        }

    @staticmethod
    def _stop(d):
        if d["stop_sequence"] is not None:
            return "stop_sequence"
        return _ANTHROPIC_STOP.get(d["finish_reason"], "end_turn")

    def start(self) -> List[str]:
        usage = {"input_tokens": 0, "output_tokens": 0}
        msg = self._message([], None, None, usage)
        return [sse({"type": "message_start", "message": msg}, "message_start")]

    def _open(self, kind: str, block: Dict[str, Any]) -> List[str]:
        out = self._close()
        self.block, self.kind = self.block + 1, kind
        start = {"type": "content_block_start", "index": self.block, "content_block": block}
        return out + [sse(start, "content_block_start")]

    def _close(self) -> List[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [sse({"type": "content_block_stop", "index": self.block}, "content_block_stop")]

    def _delta(self, delta) -> str:
        event = {"type": "content_block_delta", "index": self.block, "delta": delta}
        return sse(event, "content_block_delta")

    def chunks(self, ev) -> List[str]:
        if ev.kind == "draft":
            return [sse({"type": "draft", "draft": _draft(ev)})]  # no event name: skipped
        if ev.kind == "reasoning":
            out = (
                []
                if self.kind == "thinking"
                else self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            )
            return out + [self._delta({"type": "thinking_delta", "thinking": ev.text})]
        if ev.kind == "content":
            out = [] if self.kind == "text" else self._open("text", {"type": "text", "text": ""})
            return out + [self._delta({"type": "text_delta", "text": ev.text})]
        d = ev.data
        out = self._close()
        for call in d["tool_calls"]:
            block = {"type": "tool_use", "id": _tool_id(), "name": call.name, "input": {}}
            out += self._open("tool_use", block)
            args = json.dumps(call.arguments, ensure_ascii=False)
            out.append(self._delta({"type": "input_json_delta", "partial_json": args}))
            out += self._close()
        delta = {"stop_reason": self._stop(d), "stop_sequence": d["stop_sequence"]}
        msg_delta = {"type": "message_delta", "delta": delta, "usage": self._usage(d["usage"])}
        return out + [
            sse(msg_delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]

    def body(self, events) -> Dict[str, Any]:
        content = []
        thinking = "".join(e.text for e in events if e.kind == "reasoning")
        text = "".join(e.text for e in events if e.kind == "content")
        d = events[-1].data
        if thinking:
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if text or not d["tool_calls"]:
            content.append({"type": "text", "text": text})
        for call in d["tool_calls"]:
            content.append(
                {"type": "tool_use", "id": _tool_id(), "name": call.name, "input": call.arguments}
            )
        return self._message(content, self._stop(d), d["stop_sequence"], self._usage(d["usage"]))


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"
