"""Which weights train: LoRA/DoRA through mlx-lm's tuner, or full fine-tuning.

LoRA covers every linear layer of the last `num_layers` layers (attention, dense MLP,
router, and the experts through mlx-lm's `LoRASwitchLinear`) plus the self-conditioning
MLP, which sits outside the layers. The module keys go into `lora_parameters["keys"]`
and so into adapter_config.json, which makes a saved adapter re-create exactly the same
wiring (with mlx-lm's own `linear_to_lora_layers` too). The layer scalars are buffers in
transformers, never trained, and stay frozen here as well.
"""

import json
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

SELF_CONDITIONING_KEYS = tuple(
    f"model.decoder.self_conditioning.{p}" for p in ("gate_proj", "up_proj", "down_proj")
)
_LINEAR = (nn.Linear, nn.QuantizedLinear)
_SWITCH = (SwitchLinear, QuantizedSwitchLinear)
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def default_lora_keys(model, freeze_router: bool = False, dora: bool = False) -> List[str]:
    """Module keys (relative to a layer, or from the model root) that get adapters.

    DoRA: mlx-lm has no DoRA for expert (switch) layers, so the experts are left out.
    """
    keys = set()
    for name, module in model.layers[0].named_modules():
        if isinstance(module, _LINEAR) or (isinstance(module, _SWITCH) and not dora):
            if freeze_router and name.startswith("router."):
                continue
            keys.add(name)
    return sorted(keys) + list(SELF_CONDITIONING_KEYS)


def _freeze_scalars(model) -> None:
    for layer in model.layers:
        layer.freeze(keys=["layer_scalar"], recurse=False)
    for s in model.model.encoder.language_model.layers:
        s.freeze(keys=["layer_scalar"], recurse=False)


def setup_full(model, num_layers: int = -1, freeze_router: bool = False) -> None:
    """Full fine-tuning of the last `num_layers` layers (-1: all, with the embedding,
    final norm and self-conditioning)."""
    if num_layers > len(model.layers):
        raise ValueError(
            f"--num-layers {num_layers} is more than the model's {len(model.layers)} layers; "
            f"give at most {len(model.layers)}, or -1 for all layers."
        )
    n = len(model.layers) if num_layers < 0 else num_layers
    model.freeze()
    for layer in model.layers[len(model.layers) - n :]:
        layer.unfreeze()
        if freeze_router:
            layer.router.freeze()
    if n == len(model.layers):
        text = model.model.decoder
        for m in (text.embed_tokens, text.norm, text.self_conditioning):
            m.unfreeze()
    _freeze_scalars(model)


def setup_lora(model, num_layers: int, lora_parameters: Dict, dora: bool = False) -> None:
    """Freeze the base and wrap the keyed modules with mlx-lm's LoRA (or DoRA) layers.

    `lora_parameters` needs rank, scale, dropout and keys (see `default_lora_keys`).
    """
    if num_layers > len(model.layers):
        raise ValueError(
            f"--num-layers {num_layers} is more than the model's {len(model.layers)} layers; "
            f"give at most {len(model.layers)}, or -1 for all layers."
        )
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=dora)


def check_adapter_weights(model, weights: Dict[str, mx.array], full: bool, where) -> None:
    """Raise unless every tensor names a trainable parameter of the same shape."""
    params = dict(tree_flatten(model.parameters()))
    errors = []
    for name, w in weights.items():
        p = params.get(name)
        if p is None or (not full and name.rsplit(".", 1)[-1] not in ADAPTER_LEAVES):
            errors.append(f"{name}: not an adapter parameter of this model")
        elif p.shape != w.shape:
            errors.append(f"{name}: shape {tuple(w.shape)} != model {tuple(p.shape)}")
    if errors:
        raise ValueError(f"Adapter {where} does not fit this model: " + "; ".join(errors[:5]))


def apply_adapter_config(model, config: Dict) -> None:
    """Re-create the wiring of a saved adapter_config.json (mlx-lm's layout)."""
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        return
    if kind not in ("lora", "dora"):
        raise ValueError(
            f"fine_tune_type {kind!r} in adapter_config.json is not lora, dora or full."
        )
    params = dict(config["lora_parameters"])
    params.setdefault("dropout", 0.0)
    if params.get("keys") is None:
        params["keys"] = default_lora_keys(model, dora=kind == "dora")
    setup_lora(model, config.get("num_layers", len(model.layers)), params, dora=kind == "dora")


def load_adapters(model, adapter_path) -> None:
    """Apply an adapter folder in place: mlx-lm's (adapters.safetensors +
    adapter_config.json) or PEFT's (adapter_model.safetensors + adapter_config.json)."""
    path = Path(adapter_path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No adapter_config.json in adapter path {path}.")
    config = json.loads(config_file.read_text())
    if "peft_type" in config:
        from .peft import load_peft_adapter

        load_peft_adapter(model, path, config)
        return
    weights_file = path / "adapters.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"No adapters.safetensors in adapter path {path}.")
    apply_adapter_config(model, config)
    weights = mx.load(str(weights_file))
    check_adapter_weights(model, weights, config.get("fine_tune_type") == "full", path)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()


def fuse_adapters(model, dequantize: bool = False) -> None:
    """Fold every LoRA/DoRA layer into its base layer (mlx-lm's `fuse`)."""
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))


def trainable_summary(model) -> str:
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return f"Trainable parameters: {100 * train / max(total, 1):.3f}% ({train / 1e6:.3f}M/{total / 1e6:.3f}M)"
