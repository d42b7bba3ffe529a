"""Few-step distillation on the trained toys: distill, then base vs student per budget.

    . ../shared/tools/cpu_openblas_env.sh   # float32 matmuls through OpenBLAS (PERFORMANCE.md)
    python -m benchmarks.distill_toys --out /tmp/distill_sudoku [--iters 1000] [--max-steps 48]
    python -m benchmarks.distill_toys --toy sort --out /tmp/distill_sort
    python -m benchmarks.distill_toys --toy add1 --out /tmp/distill_add1

Toys: `sudoku`, the shipped `examples/sudoku_toy`; `sort` (sort 48 digits, canvas 64) and
`add1` (add 1 to 4 digits, canvas 8), trained from scratch into OUT/base first when
`--base` does not name a trained folder (`benchmarks/sort_toy.py`, `lora_demo.py`).
`--base` may also name a fused student: a second round (SDTT's rounds) distills it.
`--student` starts the student from another model than the teacher (e.g. the base made
deeper by `grow_depth.py`: more computation per forward, same logits at the start).

Prompts: `--train-puzzles` new inputs (and 64 for validation), drawn with seeds the toys'
training and test sets do not use, as `{"prompt": ...}` records (each toy's chat template
renders them as its prompt). The teacher is the base toy (exact sampler).

Evaluation, at step caps 1, 2, 3, 4 and the toy's default (adaptive stop): the fraction
right and the decoder forwards per canvas, for the base and the student. Sudoku: the first
100 test puzzles of `examples/sudoku_toy/test.csv`, givens clamped, blanks limited to 1-6
(as docs/FINE_TUNING.md's table), one puzzle at a time with seeds 0..99. Sort and add 1:
100 unseen inputs, exact match up to EOS, one batch (seed 0). `--score-on seen` scores the
first 100 distillation prompts instead (written with their answers to OUT/data/seen.jsonl):
how much of a student's gain is memorized prompts rather than the task.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from benchmarks import lora_demo, sort_toy
from benchmarks.fast_quality import exact_metric, run
from benchmarks.sudoku import sweep
from benchmarks.sudoku_toy import generate_set
from mlx_diffgemma import DiffusionConfig, load
from mlx_diffgemma.diffusion.config import read_json
from mlx_diffgemma.distill import main as distill
from mlx_diffgemma.generate import resolve_config
from mlx_diffgemma.tasks import sudoku as S
from mlx_diffgemma.tuner.data import load_jsonl

SUDOKU = Path(__file__).resolve().parents[1] / "examples" / "sudoku_toy"
CAPS = [1, 2, 3, 4]


def sudoku_rows(n, seed):
    return [{"prompt": p, "completion": s} for p, s in generate_set(n, seed, (12, 24))]


def sort_rows(n, seed):
    return sort_toy.rows(np.random.default_rng(seed), n)


def add1_rows(n, seed):
    return [
        {"prompt": x, "completion": lora_demo.shifted(x, 1)} for x in lora_demo.strings(n, seed)
    ]


ROWS = {"sudoku": sudoku_rows, "sort": sort_rows, "add1": add1_rows}


def write_rows(path: Path, rows, prompts_only: bool) -> None:
    keep = [{"prompt": r["prompt"]} if prompts_only else r for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def write_data(folder: Path, toy: str, n_train: int, seed: int) -> None:
    """Prompts for distillation, the first 100 of them with answers (seen.jsonl), and
    (sort, add 1) the 100 test rows with answers."""
    folder.mkdir(parents=True, exist_ok=True)
    train = ROWS[toy](n_train, seed)
    write_rows(folder / "train.jsonl", train, prompts_only=True)
    write_rows(folder / "seen.jsonl", train[:100], prompts_only=False)
    write_rows(folder / "valid.jsonl", ROWS[toy](64, seed + 1), prompts_only=True)
    if toy != "sudoku":  # the tests the toys' own benchmarks score on
        write_rows(folder / "test.jsonl", ROWS[toy](100, 12345 if toy == "add1" else 7), False)


def base_model(toy: str, out: Path, given) -> Path:
    """The trained toy: `given` (e.g. a fused student, for a second round), else the
    shipped Sudoku toy or one trained from scratch into out/base (once)."""
    if given:
        return Path(given)
    if toy == "sudoku":
        return SUDOKU
    folder = out / "base"
    model = folder / ("model" if toy == "sort" else "base")
    if not (model / "config.json").exists():
        if toy == "sort":
            # The settings of benchmarks/README.md's toy D (exact 0.98); the script's
            # 600-iteration default leaves a model that sorts nothing (val loss 1.61).
            sort_toy.main(["--out", str(folder), "--iters", "2400", "--learning-rate", "5e-3"])
        else:
            lora_demo.train_base(folder, 400)
    return model


def sudoku_puzzles(data: Path, split: str):
    if split == "test":
        return S.load_puzzles(SUDOKU / "test.csv", 100)
    rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
    return [(r["prompt"], r["completion"]) for r in rows]


def evaluate(toy, path, adapter, data: Path, caps, split="test"):
    """{cap: (fraction right, forwards per canvas)} on `split` (test or seen)."""
    model, tokenizer = load(str(path), adapter_path=adapter)
    if toy == "sudoku":
        puzzles = sudoku_puzzles(data, split)
        rows = sweep(model, tokenizer, puzzles, caps, style="toy", digits_only=True)
        return {r["steps"]: (r["metrics"]["all"]["exact"], r["steps_used"]) for r in rows}
    tests = load_jsonl(data / f"{split}.jsonl", tokenizer)
    prompts, answers = [e.prompt for e in tests], [e.answer for e in tests]
    out = {}
    for n in caps:
        config = resolve_config(model, max_denoising_steps=n)
        tokens, fwd, _ = run(model, prompts, config, 0, len(prompts))
        out[n] = (exact_metric(tokens, config.eos_token_id, answers)["exact"], fwd)
    return out


def default_steps(path: Path) -> int:
    """The checkpoint's default step budget (generation_config.json, else transformers')."""
    gen = read_json(Path(path) / "generation_config.json")
    return DiffusionConfig.from_generation_config(gen).max_denoising_steps


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", choices=sorted(ROWS), default="sudoku")
    p.add_argument("--out", type=Path, required=True, help="work folder (data, adapter)")
    p.add_argument(
        "--base",
        help="the model to distill [sudoku: the shipped toy; sort, add1: train one in OUT/base]",
    )
    p.add_argument("--student", help="the student's starting model [the base itself]")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=48, help="48: every teacher step")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--certainty-weight", type=float, default=2.0)
    p.add_argument("--train-puzzles", type=int, default=2000, help="prompts to distill on")
    p.add_argument("--seed", type=int, default=1001, help="seed of the generated prompts")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing --out")
    p.add_argument(
        "--score-on",
        choices=("test", "seen"),
        default="test",
        help="unseen test inputs, or the first 100 distillation prompts [test]",
    )
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    data, adapter = a.out / "data", a.out / "student"
    base = base_model(a.toy, a.out, a.base)
    student = Path(a.student) if a.student else base
    write_data(data, a.toy, a.train_puzzles, a.seed)
    seconds = None
    if not a.eval_only:
        tic = time.perf_counter()
        distill(
            ["--model", str(student), "--teacher", str(base), "--data", str(data)]
            + ["--adapter-path", str(adapter)]
            + ["--fine-tune-type", "full", "--num-layers", "-1", "--iters", str(a.iters)]
            + ["--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate)]
            + ["--max-steps", str(a.max_steps), "--certainty-weight", str(a.certainty_weight)]
            + ["--steps-per-report", "50", "--steps-per-eval", "200", "--val-batches", "2"]
            + ["--save-every", "100"]
        )
        seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    caps = CAPS + [default_steps(base)]
    before = evaluate(a.toy, base, None, data, caps, a.score_on)
    after = evaluate(a.toy, student, str(adapter), data, caps, a.score_on)
    where = "100 tests" if a.score_on == "test" else "its first 100 distillation prompts"
    print(f"\n{a.toy} toy, {base}; {where}; distilled with --max-steps {a.max_steps}")
    if student != base:
        print(f"student started from {student}")
    print("| step cap | base right | base fwd/canvas | student right | student fwd/canvas |")
    print("|---|---|---|---|---|")
    for n in caps:
        (ba, bf), (sa, sf) = before[n], after[n]
        print(f"| {n} | {ba:.2f} | {bf:.2f} | {sa:.2f} | {sf:.2f} |")
    if seconds is not None:
        print(
            f"distillation (teacher trajectories included): {seconds:.0f} s, peak RSS {peak:.2f} GB"
        )


if __name__ == "__main__":
    main()
