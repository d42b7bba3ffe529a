"""Sampler settings and their precedence, written down once.

Precedence: explicit argument > the checkpoint's generation_config.json > transformers'
defaults (`DiffusionGemmaGenerationConfig._get_default_generation_params`).

`DiffusionConfig` holds transformers' sampler; fast mode's approximations are one nested
`FastSettings` (None in exact mode). `FastSettings`' fields are the one table of fast
mode: their metadata gives each setting's kind, help and the settings it needs, and the
flat names of the CLI (`--top-k`), the server and `generate(top_k=...)` come from it.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

MODES = ("exact", "fast")
COMMIT_RULES = ("entropy_bound", "confidence")


def _setting(default, kind: str, help: str, on: str = "", needs=()):
    """A fast-mode setting: `kind` is "count" (int >= 0, 0: off), "bool", "rule" (one of
    COMMIT_RULES) or "probability" (in (0, 1]); `on` says how the setting reads when it
    is on (in a rule's message); `needs`: (settings that must be on, why) pairs."""
    on = on or ("{name} > 0" if kind == "count" else "{name}=True")
    meta = {"kind": kind, "help": help, "on": on, "needs": needs}
    return field(default=default, metadata=meta)


_MONOTONE = ("monotone_commit",)


@dataclass(frozen=True)
class FastSettings:
    """Fast mode's settings: each is an approximation of transformers' sampler (its output
    differs for the same seed); the defaults are fast mode's (benchmarks/README.md).

    Raises:
        ValueError: a value of the wrong kind, or a setting on without one it needs.
    """

    top_k: int = _setting(
        64,
        "count",
        "sample, entropy, acceptance and the stop test see only each position's k most "
        "likely tokens, renormalised (the other tokens' mass is dropped); 0: all.",
    )
    self_conditioning_top_k: int = _setting(
        64,
        "count",
        "the next step is conditioned on the k most likely tokens' embedding rows, "
        "weighted by their renormalised probabilities; 0: the whole product.",
    )
    commit_rule: str = _setting(
        "entropy_bound",
        "rule",
        "accept by entropy bound (transformers'), or positions whose max probability is "
        ">= commit_threshold, at least one per step (confidence: mlx-vlm's default).",
    )
    commit_threshold: float = _setting(0.9, "probability", "the confidence rule's threshold.")
    monotone_commit: bool = _setting(
        False, "bool", "an accepted token stays fixed for the rest of the canvas."
    )
    commit_argmax: bool = _setting(
        False,
        "bool",
        "commit each accepted position's argmax, not its sample.",
        needs=((_MONOTONE, "it chooses what is committed"),),
    )
    commit_stable: bool = _setting(
        False,
        "bool",
        "commit only accepted tokens whose argmax did not change since the previous step.",
        needs=((_MONOTONE, "it chooses what is committed"),),
    )
    canvas_shrink: int = _setting(
        64,
        "count",
        "with no layout, a last canvas past max_tokens has max(N, tokens left) positions; 0: off.",
    )
    compact: bool = _setting(
        False,
        "bool",
        "forward only the undecided positions; decided ones keep their last K/V "
        "(stale); widths are powers of two from 16.",
        needs=(
            (_MONOTONE, "it forwards the positions not committed"),
            (("top_k", "self_conditioning_top_k"), ""),
        ),
    )
    repair: int = _setting(
        0,
        "count",
        "this many more forwards of the whole canvas after it stops; each one's argmax "
        "is the new draft (mlx-vlm turbo's repair pass); 0: off.",
        on="repair >= 1",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_kind(f.name, getattr(self, f.name), f.metadata["kind"])
        for f in dataclasses.fields(self):
            if getattr(self, f.name):
                for names, why in f.metadata["needs"]:
                    self._require(f.name, names, why)

    def _require(self, name: str, names: Tuple[str, ...], why: str):
        if all(getattr(self, n) for n in names):
            return
        meta = {f.name: f.metadata for f in dataclasses.fields(self)}
        needed = " and ".join(meta[n]["on"].format(name=n) for n in names)
        why = why or "got " + " and ".join(str(getattr(self, n)) for n in names)
        raise ValueError(f"{meta[name]['on'].format(name=name)} needs {needed} ({why}).")


FAST_SETTINGS = tuple(f.name for f in dataclasses.fields(FastSettings))


def _check_kind(name: str, v, kind: str):
    rules = {
        "count": ("an integer >= 0 (0: off)", lambda: isinstance(v, int) and v >= 0),
        "bool": ("True or False", lambda: True),
        "rule": ("one of " + ", ".join(COMMIT_RULES), lambda: v in COMMIT_RULES),
        "probability": ("a number in (0, 1]", lambda: isinstance(v, (int, float)) and 0 < v <= 1),
    }
    rule, ok = rules[kind]
    if (isinstance(v, bool) != (kind == "bool")) or not ok():
        raise ValueError(f"{name} must be {rule} (got {v!r}).")


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
        fast: fast mode's settings (an approximation: its output differs from
            transformers' for the same seed); None: exact mode, transformers' sampler.

    `replace` takes the flat names of the edges (`mode="fast"`, `top_k=8`, ...).
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
    fast: Optional[FastSettings] = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id))
        if self.fast is not None and not isinstance(self.fast, FastSettings):
            raise ValueError(f"fast must be a FastSettings or None (got {self.fast!r}).")
        self.validate()

    @property
    def mode(self) -> str:
        return "exact" if self.fast is None else "fast"

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
        if not self.t_max > self.t_min:
            raise ValueError(
                f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})."
            )

    @classmethod
    def from_generation_config(cls, gen: Dict[str, Any]) -> "DiffusionConfig":
        """Settings from a generation_config.json dict; missing keys keep transformers' defaults.

        Exact mode always: fast-mode settings there (e.g. a `top_k`) are ignored.
        """
        # Fast mode is the caller's choice only (transformers' own `top_k` is another thing).
        names = [f.name for f in dataclasses.fields(cls) if f.name != "fast"]
        kw = {n: gen[n] for n in names if gen.get(n) is not None}
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

    def replace(self, mode: Optional[str] = None, **settings) -> "DiffusionConfig":
        """A copy with the given settings, by their flat names; None keeps a value.

        `mode="fast"` starts from fast mode's defaults (`FastSettings()`), `mode="exact"`
        drops fast mode; fast-mode names (`top_k=8`) change the fast settings and need
        fast mode (this config's or the `mode` given).
        """
        settings = {k: v for k, v in settings.items() if v is not None}
        known = {f.name for f in dataclasses.fields(self)} - {"fast"}
        unknown = sorted(set(settings) - known - set(FAST_SETTINGS))
        if unknown:
            raise ValueError(
                f"Unknown sampler setting {unknown[0]!r}; the settings are "
                f"{', '.join(sorted(known | set(FAST_SETTINGS)))}."
            )
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
        fast = {k: settings.pop(k) for k in FAST_SETTINGS if k in settings}
        base = self.fast if mode is None else (FastSettings() if mode == "fast" else None)
        if base is None:  # exact mode: a setting given as off is what exact mode does
            fast = {k: v for k, v in fast.items() if v not in (False, "entropy_bound")}
        if fast and base is None:
            name, value = next(iter(fast.items()))
            raise ValueError(
                f"{name}={value!r} is a fast-mode approximation; "
                "pass mode='fast' (CLI: --mode fast) with it."
            )
        if fast:
            base = dataclasses.replace(base, **fast)
        return dataclasses.replace(self, fast=base, **settings)


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
