"""Load a DiffusionGemma checkpoint: the transformers layout or a converted MLX folder."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as _mlx_lm_load_model

from .config import DiffusionConfig
from .model import Model, ModelArgs

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def get_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise download the hub repo (text files and weights only)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Model path {path} is a file; pass the checkpoint folder.")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"Model folder {path} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as e:  # network, auth, missing repo: one message either way
        raise FileNotFoundError(
            f"{repo} is not a local folder and could not be downloaded from the Hugging Face "
            f"hub ({type(e).__name__}); pass a local checkpoint folder."
        ) from None


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}; is this a model folder?")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{path} is not a DiffusionGemma checkpoint (model_type="
            f"{config.get('model_type')!r}, expected one of {MODEL_TYPES})."
        )
    return config


def _has_vision_weights(path: Path) -> bool:
    """Whether the folder stores the vision tower (read from the index or the headers)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            keys = json.load(f)["weight_map"]
    else:
        from safetensors import safe_open

        keys = []
        for file in path.glob("model*.safetensors"):
            with safe_open(str(file), "numpy") as h:
                keys += list(h.keys())
    return any(k.startswith("model.encoder.vision_tower.") for k in keys)


def load_model(path_or_repo: Union[str, Path], lazy: bool = False) -> Model:
    """Load the model alone, with its sampler settings in `model.generation_config`.

    The vision tower is built when the folder stores it; a text-only folder (no vision
    weights, whatever its `vision_config`) loads as a text-only model.
    """
    path = get_model_path(path_or_repo)
    read_config(path)
    if not any(path.glob("model*.safetensors")):
        raise FileNotFoundError(f"No model*.safetensors weights in {path}.")
    text_only = None if _has_vision_weights(path) else {"vision_config": None}
    model, _ = _mlx_lm_load_model(
        path,
        lazy=lazy,
        model_config=text_only,
        get_model_classes=lambda config: (Model, ModelArgs),
    )
    # Non-parameter arrays (RoPE frequencies) are lazy too; evaluating them here lets
    # the model run from any thread (a lazy array belongs to its creating thread's stream).
    mx.eval([v for k, v in tree_flatten(model) if k.rsplit(".", 1)[-1].startswith("_")])
    model.generation_config = DiffusionConfig.from_pretrained(path)
    return model


def load(path_or_repo: Union[str, Path], lazy: bool = False) -> Tuple[Model, "Tokenizer"]:
    """Load `(model, tokenizer)` from a local folder or a hub repo id."""
    from .tokenizer import Tokenizer

    path = get_model_path(path_or_repo)
    return load_model(path, lazy=lazy), Tokenizer.from_pretrained(path)
