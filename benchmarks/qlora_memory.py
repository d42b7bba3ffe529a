"""Peak memory of one QLoRA step at the real model's shapes, projected to 30 layers.

    python -m benchmarks.qlora_memory --json qlora_memory.json   # seq 256/512/1024, +/- ckpt
    python -m benchmarks.qlora_memory --seq 512 --layers 1,2
    python -m benchmarks.qlora_memory --from-json qlora_memory.json   # the table again
    python -m benchmarks.qlora_memory --projection-only              # weight bytes only

Each run (a fresh subprocess) builds the real geometry (hidden 2816, 128 experts of 704,
top-8, vocabulary 262,144, canvas 256, full-attention KV heads 2) with 1 and with 2
layers, quantizes the experts to 4 bits (`gather_qmm`, as on a Mac), wires rank-8 LoRA on
every linear layer (experts included, mlx-lm's LoRASwitchLinear) and runs one training
step (both self-conditioning passes, encoder loss, Adam update) on a batch of 1: the
prompt + answer is `seq` tokens, the trained canvas its last 256. Weights are random
(memory does not depend on their values).

This CPU has no fast kernels for 8-bit or bf16 quantized matmuls, so everything but the
experts stays in fp32 and the step computes in fp32. The projection therefore separates:
- base weights: the release recipe's bytes (experts and self-conditioning 4-bit, the rest
  8-bit, bf16 norms), counted on a lazily built 30-layer model (nothing is allocated);
- LoRA parameters of 30 layers (fp32);
- the step's own memory (peak - resident weights: activations, gradients, Adam state,
  temporaries), measured with 1 and 2 layers: 30 layers = own(1) + 29 * (own(2) - own(1)).
  The "bf16 est." column halves it (activations in bf16, as a Mac run would keep them);
  that column is an estimate, the fp32 one is measured.
A Mac "fits" when the projected peak is at most 75% of its unified memory (macOS' default
GPU wired limit for large-memory Macs; `sudo sysctl iogpu.wired_limit_mb` raises it).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REAL = {
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "text_config": {"model_type": "diffusion_gemma_text", "num_global_key_value_heads": 2},
}
MACS_GB = (16, 24, 32, 36, 48, 64, 96, 128, 192)
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def real_model(layers: int):
    from mlx_diffgemma.model import Model, ModelArgs

    config = json.loads(json.dumps(REAL))
    config["text_config"]["num_hidden_layers"] = layers
    if layers < 30:  # keep a full-attention layer (the largest KV) in every run
        config["text_config"]["layer_types"] = ["sliding_attention"] * (layers - 1) + [
            "full_attention"
        ]
    return Model(ModelArgs.from_dict(config))


def add_lora(model) -> int:
    """Rank-8 LoRA on every layer's linear layers; returns the LoRA parameter count."""
    from mlx.utils import tree_flatten

    from mlx_diffgemma.tuner.adapters import default_lora_keys, setup_lora

    setup_lora(model, len(model.layers), {**LORA, "keys": default_lora_keys(model)})
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def projection_bytes() -> dict:
    """Release-recipe base bytes and LoRA parameters of the 30-layer model (lazy, unevaluated)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = real_model(30)
    model.set_dtype(mx.bfloat16)
    pred = model.quant_predicate
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and pred(p, m),
    )
    base = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {"base_bytes": base, "lora_params": add_lora(model)}


def one_run(layers: int, seq: int, grad_checkpoint: bool) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_diffgemma.tuner.data import Example, make_batch
    from mlx_diffgemma.tuner.losses import Objective, diffusion_loss, sample_draws
    from mlx_diffgemma.tuner.trainer import make_optimizer

    model = real_model(layers)
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: p.endswith(("gate_up_proj", "down_proj")) and ".experts." in p,
    )
    lora_params = add_lora(model)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    C = model.args.canvas_length
    ex = Example([2] + [7] * (seq - C - 1), [9] * (C - 1), 1)
    batch = make_batch([ex], C, 0)
    obj = Objective(grad_checkpoint=grad_checkpoint, self_conditioning_prob=1.0)
    draws = sample_draws(mx.random.key(0), batch.n_canvases, C, model.args.vocab_size, obj)
    opt = make_optimizer(1e-4, 10)
    step = nn.value_and_grad(model, lambda m: diffusion_loss(m, batch, draws, obj)[0])
    mx.reset_peak_memory()
    tic = time.perf_counter()
    loss, grads = step(model)
    opt.update(model, grads)
    mx.eval(loss, model.parameters(), opt.state)
    return {
        "layers": layers,
        "seq": seq,
        "grad_checkpoint": grad_checkpoint,
        "lora_params": lora_params,
        "weights_gb": weights / 1e9,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "seconds": time.perf_counter() - tic,
        "loss": loss.item(),
    }


def child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def smallest_mac(gb: float) -> str:
    fits = [m for m in MACS_GB if 0.75 * m >= gb]
    return f"{fits[0]} GB" if fits else f"> {MACS_GB[-1]} GB"


def print_table(results: dict) -> None:
    proj = results["projection"]
    lora_gb = 4 * proj["lora_params"] / 1e9
    base_gb = proj["base_bytes"] / 1e9
    print(
        f"30-layer base weights (release recipe): {base_gb:.2f} GB; LoRA (rank 8, fp32): "
        f"{lora_gb:.2f} GB ({proj['lora_params']:,} parameters)"
    )
    print(
        f"{'seq':>5} {'ckpt':>5} {'1L peak':>8} {'2L peak':>8} {'1L wts':>7} {'own/layer':>9} "
        f"{'30L fp32':>9} {'30L bf16 est.':>13} {'fits (fp32/bf16)':>17} {'step s':>7}"
    )
    for row in results["rows"]:
        one, two = row["runs"]["1"], row["runs"]["2"]
        own1 = one["peak_gb"] - one["weights_gb"]
        slope = (two["peak_gb"] - two["weights_gb"]) - own1
        own30 = own1 + 29 * slope
        fp32, bf16 = base_gb + lora_gb + own30, base_gb + lora_gb + own30 / 2
        print(
            f"{row['seq']:>5} {'yes' if row['grad_checkpoint'] else 'no':>5} "
            f"{one['peak_gb']:>8.2f} {two['peak_gb']:>8.2f} {one['weights_gb']:>7.2f} "
            f"{slope:>9.3f} {fp32:>9.1f} {bf16:>13.1f} "
            f"{smallest_mac(fp32) + ' / ' + smallest_mac(bf16):>17} {one['seconds']:>7.1f}",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", default="256,512,1024")
    p.add_argument("--json", help="Also write the raw results here.")
    p.add_argument("--from-json", help="Print the table of an earlier --json run.")
    p.add_argument("--projection-only", action="store_true", help="Only the weight bytes.")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: layers,seq,ckpt
    args = p.parse_args(argv)
    if args.one:
        layers, seq, gc = (int(x) for x in args.one.split(","))
        print(json.dumps(one_run(layers, seq, bool(gc))))
        return
    if args.projection_only:
        print(json.dumps(projection_bytes()))
        return
    if args.from_json:
        print_table(json.loads(Path(args.from_json).read_text()))
        return
    results = {"projection": child("--projection-only"), "rows": []}
    for seq in (int(s) for s in args.seq.split(",")):
        for gc in (0, 1):
            runs = {str(n): child("--one", f"{n},{seq},{gc}") for n in (1, 2)}
            results["rows"].append({"seq": seq, "grad_checkpoint": bool(gc), "runs": runs})
            print(
                f"seq {seq} ckpt {bool(gc)}: "
                + ", ".join(f"{n} layer(s) peak {r['peak_gb']:.2f} GB" for n, r in runs.items()),
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


if __name__ == "__main__":
    main()
