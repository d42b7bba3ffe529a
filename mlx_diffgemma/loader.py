"""Load a DiffusionGemma checkpoint: the transformers layout or a converted MLX folder.

Every file is checked before MLX reads it (config.json parses, every shard the index
lists exists, every safetensors header is whole and matches its file size), so a
damaged download fails with one line that names the file instead of deep in a load.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import load_model as _mlx_lm_load_model

from .diffusion.config import DiffusionConfig, read_json
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
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise FileNotFoundError(
                f"{repo} is not in the local cache and the Hugging Face hub cannot be reached; "
                "connect once to download it, pass a local checkpoint folder, or try the "
                "offline demo: mlx_diffgemma generate --model examples/sudoku_toy "
                '-p "460200500004120306340520604102013065"'
            ) from None
        raise FileNotFoundError(
            f"{repo} is not a local folder and could not be downloaded from the Hugging Face "
            f"hub ({type(e).__name__}); pass a local checkpoint folder."
        ) from None


def read_config(path: Path) -> dict:
    """config.json of a DiffusionGemma checkpoint folder (ValueError if it is not one)."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}; is this a model folder?")
    config = read_json(config_file)
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{path} is not a DiffusionGemma checkpoint (model_type="
            f"{config.get('model_type')!r}, expected one of {MODEL_TYPES})."
        )
    return config


@dataclass
class StoredTensor:
    """One tensor of a source safetensors file, located but not read."""

    key: str
    file: Path
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(file: Path) -> List[StoredTensor]:
    """The tensors of one safetensors file, in file order; checks the file is complete."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")
        if head[8:] != b"{":  # a header is a JSON object right after its 8-byte length
            raise ValueError(f"Shard {file} is not a safetensors file; re-download it.")
        if 8 + n > size:
            raise ValueError(f"Shard {file} is truncated ({size} bytes); re-download it.")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            tensors = [
                StoredTensor(k, file, v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0])
                for k, v in header.items()
            ]
            end = 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"Shard {file} has a corrupt header; re-download it.") from None
    if end > size:
        raise ValueError(
            f"Shard {file} is truncated: it has {size} bytes but its header needs {end}; "
            "re-download it."
        )
    return sorted(tensors, key=lambda t: t.start)


def read_checkpoint_tensors(path: Path) -> List[StoredTensor]:
    """All stored tensors of a checkpoint folder, shard by shard (index order if any)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_file} has no weight_map; download it again.")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Shard {path / missing[0]} listed in {index_file.name} is missing "
                f"({len(missing)} of {len(names)} shards missing); re-download the checkpoint."
            )
        files = [path / n for n in names]
    else:
        weight_map = None
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"No model*.safetensors weights in {path}.")
    tensors = [t for f in files for t in read_safetensors_header(f)]
    if weight_map is not None:
        stored = {t.key: t.file.name for t in tensors}
        for k, name in weight_map.items():
            if stored.get(k) != name:
                raise ValueError(
                    f"Tensor {k} listed in {index_file.name} is not in {name}; the "
                    "shard is incomplete, re-download the checkpoint."
                )
    return tensors


def _experts_in_float32(model: Model) -> None:
    """On the CPU backend, cast unquantized expert matrices to float32.

    MLX's CPU GatherMM (the expert matmul) supports float32 only; a bf16/fp16 expert
    would fail at the first forward. Quantized experts use GatherQMM and stay as they are.
    """
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    experts = [
        m
        for _, m in model.named_modules()
        if type(m) is SwitchLinear and m.weight.dtype in (mx.bfloat16, mx.float16)
    ]
    if not experts:
        return
    dtype = str(experts[0].weight.dtype).rsplit(".", 1)[-1]
    extra = sum(m.weight.size for m in experts) * 2
    for m in experts:
        m.weight = m.weight.astype(mx.float32)
    print(
        f"[WARNING] The CPU backend runs expert matmuls in float32 only: casting {len(experts)} "
        f"{dtype} expert matrices to float32 (+{extra / 1e9:.2f} GB); a quantized "
        "conversion (convert -q) avoids this.",
        file=sys.stderr,
    )


def load_model(
    path_or_repo: Union[str, Path], lazy: bool = False, adapter_path: Optional[str] = None
) -> Model:
    """Load the model alone, with its sampler settings in `model.generation_config`.

    `adapter_path`: a LoRA/DoRA/full fine-tune folder (mlx-lm's or PEFT's) to apply.

    On the CPU backend, unquantized bf16/fp16 expert matrices are cast to float32 (with a
    warning on stderr): MLX's CPU expert matmul supports float32 only. The vision tower
    is built when the folder stores it; a text-only folder (no vision weights, whatever
    its `vision_config`) loads as a text-only model.
    """
    model = load_stored_model(path_or_repo, lazy)
    _experts_in_float32(model)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
    return model


def load_stored_model(path_or_repo: Union[str, Path], lazy: bool = False) -> Model:
    """The model with its weights as stored (no CPU cast); what `convert` checks."""
    path = get_model_path(path_or_repo)
    read_config(path)
    tensors = read_checkpoint_tensors(path)
    vision = any(t.key.startswith("model.encoder.vision_tower.") for t in tensors)
    text_only = None if vision else {"vision_config": None}
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


def load(
    path_or_repo: Union[str, Path], lazy: bool = False, adapter_path: Optional[str] = None
) -> Tuple[Model, "Tokenizer"]:
    """Load `(model, tokenizer)` from a local folder or a hub repo id (and an adapter)."""
    from .tokenizer import Tokenizer

    path = get_model_path(path_or_repo)
    read_config(path)
    tokenizer = Tokenizer.from_pretrained(path)  # before the weights: it is quick to check
    return load_model(path, lazy=lazy, adapter_path=adapter_path), tokenizer
