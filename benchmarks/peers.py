"""Runners for side-by-side DiffusionGemma benchmarks: this project, mlx-vlm and transformers.

Each runner imports its runtime lazily, so the file imports without any of them installed. A
missing runtime raises a one-line ``ImportError`` that names the pip command.

    run_mlx_diffgemma(model_path, prompt_ids, RunSettings(max_new_tokens, max_denoising_steps, seed))
    run_mlx_vlm(model_path, prompt_ids, settings)
    run_transformers(model_path, prompt_ids, settings)

Both runners take a local checkpoint folder in the HF layout. That is ``model.decoder.*``, the
encoder ``layer_scalar``s and the vision keys, plus ``config.json`` and (optionally)
``generation_config.json``. mlx-vlm also loads its own quantized layout (``.scales``/``.biases``
plus a ``quantization`` block in config.json). mlx-vlm reads only ``global_head_dim`` /
``num_global_key_value_heads`` from ``text_config``. It ignores the ``per_layer_config`` form that
transformers 5.24 writes, and falls back to 512 / 2. So a checkpoint re-saved by transformers 5.24
with other head sizes must have its config.json rewritten to the release style first.

No tokenizer files are needed. The runners take and return token ids.

Both runners return the same keys:

    peer, versions, generated_ids (new tokens; cut after the first EOS, inclusive, and at
    max_new_tokens), num_generated_tokens, finish_reason ("stop" | "length"),
    num_canvases, steps_per_canvas (list), total_denoising_steps,
    tokens_per_forward (num_generated_tokens excluding pad id 0 / total_denoising_steps),
    load_s, prefill_s, generate_s (denoising + re-encoding, after prefill), total_s,
    tokens_per_s (num_generated_tokens / generate_s), peak_memory_gb (allocator peak during
    the run, where the peer exposes one) and peak_rss_gb (process high-water mark, load included).
    ``warmup=True`` first runs one untimed generation with the same prompt (at most 2 canvases x
    2 steps). The first torch generate() on the tiny model is about 10x slower than the next.
    run_transformers also returns hf_tokens_per_forward (HF's own value) and raw_new_ids (the
    whole appended canvases, pads included).

Subprocess use
--------------
mlx-vlm 0.7.10 can share a venv with mlx 0.32.4 / mlx-lm 0.32.2 / transformers 5.24 / torch
2.13: pip resolves the set with no conflicts. But it pulls in opencv, pyarrow, pandas, datasets,
scipy, fastapi and mlx-audio, so the project keeps it in its own venv (see benchmarks/README.md).
For that case this file is also a script. ``run_peer_subprocess`` runs it under another
interpreter: it sends the request as JSON on stdin, and the script prints one line
``PEERS_RESULT_JSON: {...}`` on stdout.

    from benchmarks.peers import run_peer_subprocess
    res = run_peer_subprocess("mlx_vlm", "../venv-peer/bin/python", model_path, ids,
                              RunSettings(256, 48, seed=0), openblas=True)

On the Linux CPU box, float32 matmuls in MLX are about 50x faster with OpenBLAS preloaded (see
shared/docs/PERFORMANCE.md section 3.4). The preload has to be in place before the process
starts. ``openblas=True`` sets it up for the child process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

DEFAULT_EOS_TOKEN_IDS = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>
PAD_TOKEN_ID = 0
RESULT_MARKER = "PEERS_RESULT_JSON: "
OPENBLAS_LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

__all__ = [
    "run_mlx_diffgemma",
    "run_mlx_vlm",
    "run_transformers",
    "run_peer_subprocess",
    "openblas_env",
]


# --------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class RunSettings:
    """What every runner takes besides the checkpoint and the prompt (transformers' names).

    ``warmup=True`` first runs one untimed generation (at most 2 canvases x 2 steps);
    ``dtype`` ("float32", ...) casts the float parameters after loading (None: as stored);
    ``eos_token_ids`` None reads them from the checkpoint.
    """

    max_new_tokens: int
    max_denoising_steps: int
    seed: int
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: Optional[Sequence[int]] = None
    dtype: Optional[str] = None
    warmup: bool = False


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _eos_ids(model_path: Path, eos_token_ids: Optional[Sequence[int]]) -> List[int]:
    """The generation_config list first (as HF does), then config.json, then the release default."""
    if eos_token_ids is not None:
        return [
            int(t) for t in ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)
        ]
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_path / name).get("eos_token_id")
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]
    return list(DEFAULT_EOS_TOKEN_IDS)


def _cut(ids: Sequence[int], eos: Sequence[int], max_new_tokens: int):
    """New tokens up to and including the first EOS, at most max_new_tokens; and the finish reason."""
    out: List[int] = []
    eos = set(eos)
    for t in ids:
        out.append(int(t))
        if int(t) in eos:
            return out, "stop"
        if len(out) >= max_new_tokens:
            break
    return out, "length"


def _peak_rss_gb() -> Optional[float]:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    except Exception:  # pragma: no cover - non-Unix
        return None


def _common_result(
    peer,
    versions,
    new_ids,
    eos,
    max_new_tokens,
    steps_per_canvas,
    load_s,
    prefill_s,
    generate_s,
    total_s,
    peak_memory_gb,
):
    generated, finish = _cut(new_ids, eos, max_new_tokens)
    steps = int(sum(steps_per_canvas))
    valid = sum(1 for t in generated if t != PAD_TOKEN_ID)
    return {
        "peer": peer,
        "versions": versions,
        "generated_ids": generated,
        "num_generated_tokens": len(generated),
        "finish_reason": finish,
        "num_canvases": len(steps_per_canvas),
        "steps_per_canvas": [int(s) for s in steps_per_canvas],
        "total_denoising_steps": steps,
        "tokens_per_forward": (valid / steps) if steps else None,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "generate_s": generate_s,
        "total_s": total_s,
        "tokens_per_s": (len(generated) / generate_s) if generate_s else None,
        "peak_memory_gb": peak_memory_gb,
        "peak_rss_gb": _peak_rss_gb(),
    }


# --------------------------------------------------------------------------- mlx-vlm
class _IdStoppingCriteria:
    """Stands in for mlx_vlm.utils.StoppingCriteria without a tokenizer (ids only)."""

    def __init__(self, eos_token_ids):
        self.eos_token_ids = list(eos_token_ids)

    def add_eos_token_ids(self, new_eos_token_ids=None):
        if new_eos_token_ids is None:
            return
        if isinstance(new_eos_token_ids, int):
            new_eos_token_ids = [new_eos_token_ids]
        self.eos_token_ids.extend(int(t) for t in new_eos_token_ids if isinstance(t, int))

    def reset(self, eos_token_ids=None):
        if eos_token_ids is not None:
            self.eos_token_ids = list(eos_token_ids)

    def __call__(self, token) -> bool:
        return token in self.eos_token_ids


class _IdDetokenizer:
    """Stands in for mlx-vlm's streaming detokenizer: it keeps the ids and emits no text."""

    def __init__(self):
        self.tokens: List[int] = []
        self.last_segment = ""

    def reset(self):
        self.tokens = []
        self.last_segment = ""

    def add_token(self, token, skip_special_token_ids=None):
        self.tokens.append(int(token))

    def finalize(self):
        pass


class _IdProcessor:
    """The smallest processor that mlx-vlm's DiffusionGemma stream path uses (ids only)."""

    def __init__(self, eos_token_ids):
        self.stopping_criteria = _IdStoppingCriteria(eos_token_ids)
        self.detokenizer = _IdDetokenizer()
        self.all_special_ids: List[int] = []

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(t)) for t in ids)


def run_mlx_vlm(
    model_path,
    prompt_ids: Sequence[int],
    s: RunSettings,
    *,
    diffusion_sampler: str = "entropy-bound",
    more_prompts: Optional[Sequence[Sequence[int]]] = None,
) -> Dict[str, Any]:
    """Generate with mlx-vlm (>= 0.6.3; checked on 0.7.10), set up to run HF's algorithm.

    With ``diffusion_sampler="confidence-threshold"`` it runs mlx-vlm's own default instead:
    the confidence-threshold sampler at temperature 0 with its canvas shrink (the call's
    ``temperature`` and ``diffusion_full_canvas`` left at mlx-vlm's defaults).

    The call is ``mlx_vlm.stream_generate(model, proc, "", input_ids=..., max_tokens=...,
    max_denoising_steps=..., seed=..., temperature=1.0, diffusion_sampler="entropy-bound",
    diffusion_full_canvas=True)``. Here ``model`` comes from ``mlx_vlm.utils.load_model(path)``
    and ``proc`` is an ids-only stand-in processor. The sampler parameters have no kwargs in
    mlx-vlm; they are read from ``model.config.generation_config`` (generate/diffusion.py
    629-658), so this runner overwrites that dict. ``dtype`` ("float32", "bfloat16", ...)
    casts the float parameters after loading; None keeps the stored dtype.

    What this setup makes identical to HF: the linear temperature schedule over the remaining
    steps, a categorical sample of the scheduled logits (temperature 1.0 adds no second
    division), entropy-bound acceptance (sorted cumsum - cummax <= bound), uniform renoising of
    every rejected position, the stable-and-confident stop, the argmax canvas appended and
    re-encoded, full canvases, and self-conditioning on the scheduled logits.

    Differences that remain:
      * RNG. mlx-vlm uses ``mx.random.categorical`` and ``mx.random.randint``; HF uses
        torch.multinomial and torch.randint. Same seed, different streams: compare the
        distributions of steps per canvas and tokens per forward, never the ids. On the last
        step (cur_step == 1) mlx-vlm takes the argmax and breaks before sampling
        (diffusion.py:998), so it makes fewer draws. The output is unaffected.
      * Output. mlx-vlm stops emitting at the first EOS (inclusive) and at max_new_tokens
        inside a canvas (diffusion.py:1127-1147). HF returns whole canvases with pad after EOS.
        ``_cut`` gives both runners the same view. mlx-vlm's own counters include the whole
        canvas.
      * EOS. mlx-vlm stops on any id in the stopping criteria plus ``generation_config
        ["eos_token_id"]`` (diffusion.py:577-579). HF checks ``isin(eos)`` on the whole
        canvas. The result is the same.
      * Tokens per forward. mlx-vlm reports none. Here it is computed as generated non-pad
        tokens / decoder forwards (HF's definition, batch 1).
      * Self-conditioning numerics. With an unquantized embedding, mlx-vlm takes the softmax
        of the scheduled logits in the embedding dtype and multiplies by E * sqrt(H)
        (language.py:392-408). HF rounds the logits to bf16 and takes the softmax in fp32
        inside the decoder. The two agree in fp32 and differ slightly in bf16. With a quantized
        embedding, mlx-vlm passes fp32 logits (language.py:430-441).
      * Batch size 1 only (diffusion.py:569).
    """
    try:
        import mlx.core as mx
        import mlx_vlm
        from mlx_vlm.utils import load_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"mlx-vlm is not installed ({exc}); pip install mlx-vlm 'mlx[cpu]' (Linux) or pip install mlx-vlm (macOS)"
        ) from None

    model_path = Path(model_path)
    eos = _eos_ids(model_path, s.eos_token_ids)
    t0 = time.perf_counter()
    model = load_model(model_path)
    if s.dtype is not None:
        model.set_dtype(getattr(mx, s.dtype))
        mx.eval(model.parameters())
    load_s = time.perf_counter() - t0

    # Sampler settings live only in the generation config (no kwargs), see the docstring.
    gen_cfg = dict(model.config.generation_config or {})
    gen_cfg.update(
        {
            "sampler_config": {
                "_cls_name": "EntropyBoundSamplerConfig",
                "entropy_bound": float(s.entropy_bound),
            },
            "t_min": float(s.t_min),
            "t_max": float(s.t_max),
            "stability_threshold": int(s.stability_threshold),
            "confidence_threshold": float(s.confidence_threshold),
            "eos_token_id": list(eos),
            "max_denoising_steps": int(s.max_denoising_steps),
            "max_new_tokens": int(s.max_new_tokens),
        }
    )
    for key in ("linear_temperature_schedule_config", "diffusion_stopping_config"):
        gen_cfg.pop(key, None)  # these would take precedence over t_min/t_max and the thresholds
    model.config.generation_config = gen_cfg

    def _generate(n_tokens, n_steps, gen_seed, ids=prompt_ids):
        input_ids = mx.array([list(int(t) for t in ids)], dtype=mx.int32)
        return mlx_vlm.stream_generate(
            model,
            _IdProcessor(eos),
            "",
            input_ids=input_ids,
            max_tokens=int(n_tokens),
            max_denoising_steps=int(n_steps),
            seed=int(gen_seed),
            **(
                {}  # mlx-vlm's defaults: temperature 0, confidence threshold, canvas shrink
                if diffusion_sampler == "confidence-threshold"
                else dict(
                    temperature=1.0,  # 0.0 (the default) replaces the multinomial draw by argmax
                    diffusion_sampler="entropy-bound",  # the default is "confidence-threshold"
                    diffusion_full_canvas=True,  # else short tails shrink the canvas (min 64)
                )
            ),
        )

    if s.warmup:  # same shapes, 2 canvases x 2 steps: first-call and compile costs leave the timing
        canvas = int(model.config.canvas_length)
        for _ in _generate(
            min(int(s.max_new_tokens), 2 * canvas),
            min(int(s.max_denoising_steps), 2),
            int(s.seed) + 1,
        ):
            pass
    mx.reset_peak_memory()
    t1 = time.perf_counter()
    new_ids, cumulative_steps, last = _mlx_vlm_ids(
        _generate(s.max_new_tokens, s.max_denoising_steps, s.seed)
    )
    total_s = time.perf_counter() - t1
    steps_per_canvas = [b - a for a, b in zip([0] + cumulative_steps[:-1], cumulative_steps)]
    prefill_s = (
        (last.prompt_tokens / last.prompt_tps) if last is not None and last.prompt_tps else None
    )
    generate_s = (total_s - prefill_s) if prefill_s is not None else None
    res = _common_result(
        "mlx-vlm",
        {"mlx_vlm": getattr(mlx_vlm, "__version__", None), "mlx": mx.__version__},
        new_ids,
        eos,
        s.max_new_tokens,
        steps_per_canvas,
        load_s,
        prefill_s,
        generate_s,
        total_s,
        mx.get_peak_memory() / 1e9,
    )
    if more_prompts:  # e.g. a test set, scored by the caller (seeds seed + 1, ...)
        more = [
            _mlx_vlm_ids(_generate(s.max_new_tokens, s.max_denoising_steps, s.seed + 1 + i, ids))
            for i, ids in enumerate(more_prompts)
        ]
        res["more_generated_ids"] = [_cut(ids, eos, s.max_new_tokens)[0] for ids, _, _ in more]
        # Mean denoising steps per canvas of each (the counts are cumulative).
        res["more_steps_per_canvas"] = [
            steps[-1] / len(steps) if steps else 0 for _, steps, _ in more
        ]
    if last is not None:
        res["peer_stats"] = {
            "diffusion_canvas_tokens": last.diffusion_canvas_tokens,
            "diffusion_denoising_steps": last.diffusion_denoising_steps,
            "diffusion_work_tokens": last.diffusion_work_tokens,
            "generation_tps": last.generation_tps,
            "prompt_tps": last.prompt_tps,
        }
    return res


def _mlx_vlm_ids(results):
    """(new ids, cumulative steps per canvas, last result) of an mlx-vlm stream."""
    new_ids: List[int] = []
    cumulative_steps: List[int] = []
    last = None
    for r in results:
        last = r
        if r.is_draft:
            continue
        if r.diffusion_block_complete:
            cumulative_steps.append(int(r.diffusion_denoising_steps))
            continue
        if r.finish_reason is None and r.token is not None:
            new_ids.append(int(r.token))
    if last is not None and last.finish_reason == "stop" and last.token is not None:
        new_ids.append(int(last.token))  # the EOS is not emitted as a token result
    return new_ids, cumulative_steps, last


# --------------------------------------------------------------------------- transformers
class _StepCounter:
    """Streamer: generate() calls put(prompt), then put_draft() once per denoising step, then put(canvas)."""

    def __init__(self):
        self.calls = 0
        self.steps_per_canvas: List[int] = []
        self._drafts = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first put is the prompt
            self.steps_per_canvas.append(self._drafts)
            self._drafts = 0

    def put_draft(self, value=None, **kwargs):
        self._drafts += 1

    def end(self):
        pass


def run_transformers(
    model_path,
    prompt_ids: Sequence[int],
    s: RunSettings,
) -> Dict[str, Any]:
    """Generate with transformers' ``DiffusionGemmaForBlockDiffusion.generate`` (torch, CPU).

    This is the reference algorithm, with every sampler parameter passed explicitly:
    ``generate(input_ids, max_new_tokens, max_denoising_steps,
    sampler_config=EntropyBoundSamplerConfig(entropy_bound), t_min, t_max,
    stability_threshold, confidence_threshold, eos_token_id, pad_token_id=0, streamer=...)``.
    The default DynamicCache is used. It returns ``DiffusionGemmaGenerationOutput(sequences,
    tokens_per_forward, cache)``. ``dtype`` None loads the stored dtype ("auto"); otherwise
    pass e.g. "float32".

    Steps per canvas are counted with a streamer's ``put_draft`` calls (one per denoising step,
    batch 1). ``prefill_s`` is the first ``model.model.encoder`` call, timed with forward hooks.
    ``generate_s`` is everything after it (denoising and re-encoding). Seeds use
    ``torch.manual_seed``.
    """
    try:
        import torch
        import transformers
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            EntropyBoundSamplerConfig,
        )
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"transformers with DiffusionGemma is not installed ({exc}); pip install 'transformers>=5.11,<6' torch"
        ) from None

    model_path = Path(model_path)
    eos = _eos_ids(model_path, s.eos_token_ids)
    t0 = time.perf_counter()
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(model_path), dtype=(getattr(torch, s.dtype) if s.dtype else "auto")
    ).eval()
    load_s = time.perf_counter() - t0

    enc_times: List[float] = []
    state = {"t": None}

    def _pre(_m, _a, _k=None):
        state["t"] = time.perf_counter()

    def _post(_m, _a, _k=None, _o=None):
        enc_times.append(time.perf_counter() - state["t"])

    h1 = model.model.encoder.register_forward_pre_hook(_pre)
    h2 = model.model.encoder.register_forward_hook(_post)
    input_ids = torch.tensor([list(int(t) for t in prompt_ids)], dtype=torch.long)

    def _generate(n_tokens, n_steps, streamer):
        return model.generate(
            input_ids,
            max_new_tokens=int(n_tokens),
            max_denoising_steps=int(n_steps),
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(s.entropy_bound)),
            t_min=float(s.t_min),
            t_max=float(s.t_max),
            stability_threshold=int(s.stability_threshold),
            confidence_threshold=float(s.confidence_threshold),
            eos_token_id=list(eos),
            pad_token_id=PAD_TOKEN_ID,
            streamer=streamer,
            return_dict_in_generate=True,
        )

    if s.warmup:  # torch's first generate() is ~10x slower than later ones (seen on the tiny model)
        torch.manual_seed(int(s.seed) + 1)
        canvas = int(model.config.canvas_length)
        _generate(min(int(s.max_new_tokens), 2 * canvas), min(int(s.max_denoising_steps), 2), None)
    enc_times.clear()
    counter = _StepCounter()
    torch.manual_seed(int(s.seed))
    try:
        t1 = time.perf_counter()
        out = _generate(s.max_new_tokens, s.max_denoising_steps, counter)
        total_s = time.perf_counter() - t1
    finally:
        h1.remove()
        h2.remove()
    raw_new = out.sequences[0, input_ids.shape[1] :].tolist()
    prefill_s = enc_times[0] if enc_times else None
    res = _common_result(
        "transformers",
        {"transformers": transformers.__version__, "torch": torch.__version__},
        raw_new,
        eos,
        s.max_new_tokens,
        counter.steps_per_canvas,
        load_s,
        prefill_s,
        (total_s - prefill_s) if prefill_s is not None else None,
        total_s,
        None,
    )
    tpf = out.tokens_per_forward
    res["hf_tokens_per_forward"] = float(tpf[0]) if tpf is not None else None
    res["raw_new_ids"] = raw_new
    res["expected_canvases"] = math.ceil(s.max_new_tokens / int(model.config.canvas_length))
    return res


# --------------------------------------------------------------------------- mlx_diffgemma (ours)
def run_mlx_diffgemma(
    model_path,
    prompt_ids: Sequence[int],
    s: RunSettings,
    *,
    fast_settings: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Generate with this project's token-level loop (`mlx_diffgemma.diffusion.steps.generate_step`).

    It runs transformers' algorithm exactly (the parity tests replay transformers' draws), so
    only the RNG stream differs from the other runners; `fast_settings` (e.g.
    {"mode": "fast"}) switches to fast mode, an approximation. Extra keys: per-canvas encode
    and denoise seconds and host syncs, as the loop measures them.
    """
    try:
        import mlx.core as mx

        import mlx_diffgemma
        from mlx_diffgemma import load_model
        from mlx_diffgemma.diffusion.steps import Block, generate_step, prefill
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"mlx_diffgemma is not installed ({exc}); pip install -e .") from None

    model_path = Path(model_path)
    eos = _eos_ids(model_path, s.eos_token_ids)
    t0 = time.perf_counter()
    model = load_model(model_path)
    if s.dtype is not None:
        model.set_dtype(getattr(mx, s.dtype))
        mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    config = model.generation_config.replace(
        entropy_bound=float(s.entropy_bound),
        t_min=float(s.t_min),
        t_max=float(s.t_max),
        stability_threshold=int(s.stability_threshold),
        confidence_threshold=float(s.confidence_threshold),
        eos_token_id=tuple(eos),
        **(fast_settings or {}),
    )
    prompt = mx.array([list(int(t) for t in prompt_ids)], dtype=mx.int32)

    def _generate(n_tokens, n_steps, gen_seed):
        cache = model.make_cache()
        tic = time.perf_counter()
        prefill(model, prompt, cache)
        prefill_s = time.perf_counter() - tic
        cfg = config.replace(max_new_tokens=int(n_tokens), max_denoising_steps=int(n_steps))
        blocks = [
            ev
            for ev in generate_step(
                prompt[:, :0], model, config=cfg, cache=cache, key=mx.random.key(gen_seed)
            )
            if isinstance(ev, Block)
        ]
        return prefill_s, blocks

    if s.warmup:  # same shapes, 2 canvases x 2 steps: compile and first-call costs leave the timing
        canvas = model.args.canvas_length
        _generate(
            min(int(s.max_new_tokens), 2 * canvas),
            min(int(s.max_denoising_steps), 2),
            int(s.seed) + 1,
        )
    mx.reset_peak_memory()
    t1 = time.perf_counter()
    prefill_s, blocks = _generate(s.max_new_tokens, s.max_denoising_steps, s.seed)
    total_s = time.perf_counter() - t1
    new_ids = [t for b in blocks for t in b.tokens[0].tolist()]
    res = _common_result(
        "mlx_diffgemma",
        {"mlx_diffgemma": getattr(mlx_diffgemma, "__version__", None), "mlx": mx.__version__},
        new_ids,
        eos,
        s.max_new_tokens,
        [b.steps for b in blocks],
        load_s,
        prefill_s,
        total_s - prefill_s,
        total_s,
        mx.get_peak_memory() / 1e9,
    )
    steps = sum(b.steps for b in blocks)
    res["encode_s_per_canvas"] = [b.encode_seconds for b in blocks]
    res["denoise_s_per_canvas"] = [b.denoise_seconds for b in blocks]
    res["ms_per_step"] = 1000 * sum(b.denoise_seconds for b in blocks) / steps
    res["host_syncs_per_step"] = blocks[-1].step_syncs / steps
    res["host_syncs_per_encode"] = blocks[-1].encode_syncs / max(1, len(blocks) - 1)
    res["forwards"] = int(blocks[-1].decoder_forwards[0].item())
    res["positions_forwarded"] = int(blocks[-1].positions_forwarded[0].item())
    res["forward_shapes"] = blocks[-1].forward_shapes
    return res


# --------------------------------------------------------------------------- subprocess entry
RUNNERS = {
    "mlx_diffgemma": run_mlx_diffgemma,
    "mlx_vlm": run_mlx_vlm,
    "mlx-vlm": run_mlx_vlm,
    "transformers": run_transformers,
}


def openblas_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A copy of ``base`` (default os.environ) that preloads OpenBLAS for MLX's float32 matmuls.

    Needs ``apt-get install -y libopenblas0-pthread``. It does the same as
    shared/tools/cpu_openblas_env.sh, and returns ``base`` unchanged if the library is missing.
    """
    env = dict(os.environ if base is None else base)
    if not os.path.exists(OPENBLAS_LIB):
        return env
    pre = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = OPENBLAS_LIB + (":" + pre if pre else "")
    try:
        with open("/proc/cpuinfo") as f:
            if " avx512f" in f.read():
                env.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
    except OSError:
        pass
    env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def run_peer_subprocess(
    peer: str,
    python: str,
    model_path,
    prompt_ids: Sequence[int],
    settings: RunSettings,
    *,
    openblas: bool = False,
    env: Optional[Dict[str, str]] = None,
    timeout: Optional[float] = None,
    **kwargs,
) -> Dict[str, Any]:
    """Run ``run_<peer>`` under another interpreter (e.g. a separate venv for mlx-vlm).

    ``kwargs`` are the runner's own keyword arguments (mlx-vlm's ``diffusion_sampler``,
    ``more_prompts``; this project's ``fast_settings``).
    The child's stderr passes through, and a non-zero exit raises RuntimeError.
    """
    if peer not in RUNNERS:
        raise ValueError(f"unknown peer {peer!r}; one of {sorted(RUNNERS)}")
    request = {
        "peer": peer,
        "model_path": str(model_path),
        "prompt_ids": [int(t) for t in prompt_ids],
        "settings": asdict(settings),
        **kwargs,
    }
    child_env = openblas_env(env) if openblas else dict(os.environ if env is None else env)
    proc = subprocess.run(
        [python, os.path.abspath(__file__)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
    )
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{peer} runner failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    result["subprocess_env"] = {
        k: child_env.get(k) for k in ("LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")
    }
    return result


def _main(argv: List[str]) -> int:
    """``python peers.py [request.json]``: run one request given as JSON (file or stdin)."""
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(_main.__doc__)
        return 0
    text = Path(argv[1]).read_text() if len(argv) > 1 and argv[1] != "-" else sys.stdin.read()
    request = json.loads(text)
    runner = RUNNERS[request.pop("peer")]
    model_path = request.pop("model_path")
    prompt_ids = request.pop("prompt_ids")
    settings = RunSettings(**request.pop("settings"))
    result = runner(model_path, prompt_ids, settings, **request)
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
