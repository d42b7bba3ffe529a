"""Peak memory and speed of the streaming converter on real-shape synthetic checkpoints.

For each N, writes a bf16 checkpoint with the REAL tensor shapes of DiffusionGemma
26B-A4B (vocab 262144, hidden 2816, 128 experts) cut to N layers: one shard for the
embedding and friends, one shard per layer, random data, streamed to disk so the builder
never holds more than a chunk. Then converts it to 4-bit (mixed recipe by default) in a
fresh subprocess and reads that process's peak RSS with os.wait4.

    python -m benchmarks.convert_memory                 # N = 1, 2, 4
    python -m benchmarks.convert_memory --layers 1 2 4 8 --recipe uniform

Needs about 1.5 + 1.65 * N GB of disk per checkpoint (removed afterwards) under
--dir (default: the system temp folder). The input was just written, so it is read from
the page cache: the times are conversion cost, not disk speed.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffgemma.convert import build_lazy_model

ROOT = Path(__file__).resolve().parents[1]

FULL_LAYERS = 30
CHUNK = 32 << 20  # elements per generated chunk

# google/diffusiongemma-26B-A4B-it text_config (SPEC §1.1), layer count set per run.
RELEASE_TEXT = {
    "model_type": "diffusion_gemma_text",
    "vocab_size": 262144,
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "moe_intermediate_size": 704,
    "num_experts": 128,
    "top_k_experts": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "sliding_window": 1024,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "max_position_embeddings": 262144,
    "dtype": "bfloat16",
}


def release_config(n_layers: int) -> dict:
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 5
    types = types[:n_layers]
    types[-1] = "full_attention"  # transformers forces the last layer to full
    text = dict(RELEASE_TEXT, num_hidden_layers=n_layers, layer_types=types)
    return {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": 256,
        "dtype": "bfloat16",
        "text_config": text,
    }


def hf_name(key: str) -> str:
    # The checkpoint stores the fused expert tensors without a `.weight` suffix.
    if key.endswith((".experts.gate_up_proj.weight", ".experts.down_proj.weight")):
        return key[: -len(".weight")]
    return key


def write_shard(path: Path, tensors, pool) -> None:
    """Write a bf16 safetensors file chunk by chunk from a pool of random blocks."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    i = 0
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in tensors:
            left = math.prod(shape)
            while left:
                block = pool[i % len(pool)][: min(left, CHUNK)]
                f.write(memoryview(block))
                left -= block.size
                i += 1


def build_checkpoint(folder: Path, n_layers: int) -> int:
    """A real-shape N-layer bf16 checkpoint in the HF layout; returns its size in bytes."""
    folder.mkdir(parents=True)
    config = release_config(n_layers)
    shapes = [(hf_name(k), v.shape) for k, v in tree_flatten(build_lazy_model(config).parameters())]
    # A few vision tensors (real shapes) for the converter to drop.
    shapes += [
        ("model.encoder.vision_tower.patch_embedder.input_proj.weight", (1152, 768)),
        ("model.encoder.embed_vision.embedding_projection.weight", (2816, 1152)),
    ]
    groups = {"rest": []}
    for name, shape in shapes:
        parts = name.split(".")
        layer = parts[3] if parts[2] == "layers" and parts[1] == "decoder" else None
        groups.setdefault(layer or "rest", []).append((name, shape))
    mx.random.seed(0)
    pool = [
        (0.02 * mx.random.normal((CHUNK,))).astype(mx.bfloat16).view(mx.uint16) for _ in range(3)
    ]
    mx.eval(pool)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, tensors in zip(names, groups.values()):
        write_shard(folder / name, tensors, pool)
        weight_map.update({t: name for t, _ in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(cmd) -> dict:
    """Run `cmd` and return its wall time, peak RSS and output (this runs in the launcher)."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    code = os.waitstatus_to_exitcode(status)
    return {"wall": time.perf_counter() - tic, "rss": rss, "out": out, "code": code}


def run_measured(cmd) -> dict:
    """Measure `cmd` from a fresh, small launcher process.

    A child's ru_maxrss also counts the memory it had between fork and exec, a copy of
    its parent's; this benchmark process is large, so it must not be the parent.
    """
    launcher = [sys.executable, __file__, "--measure", "--", *cmd]
    done = subprocess.run(launcher, cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['out']}")
    return result


def shard_seconds(out: str):
    """Elapsed time after each source shard, from the converter's progress lines."""
    return [float(m) for m in re.findall(r"\(([0-9.]+) s elapsed\)", out)]


def main():
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[3:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--recipe", choices=["mixed", "uniform"], default="mixed")
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="dg_convert_bench_", dir=args.dir))
    rows = []
    try:
        r = run_measured([sys.executable, "-c", "import mlx_diffgemma.convert"])
        print(f"import only: peak RSS {r['rss'] / 1e9:.2f} GB, {r['wall']:.1f} s")
        for n in args.layers:
            src, dst = base / f"hf_{n}", base / f"mlx_{n}"
            tic = time.perf_counter()
            size = build_checkpoint(src, n)
            os.sync()  # flush the new input first: write-back would slow the conversion
            print(f"N={n}: built {size / 1e9:.2f} GB in {time.perf_counter() - tic:.0f} s")
            cmd = [
                sys.executable,
                "-m",
                "mlx_diffgemma.convert",
                "--hf-path",
                str(src),
                "--mlx-path",
                str(dst),
                "-q",
                "--q-bits",
                str(args.q_bits),
                "--quant-recipe",
                args.recipe,
            ]
            r = run_measured(cmd)
            # Shard 1 holds the embedding and the other non-layer tensors, then one per layer.
            marks = shard_seconds(r["out"])
            layer_s = [b - a for a, b in zip(marks, marks[1:])]
            out_size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
            rows.append((n, size, out_size, r["rss"], r["wall"], marks[0], layer_s))
            print(
                f"N={n}: converted to {out_size / 1e9:.2f} GB, peak RSS {r['rss'] / 1e9:.2f} GB, "
                f"{r['wall']:.1f} s wall, layers: {' '.join(f'{t:.1f}' for t in layer_s)} s"
            )
            shutil.rmtree(src)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{args.q_bits}-bit {args.recipe}, {mx.default_device()}, {os.cpu_count()} CPUs")
    print(
        f"{'N':>3} {'input GB':>9} {'output GB':>10} {'peak RSS GB':>12} {'wall s':>8} "
        f"{'non-layer s':>12} {'s/layer':>8}"
    )
    for n, size, out_size, rss, wall, first, layer_s in rows:
        print(
            f"{n:>3} {size / 1e9:>9.2f} {out_size / 1e9:>10.2f} {rss / 1e9:>12.2f} {wall:>8.1f} "
            f"{first:>12.1f} {sum(layer_s) / len(layer_s):>8.1f}"
        )
    per_layer = [t for row in rows for t in row[6]]
    per_layer = sum(per_layer) / len(per_layer)
    fixed = sum(r[4] - sum(r[6]) for r in rows) / len(rows)
    total = fixed + FULL_LAYERS * per_layer
    print(
        f"\n{per_layer:.1f} s per layer, {fixed:.1f} s the rest (startup, embedding, verify); "
        f"projected {FULL_LAYERS}-layer conversion: {total:.0f} s ({total / 60:.1f} min)"
    )
    spread = max(r[3] for r in rows) - min(r[3] for r in rows)
    print(f"peak RSS spread across N: {spread / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
