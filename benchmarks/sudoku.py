"""Sudoku step sweep: Google's recipe prompt, givens clamped, Google's metrics, any checkpoint.

    python -m benchmarks.sudoku --model PATH                      # the built-in puzzles
    python -m benchmarks.sudoku --model PATH --puzzles sudoku.csv --limit 200 --steps 12,48

For each denoising-step cap of the sweep, every puzzle is solved once (seed + puzzle index,
the same for every cap), and the table gives: exact accuracy, cell accuracy (correct empty
cells / 81, as Google computes it), blank accuracy (/ empty cells), givens preserved (all /
fraction), exact accuracy per hardness (easy >= 40 givens, medium 30-39, hard < 30), the
denoising steps used per canvas (mean; early stopping may end a canvas before the cap) and
output tokens per second (every output token, clamped ones included). See
`mlx_diffgemma/tasks/sudoku.py` for the prompt, layout and metrics.

--ar adds a row for the same weights decoded autoregressively by their own causal
encoder (greedy next token, no cache; the same clamped givens and digit limit; meant for
small models such as examples/sudoku_toy). 6x6 puzzles (36 cells) work as 9x9 ones.

A random checkpoint only exercises the mechanics: with clamping its givens are kept and its
grid frame holds; its digits are noise. Without --digits-only a free cell can take any token,
and a token with a digit in it shifts Google's "last 81 digits" extraction.
"""

import argparse
import dataclasses
import json
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from mlx_diffgemma import load
from mlx_diffgemma.diffusion.config import FAST_SETTINGS, DiffusionConfig
from mlx_diffgemma.tasks import sudoku as S

DEFAULT_STEPS = (1, 4, 12, 16, 48)


def sweep(
    model,
    tokenizer,
    puzzles: Sequence[Tuple[str, str]],
    steps: Sequence[int],
    *,
    style: str = "recipe",
    clamp: bool = True,
    digits_only: bool = False,
    seed: int = 0,
    verbose: bool = False,
    settings: Optional[Dict] = None,
) -> List[Dict]:
    """One row per step cap: the summary of `sudoku.summarize`, steps used and tok/s.
    `settings` are further sampler settings (e.g. fast mode's)."""
    rows = []
    for n in steps:
        scores, used, tokens, seconds = [], [], 0, 0.0
        for i, (puzzle, solution) in enumerate(puzzles):
            text, r = S.solve(
                model,
                tokenizer,
                puzzle,
                style=style,
                clamp=clamp,
                digits_only=digits_only,
                seed=seed + i,
                max_denoising_steps=n,
                **(settings or {}),
            )
            s = S.score(text, puzzle, solution)
            scores.append(s)
            used.append(sum(r.denoising_steps) / len(r.denoising_steps))
            tokens += r.generation_tokens
            seconds += r.generation_tokens / r.generation_tps if r.generation_tps else 0.0
            if verbose:
                print(f"[steps {n}] puzzle {i}: exact {s.exact:.0f}, cell {s.cell:.3f}: {text!r}")
        rows.append(
            {
                "steps": n,
                "metrics": S.summarize(scores, [p for p, _ in puzzles]),
                "steps_used": sum(used) / len(used),
                "tokens_per_second": tokens / seconds if seconds else 0.0,
            }
        )
    return rows


def ar_sweep(model, tokenizer, puzzles, *, style="recipe", clamp=True, digits_only=False):
    """The AR baseline row: greedy next-token decoding by the model's encoder."""
    import numpy as np

    from mlx_diffgemma.tuner.ar import ar_generate

    eos = tuple(model.generation_config.eos_token_id or ())
    scores, tokens, tic = [], 0, time.perf_counter()
    for puzzle, solution in puzzles:
        ids = S.prompt_ids(tokenizer, puzzle, style)
        n = S.answer_tokens(len(S.parse_grid(puzzle)), S.spaced_answer(style)) + 1
        fixed = allowed = None
        if clamp:
            lay = S.answer_layout(
                tokenizer,
                puzzle,
                model.args.canvas_length,
                model.args.vocab_size,
                eos[0],
                digits_only=digits_only,
                spaced=S.spaced_answer(style),
            )
            fixed = [i if f else None for i, f in zip(lay.ids, lay.fixed)][:n]
            if digits_only:
                row = np.nonzero(np.array(lay.token_masks[0]))[0].tolist()
                allowed = [None if f else row for f in lay.fixed[:n]]
        out = ar_generate(model, ids, n, eos, fixed, allowed)
        tokens += len(out)
        scores.append(S.score(tokenizer.decode(out), puzzle, solution))
    seconds = time.perf_counter() - tic
    return {
        "steps": "AR",
        "metrics": S.summarize(scores, [p for p, _ in puzzles]),
        "steps_used": 0.0,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
    }


def format_table(rows: List[Dict]) -> str:
    head = (
        f"{'steps':>5}  {'exact':>6}  {'cell':>6}  {'blank':>6}  {'givens':>6}  {'givens~':>7}  "
        f"{'exact easy/medium/hard':>22}  {'steps used':>10}  {'tok/s':>7}"
    )
    lines = [head]
    for r in rows:
        m = r["metrics"]
        strata = "/".join(
            f"{m[h]['exact']:.3f}" if m[h]["count"] else "-" for h in ("easy", "medium", "hard")
        )
        a = m["all"]
        lines.append(
            f"{r['steps']:>5}  {a['exact']:>6.3f}  {a['cell']:>6.3f}  {a['blank']:>6.3f}  "
            f"{a['givens_exact']:>6.3f}  {a['givens_partial']:>7.3f}  {strata:>22}  "
            f"{r['steps_used']:>10.1f}  {r['tokens_per_second']:>7.1f}"
        )
    return "\n".join(lines)


def _steps(value: str) -> List[int]:
    try:
        steps = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(
            f"--steps takes positive integers separated by commas, e.g. 1,4,12 (got {value!r})"
        )
    return steps


def _setting(text: str):
    """NAME=VALUE, the value read as a bool, int, float or else kept as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--set {text!r} is not NAME=VALUE; e.g. --set mode=fast.")
    if value in ("True", "true", "False", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="Checkpoint folder (base or fine-tuned).")
    p.add_argument("--adapter-path", help="An adapter folder (lora's or distill's) to apply.")
    p.add_argument("--puzzles", help="CSV with puzzle,solution columns [default: built-in 6].")
    p.add_argument("--limit", type=int, default=None, help="Use the first N puzzles.")
    p.add_argument(
        "--steps",
        type=_steps,
        default=list(DEFAULT_STEPS),
        help="Step caps [default: 1,4,12,16,48].",
    )
    p.add_argument(
        "--prompt-format",
        choices=S.PROMPT_STYLES,
        default="recipe",
        help="recipe: Google's SFT string (default); chat: the chat template.",
    )
    p.add_argument(
        "--no-clamp",
        action="store_true",
        help="Let the model write the whole grid (Google's eval) instead of clamping.",
    )
    p.add_argument("--digits-only", action="store_true", help="Limit empty cells to 1-9.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ar",
        action="store_true",
        help="Add the AR baseline: the same weights decoded by their encoder.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="A sampler setting (DiffusionConfig field), e.g. mode=fast or top_k=4; repeatable.",
    )
    p.add_argument("--json", help="Also write the rows to this JSON file.")
    p.add_argument("--verbose", action="store_true", help="Print every answer.")
    args = p.parse_args(argv)
    if args.digits_only and args.no_clamp:
        p.error("--digits-only needs the clamped grid; drop --no-clamp.")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1 (got {args.limit}).")
    try:
        settings = dict(_setting(kv) for kv in args.set)
        names = {f.name for f in dataclasses.fields(DiffusionConfig)} - {"fast"}
        unknown = set(settings) - names - set(FAST_SETTINGS) - {"mode"}
        if unknown:
            raise ValueError(f"--set {sorted(unknown)[0]}: not a sampler setting.")
        DiffusionConfig().replace(**settings)  # a bad value fails here, with its reason
        puzzles = S.load_puzzles(args.puzzles, args.limit) if args.puzzles else list(S.PUZZLES)
        model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    puzzles = puzzles[: args.limit]
    counts = {h: sum(S.hardness(q) == h for q, _ in puzzles) for h in ("easy", "medium", "hard")}
    mode = "model writes the grid" if args.no_clamp else "givens clamped"
    mode += ", digits only" if args.digits_only else ""
    print(
        f"Sudoku: {len(puzzles)} puzzles (easy {counts['easy']}, medium {counts['medium']}, "
        f"hard {counts['hard']}) | prompt {args.prompt_format} | {mode} | "
        f"canvas {model.args.canvas_length} | seed {args.seed} | {args.model}"
        + "".join(f" | {k}={v}" for k, v in settings.items())
    )
    tic = time.perf_counter()
    rows = sweep(
        model,
        tokenizer,
        puzzles,
        args.steps,
        style=args.prompt_format,
        clamp=not args.no_clamp,
        digits_only=args.digits_only,
        seed=args.seed,
        verbose=args.verbose,
        settings=settings,
    )
    if args.ar:
        rows.append(
            ar_sweep(
                model,
                tokenizer,
                puzzles,
                style=args.prompt_format,
                clamp=not args.no_clamp,
                digits_only=args.digits_only,
            )
        )
    print(format_table(rows))
    print(f"({time.perf_counter() - tic:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
