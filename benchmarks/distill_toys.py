"""Few-step distillation on the shipped Sudoku toy: distill, then base vs student per budget.

    . ../shared/tools/cpu_openblas_env.sh   # float32 matmuls through OpenBLAS (PERFORMANCE.md)
    python -m benchmarks.distill_toys --out /tmp/distill_sudoku [--iters 1000] [--max-steps 48]

Prompts: `--train-puzzles` new 6x6 puzzles (and 64 for validation), generated with seeds
the toy's training and test sets do not use, as `{"prompt": DIGITS}` records (the toy's
chat template renders them as its prompt). The teacher is the toy itself (exact sampler).
Evaluation: the first 100 test puzzles of `examples/sudoku_toy/test.csv`, givens clamped,
blanks limited to 1-6 (as docs/FINE_TUNING.md's table), one puzzle at a time with seeds
0..99, at step caps 1, 2, 3, 4 and the default 48 (adaptive stop): the fraction solved and
the decoder forwards per canvas, for the base and the student.
"""

import argparse
import json
import resource
import time
from pathlib import Path

from benchmarks.sudoku import sweep
from benchmarks.sudoku_toy import generate_set
from mlx_diffgemma import load
from mlx_diffgemma.distill import main as distill
from mlx_diffgemma.tasks import sudoku as S

TOY = Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy"
BUDGETS = [1, 2, 3, 4, 48]


def write_prompts(folder: Path, n_train: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", n_train, seed), ("valid", 64, seed + 1)):
        rows = generate_set(n, s, (12, 24))
        text = "".join(json.dumps({"prompt": p}) + "\n" for p, _ in rows)
        (folder / f"{name}.jsonl").write_text(text)


def evaluate(adapter, limit: int):
    model, tokenizer = load(str(TOY), adapter_path=adapter)
    puzzles = S.load_puzzles(TOY / "test.csv", limit)
    rows = sweep(model, tokenizer, puzzles, BUDGETS, style="toy", digits_only=True)
    return {r["steps"]: (r["metrics"]["all"]["exact"], r["steps_used"]) for r in rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (data, adapter)")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=48, help="48: every teacher step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--certainty-weight", type=float, default=2.0)
    p.add_argument("--train-puzzles", type=int, default=2000)
    p.add_argument("--limit", type=int, default=100, help="test puzzles")
    p.add_argument("--seed", type=int, default=1001, help="seed of the generated prompts")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing --out")
    a = p.parse_args()
    data, adapter = a.out / "data", a.out / "student"
    seconds = None
    if not a.eval_only:
        write_prompts(data, a.train_puzzles, a.seed)
        tic = time.perf_counter()
        distill(
            ["--model", str(TOY), "--data", str(data), "--adapter-path", str(adapter)]
            + ["--fine-tune-type", "full", "--num-layers", "-1", "--iters", str(a.iters)]
            + ["--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate)]
            + ["--max-steps", str(a.max_steps), "--certainty-weight", str(a.certainty_weight)]
            + ["--steps-per-report", "50", "--steps-per-eval", "200", "--val-batches", "2"]
            + ["--save-every", "100"]
        )
        seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    base, student = evaluate(None, a.limit), evaluate(str(adapter), a.limit)
    print(f"\nSudoku toy, {a.limit} test puzzles, givens clamped; max steps {a.max_steps}")
    print("| step cap | base solved | base fwd/canvas | student solved | student fwd/canvas |")
    print("|---|---|---|---|---|")
    for n in BUDGETS:
        (ba, bf), (sa, sf) = base[n], student[n]
        print(f"| {n} | {ba:.2f} | {bf:.2f} | {sa:.2f} | {sf:.2f} |")
    if seconds is not None:
        print(
            f"distillation (teacher trajectories included): {seconds:.0f} s, peak RSS {peak:.2f} GB"
        )


if __name__ == "__main__":
    main()
