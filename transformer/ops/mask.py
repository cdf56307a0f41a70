"""`AttentionMask`: what may attend to what. The only mask code in the library.

A mask is a static rule (hashable, so it is a jit-static argument) applied to explicit token
positions and segment ids, never to array indices; so zigzag-reordered, packed, shifted (decode) and
sharded sequences are all masked exactly. With dq = q position - kv position, a query may see a key when

    causal            dq >= 0, or the key is in the prefix (kv position < prefix_length)
    sliding_window w  |dq| < w
    segment ids       the query's and the key's segment ids are equal

and ALiBi adds -slope_h * |dq| to head h's scores. The kernels (reference, blockwise, ring) ask the mask,
through `allowed` for a tile of pairs, `may_attend` for whether a whole block can be skipped, `all_visible`
for whether it needs no mask, and `alibi_bias_BHQK` for the bias; `ops.attention.cudnn_problem` reads its
fields to decide whether cuDNN's index-based masks can express it.

`allowed` and `may_attend` use only operators and `.min` / `.max`, so they take NumPy or jax arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """causal: keys at later positions are hidden. sliding_window: keys |dq| >= w positions away are
    hidden (0: no window). prefix_length: with causal, keys at positions < prefix_length are exempt from the
    causal rule (prefix-LM: bidirectional over the prefix, causal after it; positions restart per packed
    segment, so each document gets its own prefix). alibi_slopes: one ALiBi slope per query head, or None."""

    causal: bool = True
    sliding_window: int = 0
    prefix_length: int = 0
    alibi_slopes: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.causal, (bool, np.bool_)):
            raise ValueError(f"AttentionMask.causal={self.causal!r} must be True or False")
        for name in ("sliding_window", "prefix_length"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"AttentionMask.{name}={value!r} must be an integer >= 0 (0: off)")
        if self.prefix_length and not self.causal:
            raise ValueError(f"AttentionMask.prefix_length={self.prefix_length} needs causal=True "
                             "(a bidirectional mask already sees the whole prefix)")
        if self.alibi_slopes is not None:
            slopes = tuple(float(s) for s in np.asarray(self.alibi_slopes, np.float64).reshape(-1))
            object.__setattr__(self, "alibi_slopes", slopes)
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "sliding_window", int(self.sliding_window))
        object.__setattr__(self, "prefix_length", int(self.prefix_length))

    def hides_pairs(self, has_segments: bool = False) -> bool:
        """Whether some (query, key) pair can be hidden: by the causal rule, the window, or segment ids."""
        return self.causal or bool(self.sliding_window) or has_segments

    def replace(self, **changes: Any) -> "AttentionMask":
        return dataclasses.replace(self, **changes)

    def check_heads(self, num_heads: int) -> None:
        """ValueError unless there is one ALiBi slope per query head (or no ALiBi)."""
        if self.alibi_slopes is not None and len(self.alibi_slopes) != num_heads:
            raise ValueError(f"AttentionMask has {len(self.alibi_slopes)} ALiBi slopes but the queries have "
                             f"H={num_heads} heads; give one slope per query head")

    def allowed(self, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ=None, kv_segment_ids_BK=None):
        """bool BQK: whether query q may see key k (broadcast over any leading dims)."""
        q_BQ1, k_B1K = q_positions_BQ[..., :, None], kv_positions_BK[..., None, :]
        distance_BQK = q_BQ1 - k_B1K
        ok_BQK = (distance_BQK >= 0) if self.causal else (distance_BQK == distance_BQK)
        if self.prefix_length:
            ok_BQK = ok_BQK | (k_B1K < self.prefix_length)
        if self.sliding_window:
            ok_BQK = ok_BQK & (abs(distance_BQK) < self.sliding_window)
        if q_segment_ids_BQ is not None:
            ok_BQK = ok_BQK & (q_segment_ids_BQ[..., :, None] == kv_segment_ids_BK[..., None, :])
        return ok_BQK

    def may_attend(self, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ=None, kv_segment_ids_BK=None):
        """Scalar bool, False only when `allowed` is False for every pair: a block of queries and a block of
        keys are judged by the ranges of their positions and segment ids, so a kernel can skip the block."""
        return self._range_test(q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK, every=False)

    def all_visible(self, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ=None, kv_segment_ids_BK=None):
        """Scalar bool, True only when `allowed` is True for every pair (judged by ranges, like `may_attend`):
        such a block needs no mask at all."""
        return self._range_test(q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK, every=True)

    def _range_test(self, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK, *, every: bool):
        """Each rule as an inequality on the blocks' (low, high) bounds, which some pair passes when the
        nearest bounds do; with the bounds swapped (high for low) the same inequalities hold only when every
        pair passes."""
        def bounds(x_BL):
            low_B, high_B = x_BL.min(axis=-1), x_BL.max(axis=-1)
            return (high_B, low_B) if every else (low_B, high_B)

        (q_lo, q_hi), (k_lo, k_hi) = bounds(q_positions_BQ), bounds(kv_positions_BK)
        ok_B = q_lo == q_lo
        if self.causal:
            visible_B = k_lo <= q_hi
            if self.prefix_length:
                visible_B = visible_B | (k_lo < self.prefix_length)
            ok_B = ok_B & visible_B
        if self.sliding_window:
            ok_B = ok_B & (k_lo - q_hi < self.sliding_window) & (q_lo - k_hi < self.sliding_window)
        if q_segment_ids_BQ is not None:
            (qs_lo, qs_hi), (ks_lo, ks_hi) = bounds(q_segment_ids_BQ), bounds(kv_segment_ids_BK)
            ok_B = ok_B & (ks_lo <= qs_hi) & (qs_lo <= ks_hi)
        return ok_B.all() if every else ok_B.any()

    def alibi_bias_BHQK(self, q_positions_BQ, kv_positions_BK):
        """float32 -slope_h * |dq|, or None without ALiBi."""
        if self.alibi_slopes is None:
            return None
        dist_BQK = jnp.abs(q_positions_BQ[:, :, None] - kv_positions_BK[:, None, :]).astype(jnp.float32)
        slopes_H = jnp.asarray(self.alibi_slopes, jnp.float32)
        return -slopes_H[None, :, None, None] * dist_BQK[:, None]


CAUSAL = AttentionMask(causal=True)
BIDIRECTIONAL = AttentionMask(causal=False)
