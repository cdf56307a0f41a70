"""Ring attention on 8 fake CPU devices against an independent float64 NumPy dense attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import sharding
from transformer.config import MeshConfig
from transformer.ops import ring_attention as ra


def dense_np(q, k, v, cot, qpos, kpos, qseg, kseg, *, causal, window, slopes, scale):
    """float64 dense attention and the gradients of sum(out * cot) w.r.t. q, k, v."""
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    B, Q, H, D = q.shape
    R = H // k.shape[2]
    kh, vh = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    diff = (qpos[:, :, None] - kpos[:, None, :]).astype(np.int64)
    ok = np.ones(diff.shape, bool)
    if causal:
        ok &= diff >= 0
    if window:
        ok &= (diff < window) if causal else (np.abs(diff) < window)
    if qseg is not None:
        ok &= qseg[:, :, None] == kseg[:, None, :]
    if slopes is not None:
        s = s - np.asarray(slopes, np.float64)[None, :, None, None] * np.abs(diff)[:, None]
    s = np.where(ok[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(ok[:, None], np.exp(s - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z > 0, z, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, vh)
    dvh = np.einsum("bhqk,bqhd->bkhd", p, cot)
    dp = np.einsum("bqhd,bkhd->bhqk", cot, vh)
    ds = p * (dp - np.einsum("bqhd,bqhd->bhq", cot, out)[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kh) * scale
    dkh = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    group = lambda x: x.reshape(B, x.shape[1], H // R, R, D).sum(3)
    return out, dq, group(dkh), group(dvh)


def run_ring(mesh, q, k, v, cot, pos, kvpos, seg, *, zigzag, causal, window=0, slopes=None, kernel="auto",
             block_size=512):
    """Ring outputs and gradients in natural order; inputs permuted to zigzag first when asked."""
    ring = mesh.shape["sequence"]
    perm = (lambda x: ra.to_zigzag(x, ring)) if zigzag else (lambda x: x)
    unperm = (lambda x: ra.from_zigzag(x, ring)) if zigzag else (lambda x: x)
    pos_z, kvpos_z = perm(pos), perm(kvpos)
    seg_z = None if seg is None else perm(seg)

    @jax.jit
    def fwd_bwd(q, k, v, cot):
        def f(q, k, v):
            return ra.ring_attention_sharded(q, k, v, mesh, causal=causal, q_positions=pos_z, kv_positions=kvpos_z,
                                             segment_ids=seg_z, sliding_window=window, alibi_slopes_H=slopes,
                                             block_kernel=kernel, block_size=block_size)
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
    slopes = np.array([0.5, 0.25, 0.125, 0.0625][:H], np.float32) if opts.get("alibi") else None
    window, causal = opts.get("window", 0), opts["causal"]
    got = run_ring(mesh, q, k, v, cot, pos, pos, seg, zigzag=opts["zigzag"], causal=causal, window=window,
                   slopes=slopes, kernel=opts.get("kernel", "auto"), block_size=opts.get("block_size", 512))
    want = dense_np(q, k, v, cot, pos, pos, seg, seg, causal=causal, window=window, slopes=slopes,
                    scale=1 / np.sqrt(D))
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, 1e-5, f"{name} {what}")


def test_fully_masked_rows_give_zero_and_finite_grads():
    """kv positions shifted by 5: the first 5 queries see no key (lse=-inf) -> out 0, no NaN."""
    B, L, H, G, D = 1, 16, 2, 1, 8
    mesh = ra.ring_mesh(4)
    q, k, v, cot = make_inputs(B, L, H, G, D, seed=1)
    pos = np.arange(L, dtype=np.int32)[None]
    got = run_ring(mesh, q, k, v, cot, pos, pos + 5, None, zigzag=False, causal=True, kernel="blockwise")
    want = dense_np(q, k, v, cot, pos, pos + 5, None, None, causal=True, window=0, slopes=None,
                    scale=1 / np.sqrt(D))
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
    got = run_ring(mesh, q16, k16, v16, cot16, pos, pos, None, zigzag=True, causal=True, kernel="blockwise")
    exact = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q16, k16, v16, cot16)]
    want = dense_np(*exact, pos, pos, None, None, causal=True, window=0, slopes=None, scale=1 / np.sqrt(D))
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        assert_close(g, w, 3e-2, f"bf16 {what}")


@pytest.mark.parametrize("ring", [1, 2, 4, 8])
def test_zigzag_roundtrip_and_layout(ring):
    L = 8 * ring
    x = np.arange(2 * L * 3).reshape(2, L, 3)
    z = ra.to_zigzag(x, ring)
    np.testing.assert_array_equal(ra.from_zigzag(z, ring), x)
    np.testing.assert_array_equal(np.asarray(ra.from_zigzag(ra.to_zigzag(jnp.asarray(x), ring), ring)), x)
    chunk = L // (2 * ring)
    for r, shard in enumerate(np.split(z[0, :, 0] // 3, ring)):
        expected = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in (r, 2 * ring - 1 - r)])
        np.testing.assert_array_equal(shard, expected)
    assert sorted(ra.zigzag_permutation(L, ring)) == list(range(L))


def test_bad_lengths_and_shapes_raise_before_compile():
    mesh = ra.ring_mesh(4)
    with pytest.raises(ValueError, match=r"length 20 is not divisible by 2 x ring size 4 = 8.*multiple of 8"):
        ra.zigzag_permutation(20, 4)
    q = jnp.zeros((1, 20, 2, 8))
    with pytest.raises(ValueError, match=r"query sequence length 20 is not divisible by 2 x ring size 4.*of 8"):
        ra.ring_attention_sharded(q, q, q, mesh, causal=True)
    q = jnp.zeros((1, 18, 2, 8))
    with pytest.raises(ValueError, match=r"length 18 is not divisible by ring size 4 = 4; use a multiple of 4"):
        ra.ring_attention_sharded(q, q, q, mesh, causal=False)
    q, k = jnp.zeros((1, 16, 6, 8)), jnp.zeros((1, 16, 4, 8))
    with pytest.raises(ValueError, match=r"query heads H=6 must be a multiple of kv heads G=4"):
        ra.ring_attention_sharded(q, k, k, mesh)
    with pytest.raises(ValueError, match=r"ring size 16 is larger than the 8 available devices"):
        ra.ring_mesh(16)
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match=r"block_kernel='flash' is not valid"):
        ra.ring_attention_sharded(q, q, q, mesh, block_kernel="flash")
    with pytest.raises(ValueError, match=r"block_kernel='cudnn' cannot be used.*GPU"):
        ra.ring_attention_sharded(q, q, q, mesh, block_kernel="cudnn")


@pytest.mark.parametrize("ring", [2, 4, 8])
def test_zigzag_balances_causal_work(ring):
    L = 16 * ring
    zig = ra.ring_work(L, ring, layout="zigzag")
    contiguous = ra.ring_work(L, ring, layout="contiguous")
    for work in (zig, contiguous):
        assert work["pairs_unmasked"].sum() == L * (L + 1) // 2
    np.testing.assert_array_equal(zig["blocks"], np.full(ring, 2 * ring + 1))
    assert len(set(zig["pairs_computed"])) == 1
    np.testing.assert_array_equal(contiguous["blocks"], 4 * np.arange(ring) + 3)
    assert contiguous["pairs_computed"].max() > 2 * contiguous["pairs_computed"].min()
    assert zig["pairs_computed"].max() < contiguous["pairs_computed"].max()


def test_ring_work_sliding_window_counts_window_pairs():
    L, ring, window = 64, 4, 5
    work = ra.ring_work(L, ring, layout="contiguous", causal=True, sliding_window=window)
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
        return jnp.sum(ra.ring_attention_sharded(q, q, q, mesh, block_kernel=kernel, block_size=2) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss))(q))
    assert "check_vma=True" in jaxpr and "check_vma=False" not in jaxpr
