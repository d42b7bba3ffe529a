"""PEFT LoRA adapters (transformers / Unsloth / NeMo) on this model.

PEFT saves `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`
(r, in) and `.lora_B.weight` (out, r) and scales by lora_alpha / r (/ sqrt(r) with
rsLoRA). Modules map 1:1 to ours except that transformers keeps separate encoder
modules (`model.encoder.language_model.layers.*`) tied to the decoder's: an adapter on
both must carry the same weights, because this port runs one set of weights.
"""

import math
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

_PREFIX = "base_model.model."
_ENCODER = "model.encoder.language_model."


def _module_weights(weights: Dict[str, mx.array]) -> Dict[str, Dict[str, mx.array]]:
    out: Dict[str, Dict[str, mx.array]] = {}
    for key, w in weights.items():
        if not key.startswith(_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unsupported PEFT tensor {key} (only LoRA A/B on linear layers)")
        module, part = key[len(_PREFIX) :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if module.startswith(_ENCODER):
            module = "model.decoder." + module[len(_ENCODER) :]
            part = "enc_" + part
        out.setdefault(module, {})[part] = w
    return out


def _pair(module: str, parts: Dict[str, mx.array]) -> Tuple[mx.array, mx.array]:
    dec = (parts.get("lora_A"), parts.get("lora_B"))
    enc = (parts.get("enc_lora_A"), parts.get("enc_lora_B"))
    if dec[0] is None:
        dec = enc
    elif enc[0] is not None and not all(mx.array_equal(a, b).item() for a, b in zip(dec, enc)):
        raise ValueError(
            f"{module}: the adapter trains the encoder and decoder copies differently; "
            "this port shares one set of weights"
        )
    if dec[0] is None or dec[1] is None:
        raise ValueError(f"{module}: lora_A or lora_B missing")
    return dec


def load_peft_adapter(model, path: Path, config: dict) -> None:
    """Wrap each adapted linear layer in mlx-lm's LoRALinear with PEFT's weights."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA.")
    if config.get("use_dora"):
        raise ValueError(f"{path}: PEFT DoRA adapters are not supported; merge them first.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern/alpha_pattern are not supported.")
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"No adapter_model.safetensors in {path}.")
    modules = dict(model.named_modules())
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    wrapped = []
    for name, parts in _module_weights(mx.load(str(file))).items():
        a, b = _pair(name, parts)
        base = modules.get(name)
        if base is None or not hasattr(base, "weight") or base.weight.ndim != 2:
            raise ValueError(f"{path}: {name} is not a linear layer of this model")
        lora = LoRALinear.from_base(base, r=a.shape[0], scale=scale)
        lora.lora_a, lora.lora_b = a.T.astype(mx.float32), b.T.astype(mx.float32)
        wrapped.append((name, lora))
    model.freeze()
    model.update_modules(tree_unflatten(wrapped))
    mx.eval([v for _, v in tree_flatten(model.parameters())])
    model.eval()
