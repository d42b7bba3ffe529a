"""What each canvas starts as and may hold: the one canvas mechanism of the token loop.

A `CanvasLayout` describes the output positions (from the first output token on): fixed
ids, seeded ids and per-position token classes. The loop asks it once per canvas for a
`CanvasPlan`, the arrays one canvas needs. Every check of a layout lives here.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import mlx.core as mx


def check_token_ids(ids: Union[Sequence[int], mx.array], vocab_size: int, what: str) -> None:
    """Raise ValueError naming the first id of `ids` outside [0, vocab_size).

    An id out of range would index past the embedding table (which MLX does not check).
    """
    if isinstance(ids, mx.array):
        if ids.size == 0:
            return
        flat = ids.reshape(-1)
        lo, hi = mx.min(flat).item(), mx.max(flat).item()
        if 0 <= lo and hi < vocab_size:
            return
        ids = flat.tolist()
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(
                f"{what} {t} at position {i} is not in the vocabulary: ids run from 0 to "
                f"{vocab_size - 1} (vocab_size {vocab_size})."
            )


class CanvasPlan(NamedTuple):
    """The arrays one canvas needs; (1, C[, V]), shared by every row of the batch.

    Attributes:
        fixed: bool, positions whose id is clamped (decided: never resampled or renoised).
        seeded: bool, positions that start from their id instead of noise.
        ids: int32, the fixed and seed ids (ignored at other positions).
        allowed: bool (1, C, V), the tokens each position may sample; None for no limit.
    """

    fixed: mx.array
    seeded: mx.array
    ids: mx.array
    allowed: Optional[mx.array]

    @classmethod
    def free(cls, C: int) -> "CanvasPlan":
        """A canvas with no fixed, seeded or limited position."""
        none = mx.zeros((1, C), dtype=mx.bool_)
        return cls(none, none, mx.zeros((1, C), dtype=mx.int32), None)

    def start(self, noise: mx.array) -> mx.array:
        """The canvas's first input: fixed and seed ids, `noise` (B, C) elsewhere."""
        return mx.where(self.fixed | self.seeded, self.ids.astype(noise.dtype), noise)


@dataclass(frozen=True)
class CanvasLayout:
    """What the output positions hold before denoising, from the first output token on.

    Fixed positions are clamped: they start as their id, are never renoised or
    resampled, are always accepted, use none of the entropy bound, and appear as is in
    the output. Seeded positions start as their id instead of random noise and then
    denoise like any other (a warm start: after the first step the seed survives only
    where it is accepted). A position with a token class samples only from that row of
    `token_masks`. Positions past the end of the layout are free.

    Attributes:
        ids: per position, the fixed or seed token id (ignored at free positions).
        fixed: per position, True where the id is clamped.
        seeded: per position, True where the canvas starts from the id; () for none.
        token_class: per position, a row of `token_masks`, or -1 for no limit; () for none.
        token_masks: (K, V) bool, the allowed tokens of each class; None without classes.

    Raises:
        ValueError: lengths differ, a position is both fixed and seeded, a class has no
            mask row, or a mask row allows no token.
    """

    ids: Tuple[int, ...]
    fixed: Tuple[bool, ...]
    seeded: Tuple[bool, ...] = ()
    token_class: Tuple[int, ...] = ()
    token_masks: Optional[mx.array] = None

    def __post_init__(self):
        n = len(self.ids)
        for name in ("fixed", "seeded", "token_class"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if value and len(value) != n:
                raise ValueError(f"CanvasLayout.{name} has {len(value)} entries; ids has {n}.")
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        if any(f and s for f, s in zip(self.fixed, self.seeded)):
            raise ValueError("A CanvasLayout position cannot be both fixed and seeded.")
        if self._limited(0, n):
            self._check_masks()

    def _check_masks(self):
        if self.token_masks is None or self.token_masks.ndim != 2:
            raise ValueError("token_class needs token_masks, a (K, V) bool array.")
        if max(self.token_class) >= self.token_masks.shape[0]:
            raise ValueError(
                f"token_class {max(self.token_class)} is out of range for "
                f"{self.token_masks.shape[0]} token_masks rows."
            )
        empty = (~mx.any(self.token_masks, axis=1)).tolist()
        if any(empty):
            raise ValueError(f"token_masks row {empty.index(True)} allows no token.")

    def __len__(self) -> int:
        return len(self.ids)

    def check(self, vocab_size: int, max_tokens: int) -> None:
        """Raise ValueError unless this layout fits a model and a token budget.

        Args:
            vocab_size: the model's vocabulary size: fixed and seed ids and the mask
                width must fit it.
            max_tokens: output tokens of the call: the layout may not be longer.
        """
        if len(self) > max_tokens:
            raise ValueError(
                f"The layout has {len(self)} positions but max_tokens is {max_tokens}; "
                "raise max_tokens or leave it unset."
            )
        flags = zip(self.ids, self._flags(self.fixed), self._flags(self.seeded))
        given = [i if f or s else 0 for i, f, s in flags]  # free positions' ids are unused
        check_token_ids(given, vocab_size, "Layout token id")
        if self._limited(0, len(self)) and self.token_masks.shape[1] != vocab_size:
            raise ValueError(
                f"token_masks has {self.token_masks.shape[1]} columns; the model's "
                f"vocab_size is {vocab_size}."
            )

    def _flags(self, flags: Tuple[bool, ...]) -> Tuple[bool, ...]:
        return flags or (False,) * len(self)

    def _limited(self, a: int, b: int) -> bool:
        return any(c >= 0 for c in self.token_class[a:b])

    def _row(self, values, block: int, C: int, fill) -> mx.array:
        part = list(values[block * C : (block + 1) * C])
        return mx.array([part + [fill] * (C - len(part))])

    def plan(self, block: int, C: int) -> CanvasPlan:
        """The `CanvasPlan` of canvas `block` (of length C); positions past the end are free."""
        fixed = self._row(self._flags(self.fixed), block, C, False).astype(mx.bool_)
        seeded = self._row(self._flags(self.seeded), block, C, False).astype(mx.bool_)
        ids = self._row(self.ids, block, C, 0).astype(mx.int32)
        return CanvasPlan(fixed, seeded, ids, self._allowed(block, C))

    def _allowed(self, block: int, C: int) -> Optional[mx.array]:
        if not self._limited(block * C, (block + 1) * C):
            return None
        K, V = self.token_masks.shape
        # An all-allowed row for the positions with no limit; (1, C, V), gathered once
        # per canvas rather than at every step.
        masks = mx.concatenate([self.token_masks.astype(mx.bool_), mx.ones((1, V), mx.bool_)])
        classes = [c if c >= 0 else K for c in self.token_class]
        return mx.take(masks, self._row(classes, block, C, K), axis=0)
