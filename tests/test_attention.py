"""Attention kernels against an independent float64 NumPy reference; blockwise gradients against jax.grad of
the reference; masking, causality, entropy and O(N)-memory properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_oracle import np_attention
from transformer.ops.attention import KERNELS, attention, cudnn_layout_ok, select_kernel
from transformer.ops.mask import AttentionMask
from transformer.ops.positions import alibi_slopes

BLOCK = 8  # lengths below are not multiples of it, so padding and several blocks are always exercised
# tiny test programs: skip LLVM optimisation, compile time dominates on the shared CPU
jit = functools.partial(jax.jit, compiler_options=dict(xla_backend_optimization_level=0,
                                                       xla_llvm_disable_expensive_passes=True))
CAUSAL = AttentionMask(causal=True)


def random_qkv(seed, B=2, Q=19, K=19, H=4, G=2, D=8):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, Q, H, D)).astype(np.float32), rng.normal(size=(B, K, G, D)).astype(np.float32),
            rng.normal(size=(B, K, G, D)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def value_and_grads(implementation, mask, block_size=BLOCK):
    """jit: (q, k, v, arrays) -> ((out, lse), (dq, dk, dv)) of a loss using both out and lse."""

    def loss(q, k, v, arrays):
        out, lse = attention(q, k, v, mask, implementation=implementation, block_size=block_size, return_lse=True,
                             **arrays)
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


def _prefix_documents(B, L):
    """Packed documents whose positions restart at each one, so each gets its own prefix."""
    seg = _segments(B, L)
    starts = np.stack([np.maximum.accumulate(np.where(np.diff(row, prepend=-1) != 0, np.arange(L), 0)) for row in seg])
    return dict(q_positions_BQ=np.arange(L) - starts, kv_positions_BK=np.arange(L) - starts, q_segment_ids_BQ=seg,
                kv_segment_ids_BK=seg)


CASES = {
    "mqa": dict(shape=dict(H=4, G=1), mask=CAUSAL),
    "window_causal": dict(shape=dict(), mask=AttentionMask(causal=True, sliding_window=5)),
    "window_bidirectional_alibi": dict(shape=dict(H=6, G=3),
                                       mask=AttentionMask(causal=False, sliding_window=6, alibi_slopes=alibi_slopes(6))),
    "cross_bidirectional_gqa": dict(shape=dict(Q=13, K=29, H=4, G=2), mask=AttentionMask(causal=False)),
    "cross_causal_mha_positions": dict(
        shape=dict(Q=11, K=21, H=2, G=2), mask=CAUSAL,
        arrays=lambda B, Q, K: dict(q_positions_BQ=np.tile(np.arange(10, 10 + Q), (B, 1)))),
    "segments": dict(shape=dict(), mask=CAUSAL,
                     arrays=lambda B, Q, K: dict(q_segment_ids_BQ=_segments(B, Q), kv_segment_ids_BK=_segments(B, K))),
    "alibi": dict(shape=dict(H=4, G=2), mask=AttentionMask(causal=True, alibi_slopes=alibi_slopes(4))),
    "permuted_positions": dict(shape=dict(), mask=CAUSAL,
                               arrays=lambda B, Q, K: dict(q_positions_BQ=_positions(B, Q, 1),
                                                           kv_positions_BK=_positions(B, Q, 1))),
    "prefix_lm": dict(shape=dict(), mask=AttentionMask(causal=True, prefix_length=7)),
    "prefix_lm_packed_window_alibi_permuted": dict(
        shape=dict(H=4, G=1), mask=AttentionMask(causal=True, prefix_length=4, sliding_window=9,
                                                 alibi_slopes=alibi_slopes(4)),
        arrays=lambda B, Q, K: {n: x[:, np.random.default_rng(2).permutation(Q)]
                                for n, x in _prefix_documents(B, Q).items()}),
}


def _case(name):
    case = CASES[name]
    shape = dict(B=2, Q=19, K=19, H=4, G=2, D=8) | case["shape"]
    q, k, v = random_qkv(sum(map(ord, name)), **shape)
    arrays = case.get("arrays", lambda B, Q, K: {})(shape["B"], shape["Q"], shape["K"])
    return q, k, v, case["mask"], {n: jnp.asarray(a) for n, a in arrays.items()}


def _np_kwargs(mask, arrays):
    a = {n: np.asarray(x) for n, x in arrays.items()}
    return dict(causal=mask.causal, window=mask.sliding_window, prefix=mask.prefix_length, slopes=mask.alibi_slopes,
                q_pos=a.get("q_positions_BQ"), kv_pos=a.get("kv_positions_BK"), q_seg=a.get("q_segment_ids_BQ"),
                kv_seg=a.get("kv_segment_ids_BK"))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_and_gradients_match_reference(name):
    q, k, v, mask, arrays = _case(name)
    want_out, want_lse = np_attention(q, k, v, **_np_kwargs(mask, arrays))
    results = {impl: value_and_grads(impl, mask)(q, k, v, arrays) for impl in ("reference", "blockwise")}
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
    out = jit(functools.partial(attention, mask=CAUSAL, implementation="blockwise"))(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    for impl in ("reference", "blockwise"):
        out = jit(functools.partial(attention, mask=CAUSAL, implementation=impl, block_size=BLOCK))(*bf)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-2, rtol=5e-2, err_msg=impl)


def test_auto_on_cpu_is_blockwise():
    q, k, v = map(jnp.asarray, random_qkv(4))
    out = attention(q, k, v, CAUSAL, implementation="auto", block_size=BLOCK)
    np.testing.assert_array_equal(out, attention(q, k, v, CAUSAL, implementation="blockwise", block_size=BLOCK))


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_causality_by_gradient(implementation):
    q, k, v = map(jnp.asarray, random_qkv(5, B=1, Q=19, K=19))
    i = 6

    def row_sum(k, v):
        return jnp.sum(attention(q, k, v, CAUSAL, implementation=implementation, block_size=BLOCK)[:, i] ** 2)

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
    (out, lse), grads = value_and_grads(implementation, CAUSAL)(q, k, v, {n: jnp.asarray(a) for n, a in arrays.items()})
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
    run = jit(functools.partial(attention, mask=AttentionMask(causal=False), scale=scale, implementation="blockwise",
                                block_size=16))
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
    mask = np.asarray(AttentionMask(causal=True, sliding_window=2).allowed(pos, pos))
    assert mask.shape == (1, 6, 6)
    np.testing.assert_array_equal(mask[0], np.tri(6, dtype=bool) & ~np.tri(6, k=-2, dtype=bool))
    mask = np.asarray(AttentionMask(causal=False, sliding_window=2).allowed(pos, pos))
    np.testing.assert_array_equal(mask[0], np.abs(np.arange(6)[:, None] - np.arange(6)[None]) < 2)
    prefix = np.asarray(AttentionMask(causal=True, prefix_length=3).allowed(pos, pos))
    np.testing.assert_array_equal(prefix[0], np.tri(6, dtype=bool) | (np.arange(6)[None] < 3))


def test_block_range_tests_agree_with_the_pairwise_rule():
    """`may_attend` never skips a block with a visible pair and `all_visible` never drops the mask of a block
    with a hidden pair (random blocks against the dense rule); both do fire."""
    rng = np.random.default_rng(0)
    masks = [AttentionMask(causal=c, sliding_window=w, prefix_length=p)
             for c in (True, False) for w in (0, 3) for p in ((0, 4) if c else (0,))]
    for mask in masks:
        skipped = unmasked = 0
        for _ in range(200):
            q_pos, kv_pos = (rng.integers(0, 16) + rng.integers(0, 3, (1, 4)) for _ in range(2))
            q_seg, kv_seg = rng.integers(0, 3, (1, 4)), rng.integers(0, 3, (1, 4))
            allowed = mask.allowed(q_pos, kv_pos, q_seg, kv_seg)
            assert allowed.any() <= bool(mask.may_attend(q_pos, kv_pos, q_seg, kv_seg)), mask
            assert bool(mask.all_visible(q_pos, kv_pos, q_seg, kv_seg)) <= allowed.all(), mask
            skipped += not mask.may_attend(q_pos, kv_pos)
            unmasked += bool(mask.all_visible(q_pos, kv_pos))
        assert (skipped > 0 or not mask.hides_pairs()) and unmasked > 0, mask


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=((2, 5, 6, 8), (2, 5, 4, 8))), "H=6.*G=4"),
    (dict(shapes=((2, 5, 4, 8), (3, 5, 2, 8))), "batch"),
    (dict(shapes=((2, 5, 4, 8), (2, 5, 2, 16))), "head widths differ.*8.*16"),
    (dict(implementation="flash3"), "'flash3'.*'reference'"),
    (dict(q_positions_BQ=np.zeros((2, 4), np.int32)), r"q_positions_BQ.*\(2, 4\).*\(2, 5\)"),
    (dict(kv_positions_BK=np.zeros((5,), np.int32)), r"kv_positions_BK.*\(5,\)"),
    (dict(q_segment_ids_BQ=np.zeros((2, 5), np.int32)), "kv_segment_ids_BK"),
    (dict(mask=dict(alibi_slopes=np.ones(3, np.float32))), r"3 ALiBi slopes.*H=4"),
    (dict(mask=dict(sliding_window=-1)), "sliding_window=-1"),
    (dict(mask=dict(causal=False, prefix_length=2)), "prefix_length=2 needs causal=True"),
    (dict(block_size=0), "block_size=0"),
    (dict(implementation="cudnn"), "cudnn.*GPU"),
    (dict(shapes=((2, 0, 4, 8), (2, 5, 2, 8))), "q length 0"),
    (dict(scale=jnp.ones(())), "scale=.*static Python number"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    q_shape, k_shape = kwargs.pop("shapes", ((2, 5, 4, 8), (2, 5, 2, 8)))
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, AttentionMask(**kwargs.pop("mask", {})), **kwargs)


def _layer_choice(batch, *, dtype=jnp.bfloat16, head_dim=64, platform="gpu", sliding_window=0, alibi=False):
    """What "auto" picks for the self-attention layer's kernel arguments on this data batch (the layer
    passes the batch's positions and segment ids for both q and kv)."""
    pos, seg = batch["positions_BL"], batch["segment_ids_BL"]
    mask = AttentionMask(causal=True, sliding_window=sliding_window, alibi_slopes=alibi_slopes(4) if alibi else None)
    return select_kernel("auto", mask, dtype, head_dim, platform=platform, layout_ok=cudnn_layout_ok(pos, pos, seg, seg))


def test_auto_picks_cudnn_on_gpu_for_unpacked_training_batches():
    from transformer.config import DataConfig
    from transformer.data import make_dataset

    text = make_dataset(DataConfig(dataset="kjv", seq_len=64, global_batch_size=2)).batch(0)
    assert _layer_choice(text) == "cudnn"
    assert _layer_choice(text, sliding_window=16) == "cudnn"
    assert _layer_choice(text, platform="cpu") == "blockwise"
    assert _layer_choice(text, dtype=jnp.float32) == "blockwise"
    assert _layer_choice(text, head_dim=12) == "blockwise"
    assert _layer_choice(text, alibi=True) == "blockwise"
    shifted = dict(text, positions_BL=text["positions_BL"] + np.array([[0], [9]], np.int32))
    assert _layer_choice(shifted) == "cudnn"
    padded = make_dataset(DataConfig(dataset="copy", seq_len=128, global_batch_size=2)).batch(0)
    assert padded["segment_ids_BL"].min() == 0 and _layer_choice(padded) == "blockwise"
    packed = dict(text, segment_ids_BL=_segments(2, 64))
    assert _layer_choice(packed) == "blockwise"
    zigzag = dict(text, positions_BL=text["positions_BL"][:, np.r_[0:16, 48:64, 16:48]])
    assert _layer_choice(zigzag) == "blockwise"


def test_cudnn_layout_ok_traced_and_explicit_cudnn_needs_known_layout():
    pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    ones = np.ones((2, 8), np.int32)
    check = jax.jit(cudnn_layout_ok)
    assert bool(check(pos, pos, ones, ones)) and bool(check(pos + 3, pos + 3, 2 * ones, 2 * ones))
    assert bool(check(pos, None, None, None)) and bool(check(None, pos, None, None))
    assert not bool(check(pos + 1, None, None, None))
    assert not bool(check(pos, pos + 1, ones, ones))
    assert not bool(check(pos[:, ::-1], pos[:, ::-1], None, None))
    assert not bool(check(pos, pos, ones, 2 * ones))
    assert cudnn_layout_ok() is True
    seen = []

    @jax.jit
    def traced(pos):
        for platform in ("gpu", "cpu"):
            seen.append(select_kernel("auto", CAUSAL, jnp.bfloat16, 16, platform=platform,
                                      layout_ok=cudnn_layout_ok(pos, pos)))
        return pos

    traced(pos)
    assert seen == ["cudnn", "blockwise"]  # on GPU the traced layout is checked at run time
    with pytest.raises(ValueError, match="cudnn' is unavailable: it masks by token index"):
        select_kernel("cudnn", CAUSAL, jnp.bfloat16, 16, platform="gpu",
                      layout_ok=cudnn_layout_ok(pos, pos, ones, 2 * ones))
    assert select_kernel("cudnn", CAUSAL, jnp.bfloat16, 16, platform="gpu", layout_ok=cudnn_layout_ok(pos, pos)) == "cudnn"
    assert select_kernel("auto", AttentionMask(prefix_length=4), jnp.bfloat16, 16, platform="gpu") == "blockwise"
    assert select_kernel("auto", AttentionMask(sliding_window=4), jnp.bfloat16, 16, platform="gpu") == "cudnn"
    assert select_kernel("auto", AttentionMask(causal=False, sliding_window=4), jnp.bfloat16, 16,
                         platform="gpu") == "blockwise"


def test_blockwise_inside_shard_map_with_vma_checks():
    """The blockwise kernel's loop carries take the inputs' varying-mesh-axes type, so it runs (fwd + bwd)
    under shard_map(check_vma=True) and equals the unsharded kernel."""
    from jax.sharding import PartitionSpec as P

    from transformer import sharding
    from transformer.config import MeshConfig

    q, k, v = map(jnp.asarray, random_qkv(11, B=4, Q=16, K=16))
    seg = jnp.asarray(_segments(4, 16))
    mesh = sharding.make_mesh(MeshConfig(data=4), jax.devices()[:4])

    def loss(q, k, v, seg):
        out = attention(q, k, v, AttentionMask(causal=True, sliding_window=6), q_segment_ids_BQ=seg,
                        kv_segment_ids_BK=seg, implementation="blockwise", block_size=BLOCK)
        return jnp.sum(out * jnp.cos(out))

    def local(q, k, v, seg):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, seg)
        return jax.lax.psum(value, "data"), grads

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=(P(), (P("data"),) * 3),
                            check_vma=True)
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, seg)
    got_value, got_grads = jax.jit(sharded)(q, k, v, seg)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        assert float(jnp.abs(want).max()) > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_memory_stays_linear_inside_a_differentiated_layer_scan():
    """Positions and segment ids are loop constants of the model's layer scan; jax must not hoist the mask
    tiles computed from them out of the differentiated scan (that stores every tile: quadratic memory)."""

    def temp_mib(n):
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, n))
        seg = jnp.ones((1, n), jnp.int32)

        def loss(w_NDD, x_BLD):
            def layer(x_BLD, w_DD):
                q = (x_BLD @ w_DD).reshape(1, n, 4, 16)
                out = attention(q, q[:, :, :2], q[:, :, 2:], CAUSAL, q_positions_BQ=pos, kv_positions_BK=pos,
                                q_segment_ids_BQ=seg, kv_segment_ids_BK=seg, implementation="blockwise",
                                block_size=256)
                return x_BLD + out.reshape(1, n, 64), None
            return jnp.sum(jax.lax.scan(layer, x_BLD, w_NDD)[0] ** 2)

        args = jax.ShapeDtypeStruct((2, 64, 64), jnp.float32), jax.ShapeDtypeStruct((1, n, 64), jnp.float32)
        return jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20

    small, large = temp_mib(2048), temp_mib(4096)
    assert large < 2.5 * small and large < 64, (small, large)  # hoisted tiles: 4x and 16 x 16 x 1 MiB


def test_implementations_listed():
    assert set(KERNELS) == {"auto", "reference", "blockwise", "cudnn"}


@pytest.mark.slow
def test_blockwise_fwd_bwd_memory_is_linear_at_long_lengths():
    """Compiled temp memory of blockwise fwd+bwd grows linearly (16K -> 64K tokens) and stays far below a
    single dense score matrix; the reference's grows quadratically (the measurement can see it). Then 16K
    tokens are actually run and the last rows checked against float64 NumPy."""

    def grad_fn(impl):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, CAUSAL, implementation=impl, block_size=512) ** 2)
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
    out = np.asarray(attention(*map(jnp.asarray, (q, k, v)), CAUSAL, implementation="blockwise"))
    tail = 3
    scores = np.einsum("qhd,kd->hqk", q[0, -tail:].astype(np.float64), k[0, :, 0].astype(np.float64)) / np.sqrt(32)
    scores = np.where(np.arange(n)[None, None, :] <= np.arange(n - tail, n)[None, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("hqk,kd->qhd", probs / probs.sum(-1, keepdims=True), v[0, :, 0].astype(np.float64))
    np.testing.assert_allclose(out[0, -tail:], want, atol=2e-5, rtol=1e-4)
