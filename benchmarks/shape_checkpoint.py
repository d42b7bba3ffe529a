"""Random DiffusionGemma checkpoints in the transformers layout, for side-by-side benchmarks.

    python -m benchmarks.shape_checkpoint OUT {shape,tiny} [--layers 2 --experts 8 --top-k 2]
    python -m benchmarks.shape_checkpoint OUT --from-mlx examples/sudoku_toy

"shape" has the released per-layer shapes (hidden 2816, vocab 262,144, head dims 256/512,
16 heads, 8/2 KV heads, expert size 704, canvas 256) but few layers and experts, so that a
denoising step runs on a 2-core CPU in seconds while the LM head, the self-conditioning
product and the sampler keep their real cost. Weights are float32. config.json is written in
the release key style (global_head_dim), which every runtime reads. Needs transformers + torch.
"""

import argparse
import json
import time
from pathlib import Path

SHAPES = {
    "shape": dict(
        vocab_size=262144,
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=2,
        sliding_window=1024,
        canvas_length=256,
    ),
    # A small trained-toy-sized MoE (the batch benchmark's): width 128, canvas 40.
    "moe128": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        num_global_key_value_heads=1,
        sliding_window=256,
        canvas_length=40,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=8,
        canvas_length=8,
    ),
}


# A stand-in vision tower: mlx-vlm's loader needs one; no benchmark uses it.
VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
)


def build(out, kind="shape", layers=2, experts=8, top_k=2, seed=0) -> Path:
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    out = Path(out)
    text = dict(SHAPES[kind])
    canvas = text.pop("canvas_length")
    types = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6 + 1)
    text.update(
        num_hidden_layers=layers,
        layer_types=types[: layers - 1] + ["full_attention"],
        num_experts=experts,
        top_k_experts=top_k,
        hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=30.0,
        max_position_embeddings=262144,
    )
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=canvas)
    model = DiffusionGemmaForBlockDiffusion(config).to(torch.float32).eval()
    with torch.no_grad():
        # Norms, router scales and both layer-scalar sets away from 1, as a trained model has.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    _save(model, out, text)
    gen = {
        "confidence_threshold": 0.005,
        "eos_token_id": [1, 106, 50],
        "max_denoising_steps": 48,
        "max_new_tokens": 256,
        "pad_token_id": 0,
        "stability_threshold": 1,
        "t_max": 0.8,
        "t_min": 0.4,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _save(model, out: Path, text: dict):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    tc = cfg["text_config"]
    tc.pop(
        "per_layer_config", None
    )  # transformers 5.24 writes this; mlx-vlm reads only the release keys
    tc.update(
        global_head_dim=text.get("global_head_dim", tc.get("global_head_dim")),
        num_global_key_value_heads=text.get(
            "num_global_key_value_heads", tc.get("num_global_key_value_heads")
        ),
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def from_mlx(src, out) -> Path:
    """A text-only MLX checkpoint (e.g. a toy trained here) in transformers' layout, with
    the stand-in vision tower mlx-vlm's loader needs; its generation config and tokenizer."""
    import shutil

    import torch
    from safetensors.numpy import load_file
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    text = dict(cfg["text_config"])
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=VISION, canvas_length=cfg["canvas_length"]
    )
    model = DiffusionGemmaForBlockDiffusion(config).to(torch.float32).eval()
    # The experts are the one key that differs (ours end in ".weight"); the encoder's
    # weights are tied to the decoder's.
    weights = {
        k.replace("experts.gate_up_proj.weight", "experts.gate_up_proj").replace(
            "experts.down_proj.weight", "experts.down_proj"
        ): torch.from_numpy(v.astype("float32"))
        for k, v in load_file(str(src / "model.safetensors")).items()
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = ("vision", "encoder.language_model", "lm_head")
    untied = [k for k in missing if not any(t in k for t in tied)]
    if untied or unexpected:
        raise ValueError(f"{src}: weights do not map ({(untied + unexpected)[:3]} ...).")
    _save(model, out, text)
    for name in ("generation_config.json", "tokenizer.model", "tokenizer.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("kind", nargs="?", choices=sorted(SHAPES), default="shape")
    p.add_argument("--from-mlx", type=Path, help="convert this MLX checkpoint instead")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tic = time.perf_counter()
    if a.from_mlx:
        from_mlx(a.from_mlx, a.out)
    else:
        build(a.out, a.kind, a.layers, a.experts, a.top_k, a.seed)
    print(f"[INFO] Wrote {a.out} in {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main()
