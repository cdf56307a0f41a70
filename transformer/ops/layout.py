"""Token order on a ring of devices: the zigzag permutation, the divisibility rule, the work schedule.

Ring attention splits the length axis over the `sequence` mesh axis. Under a causal mask a contiguous
split gives device r about r times the work of device 0; zigzag order balances it: of 2P equal chunks,
device r holds natural chunks r and 2P-1-r. Data placement (`to_zigzag`), evaluation (`zigzag_inverse`)
and the ring kernel (`ring_length_problem`, `num_parts`) all use this one module.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from transformer.ops.mask import AttentionMask

LAYOUTS = ("zigzag", "contiguous")


def check_ring_size(ring_size: int) -> None:
    if isinstance(ring_size, bool) or not isinstance(ring_size, (int, np.integer)) or ring_size < 1:
        raise ValueError(f"ring size {ring_size!r} must be a positive integer")


def ring_multiple(ring_size: int, causal: bool) -> int:
    """A ring's sequences must be multiples of this: 2 x ring size with causal masks (zigzag halves), else
    the ring size."""
    check_ring_size(ring_size)
    return 2 * ring_size if causal else ring_size


def ring_length_problem(length_name: str, length: int, ring_name: str, ring_size: int, causal: bool) -> str | None:
    """Why `length` cannot be split over a ring of `ring_size`, as one line naming both, or None.
    (`length_name` e.g. "data.seq_len=36"; `ring_name` e.g. "mesh.sequence=4" or "ring size 4".)"""
    multiple = ring_multiple(ring_size, causal)
    if length % multiple == 0:
        return None
    if causal:
        return (f"{length_name} is not divisible by 2 x {ring_name} = {multiple} (a causal ring holds two zigzag "
                f"chunks per device); use a multiple of {multiple}")
    return f"{length_name} is not divisible by {ring_name} = {multiple}; use a multiple of {multiple}"


def zigzag_permutation(seq_len: int, ring_size: int) -> np.ndarray:
    """Indices `perm` such that `x[perm]` is `x` in zigzag order."""
    problem = ring_length_problem(f"sequence length {seq_len}", seq_len, f"ring size {ring_size}", ring_size, True)
    if problem:
        raise ValueError(problem)
    chunks = 2 * ring_size
    chunk = seq_len // chunks
    order = [c for r in range(ring_size) for c in (r, chunks - 1 - r)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])


def zigzag_inverse(seq_len: int, ring_size: int) -> np.ndarray:
    """Indices `inv` such that `z[inv]` is natural order again (z in zigzag order); `inv[i]` is where
    natural token i sits in zigzag order."""
    return np.argsort(zigzag_permutation(seq_len, ring_size))


def _take(x, indices, axis):
    return np.take(x, indices, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, indices, axis=axis)


def to_zigzag(x, ring_size: int, axis: int = 1):
    """`x` reordered along `axis` from natural to zigzag order (NumPy in, NumPy out; jax in, jax out)."""
    return _take(x, zigzag_permutation(x.shape[axis], ring_size), axis)


def from_zigzag(x, ring_size: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    return _take(x, zigzag_inverse(x.shape[axis], ring_size), axis)


def num_parts(mask: AttentionMask, has_segments: bool, q_len: int, kv_len: int) -> int:
    """The ring splits each shard into this many equal sub-blocks (2 when some could be skipped)."""
    return 2 if mask.hides_pairs(has_segments) and q_len % 2 == 0 and kv_len % 2 == 0 else 1


def ring_work(seq_len: int, ring_size: int, *, layout: str = "zigzag",
              mask: AttentionMask = AttentionMask(causal=True)) -> dict[str, np.ndarray]:
    """Per-device work of the forward ring schedule, from the mask's own skip test.

    Returns int64 arrays of shape (ring_size,): "blocks" (sub-block kernel calls), "pairs_computed"
    ((q, k) pairs inside those calls) and "pairs_unmasked" (pairs the mask allows; their total is the
    number of allowed pairs of the whole sequence).
    """
    check_ring_size(ring_size)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not valid; choose one of {', '.join(map(repr, LAYOUTS))}")
    if layout == "zigzag":
        order = zigzag_permutation(seq_len, ring_size)
    else:
        problem = ring_length_problem(f"sequence length {seq_len}", seq_len, f"ring size {ring_size}", ring_size,
                                      False)
        if problem:
            raise ValueError(problem)
        order = np.arange(seq_len)
    local = seq_len // ring_size
    shards = order.reshape(ring_size, 1, local)
    parts = num_parts(mask, False, local, local)
    work = {name: np.zeros(ring_size, np.int64) for name in ("blocks", "pairs_computed", "pairs_unmasked")}
    for r in range(ring_size):
        for step in range(ring_size):
            kv_positions = shards[(r - step) % ring_size]
            for q_part in np.split(shards[r], parts, axis=1):
                for kv_part in np.split(kv_positions, parts, axis=1):
                    if not mask.may_attend(q_part, kv_part):
                        continue
                    allowed = np.asarray(mask.allowed(q_part, kv_part))
                    work["blocks"][r] += 1
                    work["pairs_computed"][r] += allowed.size
                    work["pairs_unmasked"][r] += allowed.sum()
    return work
