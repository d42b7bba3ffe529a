"""DiffusionGemma's fine-tuning objective (Google's SFT recipe, with gemma #773 fixed).

Per example, one canvas k of the answer (answer + EOS, then pad, cut into canvases of C):

- corruption: the uniform-state process with alpha(t) = 1 - t: each canvas position keeps
  its clean token with probability 1 - t, else takes a uniformly random token; one
  t ~ U(eps, 1) per example;
- decoder loss: plain cross-entropy over all C positions of the canvas (EOS and pad
  included), no time weighting; the canvas sits at positions P + k C and sees the
  prompt plus the clean canvases 0..k-1 exactly as the sampler's cache holds them;
- encoder loss: next-token cross-entropy of the causal encoder over prompt + answer +
  EOS, times `encoder_loss_weight`; the decoder's gradient reaches the encoder's K/V;
- self-conditioning: with probability p per example, a first decoder pass (no gradient)
  gives logits whose softmax conditions the second pass; otherwise the signal is
  exactly zero (no self-conditioning input). The loss is on the second pass.

All randomness is in `Draws`, made by `sample_draws` from an explicit key (or given by
a test).
"""

from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .forward import decoder_pass, encoder_pass


class Batch(NamedTuple):
    """Padded examples (see `data.make_batch`).

    tokens: (B, T) prompt + answer + EOS, pad to whole canvases, then pad to T.
    prompt_len: (B,) P; seq_len: (B,) P + answer + 1 (the EOS); n_canvases: (B,).
    """

    tokens: mx.array
    prompt_len: mx.array
    seq_len: mx.array
    n_canvases: mx.array


class Draws(NamedTuple):
    """The objective's random choices for one batch.

    canvas: (B,) index k of the trained canvas; t: (B,) noise level; keep_u: (B, C) uniform
    in [0, 1), a position stays clean when keep_u >= t; noise: (B, C) random token ids;
    self_cond: (B,) bool, run the self-conditioning pass for this example.
    """

    canvas: mx.array
    t: mx.array
    keep_u: mx.array
    noise: mx.array
    self_cond: mx.array


@dataclass(frozen=True)
class Objective:
    """Settings of the objective (names as the lora command's flags)."""

    self_conditioning_prob: float = 0.5
    encoder_loss_weight: float = 1.0
    t_eps: float = 1e-4
    grad_checkpoint: bool = False

    def __post_init__(self):
        if not 0.0 <= self.self_conditioning_prob <= 1.0:
            raise ValueError(
                f"self_conditioning_prob must be in [0, 1] (got {self.self_conditioning_prob})."
            )
        if self.encoder_loss_weight < 0:
            raise ValueError(f"encoder_loss_weight must be >= 0 (got {self.encoder_loss_weight}).")
        if not 0.0 <= self.t_eps < 1.0:
            raise ValueError(f"t_eps must be in [0, 1) (got {self.t_eps}).")


def sample_draws(key: mx.array, n_canvases: mx.array, C: int, V: int, obj: Objective) -> Draws:
    """Draws for a batch whose examples have `n_canvases` (B,) canvases each."""
    B = n_canvases.shape[0]
    k1, k2, k3, k4, k5 = mx.random.split(key, 5)
    canvas = mx.floor(mx.random.uniform(shape=(B,), key=k1) * n_canvases).astype(mx.int32)
    canvas = mx.minimum(canvas, n_canvases - 1)
    t = mx.random.uniform(low=obj.t_eps, high=1.0, shape=(B,), key=k2)
    keep_u = mx.random.uniform(shape=(B, C), key=k3)
    noise = mx.random.randint(0, V, (B, C), key=k4).astype(mx.int32)
    self_cond = mx.random.uniform(shape=(B,), key=k5) < obj.self_conditioning_prob
    return Draws(canvas, t, keep_u, noise, self_cond)


def canvas_start(batch: Batch, canvas: mx.array, C: int) -> mx.array:
    """Position of canvas k's first token: P + k C (where the sampler puts it)."""
    return batch.prompt_len + canvas * C


def corrupt(clean: mx.array, draws: Draws) -> mx.array:
    """x_t: clean where keep_u >= t (probability 1 - t), else the random token."""
    keep = draws.keep_u >= draws.t[:, None]
    return mx.where(keep, clean, draws.noise)


def encoder_targets(batch: Batch):
    """(targets (B, T-1), mask (B, T-1)): next tokens over prompt + answer + EOS."""
    targets = batch.tokens[:, 1:]
    pos = mx.arange(1, batch.tokens.shape[1])[None]
    return targets, pos < batch.seq_len[:, None]


def loss_terms(model, batch: Batch, draws: Draws, obj: Objective):
    """(decoder CE mean, encoder CE mean, decoder positions): the objective's two terms."""
    C = model.args.canvas_length
    kvs, enc_logits = encoder_pass(model, batch.tokens, obj.grad_checkpoint)
    start = canvas_start(batch, draws.canvas, C)
    idx = start[:, None] + mx.arange(C)[None]
    clean = mx.take_along_axis(batch.tokens, idx, axis=1)
    noisy = corrupt(clean, draws)
    soft = None
    if obj.self_conditioning_prob > 0:
        first = decoder_pass(model, noisy, start, kvs, None, obj.grad_checkpoint)
        probs = mx.softmax(mx.stop_gradient(first), axis=-1, precise=True)
        soft = model.self_conditioning_embeddings(probs)
        # Examples without self-conditioning get exactly zero signal (#773), which the
        # self-conditioning MLP (no biases) maps to exactly zero.
        soft = soft * draws.self_cond[:, None, None].astype(soft.dtype)
    logits = decoder_pass(model, noisy, start, kvs, soft, obj.grad_checkpoint)
    dec = nn.losses.cross_entropy(logits, clean).mean()
    return dec, encoder_loss(enc_logits, batch), clean.size


def encoder_loss(enc_logits: mx.array, batch: Batch) -> mx.array:
    """The encoder's mean next-token cross-entropy over prompt + answer + EOS."""
    targets, mask = encoder_targets(batch)
    ce = nn.losses.cross_entropy(enc_logits[:, :-1], targets) * mask
    return ce.sum() / mx.maximum(mask.sum(), 1)


def diffusion_loss(model, batch: Batch, draws: Draws, obj: Objective):
    """(loss, tokens): decoder CE + encoder_loss_weight * encoder CE, and the number of
    trained canvas positions (mlx-lm's trainer weights and reports by it)."""
    dec, enc, n = loss_terms(model, batch, draws, obj)
    loss = dec + obj.encoder_loss_weight * enc if obj.encoder_loss_weight else dec
    return loss, mx.array(n)
