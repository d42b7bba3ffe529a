"""Train a tiny DiffusionGemma from scratch on 6x6 Sudoku with the fine-tuning objective.

    # the shipped toy (with the OpenBLAS preload of PERFORMANCE.md, 78 min here)
    python -m benchmarks.sudoku_toy --out examples/sudoku_toy --iters 2500 --hidden-size 128 \
        --layers 4 --batch-size 32 --learning-rate 2e-3 --base-puzzles 3000 --givens 12,24
    python -m benchmarks.sudoku --model examples/sudoku_toy --puzzles examples/sudoku_toy/test.csv \
        --prompt-format toy --digits-only --steps 1,2,4,8,16,48 --ar

Puzzles: 6x6 grids with 2x3 boxes, generated with unique solutions (random full grid by
backtracking, then cells removed in random order while the solution stays unique, down
to `--givens`). The training set is these base puzzles under random symmetries (digit
relabelling, row swaps within a band, band swaps, column swaps within a stack, stack
swaps), all of which keep uniqueness. Test puzzles are generated with another seed.

Model: a character tokenizer (digits, space, '|'), sudoku.py's compact "toy" style:
prompt `<bos>` + the puzzle's 36 digits + `|`, answer the solution's 36 digits without
spaces + EOS on one 40-token canvas (so prompt cell i and answer cell i are always 37
positions apart).
"""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma.tasks import sudoku as S
from mlx_diffgemma.tuner.data import Example

N, BR, BC = 6, 2, 3  # size, box rows, box columns
CANVAS = 40  # 36 digits + EOS, padded to a multiple of 8
ALPHABET = "0123456789|"
# `mlx_diffgemma generate -p PUZZLE` on the toy: the user message's digits as the toy prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ m['content'] | replace(' ', '') | replace('.', '0') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}|{% endif %}"
)


def _candidates(grid, i):
    r, c = divmod(i, N)
    used = set(grid[r * N : r * N + N]) | set(grid[c::N])
    br, bc = r - r % BR, c - c % BC
    used |= {grid[(br + a) * N + bc + b] for a in range(BR) for b in range(BC)}
    return [d for d in range(1, N + 1) if d not in used]


def count_solutions(grid, limit=2):
    """Solutions of `grid` (list of 36 ints, 0 empty), counted up to `limit`."""
    empty = [i for i, v in enumerate(grid) if v == 0]
    if not empty:
        return 1
    best = min(empty, key=lambda i: len(_candidates(grid, i)))
    total = 0
    for d in _candidates(grid, best):
        grid[best] = d
        total += count_solutions(grid, limit - total)
        grid[best] = 0
        if total >= limit:
            break
    return total


def _fill(grid, rng):
    empty = [i for i, v in enumerate(grid) if v == 0]
    if not empty:
        return True
    i = min(empty, key=lambda j: len(_candidates(grid, j)))
    for d in rng.permutation(_candidates(grid, i)):
        grid[i] = int(d)
        if _fill(grid, rng):
            return True
    grid[i] = 0
    return False


def make_puzzle(rng, givens):
    """(puzzle, solution) strings with a unique solution and at most... `givens` clues
    (fewer removals stop early when no cell can go without losing uniqueness)."""
    solution = [0] * (N * N)
    _fill(solution, rng)
    puzzle = list(solution)
    for i in rng.permutation(N * N):
        if sum(v != 0 for v in puzzle) <= givens:
            break
        keep = puzzle[i]
        puzzle[i] = 0
        if count_solutions(list(puzzle)) != 1:
            puzzle[i] = keep
    return "".join(map(str, puzzle)), "".join(map(str, solution))


def symmetry(rng):
    """A random validity- and uniqueness-preserving map of 6x6 (2x3 box) grids."""
    digits = np.concatenate([[0], rng.permutation(N) + 1])
    bands = rng.permutation(N // BR)
    rows = [b * BR + r for b in bands for r in rng.permutation(BR)]
    stacks = rng.permutation(N // BC)
    cols = [s * BC + c for s in stacks for c in rng.permutation(BC)]

    def apply(grid: str) -> str:
        g = np.array([int(ch) for ch in grid]).reshape(N, N)[rows][:, cols]
        return "".join(str(digits[v]) for v in g.ravel())

    return apply


def example(tokenizer, puzzle: str, solution: str) -> Example:
    prompt = S.prompt_ids(tokenizer, puzzle, "toy")
    answer = tokenizer.encode(S.format_grid(solution, spaced=False))
    return Example(prompt, answer, tokenizer.eos_token_ids[0])


def generate_set(n, seed, givens):
    rng = np.random.default_rng(seed)
    return [make_puzzle(rng, int(rng.integers(givens[0], givens[1] + 1))) for _ in range(n)]


def augmented(base, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, s = base[int(rng.integers(len(base)))]
        f = symmetry(rng)
        out.append((f(p), f(s)))
    return out


def write_csv(path, pairs):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["puzzle", "solution"])
        w.writerows(pairs)


def main(argv=None):
    from mlx_lm.tuner.trainer import TrainingArgs

    from mlx_diffgemma.tokenizer import Tokenizer
    from mlx_diffgemma.tuner import toy
    from mlx_diffgemma.tuner.adapters import setup_full
    from mlx_diffgemma.tuner.init import init_model
    from mlx_diffgemma.tuner.losses import Objective
    from mlx_diffgemma.tuner.trainer import ProgressReport, make_optimizer, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Output checkpoint folder.")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--base-puzzles", type=int, default=3000)
    p.add_argument("--test-puzzles", type=int, default=200)
    p.add_argument("--givens", default="14,22", help="Clue range of generated puzzles.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="Continue from this toy checkpoint's weights.")
    p.add_argument("--save-every", type=int, default=10**9, help="Save the weights every N steps.")
    args = p.parse_args(argv)
    out = Path(args.out)
    givens = tuple(int(x) for x in args.givens.split(","))

    tic = time.perf_counter()
    base = generate_set(args.base_puzzles, args.seed, givens)
    test = generate_set(args.test_puzzles, args.seed + 1000, givens)
    print(
        f"generated {len(base)} + {len(test)} puzzles in {time.perf_counter() - tic:.1f}s",
        flush=True,
    )
    toy.build_char_tokenizer(out, ALPHABET)
    toy.write_generation_config(out, max_new_tokens=CANVAS, max_denoising_steps=48)
    write_csv(out / "test.csv", test)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer = Tokenizer.from_pretrained(out)
    config = toy.tiny_config(
        tokenizer.vocab_size,
        CANVAS,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        sliding_window=256,
    )
    model = init_model(config, args.seed)
    if args.init_from:
        model.load_weights(str(Path(args.init_from) / "model.safetensors"))
    setup_full(model, -1)
    train_set = [example(tokenizer, *pq) for pq in augmented(base, 50000, args.seed)]
    valid_set = [example(tokenizer, *pq) for pq in test[:64]]
    targs = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        val_batches=2,
        steps_per_report=50,
        steps_per_eval=500,
        steps_per_save=args.save_every,
        adapter_file=out / "adapters.safetensors",
    )
    tic = time.perf_counter()
    train(
        model,
        train_set,
        valid_set,
        targs,
        Objective(),
        make_optimizer(args.learning_rate, args.iters),
        tokenizer.pad_token_id,
        args.seed,
        ProgressReport(),
        pad_to=8,
    )
    print(f"trained {args.iters} steps in {time.perf_counter() - tic:.0f}s", flush=True)
    (out / "adapters.safetensors").unlink(missing_ok=True)
    toy.save_model(model, config, out)
    (out / "train_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")


if __name__ == "__main__":
    main()
