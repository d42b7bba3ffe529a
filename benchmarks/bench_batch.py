"""Batched generation throughput on the CPU: this port vs transformers, batch 1 and 100.

    python -m benchmarks.bench_batch [--batch 1,100] [--steps 16] [--canvases 2]

Both run the same random small MoE (width 128, 4 layers, 4 experts top-2, vocabulary 512,
canvas 40; built once by shape_checkpoint.py in transformers' layout, fp32) on the same
prompts (38 tokens each), with every early stop disabled (no EOS, stability 0, a
confidence threshold no random model reaches), so each does exactly `--steps` denoising
steps on each of `--canvases` canvases for every row. One warm-up generation of the same
shapes first; then one timed. tok/s counts generated tokens of all rows.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.shape_checkpoint import build

SETTINGS = dict(stability_threshold=0, confidence_threshold=1e-12, entropy_bound=0.1)


def prompts(batch: int, length: int = 38, vocab: int = 512):
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab, (batch, length)).tolist()


def ours(path: Path, ids, steps: int, tokens: int) -> float:
    import mlx.core as mx

    from mlx_diffgemma.diffusion.steps import Block, generate_step
    from mlx_diffgemma.generate import resolve_config
    from mlx_diffgemma.loader import load_model

    model = load_model(path)
    cfg = resolve_config(model, max_tokens=tokens, max_denoising_steps=steps, **SETTINGS)
    cfg = cfg.replace(eos_token_id=())

    def run(seed):
        events = generate_step(mx.array(ids), model, config=cfg, key=mx.random.key(seed))
        blocks = [b for b in events if isinstance(b, Block)]
        assert all(b.steps == steps for b in blocks) and len(blocks) * 40 == tokens
        mx.eval(blocks[-1].tokens)

    run(1)
    tic = time.perf_counter()
    run(0)
    return time.perf_counter() - tic


def theirs(path: Path, ids, steps: int, tokens: int) -> float:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.tensor(ids, dtype=torch.long)
    forwards = []
    model.model.decoder.register_forward_hook(lambda *_: forwards.append(1))

    def run(seed):
        forwards.clear()
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                x,
                max_new_tokens=tokens,
                max_denoising_steps=steps,
                sampler_config=EntropyBoundSamplerConfig(entropy_bound=SETTINGS["entropy_bound"]),
                stability_threshold=SETTINGS["stability_threshold"],
                confidence_threshold=SETTINGS["confidence_threshold"],
                eos_token_id=None,
                pad_token_id=0,
                return_dict_in_generate=True,
            )
        assert out.sequences.shape == (len(ids), len(ids[0]) + tokens)
        assert len(forwards) == steps * tokens // 40, len(forwards)  # no early stop

    run(1)
    tic = time.perf_counter()
    run(0)
    return time.perf_counter() - tic


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,100")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--canvases", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args(argv)
    path = args.checkpoint or Path.home() / ".cache/mlx_diffgemma/bench/moe128-4layers"
    if not (path / "config.json").exists():
        build(path, "moe128", layers=4, experts=4, top_k=2)
    tokens = 40 * args.canvases
    blas = "OpenBLAS" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled BLAS"
    print(f"{path}: {args.steps} steps x {args.canvases} canvases of 40, CPU, MLX with {blas}")
    print(
        f"{'batch':>5} {'ours s':>8} {'ours tok/s':>10} {'transformers s':>14} "
        f"{'transformers tok/s':>18} {'ours / transformers':>19}"
    )
    for b in (int(x) for x in args.batch.split(",")):
        ids = prompts(b)
        a, t = ours(path, ids, args.steps, tokens), theirs(path, ids, args.steps, tokens)
        n = b * tokens
        print(
            f"{b:>5} {a:>8.2f} {n / a:>10.1f} {t:>14.2f} {n / t:>18.1f} {t / a:>18.2f}x", flush=True
        )


if __name__ == "__main__":
    main()
