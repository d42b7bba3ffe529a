"""Fast-mode sampler math on the k most likely tokens of each position, on arrays only.

`top_k_ids` is exact (the same ids as a full sort, up to ties); what is an
approximation is using only those k tokens afterwards: `top_k_stats` renormalises over
them (fast mode's `top_k`), and `top_k_weights` + `Model.gathered_self_conditioning`
replace the [C, V] @ [V, H] self-conditioning product with k embedding rows (fast
mode's `self_conditioning_top_k`). Both equal the full-vocabulary results when the
dropped probability mass is zero, and differ by at most about that mass otherwise.
"""

from typing import Optional, Tuple

import mlx.core as mx

# Vocabulary block of the two-stage top-k: one max per block, then k blocks searched.
BLOCK = 64


def top_k_ids(x: mx.array, k: int, block: int = BLOCK) -> mx.array:
    """The ids of the k largest entries of each row of `x` (..., V), in ascending id order.

    Exact, in two cheap stages instead of a partition of the whole vocabulary: the max
    of each block of `block` ids, then the k blocks with the largest maxima, whose
    k * block entries hold the k largest (fewer than k entries exceed any of the top k,
    so fewer than k blocks can have a larger max than a block that holds one).
    """
    *lead, V = x.shape
    k = min(k, V)
    nb = -(-V // block)
    if nb <= k:  # a small vocabulary: one partition
        ids = mx.argpartition(-x, k - 1, axis=-1)[..., :k]
        return mx.sort(ids, axis=-1)
    if nb * block != V:
        pad = [(0, 0)] * len(lead) + [(0, nb * block - V)]
        x = mx.pad(x, pad, constant_values=-mx.inf)
    blocks = x.reshape(*lead, nb, block)
    top = mx.argpartition(-blocks.max(axis=-1), k - 1, axis=-1)[..., :k]
    cand = mx.take_along_axis(blocks, top[..., None], axis=-2).reshape(*lead, k * block)
    cand_ids = (top[..., None] * block + mx.arange(block)).reshape(*lead, k * block)
    best = mx.argpartition(-cand, k - 1, axis=-1)[..., :k]
    return mx.sort(mx.take_along_axis(cand_ids, best, axis=-1), axis=-1)


def top_k_stats(
    logits: mx.array,
    temp: mx.array,
    softcap: Optional[float] = None,
    allowed: Optional[mx.array] = None,
    *,
    k: int,
) -> Tuple[mx.array, mx.array, mx.array, mx.array]:
    """`sampler.step_stats` over each position's k most likely tokens only.

    The tanh cap and the temperature are monotone, so the k ids are found on the raw
    logits and only k values per position are capped, scaled and exponentiated. The
    probabilities are renormalised over the k tokens: this drops the other tokens'
    mass (the approximation); the argmax is the full vocabulary's exactly.

    Returns:
        (probs (B, C, k), entropy (B, C), argmax id (B, C), ids (B, C, k) ascending).
    """
    if allowed is not None:
        logits = mx.where(allowed, logits, -mx.inf)
    ids = top_k_ids(logits, k)
    x = mx.take_along_axis(logits, ids, axis=-1)
    if softcap is not None:
        x = mx.tanh(x / softcap) * softcap
    x = x / temp
    m = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - m)
    total = e.sum(axis=-1, keepdims=True)
    probs = e / total
    # Where fewer than k tokens are allowed the others are -inf: 0 * -inf is nan.
    logprobs = mx.where(probs > 0, x - (m + mx.log(total)), 0.0)
    entropy = -(probs * logprobs).sum(axis=-1)
    argmax = mx.take_along_axis(ids, mx.argmax(x, axis=-1)[..., None], axis=-1)[..., 0]
    return probs, entropy, argmax, ids


def top_k_weights(probs: mx.array, k: int, ids: Optional[mx.array] = None):
    """The k largest of `probs` (..., n), renormalised, and their ids: (weights, ids).

    `ids` (..., n) maps the columns of `probs` to token ids (None: the column is the id).
    """
    if probs.shape[-1] > k:
        cols = top_k_ids(probs, k)
        ids = cols if ids is None else mx.take_along_axis(ids, cols, axis=-1)
        probs = mx.take_along_axis(probs, cols, axis=-1)
    elif ids is None:
        ids = mx.broadcast_to(mx.arange(probs.shape[-1]), probs.shape)
    return probs / probs.sum(axis=-1, keepdims=True), ids
