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


def load_model(
    path_or_repo: Union[str, Path], lazy: bool = False, adapter_path: Optional[str] = None
) -> Model:
    """Load the model alone, with its sampler settings in `model.generation_config`.

    `adapter_path`: a LoRA/DoRA/full fine-tune folder (mlx-lm's or PEFT's) to apply.
    """
    path = get_model_path(path_or_repo)
    read_config(path)
    if not any(path.glob("model*.safetensors")):
        raise FileNotFoundError(f"No model*.safetensors weights in {path}.")
    model, _ = _mlx_lm_load_model(
        path, lazy=lazy, get_model_classes=lambda config: (Model, ModelArgs)
    )
    # Non-parameter arrays (RoPE frequencies) are lazy too; evaluating them here lets
    # the model run from any thread (a lazy array belongs to its creating thread's stream).
    mx.eval([v for k, v in tree_flatten(model) if k.rsplit(".", 1)[-1].startswith("_")])
    model.generation_config = DiffusionConfig.from_pretrained(path)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
    return model


def load(
    path_or_repo: Union[str, Path], lazy: bool = False, adapter_path: Optional[str] = None
) -> Tuple[Model, "Tokenizer"]:
    """Load `(model, tokenizer)` from a local folder or a hub repo id (and an adapter)."""
    from .tokenizer import Tokenizer

    path = get_model_path(path_or_repo)
    return load_model(path, lazy=lazy, adapter_path=adapter_path), Tokenizer.from_pretrained(path)
