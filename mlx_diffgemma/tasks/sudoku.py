"""Sudoku on a clamped canvas: the release's prompt, the givens clamped, Google's metrics.

Prompt: Google's SFT recipe (google-deepmind/gemma `hackable_diffusion_adapter`,
`data/sudoku/sudoku_data.py` `_DEFAULT_SUDOKU_PROMPT`) is a literal string, tokenized with
`<bos>` and not through the chat template; its turns have a space, not a line break,
after the role. Fine-tuned checkpoints saw exactly that ("recipe"); "chat" renders the
same system text and puzzle with the checkpoint's chat template instead. The answer is
the 81 digits separated by single spaces, then EOS.

Layout: Gemma 4 tokenizes each digit and each separating space as one token, so the
answer is 161 tokens: cell i at position 2 i, a space between cells. With clamping, the
givens, the spaces, the EOS after the grid and the padding after it are fixed; only
the empty cells are free (optionally limited to the digits 1-9).

Metrics (`eval/sudoku_eval.py` of the same recipe): the last 81 digits of the output are
the answer (None when there are fewer). Exact accuracy: the answer equals the solution.
Cell accuracy: correctly filled empty cells / 81 (Google divides by 81, so a perfect
answer scores (81 - givens) / 81); blank accuracy divides by the empty cells instead.
Givens preserved: all givens kept (exact), or the kept fraction (partial). Each is
averaged per hardness: easy >= 40 givens, medium 30-39, hard < 30.

6x6 grids (2x3 boxes, 36 cells, for toy models) work the same way: 71 answer tokens,
digits 1-6, hardness bins at the same fractions of the cells (easy >= 18 givens,
medium 14-17, hard < 14). The toy style ("toy") is compact on both sides: the prompt is
`<bos>`, the grid's digits with no spaces and `|`, and the answer is the 36 digits with
no spaces, then EOS (cell i at canvas position i). Short sequences keep toy training
cheap, and prompt cell i and answer cell i then sit a constant distance apart, which
rotary attention learns far more easily than the recipe's 2 i spacing.
"""

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..diffusion.canvas import CanvasLayout
from ..generate import GenerationResponse, resolve_config, stream_generate

SYSTEM_PROMPT = (
    "Solve the following Sudoku puzzle. Empty cells are represented by 0. Output ONLY the "
    "solved puzzle immediately as a 9x9 grid of numbers separated by spaces. Do not include "
    "####, explanations, or any other text."
)
RECIPE_PROMPT = (
    "<|turn>system " + SYSTEM_PROMPT + "<turn|>\n<|turn>user {puzzle}<turn|>\n<|turn>model\n"
)
PROMPT_STYLES = ("recipe", "chat", "toy")
ANSWER_TOKENS = 161  # 81 digits and 80 spaces
SIZES = {81: 9, 36: 6}  # cells -> digits (9x9, and 6x6 with 2x3 boxes)


def answer_tokens(cells: int, spaced: bool = True) -> int:
    """Tokens of a grid's answer: digits and separating spaces (or digits only)."""
    return 2 * cells - 1 if spaced else cells


def spaced_answer(style: str) -> bool:
    """Whether answers in prompt `style` separate cells with spaces (all but "toy")."""
    return style != "toy"


# Hand-made puzzles with unique solutions (two per hardness), for runs without a dataset.
PUZZLES: Tuple[Tuple[str, str], ...] = (
    (
        "800159203490800675350000981010082460024016809600004100046070398000000714073000526",
        "867159243491823675352467981915382467724516839638794152546271398289635714173948526",
    ),
    (
        "014290056005007120002010794000000071031000560400560008150079040000154387047326000",
        "714293856695487123382615794568932471231748569479561238153879642926154387847326915",
    ),
    (
        "030000027600000009087520040460000000700084305009207468010003076590702801000009054",
        "135498627642371589987526143468935712721684395359217468214853976596742831873169254",
    ),
    (
        "400709200005000060670023000080300000063901005920600010300007001007080500000130972",
        "418769253235814769679523148581372496763941825924658317352497681197286534846135972",
    ),
    (
        "000362040040007001500400200200006190000019000809000000000908025007020604005003000",
        "198362547342587961576491283254736198763819452819254376631948725987125634425673819",
    ),
    (
        "060000040000100800000040920120000007703000004040080000300001500015070032000509000",
        "562893741497162853831745926128354697753916284649287315386421579915678432274539168",
    ),
)


@dataclass(frozen=True)
class Score:
    """Metrics of one answer (0 everywhere when no 81 digits could be extracted)."""

    exact: float
    cell: float
    blank: float
    givens_exact: float
    givens_partial: float


def parse_grid(grid: str) -> str:
    """The 81-character digit string of a grid given as 81 digits (`0` or `.` empty),
    with or without separating whitespace.

    Raises:
        ValueError: not 81 cells.
    """
    cells = "".join(grid.split()).replace(".", "0")
    if len(cells) not in SIZES or not cells.isdigit():
        raise ValueError(
            f"A Sudoku grid needs 81 digits (or 36 for 6x6; 0 or . for empty), got {grid[:30]!r}... "
            f"({len(cells)} cells)."
        )
    return cells


def format_grid(grid: str, spaced: bool = True) -> str:
    """The answer's text form: the digits separated by single spaces (the recipe's), or
    the bare digits (`spaced=False`, the toy style's)."""
    return (" " if spaced else "").join(parse_grid(grid))


def givens(puzzle: str) -> int:
    return sum(c != "0" for c in parse_grid(puzzle))


def hardness(puzzle: str) -> str:
    """ "easy" (>= 40 givens), "medium" (30-39) or "hard" (< 30), as Google's eval bins
    (6x6: the same fractions of 36 cells, 18 and 14)."""
    n, cells = givens(puzzle), len(parse_grid(puzzle))
    return "easy" if n * 81 >= 40 * cells else "medium" if n * 81 >= 30 * cells else "hard"


def extract(text: str, cells: int = 81) -> Optional[str]:
    """The last `cells` digits of `text`, or None if it has fewer."""
    digits = re.findall(r"[0-9]", text)
    return "".join(digits[-cells:]) if len(digits) >= cells else None


def score(text: str, puzzle: str, solution: str) -> Score:
    """Score one output against its puzzle and solution (see the module docstring)."""
    puzzle, solution = parse_grid(puzzle), parse_grid(solution)
    cells = len(puzzle)
    answer = extract(text, cells)
    if answer is None:
        return Score(0.0, 0.0, 0.0, 0.0, 0.0)
    blanks = [i for i in range(cells) if puzzle[i] == "0"]
    given = [i for i in range(cells) if puzzle[i] != "0"]
    filled = sum(answer[i] == solution[i] for i in blanks)
    kept = sum(answer[i] == puzzle[i] for i in given)
    return Score(
        exact=float(answer == solution),
        cell=filled / cells,
        blank=filled / len(blanks) if blanks else 1.0,
        givens_exact=float(kept == len(given)),
        givens_partial=kept / len(given) if given else 1.0,
    )


def summarize(scores: Sequence[Score], puzzles: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean metrics over all puzzles and per hardness, with the count of each group."""
    groups: Dict[str, List[Score]] = {"all": [], "easy": [], "medium": [], "hard": []}
    for s, p in zip(scores, puzzles):
        groups["all"].append(s)
        groups[hardness(p)].append(s)
    out = {}
    for name, group in groups.items():
        row = {"count": float(len(group))}
        for field in Score.__dataclass_fields__:
            values = [getattr(s, field) for s in group]
            row[field] = sum(values) / len(values) if values else 0.0
        out[name] = row
    return out


def load_puzzles(path, limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """(puzzle, solution) pairs from a CSV with `puzzle,solution` columns (Kaggle's
    sudoku.csv; `quizzes,solutions` is accepted too).

    Raises:
        ValueError: missing columns or a malformed grid (the row is named).
    """
    out = []
    with open(Path(path), newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        names = next(
            (n for n in (("puzzle", "solution"), ("quizzes", "solutions")) if set(n) <= cols), None
        )
        if names is None:
            raise ValueError(f"{path} needs 'puzzle' and 'solution' columns (got {sorted(cols)}).")
        for i, row in enumerate(reader):
            if limit is not None and len(out) >= limit:
                break
            try:
                out.append((parse_grid(row[names[0]]), parse_grid(row[names[1]])))
            except ValueError as e:
                raise ValueError(f"{path}, data row {i + 1}: {e}") from None
    if not out:
        raise ValueError(f"{path} has no puzzles.")
    return out


def prompt_ids(tokenizer, puzzle: str, style: str = "recipe") -> List[int]:
    """Encoder ids of the prompt for `puzzle` ("recipe" or "chat"; module docstring)."""
    text = format_grid(puzzle)
    if style == "recipe":
        return [tokenizer.bos_token_id] + tokenizer.encode(RECIPE_PROMPT.format(puzzle=text))
    if style == "chat":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if style == "toy":
        return [tokenizer.bos_token_id] + tokenizer.encode(parse_grid(puzzle) + "|")
    raise ValueError(f"Unknown prompt style {style!r}; use one of {PROMPT_STYLES}.")


def _grid_ids(tokenizer) -> Tuple[Dict[str, int], int]:
    digits = {d: tokenizer.encode(d) for d in "0123456789"}
    space = tokenizer.encode(" ")
    if any(len(v) != 1 for v in digits.values()) or len(space) != 1:
        raise ValueError("This tokenizer does not give one token per digit and per space.")
    return {d: v[0] for d, v in digits.items()}, space[0]


def answer_layout(
    tokenizer,
    puzzle: str,
    canvas_length: int,
    vocab_size: int,
    end_id: int,
    *,
    digits_only: bool = False,
    spaced: bool = True,
) -> CanvasLayout:
    """The clamped answer: givens, spaces, `end_id` and padding fixed; empty cells free.

    Args:
        tokenizer: the model's tokenizer.
        puzzle: the grid (81 digits, 0 = empty).
        canvas_length: the model's canvas length.
        vocab_size: the model's vocabulary size.
        end_id: the token after the grid (an EOS id of the generation config).
        digits_only: limit the empty cells to the tokens 1-9.
        spaced: cells separated by spaces (the recipe's answer) or adjacent (the toy's).

    Raises:
        ValueError: a malformed grid, or a tokenizer that does not give one token per
            cell and per space (the layout would not match how the model writes a grid).
    """
    puzzle = parse_grid(puzzle)
    digit, space = _grid_ids(tokenizer)
    expected = tokenizer.encode(format_grid(puzzle, spaced))
    ids, fixed = [], []
    for i, c in enumerate(puzzle):
        if i and spaced:
            ids.append(space)
            fixed.append(True)
        ids.append(digit[c])
        fixed.append(c != "0")
    if ids != expected:
        raise ValueError("This tokenizer does not write a grid as one token per cell and space.")
    answer = answer_tokens(len(puzzle), spaced)
    n = math.ceil((answer + 1) / canvas_length) * canvas_length
    ids += [end_id] + [tokenizer.pad_token_id] * (n - answer - 1)
    fixed += [True] * (n - answer)
    if not digits_only:
        return CanvasLayout(tuple(ids), tuple(fixed))
    mask = np.zeros((1, vocab_size), dtype=bool)
    mask[0, [digit[str(d)] for d in range(1, SIZES[len(puzzle)] + 1)]] = True
    classes = tuple(-1 if f else 0 for f in fixed)
    return CanvasLayout(tuple(ids), tuple(fixed), (), classes, mx.array(mask))


def solve(
    model,
    tokenizer,
    puzzle: str,
    *,
    style: str = "recipe",
    clamp: bool = True,
    digits_only: bool = False,
    **kwargs,
) -> Tuple[str, GenerationResponse]:
    """Generate an answer for `puzzle`.

    Args:
        model: a loaded model.
        tokenizer: its tokenizer.
        puzzle: the grid.
        style: "recipe", "chat" or "toy" prompt (the toy's answer has no spaces).
        clamp: clamp the givens and the grid's frame (else the model writes everything
            on ceil(162 / canvas_length) canvases, as Google's eval does).
        digits_only: with `clamp`, limit the empty cells to 1-9.
        kwargs: as for `stream_generate` (seed, max_denoising_steps, config, ...).

    Returns:
        `(text, last response)`.
    """
    if digits_only and not clamp:
        raise ValueError("digits_only needs clamp: the cells have no fixed positions otherwise.")
    C = model.args.canvas_length
    ids = prompt_ids(tokenizer, puzzle, style)
    if clamp:
        eos = kwargs.get("eos_token_id") or resolve_config(model, kwargs.get("config")).eos_token_id
        eos = tuple(eos or ())
        if not eos:
            raise ValueError("Clamping the grid needs an EOS id to put after it; set eos_token_id.")
        end = eos[0]
        if style == "chat":
            turn_end = tokenizer.encode("<turn|>")
            end = turn_end[0] if len(turn_end) == 1 and turn_end[0] in eos else end
        kwargs["layout"] = answer_layout(
            tokenizer,
            puzzle,
            C,
            model.args.vocab_size,
            end,
            digits_only=digits_only,
            spaced=spaced_answer(style),
        )
    else:
        answer = answer_tokens(len(parse_grid(puzzle)), spaced_answer(style))
        kwargs.setdefault("max_tokens", math.ceil((answer + 1) / C) * C)
    text, last = [], None
    for last in stream_generate(model, tokenizer, ids, **kwargs):
        if last.kind == "commit":
            text.append(last.text)
    return "".join(text), last
