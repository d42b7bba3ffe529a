"""Fuse an adapter into its base: `python -m mlx_diffgemma.fuse` (mlx_lm.fuse's flags).

    python -m mlx_diffgemma.fuse --model M --adapter-path adapters --save-path fused [--dequantize]

The output folder loads like any converted one (config.json, model.safetensors, the
tokenizer and generation config copied from --model). An adapter trained from scratch
(--init-config) needs no base weights: its config.json comes from the adapter.
"""

import json
import shutil
import sys
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, save_config

from .loader import get_model_path, load_model, read_config
from .options import CONTEXT_SETTINGS, interrupted_line, one_line, run_command
from .tuner.adapters import check_adapter_weights, fuse_adapters, load_adapters
from .tuner.init import init_model

_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def _from_scratch(adapter_path: Path, config: dict):
    model = init_model(config["init_config"])
    weights = mx.load(str(adapter_path / "adapters.safetensors"))
    check_adapter_weights(model, weights, True, adapter_path)
    model.load_weights(list(weights.items()), strict=False)
    return model, dict(config["init_config"])


def fuse(model_path, adapter_path, save_path, dequantize: bool = False) -> Path:
    """Write base + adapter as one checkpoint folder; returns its path."""
    src, adapter_path, out = get_model_path(model_path), Path(adapter_path), Path(save_path)
    if not (adapter_path / "adapter_config.json").is_file():
        raise ValueError(
            f"{adapter_path} holds no adapter (adapter_config.json is missing); pass "
            "--adapter-path with the folder that `mlx_diffgemma lora` wrote."
        )
    adapter_config = json.loads((adapter_path / "adapter_config.json").read_text())
    if adapter_config.get("init_config") is not None:
        model, config = _from_scratch(adapter_path, adapter_config)
    else:
        model, config = load_model(src), read_config(src)
        load_adapters(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    save_config(config, out / "config.json")
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


@click.command(name="fuse", context_settings=CONTEXT_SETTINGS)
@click.option("--model", required=True, help="The base model folder or hub repo.")
@click.option("--adapter-path", default="adapters", show_default=True, help="Adapter folder.")
@click.option("--save-path", default="fused_model", show_default=True, help="Output folder.")
@click.option("--dequantize", is_flag=True, help="Write float weights.")
def fuse_command(model, adapter_path, save_path, dequantize):
    """Fuse an adapter into the model and save it."""
    try:
        out = fuse(model, adapter_path, save_path, dequantize)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        sys.exit(f"error: {one_line(e)}")
    except KeyboardInterrupt:
        sys.exit(interrupted_line())
    print(f"Fused model saved to {out}")


def main(argv=None) -> None:
    """`python -m mlx_diffgemma.fuse ...`; returns when the fuse succeeds."""
    run_command(fuse_command, argv, "python -m mlx_diffgemma.fuse")


if __name__ == "__main__":
    main()
