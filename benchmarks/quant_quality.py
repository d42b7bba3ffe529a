"""Quality and size of the quantization recipes, on a tiny random DiffusionGemma.

Builds a small random model (every matrix quantizable at group size 64), saves it as an
fp32 transformers-layout checkpoint, converts it with each recipe through
`mlx_diffgemma.convert`, and compares the decoder logits with the fp32 model: max and
mean |delta logit|, KL(fp32 || quantized) and top-1 agreement, without and with
self-conditioning. Activations and scales stay fp32 (the CPU's quantized kernels
accumulate in the activation dtype). Then prints the on-disk size per recipe and the size
the same planner gives for the real 26B.

    python -m benchmarks.quant_quality [--seeds 3]

A random model is not the trained one: read the numbers as a ranking of the recipes.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma import load_model
from mlx_diffgemma.convert import build_lazy_model, convert, estimate_output_bytes

TINY_TEXT = {
    "model_type": "diffusion_gemma_text",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_experts": 8,
    "top_k_experts": 2,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "global_head_dim": 128,
    "num_global_key_value_heads": 1,
    "sliding_window": 16,
    "max_position_embeddings": 4096,
    "dtype": "float32",
}
PROMPT, CANVAS, BATCH = 48, 32, 4
# (label, convert kwargs)
RECIPES = [
    ("fp32 (not quantized)", {}),
    ("4-bit mixed", {"quantize": True, "q_bits": 4, "quant_recipe": "mixed"}),
    ("4-bit uniform", {"quantize": True, "q_bits": 4, "quant_recipe": "uniform"}),
    ("8-bit", {"quantize": True, "q_bits": 8, "quant_recipe": "uniform"}),
]
REAL_CONFIG = {
    "model_type": "diffusion_gemma",
    "text_config": {"global_head_dim": 512, "num_global_key_value_heads": 2},
}


def build_checkpoint(folder: Path, seed: int) -> None:
    """A random fp32 checkpoint in the transformers layout (fused experts without .weight)."""
    config = {"model_type": "diffusion_gemma", "canvas_length": CANVAS, "text_config": TINY_TEXT}
    mx.random.seed(seed)
    model = build_lazy_model(config)
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("embed_tokens.weight"):
            v = 0.25 * mx.random.normal(v.shape)  # logits std ~4: peaked, below the softcap
        elif k.endswith(("q_norm.weight", "k_norm.weight")):
            # Attention has scale 1.0: unit q_norm/k_norm would make q.k ~ sqrt(head_dim)
            # and the random model chaotic (argmax attention); trained norms are small.
            v = mx.random.uniform(0.25, 0.45, v.shape)
        elif k.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
            v = mx.random.uniform(0.8, 1.2, v.shape)
        if k.endswith((".experts.gate_up_proj.weight", ".experts.down_proj.weight")):
            k = k[: -len(".weight")]
        weights[k] = v.astype(mx.float32)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))


def decoder_logits(model, seed: int):
    """Plain and self-conditioned decoder logits for random prompts and canvases."""
    rng = np.random.RandomState(seed)
    vocab = TINY_TEXT["vocab_size"]
    cache = model.make_cache()
    model.encode(mx.array(rng.randint(3, vocab, (BATCH, PROMPT))), cache)
    canvas = mx.array(rng.randint(3, vocab, (BATCH, CANVAS)))
    plain = model.denoise(canvas, cache)
    # Condition on a fixed signal (not the model's own output) so all recipes see the same.
    sc = mx.array(4.0 * rng.randn(BATCH, CANVAS, vocab).astype(np.float32))
    return plain, model.denoise(canvas, cache, sc)


def metrics(ref: mx.array, q: mx.array):
    d = mx.abs(ref - q)
    lp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    lq = q - mx.logsumexp(q, axis=-1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1).mean()
    top1 = (ref.argmax(-1) == q.argmax(-1)).mean()
    return d.max().item(), d.mean().item(), kl.item(), top1.item()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="random models to average over")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="dg_quant_quality_"))
    results = {label: [] for label, _ in RECIPES}
    sizes = {}
    try:
        for seed in range(args.seeds):
            src = base / f"hf_{seed}"
            build_checkpoint(src, seed)
            ref = decoder_logits(load_model(src), seed)
            for i, (label, kwargs) in enumerate(RECIPES):
                out = convert(src, base / f"mlx_{seed}_{i}", **kwargs)
                got = decoder_logits(load_model(out), seed)
                results[label].append([metrics(r, g) for r, g in zip(ref, got)])
                sizes[label] = folder_bytes(out)
                shutil.rmtree(out)
            ref_logit_std = float(np.array(ref[0]).std())
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nTiny random model ({args.seeds} seeds; fp32 logit std {ref_logit_std:.1f}), vs fp32:")
    head = f"{'recipe':<22}{'pass':<10}{'max|dl|':>9}{'mean|dl|':>10}{'KL':>10}{'top-1':>8}"
    print(head)
    for label, runs in results.items():
        for j, name in enumerate(("plain", "self-cond")):
            m = np.array([r[j] for r in runs])
            mx_d, mean_d, kl, top1 = m[:, 0].max(), m[:, 1].mean(), m[:, 2].mean(), m[:, 3].mean()
            print(f"{label:<22}{name:<10}{mx_d:>9.3f}{mean_d:>10.4f}{kl:>10.2e}{top1:>8.3f}")

    print(f"\n{'recipe':<22}{'tiny, on disk':>14}{'26B (planner)':>16}{'26B GiB':>9}")
    for label, kwargs in RECIPES:
        real = estimate_output_bytes(REAL_CONFIG, dtype="bfloat16", **kwargs)
        name = label.replace("fp32", "bf16") if not kwargs else label
        print(f"{name:<22}{sizes[label] / 1e6:>11.2f} MB{real / 1e9:>13.2f} GB{real / 2**30:>9.2f}")


if __name__ == "__main__":
    main()
