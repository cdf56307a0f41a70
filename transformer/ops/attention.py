"""Attention kernels behind one signature, and the one place that chooses between them.

    attention(q_BQHW, k_BKGW, v_BKGW, mask, *, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ,
              kv_segment_ids_BK, relative_bias_OH, scale, implementation, block_size, return_lse)
        -> out_BQHW [, lse_BHQ]

Kernels (`KERNELS`): "reference" (einsum, any mask), "blockwise" (FlashAttention-2 style online softmax
with a custom_vjp backward, O(Q + K) memory), "cudnn" (jax.nn.dot_product_attention on GPU), and "auto"
(`select_kernel`). H is a multiple of G (GQA/MQA): the H query heads are viewed as G x R groups and K/V
are never repeated. What may attend to what comes only from `mask` (an `AttentionMask`) applied to the
explicit positions and segment ids, and so do its score biases: ALiBi's, and T5's relative-position bias
from the learned table relative_bias_OH (differentiable: the reference kernel by autodiff, the blockwise
backward sums each tile's score gradients per bucket). Softmax statistics are float32; lse_BHQ is the natural
log-sum-exp of the scaled, biased, masked scores (-inf for a query that sees no key, whose output is 0).

Blockwise memory: the forward keeps per query chunk only (m, l, acc) and one (block x block) score tile
per head; the backward (`blockwise_grads`, which ring attention also calls for its blocks) saves only
(q, k, v, out, lse) and recomputes the tiles, with float32 accumulators. Tiles the mask hides entirely
are skipped with lax.cond, so causal masks cost about half.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformer.config import ATTENTION_KERNELS as KERNELS
from transformer.config import SEQUENCE
from transformer.ops.mask import AttentionMask

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ---------------------------------------------------------------- kernel choice


def ring_size(mesh) -> int:
    """Devices on the `sequence` axis of a mesh (1 without one): above 1, attention runs as a ring."""
    return 1 if mesh is None else dict(mesh.shape).get(SEQUENCE, 1)


def cudnn_problem(mask: AttentionMask, dtype, head_width: int, *, platform: str | None = None) -> str | None:
    """Why cuDNN flash attention (which masks by token index) cannot run this mask, dtype and head width,
    or None. Also holds inside a ring. `platform` defaults to jax.default_backend()."""
    platform = jax.default_backend() if platform is None else platform
    if platform != "gpu":
        return f"it needs a GPU, but the JAX platform is {platform!r}"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return f"it needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
    if head_width % 8 or head_width > 128:
        return f"it needs a head width that is a multiple of 8 and <= 128, got {head_width}"
    if mask.alibi_slopes is not None:
        return "it cannot add ALiBi biases"
    if mask.relative_buckets is not None:
        return "it cannot add T5 relative-position biases"
    if mask.prefix_length:
        return f"it has no prefix-LM mask (prefix_length={mask.prefix_length})"
    if mask.sliding_window and not mask.causal:
        return f"it has no sliding window without causal masking (sliding_window={mask.sliding_window})"
    return None


def _known(flag) -> bool | None:
    """A bool flag's value, or None while it is traced (its value is only known at run time)."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return None


def select_kernel(implementation: str, mask: AttentionMask, dtype, head_width: int, *, layout_ok=True,
                  platform: str | None = None) -> str:
    """The kernel that runs: "reference", "blockwise" or "cudnn"; inside Ring Attention the kernel of each
    block (the ring runs cuDNN on the blocks its index-based masks express, blockwise on the rest).

    "auto" picks cudnn when `cudnn_problem` finds none and `layout_ok` (from `cudnn_layout_ok`) is not
    False; for a traced `layout_ok` it answers "cudnn" and `attention` falls back to blockwise at run time
    for batches whose layout is not ok. An explicit "cudnn" raises a ValueError naming the problem (outside
    a ring it needs a layout known to be ok).
    """
    if implementation not in KERNELS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {', '.join(map(repr, KERNELS))}")
    if implementation in ("reference", "blockwise"):
        return implementation
    problem = cudnn_problem(mask, dtype, head_width, platform=platform)
    if implementation == "cudnn":
        if problem is None and _known(layout_ok) is not True:
            problem = ("it masks by token index, and the given position ids / segment ids are not (known to be) "
                       "arange in one segment (implementation='auto' checks them at run time)")
        if problem is not None:
            raise ValueError(f"implementation='cudnn' is unavailable: {problem}; "
                             "use implementation='blockwise' or 'reference'")
        return "cudnn"
    return "blockwise" if problem is not None or _known(layout_ok) is False else "cudnn"


def cudnn_layout_ok(q_positions_BQ=None, kv_positions_BK=None, q_segment_ids_BQ=None, kv_segment_ids_BK=None):
    """Whether masking by position / segment equals cuDNN's masking by index: positions are arange plus one
    offset per row (shared by q and kv) and every token of a row is in one segment.

    Python True when all are None; otherwise a scalar bool array (traced inside jit, where `attention`
    branches on it at run time). An unpacked causal LM batch (positions arange, one segment) is True.
    """
    ok = True
    if q_positions_BQ is not None or kv_positions_BK is not None:
        base = q_positions_BQ[:, :1] if q_positions_BQ is not None and kv_positions_BK is not None else 0
        for positions in (q_positions_BQ, kv_positions_BK):
            if positions is not None:
                ok = ok & jnp.all(positions - base == jnp.arange(positions.shape[1], dtype=positions.dtype))
    if q_segment_ids_BQ is not None:
        first = q_segment_ids_BQ[:, :1]
        ok = ok & jnp.all(q_segment_ids_BQ == first) & jnp.all(kv_segment_ids_BK == first)
    return ok


# ---------------------------------------------------------------- shared pieces


def full_like_inputs(shape, fill_value, *like, dtype=jnp.float32):
    """`jnp.full(shape, fill_value, dtype)` typed to vary over every mesh axis any array in `like` varies
    over (inside `shard_map(check_vma=True)`; a plain constant outside). Loop carries built this way match
    the values the loop body computes from those arrays."""
    out = jnp.full(shape, fill_value, dtype)
    for x in like:
        if x is not None:
            out = out + jnp.zeros_like(x, dtype=dtype, shape=())
    return out


def _logits_BGRQK(mask, scale, q_BQGRW, k_BKGW, q_positions_BQ, kv_positions_BK, relative_bias_OH):
    """Scaled float32 scores plus the mask's biases (masking is applied by the caller)."""
    scores_BGRQK = jnp.einsum("bqgrw,bkgw->bgrqk", q_BQGRW, k_BKGW, preferred_element_type=jnp.float32) * scale
    bias_BHQK = mask.bias_BHQK(q_positions_BQ, kv_positions_BK, relative_bias_OH)
    if bias_BHQK is not None:
        scores_BGRQK += bias_BHQK.reshape(scores_BGRQK.shape)
    return scores_BGRQK


def _row_stats(max_BGRQ, sum_BGRQ):
    """(sum with empty rows set to 1, lse with empty rows -inf) from a row max and a sum of exponentials."""
    nonempty = sum_BGRQ > 0
    safe_sum = jnp.where(nonempty, sum_BGRQ, 1.0)
    lse = jnp.where(nonempty, jnp.where(jnp.isfinite(max_BGRQ), max_BGRQ, 0.0) + jnp.log(safe_sum), -jnp.inf)
    return safe_sum, lse


def merge_partials(a, b):
    """Combine two normalised partial results (out_BQHW f32, lse_BHQ) of disjoint key sets."""
    out_a, lse_a = a
    out_b, lse_b = b
    lse = jnp.logaddexp(lse_a, lse_b)
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a = jnp.swapaxes(jnp.exp(lse_a - ref), 1, 2)[..., None]
    weight_b = jnp.swapaxes(jnp.exp(lse_b - ref), 1, 2)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


# ---------------------------------------------------------------- reference


def reference_kernel(mask, scale, q_BQHW, k_BKGW, v_BKGW, q_pos_BQ, kv_pos_BK, q_seg_BQ, kv_seg_BK,
                     relative_bias_OH=None):
    """Einsum attention over all keys at once: (out_BQHW in q's dtype, lse_BHQ float32)."""
    B, Q, H, W = q_BQHW.shape
    G = k_BKGW.shape[2]
    q_BQGRW = q_BQHW.astype(jnp.float32).reshape(B, Q, G, H // G, W)
    scores_BGRQK = _logits_BGRQK(mask, scale, q_BQGRW, k_BKGW.astype(jnp.float32), q_pos_BQ, kv_pos_BK,
                                 relative_bias_OH)
    allowed_B11QK = mask.allowed(q_pos_BQ, kv_pos_BK, q_seg_BQ, kv_seg_BK)[:, None, None]
    scores_BGRQK = jnp.where(allowed_B11QK, scores_BGRQK, -jnp.inf)
    max_BGRQ = lax.stop_gradient(scores_BGRQK.max(-1))
    exp_BGRQK = jnp.exp(scores_BGRQK - jnp.where(jnp.isfinite(max_BGRQ), max_BGRQ, 0.0)[..., None])
    sum_BGRQ, lse_BGRQ = _row_stats(max_BGRQ, exp_BGRQK.sum(-1))
    out_BQGRW = jnp.einsum("bgrqk,bkgw->bqgrw", exp_BGRQK / sum_BGRQ[..., None], v_BKGW.astype(jnp.float32))
    return out_BQGRW.reshape(B, Q, H, -1).astype(q_BQHW.dtype), lse_BGRQ.reshape(B, H, Q)


# ---------------------------------------------------------------- blockwise (flash-style)


class _Spec(NamedTuple):
    mask: AttentionMask
    scale: float
    block_q: int
    block_k: int


def _slice(x, start, size, axis=1):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis)


def _visit_kv_block(spec, j, q_chunk, kv, relative_bias_OH, update, carry):
    """`update(carry, k_BkGW, v_BkGW, s_BGRqk, kp_Bk)` for kv block j of a q chunk, with s the tile's scores
    (biased, -inf where masked); skipped when the mask hides the whole tile. q_chunk = (q_BqGRW, qp_Bq, qs_Bq);
    kv = (k_BKGW, v_BKGW, kp_BK, ks_BK, kvalid_BK)."""
    q_BqGRW, qp_Bq, qs_Bq = q_chunk
    k_BkGW, v_BkGW, kp_Bk, ks_Bk, kvalid_Bk = (_slice(x, j * spec.block_k, spec.block_k) for x in kv)
    ok_B11qk = (spec.mask.allowed(qp_Bq, kp_Bk, qs_Bq, ks_Bk) & kvalid_Bk[:, None, :])[:, None, None]

    def visit(carry):
        s_BGRqk = _logits_BGRQK(spec.mask, spec.scale, q_BqGRW, k_BkGW, qp_Bq, kp_Bk, relative_bias_OH)
        return update(carry, k_BkGW, v_BkGW, jnp.where(ok_B11qk, s_BGRqk, -jnp.inf), kp_Bk)

    return lax.cond(ok_B11qk.any(), visit, lambda c: c, carry)


def _relative_bias_grad_OH(spec, qp_Bq, kp_Bk, dscores_BGRqk):
    """d(loss)/d(relative_bias_OH) of one tile: each head's score gradients summed over the pairs of each bucket."""
    bucket_Bqk = spec.mask.relative_buckets.bucket(kp_Bk[:, None, :] - qp_Bq[:, :, None])
    B, G, R = dscores_BGRqk.shape[:3]
    dscores_TH = jnp.einsum("bgrqk->bqkgr", dscores_BGRqk).reshape(-1, G * R)
    return jax.ops.segment_sum(dscores_TH, bucket_Bqk.reshape(-1), spec.mask.relative_buckets.num_buckets)


def _dims(q_BQHW, k_BKGW, v_BKGW):
    """(B, Q, H, W, K, G, R, Wv) of a kernel call (Wv: the value head width)."""
    (B, Q, H, W), (K, G) = q_BQHW.shape, k_BKGW.shape[1:3]
    return B, Q, H, W, K, G, H // G, v_BKGW.shape[-1]


def _flash_fwd_impl(spec, q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, bias_OH):
    # Tie the mask inputs to q: inside a differentiated lax.scan (the model's layer scan) jax hoists work that
    # depends only on loop constants (positions, segment ids) out of the loop, which would store every
    # (q-chunk, kv-block) mask tile: quadratic memory.
    q_BQHW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK = lax.optimization_barrier(
        (q_BQHW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK))
    B, Qp, H, W, Kp, G, R, Wv = _dims(q_BQHW, k_BKGW, v_BKGW)
    bq, bk = spec.block_q, spec.block_k
    q_BQGRW = q_BQHW.reshape(B, Qp, G, R, W)
    inputs = (q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK)

    kv = (k_BKGW, v_BKGW, kp_BK, ks_BK, kvalid_BK)

    def q_chunk(i):
        q_BqGRW, qp_Bq, qs_Bq = (_slice(x, i * bq, bq) for x in (q_BQGRW, qp_BQ, qs_BQ))

        def kv_step(carry, j):
            def update(carry, k_BkGW, v_BkGW, s_BGRqk, _):
                m_BGRq, l_BGRq, acc_BGRqW = carry
                m_new = jnp.maximum(m_BGRq, s_BGRqk.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                corr_BGRq = jnp.exp(m_BGRq - m_safe)
                p_BGRqk = jnp.exp(s_BGRqk - m_safe[..., None])
                l_BGRq = l_BGRq * corr_BGRq + p_BGRqk.sum(-1)
                pv_BGRqW = jnp.einsum("bgrqk,bkgw->bgrqw", p_BGRqk.astype(v_BkGW.dtype), v_BkGW,
                                      preferred_element_type=jnp.float32)
                return m_new, l_BGRq, acc_BGRqW * corr_BGRq[..., None] + pv_BGRqW

            return _visit_kv_block(spec, j, (q_BqGRW, qp_Bq, qs_Bq), kv, bias_OH, update, carry), None

        init = (full_like_inputs((B, G, R, bq), -jnp.inf, *inputs), full_like_inputs((B, G, R, bq), 0.0, *inputs),
                full_like_inputs((B, G, R, bq, Wv), 0.0, *inputs))
        (m_BGRq, l_BGRq, acc_BGRqW), _ = lax.scan(kv_step, init, jnp.arange(Kp // bk))
        l_safe, lse_BGRq = _row_stats(m_BGRq, l_BGRq)
        out_BqHW = jnp.einsum("bgrqw->bqgrw", acc_BGRqW / l_safe[..., None]).reshape(B, bq, H, Wv)
        return out_BqHW.astype(q_BQHW.dtype), lse_BGRq.reshape(B, H, bq)

    out_UBqHW, lse_UBHq = lax.map(q_chunk, jnp.arange(Qp // bq))
    out_BQHW = jnp.moveaxis(out_UBqHW, 0, 1).reshape(B, Qp, H, Wv)
    lse_BHQ = jnp.moveaxis(lse_UBHq, 0, 2).reshape(B, H, Qp)
    return out_BQHW, lse_BHQ


def _flash_grads(spec, q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, bias_OH, dout_BQHW, lse_BHQ,
                 dsoft_BHQ):
    """float32 (dq, dk, dv, d bias_OH or None), FlashAttention-2 style, from the rows' softmax statistics: lse
    and dsoft = d(loss)/d(lse) - sum(dout * out). A row with lse = +inf contributes nothing (padding)."""
    B, Qp, H, W, Kp, G, R, Wv = _dims(q_BQHW, k_BKGW, v_BKGW)
    bq, bk = spec.block_q, spec.block_k
    q_BQGRW = q_BQHW.reshape(B, Qp, G, R, W)
    dout_BQGRW = dout_BQHW.reshape(B, Qp, G, R, Wv)
    lse_BGRQ = lse_BHQ.reshape(B, G, R, Qp)
    lse_BGRQ = jnp.where(lse_BGRQ == -jnp.inf, 0.0, lse_BGRQ)
    dsoft_BGRQ = dsoft_BHQ.astype(jnp.float32).reshape(B, G, R, Qp)
    inputs = (q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, dout_BQHW, lse_BHQ, dsoft_BHQ)
    dbias_OH = None if bias_OH is None else full_like_inputs(bias_OH.shape, 0.0, bias_OH, *inputs)

    kv = (k_BKGW, v_BKGW, kp_BK, ks_BK, kvalid_BK)

    def q_chunk(dkv, i):
        q_BqGRW, dout_BqGRW, qp_Bq, qs_Bq = (_slice(x, i * bq, bq) for x in (q_BQGRW, dout_BQGRW, qp_BQ, qs_BQ))
        lse_BGRq, dsoft_BGRq = _slice(lse_BGRQ, i * bq, bq, axis=3), _slice(dsoft_BGRQ, i * bq, bq, axis=3)

        def kv_step(carry, j):
            def update(carry, k_BkGW, v_BkGW, s_BGRqk, kp_Bk):
                dq_BqGRW, dk_BKGW, dv_BKGW, dbias_OH = carry
                p_BGRqk = jnp.exp(s_BGRqk - lse_BGRq[..., None])
                dv_BkGW = jnp.einsum("bgrqk,bqgrw->bkgw", p_BGRqk.astype(dout_BqGRW.dtype), dout_BqGRW,
                                     preferred_element_type=jnp.float32)
                dp_BGRqk = jnp.einsum("bqgrw,bkgw->bgrqk", dout_BqGRW, v_BkGW, preferred_element_type=jnp.float32)
                dscores_BGRqk = p_BGRqk * (dp_BGRqk + dsoft_BGRq[..., None])
                ds_BGRqk = (dscores_BGRqk * spec.scale).astype(q_BqGRW.dtype)
                dq_BqGRW = dq_BqGRW + jnp.einsum("bgrqk,bkgw->bqgrw", ds_BGRqk, k_BkGW,
                                                 preferred_element_type=jnp.float32)
                dk_BkGW = jnp.einsum("bgrqk,bqgrw->bkgw", ds_BGRqk, q_BqGRW, preferred_element_type=jnp.float32)
                dk_BKGW = lax.dynamic_update_slice_in_dim(dk_BKGW, _slice(dk_BKGW, j * bk, bk) + dk_BkGW, j * bk, 1)
                dv_BKGW = lax.dynamic_update_slice_in_dim(dv_BKGW, _slice(dv_BKGW, j * bk, bk) + dv_BkGW, j * bk, 1)
                if dbias_OH is not None:
                    dbias_OH = dbias_OH + _relative_bias_grad_OH(spec, qp_Bq, kp_Bk, dscores_BGRqk)
                return dq_BqGRW, dk_BKGW, dv_BKGW, dbias_OH

            return _visit_kv_block(spec, j, (q_BqGRW, qp_Bq, qs_Bq), kv, bias_OH, update, carry), None

        init = (full_like_inputs((B, bq, G, R, W), 0.0, *inputs), *dkv)
        (dq_BqGRW, *dkv), _ = lax.scan(kv_step, init, jnp.arange(Kp // bk))
        return tuple(dkv), dq_BqGRW.reshape(B, bq, H, W)

    dkv_init = (full_like_inputs((B, Kp, G, W), 0.0, *inputs), full_like_inputs((B, Kp, G, Wv), 0.0, *inputs),
                dbias_OH)
    (dk_BKGW, dv_BKGW, dbias_OH), dq_UBqHW = lax.scan(q_chunk, dkv_init, jnp.arange(Qp // bq))
    return jnp.moveaxis(dq_UBqHW, 0, 1).reshape(B, Qp, H, W), dk_BKGW, dv_BKGW, dbias_OH


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, bias_OH):
    return _flash_fwd_impl(spec, q_BQHW, k_BKGW, v_BKGW, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, bias_OH)


def _flash_fwd(spec, *args):
    out_BQHW, lse_BHQ = _flash_fwd_impl(spec, *args)
    return (out_BQHW, lse_BHQ), (args, out_BQHW, lse_BHQ)


def _flash_bwd(spec, residuals, cotangents):
    args, out_BQHW, lse_BHQ = residuals
    dout_BQHW, dlse_BHQ = cotangents
    delta_BHQ = jnp.einsum("bqhw,bqhw->bhq", dout_BQHW.astype(jnp.float32), out_BQHW.astype(jnp.float32))
    dq, dk, dv, dbias = _flash_grads(spec, *args, dout_BQHW, lse_BHQ, dlse_BHQ.astype(jnp.float32) - delta_BHQ)
    q_BQHW, k_BKGW, v_BKGW, bias_OH = args[0], args[1], args[2], args[-1]
    return ((dq.astype(q_BQHW.dtype), dk.astype(k_BKGW.dtype), dv.astype(v_BKGW.dtype)) + (None,) * 5
            + (None if dbias is None else dbias.astype(bias_OH.dtype),))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, length, value, axis=1):
    if x is None or x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _blockwise_setup(mask, scale, block_size, q_BQHW, k_BKGW, v_BKGW, q_pos_BQ, kv_pos_BK, q_seg_BQ, kv_seg_BK,
                     relative_bias_OH=None):
    """(spec, padded kernel inputs): lengths padded up to whole blocks; padded keys are marked invalid."""
    B, Q = q_BQHW.shape[:2]
    K = k_BKGW.shape[1]
    bq, bk = min(block_size, Q), min(block_size, K)
    Qp, Kp = -(-Q // bq) * bq, -(-K // bk) * bk
    kvalid_BK = _pad_to(jnp.ones((B, K), bool), Kp, False)
    args = (_pad_to(q_BQHW, Qp, 0), _pad_to(k_BKGW, Kp, 0), _pad_to(v_BKGW, Kp, 0), _pad_to(q_pos_BQ, Qp, 0),
            _pad_to(kv_pos_BK, Kp, 0), _pad_to(q_seg_BQ, Qp, 0), _pad_to(kv_seg_BK, Kp, 0), kvalid_BK,
            relative_bias_OH)
    return _Spec(mask, float(scale), bq, bk), args


def _blockwise(mask, scale, block_size, q_BQHW, k_BKGW, v_BKGW, *tokens):
    Q = q_BQHW.shape[1]
    spec, args = _blockwise_setup(mask, scale, block_size, q_BQHW, k_BKGW, v_BKGW, *tokens)
    out_BQHW, lse_BHQ = _flash(spec, *args)
    return out_BQHW[:, :Q], lse_BHQ[:, :, :Q]


def blockwise_grads(q_BQHW, k_BKGW, v_BKGW, dout_BQHW, lse_BHQ, dsoft_BHQ, mask: AttentionMask, *,
                    q_positions_BQ, kv_positions_BK, q_segment_ids_BQ=None, kv_segment_ids_BK=None,
                    relative_bias_OH=None, scale: float, block_size: int = 512):
    """float32 (dq_BQHW, dk_BKGW, dv_BKGW, d relative_bias_OH or None) of attention over these keys, given each
    query row's softmax statistics over *all* of its keys (which may include keys elsewhere, as in ring
    attention): lse_BHQ and dsoft_BHQ = d(loss)/d(lse) - sum(dout * out)."""
    Q, K = q_BQHW.shape[1], k_BKGW.shape[1]
    spec, args = _blockwise_setup(mask, scale, block_size, q_BQHW, k_BKGW, v_BKGW, q_positions_BQ,
                                  kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK, relative_bias_OH)
    Qp = args[0].shape[1]
    dq, dk, dv, dbias_OH = _flash_grads(spec, *args, _pad_to(dout_BQHW, Qp, 0), _pad_to(lse_BHQ, Qp, jnp.inf, axis=2),
                                        _pad_to(dsoft_BHQ, Qp, 0, axis=2))
    return dq[:, :Q], dk[:, :K], dv[:, :K], dbias_OH


# ---------------------------------------------------------------- cudnn


def cudnn_attention(q_BQHW, k_BKGW, v_BKGW, *, causal: bool, sliding_window: int = 0, scale: float,
                    return_lse: bool = False):
    """cuDNN flash attention masked by token index; with return_lse, (out, float32 lse_BHQ).

    jax.nn.dot_product_attention(return_residual=True) rounds the statistics to q's dtype (a bf16 lse,
    spacing 1/16 near 10, would put ~1% errors into a ring's block merge), so jax's cuDNN wrapper is called
    directly for its float32 statistics when it is importable."""
    local = (sliding_window - 1, 0) if sliding_window else None
    if not return_lse:
        return jax.nn.dot_product_attention(q_BQHW, k_BKGW, v_BKGW, scale=scale, is_causal=causal,
                                            local_window_size=local, implementation="cudnn")
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
        mask_type = fused.MaskType.CAUSAL if causal else fused.MaskType.NO_MASK
        out_BQHW, lse_BHQ = fused.dot_product_attention(q_BQHW, k_BKGW, v_BKGW, scale=scale, mask_type=mask_type,
                                                        sliding_window_length=sliding_window or None,
                                                        return_residual=True)
    except (ImportError, AttributeError, TypeError):
        out_BQHW, lse_BQH = jax.nn.dot_product_attention(q_BQHW, k_BKGW, v_BKGW, scale=scale, is_causal=causal,
                                                         local_window_size=local, implementation="cudnn",
                                                         return_residual=True)
        lse_BHQ = jnp.swapaxes(lse_BQH, 1, 2)
    return out_BQHW, lse_BHQ.astype(jnp.float32)


# ---------------------------------------------------------------- entry point


def _check_shape(name, x, expected):
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)}")


def check_inputs(q_BQHW, k_BKGW, v_BKGW, mask, q_positions_BQ=None, kv_positions_BK=None, q_segment_ids_BQ=None,
                 kv_segment_ids_BK=None, *, relative_bias_OH=None, scale=None, block_size=512) -> None:
    """ValueError, naming the bad value and what would be valid, for any input no kernel can run."""
    if not isinstance(mask, AttentionMask):
        raise ValueError(f"mask must be an AttentionMask, got {type(mask).__name__}")
    for name, x in (("q_BQHW", q_BQHW), ("k_BKGW", k_BKGW), ("v_BKGW", v_BKGW)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(x.shape)}")
    B, Q, H, W = q_BQHW.shape
    _, K, G, _ = k_BKGW.shape
    if Q == 0 or K == 0:
        raise ValueError(f"empty sequence: q length {Q}, kv length {K}; both must be > 0")
    if k_BKGW.shape[0] != B or v_BKGW.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k_BKGW.shape[0]}, v {v_BKGW.shape[0]}")
    if k_BKGW.shape[3] != W:
        raise ValueError(f"head widths differ: q has {W}, k has {k_BKGW.shape[3]}")
    if tuple(v_BKGW.shape[:3]) != tuple(k_BKGW.shape[:3]):
        raise ValueError(f"v shape {tuple(v_BKGW.shape)} must match k shape {tuple(k_BKGW.shape)} in (B, K, G)")
    if G == 0 or H % G:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads G={G} (GQA/MQA)")
    mask.check_heads(H, relative_bias_OH)
    _check_shape("q_positions_BQ", q_positions_BQ, (B, Q))
    _check_shape("kv_positions_BK", kv_positions_BK, (B, K))
    if (q_segment_ids_BQ is None) != (kv_segment_ids_BK is None):
        raise ValueError("give both q_segment_ids_BQ and kv_segment_ids_BK, or neither")
    _check_shape("q_segment_ids_BQ", q_segment_ids_BQ, (B, Q))
    _check_shape("kv_segment_ids_BK", kv_segment_ids_BK, (B, K))
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    if scale is not None and not isinstance(scale, (int, float, np.number)):
        raise ValueError(f"scale={scale!r} must be a static Python number (or None for 1/sqrt(head width))")


def arange_positions(positions, batch: int, length: int):
    """int32 (batch, length) positions: arange for None; (length,) broadcast over the batch."""
    if positions is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    positions = jnp.asarray(positions)
    if positions.shape == (length,):
        positions = jnp.broadcast_to(positions, (batch, length))
    return positions.astype(jnp.int32)


def attention(q_BQHW, k_BKGW, v_BKGW, mask: AttentionMask, *, q_positions_BQ=None, kv_positions_BK=None,
              q_segment_ids_BQ=None, kv_segment_ids_BK=None, relative_bias_OH=None, scale=None, implementation="auto",
              block_size=512, return_lse=False):
    """Scaled dot-product attention; returns out_BQHW, or (out_BQHW, lse_BHQ float32) with return_lse.

    Positions default to arange, scale to 1/sqrt(W). relative_bias_OH: T5's (buckets, H) bias table, exactly
    when the mask has `relative_buckets`. `implementation` goes through `select_kernel`: "auto"
    runs cuDNN on GPU when the mask allows it and, for batches with explicit positions / segment ids,
    only for those whose layout `cudnn_layout_ok` accepts (decided at run time), else blockwise.
    """
    check_inputs(q_BQHW, k_BKGW, v_BKGW, mask, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK,
                 relative_bias_OH=relative_bias_OH, scale=scale, block_size=block_size)
    B, Q, H, W = q_BQHW.shape
    K = k_BKGW.shape[1]
    scale = 1.0 / math.sqrt(W) if scale is None else float(scale)
    tokens = (q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK)
    layout_ok = cudnn_layout_ok(*tokens) if implementation in ("cudnn", "auto") else True
    chosen = select_kernel(implementation, mask, q_BQHW.dtype, W, layout_ok=layout_ok)
    if chosen == "cudnn":
        def cudnn(q, k, v):
            return cudnn_attention(q, k, v, causal=mask.causal, sliding_window=mask.sliding_window, scale=scale,
                                   return_lse=return_lse)

        if _known(layout_ok):
            return cudnn(q_BQHW, k_BKGW, v_BKGW)
        blockwise = functools.partial(attention, mask=mask, q_positions_BQ=q_positions_BQ,
                                      kv_positions_BK=kv_positions_BK, q_segment_ids_BQ=q_segment_ids_BQ,
                                      kv_segment_ids_BK=kv_segment_ids_BK, relative_bias_OH=relative_bias_OH,
                                      scale=scale, implementation="blockwise",
                                      block_size=block_size, return_lse=return_lse)
        return lax.cond(layout_ok, cudnn, blockwise, q_BQHW, k_BKGW, v_BKGW)

    args = (q_BQHW, k_BKGW, v_BKGW, arange_positions(q_positions_BQ, B, Q), arange_positions(kv_positions_BK, B, K),
            q_segment_ids_BQ, kv_segment_ids_BK, relative_bias_OH)
    if chosen == "reference":
        out_BQHW, lse_BHQ = reference_kernel(mask, scale, *args)
    else:
        out_BQHW, lse_BHQ = _blockwise(mask, scale, block_size, *args)
    return (out_BQHW, lse_BHQ) if return_lse else out_BQHW
