"""Attention kernels against an independent float64 NumPy reference; blockwise gradients against jax.grad of
the reference; masking, causality, entropy and O(N)-memory properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.ops.attention import IMPLEMENTATIONS, allowed_mask, attention
from transformer.ops.positions import alibi_slopes

BLOCK = 8  # lengths below are not multiples of it, so padding and several blocks are always exercised
# tiny test programs: skip LLVM optimisation, compile time dominates on the shared CPU
jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_llvm_disable_expensive_passes=True))


def np_attention(q, k, v, *, causal, q_pos=None, kv_pos=None, q_seg=None, kv_seg=None, window=0, slopes=None,
                 scale=None):
    """Loop-based float64 attention: returns out BQHD and lse BHQ (-inf and zero output for empty rows)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Q, H, D = q.shape
    K, G = k.shape[1], k.shape[2]
    q_pos = np.tile(np.arange(Q), (B, 1)) if q_pos is None else np.asarray(q_pos)
    kv_pos = np.tile(np.arange(K), (B, 1)) if kv_pos is None else np.asarray(kv_pos)
    scale = 1 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, Q, H, v.shape[-1]))
    lse = np.full((B, H, Q), -np.inf)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for i in range(Q):
                logits, values = [], []
                for j in range(K):
                    dist = q_pos[b, i] - kv_pos[b, j]
                    if causal and dist < 0:
                        continue
                    if window and (dist >= window if causal else abs(dist) >= window):
                        continue
                    if q_seg is not None and q_seg[b, i] != kv_seg[b, j]:
                        continue
                    logit = scale * q[b, i, h] @ k[b, j, g]
                    if slopes is not None:
                        logit -= slopes[h] * abs(dist)
                    logits.append(logit)
                    values.append(v[b, j, g])
                if logits:
                    logits = np.array(logits)
                    top = logits.max()
                    lse[b, h, i] = top + np.log(np.exp(logits - top).sum())
                    out[b, i, h] = np.exp(logits - lse[b, h, i]) @ np.array(values)
    return out, lse


def random_qkv(seed, B=2, Q=19, K=19, H=4, G=2, D=8):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, Q, H, D)).astype(np.float32), rng.normal(size=(B, K, G, D)).astype(np.float32),
            rng.normal(size=(B, K, G, D)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def value_and_grads(implementation, block_size=BLOCK, **static):
    """jit: (q, k, v, arrays) -> ((out, lse), (dq, dk, dv)) of a loss using both out and lse."""

    def loss(q, k, v, arrays):
        out, lse = attention(q, k, v, implementation=implementation, block_size=block_size, return_lse=True,
                             **static, **arrays)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(out * weights) + 0.5 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jit(lambda q, k, v, arrays: grad_fn(q, k, v, arrays)[::-1])


def _positions(B, L, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(L) for _ in range(B)]).astype(np.int32)


def _segments(B, L):
    cuts = [np.sort(np.random.default_rng(b).choice(np.arange(1, L), 2, replace=False)) for b in range(B)]
    return np.stack([np.searchsorted(c, np.arange(L), side="right") for c in cuts]).astype(np.int32)


CASES = {
    "mqa": dict(shape=dict(H=4, G=1), static=dict(causal=True)),
    "window_causal": dict(shape=dict(), static=dict(causal=True, sliding_window=5)),
    "window_bidirectional_alibi": dict(shape=dict(H=6, G=3), static=dict(causal=False, sliding_window=6),
                                       arrays=lambda B, Q, K: dict(alibi_slopes_H=alibi_slopes(6))),
    "cross_bidirectional_gqa": dict(shape=dict(Q=13, K=29, H=4, G=2), static=dict(causal=False)),
    "cross_causal_mha_positions": dict(
        shape=dict(Q=11, K=21, H=2, G=2), static=dict(causal=True),
        arrays=lambda B, Q, K: dict(q_positions_BQ=np.tile(np.arange(10, 10 + Q), (B, 1)))),
    "segments": dict(shape=dict(), static=dict(causal=True),
                     arrays=lambda B, Q, K: dict(q_segment_ids_BQ=_segments(B, Q), kv_segment_ids_BK=_segments(B, K))),
    "alibi": dict(shape=dict(H=4, G=2), static=dict(causal=True),
                  arrays=lambda B, Q, K: dict(alibi_slopes_H=alibi_slopes(4))),
    "permuted_positions": dict(shape=dict(), static=dict(causal=True),
                               arrays=lambda B, Q, K: dict(q_positions_BQ=_positions(B, Q, 1),
                                                           kv_positions_BK=_positions(B, Q, 1))),
}


def _case(name):
    case = CASES[name]
    shape = dict(B=2, Q=19, K=19, H=4, G=2, D=8) | case["shape"]
    q, k, v = random_qkv(sum(map(ord, name)), **shape)
    arrays = case.get("arrays", lambda B, Q, K: {})(shape["B"], shape["Q"], shape["K"])
    return q, k, v, case["static"], {n: jnp.asarray(a) for n, a in arrays.items()}


def _np_kwargs(static, arrays):
    a = {n: np.asarray(x) for n, x in arrays.items()}
    return dict(causal=static["causal"], window=static.get("sliding_window", 0), q_pos=a.get("q_positions_BQ"),
                kv_pos=a.get("kv_positions_BK"), q_seg=a.get("q_segment_ids_BQ"), kv_seg=a.get("kv_segment_ids_BK"),
                slopes=a.get("alibi_slopes_H"))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_and_gradients_match_reference(name):
    q, k, v, static, arrays = _case(name)
    want_out, want_lse = np_attention(q, k, v, **_np_kwargs(static, arrays))
    frozen = tuple(sorted(static.items()))
    results = {impl: value_and_grads(impl, **dict(frozen))(q, k, v, arrays) for impl in ("reference", "blockwise")}
    for impl, ((out, lse), grads) in results.items():
        np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-5, err_msg=f"{impl} out")
        np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse), err_msg=f"{impl} lse -inf pattern")
        finite = np.isfinite(want_lse)
        np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=2e-5, rtol=1e-5,
                                   err_msg=f"{impl} lse")
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), impl
    for name_, g_ref, g_blk in zip("qkv", results["reference"][1], results["blockwise"][1]):
        assert float(jnp.abs(g_ref).max()) > 1e-3
        np.testing.assert_allclose(g_blk, g_ref, atol=3e-5, rtol=1e-4, err_msg=f"d{name_}")


def test_single_block_default_block_size_and_bfloat16():
    q, k, v = random_qkv(3)
    want, _ = np_attention(q, k, v, causal=True)
    out = jit(functools.partial(attention, implementation="blockwise"))(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    for impl in ("reference", "blockwise"):
        out = jit(functools.partial(attention, implementation=impl, block_size=BLOCK))(*bf)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-2, rtol=5e-2, err_msg=impl)


def test_auto_on_cpu_is_blockwise():
    q, k, v = map(jnp.asarray, random_qkv(4))
    out = attention(q, k, v, implementation="auto", block_size=BLOCK)
    np.testing.assert_array_equal(out, attention(q, k, v, implementation="blockwise", block_size=BLOCK))


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_causality_by_gradient(implementation):
    q, k, v = map(jnp.asarray, random_qkv(5, B=1, Q=19, K=19))
    i = 6

    def row_sum(k, v):
        return jnp.sum(attention(q, k, v, implementation=implementation, block_size=BLOCK)[:, i] ** 2)

    dk, dv = jit(jax.grad(row_sum, argnums=(0, 1)))(k, v)
    assert np.all(np.asarray(dk[:, i + 1:]) == 0) and np.all(np.asarray(dv[:, i + 1:]) == 0)
    assert np.all(np.abs(np.asarray(dk[:, : i + 1])).sum(axis=(0, 2, 3)) > 0)


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_fully_masked_rows_give_zero_output_and_finite_grads(implementation):
    q, k, v = random_qkv(6, B=2, Q=19, K=19)
    q_seg = np.zeros((2, 19), np.int32)
    q_seg[:, 3:7] = 9  # no key has segment 9
    kv_seg = np.zeros((2, 19), np.int32)
    q_pos = np.tile(np.arange(19), (2, 1))
    kv_pos = q_pos + 3  # with causal masking, queries 0..2 see no key
    arrays = dict(q_segment_ids_BQ=q_seg, kv_segment_ids_BK=kv_seg, q_positions_BQ=q_pos, kv_positions_BK=kv_pos)
    (out, lse), grads = value_and_grads(implementation, causal=True)(q, k, v, {n: jnp.asarray(a)
                                                                                for n, a in arrays.items()})
    empty = np.zeros(19, bool)
    empty[[0, 1, 2, 3, 4, 5, 6]] = True
    assert np.all(np.asarray(out)[:, empty] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, empty]))
    assert np.all(np.isfinite(np.asarray(lse)[:, :, ~empty]))
    want, _ = np_attention(q, k, v, causal=True, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0])[:, empty] == 0)


def _mean_normalized_entropy(scale):
    """Attention probabilities via one-hot values (out = probs), entropy / log(K) averaged over rows."""
    L, D = 64, 32
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.normal(size=(1, L, 2, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, L, 2, D)), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(L, dtype=jnp.float32)[None, :, None, :], (1, L, 2, L))
    run = jit(functools.partial(attention, causal=False, scale=scale, implementation="blockwise", block_size=16))
    probs = np.asarray(run(q, k, v))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(-1)
    return float(entropy.mean() / np.log(L))


def test_attention_entropy_not_collapsed_with_inverse_sqrt_scale():
    scaled = _mean_normalized_entropy(scale=None)
    unscaled = _mean_normalized_entropy(scale=1.0)
    assert scaled > 0.8, scaled
    assert unscaled < 0.6, unscaled


def test_allowed_mask_shape_and_rules():
    pos = jnp.arange(6)[None]
    mask = np.asarray(allowed_mask(pos, pos, causal=True, sliding_window=2))
    assert mask.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(mask[0, 0], np.tri(6, dtype=bool) & ~np.tri(6, k=-2, dtype=bool))
    mask = np.asarray(allowed_mask(pos, pos, causal=False, sliding_window=2))
    np.testing.assert_array_equal(mask[0, 0], np.abs(np.arange(6)[:, None] - np.arange(6)[None]) < 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=((2, 5, 6, 8), (2, 5, 4, 8))), "H=6.*G=4"),
    (dict(shapes=((2, 5, 4, 8), (3, 5, 2, 8))), "batch"),
    (dict(shapes=((2, 5, 4, 8), (2, 5, 2, 16))), "head dims differ.*8.*16"),
    (dict(implementation="flash3"), "'flash3'.*'reference'"),
    (dict(q_positions_BQ=np.zeros((2, 4), np.int32)), r"q_positions_BQ.*\(2, 4\).*\(2, 5\)"),
    (dict(kv_positions_BK=np.zeros((5,), np.int32)), r"kv_positions_BK.*\(5,\)"),
    (dict(q_segment_ids_BQ=np.zeros((2, 5), np.int32)), "kv_segment_ids_BK"),
    (dict(alibi_slopes_H=np.ones(3, np.float32)), r"alibi_slopes_H.*\(3,\).*\(4,\)"),
    (dict(sliding_window=-1), "sliding_window=-1"),
    (dict(block_size=0), "block_size=0"),
    (dict(implementation="cudnn"), "cudnn.*GPU"),
    (dict(shapes=((2, 0, 4, 8), (2, 5, 2, 8))), "q length 0"),
    (dict(scale=jnp.ones(())), "scale=.*static Python number"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    q_shape, k_shape = kwargs.pop("shapes", ((2, 5, 4, 8), (2, 5, 2, 8)))
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, **kwargs)


def test_implementations_listed():
    assert set(IMPLEMENTATIONS) == {"auto", "reference", "blockwise", "cudnn"}


@pytest.mark.slow
def test_blockwise_fwd_bwd_memory_is_linear_at_long_lengths():
    """Compiled temp memory of blockwise fwd+bwd grows linearly (16K -> 64K tokens) and stays far below a
    single dense score matrix; the reference's grows quadratically (the measurement can see it). Then 16K
    tokens are actually run and the last rows checked against float64 NumPy."""

    def grad_fn(impl):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, implementation=impl, block_size=512) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def temp_bytes(impl, n):
        q = jax.ShapeDtypeStruct((1, n, 2, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, n, 1, 32), jnp.float32)
        return grad_fn(impl).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    blk = {n: temp_bytes("blockwise", n) for n in (16384, 65536)}
    dense_scores_64k = 2 * 65536**2 * 4
    assert blk[65536] < 6 * blk[16384], blk
    assert blk[65536] < 512 * 2**20 and blk[65536] < dense_scores_64k / 100, blk
    ref = {n: temp_bytes("reference", n) for n in (1024, 2048)}
    assert ref[2048] > 3 * ref[1024], ref

    n = 16384
    q, k, v = random_qkv(9, B=1, Q=n, K=n, H=2, G=1, D=32)
    dq, dk, dv = grad_fn("blockwise")(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
    out = np.asarray(attention(*map(jnp.asarray, (q, k, v)), implementation="blockwise"))
    tail = 3
    scores = np.einsum("qhd,kd->hqk", q[0, -tail:].astype(np.float64), k[0, :, 0].astype(np.float64)) / np.sqrt(32)
    scores = np.where(np.arange(n)[None, None, :] <= np.arange(n - tail, n)[None, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("hqk,kd->qhd", probs / probs.sum(-1, keepdims=True), v[0, :, 0].astype(np.float64))
    np.testing.assert_allclose(out[0, -tail:], want, atol=2e-5, rtol=1e-4)
