"""Prefill cost of one image in the released vision tower's shape, on this machine.

    python -m benchmarks.bench_vision                       # 280 soft tokens, bfloat16
    python -m benchmarks.bench_vision --dtype float32 --openblas --budget 70 280 1120

The tower has google/diffusiongemma-26B-A4B-it's vision_config (hidden 1152, 27 layers of
16 heads x 72, MLP 4304, patch 16, 3 x 3 pooling, 2-D RoPE theta 100, standardised) and
random weights, but ONE encoder layer: the 27 layers are identical in shape, so

    per image = preprocessing + patch embedding + 27 x (one layer) + pooling and projection

is the projection printed. The image is noise resized by the Gemma 4 rule to the budget
(280 soft tokens = 2,520 patches). The text encoder's prefill of the soft tokens (the 30
MoE layers) comes on top; it costs what as many text tokens cost. Each stage runs once to
warm up and is then timed `--repeats` times (median). On Linux CPU, MLX's float32 matmuls
need OpenBLAS to be fast (shared/docs/PERFORMANCE.md section 3.4): `--openblas` re-runs the
script with it preloaded (`apt-get install -y libopenblas0-pthread`).
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.vision.processing import preprocess_image
from mlx_diffgemma.vision.tower import (
    MultimodalEmbedder,
    VisionConfig,
    VisionModel,
    pool_by_position,
)

RELEASE = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 72,
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "position_embedding_size": 10240,
    "standardize": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
}
TEXT_HIDDEN = 2816


def timed(fn, repeats):
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def build(dtype):
    config = VisionConfig.from_dict({**RELEASE, "num_hidden_layers": 1})
    tower = VisionModel(config)
    embed = MultimodalEmbedder(config.hidden_size, TEXT_HIDDEN, config.rms_norm_eps)
    for module in (tower, embed):
        params = tree_flatten(module.parameters())
        module.load_weights(
            [(k, (mx.random.normal(v.shape) * 0.02).astype(dtype)) for k, v in params]
        )
    mx.eval(tower.parameters(), embed.parameters())
    return tower, embed


def bench(tower, embed, budget, dtype, repeats):
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    tic = time.perf_counter()
    p = preprocess_image(image, budget)
    prep = time.perf_counter() - tic
    pixels, pos = mx.array(p.pixel_values), mx.array(p.positions)
    h = tower.patch_embedder(pixels, pos)
    cos, sin = tower.rope(pos, h.dtype)
    mx.eval(h, cos, sin)
    layer = tower.encoder.layers[0]
    t_embed = timed(lambda: tower.patch_embedder(pixels, pos), repeats)
    t_layer = timed(lambda: layer(h, cos, sin), repeats)

    def finish():
        k = tower.config.pooling_kernel_size
        pooled = pool_by_position(h, pos, k) * tower.config.hidden_size**0.5
        return embed(((pooled - tower.std_bias) * tower.std_scale).astype(dtype))

    t_finish = timed(finish, repeats)
    n_layers = RELEASE["num_hidden_layers"]
    total = prep + t_embed + n_layers * t_layer + t_finish
    return dict(
        budget=budget,
        patches=len(p.pixel_values),
        soft=p.num_soft_tokens,
        prep=prep,
        embed=t_embed,
        layer=t_layer,
        finish=t_finish,
        total=total,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, nargs="+", default=[280], help="max_soft_tokens")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--openblas", action="store_true", help="preload OpenBLAS (Linux CPU)")
    args = ap.parse_args()
    if args.openblas and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        from peers import openblas_env

        env = openblas_env()
        if "openblas" not in env.get("LD_PRELOAD", ""):
            sys.exit("OpenBLAS is not installed: apt-get install -y libopenblas0-pthread")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    dtype = getattr(mx, args.dtype)
    tower, embed = build(dtype)
    blas = "OpenBLAS" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled BLAS"
    print(
        f"vision tower, release shape, {args.dtype}, {mx.default_device()}, {blas}, "
        f"{os.cpu_count()} cores; median of {args.repeats} after a warm-up"
    )
    head = "budget  patches  soft  preprocess  embed    1 layer   pool+proj  per image (27 layers)"
    print(head)
    for budget in args.budget:
        r = bench(tower, embed, budget, dtype, args.repeats)
        print(
            f"{r['budget']:>6}  {r['patches']:>7}  {r['soft']:>4}  {r['prep'] * 1e3:>7.0f} ms"
            f"  {r['embed'] * 1e3:>5.0f} ms  {r['layer']:>6.2f} s  {r['finish'] * 1e3:>6.0f} ms"
            f"  {r['total']:>8.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
