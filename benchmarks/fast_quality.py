"""Fast mode's quality: each approximation alone and combined, against exact mode.

    python -m benchmarks.fast_quality --model PATH [PATH ...] [--limit 100] [--steps 48]

With `--data FILE.jsonl` (mlx-lm's chat, completions or text format, read as the trainer
reads it; e.g. the LoRA demo's test set) a model is scored on exact match: the output up
to EOS equal to the answer's ids ("exact"). Else, a model folder with a `test.csv`
(`puzzle,solution`, e.g. the trainer's Sudoku toy) is scored on the task: its toy prompt (`<bos>`, the grid's digits, `|`), the model writes the
grid; "solved" is the fraction of puzzles whose last digits equal the solution, "cells"
the fraction of empty cells filled right. Any other model (e.g. a random shape or tiny
checkpoint) is scored by agreement with exact mode's output for the same seed (the
fraction of output tokens equal); on a random model that only says how far each setting
moves the output, not whether it is worse. All prompts of a model run as one batch
unless --batch-size.

Columns: setting, the metric, mean denoising steps (forwards) and canvas positions
forwarded per row and canvas, wall s.
"""

import argparse
import csv
import re
import sys
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.bench_generate import with_top_k
from mlx_diffgemma import load
from mlx_diffgemma.diffusion.steps import Block, generate_step
from mlx_diffgemma.generate import resolve_config
from mlx_diffgemma.tuner.data import load_jsonl

OFF = dict(mode="fast", top_k=0, self_conditioning_top_k=0, monotone_commit=False, canvas_shrink=0)
M = {"mode": "fast", "monotone_commit": True}  # fast mode with monotone commit
SETTINGS = {
    "exact": {},
    "top_k=64": {**OFF, "top_k": 64},
    "self_conditioning_top_k=64": {**OFF, "self_conditioning_top_k": 64},
    "monotone_commit": {**OFF, "monotone_commit": True},
    "commit_rule=confidence": {**OFF, "commit_rule": "confidence"},
    "canvas_shrink=64": {**OFF, "canvas_shrink": 64},
    "repair=1": {**OFF, "repair": 1},
    "monotone + commit_argmax": {**OFF, "monotone_commit": True, "commit_argmax": True},
    "monotone + commit_stable": {**OFF, "monotone_commit": True, "commit_stable": True},
    "fast (default)": {"mode": "fast"},
    "fast + confidence": {"mode": "fast", "commit_rule": "confidence"},
    "fast + monotone (M)": M,
    "M + confidence": {**M, "commit_rule": "confidence"},
    "M + commit_argmax": {**M, "commit_argmax": True},
    "M + commit_stable": {**M, "commit_stable": True},
    "M + stable + argmax": {**M, "commit_stable": True, "commit_argmax": True},
    "M + compact": {**M, "compact": True},
    "M + stable + compact": {**M, "commit_stable": True, "compact": True},
    "M + repair": {**M, "repair": 1},
    "M + repair=2": {**M, "repair": 2},
    "M + compact + repair": {**M, "compact": True, "repair": 1},
    "M + stable + repair": {**M, "commit_stable": True, "repair": 1},
    "M + stable + compact + repair": {**M, "commit_stable": True, "compact": True, "repair": 1},
}


def read_csv(path: Path, limit: int):
    with open(path, newline="") as f:
        rows = [(r["puzzle"], r["solution"]) for r in csv.DictReader(f)]
    return rows[:limit]


def run(model, prompts, config, seed, batch_size):
    """Generated ids (B, T), mean forwards and positions forwarded per row and canvas;
    prompts in batches of `batch_size` (seeds seed, seed + 1, ...)."""
    tokens, forwards, positions = [], 0.0, 0.0
    for i in range(0, len(prompts), batch_size):
        batch = mx.array(prompts[i : i + batch_size])
        key = mx.random.key(seed + i // batch_size)
        blocks = [
            e for e in generate_step(batch, model, config=config, key=key) if isinstance(e, Block)
        ]
        tokens.append(mx.concatenate([b.tokens for b in blocks], axis=1))
        last = blocks[-1]
        forwards += last.decoder_forwards.astype(mx.float32).sum().item() / len(blocks)
        positions += last.positions_forwarded.astype(mx.float32).sum().item() / len(blocks)
    return mx.concatenate(tokens), forwards / len(prompts), positions / len(prompts)


def sudoku_metric(tokenizer, tokens, puzzles):
    solved = cells = 0.0
    for row, (puzzle, solution) in zip(tokens.tolist(), puzzles):
        digits = "".join(re.findall(r"[0-9]", tokenizer.decode(row)))[-len(solution) :]
        blanks = [i for i, c in enumerate(puzzle) if c in "0."]
        solved += digits == solution
        if len(digits) == len(solution):
            cells += sum(digits[i] == solution[i] for i in blanks) / max(len(blanks), 1)
    return {"solved": solved / len(puzzles), "cells": cells / len(puzzles)}


def exact_metric(tokens, eos, answers):
    """Fraction of rows whose ids up to the first EOS equal the answer's ids ("exact"),
    and of answer ids matched position by position ("tokens")."""
    hits = matched = 0
    for row, want in zip(tokens.tolist(), answers):
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        hits += row[:end] == want
        matched += sum(a == b for a, b in zip(row[:end], want)) / len(want)
    return {"exact": hits / len(answers), "tokens": matched / len(answers)}


def settings(k: int):
    """SETTINGS with `k` for the two top-k settings (e.g. below a toy's vocabulary)."""
    return {
        name.replace("top_k=64", f"top_k={k}"): with_top_k(kw, k) for name, kw in SETTINGS.items()
    }


def evaluate(path: Path, a):
    model, tokenizer = load(path)
    test = path / "test.csv"
    completions = None
    if a.data:
        examples = load_jsonl(a.data, tokenizer)[: a.limit]
        prompts, completions = [e.prompt for e in examples], [e.answer for e in examples]
        puzzles = None
        kind = f"exact match, {len(prompts)} examples of {a.data}"
    elif test.exists():
        puzzles = read_csv(test, a.limit)
        bos = tokenizer.bos_token_id
        prompts = [[bos] + tokenizer.encode(p.replace(".", "0") + "|") for p, _ in puzzles]
        kind = f"Sudoku, {len(puzzles)} puzzles of {path / 'test.csv'}"
    else:
        V = model.args.vocab_size
        prompts = [
            [2] + [(7919 * i + 13 * b) % (V - 1000) + 1000 for i in range(15)]
            for b in range(a.limit)
        ]
        puzzles = None
        kind = f"agreement with exact mode, {a.limit} prompts (random model: not a quality)"
    batch = a.batch_size or len(prompts)
    print(
        f"\n## {path}: {kind}, batch {batch}, steps {a.steps or 'of the checkpoint'}, "
        f"seed {a.seed}, k {a.k}"
    )
    print(f"{'setting':28} {'metric':34} {'fwd/canvas':>10} {'pos/canvas':>10} {'wall s':>7}")
    reference, points = None, []
    rows = [(name, kw, a.steps) for name, kw in settings(a.k).items()]
    # Exact mode's own budgets come right after it: a setting that only ties one adds nothing.
    rows[1:1] = [(f"exact, step cap {n}", {}, n) for n in a.caps or ()]
    for name, kw, steps in rows:
        if a.only and name not in a.only and not name.startswith("exact, step cap"):
            continue
        config = resolve_config(model, max_denoising_steps=steps, **kw)
        if puzzles is None and completions is None:
            config = config.replace(eos_token_id=())
        tic = time.perf_counter()
        tokens, fwd, pos = run(model, prompts, config, a.seed, a.batch_size or len(prompts))
        wall = time.perf_counter() - tic
        if completions is not None:
            metric = exact_metric(tokens, config.eos_token_id, completions)
        elif puzzles is not None:
            metric = sudoku_metric(tokenizer, tokens, puzzles)
        else:
            reference = tokens if reference is None else reference
            metric = {"agree": mx.mean(tokens == reference).item()}
        text = ", ".join(f"{k} {v:.3f}" for k, v in metric.items())
        print(f"{name:28} {text:34} {fwd:10.2f} {pos:10.1f} {wall:7.1f}", flush=True)
        points.append((name, next(iter(metric.values())), fwd, pos))
    if puzzles is not None or completions is not None:
        print("Pareto front (metric up, forwards and positions down):", "; ".join(front(points)))
    for peer in a.peer or ():
        tic = time.perf_counter()
        tokens, fwd = run_peer(peer, a.peer_checkpoint, prompts, resolve_config(model), a)
        wall = time.perf_counter() - tic
        if completions is not None:
            metric = exact_metric(tokens, resolve_config(model).eos_token_id, completions)
        elif puzzles is not None:
            metric = sudoku_metric(tokenizer, tokens, puzzles)
        else:
            raise SystemExit("--peer needs a task: --data or a Sudoku folder.")
        text = ", ".join(f"{k} {v:.3f}" for k, v in metric.items())
        print(f"{peer:28} {text:34} {fwd:10.2f} {'-':>10} {wall:7.1f}", flush=True)


def front(points):
    """Names of the (name, metric, forwards, positions) points no other point dominates:
    at least as good on all three (rounded as printed) and better on one, or tied and
    listed earlier (a simpler setting: exact, its step caps, then each setting alone)."""

    def key(p):
        return (round(p[1], 3), -round(p[2], 2), -round(p[3], 1))

    def dominates(i, j):
        q, p = key(points[i]), key(points[j])
        return all(a >= b for a, b in zip(q, p)) and (q != p or i < j)

    n = range(len(points))
    return [points[j][0] for j in n if not any(dominates(i, j) for i in n if i != j)]


def run_peer(peer: str, path: Path, prompts, config, a):
    """A peer runtime's outputs (padded ids, as `run`'s) and mean denoising steps per
    canvas, one prompt at a time in one subprocess (mlx-vlm generates batch 1 only)."""
    from benchmarks.peers import RunSettings, run_peer_subprocess

    runner, _, variant = peer.partition(":")
    extra = {"diffusion_sampler": "confidence-threshold"} if variant == "default" else {}
    r = run_peer_subprocess(
        runner,
        sys.executable,
        path,
        prompts[0],
        RunSettings(config.max_new_tokens, a.steps or config.max_denoising_steps, a.seed),
        more_prompts=prompts[1:],
        **extra,
    )
    rows = [r["generated_ids"]] + r["more_generated_ids"]
    width = max(len(row) for row in rows)
    tokens = mx.array([row + [config.pad_token_id] * (width - len(row)) for row in rows])
    first = r["steps_per_canvas"]
    steps = [sum(first) / len(first)] + r["more_steps_per_canvas"]
    return tokens, sum(steps) / len(steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, nargs="+", required=True)
    p.add_argument("--limit", type=int, default=100, help="puzzles (or prompts) per model")
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="prompts per batch [default: all at once]")
    p.add_argument("--k", type=int, default=64, help="k of top_k and self_conditioning_top_k")
    p.add_argument("--data", type=Path, help="completions-format test .jsonl to score")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma-separated setting names")
    p.add_argument(
        "--caps",
        type=lambda s: [int(n) for n in s.split(",")],
        help="also exact mode at these step caps (e.g. 2,3,4): budgets on the same front",
    )
    p.add_argument(
        "--peer",
        action="append",
        choices=["mlx_vlm", "mlx_vlm:default"],
        help="also score mlx-vlm (entropy-bound, or its default confidence sampler) on "
        "--peer-checkpoint, one prompt at a time; repeatable",
    )
    p.add_argument(
        "--peer-checkpoint",
        type=Path,
        help="the model in transformers' layout (shape_checkpoint.py --from-mlx)",
    )
    a = p.parse_args()
    if a.peer and not a.peer_checkpoint:
        p.error("--peer needs --peer-checkpoint")
    for path in a.model:
        evaluate(path, a)


if __name__ == "__main__":
    main()
