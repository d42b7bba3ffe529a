"""The training forward: the model's own modules, no inference caches.

`encoder_pass` runs the causal encoder over whole padded sequences from position 0 and
returns every layer's K/V plus the final (softcapped) logits for the next-token loss.
`decoder_pass` runs one canvas per example at its own positions over those K/V, with
per-example masks that show it exactly what the sampler's cache would hold: every
encoded token before the canvas in full-attention layers and the last W-1 of them in
sliding layers. Gradients flow from the decoder into the encoder's K/V.
"""

from typing import List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask

from ..model import embed_scaled

KV = Tuple[mx.array, mx.array]


def softcap(model, logits: mx.array) -> mx.array:
    cap = model.args.final_logit_softcapping
    return mx.tanh(logits.astype(mx.float32) / cap) * cap


def _attend(attn, h, offset, mask, past: Optional[KV]):
    """Attention of h (B, L, D) at positions offset + i; keys: [past] + own."""
    B, L, _ = h.shape
    q = attn.q_proj(h).reshape(B, L, attn.n_heads, attn.head_dim)
    q = attn.rope(attn.q_norm(q).transpose(0, 2, 1, 3), offset=offset)
    k, v = attn.kv(h, offset)
    keys, values = k, v
    if past is not None:
        keys = mx.concatenate([past[0], k], axis=2)
        values = mx.concatenate([past[1], v], axis=2)
    o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1)), (k, v)


def _layer(layer, x, scalar, offset, mask, past):
    h, kv = _attend(layer.self_attn, layer.input_layernorm(x), offset, mask, past)
    r = x + layer.post_attention_layernorm(h)
    return layer.feed_forward(r) * scalar, kv


def _run(layer, grad_checkpoint, x, scalar, offset, mask, past):
    if not grad_checkpoint:
        return _layer(layer, x, scalar, offset, mask, past)

    # Recompute the layer in the backward pass instead of keeping its activations. Arrays
    # that need gradients (parameters, x, the layer scalar, the encoder's K/V) are inputs.
    def inner(params, x, scalar, past):
        layer.update(params)
        return _layer(layer, x, scalar, offset, mask, past)

    return mx.checkpoint(inner)(layer.trainable_parameters(), x, scalar, past)


def encoder_pass(model, tokens: mx.array, grad_checkpoint: bool = False):
    """Causal pass over `tokens` (B, T) at positions 0..T-1.

    Returns:
        (per-layer (keys, values) of shape (B, Hkv, T, Dh), logits (B, T, V) softcapped).
    """
    text = model.model.decoder
    scalars = model.model.encoder.language_model.layers
    x = embed_scaled(text.embed_tokens, tokens, model.embed_scale)
    T = tokens.shape[1]
    kvs = []
    for layer, s in zip(text.layers, scalars):
        attn = layer.self_attn
        window = attn.window if attn.is_sliding and T > attn.window else None
        mask = create_causal_mask(T, 0, window_size=window) if window else "causal"
        x, kv = _run(layer, grad_checkpoint, x, s.layer_scalar, 0, mask, None)
        kvs.append(kv)
    logits = text.embed_tokens.as_linear(text.norm(x))
    return kvs, softcap(model, logits)


def context_masks(model, start: mx.array, T: int, C: int):
    """Boolean masks (B, 1, C, T + C) of what a canvas at `start` (B,) attends to.

    Encoded positions p < start, and p >= start - (W - 1) in sliding layers (the decoder
    sees the last W-1 cached tokens); the canvas itself is fully visible.
    """
    pos = mx.arange(T)[None]
    s = start[:, None]
    full = pos < s
    sliding = full & (pos >= s - (model.args.sliding_window - 1))
    canvas = mx.ones((start.shape[0], C), dtype=mx.bool_)
    out = {}
    for name, m in (("full", full), ("sliding", sliding)):
        out[name] = mx.broadcast_to(
            mx.concatenate([m, canvas], axis=1)[:, None, None, :], (start.shape[0], 1, C, T + C)
        )
    return out


def decoder_pass(
    model,
    canvas: mx.array,
    start: mx.array,
    kvs: List[KV],
    soft: Optional[mx.array] = None,
    grad_checkpoint: bool = False,
) -> mx.array:
    """Bidirectional pass of `canvas` (B, C) at positions start + j (start: (B,) int).

    Args:
        kvs: the encoder's per-layer K/V over the whole padded sequence.
        soft: (B, C, H) self-conditioning embeddings, or None for none (exactly zero).

    Returns:
        Softcapped logits (B, C, V) in float32.
    """
    text = model.model.decoder
    x = embed_scaled(text.embed_tokens, canvas, model.embed_scale)
    x = text.self_conditioning(x, soft)
    masks = context_masks(model, start, kvs[0][0].shape[2], canvas.shape[1])
    for layer, past in zip(text.layers, kvs):
        mask = masks["sliding" if layer.self_attn.is_sliding else "full"]
        x, _ = _run(layer, grad_checkpoint, x, layer.layer_scalar, start, mask, past)
    return softcap(model, text.embed_tokens.as_linear(text.norm(x)))
