"""T5 relative-position bias (model.position="t5_bias"): the bucket function against HF's equations written out
in NumPy; every kernel (reference, blockwise, ring, decode) and the bias table's gradient against float64 NumPy
attention; cuDNN refuses it; the layer stack owns one table and the model's gradient reaches it."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_oracle import np_attention
from transformer import sharding
from transformer.config import ConfigError, MeshConfig, ModelConfig
from transformer.inference.cache import EMPTY
from transformer.inference.decode_attention import cached_attention, decode_attention
from transformer.ops import layout
from transformer.ops import ring_attention as ra
from transformer.ops.attention import attention, cudnn_problem, select_kernel
from transformer.ops.mask import AttentionMask, RelativeBuckets

FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)  # tiny programs
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# ------------------------------------------------------------------------------------------ the NumPy oracle


def hf_bucket(relative_position, *, bidirectional, num_buckets, max_distance, dtype=np.float64):
    """HF `T5Attention._relative_position_bucket` (relative_position = key position - query position), its
    equations in NumPy; HF runs the logarithm in float32 (dtype), which agrees with float64 at every offset here."""
    relative_position = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, np.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    with np.errstate(divide="ignore", invalid="ignore"):
        if_large = max_exact + (np.log(relative_position.astype(dtype) / dtype(max_exact))
                                / dtype(math.log(max_distance / max_exact))
                                * dtype(num_buckets - max_exact)).astype(np.int64)
    if_large = np.minimum(if_large, np.full_like(if_large, num_buckets - 1))
    return buckets + np.where(is_small, relative_position, if_large)


def np_bias(table_OH, buckets: RelativeBuckets, q_pos, kv_pos):
    """(bias BHQK float64, bucket BQK) from HF's buckets."""
    bucket = hf_bucket(np.asarray(kv_pos)[:, None, :] - np.asarray(q_pos)[:, :, None],
                       bidirectional=buckets.bidirectional, num_buckets=buckets.num_buckets,
                       max_distance=buckets.max_distance)
    return np.moveaxis(np.asarray(table_OH, np.float64)[bucket], -1, 1), bucket


def np_t5_attention(q, k, v, table_OH, mask, *, q_pos, kv_pos, q_seg=None, kv_seg=None, cot=None):
    """float64 attention with the T5 bias: (out, lse) or, with cot, (out, lse, dq, dk, dv, d table)."""
    bias, bucket = np_bias(table_OH, mask.relative_buckets, q_pos, kv_pos)
    results = np_attention(q, k, v, causal=mask.causal, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                           window=mask.sliding_window, bias=bias, cot=cot)
    if cot is None:
        return results[:2]
    dtable = np.zeros(np.shape(table_OH))
    np.add.at(dtable, bucket, np.moveaxis(results[-1], 1, -1))
    return results[:-1] + (dtable,)


def assert_close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < rtol, f"{what}: max error {err:.3g} relative to max |ref| exceeds {rtol}"


# ------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 1000), (33, 77)])
def test_buckets_match_hf(bidirectional, num_buckets, max_distance):
    rng = np.random.default_rng(num_buckets)
    offsets = np.concatenate([np.arange(-3 * max_distance, 3 * max_distance + 1), rng.integers(-10**6, 10**6, 500),
                              [-EMPTY, EMPTY, -(2**31 - 1), 2**31 - 1]])
    kwargs = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    want = hf_bucket(offsets, **kwargs)
    np.testing.assert_array_equal(hf_bucket(offsets, **kwargs, dtype=np.float32), want)
    buckets = RelativeBuckets(num_buckets, max_distance, bidirectional)
    np.testing.assert_array_equal(buckets.bucket(offsets), want)
    np.testing.assert_array_equal(jax.jit(buckets.bucket)(jnp.asarray(offsets, jnp.int32)), want)
    half = num_buckets // 2  # bidirectional: bucket `half` (a later key at distance 0) is never used
    used = set(range(2 * half)) - {half} if bidirectional else set(range(num_buckets))
    assert set(want.tolist()) == used


def test_default_buckets_by_hand():
    """T5's 32 buckets, max distance 128: exact near 0, logarithmic after, one-sided for a decoder."""
    encoder, decoder = RelativeBuckets(32, 128, True), RelativeBuckets(32, 128, False)
    offsets = np.array([0, -1, 1, -7, -8, -12, 7, 8, 16, -127, -128, -5000, 5000])
    np.testing.assert_array_equal(encoder.bucket(offsets), [0, 1, 17, 7, 8, 9, 23, 24, 26, 15, 15, 15, 31])
    np.testing.assert_array_equal(decoder.bucket(offsets), [0, 1, 0, 7, 8, 12, 0, 0, 0, 31, 31, 31, 0])
    assert decoder.bucket(np.array([-15, -16, -18, -19, -21])).tolist() == [15, 16, 16, 17, 18]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_buckets=2, max_distance=8, bidirectional=True), "num_buckets=2 must be >= 4"),
    (dict(num_buckets=1, max_distance=8, bidirectional=False), "num_buckets=1 must be >= 2"),
    (dict(num_buckets=32, max_distance=8, bidirectional=True), "max_distance=8 must be > 8"),
    (dict(num_buckets=8.0, max_distance=20), "num_buckets=8.0 must be an integer"),
])
def test_bad_buckets_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelativeBuckets(**kwargs)


# ------------------------------------------------------------------------------------------ reference, blockwise


def _segments(B, L, seed=0):
    rng = np.random.default_rng(seed)
    cuts = [np.sort(rng.choice(np.arange(1, L), 2, replace=False)) for _ in range(B)]
    return np.stack([np.searchsorted(c, np.arange(L), side="right") for c in cuts]).astype(np.int32)


KERNEL_CASES = {
    # encoder self-attention: packed documents, permuted positions spread 3 apart (offsets past max_distance)
    "bidirectional_packed_permuted": dict(
        shape=dict(Q=19, K=19, H=4, G=2), mask=AttentionMask(causal=False, relative_buckets=RelativeBuckets(8, 20)),
        positions=lambda B, Q, K: (3 * np.stack([np.random.default_rng(b).permutation(Q) for b in range(B)]),) * 2,
        segments=True),
    # decoder self-attention with a window, GQA
    "causal_window_gqa": dict(
        shape=dict(Q=21, K=21, H=6, G=2),
        mask=AttentionMask(causal=True, sliding_window=11, relative_buckets=RelativeBuckets(8, 6, False))),
    # few queries at later positions over more keys (prefill of a continuation), MQA
    "causal_late_queries_mqa": dict(
        shape=dict(Q=5, K=23, H=4, G=1),
        mask=AttentionMask(causal=True, relative_buckets=RelativeBuckets(16, 12, False)),
        positions=lambda B, Q, K: (np.tile(np.arange(K - Q, K), (B, 1)), np.tile(np.arange(K), (B, 1)))),
}


def kernel_inputs(name, B=2, D=8):
    case = KERNEL_CASES[name]
    shape = case["shape"]
    Q, K, H, G = shape["Q"], shape["K"], shape["H"], shape["G"]
    rng = np.random.default_rng(sum(map(ord, name)))
    q, cot = (rng.normal(size=(B, Q, H, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(B, K, G, D)).astype(np.float32) for _ in range(2))
    table = rng.normal(size=(case["mask"].relative_buckets.num_buckets, H)).astype(np.float32)
    q_pos, kv_pos = case.get("positions", lambda B, Q, K: (np.tile(np.arange(Q), (B, 1)),) * 2)(B, Q, K)
    arrays = dict(q_positions_BQ=q_pos.astype(np.int32), kv_positions_BK=kv_pos.astype(np.int32))
    if case.get("segments"):
        arrays.update(q_segment_ids_BQ=_segments(B, Q), kv_segment_ids_BK=_segments(B, K))
    return q, k, v, cot, table, case["mask"], arrays


def oracle(q, k, v, cot, table, mask, arrays):
    return np_t5_attention(q, k, v, table, mask, q_pos=arrays["q_positions_BQ"], kv_pos=arrays["kv_positions_BK"],
                           q_seg=arrays.get("q_segment_ids_BQ"), kv_seg=arrays.get("kv_segment_ids_BK"), cot=cot)


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_reference_and_blockwise_match_numpy_with_table_gradient(name):
    q, k, v, cot, table, mask, arrays = kernel_inputs(name)
    want = oracle(q, k, v, cot, table, mask, arrays)
    assert np.abs(want[-1]).max() > 1e-2  # the table's gradient is not vacuous
    for implementation in ("reference", "blockwise"):
        def loss(q, k, v, table, arrays):
            out, lse = attention(q, k, v, mask, relative_bias_OH=table, implementation=implementation, block_size=8,
                                 return_lse=True, **arrays)
            return jnp.sum(out * cot), (out, lse)

        grads, (out, lse) = jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, table, arrays)
        for got, expected, what in zip((out, lse, *grads), want, ("out", "lse", "dq", "dk", "dv", "dtable")):
            assert_close(got, expected, 2e-5, f"{implementation} {what}")


def test_bias_changes_the_output_and_bfloat16_table():
    """The table really enters the scores (a different table changes the output); a bfloat16 table gives a
    bfloat16 gradient close to the float32 one."""
    q, k, v, cot, table, mask, arrays = kernel_inputs("causal_window_gqa")
    run = jit(lambda t: attention(q, k, v, mask, relative_bias_OH=t, implementation="blockwise", block_size=8,
                                  **arrays))
    assert float(jnp.abs(run(table) - run(2 * table)).max()) > 1e-2
    grad = jit(jax.grad(lambda t: jnp.sum(attention(q, k, v, mask, relative_bias_OH=t, implementation="blockwise",
                                                    block_size=8, **arrays) * cot)))
    g16 = grad(jnp.asarray(table, jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    assert_close(g16, grad(table), 2e-2, "bf16 dtable")


# ------------------------------------------------------------------------------------------ ring


RING_CASES = {
    # name: (mesh axes, B, L, H, G, mask, zigzag, kernel, block size)
    "causal_zigzag_ring4_blockwise": (dict(sequence=4), 2, 32, 4, 2,
                                      AttentionMask(causal=True, relative_buckets=RelativeBuckets(8, 10, False)),
                                      True, "blockwise", 2),
    # heads split over tensor (so is the table), table gradient summed over data and sequence
    "bidirectional_packed_data2_seq2_tensor2": (dict(data=2, sequence=2, tensor=2), 2, 16, 4, 2,
                                                AttentionMask(causal=False, relative_buckets=RelativeBuckets(8, 6)),
                                                False, "auto", 512),
    "causal_window_mqa_ring8_reference": (dict(sequence=8), 1, 32, 2, 1,
                                          AttentionMask(causal=True, sliding_window=9,
                                                        relative_buckets=RelativeBuckets(4, 5, False)),
                                          True, "reference", 512),
}


@pytest.mark.parametrize("name", list(RING_CASES))
def test_ring_matches_numpy_with_table_gradient(name):
    axes, B, L, H, G, mask, zigzag, kernel, block_size = RING_CASES[name]
    mesh = sharding.make_mesh(MeshConfig(**{"data": 1, **axes}), jax.devices()[:math.prod(axes.values())])
    rng = np.random.default_rng(len(name))
    D = 8
    q, cot = (rng.normal(size=(B, L, H, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(B, L, G, D)).astype(np.float32) for _ in range(2))
    table = rng.normal(size=(mask.relative_buckets.num_buckets, H)).astype(np.float32)
    pos = np.tile(np.arange(L, dtype=np.int32), (B, 1))
    seg = None if mask.causal else _segments(B, L)
    ring = mesh.shape["sequence"]
    perm = (lambda x: layout.to_zigzag(x, ring)) if zigzag else (lambda x: x)
    unperm = (lambda x: layout.from_zigzag(x, ring)) if zigzag else (lambda x: x)

    @jit
    def fwd_bwd(q, k, v, table, cot):
        def f(q, k, v, table):
            return ra.ring_attention_sharded(q, k, v, mask, mesh, q_positions_BQ=perm(pos), q_segment_ids_BQ=None
                                             if seg is None else perm(seg), relative_bias_OH=table,
                                             implementation=kernel, block_size=block_size)
        out, vjp = jax.vjp(f, q, k, v, table)
        return (out, *vjp(cot))

    out, dq, dk, dv, dtable = fwd_bwd(*(perm(jnp.asarray(x)) for x in (q, k, v)), table, perm(jnp.asarray(cot)))
    want_out, _, *want_grads = np_t5_attention(q, k, v, table, mask, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg,
                                               cot=cot)
    for got, want, what in zip((unperm(out), unperm(dq), unperm(dk), unperm(dv), dtable), (want_out, *want_grads),
                               ("out", "dq", "dk", "dv", "dtable")):
        assert_close(got, want, 2e-5, f"{name} {what}")


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("K,block,Q", [(37, 5, 2), (24, 8, 1)])
def test_decode_kernel_matches_numpy(K, block, Q):
    """Few late queries over a cache with empty slots, positions far past max_distance."""
    rng = np.random.default_rng(K + Q)
    mask = AttentionMask(causal=True, relative_buckets=RelativeBuckets(8, 12, False))
    q = rng.normal(size=(2, Q, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, K, 2, 8)).astype(np.float32) for _ in range(2))
    table = rng.normal(size=(8, 4)).astype(np.float32)
    q_pos = np.tile(np.arange(100 + K - Q, 100 + K), (2, 1))
    kv_pos = np.tile(np.arange(100, 100 + K), (2, 1))
    kv_pos[1, K - 3:] = EMPTY
    out, lse = decode_attention(q, k, v, mask, q_positions_BQ=q_pos, kv_positions_BK=kv_pos, relative_bias_OH=table,
                                block_size=block, return_lse=True)
    want, want_lse = np_t5_attention(q, k, v, table, mask, q_pos=q_pos, kv_pos=kv_pos)
    assert_close(out, want, 1e-5, "out")
    assert_close(lse, want_lse, 1e-5, "lse")


@pytest.mark.parametrize("axes", [dict(sequence=4), dict(sequence=2, tensor=2)], ids=["sequence4", "seq2_tensor2"])
def test_cached_attention_split_over_sequence_matches_numpy(axes):
    """The cache split over `sequence` (and heads with the table's columns over `tensor`)."""
    rng = np.random.default_rng(3)
    mask = AttentionMask(causal=True, relative_buckets=RelativeBuckets(8, 10, False))
    N, B, K, G, W, H = 2, 2, 16, 2, 8, 4
    k_N, v_N = (rng.normal(size=(N, B, K, G, W)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(B, 1, H, W)).astype(np.float32)
    table = rng.normal(size=(8, H)).astype(np.float32)
    cache_pos = np.tile(np.arange(K, dtype=np.int32), (B, 1))
    cache_pos[0, 13:] = EMPTY
    q_pos = np.array([[12], [15]], np.int32)
    mesh = sharding.make_mesh(MeshConfig(**{"data": 1, **axes}), jax.devices()[:math.prod(axes.values())])
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda q, k_N, v_N, table: cached_attention(
            q, k_N, v_N, 1, mask, q_positions_BQ=q_pos, cache_positions_BK=cache_pos, scale=1 / math.sqrt(W),
            block_size=4, relative_bias_OH=table))(q, k_N, v_N, table)
    want, _ = np_t5_attention(q, k_N[1], v_N[1], table, mask, q_pos=q_pos, kv_pos=cache_pos)
    assert_close(out, want, 1e-5, "out")


# ------------------------------------------------------------------------------------------ kernel choice, bad input


def test_cudnn_cannot_take_it_and_auto_falls_back():
    mask = AttentionMask(causal=True, relative_buckets=RelativeBuckets())
    assert "T5 relative-position biases" in cudnn_problem(mask, jnp.bfloat16, 64, platform="gpu")
    assert select_kernel("auto", mask, jnp.bfloat16, 64, platform="gpu") == "blockwise"
    assert select_kernel("auto", AttentionMask(causal=True), jnp.bfloat16, 64, platform="gpu") == "cudnn"
    with pytest.raises(ValueError, match="cudnn' is unavailable: it cannot add T5 relative-position biases"):
        select_kernel("cudnn", mask, jnp.bfloat16, 64, platform="gpu")


@pytest.mark.parametrize("mask, table, match", [
    (AttentionMask(relative_buckets=RelativeBuckets(8, 20)), None, r"give relative_bias_OH, a \(8, H=4\) bias table"),
    (AttentionMask(), np.zeros((8, 4)), "relative_bias_OH was given but the mask has no relative_buckets"),
    (AttentionMask(relative_buckets=RelativeBuckets(8, 20)), np.zeros((8, 2)),
     r"relative_bias_OH has shape \(8, 2\); expected \(num_buckets, H\) = \(8, 4\)"),
])
def test_bad_tables_raise_before_compiling(mask, table, match):
    q, k = jnp.zeros((2, 5, 4, 8)), jnp.zeros((2, 5, 2, 8))
    for run in (lambda: attention(q, k, k, mask, relative_bias_OH=table),
                lambda: decode_attention(q, k, k, mask, relative_bias_OH=table),
                lambda: ra.ring_attention_sharded(q[:, :4], k[:, :4], k[:, :4], mask, ra.ring_mesh(2),
                                                  relative_bias_OH=table)):
        with pytest.raises(ValueError, match=match):
            run()


@pytest.mark.parametrize("overrides, match", [
    (dict(relative_buckets=3, architecture="encoder"), "model.relative_buckets=3 must be >= 4"),
    (dict(relative_buckets=32, relative_max_distance=16), "model.relative_max_distance=16 must be > 16"),
    (dict(relative_buckets=32, relative_max_distance=16, architecture="encoder"), None),
])
def test_config_validation(overrides, match):
    cfg = ModelConfig(position="t5_bias", **overrides)
    if match is None:
        cfg.validate()
        return
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


# ------------------------------------------------------------------------------------------ the model


MODEL = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, init_std=0.3,
                    position="t5_bias", relative_buckets=8, relative_max_distance=12, attention_block_size=8)


def test_layer_stacks_own_one_table_each():
    """One (buckets, H) table per layer stack, however many layers, sharded like the heads; none without t5_bias."""
    from transformer.model import build_model

    for architecture, stacks in (("decoder", ["layers"]), ("encoder", ["layers"]),
                                 ("encoder_decoder", ["decoder", "encoder"])):
        for scan in (True, False):
            cfg = dataclasses.replace(MODEL, architecture=architecture, num_layers=3, scan_layers=scan)
            params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
            found = sorted(str(path[0]) for path, _ in nnx.to_flat_state(params) if "relative_bias_OH" in path)
            assert found == stacks, (architecture, scan, found)
            for stack in stacks:
                table = params[stack]["relative_bias_OH"]
                assert table.shape == (8, 4) and table.get_metadata()["logical_axes"] == (None, "heads")
    rope = nnx.state(nnx.eval_shape(lambda: build_model(dataclasses.replace(MODEL, position="rope"),
                                                        rngs=nnx.Rngs(0))), nnx.Param)
    assert not any("relative_bias_OH" in path for path, _ in nnx.to_flat_state(rope))


@pytest.mark.parametrize("architecture", [pytest.param("decoder", marks=pytest.mark.slow), "encoder"])
def test_model_is_relative_and_table_gradient_matches_reference(architecture):
    """Shifting every position by a constant leaves the logits unchanged (only offsets matter, no other
    position encoding); the scanned, rematerialised stack's gradient w.r.t. its table is the same from the
    blockwise kernel as from the reference kernel, and nonzero."""
    from transformer.model import build_model

    results = {}
    for kernel in ("reference", "blockwise"):
        cfg = dataclasses.replace(MODEL, architecture=architecture, attention_kernel=kernel, remat="full")
        model = build_model(cfg, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 20)), jnp.int32)
        positions_BL = jnp.tile(jnp.arange(20, dtype=jnp.int32), (2, 1))

        def loss(params, shift):
            logits_BLV, _ = nnx.merge(graphdef, params, rest)(tokens_BL, positions_BL=positions_BL + shift)
            return jnp.sum(jnp.sin(logits_BLV)), logits_BLV

        (_, logits), grads = jit(jax.value_and_grad(loss, has_aux=True))(params, 0)
        (_, shifted), _ = jit(jax.value_and_grad(loss, has_aux=True))(params, 37)
        assert_close(shifted, logits, 1e-5, f"{kernel} shifted positions")
        results[kernel] = logits, grads["layers"]["relative_bias_OH"][...]
    assert_close(results["blockwise"][0], results["reference"][0], 1e-5, "logits")
    assert float(jnp.abs(results["reference"][1]).max()) > 1e-3
    assert_close(results["blockwise"][1], results["reference"][1], 1e-4, "d table")


@pytest.mark.parametrize("axes", [pytest.param(dict(sequence=2, tensor=2), marks=pytest.mark.slow),
                                  pytest.param(dict(data=2, sequence=4),
                                                                         marks=pytest.mark.slow)],
                         ids=["seq2_tensor2", "data2_seq4"])
def test_model_on_a_sequence_mesh_equals_one_device(axes):
    """The decoder's layers run Ring Attention with the stack's table (its columns split like the heads):
    logits and every gradient, the table's included, equal the unsharded model's."""
    from transformer.model import build_model

    cfg = dataclasses.replace(MODEL, attention_kernel="blockwise")
    model = build_model(cfg, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens_BL = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 16)), jnp.int32)

    def loss(params, tokens_BL):
        logits_BLV, _ = nnx.merge(graphdef, params)(tokens_BL)
        return jnp.sum(jnp.sin(logits_BLV)), logits_BLV

    step = jit(jax.value_and_grad(loss, has_aux=True))
    (_, want_logits), want_grads = step(params, tokens_BL)
    mesh = sharding.make_mesh(MeshConfig(**{"data": 1, **axes}), jax.devices()[:math.prod(axes.values())])
    with sharding.use_mesh(mesh):
        placed = jax.device_put(params, sharding.state_shardings(params, mesh))
        (_, logits), grads = step(placed, tokens_BL)
        assert "ppermute" in str(jax.make_jaxpr(loss)(placed, tokens_BL))  # the ring really runs
    assert_close(logits, want_logits, 1e-5, "logits")
    flat, want_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(want_grads))
    for path, grad in flat:
        assert_close(grad[...], want_flat[path][...], 1e-4, "/".join(map(str, path)))
    assert float(jnp.abs(grads["layers"]["relative_bias_OH"][...]).max()) > 1e-3
