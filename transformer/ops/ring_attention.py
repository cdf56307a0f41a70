"""Ring attention (Liu et al., 2023): exact attention over a sequence sharded on a mesh axis.

Every device keeps its query shard. Key/value shards (only the G kv heads) travel around the
ring with `ppermute`, one hop per step; each step's block result is merged into a float32
(out, log-sum-exp) accumulator. The next hop is issued before the current block is computed,
so XLA can overlap the transfer with the math (each pass is one `lax.scan` of P steps, so the
last hop, which brings the shard home, is one more than strictly needed). The backward pass
(custom_vjp) is a second ring that rotates k, v and their float32 gradient accumulators, which
arrive home after a full cycle; each block's gradients use the global lse and
delta = sum(dout * out) per row (FlashAttention-2 style), recomputing the scores chunk by chunk
in O(block) memory.

Masks come from *global* positions, so any token order is exact. The balanced order for causal
attention is zigzag: of 2P equal chunks device r holds chunks r and 2P-1-r (`to_zigzag`).

What is skipped: each local shard is split into two halves (queries and keys alike) and each of
the four (query half, kv half) sub-blocks runs only when a position-range test says some pair
in it may be unmasked (causal: min kv pos <= max q pos; sliding window: the smallest position gap
fits in the window; segment ids: the id ranges overlap); otherwise a `lax.cond` skips the kernel.
Under zigzag + causal the first step runs 3 of 4 sub-blocks and every later step exactly 2 (kv
from an earlier device: both query halves x the first kv half; from a later device: the second
query half x both kv halves), so every device runs 2P + 1 sub-blocks of equal size. With a
contiguous layout device r runs 4r + 3. `ring_work` reports this schedule; the backward pass
also skips fully masked (block_size x block_size) chunks inside each sub-block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from transformer import sharding
from transformer.ops import attention as attention_ops

BLOCK_KERNELS = ("auto", "blockwise", "reference", "cudnn")
LAYOUTS = ("zigzag", "contiguous")
SEQUENCE_AXIS = "sequence"
_F32 = jnp.float32


# ----------------------------------------------------------------------------- zigzag layout

def zigzag_permutation(seq_len: int, ring_size: int) -> np.ndarray:
    """Indices `perm` such that `x[perm]` is `x` in zigzag order: device r's shard is
    natural chunks r and 2P-1-r of 2P equal chunks."""
    _check_ring_size(ring_size)
    chunks = 2 * ring_size
    if seq_len % chunks:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x ring size {ring_size} = {chunks} "
                         f"(zigzag splits it into 2 chunks per device); use a multiple of {chunks}")
    chunk = seq_len // chunks
    order = [c for r in range(ring_size) for c in (r, chunks - 1 - r)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order])


def to_zigzag(x, ring_size: int, axis: int = 1):
    """Reorder `x` along `axis` from natural to zigzag order (NumPy in, NumPy out)."""
    perm = zigzag_permutation(x.shape[axis], ring_size)
    return np.take(x, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, perm, axis=axis)


def from_zigzag(x, ring_size: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    inverse = np.argsort(zigzag_permutation(x.shape[axis], ring_size))
    return np.take(x, inverse, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inverse, axis=axis)


def _check_ring_size(ring_size: int) -> None:
    if not isinstance(ring_size, (int, np.integer)) or ring_size < 1:
        raise ValueError(f"ring size {ring_size!r} must be a positive integer")


# ----------------------------------------------------------------------------- masks and skip tests

def _allowed(qpos, kpos, qseg, kseg, causal: bool, window: int):
    """bool (B, Q, K): the contract's position-based mask."""
    diff = qpos[:, :, None] - kpos[:, None, :]
    ok = jnp.ones(diff.shape, bool)
    if causal:
        ok = diff >= 0
        if window:
            ok = ok & (diff < window)
    elif window:
        ok = jnp.abs(diff) < window
    if qseg is not None:
        ok = ok & (qseg[:, :, None] == kseg[:, None, :])
    return ok


def _may_attend(qpos, kpos, qseg, kseg, causal: bool, window: int):
    """Scalar bool, False only if every (q, k) pair is masked (NumPy or jax arrays)."""
    qmin, qmax = qpos.min(axis=-1), qpos.max(axis=-1)
    kmin, kmax = kpos.min(axis=-1), kpos.max(axis=-1)
    ok = qmin == qmin
    if causal:
        ok = ok & (kmin <= qmax)
        if window:
            ok = ok & (qmin - kmax < window)
    elif window:
        ok = ok & (kmin - qmax < window) & (qmin - kmax < window)
    if qseg is not None:
        ok = ok & (kseg.min(axis=-1) <= qseg.max(axis=-1)) & (qseg.min(axis=-1) <= kseg.max(axis=-1))
    return ok.any()


def _num_parts(causal: bool, window: int, has_segments: bool, q_len: int, kv_len: int) -> int:
    """Split each shard in halves when some sub-block could be skipped."""
    maskable = causal or window > 0 or has_segments
    return 2 if maskable and q_len % 2 == 0 and kv_len % 2 == 0 else 1


def _split(parts: int, axis: int, *arrays):
    """Each array cut into `parts` equal pieces along `axis` (None stays None): list of tuples."""
    pieces = [None if a is None else jnp.split(a, parts, axis=axis) if not isinstance(a, np.ndarray)
              else np.split(a, parts, axis=axis) for a in arrays]
    return [tuple(None if p is None else p[i] for p in pieces) for i in range(parts)]


def ring_work(seq_len: int, ring_size: int, *, layout: str = "zigzag", causal: bool = True,
              sliding_window: int = 0) -> dict[str, np.ndarray]:
    """Per-device work of the forward ring schedule, from the same skip test the kernel uses.

    Returns int64 arrays of shape (ring_size,): "blocks" (sub-block kernel calls),
    "pairs_computed" ((q, k) pairs inside those calls) and "pairs_unmasked" (pairs the mask
    allows; their total is the number of allowed pairs of the whole sequence).
    """
    _check_ring_size(ring_size)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not valid; choose one of {', '.join(map(repr, LAYOUTS))}")
    if layout == "zigzag":
        order = zigzag_permutation(seq_len, ring_size)
    else:
        if seq_len % ring_size:
            raise ValueError(f"sequence length {seq_len} is not divisible by ring size {ring_size}; "
                             f"use a multiple of {ring_size}")
        order = np.arange(seq_len)
    shards = order.reshape(ring_size, 1, seq_len // ring_size)
    local = seq_len // ring_size
    parts = _num_parts(causal, sliding_window, False, local, local)
    work = {name: np.zeros(ring_size, np.int64) for name in ("blocks", "pairs_computed", "pairs_unmasked")}
    for r in range(ring_size):
        for step in range(ring_size):
            kv = shards[(r - step) % ring_size]
            for (qp,) in _split(parts, 1, shards[r]):
                for (kp,) in _split(parts, 1, kv):
                    if not _may_attend(qp, kp, None, None, causal, sliding_window):
                        continue
                    allowed = _np_allowed(qp, kp, causal, sliding_window)
                    work["blocks"][r] += 1
                    work["pairs_computed"][r] += allowed.size
                    work["pairs_unmasked"][r] += allowed.sum()
    return work


def _np_allowed(qpos, kpos, causal, window):
    diff = qpos[:, :, None] - kpos[:, None, :]
    ok = np.ones(diff.shape, bool)
    if causal:
        ok = (diff >= 0) & ((diff < window) if window else True)
    elif window:
        ok = np.abs(diff) < window
    return ok


# ----------------------------------------------------------------------------- static options

@dataclasses.dataclass(frozen=True)
class _Options:
    axis_name: Any
    causal: bool
    sliding_window: int
    scale: float
    kernel: str
    block_size: int


def resolve_block_kernel(block_kernel: str, dtype, *, has_alibi: bool = False, window: int = 0,
                         head_dim: int) -> str:
    """The ring's block kernel for `block_kernel` ("auto": cudnn on GPU for bf16/f16 without ALiBi or a
    window, else blockwise); raises a ValueError when an explicit "cudnn" cannot run. Segment ids do not
    matter here: cuDNN runs the sub-blocks whose q and kv tokens share one segment, blockwise the rest."""
    if block_kernel not in BLOCK_KERNELS:
        raise ValueError(f"block_kernel={block_kernel!r} is not valid; choose one of "
                         f"{', '.join(map(repr, BLOCK_KERNELS))}")
    on_gpu = jax.default_backend() == "gpu"
    problems = []
    if not on_gpu:
        problems.append(f"it needs a GPU (backend is {jax.default_backend()!r})")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"it needs bfloat16/float16 inputs, not {jnp.dtype(dtype).name}")
    if has_alibi:
        problems.append("it does not take ALiBi slopes")
    if window:
        problems.append(f"it does not take sliding_window={window} across ring blocks")
    if head_dim % 8 or head_dim > 128:
        problems.append(f"it needs a head dim that is a multiple of 8 and <= 128, not {head_dim}")
    if block_kernel == "cudnn" and problems:
        raise ValueError(f"block_kernel='cudnn' cannot be used: {'; '.join(problems)}; "
                         "use block_kernel='blockwise'")
    if block_kernel == "auto":
        return "blockwise" if problems else "cudnn"
    return block_kernel


# ----------------------------------------------------------------------------- public entry points

def ring_attention(q_BQHD, k_BKGD, v_BKGD, *, axis_name, causal: bool = True, q_positions_BQ=None,
                   kv_positions_BK=None, segment_ids_BQ=None, sliding_window: int = 0, alibi_slopes_H=None,
                   scale: float | None = None, block_kernel: str = "auto", block_size: int = 512):
    """Exact attention of the local query shard over the whole sequence sharded on `axis_name`.

    Call inside `jax.shard_map`. Positions are the *global* positions of the local shard
    (default: the contiguous layout, axis_index * Q + arange(Q)); kv positions default to the
    query positions. `segment_ids_BQ` are the local shard's ids; the kv copy travels the ring.
    ALiBi slopes are constants (no gradient). Returns out_BQHD in q's dtype. Works under
    `shard_map(check_vma=True)` (the default, used by `ring_attention_sharded`): every loop carry
    here and in the block kernels is built to vary over the same mesh axes as the inputs.
    """
    q, k, v = q_BQHD, k_BKGD, v_BKGD
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, L, heads, head_dim); got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k shape {k.shape} and v shape {v.shape} must be equal")
    (B, Q, H, D), (_, K, G, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q shape {q.shape} and k shape {k.shape} must agree in batch and head dim")
    if H % G:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads G={G}")
    if not isinstance(sliding_window, (int, np.integer)) or sliding_window < 0:
        raise ValueError(f"sliding_window={sliding_window!r} must be an int >= 0 (0: full attention)")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if segment_ids_BQ is not None and (Q != K or segment_ids_BQ.shape != (B, Q)):
        raise ValueError(f"segment_ids_BQ shape {segment_ids_BQ.shape} must be (B, Q) = {(B, Q)} "
                         f"and needs equal q and kv lengths (got {Q} and {K})")
    if alibi_slopes_H is not None and alibi_slopes_H.shape != (H,):
        raise ValueError(f"alibi_slopes_H shape {alibi_slopes_H.shape} must be (H,) = ({H},)")
    kernel = resolve_block_kernel(block_kernel, q.dtype, has_alibi=alibi_slopes_H is not None,
                                  window=int(sliding_window), head_dim=D)
    if q_positions_BQ is None:
        q_positions_BQ = _contiguous_positions(axis_name, B, Q)
    if kv_positions_BK is None:
        kv_positions_BK = q_positions_BQ if Q == K else _contiguous_positions(axis_name, B, K)
    if q_positions_BQ.shape != (B, Q) or kv_positions_BK.shape != (B, K):
        raise ValueError(f"positions shapes {q_positions_BQ.shape}, {kv_positions_BK.shape} must be "
                         f"(B, Q) = {(B, Q)} and (B, K) = {(B, K)}")
    opts = _Options(axis_name, bool(causal), int(sliding_window),
                    float(1.0 / math.sqrt(D) if scale is None else scale), kernel, int(block_size))
    seg = None if segment_ids_BQ is None else segment_ids_BQ.astype(jnp.int32)
    slopes = None if alibi_slopes_H is None else jnp.asarray(alibi_slopes_H, _F32)
    return _ring(opts, q, k, v, q_positions_BQ.astype(jnp.int32), kv_positions_BK.astype(jnp.int32),
                 seg, seg, slopes)


def _contiguous_positions(axis_name, batch: int, length: int):
    start = lax.axis_index(axis_name) * length
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def ring_mesh(ring_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh whose only split axis is `sequence` = ring_size (over the first ring_size devices)."""
    _check_ring_size(ring_size)
    devices = list(jax.devices() if devices is None else devices)
    if ring_size > len(devices):
        raise ValueError(f"ring size {ring_size} is larger than the {len(devices)} available devices; "
                         f"use a ring size <= {len(devices)}")
    from transformer.config import MeshConfig
    return sharding.make_mesh(MeshConfig(data=1, sequence=ring_size), devices[:ring_size])


def ring_attention_sharded(q, k, v, mesh: Mesh, *, causal: bool = True, q_positions=None, kv_positions=None,
                           segment_ids=None, sliding_window: int = 0, alibi_slopes_H=None,
                           scale: float | None = None, block_kernel: str = "auto", block_size: int = 512):
    """`ring_attention` on global arrays: shard_map over mesh axis "sequence" (batch over
    data/fsdp/expert, heads over tensor, as `sharding.logical_to_spec` decides).

    q (B, Lq, H, D), k/v (B, Lk, G, D), positions (L,) or (B, L) in the same (e.g. zigzag) order as
    the tokens (default arange), segment_ids (B, L). For balanced causal work feed the sequence
    in zigzag order (`to_zigzag`) together with its positions. Validates everything before tracing
    the ring: lengths must be multiples of 2 x ring size (causal) or the ring size.
    """
    if SEQUENCE_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {SEQUENCE_AXIS!r} axis to run the ring over")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be 4-D (B, L, heads, head_dim) with k and v of equal shape; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    (B, Lq, H, D), (_, Lk, G, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q shape {q.shape} and k shape {k.shape} must agree in batch and head dim")
    if H % G:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads G={G}")
    ring = mesh.shape[SEQUENCE_AXIS]
    multiple = 2 * ring if causal else ring
    why = f"2 x ring size {ring} (causal zigzag halves)" if causal else f"ring size {ring}"
    for name, length in (("query", Lq), ("kv", Lk)):
        if length % multiple:
            raise ValueError(f"{name} sequence length {length} is not divisible by {why} = {multiple}; "
                             f"use a multiple of {multiple}")
    q_positions = _global_positions(q_positions, B, Lq, "q_positions")
    kv_positions = q_positions if kv_positions is None and Lq == Lk else _global_positions(
        kv_positions, B, Lk, "kv_positions")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (B, Lq) or Lq != Lk:
            raise ValueError(f"segment_ids shape {segment_ids.shape} must be (B, L) = {(B, Lq)} with equal "
                             f"q and kv lengths (got {Lq} and {Lk})")
    if alibi_slopes_H is not None:
        alibi_slopes_H = jnp.asarray(alibi_slopes_H, _F32)
        if alibi_slopes_H.shape != (H,):
            raise ValueError(f"alibi_slopes_H shape {alibi_slopes_H.shape} must be (H,) = ({H},)")

    q_spec = sharding.logical_to_spec(("batch", "length", "heads", None), mesh, q.shape)
    tensor = mesh.shape.get("tensor", 1)
    if q_spec[2] is not None and G % tensor:
        # q heads split over `tensor` but kv heads cannot be: give each shard its own kv copies
        k, v = (jnp.repeat(x, math.lcm(G, tensor) // G, axis=2) for x in (k, v))
    kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads", None), mesh, k.shape)
    pos_spec = sharding.logical_to_spec(("batch", "length"), mesh, (B, Lq))
    kv_pos_spec = sharding.logical_to_spec(("batch", "length"), mesh, (B, Lk))
    heads_spec = P(q_spec[2])

    args = [q, k, v, q_positions, kv_positions]
    specs = [q_spec, kv_spec, kv_spec, pos_spec, kv_pos_spec]
    optional = []
    for name, value, spec in (("segment_ids_BQ", segment_ids, pos_spec),
                              ("alibi_slopes_H", alibi_slopes_H, heads_spec)):
        if value is not None:
            optional.append(name)
            args.append(value)
            specs.append(spec)

    def local(q_, k_, v_, qpos_, kpos_, *rest):
        return ring_attention(q_, k_, v_, axis_name=SEQUENCE_AXIS, causal=causal, q_positions_BQ=qpos_,
                              kv_positions_BK=kpos_, sliding_window=sliding_window, scale=scale,
                              block_kernel=block_kernel, block_size=block_size, **dict(zip(optional, rest)))

    kernel = resolve_block_kernel(block_kernel, q.dtype, has_alibi=alibi_slopes_H is not None,
                                  window=int(sliding_window), head_dim=D)
    # Older jax releases' cuDNN attention primitive drops the varying-mesh-axes type of its outputs
    # (jax-ml/jax#36008), so only that block kernel is mapped without the vma type check.
    mapped = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec,
                           check_vma=kernel != "cudnn")
    return mapped(*args)


def _global_positions(positions, batch: int, length: int, name: str):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    positions = jnp.asarray(positions)
    if positions.shape == (length,):
        positions = jnp.broadcast_to(positions, (batch, length))
    if positions.shape != (batch, length):
        raise ValueError(f"{name} shape {positions.shape} must be (L,) = ({length},) or (B, L) = {(batch, length)}")
    return positions.astype(jnp.int32)


# ----------------------------------------------------------------------------- the ring (custom_vjp)

def _zeros(shape, *like):
    """float32 zeros of `shape` that vary over the same mesh axes as every array in `like`."""
    return attention_ops.full_like_inputs(shape, 0.0, *like)


def _rotate(tree, axis_name, size: int):
    """Each device's `tree` moves to the next device of the ring (identity on a ring of one)."""
    if size == 1:
        return tree
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _merge(a, b):
    """Combine two normalised partial results (out_BQHD f32, lse_BHQ) of disjoint key sets."""
    out_a, lse_a = a
    out_b, lse_b = b
    lse = jnp.logaddexp(lse_a, lse_b)
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a = jnp.swapaxes(jnp.exp(lse_a - ref), 1, 2)[..., None]
    weight_b = jnp.swapaxes(jnp.exp(lse_b - ref), 1, 2)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(opts, q, k, v, qpos, kpos, qseg, kseg, slopes):
    return _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, slopes)[0]


def _ring_fwd_rule(opts, q, k, v, qpos, kpos, qseg, kseg, slopes):
    out, lse = _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, slopes)
    return out, (q, k, v, qpos, kpos, qseg, kseg, slopes, out, lse)


def _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, slopes):
    size = lax.axis_size(opts.axis_name)
    B, Q, H, D = q.shape
    like = (q, k, qpos, kpos)

    def body(carry, _):
        kv, acc = carry
        nxt = _rotate(kv, opts.axis_name, size)
        return (nxt, _merge(acc, _step_forward(opts, q, *kv, qpos, qseg, slopes))), None

    acc = (_zeros((B, Q, H, D), *like), _zeros((B, H, Q), *like) - jnp.inf)
    (_, (out, lse)), _ = lax.scan(body, ((k, v, kpos, kseg), acc), length=size)
    return out.astype(q.dtype), lse


def _step_forward(opts, q, k, v, kpos, kseg, qpos, qseg, slopes):
    """(out f32, lse) of the local queries against one kv shard, sub-block by sub-block."""
    parts = _num_parts(opts.causal, opts.sliding_window, qseg is not None, q.shape[1], k.shape[1])
    kv_parts = _split(parts, 1, k, v, kpos, kseg)
    outs, lses = [], []
    for qi, qpos_i, qseg_i in _split(parts, 1, q, qpos, qseg):
        acc = None
        for kj, vj, kpos_j, kseg_j in kv_parts:
            res = _sub_forward(opts, qi, kj, vj, qpos_i, kpos_j, qseg_i, kseg_j, slopes)
            acc = res if acc is None else _merge(acc, res)
        outs.append(acc[0])
        lses.append(acc[1])
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _sub_forward(opts, q, k, v, qpos, kpos, qseg, kseg, slopes):
    (B, Q, H, D) = q.shape

    def empty(_):
        return _zeros((B, Q, H, D), q, k, qpos, kpos), _zeros((B, H, Q), q, k, qpos, kpos) - jnp.inf

    def generic(_):
        out, lse = attention_ops.attention(
            q, k, v, causal=opts.causal, q_positions_BQ=qpos, kv_positions_BK=kpos, q_segment_ids_BQ=qseg,
            kv_segment_ids_BK=kseg, sliding_window=opts.sliding_window, alibi_slopes_H=slopes, scale=opts.scale,
            implementation="blockwise" if opts.kernel == "cudnn" else opts.kernel, block_size=opts.block_size,
            return_lse=True)
        return out.astype(_F32) + _zeros((), q, k, qpos, kpos), lse.astype(_F32) + _zeros((), q, k, qpos, kpos)

    maskable = opts.causal or opts.sliding_window or qseg is not None
    if opts.kernel == "cudnn":
        return _cudnn_forward(opts, q, k, v, qpos, kpos, qseg, kseg, empty, generic)
    if not maskable:
        return generic(None)
    return lax.cond(_may_attend(qpos, kpos, qseg, kseg, opts.causal, opts.sliding_window), generic, empty, None)


def _cudnn_forward(opts, q, k, v, qpos, kpos, qseg, kseg, empty, generic):
    """cuDNN flash attention on sub-blocks whose q and kv tokens share one segment per row and that are
    unmasked or aligned-causal; others via `generic`."""
    def cudnn(is_causal):
        return lambda _: _cudnn_attention(q, k, v, opts.scale, is_causal)

    if not opts.causal and qseg is None:
        return cudnn(False)(None)
    one_segment = jnp.asarray(True)
    if qseg is not None:
        one_segment = (qseg == qseg[:, :1]).all() & (kseg == qseg[:, :1]).all()
    unmasked = (kpos.max(axis=-1) <= qpos.min(axis=-1)).all() if opts.causal else jnp.asarray(True)
    aligned = jnp.asarray(False)
    if opts.causal and q.shape[1] == k.shape[1]:
        aligned = (qpos == kpos).all() & (jnp.diff(qpos, axis=-1) > 0).all()
    may = _may_attend(qpos, kpos, qseg, kseg, opts.causal, 0)
    branch = jnp.where(~may, 0, jnp.where(one_segment & unmasked, 1, jnp.where(one_segment & aligned, 2, 3)))
    return lax.switch(branch, [empty, cudnn(False), cudnn(True), generic], None)


def _cudnn_attention(q, k, v, scale: float, is_causal: bool):
    """(out f32, lse_BHQ f32) from cuDNN flash attention.

    jax.nn.dot_product_attention(return_residual=True) rounds the statistics to q's dtype; a bf16
    lse (spacing 1/16 near 10) would put ~1% errors into the block merge, so jax's cuDNN wrapper
    is called directly for its float32 statistics when it is importable.
    """
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
        mask_type = fused.MaskType.CAUSAL if is_causal else fused.MaskType.NO_MASK
        out, lse_BHQ = fused.dot_product_attention(q, k, v, scale=scale, mask_type=mask_type, return_residual=True)
    except (ImportError, AttributeError):
        out, lse_BQH = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal,
                                                     implementation="cudnn", return_residual=True)
        lse_BHQ = jnp.swapaxes(lse_BQH, 1, 2)
    return out.astype(_F32), lse_BHQ.astype(_F32)


def _ring_bwd_rule(opts, residuals, dout):
    q, k, v, qpos, kpos, qseg, kseg, slopes, out, lse = residuals
    size = lax.axis_size(opts.axis_name)
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(_F32), out.astype(_F32))
    like = (q, k, qpos, kpos, dout)

    def body(carry, _):
        kv, dq, (dk, dv) = carry
        nxt = _rotate(kv, opts.axis_name, size)
        gq, gk, gv = _step_backward(opts, q, *kv, qpos, qseg, slopes, dout, lse, delta)
        return (nxt, dq + gq, _rotate((dk + gk, dv + gv), opts.axis_name, size)), None

    init = ((k, v, kpos, kseg), _zeros(q.shape, *like), (_zeros(k.shape, *like), _zeros(v.shape, *like)))
    (_, dq, (dk, dv)), _ = lax.scan(body, init, length=size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_ring.defvjp(_ring_fwd_rule, _ring_bwd_rule)


def _step_backward(opts, q, k, v, kpos, kseg, qpos, qseg, slopes, dout, lse, delta):
    """float32 (dq, dk, dv) of one ring step, sub-block by sub-block."""
    parts = _num_parts(opts.causal, opts.sliding_window, qseg is not None, q.shape[1], k.shape[1])
    q_parts = _split(parts, 1, q, qpos, qseg, dout)
    stats = _split(parts, 2, lse, delta)
    kv_parts = _split(parts, 1, k, v, kpos, kseg)
    dqs, dks, dvs = [], [], []
    for j, (kj, vj, kpos_j, kseg_j) in enumerate(kv_parts):
        dk_j = dv_j = None
        for i, (qi, qpos_i, qseg_i, do_i) in enumerate(q_parts):
            gq, gk, gv = _sub_backward(opts, qi, kj, vj, qpos_i, kpos_j, qseg_i, kseg_j, slopes, do_i, *stats[i])
            if j == 0:
                dqs.append(gq)
            else:
                dqs[i] = dqs[i] + gq
            dk_j, dv_j = (gk, gv) if dk_j is None else (dk_j + gk, dv_j + gv)
        dks.append(dk_j)
        dvs.append(dv_j)
    return jnp.concatenate(dqs, axis=1), jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1)


def _sub_backward(opts, q, k, v, qpos, kpos, qseg, kseg, slopes, dout, lse, delta):
    like = (q, k, qpos, kpos, dout)

    def run(_):
        return _block_grads(opts, q, k, v, qpos, kpos, qseg, kseg, slopes, dout, lse, delta)

    def empty(_):
        return _zeros(q.shape, *like), _zeros(k.shape, *like), _zeros(v.shape, *like)

    if not (opts.causal or opts.sliding_window or qseg is not None):
        return run(None)
    return lax.cond(_may_attend(qpos, kpos, qseg, kseg, opts.causal, opts.sliding_window), run, empty, None)


def _chunk(length: int, block_size: int) -> int:
    """Largest divisor of `length` that is <= block_size."""
    return max(c for c in range(1, min(length, block_size) + 1) if length % c == 0)


def _chunked(x, chunk: int, axis: int):
    """Split `axis` into (n, chunk) and move n to the front: the scan axis."""
    if x is None:
        return None
    shape = x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unchunked(x, axis: int):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _block_grads(opts, q, k, v, qpos, kpos, qseg, kseg, slopes, dout, lse, delta):
    """Gradients of one (query block, kv block) pair, scanning over block_size chunks of both."""
    cq, ck = _chunk(q.shape[1], opts.block_size), _chunk(k.shape[1], opts.block_size)
    if cq == q.shape[1] and ck == k.shape[1]:
        return _chunk_grads(opts, q, k, v, qpos, kpos, qseg, kseg, slopes, dout, lse, delta)
    maskable = opts.causal or opts.sliding_window or qseg is not None
    q_xs = tuple(_chunked(x, cq, 1) for x in (q, dout, qpos, qseg)) + tuple(_chunked(x, cq, 2) for x in (lse, delta))
    kv_xs = tuple(_chunked(x, ck, 1) for x in (k, v, kpos, kseg))
    like = (q, k, qpos, kpos, dout)

    def over_kv(dq_chunks, kv_chunk):
        kc, vc, kposc, ksegc = kv_chunk

        def over_q(dkv, q_chunk_and_dq):
            (qc, doc, qposc, qsegc, lsec, deltac), dqc = q_chunk_and_dq

            def run(_):
                return _chunk_grads(opts, qc, kc, vc, qposc, kposc, qsegc, ksegc, slopes, doc, lsec, deltac)

            def empty(_):
                return _zeros(qc.shape, *like), _zeros(kc.shape, *like), _zeros(vc.shape, *like)

            if maskable:
                gq, gk, gv = lax.cond(_may_attend(qposc, kposc, qsegc, ksegc, opts.causal, opts.sliding_window),
                                      run, empty, None)
            else:
                gq, gk, gv = run(None)
            return (dkv[0] + gk, dkv[1] + gv), dqc + gq

        init = (_zeros(kc.shape, *like), _zeros(vc.shape, *like))
        (dkc, dvc), dq_chunks = lax.scan(over_q, init, (q_xs, dq_chunks))
        return dq_chunks, (dkc, dvc)

    dq_chunks, (dk_chunks, dv_chunks) = lax.scan(over_kv, _zeros(q_xs[0].shape, *like), kv_xs)
    return _unchunked(dq_chunks, 1), _unchunked(dk_chunks, 1), _unchunked(dv_chunks, 1)


def _chunk_grads(opts, q, k, v, qpos, kpos, qseg, kseg, slopes, dout, lse_BHQ, delta_BHQ):
    """FlashAttention-2 backward of one chunk pair given the global lse and delta (float32 out)."""
    (B, Q, H, D), G = q.shape, k.shape[2]
    R = H // G
    dt = q.dtype
    q5 = q.reshape(B, Q, G, R, D)
    do5 = dout.reshape(B, Q, G, R, D)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", q5, k, preferred_element_type=_F32) * opts.scale
    if slopes is not None:
        dist = jnp.abs(qpos[:, :, None] - kpos[:, None, :]).astype(_F32)
        s = s - slopes.reshape(1, G, R, 1, 1) * dist[:, None, None]
    allowed = _allowed(qpos, kpos, qseg, kseg, opts.causal, opts.sliding_window)[:, None, None]
    lse = lse_BHQ.reshape(B, G, R, Q, 1)
    p = jnp.where(allowed, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
    dv = jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(dt), do5, preferred_element_type=_F32)
    dp = jnp.einsum("bqgrd,bkgd->bgrqk", do5, v, preferred_element_type=_F32)
    ds = p * (dp - delta_BHQ.reshape(B, G, R, Q, 1))
    dq = jnp.einsum("bgrqk,bkgd->bqgrd", ds.astype(dt), k, preferred_element_type=_F32) * opts.scale
    dk = jnp.einsum("bgrqk,bqgrd->bkgd", ds.astype(dt), q5, preferred_element_type=_F32) * opts.scale
    return dq.reshape(B, Q, H, D), dk, dv
