"""LoRA demo on a toy: adapt a from-scratch model to a related task, then fuse.

    python -m benchmarks.lora_demo [--out DIR]

1. Train a tiny model from scratch (full fine-tune) to shift every digit of a 4-digit
   string by +1 (the tests' toy).
2. LoRA (rank 8, every linear layer incl. experts and self-conditioning) on a related
   task, shift by +3, through `python -m mlx_diffgemma.lora` with completions data.
3. Exact accuracy on 100 unseen strings of the new task: base, base + adapter, fused;
   and max |logit difference| between base + adapter and the fused folder.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mlx_diffgemma import fuse, generate, load, lora
from mlx_diffgemma.tuner import toy

ALPHABET = "0123456789|"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}|{% endif %}"
)


def shifted(s, k):
    return "".join(str((int(c) + k) % 10) for c in s)


def strings(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(str(d) for d in rng.integers(0, 10, 4)) for _ in range(n)]


def write_data(folder, k, seed):
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", 2000, seed), ("valid", 64, seed + 1), ("test", 64, seed + 2)):
        rows = [json.dumps({"prompt": x, "completion": shifted(x, k)}) for x in strings(n, s)]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")


def accuracy(model, tokenizer, k, n=100):
    tests = strings(n, 12345)
    hits = sum(
        generate(model, tokenizer, [{"role": "user", "content": x}], seed=i) == shifted(x, k)
        for i, x in enumerate(tests)
    )
    return hits / n


def logits(model, prompt, canvas):
    import mlx.core as mx

    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    return model.denoise(mx.array([canvas]), cache)


COMMON = ["--batch-size", "16", "--steps-per-report", "100", "--steps-per-eval", "1000000"]
COMMON += ["--save-every", "1000000", "--val-batches", "1"]


def train_base(out: Path, iters: int) -> Path:
    """Step 1: the "add 1" toy, trained from scratch; returns its fused folder."""
    tok = out / "tokenizer"
    toy.build_char_tokenizer(tok, ALPHABET)
    toy.write_generation_config(tok, max_new_tokens=8, max_denoising_steps=8)
    (tok / "chat_template.jinja").write_text(TEMPLATE)
    (out / "tiny.json").write_text(
        json.dumps(toy.tiny_config(16, 8, hidden_size=64, num_hidden_layers=2))
    )
    write_data(out / "data_base", 1, 0)
    lora.main(
        ["--model", str(tok), "--init-config", str(out / "tiny.json"), "--train"]
        + ["--fine-tune-type", "full", "--num-layers", "-1", "--data", str(out / "data_base")]
        + ["--iters", str(iters), "--learning-rate", "1e-2"]
        + ["--adapter-path", str(out / "base_run"), *COMMON]
    )
    return fuse.fuse(tok, out / "base_run", out / "base")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="Work folder [a temporary one].")
    p.add_argument("--base-iters", type=int, default=400)
    p.add_argument("--lora-iters", type=int, default=300)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp())
    tic = time.perf_counter()
    base = train_base(out, args.base_iters)
    base_s = time.perf_counter() - tic
    write_data(out / "data_new", 3, 100)
    tic = time.perf_counter()
    lora.main(
        [
            "--model",
            str(base),
            "--train",
            "--data",
            str(out / "data_new"),
            "--iters",
            str(args.lora_iters),
            "--learning-rate",
            "3e-3",
            "--num-layers",
            "-1",
            "--adapter-path",
            str(out / "adapter"),
            *COMMON,
        ]
    )
    lora_s = time.perf_counter() - tic
    fused = fuse.fuse(base, out / "adapter", out / "fused")

    m_base, tokenizer = load(base)
    m_adapt, _ = load(base, adapter_path=str(out / "adapter"))
    m_fused, _ = load(fused)
    rows = {
        "base on the base task (+1)": accuracy(m_base, tokenizer, 1),
        "base on the new task (+3)": accuracy(m_base, tokenizer, 3),
        "base + adapter on the new task": accuracy(m_adapt, tokenizer, 3),
        "fused on the new task": accuracy(m_fused, tokenizer, 3),
    }
    prompt, canvas = [2, 5, 6, 7, 8, 15], [9, 4, 6, 1, 0, 0, 3, 5]
    diff = float(abs(logits(m_adapt, prompt, canvas) - logits(m_fused, prompt, canvas)).max())
    same = all(
        generate(m_adapt, tokenizer, [{"role": "user", "content": x}], seed=i)
        == generate(m_fused, tokenizer, [{"role": "user", "content": x}], seed=i)
        for i, x in enumerate(strings(100, 12345))
    )
    print(
        f"\nbase: {args.base_iters} steps from scratch ({base_s:.0f}s); "
        f"LoRA: {args.lora_iters} steps ({lora_s:.0f}s)"
    )
    for name, acc in rows.items():
        print(f"{name:<34} exact {acc:.2f}")
    print(f"fused vs base + adapter: max|dlogit| {diff:.1e}; same 100 outputs: {same}")


if __name__ == "__main__":
    main()
