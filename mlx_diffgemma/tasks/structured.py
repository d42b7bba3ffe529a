"""Structured output on a clamped canvas: JSON skeletons and tables with typed holes.

The frame (braces, keys, quotes, commas; table bars and headers) is clamped, so it holds
whatever the model writes; only the holes are denoised. Each typed hole also limits its
tokens (a per-position allowed-token mask on the logits):

- "string" (or "string:N", N tokens; default 16): text tokens without `"`, `\\` or control
  characters, so a string can never break out of its quotes.
- "integer" ("integer:N"; default 6): a digit or `-` first, then digits.
- "number" ("number:N"; default 10): as integer, with `.` allowed after the first slot.
- "boolean": one token, `true` or `false`.
- a dict: a nested object with these keys; a list: an array with these items (fixed length).

`<pad>` is allowed in every string slot and in every number slot but the first: it ends
the fill (see `infill`), so values may be shorter than their budget. Per-position masks
cannot express all of JSON's number grammar: a number may come out as `-` alone or with a
leading zero (`07`); `validate_json` reports those. String and boolean holes always parse.
"""

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..generate import GenerationResponse
from .infill import Hole, InfillTemplate, infill

Spec = Union[str, Dict[str, Any], List[Any]]

DEFAULT_BUDGETS = {"string": 16, "integer": 6, "number": 10, "boolean": 1}
_SCALAR = re.compile(r"(?P<type>string|integer|number|boolean)(?::(?P<n>\d+))?")


@dataclass(frozen=True)
class StructuredResult:
    """A generated structure.

    Attributes:
        text: the output text (frame plus fills).
        value: the parsed value (a dict for JSON, rows of cells for a table), or None
            if the text does not parse.
        problems: what does not match the skeleton (empty when valid).
        fills: the text of each hole, in order.
        response: the last `GenerationResponse` (statistics, seed).
    """

    text: str
    value: Any
    problems: Tuple[str, ...]
    fills: Tuple[str, ...]
    response: GenerationResponse

    @property
    def ok(self) -> bool:
        return not self.problems


@functools.lru_cache(maxsize=4)
def _vocab(tokenizer) -> Tuple[List[str], np.ndarray]:
    """Each id's text, and which ids are plain text: not special, unused or byte fallback."""
    n = tokenizer.vocab_size
    texts = [tokenizer.decode([i]) for i in range(n)]

    def plain(i, t):
        if not t or "\ufffd" in t or re.fullmatch(r"<unused\d+>|\[multimodal\]", t):
            return False
        # A byte-fallback token of an ASCII character duplicates the character's own token.
        if len(t) == 1 and ord(t) < 128 and tokenizer.encode(t) != [i]:
            return False
        return tokenizer.decode([i], skip_special_tokens=True) == t

    return texts, np.array([plain(i, t) for i, t in enumerate(texts)])


@functools.lru_cache(maxsize=32)
def token_class(tokenizer, name: str) -> np.ndarray:
    """(V,) bool: the tokens of a named class (see the module docstring).

    Names: "string", "cell" (table cell: no `|` or line break), "digit", "sign_or_digit",
    "number_rest" (digits and `.`), "true_false", "space_true_false"; the classes that
    may end a value early include `<pad>`: "string", "cell", "integer_rest", "number_rest".
    """
    texts, plain = _vocab(tokenizer)
    pad = tokenizer.pad_token_id

    def where(pred, with_pad=False):
        mask = np.array([p and pred(t) for t, p in zip(texts, plain)])
        if with_pad:
            mask[pad] = True
        return mask

    def no_control(t):
        return all(ord(c) >= 0x20 and c != "\x7f" for c in t)

    digits = set("0123456789")
    classes = {
        "string": lambda: where(lambda t: no_control(t) and '"' not in t and "\\" not in t, True),
        "cell": lambda: where(lambda t: no_control(t) and "|" not in t, True),
        "digit": lambda: where(lambda t: t in digits),
        "sign_or_digit": lambda: where(lambda t: t in digits or t == "-"),
        "integer_rest": lambda: where(lambda t: t in digits, True),
        "number_rest": lambda: where(lambda t: t in digits or t == ".", True),
        "true_false": lambda: where(lambda t: t in ("true", "false")),
        "space_true_false": lambda: where(lambda t: t in (" true", " false")),
    }
    if name not in classes:
        raise ValueError(f"Unknown token class {name!r}; use one of {sorted(classes)}.")
    mask = classes[name]()
    if not mask.any():
        raise ValueError(f"The tokenizer has no token of class {name!r}.")
    return mask


def _scalar(spec: str) -> Tuple[str, int]:
    m = _SCALAR.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(
            f"Unknown field type {spec!r}; use string, integer, number or boolean "
            "(optionally with :N tokens), a dict or a list."
        )
    kind, n = m.group("type"), m.group("n")
    if kind == "boolean" and n not in (None, "1"):
        raise ValueError(f"{spec!r}: a boolean is one token; write 'boolean'.")
    budget = DEFAULT_BUDGETS[kind] if n is None else int(n)
    if budget < 1:
        raise ValueError(f"{spec!r} has a budget of {budget} tokens; give at least 1.")
    return kind, budget


class _Frame:
    """Collects fixed text and holes in order."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parts: List[Union[str, Hole]] = [""]

    def text(self, s: str):
        self.parts[-1] += s

    def hole(self, kind: str, budget: int):
        tc = functools.partial(token_class, self.tokenizer)
        if kind == "string":
            self.text('"')
            self._add(Hole(budget, first=tc("string"), rest=tc("string")))
            self.text('"')
        elif kind in ("integer", "number"):
            rest = tc("integer_rest" if kind == "integer" else "number_rest")
            self._add(Hole(budget, first=tc("sign_or_digit"), rest=rest))
        else:
            # `: true` tokenizes as ':' + ' true': the space belongs to the value token.
            spaced = self.parts[-1].endswith(" ")
            if spaced:
                self.parts[-1] = self.parts[-1][:-1]
            mask = tc("space_true_false" if spaced else "true_false")
            self._add(Hole(1, first=mask, rest=mask))

    def _add(self, hole: Hole):
        self.parts += [hole, ""]

    def template(self) -> InfillTemplate:
        return InfillTemplate(self.tokenizer, self.parts[0], self.parts[1:])


def _emit(frame: _Frame, spec: Spec):
    if isinstance(spec, dict):
        if not spec:
            raise ValueError("An object in the skeleton has no keys; give at least one.")
        frame.text("{")
        for i, (key, value) in enumerate(spec.items()):
            frame.text((", " if i else "") + json.dumps(key) + ": ")
            _emit(frame, value)
        frame.text("}")
    elif isinstance(spec, list):
        if not spec:
            raise ValueError("An array in the skeleton has no items; give at least one.")
        frame.text("[")
        for i, value in enumerate(spec):
            frame.text(", " if i else "")
            _emit(frame, value)
        frame.text("]")
    else:
        frame.hole(*_scalar(spec))


def json_template(tokenizer, spec: Spec) -> InfillTemplate:
    """The clamped JSON frame of `spec` with a typed hole per leaf.

    Args:
        tokenizer: the model's tokenizer.
        spec: e.g. `{"name": "string:12", "age": "integer", "tags": ["string", "string"]}`.

    Returns:
        An `InfillTemplate`; its prefix (the frame up to the first hole) goes to the encoder.

    Raises:
        ValueError: an unknown field type or an empty object or array.
    """
    frame = _Frame(tokenizer)
    _emit(frame, spec)
    return frame.template()


def table_template(
    tokenizer, headers: Sequence[str], rows: int, cell_tokens: int = 8
) -> InfillTemplate:
    """A Markdown table with fixed headers and `rows` rows of cells of `cell_tokens` tokens.

    Cells hold no `|` or line break, so the table shape holds.

    Args:
        tokenizer: the model's tokenizer.
        headers: column names (fixed).
        rows: body rows to fill.
        cell_tokens: the budget of each cell.

    Returns:
        An `InfillTemplate`.

    Raises:
        ValueError: no headers, a header with `|` or a line break, or rows < 1.
    """
    if not headers:
        raise ValueError("A table needs at least one header.")
    for h in headers:
        if "|" in h or "\n" in h:
            raise ValueError(f"The header {h!r} has a '|' or a line break; remove it.")
    if rows < 1:
        raise ValueError(f"A table needs at least 1 row (got {rows}).")
    cell = token_class(tokenizer, "cell")
    head = "| " + " | ".join(headers) + " |\n|" + " --- |" * len(headers)
    parts: List[Union[str, Hole]] = [head + "\n|"]
    for r in range(rows):
        for c in range(len(headers)):
            parts.append(Hole(cell_tokens, first=cell, rest=cell))
            last = c == len(headers) - 1
            parts.append(" |" + ("\n|" if last and r < rows - 1 else ""))
    return InfillTemplate(tokenizer, parts[0], parts[1:])


def validate_json(text: str, spec: Spec) -> Tuple[Any, List[str]]:
    """Parse `text` and check it against `spec`.

    Args:
        text: the generated JSON text.
        spec: the skeleton it was made from.

    Returns:
        `(value, problems)`: the parsed value (None if it does not parse) and a list of
        problems, each naming the path (empty when valid).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"not valid JSON: {e}"]
    problems: List[str] = []
    _check(value, spec, "$", problems)
    return value, problems


def _check(value, spec, path: str, problems: List[str]):
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{path}: missing key {key!r}")
            else:
                _check(value[key], sub, f"{path}.{key}", problems)
        for key in value.keys() - spec.keys():
            problems.append(f"{path}: unexpected key {key!r}")
    elif isinstance(spec, list):
        if not isinstance(value, list) or len(value) != len(spec):
            problems.append(f"{path}: expected an array of {len(spec)} items")
            return
        for i, (v, sub) in enumerate(zip(value, spec)):
            _check(v, sub, f"{path}[{i}]", problems)
    else:
        kind = _scalar(spec)[0]
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
        }[kind]
        if not ok:
            problems.append(f"{path}: expected {kind}, got {json.dumps(value)}")


def validate_table(text: str, headers: Sequence[str], rows: int) -> Tuple[Any, List[str]]:
    """Parse a Markdown table and check its headers, separator and shape.

    Returns:
        `(cells, problems)`: the body rows as lists of stripped cell texts, and a list of
        problems (empty when the table has these headers and `rows` rows of
        `len(headers)` cells).
    """
    lines = text.strip("\n").split("\n")
    problems: List[str] = []

    def cells(line):
        if not (line.startswith("|") and line.endswith("|")):
            return None
        return [c.strip() for c in line[1:-1].split("|")]

    parsed = [cells(line) for line in lines]
    if len(lines) < 2 or parsed[0] != list(headers):
        problems.append(f"header row is not {' | '.join(headers)}")
    if len(lines) < 2 or parsed[1] != ["---"] * len(headers):
        problems.append("second line is not the separator row")
    body = parsed[2:]
    if len(body) != rows:
        problems.append(f"expected {rows} body rows, got {len(body)}")
    for i, row in enumerate(body):
        if row is None or len(row) != len(headers):
            problems.append(f"row {i + 1} does not have {len(headers)} cells")
    return (body if not problems else None), problems


def spec_from_json_schema(schema: Dict[str, Any], string_tokens: int = 16) -> Spec:
    """A skeleton spec from a JSON Schema subset.

    Supported: `object` with `properties` (every property is generated), `array` with
    `items` and `minItems == maxItems`, `string` (`maxLength` characters map to about
    one token per 3 characters; `x-max-tokens` sets the budget directly), `integer`,
    `number` and `boolean`.

    Raises:
        ValueError: a construct outside the subset, named with its path.
    """
    return _from_schema(schema, "$", string_tokens)


def _from_schema(schema, path, string_tokens):
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties")
        if not props:
            raise ValueError(f"{path}: an object needs 'properties'.")
        return {k: _from_schema(v, f"{path}.{k}", string_tokens) for k, v in props.items()}
    if kind == "array":
        n = schema.get("minItems")
        if n is None or n != schema.get("maxItems") or "items" not in schema:
            raise ValueError(
                f"{path}: an array needs 'items' and a fixed length (minItems == maxItems)."
            )
        return [_from_schema(schema["items"], f"{path}[{i}]", string_tokens) for i in range(n)]
    if kind in ("string", "integer", "number", "boolean"):
        if "enum" in schema:
            raise ValueError(f"{path}: 'enum' is not supported; use a plain {kind}.")
        if kind == "boolean":
            return "boolean"
        n = schema.get("x-max-tokens")
        if n is None and kind == "string":
            n = -(-schema["maxLength"] // 3) if "maxLength" in schema else string_tokens
        return kind if n is None else f"{kind}:{n}"
    raise ValueError(
        f"{path}: type {kind!r} is not supported; use object, array, string, integer, "
        "number or boolean."
    )


def generate_skeleton(
    model,
    tokenizer,
    spec: Spec,
    *,
    messages: Optional[Sequence[Dict[str, Any]]] = None,
    **kwargs,
) -> StructuredResult:
    """Generate JSON in the clamped frame of a skeleton `spec` and validate it (for a JSON
    Schema or a pydantic model, see `json_schema.generate_json`).

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        spec: the skeleton (see `json_template`), or build it with `spec_from_json_schema`.
        messages: chat messages that ask for the content; None for no instruction.
        kwargs: as for `stream_generate` (seed, config, sampler settings).

    Returns:
        A `StructuredResult`.
    """
    result = infill(model, tokenizer, json_template(tokenizer, spec), messages=messages, **kwargs)
    value, problems = validate_json(result.text, spec)
    return StructuredResult(result.text, value, tuple(problems), result.fills, result.response)


def generate_table(
    model,
    tokenizer,
    headers: Sequence[str],
    rows: int,
    *,
    cell_tokens: int = 8,
    messages: Optional[Sequence[Dict[str, Any]]] = None,
    **kwargs,
) -> StructuredResult:
    """Generate a Markdown table with fixed headers (see `table_template`) and validate it."""
    template = table_template(tokenizer, headers, rows, cell_tokens)
    result = infill(model, tokenizer, template, messages=messages, **kwargs)
    value, problems = validate_table(result.text, headers, rows)
    return StructuredResult(result.text, value, tuple(problems), result.fills, result.response)
