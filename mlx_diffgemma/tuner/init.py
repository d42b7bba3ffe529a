"""Models trained from scratch: random weights from a config.json (e.g. a tiny toy)."""

import json
from pathlib import Path
from typing import Union

import mlx.core as mx

from ..loader import MODEL_TYPES
from ..model import Model, ModelArgs


def read_init_config(path: Union[str, Path, dict]) -> dict:
    """A DiffusionGemma config dict from a config.json path (or the dict itself)."""
    if isinstance(path, dict):
        return path
    config = json.loads(Path(path).read_text())
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"--init-config {path}: model_type {config.get('model_type')!r} is not one of "
            f"{MODEL_TYPES}."
        )
    return config


def init_model(config: dict, seed: int = 0) -> Model:
    """MLX's default initialisation (norms, scales and layer scalars at 1), seeded."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model
