"""JSON Schema -> a clamped canvas frame whose every reading is a valid value.

The subset is what pydantic and the OpenAI SDK send (`client.chat.completions.parse`):
objects (`properties`, `required`, `additionalProperties`), `$ref` into `$defs`,
`enum` / `const` / `Literal` / booleans / `null`, `anyOf` / `oneOf` (Optional fields,
unions of objects), arrays of variable length, strings with `minLength` / `maxLength`,
numbers and integers with `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum`.
Annotations (`title`, `description`, `default`, `examples`, ...) are accepted and ignored.
Anything else (`pattern`, `format`, `patternProperties`, a recursive `$ref`, ...) is a
`SchemaError` naming the keyword and its path.

How each construct is decided on the canvas (compact JSON: no spaces):

- Fixed text (braces, keys, `:` and `,`, a `const`) is clamped.
- A finite choice (`enum`, `const` in a union, booleans, `null`) is a run of one-token
  holes, each allowed only the tokens the alternatives have at that position; the
  reading is the alternative that matches the most positions, so it is always one of them.
- A decision between "a value" and "no value" (an Optional field's `null`, the end of a
  variable-length array, which alternative of a union) is a gate: the value's opening
  token (`{`, `[`, `"`, a digit, ...) becomes a one-token hole that also allows the
  other outcome's token (`null`, `]`). An array of up to `maxItems` items (default
  `DEFAULT_MAX_ITEMS`; `x-max-items` overrides) lays out every item; the first item
  gate that reads `]` ends it (items below `minItems` have no gate). A union lays out
  each alternative behind a gate; the first whose gate opens is the value.
- A string is a typed hole (no quote, backslash or control character) of
  `x-max-tokens` tokens (default from `maxLength`, about 3 characters a token, else 16);
  its first `minLength` tokens may not be `<pad>`, and the text is cut to `maxLength`.
- A number is a digit hole; what does not parse (a lone `-`) reads as the nearest valid
  value, and every number is clamped into its `minimum` / `maximum` range (enforced,
  not re-sampled).

The reply is the value serialised by `json.dumps`, so it always parses and validates.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .infill import Hole, InfillTemplate, stream_infill
from .structured import token_class

DEFAULT_MAX_ITEMS = 4
DEFAULT_TOKENS = {"string": 16, "integer": 6, "number": 10}
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
}
_NUMERIC = {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "x-max-tokens"}
_KEYWORDS = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems", "x-max-items"},
    "string": {"type", "minLength", "maxLength", "x-max-tokens"},
    "integer": _NUMERIC,
    "number": _NUMERIC,
    "boolean": {"type"},
    "null": {"type"},
}


class SchemaError(ValueError):
    """A schema outside the subset, or malformed; the message starts with its path."""


# --------------------------------------------------------------------------- the nodes


@dataclass
class Choice:
    values: List[Any]  # one or more JSON values; one is a constant


@dataclass
class Text:
    budget: int
    min_len: int = 0
    max_len: Optional[int] = None


@dataclass
class Num:
    integer: bool
    budget: int
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False


@dataclass
class Obj:
    fields: List[Tuple[str, Any]]


@dataclass
class Arr:
    item: Any
    min_items: int
    max_items: int


@dataclass
class Union_:
    options: List[Any]  # no Choice among them (merged into one), no null (see nullable)
    nullable: bool = False


Node = Union[Choice, Text, Num, Obj, Arr, Union_]


def parse_schema(schema: Dict[str, Any]) -> Node:
    """The node tree of a JSON Schema (see the module docstring).

    Raises:
        SchemaError: a keyword outside the subset or a malformed part, named with its path.
    """
    if not isinstance(schema, dict):
        raise SchemaError("$: a schema must be a JSON object.")
    defs = schema.get("$defs", schema.get("definitions", {}))
    if not isinstance(defs, dict):
        raise SchemaError("$.$defs must be an object of schemas.")
    return _node(schema, "$", defs, ())


def _fail(path: str, message: str):
    raise SchemaError(f"{path}: {message}")


def _node(s, path: str, defs: dict, stack: Tuple[str, ...]) -> Node:
    if not isinstance(s, dict):
        _fail(path, "a schema must be a JSON object.")
    if "$ref" in s:
        return _ref(s, path, defs, stack)
    if "const" in s:
        _only(s, path, {"const", "type"})
        return Choice([s["const"]])
    if "enum" in s:
        _only(s, path, {"enum", "type"})
        values = s["enum"]
        if not isinstance(values, list) or not values:
            _fail(path, "'enum' must be a non-empty list.")
        return Choice(_unique(values))
    for key in ("anyOf", "oneOf"):
        if key in s:
            _only(s, path, {key})
            options = s[key]
            if not isinstance(options, list) or not options:
                _fail(path, f"'{key}' must be a non-empty list of schemas.")
            nodes = [_node(o, f"{path}.{key}[{i}]", defs, stack) for i, o in enumerate(options)]
            return union(nodes)
    if "allOf" in s:
        _only(s, path, {"allOf"})
        if not isinstance(s["allOf"], list) or len(s["allOf"]) != 1:
            _fail(path, "'allOf' is supported with one schema only.")
        return _node(s["allOf"][0], f"{path}.allOf[0]", defs, stack)
    kind = s.get("type")
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        return union([_node({**s, "type": k}, path, defs, stack) for k in kind])
    if kind is None:
        _only(s, path, set())  # names the first keyword that is not an annotation
        _fail(path, "the schema has no type; give one (or enum, const, anyOf, $ref).")
    if kind not in _KEYWORDS:
        _fail(path, f"type {kind!r} is not supported; give one of {sorted(_KEYWORDS)}.")
    _only(s, path, _KEYWORDS[kind])
    return _TYPED[kind](s, path, defs, stack)


def _only(s: dict, path: str, allowed: set):
    for key in s:
        if key not in allowed and key not in _ANNOTATIONS and key not in ("$defs", "definitions"):
            _fail(path, f"the keyword {key!r} is not supported by structured output here.")


def _ref(s, path, defs, stack) -> Node:
    _only(s, path, {"$ref"})
    ref = s["$ref"]
    prefix = next((p for p in ("#/$defs/", "#/definitions/") if str(ref).startswith(p)), None)
    if prefix is None:
        _fail(path, f"$ref {ref!r} must point into $defs (#/$defs/Name).")
    name = ref[len(prefix) :]
    if name in stack:
        _fail(path, f"recursive $ref is not supported: {' -> '.join(stack + (name,))}.")
    if name not in defs:
        _fail(path, f"$ref {ref!r} names no entry of $defs.")
    return _node(defs[name], f"{path}.$ref({name})", defs, stack + (name,))


def _unique(values: list) -> list:
    out = []
    for v in values:
        if not any(json.dumps(v, sort_keys=True) == json.dumps(o, sort_keys=True) for o in out):
            out.append(v)
    return out


def _int(s, key, path, least=0, default=None):
    v = s.get(key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
        _fail(path, f"'{key}' must be an integer >= {least} (got {v!r}).")
    return v


def _number(s, key, path):
    v = s.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        _fail(path, f"'{key}' must be a number (got {v!r}).")
    return v


def _string(s, path, defs, stack) -> Node:
    lo, hi = _int(s, "minLength", path), _int(s, "maxLength", path)
    if lo is not None and hi is not None and lo > hi:
        _fail(path, f"minLength {lo} is more than maxLength {hi}.")
    default = DEFAULT_TOKENS["string"] if hi is None else max(1, math.ceil(hi / 3))
    budget = _int(s, "x-max-tokens", path, 1, default)
    if (lo or 0) > budget:
        _fail(path, f"minLength {lo} needs more than its {budget} tokens; raise x-max-tokens.")
    if hi == 0:
        return Choice([""])
    return Text(budget, lo or 0, hi)


def _numeric(s, path, defs, stack) -> Node:
    integer = s["type"] == "integer"
    budget = _int(s, "x-max-tokens", path, 1, DEFAULT_TOKENS[s["type"]])
    lo, hi = _number(s, "minimum", path), _number(s, "maximum", path)
    xlo, xhi = _number(s, "exclusiveMinimum", path), _number(s, "exclusiveMaximum", path)
    node = Num(integer, budget, lo, hi)
    if xlo is not None and (lo is None or xlo >= lo):
        node.lo, node.lo_open = xlo, True
    if xhi is not None and (hi is None or xhi <= hi):
        node.hi, node.hi_open = xhi, True
    if _clamp(node, node.lo if node.lo is not None else 0) is None:
        _fail(path, "the range holds no number (minimum above maximum).")
    return node


def _object(s, path, defs, stack) -> Node:
    props = s.get("properties", {})
    required = s.get("required", [])
    if not isinstance(props, dict):
        _fail(path, "'properties' must be an object of schemas.")
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        _fail(path, "'required' must be a list of property names.")
    missing = [k for k in required if k not in props]
    if missing:
        _fail(path, f"required {missing} are not properties.")
    extra = s.get("additionalProperties", False)
    if extra not in (False, True, {}):
        _fail(path, "'additionalProperties' must be false (only declared properties are made).")
    fields = [(k, _node(v, f"{path}.{k}", defs, stack)) for k, v in props.items()]
    return Obj(fields) if fields else Choice([{}])


def _array(s, path, defs, stack) -> Node:
    if not isinstance(s.get("items"), dict):
        _fail(path, "an array needs 'items' (one schema for every item).")
    lo = _int(s, "minItems", path, 0, 0)
    hi = _int(s, "maxItems", path, 0)
    cap = _int(s, "x-max-items", path, 0, max(lo, DEFAULT_MAX_ITEMS) if hi is None else hi)
    if hi is not None:
        cap = min(cap, hi)
    if lo > cap:
        _fail(path, f"minItems {lo} is more than the {cap} items laid out (maxItems/x-max-items).")
    item = _node(s["items"], f"{path}[]", defs, stack)
    return Arr(item, lo, cap) if cap else Choice([[]])


_TYPED = {
    "object": _object,
    "array": _array,
    "string": _string,
    "integer": _numeric,
    "number": _numeric,
    "boolean": lambda s, *a: Choice([True, False]),
    "null": lambda s, *a: Choice([None]),
}


def union(nodes: Sequence[Node]) -> Node:
    """A union, normalised: finite choices merged (null included), nested unions flattened."""
    flat, nullable, values = [], False, []
    for n in nodes:
        if isinstance(n, Union_):
            flat += n.options
            nullable |= n.nullable
        elif isinstance(n, Choice):
            values += n.values
        else:
            flat.append(n)
    if None in values and flat:
        values = [v for v in values if v is not None]
        nullable = True
    if values:
        choice = Choice(_unique(values))
        if not flat:
            return choice
        flat.insert(0, choice)
    if len(flat) == 1 and not nullable:
        return flat[0]
    return Union_(flat, nullable)


# ------------------------------------------------------------------------ sizes


def frame_size(node: Node, tokenizer) -> int:
    """Canvas positions of a node's frame (for the context check before laying it out)."""
    if isinstance(node, Choice):
        return max(len(tokenizer.encode(_dump(v))) for v in node.values)
    if isinstance(node, (Text, Num)):
        return node.budget + (2 if isinstance(node, Text) else 0)
    if isinstance(node, Obj):
        keys = sum(len(k) + 4 for k, _ in node.fields)
        return 2 + keys + sum(frame_size(n, tokenizer) for _, n in node.fields)
    if isinstance(node, Arr):
        return 2 + node.max_items * (frame_size(node.item, tokenizer) + 1)
    return sum(frame_size(n, tokenizer) for n in node.options)


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ----------------------------------------------------------------- the frame and reading

Reader = Callable[[List[List[int]], bool], Tuple[str, Any]]  # ("value", v) or ("exit", id)


@dataclass
class _Frame:
    tokenizer: Any
    parts: List[Union[str, Hole]] = field(default_factory=lambda: [""])
    masks: Dict[Tuple, np.ndarray] = field(default_factory=dict)

    @property
    def holes(self) -> int:
        return sum(isinstance(p, Hole) for p in self.parts)

    def text(self, s: str):
        self.parts[-1] += s

    def hole(self, budget: int, first: np.ndarray, rest: np.ndarray) -> int:
        self.parts += [Hole(budget, first=first, rest=rest), ""]
        return self.holes - 1

    def ids_mask(self, ids, pad: bool = False) -> np.ndarray:
        key = ("ids", tuple(sorted(set(ids))), pad)
        if key not in self.masks:
            mask = np.zeros(self.tokenizer.vocab_size, dtype=bool)
            mask[list(set(ids))] = True
            mask[self.tokenizer.pad_token_id] |= pad
            self.masks[key] = mask
        return self.masks[key]

    def class_mask(self, name: str, extra=(), pad: Optional[bool] = None) -> np.ndarray:
        key = (name, tuple(sorted(set(extra))), pad)
        if key not in self.masks:
            mask = token_class(self.tokenizer, name).copy()
            mask[list(extra)] = True
            if pad is not None:
                mask[self.tokenizer.pad_token_id] = pad
            self.masks[key] = mask
        return self.masks[key]

    def token(self, s: str) -> int:
        ids = self.tokenizer.encode(s)
        if len(ids) != 1:
            raise ValueError(f"The tokenizer writes {s!r} as {len(ids)} tokens; it needs one.")
        return ids[0]

    def opening(self, s: str, exits: Tuple[int, ...]) -> Optional[int]:
        """Fixed text `s` that opens a value, or its first token as a gate hole."""
        if not exits:
            self.text(s)
            return None
        first = self.token(s[0])
        index = self.hole(1, self.ids_mask((first, *exits)), self.ids_mask((first, *exits)))
        self.text(s[1:])
        return index


def _gate(fills, index, exits, force) -> Optional[int]:
    """The exit token a gate hole read, or None for the value."""
    if index is None or force:
        return None
    got = fills[index][:1]
    return got[0] if got and got[0] in exits else None


def emit(frame: _Frame, node: Node, exits: Tuple[int, ...] = ()) -> Reader:
    """Lay `node` out on `frame`; the function that reads its value from the holes' ids."""
    if isinstance(node, Choice):
        return _emit_choice(frame, node, exits)
    if isinstance(node, Text):
        return _emit_text(frame, node, exits)
    if isinstance(node, Num):
        return _emit_num(frame, node, exits)
    if isinstance(node, Obj):
        return _emit_obj(frame, node, exits)
    if isinstance(node, Arr):
        return _emit_arr(frame, node, exits)
    return _emit_union(frame, node, exits)


def _emit_choice(frame: _Frame, node: Choice, exits) -> Reader:
    tok = frame.tokenizer
    alts = [tok.encode(_dump(v)) for v in node.values]
    if len(alts) == 1 and not exits:
        frame.text(_dump(node.values[0]))
        return lambda fills, force=False: ("value", node.values[0])
    span = max(len(a) for a in alts)
    holes = []
    for j in range(span):
        ids = [a[j] for a in alts if j < len(a)] + (list(exits) if j == 0 else [])
        mask = frame.ids_mask(ids, pad=any(len(a) <= j for a in alts))
        holes.append(frame.hole(1, mask, mask))

    def read(fills, force=False):
        got = [(fills[h] or [None])[0] for h in holes]
        if not force and got[0] in exits:
            return ("exit", got[0])
        scores = [sum(j < len(a) and a[j] == g for j, g in enumerate(got)) for a in alts]
        return ("value", node.values[int(np.argmax(scores))])

    return read


def _emit_text(frame: _Frame, node: Text, exits) -> Reader:
    gate = frame.opening('"', exits)
    parts = []
    if node.min_len:
        solid = frame.class_mask("string", pad=False)
        parts.append(frame.hole(node.min_len, solid, solid))
    if node.budget > node.min_len:
        loose = frame.class_mask("string")
        parts.append(frame.hole(node.budget - node.min_len, loose, loose))
    frame.text('"')

    def read(fills, force=False):
        hit = _gate(fills, gate, exits, force)
        if hit is not None:
            return ("exit", hit)
        text = "".join(frame.tokenizer.decode(fills[h]) for h in parts)
        if node.max_len is not None:
            text = text[: node.max_len]
        return ("value", text + " " * max(0, node.min_len - len(text)))

    return read


def _emit_num(frame: _Frame, node: Num, exits) -> Reader:
    first = frame.class_mask("sign_or_digit", extra=exits)
    rest = frame.class_mask("integer_rest" if node.integer else "number_rest")
    index = frame.hole(node.budget, first, rest)

    def read(fills, force=False):
        ids = fills[index]
        if not force and ids[:1] and ids[0] in exits:
            return ("exit", ids[0])
        text = frame.tokenizer.decode([i for i in ids if i not in exits])
        try:
            value = int(text) if node.integer else float(text)
        except ValueError:  # a lone "-" or "." : the nearest valid value
            value = 0
        if not node.integer and not math.isfinite(value):
            value = 0.0
        return ("value", _clamp(node, value))

    return read


def _clamp(node: Num, value):
    """`value` moved into the node's range (None if the range is empty)."""
    lo, hi = node.lo, node.hi
    if node.integer:
        if lo is not None:
            lo = math.floor(lo) + 1 if node.lo_open else math.ceil(lo)
        if hi is not None:
            hi = math.ceil(hi) - 1 if node.hi_open else math.floor(hi)
        value = int(value)
    else:
        if lo is not None and node.lo_open:
            lo = math.nextafter(lo, math.inf)
        if hi is not None and node.hi_open:
            hi = math.nextafter(hi, -math.inf)
        value = float(value)
    if lo is not None and hi is not None and lo > hi:
        return None
    if lo is not None and value < lo:
        value = lo
    if hi is not None and value > hi:
        value = hi
    return value


def _emit_obj(frame: _Frame, node: Obj, exits) -> Reader:
    gate = frame.opening("{", exits)
    readers = []
    for i, (key, sub) in enumerate(node.fields):
        frame.text(("," if i else "") + _dump(key) + ":")
        readers.append((key, emit(frame, sub)))
    frame.text("}")

    def read(fills, force=False):
        hit = _gate(fills, gate, exits, force)
        if hit is not None:
            return ("exit", hit)
        return ("value", {k: r(fills, False)[1] for k, r in readers})

    return read


def _emit_arr(frame: _Frame, node: Arr, exits) -> Reader:
    gate = frame.opening("[", exits)
    end = frame.token("]")
    readers = []
    for i in range(node.max_items):
        frame.text("," if i else "")
        readers.append(emit(frame, node.item, () if i < node.min_items else (end,)))
    frame.text("]")

    def read(fills, force=False):
        hit = _gate(fills, gate, exits, force)
        if hit is not None:
            return ("exit", hit)
        items = []
        for r in readers:
            kind, value = r(fills, False)
            if kind == "exit":
                break
            items.append(value)
        return ("value", items)

    return read


def _emit_union(frame: _Frame, node: Union_, exits) -> Reader:
    null = frame.token("null")
    readers = []
    for i, option in enumerate(node.options):
        # Each option behind its own gate: `null` there passes to the next option.
        readers.append(emit(frame, option, (exits if i == 0 else ()) + (null,)))

    def read(fills, force=False):
        for r in readers:
            kind, value = r(fills, False)
            if kind == "value":
                return ("value", value)
            if value != null:  # an outer exit (e.g. the array's "]") at the first gate
                if not force:
                    return ("exit", value)
                break
        if node.nullable:
            return ("value", None)
        return ("value", readers[0](fills, True)[1])

    return read


# ---------------------------------------------------------------------- public helpers


@dataclass
class JsonFrame:
    """A schema laid out as an infill template, and how to read its value back.

    Attributes:
        template: the `InfillTemplate` (prefix for the encoder, holes on the canvas);
            None when the schema allows one value only.
        node: the parsed schema.
    """

    template: Optional[InfillTemplate]
    node: Node
    _read: Reader

    def value(self, token_ids: Sequence[int]) -> Any:
        """The value the generated ids (for the template's layout) read as."""
        fills = hole_ids(self.template, token_ids) if self.template is not None else []
        return self._read(fills, False)[1]


def json_frame(tokenizer, schema: Dict[str, Any], limit: Optional[int] = None) -> JsonFrame:
    """The frame of a JSON Schema (see the module docstring).

    Args:
        tokenizer: the model's tokenizer.
        schema: the JSON Schema.
        limit: the most canvas positions the frame may take (the model's context).

    Raises:
        SchemaError: as `parse_schema`, or a frame larger than `limit`.
    """
    node = parse_schema(schema)
    size = frame_size(node, tokenizer)
    if limit is not None and size > limit:
        raise SchemaError(
            f"$: the schema's frame takes {size} tokens, more than the model's context of "
            f"{limit}; lower maxItems, x-max-items or x-max-tokens."
        )
    frame = _Frame(tokenizer)
    read = emit(frame, node)
    if not frame.holes:  # one value only (a const): nothing to generate
        return JsonFrame(None, node, read)
    template = InfillTemplate(tokenizer, frame.parts[0], frame.parts[1:])
    return JsonFrame(template, node, read)


def hole_ids(template: InfillTemplate, token_ids: Sequence[int]) -> List[List[int]]:
    """Each hole's generated ids, cut at its first `<pad>` or EOS."""
    out, pos = [], 0
    ids = [int(t) for t in token_ids]
    for part, part_ids in zip(template.parts, template.part_ids):
        if isinstance(part, str):
            pos += len(part_ids)
            continue
        slots = ids[pos : pos + part.budget]
        end = next((i for i, t in enumerate(slots) if t in template.fillers), len(slots))
        out.append(slots[:end])
        pos += part.budget
    return out


def generate_json(
    model,
    tokenizer,
    schema,
    *,
    messages: Optional[Sequence[Dict[str, Any]]] = None,
    **kwargs,
) -> Any:
    """Generate a value that validates against a JSON Schema or a pydantic model.

    As outlines' JSON generator: the schema's frame is clamped on the canvas and every
    reading of it is valid (module docstring), so there is no retry loop.

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        schema: a JSON Schema dict, or a pydantic model class (pydantic is imported only
            by the class itself).
        messages: chat messages that ask for the value; None for no instruction.
        kwargs: as for `stream_generate` (seed, sampler settings).

    Returns:
        The parsed value; an instance of the class for a pydantic model.

    Raises:
        SchemaError: a schema outside the subset, or too large for the context.
    """
    cls = None
    if isinstance(schema, type):
        if not hasattr(schema, "model_json_schema"):
            raise TypeError(f"{schema.__name__} is not a pydantic model; pass a JSON Schema dict.")
        cls, schema = schema, schema.model_json_schema()
    frame = json_frame(tokenizer, schema, model.args.max_position_embeddings)
    ids: List[int] = []
    if frame.template is not None:
        for r in stream_infill(model, tokenizer, frame.template, messages=messages, **kwargs):
            if r.kind == "commit":
                ids += r.token_ids
    value = frame.value(ids)
    return cls.model_validate(value) if cls is not None else value
