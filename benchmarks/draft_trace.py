"""When does the exact sampler's draft become the answer, and when does the canvas stop?

    python -m benchmarks.draft_trace [--model TOY] [--adapter-path STUDENT] [--limit 100]

On the shipped Sudoku toy's first test puzzles (givens clamped, blanks limited to 1-6,
seeds 0..n-1, as `distill_toys.py` scores them): per denoising step s, the fraction of
puzzles whose draft (the step's argmax) is the solution from step s on, and the fraction
whose canvas has stopped by step s. The adaptive stop needs the draft unchanged for one
step (and a mean entropy under 0.005), so a canvas cannot stop before its second forward;
where "stopped by s + 1" follows "right from s" the stop costs one confirming forward and
the step count is set by how fast the draft becomes right.
"""

import argparse
from collections import Counter
from pathlib import Path

from mlx_diffgemma import load
from mlx_diffgemma.generate import resolve_config, stream_generate
from mlx_diffgemma.tasks import sudoku as S

TOY = Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy"


def model_eos(model) -> int:
    return resolve_config(model).eos_token_id[0]


def trace(model, tokenizer, puzzle: str, solution: str, seed: int):
    """(the step from which the draft is the solution, or None; the steps run)."""
    eos = model_eos(model)
    C, V = model.args.canvas_length, model.args.vocab_size
    layout = S.answer_layout(tokenizer, puzzle, C, V, eos, digits_only=True, spaced=False)
    ids = S.prompt_ids(tokenizer, puzzle, "toy")
    right_from, steps = None, 0
    for r in stream_generate(model, tokenizer, ids, seed=seed, drafts=True, layout=layout):
        if r.kind == "draft":
            steps += 1
            digits = "".join(c for c in r.draft_text if c.isdigit())[-len(solution) :]
            right_from = (right_from or steps) if digits == solution else None
    return right_from, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(TOY), help="the toy or a grown one [the shipped toy]")
    p.add_argument("--adapter-path", help="a distilled student of the model")
    p.add_argument("--limit", type=int, default=100)
    a = p.parse_args()
    model, tokenizer = load(a.model, adapter_path=a.adapter_path)
    right, stopped = Counter(), Counter()
    puzzles = S.load_puzzles(TOY / "test.csv", a.limit)
    for i, (puzzle, solution) in enumerate(puzzles):
        r, s = trace(model, tokenizer, puzzle, solution, i)
        right[r] += 1
        stopped[s] += 1
    n = len(puzzles)
    print(f"{a.model}{' + ' + a.adapter_path if a.adapter_path else ''}, {n} puzzles")
    print("| step | draft right from here on | stopped by here |\n|---|---|---|")
    for s in range(1, 9):
        r = sum(v for k, v in right.items() if k is not None and k <= s) / n
        print(f"| {s} | {r:.2f} | {sum(v for k, v in stopped.items() if k <= s) / n:.2f} |")
    mean = sum(k * v for k, v in stopped.items()) / n
    print(f"never right: {right[None] / n:.2f}; mean steps {mean:.2f}")


if __name__ == "__main__":
    main()
