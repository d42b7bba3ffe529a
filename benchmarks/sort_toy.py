"""Train a toy that sorts digits on a 64-position canvas: fast mode's long-canvas oracle.

    python -m benchmarks.sort_toy --out DIR [--digits 48 --iters 600]
    python -m benchmarks.fast_quality --model DIR/model --data DIR/data/test.jsonl --k 4

The answer is the prompt's digits in ascending order: runs of equal digits whose
boundaries depend on the counts of every digit, so the model is sure of the run interiors
at once and settles the boundaries over later steps. Unlike the Sudoku toy's 40-position
canvas this one is long enough for compaction's buckets (16 / 32 / 64) to matter. Trained
from scratch with the trainer (`python -m mlx_diffgemma.lora --init-config ... --fine-tune-type
full`), as the LoRA demo's base is.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma import fuse, lora
from mlx_diffgemma.tuner import toy

ALPHABET = "0123456789|"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}|{% endif %}"
)


def rows(rng, n: int, digits: int = 48):
    """n completions records: random digits, and the same digits sorted."""
    xs = [rng.integers(0, 10, digits) for _ in range(n)]
    return [
        {"prompt": "".join(map(str, x)), "completion": "".join(map(str, np.sort(x)))} for x in xs
    ]


def write_data(folder: Path, digits: int, seed: int, train: int):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("valid", 64), ("test", 100)):
        lines = [json.dumps(r) for r in rows(rng, n, digits)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="work folder")
    p.add_argument("--digits", type=int, default=48)
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    out = Path(a.out)
    tok = out / "tokenizer"
    toy.build_char_tokenizer(tok, ALPHABET)
    toy.write_generation_config(tok, max_new_tokens=a.canvas, max_denoising_steps=48)
    (tok / "chat_template.jinja").write_text(TEMPLATE)
    config = toy.tiny_config(16, a.canvas, hidden_size=a.hidden_size, num_hidden_layers=a.layers)
    (out / "tiny.json").write_text(json.dumps(config))
    write_data(out / "data", a.digits, 0, train=4000)
    tic = time.perf_counter()
    lora.main(
        ["--model", str(tok), "--init-config", str(out / "tiny.json"), "--train"]
        + ["--fine-tune-type", "full", "--num-layers", "-1", "--data", str(out / "data")]
        + ["--iters", str(a.iters), "--learning-rate", str(a.learning_rate)]
        + ["--batch-size", str(a.batch_size), "--adapter-path", str(out / "run")]
        + ["--steps-per-report", "50", "--steps-per-eval", "200", "--val-batches", "2"]
        + ["--save-every", "1000000"]
    )
    fuse.fuse(tok, out / "run", out / "model")
    print(f"[INFO] Trained {out / 'model'} in {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
