"""Peak memory of one QLoRA step at the real model's shapes, projected to 30 layers.

    python benchmarks/qlora_memory.py                      # seq 256/512/1024, +/- checkpointing
    python benchmarks/qlora_memory.py --seq 512 --layers 1,2

Each run (a fresh subprocess) builds the real geometry (hidden 2816, 128 experts of 704,
top-8, vocabulary 262,144, canvas 256) with 1 and with 2 layers, quantizes it with the
release recipe (experts and self-conditioning 4-bit, attention/dense MLP/router/embedding
8-bit), wires rank-8 LoRA on every linear layer (experts included) and runs one training
step (both self-conditioning passes, encoder loss, Adam update) on a batch of 1: the
prompt + answer is `seq` tokens, the trained canvas its last 256. The per-layer slope
(2 layers - 1 layer) projects the 30-layer peak: peak(1) + 29 * slope. Weights are
random (memory does not depend on their values).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL = {
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "text_config": {"model_type": "diffusion_gemma_text", "num_hidden_layers": 1},
}


def one_run(layers: int, seq: int, grad_checkpoint: bool, vocab: int = 262144) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_diffgemma.model import Model, ModelArgs
    from mlx_diffgemma.tuner.adapters import default_lora_keys, setup_lora
    from mlx_diffgemma.tuner.data import Example, make_batch
    from mlx_diffgemma.tuner.losses import Objective, diffusion_loss, sample_draws
    from mlx_diffgemma.tuner.trainer import make_optimizer

    config = json.loads(json.dumps(REAL))
    config["text_config"]["num_hidden_layers"] = layers
    config["text_config"]["vocab_size"] = vocab
    config["text_config"]["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    predicate = model.quant_predicate
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and predicate(p, m),
    )
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    lp = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": default_lora_keys(model)}
    setup_lora(model, layers, lp)
    C = model.args.canvas_length
    ex = Example([2] + [7] * (seq - C - 1), [9] * (C - 1), 1)
    batch = make_batch([ex], C, 0)
    obj = Objective(grad_checkpoint=grad_checkpoint)
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
        "vocab": vocab,
        "weights_gb": weights / 1e9,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "seconds": time.perf_counter() - tic,
        "loss": loss.item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", default="256,512,1024")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: layers,seq,gc
    args = p.parse_args(argv)
    if args.one:
        layers, seq, gc, vocab = (int(x) for x in args.one.split(","))
        print(json.dumps(one_run(layers, seq, bool(gc), vocab)))
        return
    print(
        f"{'seq':>5} {'ckpt':>5} {'1 layer GB':>10} {'2 layers GB':>11} {'per layer':>9} "
        f"{'30 layers GB':>12} {'step s (1 layer)':>16}"
    )
    for seq in (int(s) for s in args.seq.split(",")):
        for gc in (0, 1):
            runs = {}
            for layers in (int(n) for n in args.layers.split(",")):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", f"{layers},{seq},{gc}"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[layers] = json.loads(out.stdout.strip().splitlines()[-1])
            one, two = runs[1]["peak_gb"], runs.get(2, runs[1])["peak_gb"]
            slope = two - one
            print(
                f"{seq:>5} {'yes' if gc else 'no':>5} {one:>10.2f} {two:>11.2f} {slope:>9.2f} "
                f"{one + 29 * slope:>12.1f} {runs[1]['seconds']:>16.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
