"""Convert a transformers DiffusionGemma checkpoint to MLX, optionally quantized.

The conversion streams: every stored tensor is read in row chunks, cast, quantized and
written straight to its planned place in an output shard. Peak memory is a few chunks,
whatever the number of layers. The output is written to a hidden sibling folder and
renamed to `mlx_path` only after it loads; on any error or Ctrl-C that folder is removed.

Output layout (the mlx-lm one): `model.safetensors` or `model-0000N-of-0000M.safetensors`
plus `model.safetensors.index.json`, keys named as the `Model` parameters (quantized
modules have `.weight/.scales/.biases`), and `config.json` with mlx-lm's `quantization`
block (default group size/bits plus per-path overrides).
"""

import copy
import errno
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import save_config

from .loader import (
    StoredTensor,
    get_model_path,
    load_stored_model,
    read_checkpoint_tensors,
    read_config,
)
from .model import Model, ModelArgs
from .options import CONTEXT_SETTINGS, interrupted, one_line

DEFAULT_MLX_PATH = "mlx_model"
QUANT_RECIPES = ("mixed", "uniform")
Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
CONVERSION_DTYPES = ("bfloat16", "float16", "float32")
MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB
# Source bytes read per step: this (times a small factor for the cast and quantize
# temporaries) is the conversion's working set.
CHUNK_BYTES = 64 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
COPIED_FILES = TOKENIZER_FILES + ("generation_config.json",)

# safetensors dtype -> (mlx dtype, numpy dtype of the stored bytes); numpy has no bf16.
_SOURCE_DTYPES = {
    "F32": (mx.float32, np.float32),
    "F16": (mx.float16, np.float16),
    "BF16": (mx.bfloat16, np.uint16),
}
_DTYPE_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


@dataclass
class OutputTensor:
    key: str
    shape: Tuple[int, ...]
    dtype: mx.Dtype
    shard: int = -1
    start: int = -1  # absolute byte offset in its shard file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass
class Job:
    """How one stored tensor becomes one (or, quantized, three) output tensors."""

    source: StoredTensor
    dtype: mx.Dtype
    quant: Optional[Dict[str, int]]
    outputs: List[OutputTensor]


@dataclass
class Plan:
    jobs: List[Job]
    shards: List[List[OutputTensor]]
    shard_names: List[str]
    headers: List[bytes]
    dropped: List[str] = field(default_factory=list)
    quantization: Optional[dict] = None

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for j in self.jobs for o in j.outputs)

    @property
    def total_parameters(self) -> int:
        return sum(j.source.size for j in self.jobs)


# --------------------------------------------------------------------------- planning


def build_lazy_model(config: dict) -> Model:
    """The model for `config` with unevaluated (so never allocated) random weights.

    It gives parameter names, shapes and quantizable modules of even the 26B model for free.
    """
    return Model(ModelArgs.from_dict(config))


def quantization_plan(
    model: Model, group_size: int, bits: int, recipe: str
) -> Tuple[Dict[str, dict], dict]:
    """Which modules to quantize and how, and the config `quantization` block for it.

    Mirrors `mlx_lm.utils.quantize_model`: modules with `to_quantized` whose input dim
    divides the group size; the recipe's per-path dicts are recorded in the config.

    Returns:
        ({module path: {"group_size", "bits"}}, config["quantization"]).
    """
    predicate = model.quant_predicate if recipe == "mixed" else (lambda p, m: True)
    block = {"group_size": group_size, "bits": bits, "mode": "affine"}
    plan, skipped = {}, []
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        choice = predicate(path, module)
        if choice is False:
            # The recipe leaves the vision tower in float by design; anything else it
            # refuses is a matrix whose rows its groups do not divide: count it.
            if ".vision_tower." not in path and ".embed_vision." not in path:
                skipped.append((path, module.weight.shape[-1], 64))
            continue
        params = {"group_size": group_size, "bits": bits}
        if isinstance(choice, dict):
            params.update(choice)
        if module.weight.shape[-1] % params["group_size"] != 0:
            skipped.append((path, module.weight.shape[-1], params["group_size"]))
            continue  # as mlx-lm: such layers stay unquantized
        plan[path] = {"group_size": params["group_size"], "bits": params["bits"]}
        if isinstance(choice, dict):
            block[path] = dict(choice)
    if skipped:
        path, dim, g = skipped[-1]
        print(
            f"[WARNING] {len(skipped)} matrices stay unquantized: their input size is not a "
            f"multiple of the group size (e.g. {path}: {dim} % {g}); a smaller "
            "--q-group-size avoids this."
        )
    return plan, block


def sanitized_key(model: Model, key: str) -> Optional[str]:
    """`Model.sanitize` applied to one key: its parameter name, or None when dropped."""
    marker = object()
    out = model.sanitize({key: marker})
    if not out:
        return None
    if len(out) != 1 or next(iter(out.values())) is not marker:
        raise RuntimeError(
            f"Model.sanitize transforms the value of {key}; the streaming converter needs "
            "a key-only mapping."
        )
    return next(iter(out))


def _outputs(key: str, shape: Sequence[int], dtype: mx.Dtype, quant: Optional[dict]):
    if quant is None:
        return [OutputTensor(key, tuple(shape), dtype)]
    *lead, dim = shape
    g, b = quant["group_size"], quant["bits"]
    module = key[: -len(".weight")]
    return [
        OutputTensor(key, (*lead, dim * b // 32), mx.uint32),
        OutputTensor(f"{module}.scales", (*lead, dim // g), dtype),
        OutputTensor(f"{module}.biases", (*lead, dim // g), dtype),
    ]


def plan_jobs(
    model: Model,
    stored: Sequence[StoredTensor],
    dtype: Optional[mx.Dtype],
    quant: Dict[str, dict],
) -> Tuple[List[Job], List[str]]:
    """Map, check and schedule every stored tensor; returns (jobs, dropped keys)."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    jobs, dropped, seen = [], [], {}
    for t in stored:
        key = sanitized_key(model, t.key)
        if key is None:
            dropped.append(t.key)
            continue
        where = f"{t.key} in {t.file.name}"
        if key not in expected:
            raise ValueError(
                f"Unexpected tensor {where}: the model of config.json has no parameter "
                f"{key}; the weights and config.json do not match."
            )
        if key in seen:
            raise ValueError(f"Tensor {key} is stored twice ({seen[key]} and {where}).")
        if t.dtype not in _SOURCE_DTYPES:
            raise ValueError(
                f"Tensor {where} has dtype {t.dtype}; only F32, F16 and BF16 checkpoints "
                "can be converted (an MLX-quantized folder loads as it is)."
            )
        if t.shape != expected[key]:
            raise ValueError(
                f"Tensor {where} has shape {list(t.shape)}, but config.json implies "
                f"{list(expected[key])}; the weights and config.json do not match."
            )
        seen[key] = where
        out_dtype = dtype or _SOURCE_DTYPES[t.dtype][0]
        q = quant.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        jobs.append(Job(t, out_dtype, q, _outputs(key, t.shape, out_dtype, q)))
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensor(s) that config.json needs, e.g. "
            f"{missing[0]}; is it complete?"
        )
    return jobs, dropped


def layout_shards(
    jobs: Sequence[Job], max_shard_bytes: Optional[int] = None
) -> Tuple[List[List[OutputTensor]], List[str], List[bytes]]:
    """Assign every output a shard and byte offset (as `mlx_lm.utils.make_shards`).

    Knowing the layout up front lets each tensor be written in place as it is converted.
    """
    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
    shards, size = [], 0
    for job in jobs:
        n = sum(o.nbytes for o in job.outputs)
        if not shards or size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(job.outputs)
        size += n
    count = len(shards)
    names = [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors"
        for i in range(count)
    ]
    headers = []
    for i, shard in enumerate(shards):
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for o in shard:
            header[o.key] = {
                "dtype": _DTYPE_NAMES[o.dtype],
                "shape": list(o.shape),
                "data_offsets": [offset, offset + o.nbytes],
            }
            offset += o.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        headers.append(raw)
        offset = 8 + len(raw)
        for o in shard:
            o.shard, o.start = i, offset
            offset += o.nbytes
    return shards, names, headers


def make_plan(
    config: dict,
    stored: Sequence[StoredTensor],
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    quant_recipe: str = "mixed",
    max_shard_bytes: Optional[int] = None,
) -> Plan:
    """Everything the conversion will write, computed from headers and config alone.

    The vision tower is kept when the checkpoint stores it (quantized only by the
    uniform recipe); without vision weights the output is text-only.
    """
    if not any(t.key.startswith("model.encoder.vision_tower.") for t in stored):
        config = {**config, "vision_config": None}
    model = build_lazy_model(config)
    quant, block = {}, None
    if quantize:
        quant, block = quantization_plan(model, q_group_size, q_bits, quant_recipe)
    jobs, dropped = plan_jobs(model, stored, dtype and getattr(mx, dtype), quant)
    shards, names, headers = layout_shards(jobs, max_shard_bytes)
    return Plan(jobs, shards, names, headers, dropped, block)


def estimate_output_bytes(
    config: dict,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    quant_recipe: str = "mixed",
) -> int:
    """Weight bytes a conversion of `config` writes (headers aside), without any weights.

    Pretends every parameter is stored once as `dtype`, as in the released checkpoint.
    """
    model = build_lazy_model(config)
    name = _DTYPE_NAMES[getattr(mx, dtype)]
    stored = [
        StoredTensor(k, Path("estimate"), name, tuple(v.shape), 0)
        for k, v in tree_flatten(model.parameters())
    ]
    plan = make_plan(config, stored, quantize, q_bits, q_group_size, None, quant_recipe)
    return plan.total_bytes


# --------------------------------------------------------------------------- writing


def _pwrite(fd: int, a: mx.array, offset: int) -> None:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)  # the buffer protocol has no bf16
    data = memoryview(mx.contiguous(a)).cast("B")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def convert_tensor(job: Job, src, fds: Sequence[int]) -> None:
    """Convert one stored tensor in row chunks; groups never straddle rows, so chunked
    quantization is bit-identical to quantizing the whole tensor."""
    t = job.source
    mx_dtype, np_dtype = _SOURCE_DTYPES[t.dtype]
    dim = t.shape[-1] if t.shape else 1
    rows = t.size // dim if dim else 0
    row_bytes = dim * np.dtype(np_dtype).itemsize
    out_row_bytes = [o.nbytes // max(rows, 1) for o in job.outputs]
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        buf = np.empty(n * dim, dtype=np_dtype)
        src.seek(t.start + r0 * row_bytes)
        if src.readinto(buf) != buf.nbytes:
            raise ValueError(f"Shard {t.file} ended while reading {t.key}; re-download it.")
        x = mx.array(buf)
        if mx_dtype == mx.bfloat16:
            x = x.view(mx.bfloat16)
        x = x.reshape(n, dim).astype(job.dtype)
        if job.quant is not None:
            parts = mx.quantize(x, job.quant["group_size"], job.quant["bits"])
        else:
            parts = (x,)
        mx.eval(parts)
        for o, part, rb in zip(job.outputs, parts, out_row_bytes):
            _pwrite(fds[o.shard], part, o.start + r0 * rb)
        del buf, x, parts


def write_weights(plan: Plan, folder: Path, log=print) -> None:
    """Write all shards of `plan` into `folder`, streaming one chunk at a time."""
    fds = []
    try:
        for name, header, shard in zip(plan.shard_names, plan.headers, plan.shards):
            fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.pwrite(fd, len(header).to_bytes(8, "little") + header, 0)
            os.ftruncate(fd, 8 + len(header) + sum(o.nbytes for o in shard))
        tic = time.perf_counter()
        for file, jobs in itertools.groupby(plan.jobs, key=lambda j: j.source.file):
            with open(file, "rb") as src:
                for job in jobs:
                    convert_tensor(job, src, fds)
            log(f"[INFO] Converted {file.name} ({time.perf_counter() - tic:.1f} s elapsed)")
        for fd in fds:
            os.fsync(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ValueError(
                f"Ran out of disk space writing {folder}; free "
                f"{plan.total_bytes / 1e9:.1f} GB or choose another --mlx-path."
            ) from None
        raise
    finally:
        for fd in fds:
            os.close(fd)
    index = {
        "metadata": {
            "total_size": plan.total_bytes,
            "total_parameters": plan.total_parameters,
        },
        "weight_map": {
            o.key: plan.shard_names[o.shard]
            for o in sorted((o for s in plan.shards for o in s), key=lambda o: o.key)
        },
    }
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)


def output_config(
    config: dict, quantization: Optional[dict], dtype: Optional[str], vision: bool = False
) -> dict:
    """config.json of the output.

    A text-only output gets `"vision_config": null`, which says "no vision tower":
    mlx-vlm's strict loader then builds none, where a missing key would build a default
    tower and miss its weights. An output that keeps the tower keeps its vision_config.
    """
    out = copy.deepcopy(config)
    out.pop("quantization_config", None)
    if not vision:
        out["vision_config"] = None
    if quantization is not None:
        out["quantization"] = quantization
    if dtype is not None:
        for c in (out, out.get("text_config", {})):
            for k in ("dtype", "torch_dtype"):
                if k in c:
                    c[k] = dtype
    return out


def low_precision_experts(config: dict, plan: Plan) -> List[Job]:
    """The jobs that write expert matrices unquantized in bfloat16 or float16."""
    model = build_lazy_model(config)
    experts = {f"{p}.weight" for p, m in model.named_modules() if type(m) is SwitchLinear}
    return [
        j
        for j in plan.jobs
        if j.quant is None and j.outputs[0].key in experts and j.dtype != mx.float32
    ]


def warn_low_precision_experts(config: dict, plan: Plan, log=print) -> None:
    """Say that a CPU load will cast such experts to float32 (GatherMM is float32-only)."""
    jobs = low_precision_experts(config, plan)
    if jobs:
        dtype = str(jobs[0].dtype).rsplit(".", 1)[-1]
        log(
            f"[WARNING] {len(jobs)} expert matrices are written unquantized in {dtype} (e.g. "
            f"{jobs[0].outputs[0].key}): on the CPU backend the load casts them to float32; "
            "quantize them (-q with a --q-group-size that divides their input size) or use "
            "--dtype float32."
        )


def recipe_summary(plan: Plan, quantize: bool, q_bits: int, q_group_size: int, recipe: str) -> str:
    bpw = 8 * plan.total_bytes / max(plan.total_parameters, 1)
    if not quantize:
        what = "not quantized"
    elif recipe == "mixed":
        high = sorted({v["bits"] for k, v in plan.quantization.items() if isinstance(v, dict)})
        what = (
            f"{q_bits}-bit mixed (experts and self-conditioning at {q_bits} bits, group size "
            f"{q_group_size}; embedding, attention, dense MLP and router at "
            f"{'/'.join(map(str, high)) or q_bits} bits, group size 64)"
        )
    else:
        what = f"{q_bits}-bit uniform (every matrix at {q_bits} bits, group size {q_group_size})"
    return f"{what}: {bpw:.2f} bits per weight, {plan.total_bytes / 1e9:.2f} GB"


def plan_has_vision(plan: Plan) -> bool:
    """Whether the conversion writes the vision tower."""
    return any(".vision_tower." in o.key for s in plan.shards for o in s)


def write_model_card(
    folder: Path,
    name: str,
    hf_path: str,
    summary: str,
    n_layers: int,
    repo: Optional[str],
    vision: bool = False,
) -> None:
    """README.md with Hugging Face front matter: what was converted, how, and how to run it."""
    base = hf_path if not Path(hf_path).expanduser().exists() else None
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    if base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- mlx", "- diffusion", "- mlx_diffgemma", "---", ""]
    name = repo or name
    source = f"[{base}](https://huggingface.co/{base})" if base else "a local checkpoint"
    images = (
        "- Images: the vision tower and its projector are kept (see the mlx_diffgemma README)."
        if vision
        else "- **Text only**: the checkpoint had no vision tower, so this copy takes text\n"
        "  prompts, not images."
    )
    body = f"""# {name}

DiffusionGemma (block text diffusion) converted to MLX from {source} with `mlx_diffgemma.convert`.

- Weights: {summary}.
{images}
- Tied weights are stored once: the encoder shares every weight with the decoder except its
  {n_layers} `layer_scalar`s, and the LM head is the embedding.

## Use

```bash
pip install mlx-diffgemma
```

```python
from mlx_diffgemma import load, generate

model, tokenizer = load("{name}")
messages = [{{"role": "user", "content": "Why is the sky blue?"}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
print(generate(model, tokenizer, prompt, max_tokens=256))
```
"""
    (folder / "README.md").write_text("\n".join(front) + body)


def copy_side_files(src: Path, dst: Path, log=print) -> None:
    """Copy the tokenizer, chat template and generation_config.json as they are."""
    copied = []
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model")):
        log(f"[WARNING] No tokenizer in {src}: the output loads with load_model() but not load().")
    if "generation_config.json" not in copied:
        log(f"[WARNING] No generation_config.json in {src}: the sampler uses its defaults.")


def verify_output(folder: Path, plan: Plan) -> None:
    """Load the output lazily (strict keys and shapes) and read its small tensors."""
    model = load_stored_model(folder, lazy=True)
    params = tree_flatten(model.parameters())
    mx.eval([v for _, v in params if v.nbytes <= 1 << 20])
    n_quantized = sum(1 for k, _ in params if k.endswith(".scales"))
    n_planned = sum(1 for j in plan.jobs if j.quant is not None)
    if n_quantized != n_planned:
        raise RuntimeError(
            f"The output in {folder} loads with {n_quantized} quantized layers instead of "
            f"{n_planned}; its config.json does not describe its weights."
        )


def check_disk_space(dst: Path, need: int) -> None:
    existing = next(p for p in (dst, *dst.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ValueError(
            f"Not enough disk space in {existing}: the output needs {need / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB is free; free some space or choose another --mlx-path."
        )


def _install(tmp: Path, dst: Path) -> None:
    """Move `tmp` to `dst`, replacing what is there only once `tmp` is in place."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _check_args(q_bits, q_group_size, dtype, quant_recipe):
    checks = [
        ("--q-bits", q_bits, Q_BITS),
        ("--q-group-size", q_group_size, Q_GROUP_SIZES),
        ("--dtype", dtype, (None,) + CONVERSION_DTYPES),
        ("--quant-recipe", quant_recipe, QUANT_RECIPES),
    ]
    for flag, value, allowed in checks:
        if value not in allowed:
            choices = ", ".join(str(a) for a in allowed if a is not None)
            raise ValueError(f"{flag} {value!r} is not supported; choose one of {choices}.")


def upload_to_hub(path: Path, upload_repo: str) -> None:
    """Create `upload_repo` (if needed) and upload the converted folder to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=upload_repo, exist_ok=True)
    api.upload_large_folder(folder_path=str(path), repo_id=upload_repo, repo_type="model")
    print(f"[INFO] Uploaded to https://huggingface.co/{upload_repo}")


def convert(
    hf_path: str,
    mlx_path: str = DEFAULT_MLX_PATH,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    quant_recipe: str = "mixed",
    overwrite: bool = False,
) -> Path:
    """Convert a DiffusionGemma checkpoint to an MLX folder.

    Args:
        hf_path: local folder or Hugging Face repo id of the transformers checkpoint
            (an unquantized MLX folder works too).
        mlx_path: output folder; it must not exist unless `overwrite`.
        quantize: quantize the matrices (affine, as `nn.quantize`).
        q_bits: bits of the quantized matrices (of the experts and self-conditioning
            with the mixed recipe).
        q_group_size: quantization group size (ditto).
        dtype: cast the float weights (and quantization scales) to this dtype;
            default: keep the checkpoint's.
        upload_repo: Hugging Face repo to upload the result to.
        quant_recipe: "mixed" keeps the embedding, attention, dense MLP and router at
            8 bits (`Model.quant_predicate`); "uniform" uses `q_bits` everywhere.
        overwrite: replace an existing `mlx_path` (only after the new one loads).

    Returns:
        The output folder.
    """
    _check_args(q_bits, q_group_size, dtype, quant_recipe)
    dst = Path(mlx_path).expanduser().absolute()
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ValueError(
            f"Cannot save to the path {mlx_path} as it already exists. "
            "Pass --overwrite or choose another --mlx-path."
        )
    src = get_model_path(hf_path)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"--mlx-path {mlx_path} is the source folder; choose another --mlx-path.")
    config = _read_source_config(src)
    plan = make_plan(
        config, read_checkpoint_tensors(src), quantize, q_bits, q_group_size, dtype, quant_recipe
    )
    summary = recipe_summary(plan, quantize, q_bits, q_group_size, quant_recipe)
    vision = plan_has_vision(plan)
    print(
        f"[INFO] {len(plan.jobs)} tensors to convert "
        f"({'vision tower kept' if vision else 'text only: no vision tower'}); "
        f"{summary} in {len(plan.shards)} shard(s)"
    )
    warn_low_precision_experts(config, plan)

    check_disk_space(dst, plan.total_bytes + (64 << 20))  # plus tokenizer and slack
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.incomplete-{os.getpid()}"
    tmp.mkdir()
    try:
        write_weights(plan, tmp)
        copy_side_files(src, tmp)
        out_config = output_config(config, plan.quantization, dtype, vision)
        save_config(out_config, tmp / "config.json", keep_vision_config=True)
        n_layers = ModelArgs.from_dict(config).num_hidden_layers
        write_model_card(tmp, dst.name, str(hf_path), summary, n_layers, upload_repo, vision)
        verify_output(tmp, plan)
        _install(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[INFO] Saved {dst}")
    if upload_repo is not None:
        upload_to_hub(dst, upload_repo)
    return dst


def _read_source_config(src: Path) -> dict:
    config = read_config(src)
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(
            f"{src} is already quantized; load it directly with mlx_diffgemma.load, or "
            "convert the original unquantized checkpoint."
        )
    return config


def _terminate(signum, frame):
    # SystemExit unwinds through convert(), which removes the partial output.
    sys.exit(128 + signum)


@click.command(name="convert", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    required=True,
    help="Local folder or Hugging Face repo id of the transformers checkpoint.",
)
@click.option("--mlx-path", default=DEFAULT_MLX_PATH, show_default=True, help="Output folder.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights.")
@click.option(
    "--q-bits",
    type=click.Choice([str(b) for b in Q_BITS]),
    default="4",
    show_default=True,
    help="Bits per quantized weight (experts and self-conditioning with the mixed recipe).",
)
@click.option(
    "--q-group-size",
    type=click.Choice([str(g) for g in Q_GROUP_SIZES]),
    default="64",
    show_default=True,
    help="Quantization group size.",
)
@click.option(
    "--quant-recipe",
    type=click.Choice(QUANT_RECIPES),
    default="mixed",
    show_default=True,
    help="mixed: embedding, attention, dense MLP, router at 8 bits; uniform: --q-bits everywhere.",
)
@click.option(
    "--dtype",
    type=click.Choice(CONVERSION_DTYPES),
    default=None,
    help="Dtype of the float weights and scales [default: the checkpoint's].",
)
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --mlx-path.")
def convert_command(q_bits, q_group_size, **kwargs):
    """Convert a DiffusionGemma checkpoint to MLX (the vision tower kept when present)."""
    # Only the main thread may set signal handlers.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    started = time.time()
    try:
        convert(q_bits=int(q_bits), q_group_size=int(q_group_size), **kwargs)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(one_line(e)) from None
    except KeyboardInterrupt:  # convert() has removed its partial output, unless it was saved
        saved = Path(kwargs["mlx_path"]).expanduser() / "config.json"
        if saved.is_file() and saved.stat().st_mtime >= started:
            what = "its upload did not finish" if kwargs.get("upload_repo") else "it is complete"
            click.echo(
                f"Interrupted after the conversion was saved to {saved.parent}: {what}.", err=True
            )
            raise click.exceptions.Exit(130 if kwargs.get("upload_repo") else 0) from None
        interrupted()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(args: Optional[List[str]] = None) -> None:
    """Command-line entry point (`python -m mlx_diffgemma.convert`)."""
    convert_command.main(args=args, prog_name="python -m mlx_diffgemma.convert")


if __name__ == "__main__":
    main()
