"""Attention kernels behind one signature: reference (einsum), blockwise (flash-style, O(N) memory), cudnn.

All kernels take q_BQHD, k_BKGD, v_BKGD with H a multiple of G (GQA/MQA: the H query heads are viewed as
G x R groups, K/V are never repeated), build the mask from explicit positions / segment ids, add ALiBi,
and keep softmax statistics in float32. `return_lse=True` also gives lse_BHQ (natural log-sum-exp of the
scaled, biased, masked scores; -inf for fully masked rows), which ring attention uses to merge blocks.

Blockwise memory: the forward keeps per query chunk only (m, l, acc) and one (block x block) score tile per
head; the custom_vjp backward saves only (q, k, v, out, lse) and recomputes the tiles, with float32
accumulators for dq (one chunk) and dk, dv (O(K)). Peak memory is O(B * (Q + K) * H * D +
B * H * block_size^2): XLA's compiled temp memory for fwd+bwd (B=1, H=2, G=1, D=32, float32, block 512) is
about 15 MiB at 16K tokens and 49 MiB at 64K (a single dense 64K score matrix would be 16 GiB per head).
Fully masked (q-chunk, kv-block) tiles are skipped with lax.cond, so causal masks cost about half.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def allowed_mask(q_positions_BQ, kv_positions_BK, *, causal: bool, sliding_window: int, q_segment_ids_BQ=None,
                 kv_segment_ids_BK=None):
    """bool B1QK: causal (kv_pos <= q_pos), sliding window (q - kv < w causal, |q - kv| < w otherwise),
    equal segment ids."""
    qp = q_positions_BQ[:, None, :, None]
    kp = kv_positions_BK[:, None, None, :]
    ok = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
    if causal:
        ok &= kp <= qp
    if sliding_window:
        diff = qp - kp
        ok &= (diff < sliding_window) if causal else (jnp.abs(diff) < sliding_window)
    if q_segment_ids_BQ is not None:
        ok &= q_segment_ids_BQ[:, None, :, None] == kv_segment_ids_BK[:, None, None, :]
    return ok


def _alibi_bias(slopes_GR, q_positions_BQ, kv_positions_BK):
    """float32 B G R Q K: -slope_h * |q_pos - kv_pos|."""
    dist_BQK = jnp.abs(q_positions_BQ[:, :, None] - kv_positions_BK[:, None, :]).astype(jnp.float32)
    return -slopes_GR[None, :, :, None, None] * dist_BQK[:, None, None]


# ---------------------------------------------------------------- reference


def _reference(q_BQHD, k_BKGD, v_BKGD, q_pos_BQ, kv_pos_BK, q_seg_BQ, kv_seg_BK, slopes_H, *, causal,
               sliding_window, scale):
    B, Q, H, D = q_BQHD.shape
    G = k_BKGD.shape[2]
    R = H // G
    q_BQGRD = q_BQHD.astype(jnp.float32).reshape(B, Q, G, R, D)
    scores_BGRQK = jnp.einsum("bqgrd,bkgd->bgrqk", q_BQGRD, k_BKGD.astype(jnp.float32)) * scale
    if slopes_H is not None:
        scores_BGRQK += _alibi_bias(slopes_H.astype(jnp.float32).reshape(G, R), q_pos_BQ, kv_pos_BK)
    allowed_B11QK = allowed_mask(q_pos_BQ, kv_pos_BK, causal=causal, sliding_window=sliding_window,
                                 q_segment_ids_BQ=q_seg_BQ, kv_segment_ids_BK=kv_seg_BK)[:, :, None]
    scores_BGRQK = jnp.where(allowed_B11QK, scores_BGRQK, -jnp.inf)
    max_BGRQ1 = lax.stop_gradient(scores_BGRQK.max(-1, keepdims=True))
    max_BGRQ1 = jnp.where(jnp.isfinite(max_BGRQ1), max_BGRQ1, 0.0)
    exp_BGRQK = jnp.exp(scores_BGRQK - max_BGRQ1)
    sum_BGRQ1 = exp_BGRQK.sum(-1, keepdims=True)
    nonempty = sum_BGRQ1 > 0
    sum_BGRQ1 = jnp.where(nonempty, sum_BGRQ1, 1.0)
    probs_BGRQK = exp_BGRQK / sum_BGRQ1
    out_BQGRD = jnp.einsum("bgrqk,bkgd->bqgrd", probs_BGRQK, v_BKGD.astype(jnp.float32))
    lse_BGRQ = jnp.where(nonempty, max_BGRQ1 + jnp.log(sum_BGRQ1), -jnp.inf)[..., 0]
    return out_BQGRD.reshape(B, Q, H, -1).astype(q_BQHD.dtype), lse_BGRQ.reshape(B, H, Q)


# ---------------------------------------------------------------- blockwise (flash-style)


class _Spec(NamedTuple):
    causal: bool
    sliding_window: int
    scale: float
    block_q: int
    block_k: int


def _tile_logits(spec, q_BqGRD, k_BkGD, slopes_GR, qp_Bq, kp_Bk):
    s_BGRqk = jnp.einsum("bqgrd,bkgd->bgrqk", q_BqGRD, k_BkGD, preferred_element_type=jnp.float32) * spec.scale
    if slopes_GR is not None:
        s_BGRqk += _alibi_bias(slopes_GR, qp_Bq, kp_Bk)
    return s_BGRqk


def _tile_mask(spec, qp_Bq, kp_Bk, qs_Bq, ks_Bk, kvalid_Bk):
    ok_B1qk = allowed_mask(qp_Bq, kp_Bk, causal=spec.causal, sliding_window=spec.sliding_window,
                           q_segment_ids_BQ=qs_Bq, kv_segment_ids_BK=ks_Bk)
    return (ok_B1qk & kvalid_Bk[:, None, None, :])[:, :, None]  # B11qk


def full_like_inputs(shape, fill_value, *like, dtype=jnp.float32):
    """`jnp.full(shape, fill_value, dtype)` typed to vary over every mesh axis any array in `like` varies
    over (inside `shard_map(check_vma=True)`; a plain constant outside). Loop carries built this way match
    the values the loop body computes from those arrays."""
    out = jnp.full(shape, fill_value, dtype)
    for x in like:
        if x is not None:
            out = out + jnp.zeros_like(x, dtype=dtype, shape=())
    return out


def _slice(x, start, size, axis=1):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis)


def _visit_kv_block(spec, j, qp_Bq, qs_Bq, kp_BK, ks_BK, kvalid_BK, update, carry):
    """`update(carry, kp_Bk, ok_B11qk)` for kv block j of a q chunk, skipped when the mask hides the whole tile."""
    bk = spec.block_k
    kp_Bk, ks_Bk = _slice(kp_BK, j * bk, bk), _slice(ks_BK, j * bk, bk)
    ok_B11qk = _tile_mask(spec, qp_Bq, kp_Bk, qs_Bq, ks_Bk, _slice(kvalid_BK, j * bk, bk))
    return lax.cond(ok_B11qk.any(), lambda c: update(c, kp_Bk, ok_B11qk), lambda c: c, carry)


def _flash_fwd_impl(spec, q_BQHD, k_BKGD, v_BKGD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H):
    # Tie the mask inputs to q: inside a differentiated lax.scan (the model's layer scan) jax hoists work that
    # depends only on loop constants (positions, segment ids) out of the loop, which would store every
    # (q-chunk, kv-block) mask tile: quadratic memory.
    q_BQHD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H = lax.optimization_barrier(
        (q_BQHD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H))
    B, Qp, H, D = q_BQHD.shape
    Kp, G = k_BKGD.shape[1], k_BKGD.shape[2]
    R, Dv = H // G, v_BKGD.shape[-1]
    bq, bk = spec.block_q, spec.block_k
    slopes_GR = None if slopes_H is None else slopes_H.astype(jnp.float32).reshape(G, R)
    q_BQGRD = q_BQHD.reshape(B, Qp, G, R, D)
    inputs = (q_BQHD, k_BKGD, v_BKGD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H)

    def q_chunk(i):
        q_BqGRD = _slice(q_BQGRD, i * bq, bq)
        qp_Bq, qs_Bq = _slice(qp_BQ, i * bq, bq), _slice(qs_BQ, i * bq, bq)

        def kv_step(carry, j):
            def update(carry, kp_Bk, ok_B11qk):
                m_BGRq, l_BGRq, acc_BGRqD = carry
                k_BkGD, v_BkGD = _slice(k_BKGD, j * bk, bk), _slice(v_BKGD, j * bk, bk)
                s_BGRqk = _tile_logits(spec, q_BqGRD, k_BkGD, slopes_GR, qp_Bq, kp_Bk)
                s_BGRqk = jnp.where(ok_B11qk, s_BGRqk, -jnp.inf)
                m_new = jnp.maximum(m_BGRq, s_BGRqk.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                corr_BGRq = jnp.exp(m_BGRq - m_safe)
                p_BGRqk = jnp.exp(s_BGRqk - m_safe[..., None])
                l_BGRq = l_BGRq * corr_BGRq + p_BGRqk.sum(-1)
                pv_BGRqD = jnp.einsum("bgrqk,bkgd->bgrqd", p_BGRqk.astype(v_BkGD.dtype), v_BkGD,
                                      preferred_element_type=jnp.float32)
                return m_new, l_BGRq, acc_BGRqD * corr_BGRq[..., None] + pv_BGRqD

            return _visit_kv_block(spec, j, qp_Bq, qs_Bq, kp_BK, ks_BK, kvalid_BK, update, carry), None

        init = (full_like_inputs((B, G, R, bq), -jnp.inf, *inputs), full_like_inputs((B, G, R, bq), 0.0, *inputs),
                full_like_inputs((B, G, R, bq, Dv), 0.0, *inputs))
        (m_BGRq, l_BGRq, acc_BGRqD), _ = lax.scan(kv_step, init, jnp.arange(Kp // bk))
        nonempty = l_BGRq > 0
        l_safe = jnp.where(nonempty, l_BGRq, 1.0)
        out_BqHD = jnp.einsum("bgrqd->bqgrd", acc_BGRqD / l_safe[..., None]).reshape(B, bq, H, Dv)
        lse_BHq = jnp.where(nonempty, jnp.where(jnp.isfinite(m_BGRq), m_BGRq, 0.0) + jnp.log(l_safe), -jnp.inf)
        return out_BqHD.astype(q_BQHD.dtype), lse_BHq.reshape(B, H, bq)

    out_nBqHD, lse_nBHq = lax.map(q_chunk, jnp.arange(Qp // bq))
    out_BQHD = jnp.moveaxis(out_nBqHD, 0, 1).reshape(B, Qp, H, Dv)
    lse_BHQ = jnp.moveaxis(lse_nBHq, 0, 2).reshape(B, H, Qp)
    return out_BQHD, lse_BHQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q_BQHD, k_BKGD, v_BKGD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H):
    return _flash_fwd_impl(spec, q_BQHD, k_BKGD, v_BKGD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H)


def _flash_fwd(spec, *args):
    out_BQHD, lse_BHQ = _flash_fwd_impl(spec, *args)
    return (out_BQHD, lse_BHQ), (args, out_BQHD, lse_BHQ)


def _flash_bwd(spec, residuals, cotangents):
    (q_BQHD, k_BKGD, v_BKGD, qp_BQ, kp_BK, qs_BQ, ks_BK, kvalid_BK, slopes_H), out_BQHD, lse_BHQ = residuals
    dout_BQHD, dlse_BHQ = cotangents
    B, Qp, H, D = q_BQHD.shape
    Kp, G = k_BKGD.shape[1], k_BKGD.shape[2]
    R, Dv = H // G, v_BKGD.shape[-1]
    bq, bk = spec.block_q, spec.block_k
    slopes_GR = None if slopes_H is None else slopes_H.astype(jnp.float32).reshape(G, R)
    q_BQGRD = q_BQHD.reshape(B, Qp, G, R, D)
    dout_BQGRD = dout_BQHD.reshape(B, Qp, G, R, Dv)
    delta_BGRQ = jnp.einsum("bqhd,bqhd->bhq", dout_BQHD.astype(jnp.float32),
                            out_BQHD.astype(jnp.float32)).reshape(B, G, R, Qp)
    lse_BGRQ = lse_BHQ.reshape(B, G, R, Qp)
    lse_BGRQ = jnp.where(jnp.isfinite(lse_BGRQ), lse_BGRQ, 0.0)
    dlse_BGRQ = dlse_BHQ.astype(jnp.float32).reshape(B, G, R, Qp)
    inputs = (*residuals[0], out_BQHD, lse_BHQ, dout_BQHD, dlse_BHQ)

    def q_chunk(dkv, i):
        q_BqGRD, dout_BqGRD = _slice(q_BQGRD, i * bq, bq), _slice(dout_BQGRD, i * bq, bq)
        qp_Bq, qs_Bq = _slice(qp_BQ, i * bq, bq), _slice(qs_BQ, i * bq, bq)
        lse_BGRq = _slice(lse_BGRQ, i * bq, bq, axis=3)
        dsoft_BGRq = _slice(dlse_BGRQ, i * bq, bq, axis=3) - _slice(delta_BGRQ, i * bq, bq, axis=3)

        def kv_step(carry, j):
            def update(carry, kp_Bk, ok_B11qk):
                dq_BqGRD, dk_BKGD, dv_BKGD = carry
                k_BkGD, v_BkGD = _slice(k_BKGD, j * bk, bk), _slice(v_BKGD, j * bk, bk)
                s_BGRqk = _tile_logits(spec, q_BqGRD, k_BkGD, slopes_GR, qp_Bq, kp_Bk)
                p_BGRqk = jnp.exp(jnp.where(ok_B11qk, s_BGRqk, -jnp.inf) - lse_BGRq[..., None])
                dv_BkGD = jnp.einsum("bgrqk,bqgrd->bkgd", p_BGRqk.astype(dout_BqGRD.dtype), dout_BqGRD,
                                     preferred_element_type=jnp.float32)
                dp_BGRqk = jnp.einsum("bqgrd,bkgd->bgrqk", dout_BqGRD, v_BkGD, preferred_element_type=jnp.float32)
                ds_BGRqk = p_BGRqk * (dp_BGRqk + dsoft_BGRq[..., None]) * spec.scale
                ds_BGRqk = ds_BGRqk.astype(q_BqGRD.dtype)
                dq_BqGRD = dq_BqGRD + jnp.einsum("bgrqk,bkgd->bqgrd", ds_BGRqk, k_BkGD,
                                                 preferred_element_type=jnp.float32)
                dk_BkGD = jnp.einsum("bgrqk,bqgrd->bkgd", ds_BGRqk, q_BqGRD, preferred_element_type=jnp.float32)
                dk_BKGD = lax.dynamic_update_slice_in_dim(dk_BKGD, _slice(dk_BKGD, j * bk, bk) + dk_BkGD, j * bk, 1)
                dv_BKGD = lax.dynamic_update_slice_in_dim(dv_BKGD, _slice(dv_BKGD, j * bk, bk) + dv_BkGD, j * bk, 1)
                return dq_BqGRD, dk_BKGD, dv_BKGD

            return _visit_kv_block(spec, j, qp_Bq, qs_Bq, kp_BK, ks_BK, kvalid_BK, update, carry), None

        init = (full_like_inputs((B, bq, G, R, D), 0.0, *inputs), *dkv)
        (dq_BqGRD, dk_BKGD, dv_BKGD), _ = lax.scan(kv_step, init, jnp.arange(Kp // bk))
        return (dk_BKGD, dv_BKGD), dq_BqGRD.reshape(B, bq, H, D).astype(q_BQHD.dtype)

    dkv_init = (full_like_inputs((B, Kp, G, D), 0.0, *inputs), full_like_inputs((B, Kp, G, Dv), 0.0, *inputs))
    (dk_BKGD, dv_BKGD), dq_nBqHD = lax.scan(q_chunk, dkv_init, jnp.arange(Qp // bq))
    dq_BQHD = jnp.moveaxis(dq_nBqHD, 0, 1).reshape(B, Qp, H, D)
    return (dq_BQHD, dk_BKGD.astype(k_BKGD.dtype), dv_BKGD.astype(v_BKGD.dtype), None, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, length, value, axis=1):
    if x is None or x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _blockwise(q_BQHD, k_BKGD, v_BKGD, q_pos_BQ, kv_pos_BK, q_seg_BQ, kv_seg_BK, slopes_H, *, causal,
               sliding_window, scale, block_size):
    B, Q = q_BQHD.shape[:2]
    K = k_BKGD.shape[1]
    bq, bk = min(block_size, Q), min(block_size, K)
    Qp, Kp = -(-Q // bq) * bq, -(-K // bk) * bk
    kvalid_BK = _pad_to(jnp.ones((B, K), bool), Kp, False)
    spec = _Spec(bool(causal), int(sliding_window), float(scale), bq, bk)
    out_BQHD, lse_BHQ = _flash(spec, _pad_to(q_BQHD, Qp, 0), _pad_to(k_BKGD, Kp, 0), _pad_to(v_BKGD, Kp, 0),
                               _pad_to(q_pos_BQ, Qp, 0), _pad_to(kv_pos_BK, Kp, 0), _pad_to(q_seg_BQ, Qp, 0),
                               _pad_to(kv_seg_BK, Kp, 0), kvalid_BK, slopes_H)
    return out_BQHD[:, :Q], lse_BHQ[:, :, :Q]


# ---------------------------------------------------------------- cudnn


def cudnn_layout_ok(q_positions_BQ=None, kv_positions_BK=None, q_segment_ids_BQ=None, kv_segment_ids_BK=None):
    """Whether the position / segment mask equals cuDNN's index-based one: positions are arange plus one
    offset per row (shared by q and kv) and every q and kv token of a row is in the same segment.

    Python True when all are None; otherwise a scalar bool array (traced inside jit, where `attention`
    branches on it at run time). An unpacked causal LM batch (positions arange, segment ids all equal) is True.
    """
    ok = True
    if q_positions_BQ is not None or kv_positions_BK is not None:
        q_pos, kv_pos = q_positions_BQ, kv_positions_BK
        base = q_pos[:, :1] if q_pos is not None and kv_pos is not None else 0  # a missing side is arange
        for pos in (q_pos, kv_pos):
            if pos is not None:
                ok = ok & jnp.all(pos - base == jnp.arange(pos.shape[1], dtype=pos.dtype))
    if q_segment_ids_BQ is not None:
        first = q_segment_ids_BQ[:, :1]
        ok = ok & jnp.all(q_segment_ids_BQ == first) & jnp.all(kv_segment_ids_BK == first)
    return ok


def cudnn_unsupported(q_BQHD, k_BKGD, v_BKGD, *, causal, sliding_window=0, alibi_slopes_H=None,
                      platform=None) -> str | None:
    """Why jax.nn.dot_product_attention(implementation='cudnn') cannot run these options, or None.
    `platform` defaults to jax.default_backend(); positions and segment ids are judged by `cudnn_layout_ok`."""
    platform = jax.default_backend() if platform is None else platform
    if platform != "gpu":
        return f"it needs a GPU, but the JAX platform is {platform!r}"
    if jnp.dtype(q_BQHD.dtype) not in _CUDNN_DTYPES:
        return f"it needs bfloat16 or float16 inputs, got {q_BQHD.dtype}"
    if not q_BQHD.dtype == k_BKGD.dtype == v_BKGD.dtype:
        return f"q, k, v dtypes differ ({q_BQHD.dtype}, {k_BKGD.dtype}, {v_BKGD.dtype})"
    if alibi_slopes_H is not None:
        return "it cannot add ALiBi biases (alibi_slopes_H)"
    if sliding_window and not causal:
        return f"it has no bidirectional sliding window (sliding_window={sliding_window}, causal=False)"
    return None


def _known(flag) -> bool | None:
    """A bool flag's value, or None while it is traced (its value is only known at run time)."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return None


def choose_implementation(implementation, q_BQHD, k_BKGD, v_BKGD, *, causal=True, sliding_window=0,
                          alibi_slopes_H=None, layout_ok=True, platform=None) -> str:
    """The kernel `attention` runs: "reference", "blockwise" or "cudnn".

    "auto" picks cudnn when `cudnn_unsupported` finds no problem, the head dim is a multiple of 8 up to 128
    and `layout_ok` (from `cudnn_layout_ok`) is not False; for a traced `layout_ok` it answers "cudnn" and
    `attention` falls back to blockwise at run time when the actual layout is not ok. An explicit "cudnn"
    raises a ValueError naming the problem (it needs a layout known to be ok). `platform` defaults to
    jax.default_backend().
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
    if implementation in ("reference", "blockwise"):
        return implementation
    problem = cudnn_unsupported(q_BQHD, k_BKGD, v_BKGD, causal=causal, sliding_window=sliding_window,
                                alibi_slopes_H=alibi_slopes_H, platform=platform)
    if implementation == "cudnn":
        if problem is None and _known(layout_ok) is not True:
            problem = ("it masks by token index, and the given position ids / segment ids are not (known to be) "
                       "arange in one segment (implementation='auto' checks them at run time)")
        if problem is not None:
            raise ValueError(f"implementation='cudnn' is unavailable: {problem}; "
                             "use implementation='blockwise' or 'reference'")
        return "cudnn"
    D = q_BQHD.shape[-1]
    if problem is not None or D % 8 or D > 128:
        return "blockwise"
    return "blockwise" if _known(layout_ok) is False else "cudnn"


def _cudnn(q_BQHD, k_BKGD, v_BKGD, *, causal, sliding_window, scale, return_lse):
    local = (sliding_window - 1, 0) if sliding_window else None
    result = jax.nn.dot_product_attention(q_BQHD, k_BKGD, v_BKGD, scale=scale, is_causal=causal,
                                          local_window_size=local, implementation="cudnn",
                                          return_residual=return_lse)
    if not return_lse:
        return result, None
    out_BQHD, lse_BQH = result
    return out_BQHD, jnp.swapaxes(lse_BQH, 1, 2).astype(jnp.float32)


# ---------------------------------------------------------------- entry point


def _check_shape(name, x, expected):
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)}")


def _validate(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sliding_window, slopes, scale, implementation, block_size):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {', '.join(map(repr, IMPLEMENTATIONS))}")
    for name, x in (("q_BQHD", q), ("k_BKGD", k), ("v_BKGD", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(x.shape)}")
    B, Q, H, D = q.shape
    _, K, G, _ = k.shape
    if Q == 0 or K == 0:
        raise ValueError(f"empty sequence: q length {Q}, kv length {K}; both must be > 0")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has {D}, k has {k.shape[3]}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v shape {tuple(v.shape)} must match k shape {tuple(k.shape)} in (B, K, G)")
    if G == 0 or H % G:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads G={G} (GQA/MQA)")
    _check_shape("q_positions_BQ", q_pos, (B, Q))
    _check_shape("kv_positions_BK", kv_pos, (B, K))
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("give both q_segment_ids_BQ and kv_segment_ids_BK, or neither")
    _check_shape("q_segment_ids_BQ", q_seg, (B, Q))
    _check_shape("kv_segment_ids_BK", kv_seg, (B, K))
    if slopes is not None and tuple(jnp.shape(slopes)) != (H,):
        raise ValueError(f"alibi_slopes_H has shape {tuple(jnp.shape(slopes))}; expected ({H},)")
    if not isinstance(sliding_window, (int, np.integer)) or sliding_window < 0:
        raise ValueError(f"sliding_window={sliding_window!r} must be an integer >= 0 (0: no window)")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    if scale is not None and not isinstance(scale, (int, float, np.number)):
        raise ValueError(f"scale={scale!r} must be a static Python number (or None for 1/sqrt(head dim))")


def attention(q_BQHD, k_BKGD, v_BKGD, *, causal=True, q_positions_BQ=None, kv_positions_BK=None,
              q_segment_ids_BQ=None, kv_segment_ids_BK=None, sliding_window=0, alibi_slopes_H=None, scale=None,
              implementation="auto", block_size=512, return_lse=False):
    """Scaled dot-product attention; returns out_BQHD, or (out_BQHD, lse_BHQ float32) with return_lse.

    Positions default to arange; scale to 1/sqrt(D). Fully masked query rows give out 0 and lse -inf.
    implementation: "reference" | "blockwise" | "cudnn" | "auto" (`choose_implementation`: cudnn on GPU when
    the options allow it, else blockwise; with explicit positions / segment ids, cudnn for rows whose layout
    `cudnn_layout_ok` accepts, decided at run time, so unpacked training batches use cuDNN).
    """
    _validate(q_BQHD, k_BKGD, v_BKGD, q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK,
              sliding_window, alibi_slopes_H, scale, implementation, block_size)
    B, Q, H, D = q_BQHD.shape
    K = k_BKGD.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    layout_ok = True
    if implementation in ("cudnn", "auto"):
        layout_ok = cudnn_layout_ok(q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK)
    chosen = choose_implementation(implementation, q_BQHD, k_BKGD, v_BKGD, causal=causal,
                                   sliding_window=sliding_window, alibi_slopes_H=alibi_slopes_H, layout_ok=layout_ok)
    if chosen == "cudnn":
        def cudnn(q, k, v):
            out, lse = _cudnn(q, k, v, causal=causal, sliding_window=sliding_window, scale=scale,
                              return_lse=return_lse)
            return (out, lse) if return_lse else out

        if _known(layout_ok):
            return cudnn(q_BQHD, k_BKGD, v_BKGD)
        blockwise = functools.partial(
            attention, causal=causal, q_positions_BQ=q_positions_BQ, kv_positions_BK=kv_positions_BK,
            q_segment_ids_BQ=q_segment_ids_BQ, kv_segment_ids_BK=kv_segment_ids_BK, sliding_window=sliding_window,
            scale=scale, implementation="blockwise", block_size=block_size, return_lse=return_lse)
        return lax.cond(layout_ok, cudnn, blockwise, q_BQHD, k_BKGD, v_BKGD)

    q_pos_BQ = jnp.broadcast_to(jnp.arange(Q, dtype=jnp.int32), (B, Q)) if q_positions_BQ is None else q_positions_BQ
    kv_pos_BK = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K)) if kv_positions_BK is None else kv_positions_BK
    slopes_H = None if alibi_slopes_H is None else jnp.asarray(alibi_slopes_H, jnp.float32)
    args = (q_BQHD, k_BKGD, v_BKGD, q_pos_BQ, kv_pos_BK, q_segment_ids_BQ, kv_segment_ids_BK, slopes_H)
    if chosen == "reference":
        out_BQHD, lse_BHQ = _reference(*args, causal=causal, sliding_window=sliding_window, scale=scale)
    else:
        out_BQHD, lse_BHQ = _blockwise(*args, causal=causal, sliding_window=sliding_window, scale=scale,
                                       block_size=block_size)
    return (out_BQHD, lse_BHQ) if return_lse else out_BQHD
