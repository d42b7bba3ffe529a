"""Infill and edit-in-place: text with holes becomes an encoder prompt plus a canvas layout.

Hole syntax, in the text to complete:

- `[[hole]]`: a gap of `hole_tokens` tokens (default 32) for the model to fill.
- `[[hole:N]]`: a gap of N tokens.
- `[[edit]]old text[[/edit]]`: a region that starts as `old text` and may change (its
  canvas positions are seeded, not fixed); it has as many tokens as `old text`.
- `[[edit:N]]old text[[/edit]]`: the same region with N tokens (N >= those of the old
  text; the extra ones start as noise).

Everything before the first hole or edit is the prefix: it goes to the encoder, after the
chat-rendered `messages` if any (then the canvas is the start of the model's answer).
From the first hole on, the text is laid out on the canvas: hole and edit slots are free,
the text between them is clamped, token for token, and the canvas after the text is
clamped to one end token (`<turn|>` after chat messages, `<eos>` otherwise) and `<pad>`.

Budgets: a hole has exactly its number of canvas slots, and the model writes into all of
them. A `<pad>` or EOS id that it writes ends the fill: that slot and the rest of the
hole are dropped, so a fill may be shorter than its budget but never longer. Pick a
budget near the expected length; the model may pad a short answer with more words.

Longer than a canvas: the layout continues on the next canvas (clamps per canvas), so a
hole may have more tokens than `canvas_length`. A canvas sees the prefix and the canvases
before it, never the ones after it: a hole's fill sees the fixed text up to the end of
the canvas that holds it. Fixed text after the last canvas that holds a free slot is not
generated at all; it is appended as is. The prompt plus the canvases must fit the
model's context (`max_position_embeddings`), or generation raises a ValueError.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..diffusion.canvas import CanvasLayout
from ..generate import GenerationResponse, stream_generate

DEFAULT_HOLE_TOKENS = 32

_MARKUP = re.compile(
    r"\[\[hole(?::(?P<hole>\d+))?\]\]"
    r"|\[\[edit(?::(?P<edit>\d+))?\]\](?P<seed>.*?)\[\[/edit\]\]",
    re.S,
)
# What is left of a marker after the well-formed ones are taken out.
_STRAY = re.compile(r"\[\[/?(?:hole|edit)\b[^\]]*\]?\]?")


@dataclass(frozen=True)
class Hole:
    """A free region of the canvas.

    Attributes:
        budget: canvas slots (tokens) of the region.
        seed: edit regions: the text the slots start from ("" for a plain hole).
        first: (V,) bool, the tokens allowed in the first slot; None for any token.
        rest: (V,) bool, the tokens allowed in the other slots; None for any token.
    """

    budget: int
    seed: str = ""
    first: Optional[Any] = field(default=None, repr=False, compare=False)
    rest: Optional[Any] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"A hole needs a budget of at least 1 token (got {self.budget!r}).")


Part = Union[str, Hole]


@dataclass(frozen=True)
class InfillResult:
    """A completed infill.

    Attributes:
        text: the whole text: prefix, fixed text and fills, with the markup replaced.
        fills: the text each hole or edit region got, in order.
        response: the last `GenerationResponse` (statistics, seed, finish reason).
    """

    text: str
    fills: Tuple[str, ...]
    response: GenerationResponse


class InfillTemplate:
    """Text with holes, tokenized once: the prefix for the encoder, the parts for the canvas.

    Args:
        tokenizer: the model's tokenizer.
        prefix: text for the encoder (after the chat turn, if any).
        parts: fixed strings and `Hole`s, in order, from the canvas start on.

    Raises:
        ValueError: no hole, or a fixed string that does not decode back to itself
            (it could not be reproduced byte for byte), or an edit seed over its budget.
    """

    def __init__(self, tokenizer, prefix: str, parts: Sequence[Part]):
        parts = [p for p in parts if not (isinstance(p, str) and not p)]
        if not any(isinstance(p, Hole) for p in parts):
            raise ValueError(
                "The text has no [[hole]] or [[edit]]...[[/edit]]; "
                "add one where the model should write."
            )
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.parts = parts
        self.fillers = {tokenizer.pad_token_id, *tokenizer.eos_token_ids}
        self.part_ids: List[List[int]] = []  # per part: its ids (fixed text, edit seeds)
        for p in parts:
            if isinstance(p, str):
                ids = tokenizer.encode(p)
                back = tokenizer.decode(ids)
                if back != p:
                    raise ValueError(
                        f"The fixed text {_clip(p)} decodes as {_clip(back)} after tokenization, "
                        "so it cannot be kept byte for byte; change or remove it."
                    )
            else:
                ids = tokenizer.encode(p.seed) if p.seed else []
                if len(ids) > p.budget:
                    raise ValueError(
                        f"The edit {_clip(p.seed)} is {len(ids)} tokens, more than its budget of "
                        f"{p.budget}; write [[edit:{len(ids)}]] or more."
                    )
            self.part_ids.append(ids)

    @classmethod
    def parse(
        cls, tokenizer, text: str, hole_tokens: int = DEFAULT_HOLE_TOKENS
    ) -> "InfillTemplate":
        """Read the hole syntax of the module docstring.

        Args:
            tokenizer: the model's tokenizer.
            text: text with `[[hole]]`, `[[hole:N]]` and `[[edit(:N)]]...[[/edit]]` markup.
            hole_tokens: the budget of a `[[hole]]` without N.

        Returns:
            The template.

        Raises:
            ValueError: malformed or missing markup, a zero budget, or as `InfillTemplate`.
        """
        parts: List[Part] = []
        pos = 0
        for m in _MARKUP.finditer(text):
            _check_stray(text[pos : m.start()], pos)
            parts.append(text[pos : m.start()])
            if m.group(0).startswith("[[hole"):
                parts.append(Hole(_budget(m.group("hole"), hole_tokens, m.group(0))))
            else:
                seed = m.group("seed")
                if _STRAY.search(seed):
                    raise ValueError(
                        f"Markup inside [[edit]]...[[/edit]] at character {m.start()}; "
                        "holes and edits cannot nest."
                    )
                n = len(tokenizer.encode(seed)) if seed else 0
                budget = _budget(m.group("edit"), max(n, 1), m.group(0))
                parts.append(Hole(budget, seed=seed))
            pos = m.end()
        _check_stray(text[pos:], pos)
        parts.append(text[pos:])
        # The text before the first hole is the prefix: it goes to the encoder.
        prefix = parts.pop(0)
        return cls(tokenizer, prefix, parts)

    @property
    def holes(self) -> List[Hole]:
        return [p for p in self.parts if isinstance(p, Hole)]

    def prompt_ids(self, messages: Optional[Sequence[Dict[str, Any]]] = None) -> List[int]:
        """Encoder ids: `<bos>` + prefix, or the rendered chat turn + prefix."""
        if messages:
            head = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        else:
            head = [self.tokenizer.bos_token_id]
        return head + self.prefix_ids()

    def prefix_ids(self) -> List[int]:
        """Ids of the prefix alone."""
        return self.tokenizer.encode(self.prefix) if self.prefix else []

    def positions(self, canvas_length: int) -> int:
        """Canvas positions of the layout: whole canvases up to the last free slot."""
        last_free, pos = 0, 0
        for part, part_ids in zip(self.parts, self.part_ids):
            size = len(part_ids) if isinstance(part, str) else part.budget
            if not isinstance(part, str):
                last_free = pos + size - 1
            pos += size
        return math.ceil((last_free + 1) / canvas_length) * canvas_length

    def end_id(self, chat: bool) -> int:
        """The token clamped after the text: `<turn|>` after a chat turn, else the first EOS."""
        if chat:
            ids = self.tokenizer.encode("<turn|>")
            if len(ids) == 1:
                return ids[0]
        return self.tokenizer.eos_token_ids[0]

    def layout(self, canvas_length: int, end_id: int, vocab_size: int) -> CanvasLayout:
        """The canvas layout: fixed text clamped, holes free, edits seeded, end token after.

        Only the canvases up to the last free slot are laid out; the fixed text after
        them is appended by `complete`.
        """
        C = canvas_length
        ids, fixed, seeded, classes, masks = [], [], [], [], []
        for part, part_ids in zip(self.parts, self.part_ids):
            if isinstance(part, str):
                ids += part_ids
                fixed += [True] * len(part_ids)
                seeded += [False] * len(part_ids)
                classes += [-1] * len(part_ids)
                continue
            ids += part_ids + [0] * (part.budget - len(part_ids))
            fixed += [False] * part.budget
            seeded += [True] * len(part_ids) + [False] * (part.budget - len(part_ids))
            for i in range(part.budget):
                mask = part.first if i == 0 else part.rest
                classes.append(-1 if mask is None else _index(masks, mask))
        n = self.positions(C)
        if len(ids) < n:  # room left: the text ends here, then padding
            pad = self.tokenizer.pad_token_id
            extra = n - len(ids)
            ids += [end_id] + [pad] * (extra - 1)
            fixed += [True] * extra
            seeded += [False] * extra
            classes += [-1] * extra
        token_masks = _stack(masks, vocab_size) if masks else None
        return CanvasLayout(
            tuple(ids[:n]),
            tuple(fixed[:n]),
            tuple(seeded[:n]),
            tuple(classes[:n]) if token_masks is not None else (),
            token_masks,
        )

    def complete(self, token_ids: Sequence[int]) -> Tuple[str, Tuple[str, ...]]:
        """The completed text and the fills, from the generated canvas ids.

        Args:
            token_ids: the ids generated for the layout, from its first position.

        Returns:
            `(text, fills)`.

        Raises:
            ValueError: `token_ids` do not hold the fixed text where the layout put it.
        """
        out, fills, pos = [self.prefix], [], 0
        token_ids = [int(t) for t in token_ids]
        for part, part_ids in zip(self.parts, self.part_ids):
            if isinstance(part, str):
                got = token_ids[pos : pos + len(part_ids)]
                if got != part_ids[: len(got)]:
                    raise ValueError(
                        f"token_ids do not hold the fixed text {_clip(part)} at position {pos}; "
                        "pass the ids generated for this template's layout."
                    )
                out.append(part)
                pos += len(part_ids)
                continue
            slots = token_ids[pos : pos + part.budget]
            end = next((i for i, t in enumerate(slots) if t in self.fillers), len(slots))
            fill = self.tokenizer.decode(slots[:end])
            fills.append(fill)
            out.append(fill)
            pos += part.budget
        return "".join(out), tuple(fills)


def stream_infill(
    model,
    tokenizer,
    template: InfillTemplate,
    *,
    messages: Optional[Sequence[Dict[str, Any]]] = None,
    head: Optional[Sequence[int]] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream the generation of an infill template, as `stream_generate` does.

    EOS does not stop an infill (the canvases are known); the commits' `token_ids` join
    into the ids that `template.complete` turns into the completed text.

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        template: an `InfillTemplate`.
        messages: chat messages that come before the text (e.g. an instruction); None
            for plain text after `<bos>`.
        head: instead of `messages`, the encoder ids before the prefix, rendered by the
            caller (e.g. a conversation with tools, ending in an open model turn).
        kwargs: as for `stream_generate` (seed, drafts, config, sampler settings, ...).

    Yields:
        `GenerationResponse`s.
    """
    chat = bool(messages) or head is not None
    layout = template.layout(model.args.canvas_length, template.end_id(chat), model.args.vocab_size)
    # The layout's canvases are all there is to generate: a larger max_tokens would add
    # free canvases after the text, whose ids `complete` cannot place.
    if kwargs.get("max_tokens") is None or kwargs["max_tokens"] > len(layout):
        kwargs["max_tokens"] = len(layout)
    yield from stream_generate(
        model,
        tokenizer,
        template.prompt_ids(messages) if head is None else list(head) + template.prefix_ids(),
        layout=layout,
        eos_token_id=(),
        **kwargs,
    )


def infill(
    model,
    tokenizer,
    text: Union[str, InfillTemplate],
    *,
    messages: Optional[Sequence[Dict[str, Any]]] = None,
    hole_tokens: int = DEFAULT_HOLE_TOKENS,
    **kwargs,
) -> InfillResult:
    """Fill the holes of `text` (syntax in the module docstring) and return the whole text.

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        text: text with hole markup, or an `InfillTemplate`.
        messages: chat messages before the text, e.g.
            `[{"role": "user", "content": "Complete the function."}]`; None for plain text.
        hole_tokens: the budget of a `[[hole]]` without an explicit one.
        kwargs: as for `stream_generate` (seed, config, sampler settings, prompt_cache).

    Returns:
        An `InfillResult`; fixed text in it is byte-identical to the input.

    Raises:
        ValueError: malformed markup, text that cannot be kept exactly, or a prompt plus
            canvases longer than the model's context.
    """
    if isinstance(text, str):
        text = InfillTemplate.parse(tokenizer, text, hole_tokens)
    ids, last = [], None
    for last in stream_infill(model, tokenizer, text, messages=messages, **kwargs):
        if last.kind == "commit":
            ids += last.token_ids
    full, fills = text.complete(ids)
    return InfillResult(full, fills, last)


def _budget(value: Optional[str], default: int, marker: str) -> int:
    n = default if value is None else int(value)
    if n < 1:
        raise ValueError(f"{marker} has a budget of {n} tokens; give at least 1.")
    return n


def _check_stray(chunk: str, offset: int):
    m = _STRAY.search(chunk)
    if m is None:
        return
    at, marker = offset + m.start(), m.group(0)
    if re.fullmatch(r"\[\[edit(?::\d+)?\]\]", marker):
        raise ValueError(
            f"{marker} at character {at} is not closed; end the region with [[/edit]]."
        )
    if marker == "[[/edit]]":
        raise ValueError(f"[[/edit]] at character {at} closes no [[edit]]; remove it.")
    raise ValueError(
        f"Malformed markup {_clip(marker)} at character {at}; write [[hole]], [[hole:N]] "
        "or [[edit]]old text[[/edit]]."
    )


def _index(masks: list, mask) -> int:
    for i, m in enumerate(masks):
        if m is mask:
            return i
    masks.append(mask)
    return len(masks) - 1


def _stack(masks: list, vocab_size: int) -> mx.array:
    # A tokenizer may have fewer ids than the model's vocabulary: those stay disallowed.
    out = np.zeros((len(masks), vocab_size), dtype=bool)
    for k, m in enumerate(masks):
        m = np.asarray(m, dtype=bool)
        if m.shape[0] > vocab_size:
            raise ValueError(
                f"A token mask has {m.shape[0]} entries; the model's vocabulary has {vocab_size}."
            )
        out[k, : m.shape[0]] = m
    return mx.array(out)


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")
