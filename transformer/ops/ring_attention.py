"""Ring attention (Liu et al., 2023): exact attention over a sequence sharded on the `sequence` mesh axis.

Every device keeps its query shard. Key/value shards (only the G kv heads) travel around the ring with
`ppermute`, one hop per step; each step's block result is merged into a float32 (out, log-sum-exp)
accumulator. The next hop is issued before the current block is computed, so XLA can overlap the transfer
with the math. The backward pass (custom_vjp) is a second ring that rotates k, v and their float32
gradient accumulators, which arrive home after a full cycle; each block's gradients come from
`attention.blockwise_grads` with the rows' global lse and delta = sum(dout * out) (FlashAttention-2).

The mask is the caller's `AttentionMask` applied to *global* positions, so any token order is exact; the
balanced order for causal masks is zigzag (`ops.layout`). A T5 relative bias table is replicated over the
ring; each device sums its own queries' bias gradient over the ring steps, and the shard_map sums those
over the devices (the transpose of replicating the table). Each local shard is split into two halves
(queries and keys alike) and each of the four (query half, kv half) sub-blocks runs only when
`mask.may_attend` says some pair in it is visible; otherwise a `lax.cond` skips it. Under zigzag + causal
every device then runs 2P + 1 equal sub-blocks (`layout.ring_work` reports the schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from transformer import sharding
from transformer.config import SEQUENCE, TENSOR, MeshConfig
from transformer.ops import attention as attention_ops
from transformer.ops import layout
from transformer.ops.mask import AttentionMask

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Options:
    axis_name: Any
    mask: AttentionMask
    scale: float
    kernel: str
    block_size: int


# ----------------------------------------------------------------------------- public entry points

def ring_attention(q_BQHW, k_BKGW, v_BKGW, mask: AttentionMask, *, axis_name=SEQUENCE, q_positions_BQ=None,
                   kv_positions_BK=None, q_segment_ids_BQ=None, kv_segment_ids_BK=None, relative_bias_OH=None,
                   scale: float | None = None, implementation: str = "auto", block_size: int = 512):
    """Exact attention of the local query shard over the whole sequence sharded on `axis_name`.

    Call inside `jax.shard_map`. Positions are the *global* positions of the local shard (default: the
    contiguous layout, axis_index * Q + arange(Q)); kv positions and segment ids default to the query's
    when Q == K. ALiBi slopes are constants (no gradient); the T5 table relative_bias_OH (the local heads' columns)
    gets one. Returns out_BQHW in q's dtype. Works under
    `shard_map(check_vma=True)`: every loop carry is built to vary over the same mesh axes as the inputs.
    """
    B, W = q_BQHW.shape[0], q_BQHW.shape[3]
    contiguous = lambda given, length: _contiguous_positions(axis_name, B, length) if given is None else given
    tokens = _with_defaults(q_BQHW, k_BKGW, contiguous, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
                            kv_segment_ids_BK)
    attention_ops.check_inputs(q_BQHW, k_BKGW, v_BKGW, mask, *tokens, relative_bias_OH=relative_bias_OH, scale=scale,
                               block_size=block_size)
    kernel = attention_ops.select_kernel(implementation, mask, q_BQHW.dtype, W)
    opts = _Options(axis_name, mask, float(1.0 / math.sqrt(W) if scale is None else scale), kernel, int(block_size))
    if relative_bias_OH is not None:  # typed to vary like the queries: its gradient is psummed by autodiff
        relative_bias_OH = relative_bias_OH + jnp.zeros_like(q_BQHW, dtype=relative_bias_OH.dtype, shape=())
    return _ring(opts, q_BQHW, k_BKGW, v_BKGW, *(None if x is None else jnp.asarray(x, jnp.int32) for x in tokens),
                 relative_bias_OH)


def _with_defaults(q_BQHW, k_BKGW, positions_for, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
                   kv_segment_ids_BK):
    """The four token arrays completed: positions by `positions_for(given or None, length)`; with Q == K the
    keys' positions and segment ids default to the queries'."""
    Q, K = q_BQHW.shape[1], k_BKGW.shape[1]
    if Q == K:
        kv_positions_BK = q_positions_BQ if kv_positions_BK is None else kv_positions_BK
        kv_segment_ids_BK = q_segment_ids_BQ if kv_segment_ids_BK is None else kv_segment_ids_BK
    return (positions_for(q_positions_BQ, Q), positions_for(kv_positions_BK, K), q_segment_ids_BQ,
            kv_segment_ids_BK)


def _contiguous_positions(axis_name, batch: int, length: int):
    start = lax.axis_index(axis_name) * length
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def ring_mesh(ring_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh whose only split axis is `sequence` = ring_size (over the first ring_size devices)."""
    layout.check_ring_size(ring_size)
    devices = list(jax.devices() if devices is None else devices)
    if ring_size > len(devices):
        raise ValueError(f"ring size {ring_size} is larger than the {len(devices)} available devices; "
                         f"use a ring size <= {len(devices)}")
    return sharding.make_mesh(MeshConfig(data=1, sequence=ring_size), devices[:ring_size])


def ring_attention_sharded(q_BQHW, k_BKGW, v_BKGW, mask: AttentionMask, mesh: Mesh | None = None, *,
                           q_positions_BQ=None, kv_positions_BK=None, q_segment_ids_BQ=None, kv_segment_ids_BK=None,
                           relative_bias_OH=None, scale: float | None = None, implementation: str = "auto",
                           block_size: int = 512):
    """`ring_attention` on global arrays: shard_map over the mesh's `sequence` axis (batch and heads as
    `sharding.logical_to_spec` decides; with ALiBi the compiler splits the heads). `mesh` defaults to the
    current one.

    Positions are (L,) or (B, L) in the same (e.g. zigzag) order as the tokens (default arange); for
    balanced causal work feed the sequence in zigzag order (`layout.to_zigzag`) together with its
    positions. Everything is validated before the ring is traced: lengths must be multiples of
    `layout.ring_multiple` (2 x ring size for causal masks).
    """
    mesh = sharding.current_mesh() if mesh is None else mesh
    if mesh is None or SEQUENCE not in mesh.axis_names:
        raise ValueError(f"ring attention needs a mesh with a {SEQUENCE!r} axis; got "
                         f"{None if mesh is None else mesh.axis_names}")
    B, Lq, H, W = q_BQHW.shape
    Lk = k_BKGW.shape[1]
    arange = lambda given, length: attention_ops.arange_positions(given, B, length)
    tokens = _with_defaults(q_BQHW, k_BKGW, arange, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
                            kv_segment_ids_BK)
    attention_ops.check_inputs(q_BQHW, k_BKGW, v_BKGW, mask, *tokens, relative_bias_OH=relative_bias_OH, scale=scale,
                               block_size=block_size)
    ring = mesh.shape[SEQUENCE]
    for name, length in (("query", Lq), ("kv", Lk)):
        problem = layout.ring_length_problem(f"{name} sequence length {length}", length, f"ring size {ring}", ring,
                                             mask.causal)
        if problem:
            raise ValueError(problem)
    kernel = attention_ops.select_kernel(implementation, mask, q_BQHW.dtype, W)

    # The mask's ALiBi slopes are static, one per head of the whole layer: with ALiBi the heads stay whole
    # inside the manual region and the `tensor` axis is left to the compiler (it still splits the heads).
    manual_heads = mask.alibi_slopes is None
    manual_axes = set(mesh.axis_names) - (set() if manual_heads else {TENSOR})
    q_spec = sharding.logical_to_spec(("batch", "length", "heads" if manual_heads else None, None), mesh,
                                      q_BQHW.shape)
    G, tensor = k_BKGW.shape[2], mesh.shape.get(TENSOR, 1)
    if q_spec[2] is not None and G % tensor:
        # q heads split over `tensor` but kv heads cannot be: give each shard its own kv copies
        k_BKGW, v_BKGW = (jnp.repeat(x, math.lcm(G, tensor) // G, axis=2) for x in (k_BKGW, v_BKGW))
    kv_spec = sharding.logical_to_spec(("batch", "length", "kv_heads" if manual_heads else None, None), mesh,
                                       k_BKGW.shape)
    tokens_specs = tuple(None if x is None else sharding.logical_to_spec(("batch", "length"), mesh, x.shape)
                         for x in tokens)
    bias_spec = None if relative_bias_OH is None else jax.sharding.PartitionSpec(None, q_spec[2])

    def local(q, k, v, tokens, relative_bias_OH):
        return ring_attention(q, k, v, mask, axis_name=SEQUENCE, scale=scale, implementation=kernel,
                              block_size=block_size, relative_bias_OH=relative_bias_OH,
                              **dict(zip(_TOKEN_NAMES, tokens)))

    # Older jax releases' cuDNN attention primitive drops the varying-mesh-axes type of its outputs
    # (jax-ml/jax#36008), so only that block kernel is mapped without the vma type check.
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, tokens_specs, bias_spec),
                           out_specs=q_spec, axis_names=manual_axes, check_vma=kernel != "cudnn")
    return mapped(q_BQHW, k_BKGW, v_BKGW, tuple(None if x is None else jnp.asarray(x, jnp.int32) for x in tokens),
                  relative_bias_OH)


_TOKEN_NAMES = ("q_positions_BQ", "kv_positions_BK", "q_segment_ids_BQ", "kv_segment_ids_BK")


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


def _halves(opts, has_segments: bool, q_len: int, kv_len: int, axis: int, *arrays):
    """Each array cut into `layout.num_parts` equal sub-blocks along `axis` (None stays None)."""
    parts = layout.num_parts(opts.mask, has_segments, q_len, kv_len)
    pieces = [None if a is None else jnp.split(a, parts, axis=axis) for a in arrays]
    return [tuple(None if p is None else p[i] for p in pieces) for i in range(parts)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(opts, q, k, v, qpos, kpos, qseg, kseg, bias):
    return _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, bias)[0]


def _ring_fwd_rule(opts, q, k, v, qpos, kpos, qseg, kseg, bias):
    out, lse = _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, bias)
    return out, (q, k, v, qpos, kpos, qseg, kseg, bias, out, lse)


def _ring_forward(opts, q, k, v, qpos, kpos, qseg, kseg, bias):
    size = lax.axis_size(opts.axis_name)
    B, Q, H, W = q.shape
    like = (q, k, qpos, kpos)

    def body(carry, _):
        kv, acc = carry
        nxt = _rotate(kv, opts.axis_name, size)
        return (nxt, attention_ops.merge_partials(acc, _step_forward(opts, q, *kv, qpos, qseg, bias))), None

    acc = (_zeros((B, Q, H, v.shape[-1]), *like), _zeros((B, H, Q), *like) - jnp.inf)
    (_, (out, lse)), _ = lax.scan(body, ((k, v, kpos, kseg), acc), length=size)
    return out.astype(q.dtype), lse


def _step_forward(opts, q, k, v, kpos, kseg, qpos, qseg, bias):
    """(out f32, lse) of the local queries against one kv shard, sub-block by sub-block."""
    split = functools.partial(_halves, opts, qseg is not None, q.shape[1], k.shape[1])
    kv_parts = split(1, k, v, kpos, kseg)
    outs, lses = [], []
    for qi, qpos_i, qseg_i in split(1, q, qpos, qseg):
        acc = None
        for kj, vj, kpos_j, kseg_j in kv_parts:
            res = _sub_forward(opts, qi, kj, vj, qpos_i, kpos_j, qseg_i, kseg_j, bias)
            acc = res if acc is None else attention_ops.merge_partials(acc, res)
        outs.append(acc[0])
        lses.append(acc[1])
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _sub_forward(opts, q, k, v, qpos, kpos, qseg, kseg, bias):
    B, Q, H, _ = q.shape
    like = (q, k, qpos, kpos)

    def empty(_):
        return _zeros((B, Q, H, v.shape[-1]), *like), _zeros((B, H, Q), *like) - jnp.inf

    def generic(_):
        out, lse = attention_ops.attention(
            q, k, v, opts.mask, q_positions_BQ=qpos, kv_positions_BK=kpos, q_segment_ids_BQ=qseg,
            kv_segment_ids_BK=kseg, relative_bias_OH=bias, scale=opts.scale, block_size=opts.block_size,
            return_lse=True,
            implementation="blockwise" if opts.kernel == "cudnn" else opts.kernel)
        return out.astype(_F32) + _zeros((), *like), lse.astype(_F32) + _zeros((), *like)

    if opts.kernel == "cudnn":
        return _cudnn_forward(opts, q, k, v, qpos, kpos, qseg, kseg, empty, generic)
    if not opts.mask.hides_pairs(qseg is not None):
        return generic(None)
    return lax.cond(opts.mask.may_attend(qpos, kpos, qseg, kseg), generic, empty, None)


def _cudnn_forward(opts, q, k, v, qpos, kpos, qseg, kseg, empty, generic):
    """cuDNN flash attention on the sub-blocks its index-based masks express exactly: those the mask leaves
    whole (no mask) and diagonal ones (q and kv at the same consecutive positions, one segment: causal with
    the window); `generic` on the rest. `cudnn_problem` keeps ALiBi and prefixes out of here."""
    def cudnn(masked):
        def run(_):
            out, lse = attention_ops.cudnn_attention(
                q, k, v, causal=masked and opts.mask.causal, sliding_window=opts.mask.sliding_window if masked else 0,
                scale=opts.scale, return_lse=True)
            return out.astype(_F32), lse
        return run

    mask = opts.mask
    tokens = (qpos, kpos, qseg, kseg)
    diagonal = attention_ops.cudnn_layout_ok(*tokens) if q.shape[1] == k.shape[1] else jnp.asarray(False)
    branch = jnp.where(~mask.may_attend(*tokens), 0, jnp.where(mask.all_visible(*tokens), 1,
                                                               jnp.where(diagonal, 2, 3)))
    return lax.switch(branch, [empty, cudnn(False), cudnn(True), generic], None)


def _ring_bwd_rule(opts, residuals, dout):
    q, k, v, qpos, kpos, qseg, kseg, bias, out, lse = residuals
    size = lax.axis_size(opts.axis_name)
    dsoft = -jnp.einsum("bqhw,bqhw->bhq", dout.astype(_F32), out.astype(_F32))
    like = (q, k, qpos, kpos, dout)

    def body(carry, _):
        kv, dq, dbias, (dk, dv) = carry
        nxt = _rotate(kv, opts.axis_name, size)
        gq, gk, gv, gbias = _step_backward(opts, q, *kv, qpos, qseg, bias, dout, lse, dsoft)
        dbias = None if dbias is None else dbias + gbias
        return (nxt, dq + gq, dbias, _rotate((dk + gk, dv + gv), opts.axis_name, size)), None

    dbias = None if bias is None else _zeros(bias.shape, bias, *like)
    init = ((k, v, kpos, kseg), _zeros(q.shape, *like), dbias, (_zeros(k.shape, *like), _zeros(v.shape, *like)))
    (_, dq, dbias, (dk, dv)), _ = lax.scan(body, init, length=size)
    return ((dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + (None,) * 4
            + (None if bias is None else dbias.astype(bias.dtype),))


_ring.defvjp(_ring_fwd_rule, _ring_bwd_rule)


def _step_backward(opts, q, k, v, kpos, kseg, qpos, qseg, bias, dout, lse, dsoft):
    """float32 (dq, dk, dv, d bias or None) of one ring step, sub-block by sub-block."""
    split = functools.partial(_halves, opts, qseg is not None, q.shape[1], k.shape[1])
    q_parts, stats = split(1, q, qpos, qseg, dout), split(2, lse, dsoft)
    dq_parts = [None] * len(q_parts)
    dk_parts, dv_parts = [], []
    dbias = None
    for kj, vj, kpos_j, kseg_j in split(1, k, v, kpos, kseg):
        dk_j = dv_j = 0.0
        for i, (qi, qpos_i, qseg_i, dout_i) in enumerate(q_parts):
            gq, gk, gv, gbias = _sub_backward(opts, qi, kj, vj, qpos_i, kpos_j, qseg_i, kseg_j, bias, dout_i,
                                              *stats[i])
            dq_parts[i] = gq if dq_parts[i] is None else dq_parts[i] + gq
            dk_j, dv_j = dk_j + gk, dv_j + gv
            dbias = gbias if dbias is None else dbias + gbias
        dk_parts.append(dk_j)
        dv_parts.append(dv_j)
    return tuple(jnp.concatenate(parts, axis=1) for parts in (dq_parts, dk_parts, dv_parts)) + (dbias,)


def _sub_backward(opts, q, k, v, qpos, kpos, qseg, kseg, bias, dout, lse, dsoft):
    like = (q, k, qpos, kpos, dout)

    def run(_):
        grads = attention_ops.blockwise_grads(q, k, v, dout, lse, dsoft, opts.mask, q_positions_BQ=qpos,
                                              kv_positions_BK=kpos, q_segment_ids_BQ=qseg, kv_segment_ids_BK=kseg,
                                              relative_bias_OH=bias, scale=opts.scale, block_size=opts.block_size)
        return tuple(None if g is None else g + _zeros((), *like) for g in grads)

    def empty(_):
        return (_zeros(q.shape, *like), _zeros(k.shape, *like), _zeros(v.shape, *like),
                None if bias is None else _zeros(bias.shape, bias, *like))

    if not opts.mask.hides_pairs(qseg is not None):
        return run(None)
    return lax.cond(opts.mask.may_attend(qpos, kpos, qseg, kseg), run, empty, None)
