"""Ring attention on 8 fake CPU devices against an independent float64 NumPy dense attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import sharding
from transformer.config import MeshConfig
from attention_oracle import np_attention
from transformer.ops import layout
from transformer.ops import ring_attention as ra
from transformer.ops.mask import AttentionMask

CAUSAL = AttentionMask(causal=True)
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)  # tiny programs


def dense_np(q, k, v, cot, qpos, kpos, qseg, kseg, mask):
    """float64 dense attention and the gradients of sum(out * cot) w.r.t. q, k, v."""
    out, _, dq, dk, dv = np_attention(q, k, v, causal=mask.causal, q_pos=qpos, kv_pos=kpos, q_seg=qseg, kv_seg=kseg,
                                      window=mask.sliding_window, prefix=mask.prefix_length, slopes=mask.alibi_slopes,
                                      cot=cot)
    return out, dq, dk, dv


def run_ring(mesh, q, k, v, cot, pos, kvpos, seg, mask, *, zigzag, kernel="auto", block_size=512):
    """Ring outputs and gradients in natural order; inputs permuted to zigzag first when asked."""
    ring = mesh.shape["sequence"]
    perm = (lambda x: layout.to_zigzag(x, ring)) if zigzag else (lambda x: x)
    unperm = (lambda x: layout.from_zigzag(x, ring)) if zigzag else (lambda x: x)
    pos_z, kvpos_z = perm(pos), perm(kvpos)
    seg_z = None if seg is None else perm(seg)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def fwd_bwd(q, k, v, cot):
        def f(q, k, v):
            return ra.ring_attention_sharded(q, k, v, mask, mesh, q_positions_BQ=pos_z, kv_positions_BK=kvpos_z,
                                             q_segment_ids_BQ=seg_z, implementation=kernel, block_size=block_size)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(cot))

    results = fwd_bwd(*(perm(jnp.asarray(x)) for x in (q, k, v, cot)))
    return [np.asarray(unperm(x), np.float64) for x in results]


def make_inputs(B, L, H, G, D, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, cot = (rng.normal(size=(B, L, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.normal(size=(B, L, G, D)).astype(dtype) for _ in range(2))
    return q, k, v, cot


def packed_segments(B, L, seed=0):
    """Packed documents: random boundaries per row, positions restart in every document."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), size=3, replace=False))
        seg[b] = np.searchsorted(cuts, np.arange(L), side="right")
        starts = np.concatenate([[0], cuts])[seg[b]]
        pos[b] = np.arange(L) - starts
    return seg, pos


def assert_close(got, want, rtol, what):
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < rtol, f"{what}: max error {err:.3g} relative to max |ref| exceeds {rtol}"


CASES = {
    # name: (mesh axes, B, L, H, G, options)
    "causal_gqa_zigzag_ring4_chunked": (dict(sequence=4), 2, 32, 4, 2,
                                        dict(zigzag=True, causal=True, kernel="blockwise", block_size=2)),
    "noncausal_mha_alibi_ring2": (dict(sequence=2), 2, 16, 2, 2, dict(zigzag=False, causal=False, alibi=True)),
    "alibi_gqa_zigzag_seq2_tensor2": (dict(sequence=2, tensor=2), 1, 16, 4, 2, dict(zigzag=True, causal=True, alibi=True)),
    "prefix_lm_packed_zigzag_ring4": (dict(sequence=4), 2, 32, 4, 2,
                                      dict(zigzag=True, causal=True, prefix=3, segments=True, kernel="blockwise",
                                           block_size=2)),
    "prefix_lm_window_contiguous_ring2": (dict(sequence=2), 1, 16, 2, 1,
                                          dict(zigzag=False, causal=True, prefix=6, window=4)),
    "causal_mqa_zigzag_ring8": (dict(sequence=8), 1, 32, 2, 1, dict(zigzag=True, causal=True, kernel="reference")),
    "segments_zigzag_ring4": (dict(sequence=4), 2, 32, 2, 2,
                              dict(zigzag=True, causal=True, segments=True, kernel="reference")),
    "sliding_window_contiguous_ring4": (dict(sequence=4), 1, 32, 2, 1,
                                        dict(zigzag=False, causal=True, window=6, kernel="reference")),
    "bidirectional_window_segments_ring2": (dict(sequence=2), 1, 16, 2, 2,
                                            dict(zigzag=False, causal=False, window=3, segments=True)),
    "mqa_data2_seq2_tensor2": (dict(data=2, sequence=2, tensor=2), 2, 16, 4, 1,
                               dict(zigzag=True, causal=True, kernel="reference")),
    "causal_gqa_zigzag_ring1": (dict(sequence=1), 1, 16, 4, 2, dict(zigzag=True, causal=True, kernel="blockwise")),
    "causal_window_random_token_order_ring4": (dict(sequence=4), 1, 32, 2, 2,
                                               dict(zigzag=False, causal=True, window=9, shuffle=True)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ring_matches_dense_float64(name):
    check_case(name)


def check_case(name, kernel=None):
    """The ring on CASES[name] (with its kernel, or `kernel`) equals float64 dense attention and gradients."""
    axes, B, L, H, G, opts = CASES[name]
    mesh_cfg = MeshConfig(**{"data": 1, **axes})
    devices = jax.devices()[:int(np.prod(list(axes.values())))]
    mesh = sharding.make_mesh(mesh_cfg, devices)
    D = 8
    q, k, v, cot = make_inputs(B, L, H, G, D)
    pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    seg = None
    if opts.get("segments"):
        seg, pos = packed_segments(B, L)
    if opts.get("shuffle"):  # positions, not array order, define the mask
        order = np.random.default_rng(3).permutation(L)
        q, k, v, cot, pos = (x[:, order] for x in (q, k, v, cot, pos))
    slopes = (0.5, 0.25, 0.125, 0.0625)[:H] if opts.get("alibi") else None
    mask = AttentionMask(causal=opts["causal"], sliding_window=opts.get("window", 0),
                         prefix_length=opts.get("prefix", 0), alibi_slopes=slopes)
    got = run_ring(mesh, q, k, v, cot, pos, pos, seg, mask, zigzag=opts["zigzag"],
                   kernel=kernel or opts.get("kernel", "auto"), block_size=opts.get("block_size", 512))
    want = dense_np(q, k, v, cot, pos, pos, seg, seg, mask)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, 1e-5, f"{name} {what}")


def test_fully_masked_rows_give_zero_and_finite_grads():
    """kv positions shifted by 5: the first 5 queries see no key (lse=-inf) -> out 0, no NaN."""
    B, L, H, G, D = 1, 16, 2, 1, 8
    mesh = ra.ring_mesh(4)
    q, k, v, cot = make_inputs(B, L, H, G, D, seed=1)
    pos = np.arange(L, dtype=np.int32)[None]
    got = run_ring(mesh, q, k, v, cot, pos, pos + 5, None, CAUSAL, zigzag=False, kernel="blockwise")
    want = dense_np(q, k, v, cot, pos, pos + 5, None, None, CAUSAL)
    assert all(np.isfinite(g).all() for g in got)
    assert np.all(got[0][:, :5] == 0) and np.all(got[1][:, :5] == 0)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, 1e-5, what)


def test_bfloat16_within_bf16_tolerance():
    B, L, H, G, D = 1, 32, 4, 2, 16
    mesh = ra.ring_mesh(4)
    q, k, v, cot = make_inputs(B, L, H, G, D, seed=2)
    q16, k16, v16, cot16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, cot))
    pos = np.arange(L, dtype=np.int32)[None]
    got = run_ring(mesh, q16, k16, v16, cot16, pos, pos, None, CAUSAL, zigzag=True, kernel="blockwise")
    exact = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q16, k16, v16, cot16)]
    want = dense_np(*exact, pos, pos, None, None, CAUSAL)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, 3e-2, f"bf16 {what}")


@pytest.mark.parametrize("ring", [1, 2, 4, 8])
def test_zigzag_roundtrip_and_layout(ring):
    L = 8 * ring
    x = np.arange(2 * L * 3).reshape(2, L, 3)
    z = layout.to_zigzag(x, ring)
    np.testing.assert_array_equal(layout.from_zigzag(z, ring), x)
    np.testing.assert_array_equal(np.asarray(layout.from_zigzag(layout.to_zigzag(jnp.asarray(x), ring), ring)), x)
    chunk = L // (2 * ring)
    for r, shard in enumerate(np.split(z[0, :, 0] // 3, ring)):
        expected = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in (r, 2 * ring - 1 - r)])
        np.testing.assert_array_equal(shard, expected)
    assert sorted(layout.zigzag_permutation(L, ring)) == list(range(L))


def test_bad_lengths_and_shapes_raise_before_compile():
    mesh = ra.ring_mesh(4)
    with pytest.raises(ValueError, match=r"length 20 is not divisible by 2 x ring size 4 = 8.*multiple of 8"):
        layout.zigzag_permutation(20, 4)
    q = jnp.zeros((1, 20, 2, 8))
    with pytest.raises(ValueError, match=r"query sequence length 20 is not divisible by 2 x ring size 4.*of 8"):
        ra.ring_attention_sharded(q, q, q, CAUSAL, mesh)
    q = jnp.zeros((1, 18, 2, 8))
    with pytest.raises(ValueError, match=r"length 18 is not divisible by ring size 4 = 4; use a multiple of 4"):
        ra.ring_attention_sharded(q, q, q, AttentionMask(causal=False), mesh)
    q, k = jnp.zeros((1, 16, 6, 8)), jnp.zeros((1, 16, 4, 8))
    with pytest.raises(ValueError, match=r"query heads H=6 must be a multiple of kv heads G=4"):
        ra.ring_attention_sharded(q, k, k, CAUSAL, mesh)
    with pytest.raises(ValueError, match=r"ring size 16 is larger than the 8 available devices"):
        ra.ring_mesh(16)
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'"):
        ra.ring_attention_sharded(q, q, q, CAUSAL, mesh, implementation="flash")
    with pytest.raises(ValueError, match=r"implementation='cudnn' is unavailable.*GPU"):
        ra.ring_attention_sharded(q, q, q, CAUSAL, mesh, implementation="cudnn")


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_zigzag_balances_causal_work(ring):
    L = 16 * ring
    zig = layout.ring_work(L, ring, layout="zigzag")
    contiguous = layout.ring_work(L, ring, layout="contiguous")
    for work in (zig, contiguous):
        assert work["pairs_unmasked"].sum() == L * (L + 1) // 2
    np.testing.assert_array_equal(zig["blocks"], np.full(ring, 2 * ring + 1))
    assert len(set(zig["pairs_computed"])) == 1
    np.testing.assert_array_equal(contiguous["blocks"], 4 * np.arange(ring) + 3)
    assert contiguous["pairs_computed"].max() > 2 * contiguous["pairs_computed"].min()
    assert zig["pairs_computed"].max() < contiguous["pairs_computed"].max()


def test_ring_work_sliding_window_counts_window_pairs():
    L, ring, window = 64, 4, 5
    work = layout.ring_work(L, ring, layout="contiguous", mask=AttentionMask(causal=True, sliding_window=window))
    diff = np.arange(L)[:, None] - np.arange(L)[None]
    assert work["pairs_unmasked"].sum() == ((diff >= 0) & (diff < window)).sum()
    assert work["blocks"].max() <= 5


@pytest.mark.parametrize("kernel", ["blockwise", "reference"])
def test_ring_is_mapped_with_vma_checks(kernel):
    """shard_map's varying-axes type check stays on (the block kernels' loop carries are vma-typed), in the
    forward and the custom_vjp backward."""
    mesh = ra.ring_mesh(4)
    q = jnp.ones((1, 16, 2, 8))

    def loss(q):
        return jnp.sum(ra.ring_attention_sharded(q, q, q, CAUSAL, mesh, implementation=kernel, block_size=2) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss))(q))
    assert "check_vma=True" in jaxpr and "check_vma=False" not in jaxpr


@pytest.mark.parametrize("name", ["segments_zigzag_ring4", "sliding_window_contiguous_ring4"])
def test_cudnn_block_routing_is_exact_with_an_index_masked_stand_in(name, monkeypatch):
    """The ring's cuDNN path sends each sub-block to no mask, the index-based causal (+ window) mask, or the
    generic kernel. With cuDNN replaced by the reference kernel masking by index, as cuDNN does, the ring must
    still equal the dense float64 attention: the routing is checked on CPU."""
    from transformer.ops import attention as attention_ops

    def index_masked(q, k, v, *, causal, sliding_window=0, scale, return_lse=False):
        mask = AttentionMask(causal=causal, sliding_window=sliding_window)
        return attention_ops.attention(q, k, v, mask, scale=scale, implementation="reference", return_lse=return_lse)

    monkeypatch.setattr(attention_ops, "cudnn_attention", index_masked)
    monkeypatch.setattr(attention_ops, "cudnn_problem", lambda *args, **kwargs: None)
    check_case(name, kernel="cudnn")
