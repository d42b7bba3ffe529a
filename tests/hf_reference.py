"""transformers (torch, fp32, CPU) reference harness for DiffusionGemma parity tests.

This module has no MLX code. It makes the numerical oracle that the MLX tests compare against:

- ``tiny_config`` / ``build_hf_checkpoint``: a tiny random DiffusionGemma in the release checkpoint layout,
  with every norm weight, router scale and both ``layer_scalar`` sets randomised.
- ``load_hf``: load a checkpoint in fp32 with the attention/experts kernels that agree best with fp64.
- ``HFDenoiser`` / ``hf_denoise_logits``: encoder prefill into a ``DynamicCache`` exactly as ``generate()``
  does, then decoder logits for a given canvas (optionally self-conditioned, optionally after more blocks
  were encoded).
- ``trace_hf_generate``: the real ``model.generate()`` with every random draw and every step recorded, so
  that an MLX implementation can replay it.
- ``run_scenario``: the two standard whole-generation scenarios (``"eos_run"``, ``"early_stop_run"``).

Import it from a test with ``tests/`` on ``sys.path``: ``from hf_reference import ...``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache
from transformers.utils import logging as hf_logging

# One intra-op thread: the tensors are tiny, and on a busy 2-core machine two OpenMP threads made a traced
# generate 5-50x slower (96 steps: 1.4 s with 1 thread vs 9-69 s with 2). Override with HF_REFERENCE_THREADS.
torch.set_num_threads(int(os.environ.get("HF_REFERENCE_THREADS", "1")))
hf_logging.disable_progress_bar()

SLIDING = "sliding_attention"
FULL = "full_attention"

# generation_config.json of google/diffusiongemma-26B-A4B-it (SPEC §1.3). The EOS ids 1/106/50 and pad 0
# are all below the tiny vocab (512), so the tiny checkpoints use it unchanged.
RELEASE_GENERATION_CONFIG: dict[str, Any] = {
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "max_denoising_steps": 48,
    "max_new_tokens": 256,
    "pad_token_id": 0,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "t_max": 0.8,
    "t_min": 0.4,
}
EOS_IDS = (1, 106, 50)
PAD_ID = 0
BOS_ID = 2

# Kernels for `load_hf`, measured against an fp64 eager/eager run of the same tiny checkpoints (3 seeds x 3
# prompts of 20 tokens, batch 2, decoder logits plain / self-conditioned / after a second block), 1 thread:
#   attention/experts        max |err|   mean of per-call max   mean |err|
#   eager/eager, eager/gmm   5.0e-4      2.41e-4                2.05e-5
#   sdpa/eager, sdpa/gmm     5.8e-4      2.32e-4                2.12e-5
# (with 2 threads: 5.4e-4 .. 6.2e-4 max, 2.1e-5 mean for all four). The experts kernel makes no difference
# and eager vs sdpa is a wash: both are fp32 rounding of the same math at |logits| <= 30. The default is
# HF's own CPU default (sdpa + grouped_mm), i.e. what a plain `from_pretrained` + `generate()` runs.
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"
DEFAULT_EXPERTS_IMPLEMENTATION = "grouped_mm"

_TEXT_DEFAULTS: dict[str, Any] = {
    "model_type": "diffusion_gemma_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "top_k_experts": 2,
    "num_hidden_layers": 4,
    # HF forces the last layer to full attention; a full layer in the middle as well catches
    # "only the last layer is global" bugs.
    "layer_types": [SLIDING, FULL, SLIDING, FULL],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "sliding_window": 8,
    "rope_parameters": {
        "full_attention": {
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
            "rope_type": "proportional",
        },
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "max_position_embeddings": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "use_bidirectional_attention": "vision",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": 1,
    "dtype": "float32",
}

VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "pooling_kernel_size": 3,
    "position_embedding_size": 64,
    "standardize": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    "default_output_length": 280,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "dtype": "float32",
}

_TOP_DEFAULTS: dict[str, Any] = {
    "model_type": "diffusion_gemma",
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 8,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "image_token_id": 258880,
    "vision_soft_tokens_per_image": 280,
    "eos_token_id": list(EOS_IDS),
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "dtype": "float32",
}

_TOP_LEVEL_OVERRIDES = ("canvas_length",)


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


def _default_layer_types(n: int) -> list[str]:
    # Alternate sliding/full, last layer full (HF forces it).
    return [FULL if (n - 1 - i) % 2 == 0 else SLIDING for i in range(n)]


def _to_style(text: dict, style: str) -> dict:
    """Rewrites the attention-geometry keys of a text_config dict into one key style."""
    text = copy.deepcopy(text)
    plc = text.pop("per_layer_config", None)
    ghd = text.pop("global_head_dim", None)
    gkv = text.pop("num_global_key_value_heads", None)
    full = [i for i, t in enumerate(text["layer_types"]) if t == FULL]
    if plc:
        entries = [plc.get(str(i), plc.get(i)) for i in full]
        if any(e is None for e in entries) or any(e != entries[0] for e in entries):
            raise ValueError(
                f"per_layer_config {plc} does not give one geometry for all full layers {full}"
            )
        ghd = entries[0].get("head_dim", ghd)
        gkv = entries[0].get("num_key_value_heads", gkv)
    if ghd is None:
        ghd = 512  # what HF 5.24 assumes when neither key style is present
    if style == "release":
        text["global_head_dim"] = ghd
        if gkv is not None:
            text["num_global_key_value_heads"] = gkv
    elif style == "per_layer":
        entry = {"head_dim": ghd}
        if gkv is not None:
            entry["num_key_value_heads"] = gkv
        text["per_layer_config"] = {str(i): dict(entry) for i in full}
    else:
        raise ValueError(f"style must be 'release' or 'per_layer', got {style!r}")
    return dict(sorted(text.items()))


def tiny_config(style: str = "release", **overrides) -> dict:
    """The full top-level ``config.json`` dict of a tiny DiffusionGemma.

    Args:
        style: ``"release"`` (text_config has ``global_head_dim`` / ``num_global_key_value_heads``, as in
            google's config.json) or ``"per_layer"`` (text_config has ``per_layer_config`` for the full
            layers, as transformers 5.24 writes it).
        overrides: text_config keys (e.g. ``vocab_size=262144``, ``sliding_window=16``,
            ``global_head_dim=64``) and the top-level ``canvas_length``. Overriding ``num_hidden_layers``
            without ``layer_types`` gives an alternating pattern that ends with a full layer.
    """
    text = copy.deepcopy(_TEXT_DEFAULTS)
    top = copy.deepcopy(_TOP_DEFAULTS)
    for k in _TOP_LEVEL_OVERRIDES:
        if k in overrides:
            top[k] = overrides.pop(k)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        overrides["layer_types"] = _default_layer_types(overrides["num_hidden_layers"])
    if "per_layer_config" in overrides:
        text.pop("global_head_dim")
        text.pop("num_global_key_value_heads")
    text.update(copy.deepcopy(overrides))
    text["num_hidden_layers"] = len(text["layer_types"])
    if text["layer_types"][-1] != FULL:
        raise ValueError(
            "HF forces the last layer to full_attention; pass layer_types ending with it"
        )
    if FULL not in text["layer_types"] or SLIDING not in text["layer_types"]:
        raise ValueError("the tiny config needs at least one sliding and one full layer")
    top["text_config"] = _to_style(text, style)
    top["vision_config"] = copy.deepcopy(VISION_CONFIG)
    return top


def config_from_dict(cfg: dict) -> DiffusionGemmaConfig:
    """``DiffusionGemmaConfig`` from a ``config.json`` dict of either key style."""
    return DiffusionGemmaConfig(**copy.deepcopy(cfg))


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

_NORM_WEIGHT = re.compile(r"(norm|layernorm|layernorm_\d)\.weight$")
# The norms whose outputs are added to the text residual stream.
_BRANCH_NORM = re.compile(
    r"(language_model|decoder)\.layers\.\d+\.(post_attention_layernorm|post_feedforward_layernorm)\.weight$"
)


@torch.no_grad()
def randomize_tiny_model(
    model: DiffusionGemmaForBlockDiffusion, eos_boost: float = 1.5, branch_scale: float = 1.0
) -> None:
    """In place: the randomisation of ``build_hf_checkpoint`` (uses the current torch RNG)."""
    text = model.config.text_config
    for name, p in model.named_parameters():  # tied parameters appear once (under the encoder name)
        if _NORM_WEIGHT.search(name):
            p.uniform_(0.5, 1.5)
            if _BRANCH_NORM.search(name):
                p.mul_(branch_scale)
        elif name.endswith("router.scale") or name.endswith("router.per_expert_scale"):
            p.uniform_(0.5, 1.5)
    emb = model.model.decoder.embed_tokens.weight  # == encoder embed == lm_head (tied)
    emb.normal_(0.0, 1.0)
    eos = [i for i in _as_list(model.config.eos_token_id) if i < text.vocab_size]
    emb[eos] *= eos_boost
    # Two distinct scalar sets, in disjoint ranges: decoder < 1 < encoder.
    for layer in model.model.decoder.layers:
        layer.layer_scalar.uniform_(0.5, 0.9)
    for layer in model.model.encoder.language_model.layers:
        layer.layer_scalar.uniform_(1.1, 1.6)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]


def _rewrite_config_json(path: Path, style: str, cfg: dict) -> None:
    saved = json.loads((path / "config.json").read_text())
    saved["text_config"] = _to_style(saved["text_config"], style)
    # HF rewrites the vision rope_type "default" to "axial" (BC shim); keep the release spelling.
    saved["vision_config"]["rope_parameters"] = copy.deepcopy(
        cfg["vision_config"]["rope_parameters"]
    )
    for k in ("vision_soft_tokens_per_image",):
        if k in cfg:
            saved[k] = cfg[k]
    (path / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def build_hf_checkpoint(
    path,
    style: str = "release",
    seed: int = 0,
    eos_boost: float = 1.5,
    branch_scale: float = 1.0,
    max_shard_size: int | str | None = None,
    generation_config: dict | None = None,
    verify: bool = True,
    **overrides,
) -> Path:
    """Builds and saves a tiny random fp32 DiffusionGemma checkpoint in the release layout.

    Args:
        path: output folder (created).
        style: ``config.json`` key style, ``"release"`` or ``"per_layer"`` (see ``tiny_config``).
        seed: ``torch.manual_seed`` for the construction and the randomisation.
        eos_boost: the EOS rows (1, 106, 50) of the N(0, 1) embedding (= tied LM head) are scaled by this.
        branch_scale: multiplies the (random) ``post_attention_layernorm`` / ``post_feedforward_layernorm``
            weights. Below 1 the residual stream (hence the input token) dominates, the argmax canvas
            becomes a stable fixed point and stable-and-confident early stopping can fire.
        max_shard_size: passed to ``save_pretrained`` (e.g. ``"200KB"``) to get
            ``model.safetensors.index.json`` plus several shards; ``None``: one ``model.safetensors``.
        generation_config: keys that update the release ``generation_config.json``.
        verify: reload with ``from_pretrained`` and check that every tensor (both scalar sets included)
            round-trips bit-exactly.
        overrides: text_config keys and ``canvas_length`` (see ``tiny_config``).

    Returns:
        ``pathlib.Path`` of the folder. It holds ``config.json``, ``generation_config.json`` and safetensors
        with exactly the release key set: ``model.decoder.*``, ``model.encoder.language_model.layers.*.
        layer_scalar``, ``model.encoder.vision_tower.*``, ``model.encoder.embed_vision.*``; no ``lm_head``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # save_pretrained leaves a stale index behind
    cfg = tiny_config(style, **overrides)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config_from_dict(cfg)).to(torch.float32).eval()
    randomize_tiny_model(model, eos_boost=eos_boost, branch_scale=branch_scale)
    kwargs = {}  # transformers 5 always writes safetensors
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    _rewrite_config_json(path, style, cfg)
    gen = copy.deepcopy(RELEASE_GENERATION_CONFIG)
    gen.update(copy.deepcopy(generation_config or {}))
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if verify:
        reloaded = load_hf(path)
        ref = model.state_dict()
        got = reloaded.state_dict()
        if set(ref) != set(got):
            raise AssertionError(
                f"state_dict keys differ after reload: {sorted(set(ref) ^ set(got))}"
            )
        bad = [k for k in ref if not torch.equal(ref[k], got[k])]
        if bad:
            raise AssertionError(f"tensors differ after reload: {bad}")
        stored = checkpoint_keys(path)
        unexpected = [k for k in stored if not _is_release_key(k)]
        if unexpected:
            raise AssertionError(f"keys outside the release layout were saved: {unexpected}")
    return path


def _is_release_key(k: str) -> bool:
    return (
        k.startswith("model.decoder.")
        or re.fullmatch(r"model\.encoder\.language_model\.layers\.\d+\.layer_scalar", k) is not None
        or k.startswith("model.encoder.vision_tower.")
        or k.startswith("model.encoder.embed_vision.")
    )


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a checkpoint folder (shards in index order, or the single file)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return [path / "model.safetensors"]


def checkpoint_keys(path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor stored in a checkpoint folder (single file or sharded)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return dict(sorted(out.items()))


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """Every stored tensor of a checkpoint folder as a numpy array (fp32 checkpoints stay fp32)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in checkpoint_files(path):
        out.update(load_file(str(f)))
    return dict(sorted(out.items()))


def load_hf(
    path,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
    experts_implementation: str = DEFAULT_EXPERTS_IMPLEMENTATION,
) -> DiffusionGemmaForBlockDiffusion:
    """``DiffusionGemmaForBlockDiffusion.from_pretrained(path)`` in fp32, eval mode, offline.

    Defaults to ``sdpa`` attention and ``grouped_mm`` experts (HF's own CPU defaults). Against an fp64
    eager run every fp32 choice agrees to ~2e-5 mean / ~6e-4 max abs on the peaky tiny model's logits,
    with no consistent winner (numbers above ``DEFAULT_ATTN_IMPLEMENTATION``). For an fp64 oracle use
    ``load_hf(path, "eager", "eager").to(torch.float64)``.
    """
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
        local_files_only=True,
    )
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Forward-pass oracle
# --------------------------------------------------------------------------------------------------------


def _ids(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.long)
    return t[None] if t.ndim == 1 else t


class HFDenoiser:
    """Encoder prefill + decoder calls on one ``DynamicCache``, exactly as ``generate()`` makes them.

    ``HFDenoiser(model, prompt_ids)`` encodes the prompt at positions ``0..P-1``. ``denoise(canvas, sc)``
    runs the decoder on ``canvas`` at positions ``L..L+C-1`` (``L`` = tokens encoded so far) without
    touching the cache. ``append(block)`` encodes a block at those same positions (what ``generate()``
    does with each finished canvas), after which ``denoise`` sees it.

    Every call goes through the model's own ``_prepare_encoder_inputs``, ``model.encoder``,
    ``create_diffusion_decoder_attention_mask`` and ``model.forward``; nothing is re-implemented.
    """

    def __init__(self, model: DiffusionGemmaForBlockDiffusion, prompt_ids):
        self.model = model
        ids = _ids(prompt_ids)
        self.batch_size = ids.shape[0]
        self.canvas_length = model.config.canvas_length
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.length = 0
        self.tokens = ids[:, :0]
        self.encoder_hidden: list[np.ndarray] = []
        self.append(ids)

    @torch.no_grad()
    def append(self, block_ids) -> np.ndarray:
        """Encodes ``block_ids`` [B, n] at positions ``L..L+n-1`` into the cache.

        Returns the encoder's final hidden state (float32 [B, n, H]; ``generate()`` never uses it)."""
        ids = _ids(block_ids)
        b, n = ids.shape
        if b != self.batch_size:
            raise ValueError(f"batch size {b} != {self.batch_size}")
        pos = torch.arange(self.length, self.length + n, dtype=torch.int32)[None]
        attention_mask = torch.ones((b, self.length + n), dtype=torch.bool)
        enc_ids, mask_mapping = self.model._prepare_encoder_inputs(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_position_ids=pos,
            cache=self.cache,
            is_prefill=True,
            canvas_length=self.canvas_length,
            batch_size=b,
        )
        out = self.model.model.encoder(
            input_ids=enc_ids, attention_mask=mask_mapping, cache=self.cache, position_ids=pos
        )
        self.cache = out.cache
        self.length += n
        self.tokens = torch.cat([self.tokens, ids], dim=-1)
        h = out.last_hidden_state.float().numpy()
        self.encoder_hidden.append(h)
        return h

    @torch.no_grad()
    def denoise(self, canvas, sc_logits=None) -> np.ndarray:
        """Decoder logits for ``canvas`` [B, C] (int) at positions ``L..L+C-1``.

        Args:
            canvas: int array [B, C] (or [C]).
            sc_logits: optional float array [B, C, V]: the self-conditioning logits exactly as ``generate``
                passes them (the previous step's temperature-scaled logits).

        Returns:
            float32 numpy [B, C, V]: softcapped logits (|x| <= 30), the ``raw_logits`` of a generate step.
        """
        canvas = _ids(canvas)
        b, c = canvas.shape
        pos = torch.arange(self.length, self.length + c, dtype=torch.int32)[None]
        decoder_attention_mask = torch.ones((b, self.length + c), dtype=torch.bool)
        mask_mapping = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=self.cache,
            decoder_attention_mask=decoder_attention_mask,
        )
        sc = None
        if sc_logits is not None:
            sc = torch.as_tensor(np.asarray(sc_logits, dtype=np.float32))
            sc = sc[None] if sc.ndim == 2 else sc
            sc = sc.to(self.model.model.decoder.embed_tokens.weight.dtype)
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=sc,
            decoder_attention_mask=mask_mapping,
            cache=self.cache,
            decoder_position_ids=pos,
        )
        return out.logits.float().numpy()

    def cache_kv(self) -> list[dict[str, np.ndarray]]:
        """Per layer ``{"keys", "values"}`` as float32 [B, n_kv, T, head_dim]. Sliding layers hold the
        last ``sliding_window - 1`` tokens, full layers all ``L`` (post-norm, post-RoPE keys)."""
        return [
            {
                "keys": layer.keys.float().numpy().copy(),
                "values": layer.values.float().numpy().copy(),
            }
            for layer in self.cache.layers
        ]


def hf_denoise_logits(model, prompt_ids, canvases, sc_logits=None, blocks=()) -> np.ndarray:
    """One-shot ``HFDenoiser``: encode ``prompt_ids`` [B, P] at 0..P-1, then each of ``blocks`` ([B, C]
    each) at the following positions, then return the decoder logits (float32 [B, C, V]) for
    ``canvases`` [B, C] with optional self-conditioning logits ``sc_logits`` [B, C, V]."""
    d = HFDenoiser(model, prompt_ids)
    for blk in blocks:
        d.append(blk)
    return d.denoise(canvases, sc_logits)


# --------------------------------------------------------------------------------------------------------
# Traced generate
# --------------------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().clone().numpy()


def _temperature(gc, cur_step) -> np.float32:
    """The schedule value exactly as LinearTemperatureScheduleLogitsProcessor computes it (fp32 tensor)."""
    step = torch.as_tensor(cur_step, dtype=torch.int32)
    t = gc.t_min + ((gc.t_max - gc.t_min) * (step / gc.max_denoising_steps))
    return np.float32(t.item())


def _accept_margin(entropy: np.ndarray, bound: float) -> np.ndarray:
    """Per row, how close the entropy-bound acceptance was to changing (float32 [B]).

    The sampler accepts the K lowest-entropy positions, K = #{k: sum of the k-1 lower entropies <= bound}.
    The decision only flips if one of these moves: ``bound - stat[K-1]``, ``stat[K] - bound`` and the
    entropy gap ``s[K] - s[K-1]`` between the last accepted and the first rejected position."""
    s = np.sort(entropy.astype(np.float64), axis=-1)
    stat = np.cumsum(s, -1) - s
    out = []
    for srow, trow in zip(s.reshape(-1, s.shape[-1]), stat.reshape(-1, s.shape[-1])):
        k = int((trow <= bound).sum())
        m = bound - trow[k - 1]
        if k < len(srow):
            m = min(m, trow[k] - bound, srow[k] - srow[k - 1])
        out.append(m)
    return np.asarray(out, dtype=np.float32).reshape(s.shape[:-1])


def trace_hf_generate(
    model: DiffusionGemmaForBlockDiffusion,
    input_ids,
    seed: int | None = 0,
    record_logits: bool = False,
    **generate_kwargs,
) -> dict:
    """Runs ``model.generate(input_ids, **generate_kwargs)`` (DynamicCache path) and records everything.

    ``torch.manual_seed(seed)`` is set first unless ``seed`` is None. Static caches are refused.

    Returns a dict of plain numpy arrays / python values (B = batch, C = canvas length, V = vocab):

    - ``sequences`` int64 [B, P + k*C]; ``tokens_per_forward`` float32 [B]; ``decoder_forward_passes``
      int64 [B]; ``prompt_len`` P; ``canvas_length`` C; ``vocab_size`` V; ``num_canvases`` k;
      ``num_steps`` list[int] (steps run per canvas); ``finished`` bool [B] (EOS seen, or max_length).
    - ``config``: the resolved generation settings (max_denoising_steps, t_min, t_max, entropy_bound,
      stability_threshold, confidence_threshold, eos_token_id (list), pad_token_id, max_new_tokens,
      max_length, max_new_canvases).
    - ``draws``: every torch RNG call made by generate, in call order. Each is a dict ``kind`` (``"init"``:
      the fresh canvas of ``_prepare_denoiser_inputs``; ``"init_unused"``: the same call when a
      ``decoder_input_ids`` canvas was passed and the draw was thrown away; ``"multinomial"``: the sampled
      canvas of a step; ``"renoise"``: the uniform ids drawn by ``renoise_canvas``), ``canvas`` (index),
      ``step`` (index within the canvas, -1 for init), ``value`` int64 [B, C]. Per step the order is
      multinomial then renoise; per canvas, init comes after the encoder call and before step 0.
    - ``canvases``: per canvas a dict with ``encoder_input_ids`` int64 [B, n] and ``encoder_positions``
      int64 [n] (the prompt first, then the previous appended canvas), ``decoder_positions`` int64 [C],
      ``init_canvas`` int64 [B, C] (the canvas step 0 starts from), ``num_steps``, ``early_stop`` (all
      rows stopped before max_denoising_steps), ``appended`` int64 [B, C] (the argmax canvas appended),
      ``final`` int64 [B, C] (after EOS/pad handling), ``finished_sequences`` bool [B] and ``steps``: per
      step a dict ``cur_step`` (N..1), ``temperature`` float32, ``canvas_in`` [B, C],
      ``sampled`` [B, C], ``entropy`` float32 [B, C] (of the processed logits), ``argmax_margin`` float32
      [B, C] (top-1 minus top-2 processed logit: how close the argmax was to a tie), ``accept_margin``
      float32 [B] (how close the acceptance set was to changing, see ``_accept_margin``),
      ``accepted_mask`` bool [B, C], ``accepted`` [B, C], ``renoise_draw`` [B, C], ``renoised`` [B, C]
      (sampler output), ``canvas_out`` [B, C] (the next current canvas; rows that had already stopped
      keep ``canvas_in``), ``argmax`` [B, C], ``finished_before`` / ``finished_denoising`` bool [B]
      (stopped before / after the step) and, with ``record_logits``, ``raw_logits`` (decoder output,
      softcapped) and ``processed_logits`` (= raw / temperature, also the next step's self-conditioning
      input) float32 [B, C, V]. Integer arrays are int64.
    """
    if generate_kwargs.get("cache_implementation") not in (None, "dynamic"):
        raise ValueError("trace_hf_generate only traces the DynamicCache path")
    if generate_kwargs.get("generation_config") is not None and getattr(
        generate_kwargs["generation_config"], "cache_implementation", None
    ) not in (None, "dynamic"):
        raise ValueError("trace_hf_generate only traces the DynamicCache path")
    generate_kwargs.pop("return_dict_in_generate", None)
    input_ids = _ids(input_ids)
    state: dict[str, Any] = {"phase": None, "canvas": -1, "step": -1, "B": input_ids.shape[0]}
    draws: list[dict] = []
    canvases: list[dict] = []
    extras: dict[str, Any] = {}
    C = model.config.canvas_length

    orig_randint, orig_multinomial = torch.randint, torch.multinomial

    def randint(*args, **kwargs):
        out = orig_randint(*args, **kwargs)
        kind = {"init": "init", "renoise": "renoise"}.get(state["phase"], "other")
        rec = {"kind": kind, "canvas": state["canvas"], "step": state["step"], "value": _np(out)}
        rec["_tensor"] = out
        draws.append(rec)
        return out

    def multinomial(probs, *args, **kwargs):
        out = orig_multinomial(probs, *args, **kwargs)
        val = _np(out).reshape(state["B"], -1)
        draws.append(
            {"kind": "multinomial", "canvas": state["canvas"], "step": state["step"], "value": val}
        )
        return out

    m_gen_cfg = model._prepare_generation_config
    m_enc_inputs = model._prepare_encoder_inputs
    m_den_inputs = model._prepare_denoiser_inputs
    m_step = model._denoising_step
    m_finalize = model._finalize_canvas
    m_tpf = model._compute_tokens_per_forward
    m_sampler = model._prepare_sampler
    m_forward = model.forward

    def prepare_generation_config(*a, **k):
        gc, mk = m_gen_cfg(*a, **k)
        if gc.cache_implementation not in (None, "dynamic"):
            raise ValueError("trace_hf_generate only traces the DynamicCache path")
        extras["gc"] = gc
        return gc, mk

    def prepare_encoder_inputs(*a, **k):
        ids, masks = m_enc_inputs(*a, **k)
        state["canvas"] += 1
        state["step"] = -1
        canvases.append(
            {
                "encoder_input_ids": _np(ids),
                "encoder_positions": _np(k["encoder_position_ids"][0]).astype(np.int64),
                "steps": [],
            }
        )
        return ids, masks

    def prepare_denoiser_inputs(*a, **k):
        state["phase"] = "init"
        n_before = len(draws)
        try:
            out = m_den_inputs(*a, **k)
        finally:
            state["phase"] = None
        current = out[0]
        for rec in draws[n_before:]:
            if rec["kind"] == "init" and rec.get("_tensor") is not current:
                rec["kind"] = "init_unused"
        canvases[-1]["init_canvas"] = _np(current)
        return out

    def prepare_sampler(*a, **k):
        sampler = m_sampler(*a, **k)
        s_accept, s_renoise = sampler.accept_canvas, sampler.renoise_canvas

        def accept_canvas(current_canvas, denoiser_canvas, logits, cur_step):
            out = s_accept(current_canvas, denoiser_canvas, logits, cur_step)
            st = canvases[-1]["steps"][-1]
            st["sampled"] = _np(denoiser_canvas)
            st["entropy"] = _np(torch.distributions.Categorical(logits=logits).entropy().float())
            st["accepted_mask"] = _np(sampler.accepted_token_mask).astype(bool)
            st["accepted"] = _np(out)
            top2 = torch.topk(logits.float(), 2, dim=-1).values
            st["argmax_margin"] = _np(top2[..., 0] - top2[..., 1])
            st["accept_margin"] = _accept_margin(st["entropy"], sampler.entropy_bound)
            if record_logits:
                st["processed_logits"] = _np(logits.float())
            return out

        def renoise_canvas(accepted_canvas, cur_step):
            state["phase"] = "renoise"
            n_before = len(draws)
            try:
                out = s_renoise(accepted_canvas, cur_step)
            finally:
                state["phase"] = None
            st = canvases[-1]["steps"][-1]
            new = [r for r in draws[n_before:] if r["kind"] == "renoise"]
            st["renoise_draw"] = new[-1]["value"] if new else None
            st["renoised"] = _np(out)
            return out

        sampler.accept_canvas = accept_canvas
        sampler.renoise_canvas = renoise_canvas
        return sampler

    def forward(*a, **k):
        out = m_forward(*a, **k)
        if record_logits and canvases and canvases[-1]["steps"]:
            canvases[-1]["steps"][-1]["raw_logits"] = _np(out.logits.float())
        return out

    def denoising_step(**k):
        gc = extras["gc"]
        state["step"] += 1
        cur_step = int(k["cur_step"])
        cv = canvases[-1]
        cv["decoder_positions"] = _np(k["decoder_position_ids"][0]).astype(np.int64)
        cv["steps"].append(
            {
                "cur_step": cur_step,
                "temperature": _temperature(gc, cur_step),
                "canvas_in": _np(k["current_canvas"]),
                "finished_before": _np(k["finished_denoising"]).astype(bool),
            }
        )
        new_current, new_argmax, sc_logits, finished = m_step(**k)
        st = cv["steps"][-1]
        st["canvas_out"] = _np(new_current)
        st["argmax"] = _np(new_argmax)
        st["finished_denoising"] = _np(finished).astype(bool)
        return new_current, new_argmax, sc_logits, finished

    def finalize_canvas(**k):
        cv = canvases[-1]
        cv["appended"] = _np(k["input_ids"][:, -C:])
        input_ids_out, finished_sequences = m_finalize(**k)
        cv["final"] = _np(input_ids_out[:, -C:])
        cv["finished_sequences"] = _np(finished_sequences).astype(bool)
        return input_ids_out, finished_sequences

    def compute_tokens_per_forward(input_ids_, decoder_forward_passes, *a, **k):
        extras["decoder_forward_passes"] = _np(decoder_forward_passes).astype(np.int64)
        return m_tpf(input_ids_, decoder_forward_passes, *a, **k)

    patches = {
        "_prepare_generation_config": prepare_generation_config,
        "_prepare_encoder_inputs": prepare_encoder_inputs,
        "_prepare_denoiser_inputs": prepare_denoiser_inputs,
        "_denoising_step": denoising_step,
        "_finalize_canvas": finalize_canvas,
        "_compute_tokens_per_forward": compute_tokens_per_forward,
        "_prepare_sampler": prepare_sampler,
        "forward": forward,
    }
    if seed is not None:
        torch.manual_seed(seed)
    for name, fn in patches.items():
        setattr(model, name, fn)
    torch.randint, torch.multinomial = randint, multinomial
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, return_dict_in_generate=True, **generate_kwargs
            )
    finally:
        torch.randint, torch.multinomial = orig_randint, orig_multinomial
        for name in patches:
            model.__dict__.pop(name, None)

    gc = extras["gc"]
    N = gc.max_denoising_steps
    for rec in draws:
        rec.pop("_tensor", None)
    for cv in canvases:
        cv["num_steps"] = len(cv["steps"])
        cv["early_stop"] = cv["num_steps"] < N
    seq = _np(out.sequences).astype(np.int64)
    P = input_ids.shape[1]
    max_new_tokens = gc.max_new_tokens
    if gc.max_length and gc.max_new_tokens == 256:
        max_new_tokens = gc.max_length - P
    return {
        "sequences": seq,
        "tokens_per_forward": _np(out.tokens_per_forward).astype(np.float32),
        "decoder_forward_passes": extras["decoder_forward_passes"],
        "prompt_len": P,
        "canvas_length": C,
        "vocab_size": model.config.text_config.vocab_size,
        "num_canvases": len(canvases),
        "num_steps": [cv["num_steps"] for cv in canvases],
        "finished": canvases[-1]["finished_sequences"].copy(),
        "draws": draws,
        "canvases": canvases,
        "config": {
            "max_denoising_steps": N,
            "t_min": gc.t_min,
            "t_max": gc.t_max,
            "entropy_bound": gc.sampler_config.entropy_bound,
            "stability_threshold": gc.stability_threshold,
            "confidence_threshold": gc.confidence_threshold,
            "eos_token_id": _as_list(gc.eos_token_id),
            "pad_token_id": gc.pad_token_id,
            "max_new_tokens": max_new_tokens,
            "max_length": gc.max_length,
            "max_new_canvases": -(-max_new_tokens // C),
        },
    }


# --------------------------------------------------------------------------------------------------------
# Standard whole-generation scenarios
# --------------------------------------------------------------------------------------------------------


def scenario_prompt(length: int = 20, seed: int = 0, vocab_size: int = 512) -> np.ndarray:
    """A deterministic prompt [1, length]: BOS, then ids in [3, vocab) that are not EOS/pad."""
    rng = np.random.RandomState(seed)
    pool = np.array([i for i in range(3, vocab_size) if i not in EOS_IDS])
    return np.concatenate([[BOS_ID], rng.choice(pool, size=length - 1)]).astype(np.int64)[None]


# Pinned settings, found by a small search (linux x86-64, torch 2.13 CPU, 1 thread) that also maximised the
# distance of every sampler decision from flipping. On the eos_run, an fp64 re-run of every step moves the
# token entropies by at most 6.6e-5, i.e. <= 3% of the smallest acceptance margin (5.1e-4), and the last-step
# argmax margins are >= 0.25. A random model's trajectory is chaotic, so another CPU's fp32 rounding could
# still change it: `run_scenario` then walks on through `generate_seeds` until the scenario's property holds
# and returns the seed it used.
SCENARIOS: dict[str, dict[str, Any]] = {
    # Default model and the release generation_config.json, max_new_tokens 64 (8 canvases at most):
    # 4 canvases of 48 steps; the 4th holds EOS 1 at index 5, then pad. 192 decoder passes.
    "eos_run": {
        "build": {"style": "release", "seed": 0, "eos_boost": 1.5, "branch_scale": 1.0},
        "prompt": {"length": 20, "seed": 0},
        "generate": {"max_new_tokens": 64},
        "generate_seeds": [1, 6, 0, 5, 2, 7, 3, 4],
    },
    # Release generation_config.json unchanged (stability 1, confidence 0.005), but a residual-dominated
    # model (branch_scale 0.35): the argmax canvas reaches a fixed point, so stable-and-confident stopping
    # fires. Canvas 1 stops after 38 steps (mean entropy 9.8% below the threshold at the stop, and never
    # within 9.8% of it on the earlier stable steps); canvas 2 runs all 48 steps and ends with EOS 1 at
    # its last index. 86 decoder passes.
    "early_stop_run": {
        "build": {"style": "release", "seed": 0, "eos_boost": 1.5, "branch_scale": 0.35},
        "prompt": {"length": 20, "seed": 0},
        "generate": {"max_new_tokens": 32},
        "generate_seeds": [3, 6, 4, 0, 1, 2, 5, 7],
    },
}


def eos_run_ok(trace: dict) -> bool:
    """>= 3 canvases, every row finished on EOS, the last canvas holds the EOS and no earlier one does."""
    eos = trace["config"]["eos_token_id"]
    cvs = trace["canvases"]
    return (
        len(cvs) >= 3
        and bool(trace["finished"].all())
        and bool(np.isin(cvs[-1]["final"], eos).any(axis=-1).all())
        and not any(bool(np.isin(cv["final"], eos).any()) for cv in cvs[:-1])
    )


def early_stop_run_ok(trace: dict) -> bool:
    """Some canvas stopped (stable and confident) before max_denoising_steps."""
    return any(cv["early_stop"] for cv in trace["canvases"])


SCENARIO_CHECKS = {"eos_run": eos_run_ok, "early_stop_run": early_stop_run_ok}


def run_scenario(name: str, root, record_logits: bool = False) -> dict:
    """Builds the checkpoint of ``SCENARIOS[name]`` under ``root/name`` and traces its generate call.

    Returns a dict: ``name``; ``path`` (checkpoint folder); ``input_ids`` int64 [1, 20]; ``generate_kwargs``
    (pass them to generate; the rest comes from the checkpoint's release ``generation_config.json``);
    ``seed`` (the ``torch.manual_seed`` used before generate); ``settings`` (the ``SCENARIOS`` entry);
    ``trace`` (``trace_hf_generate`` output); ``model`` (the loaded HF model).
    Replay: load ``path``, run ``input_ids`` with ``generate_kwargs`` and feed the draws of ``trace``.
    """
    s = copy.deepcopy(SCENARIOS[name])
    path = build_hf_checkpoint(Path(root) / name, **s["build"])
    model = load_hf(path)
    ids = scenario_prompt(**s["prompt"])
    check = SCENARIO_CHECKS[name]
    for seed in s["generate_seeds"]:
        trace = trace_hf_generate(
            model, ids, seed=seed, record_logits=record_logits, **s["generate"]
        )
        if check(trace):
            break
    else:
        raise AssertionError(f"no seed in {s['generate_seeds']} gives a valid {name}")
    return {
        "name": name,
        "path": path,
        "input_ids": ids,
        "generate_kwargs": dict(s["generate"]),
        "seed": seed,
        "settings": s,
        "trace": trace,
        "model": model,
    }
