"""Deepen a trained toy without changing what it computes (a student with more layers
per forward for `distill_toys --student`).

    python -m benchmarks.grow_depth examples/sudoku_toy /tmp/sudoku_x2 [--factor 2]

Each decoder layer is followed by `factor - 1` copies of itself whose two output norms
(post-attention and post-feed-forward) are zero. A layer adds `post_attention_norm(attn)`
and then `post_feedforward_norm(ffn)` to its residual stream, so a copy with both at
zero passes the stream through unchanged (its layer scalars are set to 1, decoder and
encoder): the deeper model's logits equal the original's, the Net2Net "deeper net" idea
with a residual identity instead of an identity matrix. The norm weights still get a
gradient (their input is not zero), so training opens the copies up from the first step,
each starting from the weights of the layer it copies.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx

_LAYER = re.compile(r"^(model\.(?:decoder|encoder\.language_model)\.layers\.)(\d+)\.(.+)$")
_ZEROED = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def grow_weights(weights: dict, factor: int) -> dict:
    """The weights with layer i at i * factor and its copies at i * factor + 1, ...."""
    out = {}
    for key, value in weights.items():
        m = _LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, i, name = m.group(1), int(m.group(2)), m.group(3)
        out[f"{prefix}{i * factor}.{name}"] = value
        for j in range(1, factor):
            if name in _ZEROED:
                copy = mx.zeros_like(value)
            elif name == "layer_scalar":
                copy = mx.ones_like(value)
            else:
                copy = value
            out[f"{prefix}{i * factor + j}.{name}"] = copy
    return out


def grow_config(config: dict, factor: int) -> dict:
    text = dict(config["text_config"])
    text["num_hidden_layers"] = text["num_hidden_layers"] * factor
    if text.get("layer_types"):
        text["layer_types"] = [t for t in text["layer_types"] for _ in range(factor)]
    return {**config, "text_config": text}


def grow(src: Path, dst: Path, factor: int) -> None:
    if factor < 2:
        raise ValueError(f"--factor must be at least 2 (got {factor}).")
    files = sorted(src.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{src} holds {len(files)} safetensors files; pass a one-file toy.")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, template, generation config, test sets
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(grow_config(config, factor), indent=2) + "\n")
    mx.save_safetensors(
        str(dst / "model.safetensors"), grow_weights(mx.load(str(files[0])), factor)
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a trained toy's folder")
    p.add_argument("dst", type=Path, help="where to write the deeper model")
    p.add_argument("--factor", type=int, default=2, help="layers per original layer")
    a = p.parse_args(argv)
    grow(a.src, a.dst, a.factor)
    print(f"{a.dst}: {a.factor}x the layers of {a.src}, same logits")


if __name__ == "__main__":
    main()
