"""The CPU row split: a step's work over several CPU streams, bit for bit the same.

MLX runs a CPU stream's element-wise ops on one thread. After the matmuls, the pass over
the vocabulary (tanh, exp) and, for a batch, the experts' GELU and attention's exp are
most of a CPU step; rows are independent, so parts of the canvas (or of the batch) run on
streams of their own in parallel. On a GPU there are no lanes and both functions are a
plain call. The extra streams are thread-local, like the generation stream, so any
thread may generate.
"""

import os
from typing import List, Optional

import mlx.core as mx

from ..cache import CacheRows

_lane_streams = []


def cpu_lanes(stream) -> Optional[List]:
    """The streams to split a step over: `stream` and up to 3 more, on the CPU only."""
    if stream.device != mx.cpu:
        return None
    n = min(os.cpu_count() or 1, 4)
    while len(_lane_streams) < n - 1:
        _lane_streams.append(mx.new_thread_local_stream(mx.cpu))
    return [stream] + _lane_streams[: n - 1] if n > 1 else None


def _cuts(n: int, lanes) -> List[slice]:
    bounds = [n * i // len(lanes) for i in range(len(lanes) + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def split_stats(fn, logits, temp, cap, allowed, lanes):
    """`fn(logits, temp, cap, allowed)` (a stats function), canvas positions split over
    `lanes`."""
    C = logits.shape[1]
    if lanes is None or C < len(lanes):
        return fn(logits, temp, cap, allowed)
    parts = []
    for stream, cols in zip(lanes, _cuts(C, lanes)):
        with mx.stream(stream):
            part = None if allowed is None else allowed[:, cols]
            parts.append(fn(logits[:, cols], temp, cap, part))
    return [mx.concatenate(p, axis=1) for p in zip(*parts)]


def split_denoise(model, canvas, cache, lanes, **conditioning) -> mx.array:
    """`model.denoise` (logits before the softcap); a batch of at least two rows per
    lane is split over `lanes` by rows."""
    B = canvas.shape[0]
    if lanes is None or B < 2 * len(lanes):
        return model.denoise(canvas, cache, apply_softcap=False, **conditioning)
    parts = []
    for stream, rows in zip(lanes, _cuts(B, lanes)):
        with mx.stream(stream):
            part = {k: v[rows] for k, v in conditioning.items()}
            views = [CacheRows(c, rows) for c in cache]
            parts.append(model.denoise(canvas[rows], views, apply_softcap=False, **part))
    return mx.concatenate(parts)
