"""Sampler settings and their precedence, written down once.

Precedence: explicit argument > the checkpoint's generation_config.json > transformers'
defaults (`DiffusionGemmaGenerationConfig._get_default_generation_params`).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

MODES = ("exact", "fast")
COMMIT_RULES = ("entropy_bound", "confidence")
# Fast mode's settings and their values in each mode: exact mode's are transformers'
# sampler; a setting left None takes its mode's value.
FAST_SETTINGS = {
    "top_k": (0, 64),
    "self_conditioning_top_k": (0, 64),
    "commit_rule": ("entropy_bound", "entropy_bound"),
    "commit_threshold": (0.9, 0.9),
    "monotone_commit": (False, False),
    "commit_argmax": (False, False),
    "commit_stable": (False, False),
    "canvas_shrink": (0, 64),
    "eos_tail_cut": (False, False),
    "compact": (False, False),
    "repair": (0, 0),
    "reopen": (False, False),
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Settings of the entropy-bound sampler (names as in transformers), and fast mode's.

    Args:
        max_new_tokens: tokens to generate; whole canvases are computed, so the model
            runs ceil(max_new_tokens / canvas_length) canvases at most.
        max_denoising_steps: denoising steps per canvas at most (N).
        entropy_bound: accept the lowest-entropy tokens whose summed entropy minus the
            largest is at most this (nats); larger accepts more tokens per step.
        t_min: temperature at the last step (never reached: the last step uses
            t_min + (t_max - t_min) / N).
        t_max: temperature at the first step of a canvas.
        stability_threshold: stop a canvas early once its argmax was unchanged for this
            many steps (and it is confident); 0 skips the stability test.
        confidence_threshold: ... and once the mean token entropy is below this.
        eos_token_id: ids that end generation; None means no EOS stop.
        pad_token_id: id written after EOS.
        mode: "exact" (default): transformers' sampler, every fast-mode setting off
            (setting one raises); "fast": the fast-mode settings below, each None taking
            its fast value (`FAST_SETTINGS`). Fast mode is an approximation: its output
            differs from transformers' for the same seed.
        top_k: fast mode: sample, entropy, acceptance and the stop test see only each
            position's k most likely tokens, renormalised (changes the sampler's
            semantics: the other tokens' probability mass is dropped; the argmax and, when
            that mass is 0, everything else are unchanged); 0: the whole vocabulary.
            Fast value 64.
        self_conditioning_top_k: fast mode: the next step is conditioned on the k most
            likely tokens' embedding rows weighted by their renormalised probabilities,
            instead of the probabilities times the whole embedding (changes semantics in
            the same way); 0: the whole product. Fast value 64.
        commit_rule: fast mode: "entropy_bound" (transformers') or "confidence" (accept
            positions whose max probability is >= commit_threshold, at least one per
            step: mlx-vlm's default; changes semantics). Fast value "entropy_bound".
        commit_threshold: the "confidence" rule's threshold, in (0, 1]. Default 0.9.
        monotone_commit: fast mode: an accepted position is fixed for the rest of the
            canvas (changes semantics: transformers' sampler may revise it). Saves steps
            but costs accuracy on models that revise tokens (benchmarks/README.md), so
            fast value False.
        commit_argmax: fast mode, with monotone_commit: commit each accepted position's
            argmax instead of its sample (a temperature-0 commit, as mlx-vlm's default;
            changes semantics: transformers' output is the last step's argmax, which a
            committed sample need not be). Fast value False.
        commit_stable: fast mode, with monotone_commit: commit only accepted positions
            whose argmax equals the previous step's (so nothing is committed at a canvas'
            first step, and the self-conditioned step can revise a token once; changes
            semantics like monotone_commit, less). Fast value False.
        canvas_shrink: fast mode: with no layout, a canvas that would run past
            max_new_tokens has max(canvas_shrink, tokens left) positions instead of the
            model's canvas_length (mlx-vlm's default; changes semantics: the model sees a
            shorter canvas); 0: off. Fast value 64.
        eos_tail_cut: fast mode, with monotone_commit: once a row commits an EOS, the
            positions after it are fixed at pad_token_id (changes semantics: the model
            sees pad instead of noise there, and the canvas stops once the tokens before
            the EOS are decided). Fast value False (see benchmarks/README.md).
        compact: fast mode, with monotone_commit, top_k and self_conditioning_top_k:
            active-set compaction: after a canvas' first step the decoder runs only on
            the undecided positions and those decided at the last step (padded with
            decided ones to a power of two from 16, so few shapes compile); the others
            are seen through their K/V from the last step they were forwarded (changes
            semantics: that K/V is stale). Fast value False.
        repair: fast mode: after a canvas stops, this many more forwards of the whole
            canvas on its draft (fresh K/V, the last step's conditioning); each one's
            argmax is the new draft (mlx-vlm turbo's repair pass; changes semantics:
            transformers' output is the last step's argmax). 0: off. Fast value 0.
        reopen: fast mode, with monotone_commit and repair: a repair pass reopens the
            committed positions whose argmax it changes, and the canvas goes on
            denoising from that forward (within max_denoising_steps); the canvas ends
            when a pass changes nothing (changes semantics like monotone_commit, less).
            Fast value False.
    """

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: Optional[Tuple[int, ...]] = None
    pad_token_id: int = 0
    mode: str = "exact"
    top_k: Optional[int] = None
    self_conditioning_top_k: Optional[int] = None
    commit_rule: Optional[str] = None
    commit_threshold: Optional[float] = None
    monotone_commit: Optional[bool] = None
    commit_argmax: Optional[bool] = None
    commit_stable: Optional[bool] = None
    canvas_shrink: Optional[int] = None
    eos_tail_cut: Optional[bool] = None
    compact: Optional[bool] = None
    repair: Optional[int] = None
    reopen: Optional[bool] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r}).")
        fast = self.mode == "fast"
        for name, values in FAST_SETTINGS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, values[fast])
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id))
        self.validate()

    def validate(self):
        def fail(name, rule):
            raise ValueError(f"{name} must be {rule} (got {getattr(self, name)!r}).")

        for name in ("max_new_tokens", "max_denoising_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, "a positive integer")
        s = self.stability_threshold
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            fail("stability_threshold", "an integer >= 0")
        for name in ("entropy_bound", "confidence_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                fail(name, "a number > 0")
        for name in ("t_min", "t_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                fail(name, "a number >= 0")
        self._validate_fast()
        if not self.t_max > self.t_min:
            raise ValueError(
                f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})."
            )

    def _validate_fast(self):
        def fail(name, rule):
            raise ValueError(f"{name} must be {rule} (got {getattr(self, name)!r}).")

        ints = [n for n, v in FAST_SETTINGS.items() if type(v[0]) is int]
        for name in ints:  # top_k, self_conditioning_top_k, canvas_shrink, repair
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(name, "an integer >= 0 (0: off)")
        if self.commit_rule not in COMMIT_RULES:
            fail("commit_rule", "one of " + ", ".join(COMMIT_RULES))
        v = self.commit_threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            fail("commit_threshold", "a number in (0, 1]")
        for name in [n for n, v in FAST_SETTINGS.items() if isinstance(v[0], bool)]:
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.mode == "exact":
            for name, values in FAST_SETTINGS.items():
                if getattr(self, name) != values[0]:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is a fast-mode approximation; "
                        "pass mode='fast' (CLI: --mode fast) with it."
                    )
        for name, why in (
            ("eos_tail_cut", "it cuts after a committed EOS"),
            ("commit_argmax", "it chooses what is committed"),
            ("commit_stable", "it chooses what is committed"),
            ("compact", "it forwards the positions not committed"),
            ("reopen", "it reopens committed positions"),
        ):
            if getattr(self, name) and not self.monotone_commit:
                raise ValueError(f"{name}=True needs monotone_commit=True ({why}).")
        if self.reopen and not self.repair:
            raise ValueError("reopen=True needs repair >= 1 (the passes that may reopen).")
        if self.compact and not (self.top_k and self.self_conditioning_top_k):
            raise ValueError(
                "compact=True needs top_k > 0 and self_conditioning_top_k > 0 "
                f"(got {self.top_k} and {self.self_conditioning_top_k})."
            )

    @classmethod
    def from_generation_config(cls, gen: Dict[str, Any]) -> "DiffusionConfig":
        """Settings from a generation_config.json dict; missing keys keep transformers' defaults.

        Exact mode always: fast-mode settings there (e.g. a `top_k`) are ignored.
        """
        # Fast mode is the caller's choice only (transformers' own `top_k` is another thing).
        names = [f.name for f in dataclasses.fields(cls) if f.name not in FAST_SETTINGS]
        kw = {n: gen[n] for n in names if n != "mode" and gen.get(n) is not None}
        sampler = gen.get("sampler_config") or {}
        if sampler.get("entropy_bound") is not None:
            kw["entropy_bound"] = sampler["entropy_bound"]
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "DiffusionConfig":
        """Read generation_config.json (EOS falls back to config.json's eos_token_id)."""
        path = Path(path)
        gen = read_json(path / "generation_config.json")
        if gen.get("eos_token_id") is None:
            config = read_json(path / "config.json")
            eos = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
            if eos is not None:
                gen = {**gen, "eos_token_id": eos}
        return cls.from_generation_config(gen)

    def replace(self, **overrides) -> "DiffusionConfig":
        """A copy with the given settings; None means "keep the current value".

        A new `mode` resets the fast-mode settings not given to that mode's values.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "mode" in overrides:
            reset = {k: None for k in FAST_SETTINGS if k not in overrides}
            overrides = {**reset, **overrides}
        return dataclasses.replace(self, **overrides)


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object file ({} if it does not exist); ValueError naming the file if broken."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "fix it or download it again."
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; download it again.") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; download it again."
        )
    return data
