"""`AttentionMask`: what may attend to what. The only mask code in the library.

A mask is a static rule (hashable, so it is a jit-static argument) applied to explicit token
positions and segment ids, never to array indices; so zigzag-reordered, packed, shifted (decode) and
sharded sequences are all masked exactly. With dq = q position - kv position, a query may see a key when

    causal            dq >= 0, or the key is in the prefix (kv position < prefix_length)
    sliding_window w  |dq| < w
    segment ids       the query's and the key's segment ids are equal

ALiBi adds -slope_h * |dq| to head h's scores, and T5's relative-position bias (`RelativeBuckets`) adds
table[bucket(-dq), h], the table being a learned (buckets, H) array the kernels get beside the mask. The
kernels (reference, blockwise, ring, decode) ask the mask, through `allowed` for a tile of pairs,
`may_attend` for whether a whole block can be skipped, `all_visible` for whether it needs no mask, and
`bias_BHQK` for the biases; `ops.attention.cudnn_problem` reads its fields to decide whether cuDNN's
index-based masks can express it.

`allowed`, `may_attend` and `RelativeBuckets.bucket` use only operators and `.min` / `.max`, so they take
NumPy or jax arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _bucket_thresholds(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """t_1..t_{n-1}: a distance d >= 0 falls in bucket #{i : d >= t_i} of n = num_buckets (one sign's). HF's
    formula evaluated in float64 at every integer distance up to max_distance, where it reaches the last bucket."""
    max_exact = num_buckets // 2
    distance = np.arange(max_exact, max_distance + 1, dtype=np.float64)
    log_ratio = np.log(distance / max_exact) / np.log(max_distance / max_exact)
    large = np.minimum(max_exact + np.floor(log_ratio * (num_buckets - max_exact)), num_buckets - 1).astype(np.int64)
    first = [int(distance[np.argmax(large >= i)]) for i in range(max_exact, num_buckets)]
    return tuple(range(1, max_exact)) + tuple(first)


@dataclasses.dataclass(frozen=True)
class RelativeBuckets:
    """T5's relative-position buckets (Raffel et al. 2020; HF `T5Attention._relative_position_bucket`).

    The offset r = key position - query position goes to one of `num_buckets` buckets. bidirectional (an
    encoder): half of them for r <= 0, half for r > 0; otherwise (a causal decoder) all for r <= 0 and every
    later key shares bucket 0. Of one sign's n buckets, the first n/2 hold |r| = 0 .. n/2 - 1 exactly, the rest
    grow logarithmically up to max_distance, beyond which all offsets share the last bucket."""

    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True

    def __post_init__(self):
        for name in ("num_buckets", "max_distance"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"RelativeBuckets.{name}={value!r} must be an integer")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "bidirectional", bool(self.bidirectional))
        least = 4 if self.bidirectional else 2
        if self.num_buckets < least:
            raise ValueError(f"RelativeBuckets.num_buckets={self.num_buckets} must be >= {least} "
                             f"({'bidirectional: ' if self.bidirectional else ''}at least one exact bucket)")
        if self.max_distance <= self.max_exact:
            raise ValueError(f"RelativeBuckets.max_distance={self.max_distance} must be > {self.max_exact}, the "
                             f"distances {self.num_buckets} buckets hold exactly")

    @property
    def per_sign(self) -> int:
        return self.num_buckets // 2 if self.bidirectional else self.num_buckets

    @property
    def max_exact(self) -> int:
        return self.per_sign // 2

    def bucket(self, relative_position):
        """The bucket of each offset r = key position - query position (integers, any shape)."""
        later = relative_position > 0
        if self.bidirectional:
            offset, distance = later * self.per_sign, abs(relative_position)
        else:
            offset, distance = 0, abs(relative_position) * ~later
        bucket = 0 * distance + offset
        for threshold in _bucket_thresholds(self.per_sign, self.max_distance):
            bucket = bucket + (distance >= threshold)
        return bucket


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """causal: keys at later positions are hidden. sliding_window: keys |dq| >= w positions away are
    hidden (0: no window). prefix_length: with causal, keys at positions < prefix_length are exempt from the
    causal rule (prefix-LM: bidirectional over the prefix, causal after it; positions restart per packed
    segment, so each document gets its own prefix). alibi_slopes: one ALiBi slope per query head, or None.
    relative_buckets: T5's relative-position buckets, or None; the kernels then take the learned bias table
    relative_bias_OH (one row per bucket, one column per query head)."""

    causal: bool = True
    sliding_window: int = 0
    prefix_length: int = 0
    alibi_slopes: tuple[float, ...] | None = None
    relative_buckets: RelativeBuckets | None = None

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
        if self.relative_buckets is not None and not isinstance(self.relative_buckets, RelativeBuckets):
            raise ValueError(f"AttentionMask.relative_buckets={self.relative_buckets!r} must be a RelativeBuckets "
                             "or None")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "sliding_window", int(self.sliding_window))
        object.__setattr__(self, "prefix_length", int(self.prefix_length))

    def hides_pairs(self, has_segments: bool = False) -> bool:
        """Whether some (query, key) pair can be hidden: by the causal rule, the window, or segment ids."""
        return self.causal or bool(self.sliding_window) or has_segments

    def replace(self, **changes: Any) -> "AttentionMask":
        return dataclasses.replace(self, **changes)

    def check_heads(self, num_heads: int, relative_bias_OH=None) -> None:
        """ValueError unless there is one ALiBi slope per query head (or no ALiBi) and a relative bias table of
        (num_buckets, num_heads) exactly when the mask has relative buckets."""
        if self.alibi_slopes is not None and len(self.alibi_slopes) != num_heads:
            raise ValueError(f"AttentionMask has {len(self.alibi_slopes)} ALiBi slopes but the queries have "
                             f"H={num_heads} heads; give one slope per query head")
        buckets = self.relative_buckets
        if buckets is None and relative_bias_OH is not None:
            raise ValueError("relative_bias_OH was given but the mask has no relative_buckets; give "
                             "AttentionMask(relative_buckets=RelativeBuckets(...)) or no table")
        if buckets is not None:
            if relative_bias_OH is None:
                raise ValueError(f"the mask has T5 relative buckets: give relative_bias_OH, a ({buckets.num_buckets}, "
                                 f"H={num_heads}) bias table")
            if tuple(relative_bias_OH.shape) != (buckets.num_buckets, num_heads):
                raise ValueError(f"relative_bias_OH has shape {tuple(relative_bias_OH.shape)}; expected "
                                 f"(num_buckets, H) = {(buckets.num_buckets, num_heads)}")

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

    def bias_BHQK(self, q_positions_BQ, kv_positions_BK, relative_bias_OH=None):
        """float32 sum of the mask's score biases, or None without any: ALiBi's -slope_h * |dq| and T5's
        relative_bias_OH[bucket(key position - query position), h]."""
        bias_BHQK = None
        if self.alibi_slopes is not None:
            dist_BQK = jnp.abs(q_positions_BQ[:, :, None] - kv_positions_BK[:, None, :]).astype(jnp.float32)
            slopes_H = jnp.asarray(self.alibi_slopes, jnp.float32)
            bias_BHQK = -slopes_H[None, :, None, None] * dist_BQK[:, None]
        if self.relative_buckets is not None:
            offset_BQK = kv_positions_BK[:, None, :] - q_positions_BQ[:, :, None]
            bucket_B1QK = self.relative_buckets.bucket(offset_BQK)[:, None]
            table_OH = relative_bias_OH.astype(jnp.float32)
            relative_BHQK = jnp.zeros((), jnp.float32)
            for bucket in range(self.relative_buckets.num_buckets):  # selects, not a gather: XLA's CPU gather is slow
                relative_BHQK = jnp.where(bucket_B1QK == bucket, table_OH[bucket][None, :, None, None], relative_BHQK)
            bias_BHQK = relative_BHQK if bias_BHQK is None else bias_BHQK + relative_BHQK
        return bias_BHQK


CAUSAL = AttentionMask(causal=True)
BIDIRECTIONAL = AttentionMask(causal=False)
