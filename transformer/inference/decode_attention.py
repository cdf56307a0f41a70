"""Attention over the KV cache, and writes into it; on one device or with the cache split over `sequence`.

    decode_attention(q_BQHW, k_BKGW, v_BKGW, mask, *, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
                     kv_segment_ids_BK, relative_bias_OH, scale, block_size, return_lse) -> out_BQHW [, lse_BHQ]

is a kernel behind the signature of `ops.attention.attention`, for few queries (one when decoding, the draft
when verifying) over many keys. It walks the key blocks from the first to the last one the mask lets some
query see (`mask.may_attend` on each block's positions), skipping hidden blocks between, so an empty cache
tail and slots outside a sliding window are never read. Each block's float32 (out, lse) is merged into the
running result with `merge_partials`.

`cached_attention` reads one layer of the stacked cache. When the current mesh splits `sequence`, every
device attends its queries to its own shard of the slots and the partial results are merged exactly across
the axis, m = pmax(lse), out = psum(out e^(lse - m)) / psum(e^(lse - m)): one small all-reduce per layer
(Tree Attention, Shyam et al. 2024); the cache itself never moves. `write_slots` scatters new tokens into
their slots; on a split cache each device writes only the slots it owns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from transformer import sharding
from transformer.config import SEQUENCE
from transformer.ops import attention as attention_ops
from transformer.ops import positions as pos_ops
from transformer.ops.mask import AttentionMask

_F32 = jnp.float32


def decode_attention(q_BQHW, k_BKGW, v_BKGW, mask: AttentionMask, *, q_positions_BQ=None, kv_positions_BK=None,
                     q_segment_ids_BQ=None, kv_segment_ids_BK=None, relative_bias_OH=None, scale=None, block_size=512,
                     return_lse=False, layer=None):
    """Attention of few queries over a long (cached) key sequence; see the module docstring. K/V are never
    padded or copied: a length that is not a multiple of the block size ends with a block overlapping the one
    before, whose shared keys are hidden. Segment ids, when given, must be >= 0. With `layer`, k and v are
    stacked over layers (k_NBKGW) and each block is read straight from that layer."""
    stacked_k, stacked_v = k_BKGW, v_BKGW
    if layer is not None:
        k_BKGW, v_BKGW = (jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in (k_BKGW, v_BKGW))
    attention_ops.check_inputs(q_BQHW, k_BKGW, v_BKGW, mask, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
                               kv_segment_ids_BK, relative_bias_OH=relative_bias_OH, scale=scale,
                               block_size=block_size)
    B, Q, H, W = q_BQHW.shape
    K = k_BKGW.shape[1]
    scale = 1.0 / math.sqrt(W) if scale is None else float(scale)
    qpos_BQ = attention_ops.arange_positions(q_positions_BQ, B, Q)
    kpos_BK = attention_ops.arange_positions(kv_positions_BK, B, K)
    bk = min(block_size, K)
    blocks = -(-K // bk)
    ragged = blocks * bk != K  # the last block starts at K - bk; keys it shares with the one before are hidden
    if ragged or q_segment_ids_BQ is not None:
        qseg_BQ = jnp.zeros((B, Q), jnp.int32) if q_segment_ids_BQ is None else q_segment_ids_BQ
        kseg_BK = jnp.zeros((B, K), jnp.int32) if kv_segment_ids_BK is None else kv_segment_ids_BK
    else:
        qseg_BQ = kseg_BK = None

    def start(j):
        return jnp.minimum(j * bk, K - bk)

    def block(x, j):
        return lax.dynamic_slice_in_dim(x, start(j), bk, axis=1)

    def block_segments(j):
        if kseg_BK is None:
            return None
        kseg_Bk = block(kseg_BK, j)
        return jnp.where(start(j) + jnp.arange(bk) >= j * bk, kseg_Bk, -1) if ragged else kseg_Bk

    def kv_block(x, j):
        if layer is None:
            return block(x, j)
        return lax.dynamic_slice(x, (layer, 0, start(j), 0, 0), (1, B, bk, *x.shape[3:]))[0]

    def may_attend(j):
        return mask.may_attend(qpos_BQ, block(kpos_BK, j), qseg_BQ, block_segments(j))

    needed = (jnp.stack([may_attend(j) for j in range(blocks)]) if blocks <= 64
              else jax.vmap(may_attend)(jnp.arange(blocks)))
    any_needed = jnp.any(needed)
    first = jnp.where(any_needed, jnp.argmax(needed), 0)
    last = jnp.where(any_needed, blocks - jnp.argmax(needed[::-1]), 0)
    q32_BQHW = q_BQHW.astype(_F32)

    def visit(j, acc):
        def attend(acc):
            out_BQHW, lse_BHQ = attention_ops.reference_kernel(
                mask, scale, q32_BQHW, kv_block(stacked_k, j), kv_block(stacked_v, j), qpos_BQ, block(kpos_BK, j), qseg_BQ,
                block_segments(j), relative_bias_OH)
            return attention_ops.merge_partials(acc, (out_BQHW, lse_BHQ))

        return lax.cond(needed[j], attend, lambda acc: acc, acc)

    init = (attention_ops.full_like_inputs((B, Q, H, W), 0.0, q_BQHW, stacked_k),
            attention_ops.full_like_inputs((B, H, Q), -jnp.inf, q_BQHW, stacked_k))
    out_BQHW, lse_BHQ = lax.fori_loop(first, last, visit, init)
    out_BQHW = out_BQHW.astype(q_BQHW.dtype)
    return (out_BQHW, lse_BHQ) if return_lse else out_BQHW


# ---------------------------------------------------------------- the stacked cache, on one device or split


_CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


def _split_cache(mesh) -> bool:
    return attention_ops.ring_size(mesh) > 1


def cached_attention(q_BQHW, k_NBKGW, v_NBKGW, layer, mask: AttentionMask, *, q_positions_BQ, cache_positions_BK,
                     scale: float, block_size: int, rope: tuple | None = None, relative_bias_OH=None):
    """Attention of q_BQHW over layer `layer` of the stacked cache, whose slots hold `cache_positions_BK`.
    rope = (inv_freq_BJ, mscale) rotates the cached keys first (dynamic NTK keeps them unrotated);
    relative_bias_OH: the T5 bias table of a mask with relative buckets."""
    mesh = sharding.current_mesh()

    def local(q, k_N, v_N, qpos, kpos, inv_freq, layer, relative_bias_OH):
        options = dict(q_positions_BQ=qpos, kv_positions_BK=kpos, relative_bias_OH=relative_bias_OH, scale=scale,
                       block_size=block_size, return_lse=True)
        if inv_freq is None:  # blocks are read from the stacked cache: no copy of the layer
            return decode_attention(q, k_N, v_N, mask, layer=layer, **options)
        k, v = (lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in (k_N, v_N))
        return decode_attention(q, pos_ops.apply_rope(k, kpos, inv_freq, rope[1]), v, mask, **options)

    inv_freq = None if rope is None else rope[0]
    if not _split_cache(mesh):
        return local(q_BQHW, k_NBKGW, v_NBKGW, q_positions_BQ, cache_positions_BK, inv_freq, layer,
                     relative_bias_OH)[0]

    kv_spec = sharding.logical_to_spec(_CACHE_AXES, mesh, k_NBKGW.shape)
    heads_split = kv_spec[3] is not None and mask.alibi_slopes is None
    if not heads_split:
        kv_spec = jax.sharding.PartitionSpec(*kv_spec[:3], None, None)
    q_spec = sharding.logical_to_spec(("batch", None, "heads" if heads_split else None, None), mesh, q_BQHW.shape)
    batch_spec = kv_spec[1]
    P = jax.sharding.PartitionSpec

    def merged(q, k_N, v_N, qpos, kpos, inv_freq, layer, relative_bias_OH):
        out_BQHW, lse_BHQ = local(q, k_N, v_N, qpos, kpos, inv_freq, layer, relative_bias_OH)
        top_BHQ = lax.pmax(lse_BHQ, SEQUENCE)
        weight_BHQ = jnp.exp(lse_BHQ - jnp.where(jnp.isfinite(top_BHQ), top_BHQ, 0.0))
        total_BHQ = lax.psum(weight_BHQ, SEQUENCE)
        per_query = lambda x_BHQ: jnp.swapaxes(x_BHQ, 1, 2)[..., None]
        out_BQHW = lax.psum(out_BQHW.astype(_F32) * per_query(weight_BHQ), SEQUENCE)
        return (out_BQHW / per_query(jnp.where(total_BHQ > 0, total_BHQ, 1.0))).astype(q.dtype)

    mapped = jax.shard_map(merged, mesh=mesh,
                           in_specs=(q_spec, kv_spec, kv_spec, P(batch_spec, None), P(batch_spec, SEQUENCE),
                                     None if inv_freq is None else P(batch_spec, None), P(),
                                     None if relative_bias_OH is None else P(None, q_spec[2])),
                           out_specs=q_spec)
    return mapped(q_BQHW, k_NBKGW, v_NBKGW, q_positions_BQ, cache_positions_BK, inv_freq, jnp.asarray(layer, jnp.int32),
                  relative_bias_OH)


def write_slots(dest, update, slots_BL, *, layer=None, axes=_CACHE_AXES):
    """`dest` with update[b, l] written at slot slots_BL[b, l] (of layer `layer` when dest is stacked over
    layers; `axes` are dest's logical axes). Slots out of range are dropped; on a cache split over `sequence`
    each device writes the slots it owns."""
    mesh = sharding.current_mesh()
    stacked = layer is not None

    def local(dest, update, slots_BL, layer, offset):
        size = dest.shape[2 if stacked else 1]
        local_BL = slots_BL - offset
        local_BL = jnp.where((local_BL >= 0) & (local_BL < size), local_BL, size)
        rows_B1 = jnp.arange(slots_BL.shape[0])[:, None]
        index = (layer, rows_B1, local_BL) if stacked else (rows_B1, local_BL)
        return dest.at[index].set(update.astype(dest.dtype), mode="drop")

    if not _split_cache(mesh):
        return local(dest, update, slots_BL, layer, 0)
    dest_spec = sharding.logical_to_spec(axes, mesh, dest.shape)
    batch_spec = dest_spec[1 if stacked else 0]
    rest = tuple(dest_spec[3 if stacked else 2:])
    P = jax.sharding.PartitionSpec

    def owned(dest, update, slots_BL, layer):
        size = dest.shape[2 if stacked else 1]
        return local(dest, update, slots_BL, layer, lax.axis_index(SEQUENCE) * size)

    mapped = jax.shard_map(owned, mesh=mesh, in_specs=(dest_spec, P(batch_spec, None, *rest), P(batch_spec, None),
                                                        None if layer is None else P()),
                           out_specs=dest_spec)
    return mapped(dest, update, slots_BL, None if layer is None else jnp.asarray(layer, jnp.int32))
