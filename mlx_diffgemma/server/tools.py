"""Gemma 4's tool-call text format: render declarations, calls and results; parse calls.

The model writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`: keys are
bare, strings sit between `<|"|>` delimiters, numbers, booleans and null are JSON
literals, objects and arrays nest. A tool is declared in the system turn as
`<|tool>declaration:NAME{description:...,parameters:{...}}<tool|>` (JSON Schema types
upper-cased, as Gemma 4's chat template writes them) and a result goes back as
`<|tool_response>response:NAME{...}<tool_response|>` inside the same model turn, which
the model then continues. `<|tool_response>` is an EOS id, so generation stops after a call.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
QUOTE = '<|"|>'
_CALL = re.compile(r"<\|tool_call>call:(?P<name>[\w.:-]+)(?P<body>.*?)<tool_call\|>", re.S)
_LITERAL = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null")


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: `arguments` is a dict (JSON-encoded for OpenAI, as is for Anthropic)."""

    name: str
    arguments: Dict[str, Any]


def format_value(value: Any, upper_types: bool = False) -> str:
    """A Python value in Gemma 4's tool syntax (bare keys, `<|"|>` strings)."""
    if isinstance(value, str):
        return f"{QUOTE}{value}{QUOTE}"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if upper_types and k == "type" and isinstance(v, str):
                v = v.upper()
            items.append(f"{k}:{format_value(v, upper_types)}")
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v, upper_types) for v in value) + "]"
    return json.dumps(value)


def render_declarations(tools: List[Dict[str, Any]]) -> str:
    """`<|tool>declaration:...<tool|>` for each function `{name, description, parameters}`."""
    out = []
    for t in tools:
        body = {}
        if t.get("description"):
            body["description"] = t["description"]
        if t.get("parameters"):
            body["parameters"] = t["parameters"]
        out.append(f"<|tool>declaration:{t['name']}{format_value(body, upper_types=True)}<tool|>")
    return "".join(out)


def render_call(name: str, arguments: Dict[str, Any]) -> str:
    """`<|tool_call>call:NAME{...}<tool_call|>`."""
    return f"{CALL_OPEN}call:{name}{format_value(arguments)}{CALL_CLOSE}"


def render_response(name: str, content: str) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`: a JSON object's keys, else `value`."""
    try:
        value = json.loads(content)
    except ValueError:
        value = content
    body = value if isinstance(value, dict) and value else {"value": value}
    return f"<|tool_response>response:{name}{format_value(body)}<tool_response|>"


def parse_tool_calls(text: str) -> Tuple[str, List[ToolCall]]:
    """Split answer text into its plain text and the well-formed calls in it.

    A call whose arguments do not parse stays in the text, so nothing the model wrote
    is lost.

    Args:
        text: the answer, decoded with special tokens kept.

    Returns:
        `(text without the parsed calls, calls)`.
    """
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(text):
        try:
            args = _Parser(m.group("body").strip()).whole()
        except ValueError:
            continue
        if not isinstance(args, dict):
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(ToolCall(m.group("name"), args))
    kept.append(text[pos:])
    return "".join(kept), calls


class _Parser:
    """Recursive descent over one value of the tool syntax."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def whole(self) -> Any:
        value = self.value()
        self.space()
        if self.i != len(self.s):
            raise ValueError(f"trailing text at {self.i}")
        return value

    def space(self):
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self, token: str) -> bool:
        self.space()
        return self.s.startswith(token, self.i)

    def expect(self, token: str):
        if not self.peek(token):
            raise ValueError(f"expected {token!r} at {self.i}")
        self.i += len(token)

    def value(self) -> Any:
        if self.peek(QUOTE):
            self.i += len(QUOTE)
            end = self.s.find(QUOTE, self.i)
            if end < 0:
                raise ValueError("unterminated string")
            out, self.i = self.s[self.i : end], end + len(QUOTE)
            return out
        if self.peek("{"):
            return self.container("{", "}", self.member, {})
        if self.peek("["):
            return self.container("[", "]", self.value, [])
        if self.peek('"'):  # a JSON string, as some fine-tunes write
            decoded, end = json.JSONDecoder().raw_decode(self.s, self.i)
            self.i = end
            return decoded
        m = _LITERAL.match(self.s, self.i)
        if m is None:
            raise ValueError(f"unexpected text at {self.i}")
        self.i = m.end()
        return json.loads(m.group(0))

    def member(self) -> Tuple[str, Any]:
        self.space()
        if self.peek(QUOTE) or self.peek('"'):
            key = self.value()
        else:
            m = re.compile(r"[^\s:{}\[\],]+").match(self.s, self.i)
            if m is None:
                raise ValueError(f"expected a key at {self.i}")
            key, self.i = m.group(0), m.end()
        self.expect(":")
        return key, self.value()

    def container(self, open_: str, close: str, item, out):
        self.expect(open_)
        if self.peek(close):
            self.i += 1
            return out
        while True:
            got = item()
            if isinstance(out, dict):
                out[got[0]] = got[1]
            else:
                out.append(got)
            if self.peek(","):
                self.i += 1
                continue
            self.expect(close)
            return out
