"""Few-step distillation's objective: certainty-forcing self-distillation (dParallel,
arXiv 2509.26488), on DiffusionGemma's uniform-state sampler.

Per example, one canvas k and one denoising step s of the teacher's own run
(`trajectories.py`, s < --max-steps):

- input: the canvas exactly as the exact sampler fed it at step s (accepted samples
  and fresh noise; the uniform random start at s = 0), at positions P + k C, seeing the
  prompt and the teacher's canvases 0..k-1 (as the sampler's cache holds them);
- self-conditioning as the sampler feeds it: none at s = 0; otherwise the probabilities
  of a first pass (no gradient) on step s-1's input, at step s-1's temperature;
- decoder loss: cross-entropy to the teacher's final canvas (its answer), all C
  positions;
- certainty forcing: the mean entropy, at step s's sampling temperature, of the
  positions whose argmax already is the teacher's token, times `certainty_weight`. The
  entropy bound accepts the lowest-entropy positions while their summed entropy stays
  under 0.1 nats, so sharpening what the student already gets right is what lets a step
  accept more of the canvas (dParallel's argument for masked diffusion holds for the
  uniform-state sampler's acceptance rule too);
- encoder loss: next-token cross-entropy over prompt + the teacher's answer, times
  `encoder_loss_weight`, as in the fine-tuning objective.
"""

from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..diffusion import sampler as S
from .data import Example, make_batch
from .forward import decoder_pass, encoder_pass
from .losses import Batch, canvas_start, encoder_loss
from .trajectories import Trajectory


@dataclass(frozen=True)
class Certainty:
    """Settings of the distillation objective (names as the distill command's flags)."""

    max_steps: int = 2
    certainty_weight: float = 1.0
    encoder_loss_weight: float = 1.0
    grad_checkpoint: bool = False

    def __post_init__(self):
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise ValueError(f"max_steps must be an integer >= 1 (got {self.max_steps!r}).")
        if self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1 (got {self.max_steps}).")
        if not self.certainty_weight >= 0:
            raise ValueError(f"certainty_weight must be >= 0 (got {self.certainty_weight}).")
        if not self.encoder_loss_weight >= 0:
            raise ValueError(f"encoder_loss_weight must be >= 0 (got {self.encoder_loss_weight}).")


class StepDraws(NamedTuple):
    """The teacher step each example trains on; (B, ...) arrays.

    canvas: k; x: (B, C) step s's input; prev: (B, C) step s-1's input (anything at
    s = 0); has_prev: s > 0; temp, prev_temp: the sampling temperatures of steps s, s-1.
    """

    canvas: mx.array
    x: mx.array
    prev: mx.array
    has_prev: mx.array
    temp: mx.array
    prev_temp: mx.array


def example_of(run: Trajectory, eos_ids: Sequence[int]) -> Example:
    """The teacher's answer as a training example (its canvases exactly: the answer up to
    its first EOS, then pad), so the encoder loss stops at the EOS as in fine-tuning."""
    ends = [i for i, t in enumerate(run.tokens) if t in eos_ids]
    if not ends:  # no EOS within max_new_tokens: every canvas is answer
        return Example(run.prompt, run.tokens[:-1], run.tokens[-1])
    return Example(run.prompt, run.tokens[: ends[0]], run.tokens[ends[0]])


def draw_steps(runs: Sequence[Trajectory], rng, obj: Certainty, config) -> StepDraws:
    """A (canvas, step) of each run: uniform over its canvases, then over the steps the
    teacher ran there, up to `max_steps`."""
    N, rows = config.max_denoising_steps, []
    for run in runs:
        k = int(rng.integers(len(run.steps)))
        s = int(rng.integers(min(int(run.steps[k]), obj.max_steps)))
        rows.append((k, s, run.states[k, s], run.states[k, max(s - 1, 0)]))
    k, s, x, prev = zip(*rows)
    s = np.array(s)
    left = mx.array(N - s, dtype=mx.float32)  # steps left at step s (N at the first)
    return StepDraws(
        canvas=mx.array(k, dtype=mx.int32),
        x=mx.array(np.stack(x)),
        prev=mx.array(np.stack(prev)),
        has_prev=mx.array(s > 0),
        temp=S.temperature(left, N, config.t_min, config.t_max),
        prev_temp=S.temperature(left + 1, N, config.t_min, config.t_max),
    )


def student_logits(model, batch: Batch, draws: StepDraws, grad_checkpoint: bool = False):
    """(decoder logits (B, C, V), the teacher's canvas (B, C), encoder logits): the
    student at the drawn steps, self-conditioned as the sampler conditions it."""
    C = model.args.canvas_length
    kvs, enc_logits = encoder_pass(model, batch.tokens, grad_checkpoint)
    start = canvas_start(batch, draws.canvas, C)
    target = mx.take_along_axis(batch.tokens, start[:, None] + mx.arange(C)[None], axis=1)
    first = decoder_pass(model, draws.prev, start, kvs, None, grad_checkpoint)
    probs = mx.softmax(mx.stop_gradient(first) / draws.prev_temp[:, None, None], axis=-1)
    soft = model.self_conditioning_embeddings(probs)
    # No conditioning at a canvas's first step: exactly zero, as the sampler's None.
    soft = soft * draws.has_prev[:, None, None].astype(soft.dtype)
    logits = decoder_pass(model, draws.x, start, kvs, soft, grad_checkpoint)
    return logits, target, enc_logits


def certainty_terms(model, batch: Batch, draws: StepDraws, obj: Certainty):
    """(decoder CE, certainty term, encoder CE, decoder positions)."""
    logits, target, enc_logits = student_logits(model, batch, draws, obj.grad_checkpoint)
    ce = nn.losses.cross_entropy(logits, target).mean()
    scaled = logits / draws.temp[:, None, None]
    logp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum(axis=-1)
    right = mx.stop_gradient(mx.argmax(logits, axis=-1) == target).astype(entropy.dtype)
    certainty = (entropy * right).sum() / mx.maximum(right.sum(), 1)
    return ce, certainty, encoder_loss(enc_logits, batch), target.size


def certainty_loss(model, batch: Batch, draws: StepDraws, obj: Certainty):
    """(loss, tokens) for mlx-lm's trainer: CE + certainty_weight * certainty +
    encoder_loss_weight * encoder CE."""
    ce, certainty, enc, n = certainty_terms(model, batch, draws, obj)
    loss = ce + obj.certainty_weight * certainty + obj.encoder_loss_weight * enc
    return loss, mx.array(n)


class StepBatches:
    """`iterate_batches` for mlx-lm's trainer over teacher trajectories: the batch and
    its `StepDraws`, flat. A non-looping pass (validation) restarts from the same seed."""

    def __init__(self, model, config, obj: Certainty, seed: int = 0):
        self.C, self.config, self.obj, self.seed = model.args.canvas_length, config, obj, seed

    def __call__(
        self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None
    ) -> Iterator[tuple]:
        if len(dataset) < batch_size:
            raise ValueError(
                f"{len(dataset)} prompts are fewer than --batch-size {batch_size}; "
                "add prompts or lower it."
            )
        rng = np.random.default_rng(self.seed + (0 if loop else 1))
        while True:
            order = rng.permutation(len(dataset)) if loop else np.arange(len(dataset))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                runs: List[Trajectory] = [dataset[j] for j in order[i : i + batch_size]]
                examples = [example_of(r, self.config.eos_token_id or ()) for r in runs]
                batch = make_batch(examples, self.C, self.config.pad_token_id)
                yield (*batch, *draw_steps(runs, rng, self.obj, self.config))
            if not loop:
                break


def make_certainty_loss(obj: Certainty):
    def loss(model, *arrays):
        n = len(Batch._fields)
        return certainty_loss(model, Batch(*arrays[:n]), StepDraws(*arrays[n:]), obj)

    return loss
