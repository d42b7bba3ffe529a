"""What one denoising step costs, per fast-mode setting and per compaction width.

    python -m benchmarks.bench_step [--checkpoint PATH] [--widths 256,128,64,32,16] [--repeats 3]

On a random checkpoint the steps a canvas takes are an artifact of the weights (the
shape checkpoint's peaked logits let monotone commit finish a canvas in one step), so
this times the step itself with the public loop classes (`diffusion.steps.make_loop`,
as generation builds them): `forward` (the decoder, self-conditioned) and `step` (the
pass over the vocabulary, sample, accept, renoise, stop test). Rows:

  exact          DenoisingLoop: full softmax stats + [C, V] @ [V, H] self-conditioning
  fast           FastLoop: top-k stats + gathered self-conditioning (k = 64)
  compact n      CompactLoop.forward_active on n of the C positions (stale K/V for the
                 rest) + its step: a compacted step
  repair         FastLoop.repair: one full forward + argmax

Multiply by the forwards (and widths) a trained model needs, from
benchmarks/fast_quality.py, to compare settings (benchmarks/README.md does).
"""

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.bench_generate import default_checkpoint
from benchmarks.shape_checkpoint import build
from mlx_diffgemma import DiffusionConfig, load_model
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.canvas import CanvasPlan
from mlx_diffgemma.diffusion.steps import make_loop, prefill


def loop_after_one_step(model, cache, config, plan):
    """A public loop (`make_loop`, as `generate_step` builds it) one step into a canvas,
    so its state carries the conditioning its mode feeds the next forward."""
    draws = S.RandomDraws(mx.random.key(0), model.args.vocab_size)
    loop = make_loop(model, config, draws, S.make_accept(config), 1)
    state = loop.start(plan)
    first = getattr(loop, "first_forward", loop.forward)(state, cache)
    state, _ = loop.step(state, first, None, config.max_denoising_steps)
    mx.eval(state)
    return loop, state


def steps(model, cache, k: int):
    """name -> a function building one step (lazy) with the loop classes' own methods:
    the forward, then `step` (stats, sample, accept, renoise, stop test, conditioning)."""
    C = model.args.canvas_length
    plan = CanvasPlan.free(C)
    # A huge number of steps keeps the temperature and the stop test as on a first step.
    exact = DiffusionConfig(max_new_tokens=C, max_denoising_steps=1000)
    fast = exact.replace(mode="fast", top_k=k, self_conditioning_top_k=k)
    compact = fast.replace(monotone_commit=True, compact=True, entropy_bound=1e-9)

    def timed(config):
        loop, state = loop_after_one_step(model, cache, config, plan)
        return lambda: loop.step(state, loop.forward(state, cache), None, 1000)[0]

    def repair():
        loop, state = loop_after_one_step(model, cache, fast, plan)
        return lambda: loop.repair(state, plan, cache).argmax

    def compacted(n):
        loop, state = loop_after_one_step(model, cache, compact, plan)
        positions = mx.arange(n, dtype=mx.int32)[None]
        ids, cond = state.canvas[:, :n], state.conditioning[:, :n]

        def step():
            logits = loop.forward_active(ids, cond, positions, cache)
            return loop.step(state, logits, None, 1000)[0]

        return step

    return {"exact": timed(exact), "fast": timed(fast), "repair": repair()}, compacted


def time_step(fn, repeats: int, warm: bool = True) -> float:
    """Median seconds of `fn` (evaluated), after one warm-up call (compile and first-call
    costs) unless `warm` is False."""
    if warm:
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="HF-layout folder; default: the shape one")
    p.add_argument("--widths", default="256,128,64,32,16", help="compaction widths to time")
    p.add_argument("--k", type=int, default=64, help="k of top_k and self_conditioning_top_k")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    path = a.checkpoint or default_checkpoint("shape")
    if not (path / "config.json").exists():
        build(path, "shape")
    model = load_model(path)
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    prompt = (mx.arange(a.prompt_tokens)[None] * 7919 + 13) % (V - 1000) + 1000
    prefill(model, prompt, cache)
    fns, compact = steps(model, cache, a.k)
    print(
        f"{path}: canvas {C}, vocab {V}, prompt {a.prompt_tokens}, k {a.k}, median of {a.repeats}"
    )
    print(f"{'step':14} {'ms':>8} {'vs exact':>9}")
    exact = None
    rows = list(fns.items()) + [
        (f"compact {n}", compact(int(n))) for n in a.widths.split(",") if int(n) <= C
    ]
    for name, fn in rows:
        ms = 1000 * time_step(fn, a.repeats)
        exact = exact or ms
        print(f"{name:14} {ms:8.0f} {exact / ms:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
