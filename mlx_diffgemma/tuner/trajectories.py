"""Teacher trajectories for few-step distillation: the exact sampler's own runs, on disk.

For each prompt the teacher (frozen) generates with the exact sampler (`generate_step`,
batched by prompt length, one key per batch), and each canvas keeps every denoising
step's input: the uniform random start, then each step's accepted samples plus fresh
noise. The student is trained on those inputs toward the teacher's final canvases
(`certainty.py`). A run is cached in one .npz named by a hash of everything it depends
on (the teacher's weights, the prompts, the sampler settings, the seed), so a second
distillation reuses it.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..diffusion import sampler as S
from ..diffusion.steps import Block, DenoiseStep, generate_step


class Trajectory(NamedTuple):
    """One prompt's teacher run.

    prompt: the rendered prompt ids; tokens: the teacher's canvases up to the one with
    its first EOS (pad after it), flattened; states: (canvases, steps, C) each step's
    input (rows past a canvas's `steps` repeat its last input); steps: (canvases,) the
    denoising steps the teacher ran on each canvas.
    """

    prompt: List[int]
    tokens: List[int]
    states: np.ndarray
    steps: np.ndarray


class _Recording(S.RandomDraws):
    """RandomDraws that keep each canvas's random start (the first step's input)."""

    def initial_canvas(self, shape) -> mx.array:
        self.start = super().initial_canvas(shape)
        return self.start


def _run(teacher, prompts: Sequence[List[int]], config, key) -> List[Trajectory]:
    """Trajectories of equal-length `prompts`, in one batch."""
    draws = _Recording(key, teacher.args.vocab_size)
    prompt = mx.array(prompts, dtype=mx.int32)
    states, blocks, canvas = [], [], []
    for ev in generate_step(prompt, teacher, config=config, draws=draws, drafts=True):
        if isinstance(ev, DenoiseStep):
            if not canvas:
                canvas.append(np.array(draws.start))
            canvas.append(np.array(ev.canvas))
        elif isinstance(ev, Block):
            states.append(np.stack(canvas[:-1], axis=1))  # (B, steps, C): each step's input
            blocks.append(ev)
            canvas = []
    return _split(prompts, states, blocks, config.pad_token_id)


def _split(prompts, states, blocks: List[Block], pad: int) -> List[Trajectory]:
    forwards = np.stack([np.array(b.decoder_forwards) for b in blocks])  # (K, B) cumulative
    steps = np.diff(forwards, axis=0, prepend=0)
    out = []
    for r, prompt in enumerate(prompts):
        ends = [k for k, b in enumerate(blocks) if b.eos_index[r] >= 0]
        K = ends[0] + 1 if ends else len(blocks)
        tokens = [t for b in blocks[:K] for t in np.array(b.tokens[r]).tolist()]
        out.append(
            Trajectory(list(prompt), tokens, np.stack([s[r] for s in states[:K]]), steps[:K, r])
        )
    return out


def teacher_trajectories(
    teacher,
    prompts: Sequence[List[int]],
    config,
    seed: int,
    batch_size: int = 64,
    report=print,
) -> List[Trajectory]:
    """The teacher's exact-sampler runs on `prompts`, batched by prompt length; batch i
    draws from `mx.random.key(seed + i)`. Returns them in the order of `prompts`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, i = [], 0
    while i < len(order):
        n = len(prompts[order[i]])
        same = [j for j in order[i : i + batch_size] if len(prompts[j]) == n]
        batches.append(same)
        i += len(same)
    out: Dict[int, Trajectory] = {}
    for b, rows in enumerate(batches):
        runs = _run(teacher, [prompts[j] for j in rows], config, mx.random.key(seed + b))
        out.update(zip(rows, runs))
        report(f"Teacher trajectories: {len(out)}/{len(prompts)} prompts.", flush=True)
    return [out[j] for j in range(len(prompts))]


def cache_key(teacher_id: Dict, prompts: Sequence[List[int]], config, seed: int) -> str:
    """A hash of everything a set of trajectories depends on."""
    h = hashlib.sha256()
    settings = {k: v for k, v in vars(config).items() if k != "fast"}
    h.update(json.dumps([teacher_id, settings, seed], sort_keys=True, default=str).encode())
    for p in prompts:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


def save(path: Path, runs: Sequence[Trajectory]) -> None:
    """Write `runs` to `path` (.npz), atomically (a stopped run leaves no broken file)."""
    C = runs[0].states.shape[-1]
    S_max = max(r.states.shape[1] for r in runs)
    K_max = max(r.states.shape[0] for r in runs)
    states = np.zeros((len(runs), K_max, S_max, C), dtype=np.int32)
    steps = np.zeros((len(runs), K_max), dtype=np.int32)
    for i, r in enumerate(runs):
        k, s = r.states.shape[:2]
        states[i, :k, :s] = r.states
        states[i, :k, s:] = r.states[:, -1:]
        steps[i, :k] = r.steps
    arrays = dict(
        prompts=_flat([r.prompt for r in runs]),
        prompt_len=np.array([len(r.prompt) for r in runs]),
        tokens=_flat([r.tokens for r in runs]),
        token_len=np.array([len(r.tokens) for r in runs]),
        states=states,
        steps=steps,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load(path: Path, C: int) -> Optional[List[Trajectory]]:
    """The trajectories in `path`, or None where there is no file."""
    if not path.exists():
        return None
    with np.load(path) as f:
        prompts = _unflat(f["prompts"], f["prompt_len"])
        tokens = _unflat(f["tokens"], f["token_len"])
        states, steps = f["states"], f["steps"]
    runs = []
    for i, (p, t) in enumerate(zip(prompts, tokens)):
        K = math.ceil(len(t) / C)
        runs.append(Trajectory(p, t, states[i, :K], steps[i, :K]))
    return runs


def _flat(rows) -> np.ndarray:
    return np.array([t for r in rows for t in r], dtype=np.int32)


def _unflat(flat: np.ndarray, lengths: np.ndarray) -> List[List[int]]:
    ends = np.cumsum(lengths)
    return [flat[e - n : e].tolist() for e, n in zip(ends, lengths)]


def summary(runs: Sequence[Trajectory]) -> str:
    steps = np.concatenate([r.steps for r in runs])
    return f"{len(runs)} prompts, {len(steps)} canvases, {steps.mean():.2f} steps per canvas"
