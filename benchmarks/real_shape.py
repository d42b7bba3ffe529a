"""One decoder layer at the release's shapes, timed, and the 30-layer step projected.

    . ../shared/tools/cpu_openblas_env.sh
    python -m benchmarks.real_shape [--widths 256,128,64,32,16] [--cache 1024] [--repeats 2]
        [--run "exact=exact:6.34" --run "student=exact:3.2" --run "M+compact=compact:3.14:0.82"]

The model is this port's `Model` with the released text config (hidden 2816, 128 experts
of 704, top-8, vocabulary 262,144, canvas 256) but two layers, one sliding and one full
attention, random weights quantized with the converter's mixed recipe (`quant_predicate`:
experts and self-conditioning at 4 bits, embedding, attention, dense MLP and router at 8),
after a prefill of `--cache` random tokens. Random routing is close to uniform, the worst
case for expert reuse. Timed apart (median of `--repeats` after one warm-up call; the head
and the exact self-conditioning product, plain matmuls and the slowest parts, once):

- each layer kind at each width: the full canvas through `DecoderLayer` (exact and fast
  default) and, below 256, `DecoderLayer.denoise_active` on that many positions with the
  others' K/V from a full pass (compaction);
- the head (final norm + tied 8-bit embedding, the width's rows), the self-conditioning
  product (exact: probabilities [C, V] @ E; fast: `gathered_self_conditioning`, k = 64)
  and the sampler (`loop.step` on given logits: exact's full-vocabulary statistics, fast
  mode's top-64), and the input (embedding + self-conditioning MLP).

Projection: a 30-layer step (25 sliding + 5 full) = 25 sliding + 5 full layers + input +
self-conditioning + head + sampler, at each width (exact: its own product and sampler;
fast and compacted widths: fast mode's). Each `--run NAME=ROW:FORWARDS[:FRACTION]` (ROW: exact, fast
or compact; FRACTION: the share of canvas positions a compacted run forwards, from
`fast_quality`'s pos / (fwd x canvas)) becomes a tok/s ratio vs the first run: forwards x
projected step, the compacted step interpolated in width. Timings are this machine's (the
CPU's quantized kernels are scalar, so the head weighs more here than on a GPU).
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from benchmarks.bench_step import time_step as timed
from mlx_diffgemma import DiffusionConfig
from mlx_diffgemma.convert import quantization_plan
from mlx_diffgemma.diffusion import sampler as S
from mlx_diffgemma.diffusion.canvas import CanvasPlan
from mlx_diffgemma.diffusion.steps import make_loop, prefill
from mlx_diffgemma.model import Model, ModelArgs, embed_scaled

SLIDING, FULL = 25, 5  # the release's 30 layers: every sixth is full attention
K = 64  # fast mode's default top_k and self_conditioning_top_k


def release_model(experts: int, bits: int, vocab_size: int) -> Model:
    """Two layers (sliding, full) of the released shapes, quantized as the converter does."""
    args = ModelArgs(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_global_key_value_heads=2,
        num_experts=experts,
        vocab_size=vocab_size,
    )
    mx.random.seed(0)
    model = Model(args)
    plan, _ = quantization_plan(model, 64, bits, "mixed")
    nn.quantize(model, class_predicate=lambda path, m: plan.get(path, False))
    for layer in model.layers:  # one layer's float weights in memory at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def layer_times(model, cache, widths, repeats) -> dict:
    """{(kind, width): s} of one sliding and one full layer: the whole canvas through
    `DecoderLayer`, fewer positions through `denoise_active` (the rest's K/V stale)."""
    text = model.model.decoder
    C, H = model.args.canvas_length, model.args.hidden_size
    x = mx.random.normal((1, C, H)) * 0.1
    every = mx.arange(C, dtype=mx.int32)[None]
    out = {}
    for i, kind in enumerate(("sliding", "full")):
        layer, c = text.layers[i], cache[i]
        kv = layer.denoise_active(x, c, every, None)[1]
        for w in widths:
            if w == C:
                fn = partial(layer, x, c, False, layer.layer_scalar)
            else:
                pos = np.sort(np.random.default_rng(w).choice(C, w, replace=False))
                pos = mx.array(pos, dtype=mx.int32)[None]
                fn = partial(layer.denoise_active, x[:, :w], c, pos, kv)
            out[kind, w] = timed(fn, repeats)
            print(f"  layer {kind:7} width {w:3}: {1000 * out[kind, w]:9.1f} ms", flush=True)
    return out


def sampler_time(model, config, w: int, repeats: int) -> float:
    """`loop.step` (statistics, sample, accept, renoise, stop test, next conditioning) on
    given logits of a `w`-wide canvas: what a compacted step's proposal does on w rows."""
    loop = make_loop(
        model,
        config,
        S.RandomDraws(mx.random.key(0), model.args.vocab_size),
        S.make_accept(config),
        1,
    )
    state = loop.start(CanvasPlan.free(w))
    logits = mx.random.normal((1, w, model.args.vocab_size)) * 5
    return timed(lambda: loop.step(state, logits, None, 1000)[0], repeats)


def input_pass(model, ids, soft):
    """Embedding + the self-conditioning MLP: the decoder's input."""
    text = model.model.decoder
    return text.self_conditioning(embed_scaled(text.embed_tokens, ids, model.embed_scale), soft)


def head_pass(model, x):
    """Final norm + the tied embedding as the LM head."""
    text = model.model.decoder
    return text.embed_tokens.as_linear(text.norm(x))


def part_times(model, widths, repeats) -> dict:
    """{(part, width): s}: input (embedding + self-conditioning MLP), head, the
    self-conditioning product and the sampler, exact and fast."""
    C, H, V = model.args.canvas_length, model.args.hidden_size, model.args.vocab_size
    x, ids = mx.random.normal((1, C, H)), mx.random.randint(0, V, (1, C))
    exact = DiffusionConfig(max_new_tokens=C, max_denoising_steps=1000)
    fast = exact.replace(mode="fast", top_k=K, self_conditioning_top_k=K)
    top_ids = mx.random.randint(0, V, (1, C, K))
    weights = mx.softmax(mx.random.normal((1, C, K)), axis=-1)
    probs = mx.softmax(mx.random.normal((1, C, V)), axis=-1)
    out = {("sc exact", C): timed(lambda: model.self_conditioning_embeddings(probs), 1, False)}
    out["sampler exact", C] = sampler_time(model, exact, C, repeats)
    for w in widths:
        out["input", w] = timed(partial(input_pass, model, ids[:, :w], x[:, :w] * 0.01), repeats)
        out["head", w] = timed(partial(head_pass, model, x[:, :w]), 1, False)
        sc = partial(model.gathered_self_conditioning, top_ids[:, :w], weights[:, :w])
        out["sc fast", w] = timed(sc, repeats)
        out["sampler fast", w] = sampler_time(model, fast, w, repeats)
    for (name, w), s in out.items():
        print(f"  {name:14} width {w:3}: {1000 * s:9.1f} ms", flush=True)
    return out


def project(layers: dict, parts: dict, widths, C: int) -> dict:
    """{row: (projected 30-layer step s, layers' share, width)}."""
    rows = {}
    for name, w, sc, sampler in [("exact", C, "sc exact", "sampler exact")] + [
        ("fast (default)" if w == C else f"compact {w}", w, "sc fast", "sampler fast")
        for w in widths
    ]:
        body = SLIDING * layers["sliding", w] + FULL * layers["full", w]
        rest = parts["input", w] + parts[sc, w] + parts["head", w] + parts[sampler, w]
        rows[name] = (body + rest, body / (body + rest), w)
    return rows


def parse_run(text: str):
    name, _, spec = text.partition("=")
    row, fwd, *frac = spec.split(":")
    if row not in ("exact", "fast", "compact") or not name:
        raise SystemExit(f"--run {text!r}: write NAME=exact|fast|compact:FORWARDS[:FRACTION].")
    return name, row, float(fwd), float(frac[0]) if frac else 1.0


def canvas_seconds(rows: dict, row: str, forwards: float, fraction: float, C: int) -> float:
    """Forwards x the projected step; a compacted step interpolated at fraction x C."""
    fast = rows["fast (default)"][0]
    if row != "compact" or fraction >= 1:
        return forwards * (rows["exact"][0] if row == "exact" else fast)
    ws = sorted((v[2], v[0]) for k, v in rows.items() if k.startswith("compact")) + [(C, fast)]
    xs, ys = zip(*ws)
    return forwards * float(np.interp(fraction * C, xs, ys))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="256,128,64,32,16", help="canvas widths to time")
    p.add_argument("--cache", type=int, default=1024, help="prompt tokens in the cache")
    p.add_argument("--experts", type=int, default=128, help="experts (128: the release)")
    p.add_argument("--vocab-size", type=int, default=262144, help="(262,144: the release)")
    p.add_argument("--bits", type=int, default=4, help="bits of experts + self-conditioning")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--run", action="append", default=[], help="NAME=ROW:FORWARDS[:FRACTION]")
    p.add_argument("--save", type=Path, help="write the timings (JSON) here")
    p.add_argument("--load", type=Path, help="project from saved timings, timing nothing")
    a = p.parse_args()
    runs = [parse_run(r) for r in a.run]
    if a.load:
        saved = json.loads(a.load.read_text())
        report({k: tuple(v) for k, v in saved["rows"].items()}, runs, saved["canvas"])
        return
    tic = time.perf_counter()
    model = release_model(a.experts, a.bits, a.vocab_size)
    C, V = model.args.canvas_length, model.args.vocab_size
    widths = sorted({int(w) for w in a.widths.split(",") if 0 < int(w) <= C} | {C}, reverse=True)
    cache = model.make_cache()
    prefill(model, (mx.arange(a.cache)[None] * 7919 + 13) % (V - 1000) + 1000, cache)
    print(
        f"{mx.default_device()}: built, {a.cache} tokens prefilled, {time.perf_counter() - tic:.0f} s"
    )
    layers = layer_times(model, cache, widths, a.repeats)
    parts = part_times(model, widths, a.repeats)
    rows = project(layers, parts, widths, C)
    if a.save:
        flat = {f"{k} {w}": v for (k, w), v in {**layers, **parts}.items()}
        saved = {"canvas": C, "device": str(mx.default_device()), "rows": rows, "seconds": flat}
        a.save.write_text(json.dumps(saved, indent=1))
    report(rows, runs, C)


def report(rows: dict, runs, C: int):
    print("\n| step (30 layers, projected) | width | s | layers' share | vs exact |")
    print("|---|---|---|---|---|")
    for name, (sec, share, w) in rows.items():
        print(f"| {name} | {w} | {sec:.2f} | {share:.0%} | {rows['exact'][0] / sec:.2f}x |")
    if runs:
        base = canvas_seconds(rows, *runs[0][1:], C)
        print(f"\n| run | step | forwards / canvas | s / canvas | tok/s vs {runs[0][0]} |")
        print("|---|---|---|---|---|")
        for name, row, fwd, frac in runs:
            sec = canvas_seconds(rows, row, fwd, frac, C)
            print(f"| {name} | {row} | {fwd:.2f} | {sec:.1f} | {base / sec:.2f}x |")


if __name__ == "__main__":
    main()
