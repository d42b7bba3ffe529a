"""What one denoising step costs, per fast-mode setting and per compaction width.

    python -m benchmarks.bench_step [--checkpoint PATH] [--widths 256,128,64,32,16] [--repeats 3]

On a random checkpoint the steps a canvas takes are an artifact of the weights (the
shape checkpoint's peaked logits let monotone commit finish a canvas in one step), so
this times the step itself, on the real code paths: the decoder forward, the pass over
the vocabulary (softcap, temperature, exp, entropy, argmax; or fast mode's top-k), the
sample and the next step's self-conditioning. Rows:

  exact          `denoise` + full softmax stats + [C, V] @ [V, H] self-conditioning
  fast           `denoise` + top-k stats + gathered self-conditioning (k = 64)
  compact n      `denoise_active` on n of the C positions (stale K/V for the rest) +
                 top-k stats + gathered self-conditioning: a compacted step
  repair         one full `denoise` + argmax

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
from mlx_diffgemma import load_model
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion import topk as T
from mlx_diffgemma.diffusion.steps import (
    _cpu_lanes,
    _stats,
    _top_k_stats,
    generation_stream,
    prefill,
)


def steps(model, cache, k: int):
    """name -> a function building one step (lazy) from a (1, C) canvas."""
    C, V, H = model.args.canvas_length, model.args.vocab_size, model.args.hidden_size
    cap, temp = model.args.final_logit_softcapping, mx.array(0.6)
    lanes = _cpu_lanes(generation_stream())
    probs = mx.softmax(mx.random.normal((1, C, V)), axis=-1)
    cond = mx.random.normal((1, C, H)).astype(model.model.decoder.embed_tokens.weight.dtype)
    u = mx.random.uniform(shape=(1, C))

    def exact(x):
        logits = model.denoise(x, cache, self_conditioning_probs=probs, apply_softcap=False)
        p, ent, argmax = _stats(logits, temp, cap, None, lanes)
        return [ent, argmax, S.sample_categorical(p, u), model.self_conditioning_embeddings(p)]

    def top_k_step(logits):
        p, ent, argmax, ids = _stats(logits, temp, cap, None, lanes, _top_k_stats(k))
        sample = S.sample_categorical(p, u[:, : p.shape[1]])
        w, ids2 = T.top_k_weights(p, k, ids)
        return [ent, argmax, sample, model.gathered_self_conditioning(ids2, w)]

    def fast(x):
        return top_k_step(
            model.denoise(x, cache, self_conditioning_embeddings=cond, apply_softcap=False)
        )

    every = mx.arange(C)[None]
    _, kv = model.denoise_active(mx.zeros((1, C), mx.int32), every, cache, None, cond)
    mx.eval(kv, probs, cond)

    def compact(n):
        def step(x):
            pos = every[:, :n]
            logits, _ = model.denoise_active(x[:, :n], pos, cache, kv, cond[:, :n])
            return top_k_step(logits)

        return step

    def repair(x):
        logits = model.denoise(x, cache, self_conditioning_embeddings=cond, apply_softcap=False)
        return [mx.argmax(logits, axis=-1)]

    return {"exact": exact, "fast": fast, "repair": repair}, compact


def time_step(fn, x, repeats: int) -> float:
    with mx.stream(generation_stream()):
        mx.eval(fn(x))  # compile and first-call costs
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(fn(x))
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
    x = mx.random.randint(1000, V, (1, C), key=mx.random.key(0))
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
        ms = 1000 * time_step(fn, x, a.repeats)
        exact = exact or ms
        print(f"{name:14} {ms:8.0f} {exact / ms:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
