"""The encoder's K/V cache: mlx-lm's KVCache for full-attention layers plus a window cache for sliding layers."""

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache


class SlidingWindowCache(_BaseCache):
    """K/V of the last `max_size` encoded tokens of a sliding-attention layer.

    DiffusionGemma's decoder sees exactly the last `sliding_window - 1` cached tokens in
    its sliding layers (transformers' `DynamicSlidingWindowLayer`), and a causal encoder
    chunk needs no more than that from the past, so that is all this cache keeps.
    """

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.keys = None
        self.values = None
        self.offset = 0  # tokens encoded so far = position of the next token

    def update_and_fetch(self, keys, values):
        """Append a chunk; return the past window plus the chunk for the encoder's attention."""
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys = keys[..., -self.max_size :, :]
        self.values = values[..., -self.max_size :, :]
        return keys, values

    def size(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def empty(self):
        return self.keys is None

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.max_size, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.max_size, self.offset = map(int, v)

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def cached_kv(cache):
    """The cached K/V a decoder layer attends to, or None for an empty cache."""
    if cache.empty():
        return None
    if isinstance(cache, KVCache):
        return cache.keys_and_values()
    return cache.keys, cache.values


class CacheRows:
    """Rows `rows` of a filled cache, read-only: what a decoder pass of those batch rows
    attends to (the loop splits a large batch's denoising over CPU threads)."""

    def __init__(self, cache, rows: slice):
        past = cached_kv(cache)
        self.offset = cache.offset
        self.keys, self.values = (None, None) if past is None else (past[0][rows], past[1][rows])

    def empty(self):
        return self.keys is None
