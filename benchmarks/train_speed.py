"""Training steps per second with the dense-experts path and with the sorted gather path.

    python -m benchmarks.train_speed [--hidden 128 --layers 4 --batch-size 32 --canvas 40]

The shapes are the shipped 6x6 Sudoku toy's by default (prompt 38 tokens, 36 answer
digits + EOS on one 40-token canvas, 4 experts, top-2). Each path runs the full objective (both self-conditioning passes, encoder loss)
with value_and_grad and an Adam update, compiled as mlx-lm's trainer compiles it; the
first two steps (compilation) are not timed.
"""

import argparse
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_diffgemma.tuner import toy
from mlx_diffgemma.tuner.adapters import setup_full
from mlx_diffgemma.tuner.data import Example, make_batch
from mlx_diffgemma.tuner.init import init_model
from mlx_diffgemma.tuner.losses import Objective, diffusion_loss, sample_draws
from mlx_diffgemma.tuner.trainer import make_optimizer


def steps_per_second(dense: bool, args) -> float:
    cfg = toy.tiny_config(
        16, args.canvas, hidden_size=args.hidden, num_hidden_layers=args.layers, sliding_window=256
    )
    model = init_model(cfg, 0)
    setup_full(model, -1)
    for layer in model.layers:
        layer.experts.dense = dense
    rng = np.random.default_rng(0)
    examples = [
        Example([2] + list(rng.integers(4, 14, 37)), list(rng.integers(4, 14, args.canvas - 4)), 1)
        for _ in range(args.batch_size)
    ]
    batch = make_batch(examples, args.canvas, 0, pad_to=8)
    obj = Objective()
    opt = make_optimizer(1e-3, 100)
    loss_grad = nn.value_and_grad(model, lambda m, d: diffusion_loss(m, batch, d, obj)[0])
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(draws):
        loss, grads = loss_grad(model, draws)
        opt.update(model, grads)
        return loss

    key = mx.random.key(0)
    for i in range(args.steps + 2):
        if i == 2:
            tic = time.perf_counter()
        key, sub = mx.random.split(key)
        draws = sample_draws(sub, batch.n_canvases, args.canvas, 16, obj)
        mx.eval(step(draws), state)
    return args.steps / (time.perf_counter() - tic)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--canvas", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    dense = steps_per_second(True, args)
    gathered = steps_per_second(False, args)
    print(
        f"hidden {args.hidden}, {args.layers} layers, batch {args.batch_size}, 4 experts top-2:"
        f" dense {dense:.2f} it/s, sorted gather_mm {gathered:.2f} it/s "
        f"({dense / gathered:.2f}x)"
    )


if __name__ == "__main__":
    main()
