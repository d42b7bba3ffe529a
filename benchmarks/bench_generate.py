"""Generation benchmark: this port, mlx-vlm and transformers side by side on one checkpoint.

    python -m benchmarks.bench_generate --config shape --steps 3 --max-new-tokens 512 --repeats 2
    python -m benchmarks.bench_generate --fast --steps 3 --max-new-tokens 512 --repeats 2

On a trained toy (mlx-vlm needs transformers' layout with a vision tower, which
`shape_checkpoint.py --from-mlx` writes; this port reads either):

    python -m benchmarks.shape_checkpoint TOY_HF --from-mlx examples/sudoku_toy
    python -m benchmarks.bench_generate --checkpoint TOY_HF --eos --k 4 --steps 48 \
        --max-new-tokens 40 --prompt "460200500004120306340520604102013065|" --fast

`--fast` compares exact mode, fast mode, each fast-mode approximation alone and mlx-vlm's
default (confidence threshold at temperature 0, canvas shrink) with mlx-vlm entropy-bound.
A runtime "mlx_diffgemma:NAME" is this port with the settings FAST_VARIANTS[NAME];
"mlx_vlm:default" is mlx-vlm's own default sampler. On a random checkpoint no canvas stops
early, so these rows compare the cost of a step; the step counts that fast mode saves on a
trained model are measured by benchmarks/fast_quality.py.

Every run is a fresh subprocess (load, one warm-up generation of the same shapes, then the
timed one) with the same prompt ids, canvas count, step count and seed; runs alternate between
runtimes. On a random checkpoint EOS is disabled and early stopping cannot fire, so every
runtime does the same work: canvases x steps denoising forwards plus the re-encodes.

Columns: prompt tokens, canvases, denoising steps per canvas, tokens per forward, ms per
denoising step (generation time / steps, re-encodes included), ms per re-encode (where the
runtime exposes it), generated tok/s, work tok/s (canvas positions x steps / s), peak memory
(MLX allocator; process RSS for torch), host syncs per step (measured for this port;
for mlx-vlm read from its source: one `.item()` per step for the stability test, one more
on steps where it holds), decoder forwards, canvas positions forwarded, distinct decoder
input widths (compiled shapes; compaction's buckets) and full-vocabulary passes per step.

On Linux CPU the OpenBLAS preload (shared/docs/PERFORMANCE.md §3.4) is set for every child
unless --no-openblas. mlx-vlm runs in its own venv (--mlx-vlm-python); see benchmarks/README.md.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.peers import RunSettings, run_peer_subprocess
from benchmarks.shape_checkpoint import build

MLX_VLM_SOURCE_SYNCS = "1-2 (source)"
_OFF = dict(mode="fast", top_k=0, self_conditioning_top_k=0, monotone_commit=False, canvas_shrink=0)
_M = {"mode": "fast", "monotone_commit": True}
FAST_VARIANTS = {
    "fast": {"mode": "fast"},
    "fast+confidence": {"mode": "fast", "commit_rule": "confidence"},
    "top_k": {**_OFF, "top_k": 64},
    "sc_top_k": {**_OFF, "self_conditioning_top_k": 64},
    "monotone": {**_OFF, "monotone_commit": True},
    "confidence": {**_OFF, "commit_rule": "confidence"},
    "canvas_shrink": {**_OFF, "canvas_shrink": 64},
    "repair": {**_OFF, "repair": 1},
    "commit_argmax": {**_OFF, "monotone_commit": True, "commit_argmax": True},
    "commit_stable": {**_OFF, "monotone_commit": True, "commit_stable": True},
    "fast+monotone": _M,
    "fast+monotone+compact": {**_M, "compact": True},
    "fast+monotone+repair": {**_M, "repair": 1},
    "fast+monotone+stable+repair": {**_M, "commit_stable": True, "repair": 1},
    "fast+monotone+compact+repair": {**_M, "compact": True, "repair": 1},
}
FAST_RUNTIMES = ",".join(
    ["mlx_diffgemma"]
    + [f"mlx_diffgemma:{v}" for v in FAST_VARIANTS]
    + ["mlx_vlm:default", "mlx_vlm"]
)


def vocab_passes(settings) -> int:
    """Passes over the (C, V) logits per step besides the LM head itself (from the code).

    Exact: the softmax pass (cap, temperature, exp, entropy, sample) and the (C, V) @ (V, H)
    self-conditioning product. top_k replaces the softmax pass by a block-max pass; without
    self_conditioning_top_k it still needs the full softmax for the conditioning.
    self_conditioning_top_k replaces the product by a pass that finds the top k.
    """
    top_k = settings.get("top_k", 64 if settings.get("mode") == "fast" else 0)
    sc = settings.get("self_conditioning_top_k", 64 if settings.get("mode") == "fast" else 0)
    if top_k:
        return 1 + (0 if sc else 2)
    return 2


def with_top_k(settings, k: int):
    """A copy of fast-mode `settings` with k for both top-k sizes where they are on
    (given non-zero, or left to fast mode's value), e.g. below a toy's vocabulary."""
    settings = dict(settings)
    for key in ("top_k", "self_conditioning_top_k"):
        if settings.get(key) or (settings.get("mode") == "fast" and key not in settings):
            settings[key] = k
    return settings


def runner_args(rt, k: int = 64):
    """(runner, label, extra keyword arguments) of a runtime name; `k` replaces the top-k
    sizes of fast mode's variants (below a toy's vocabulary)."""
    base, _, variant = rt.partition(":")
    if base == "mlx_diffgemma" and variant:
        if variant not in FAST_VARIANTS:
            raise SystemExit(f"Unknown variant {variant!r}; one of {', '.join(FAST_VARIANTS)}.")
        return base, rt, {"fast_settings": with_top_k(FAST_VARIANTS[variant], k)}
    if base == "mlx_vlm" and variant == "default":
        return base, rt, {"diffusion_sampler": "confidence-threshold"}
    if variant:
        raise SystemExit(f"Unknown runtime {rt!r}.")
    return base, rt, {}


def default_checkpoint(kind: str) -> Path:
    root = Path(os.environ.get("MLX_DIFFGEMMA_CACHE", Path.home() / ".cache" / "mlx_diffgemma"))
    return root / "bench" / kind


def row(r, canvas_length, label):
    steps = r["total_denoising_steps"]
    gen = r["generate_s"]
    enc = r.get("encode_s_per_canvas") or []
    enc = [e for e in enc[1:]]  # the first canvas has nothing to re-encode
    syncs = r.get("host_syncs_per_step")  # plus one per re-encoded canvas
    return {
        "runtime": label,
        "prompt": r["prompt_tokens"],
        "canvases": r["num_canvases"],
        "steps/canvas": "/".join(map(str, r["steps_per_canvas"])),
        "tok/fwd": r["tokens_per_forward"],
        "ms/step": 1000 * gen / steps,
        "ms/encode": 1000 * statistics.mean(enc) if enc else None,
        "tok/s": r["num_generated_tokens"] / gen,
        "work tok/s": canvas_length * steps / gen,
        "peak GB": r["peak_memory_gb"] if r["peak_memory_gb"] is not None else r["peak_rss_gb"],
        "syncs/step": f"{syncs:.2f}"
        if syncs is not None
        else (MLX_VLM_SOURCE_SYNCS if r["peer"] == "mlx-vlm" else "n/a"),
        "forwards": r.get("forwards", steps),
        "positions": r.get("positions_forwarded", canvas_length * steps),
        "shapes": r.get("forward_shapes", "-"),
        "V passes/step": r.get("vocab_passes", "-"),
    }


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def print_table(rows):
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r[k]).ljust(widths[k]) for k in keys))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="HF-layout folder; default: build --config")
    p.add_argument("--config", choices=["shape", "tiny"], default="shape")
    p.add_argument("--runtimes", default="mlx_diffgemma,mlx_vlm,transformers")
    p.add_argument("--fast", action="store_true", help=f"--runtimes {FAST_RUNTIMES}")
    p.add_argument("--mlx-vlm-python", default=os.environ.get("MLX_VLM_PYTHON", sys.executable))
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument(
        "--prompt", help="text after <bos>, tokenized by the checkpoint (e.g. a trained toy's)"
    )
    p.add_argument(
        "--eos",
        action="store_true",
        help="keep the checkpoint's EOS and early stops (a trained checkpoint): runtimes then "
        "run the steps their samplers choose",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="denoising steps per canvas")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=64, help="k of fast mode's top_k settings")
    p.add_argument("--no-openblas", action="store_true")
    p.add_argument("--json", type=Path, help="also write all results here")
    a = p.parse_args()

    path = a.checkpoint or default_checkpoint(a.config)
    if not (path / "config.json").exists():
        print(f"[INFO] Building the '{a.config}' checkpoint in {path} (once)", flush=True)
        build(path, a.config)
    config = json.loads((path / "config.json").read_text())
    canvas = config["canvas_length"]
    vocab = config["text_config"]["vocab_size"]
    lo = min(1000, vocab // 4)  # ordinary text ids, clear of the special tokens
    prompt = [2] + [(7919 * i + 13) % (vocab - lo) + lo for i in range(a.prompt_tokens - 1)]
    if a.prompt is not None:
        from mlx_diffgemma.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(path)
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(a.prompt)
    # Random weights: without --eos every runtime runs every canvas (no EOS ids).
    settings = RunSettings(
        a.max_new_tokens, a.steps, a.seed, warmup=True, eos_token_ids=None if a.eos else []
    )
    runtimes = (FAST_RUNTIMES if a.fast else a.runtimes).split(",")
    python = {"mlx_vlm": a.mlx_vlm_python}
    print(
        f"[INFO] {path.name}: hidden {config['text_config']['hidden_size']}, vocab {vocab}, "
        f"{config['text_config']['num_hidden_layers']} layers, {config['text_config']['num_experts']} "
        f"experts; prompt {len(prompt)}, {a.max_new_tokens} new tokens, {a.steps} steps/canvas, "
        f"OpenBLAS {'off' if a.no_openblas else 'on'}",
        flush=True,
    )
    results = {r: [] for r in runtimes}
    rows = []
    for rep in range(a.repeats):
        for rt in runtimes:  # alternate, so drift on a shared machine hits all runtimes alike
            tic = time.perf_counter()
            runner, label, extra = runner_args(rt, a.k)
            r = run_peer_subprocess(
                runner,
                python.get(runner, sys.executable),
                path,
                prompt,
                settings,
                openblas=not a.no_openblas,
                **extra,
            )
            if runner == "mlx_diffgemma":
                r["vocab_passes"] = vocab_passes(extra.get("fast_settings", {}))
            r["prompt_tokens"] = len(prompt)
            results[rt].append(r)
            rows.append(row(r, canvas, label))
            print(
                f"[INFO] run {rep + 1}/{a.repeats} {rt}: {time.perf_counter() - tic:.0f} s wall",
                flush=True,
            )
    print()
    print_table(rows)
    print()
    tps = {
        rt: statistics.median(x["num_generated_tokens"] / x["generate_s"] for x in results[rt])
        for rt in runtimes
    }
    for ours in [rt for rt in runtimes if rt.startswith("mlx_diffgemma")]:
        for rt in runtimes:
            if rt != ours and (ours == "mlx_diffgemma" or not rt.startswith("mlx_diffgemma:")):
                print(f"{ours} / {rt}: {tps[ours] / tps[rt]:.2f}x tokens/s (median of {a.repeats})")
    if a.json:
        a.json.write_text(
            json.dumps(
                {"settings": vars(a) | {"checkpoint": str(path)}, "results": results},
                default=str,
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
