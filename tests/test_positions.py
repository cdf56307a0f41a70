"""Position encodings against formulas recomputed here in float64 NumPy, plus RoPE's relative-position property."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from transformer.ops.positions import alibi_slopes, apply_rope, rope_inv_freq, sinusoidal_embedding

D, THETA = 16, 10000.0


def base(theta=THETA, d=D):
    return np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])


def test_alibi_slopes_power_of_two():
    np.testing.assert_array_equal(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_array_equal(alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    assert alibi_slopes(8).dtype == np.float32


def test_alibi_slopes_non_power_of_two():
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set (2^-1, 2^-3)
    np.testing.assert_allclose(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8], rtol=1e-7)
    # 12 heads: the 8-head slopes, then every other slope of the 16-head set 2^-0.5k: k = 1, 3, 5, 7
    want12 = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(alibi_slopes(12), want12, rtol=1e-6)


def test_inv_freq_none_linear_ntk():
    inv, mscale = rope_inv_freq(D)
    assert inv.dtype == np.float32 and inv.shape == (D // 2,) and mscale == 1.0
    np.testing.assert_allclose(inv, base(), rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(D, scaling="linear", factor=4.0)[0], base() / 4, rtol=1e-6)
    ntk_theta = THETA * 4.0 ** (D / (D - 2))
    np.testing.assert_allclose(rope_inv_freq(D, scaling="ntk", factor=4.0)[0], base(ntk_theta), rtol=1e-6)
    # NTK keeps the highest frequency and divides the lowest by exactly the factor
    ntk = rope_inv_freq(D, scaling="ntk", factor=4.0)[0]
    assert ntk[0] == 1.0 and math.isclose(base()[-1] / ntk[-1], 4.0, rel_tol=1e-5)


def test_inv_freq_dynamic_ntk():
    kw = dict(scaling="dynamic_ntk", factor=2.0, original_max_len=128)
    np.testing.assert_array_equal(rope_inv_freq(D, seq_len=128, **kw)[0], rope_inv_freq(D)[0])
    np.testing.assert_array_equal(rope_inv_freq(D, seq_len=64, **kw)[0], rope_inv_freq(D)[0])
    grown = THETA * ((2.0 * 512 / 128) - (2.0 - 1)) ** (D / (D - 2))
    np.testing.assert_allclose(rope_inv_freq(D, seq_len=512, **kw)[0], base(grown), rtol=1e-6)


def _np_yarn(d, theta, factor, orig, beta_fast, beta_slow):
    def dim_for(rotations):  # the dim index whose wavelength fits `rotations` times into orig
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), d - 1)
    out = []
    for i, f in enumerate(base(theta, d)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep (high freq), 1: interpolate (low freq)
        out.append((1 - ramp) * f + ramp * f / factor)
    return np.array(out)


def test_yarn_deepseek_mscales_set_the_rotation_factor_as_their_ratio():
    m = lambda a: 0.1 * a * math.log(40.0) + 1
    plain, default = rope_inv_freq(64, scaling="yarn", factor=40.0, original_max_len=4096)
    inv, ratio = rope_inv_freq(64, scaling="yarn", factor=40.0, original_max_len=4096, yarn_mscale=1.0,
                               yarn_mscale_all_dim=0.707)
    np.testing.assert_array_equal(inv, plain)  # frequencies are YaRN's
    assert math.isclose(default, m(1.0)) and math.isclose(ratio, m(1.0) / m(0.707), rel_tol=1e-12)
    assert rope_inv_freq(64, scaling="yarn", factor=40.0, original_max_len=4096, yarn_mscale=0.707,
                         yarn_mscale_all_dim=0.707)[1] == 1.0  # DeepSeek-V2(-Lite): no rotation factor
    assert rope_inv_freq(64, scaling="yarn", factor=40.0, original_max_len=4096,
                         yarn_mscale_all_dim=0.707)[1] == default  # one alone: YaRN's, as transformers reads it


def test_inv_freq_yarn():
    d, factor, orig = 64, 8.0, 256
    inv, mscale = rope_inv_freq(d, scaling="yarn", factor=factor, original_max_len=orig)
    want = _np_yarn(d, THETA, factor, orig, 32.0, 1.0)
    np.testing.assert_allclose(inv, want, rtol=1e-6)
    assert math.isclose(mscale, 0.1 * math.log(factor) + 1, rel_tol=1e-12)
    b = base(THETA, d)
    assert inv[0] == np.float32(b[0]) and math.isclose(inv[-1], b[-1] / factor, rel_tol=1e-6)
    between = (inv < b * (1 - 1e-6)) & (inv > b / factor * (1 + 1e-6))
    assert between.any(), "the ramp must blend some dims"


def test_inv_freq_llama3():
    d, factor, orig, lo, hi = 64, 8.0, 512, 1.0, 4.0
    inv, mscale = rope_inv_freq(d, scaling="llama3", factor=factor, original_max_len=orig, low_freq_factor=lo,
                                high_freq_factor=hi)
    assert mscale == 1.0
    want = []
    for f in base(THETA, d):
        wavelength = 2 * math.pi / f
        if wavelength < orig / hi:
            want.append(f)
        elif wavelength > orig / lo:
            want.append(f / factor)
        else:
            smooth = (orig / wavelength - lo) / (hi - lo)
            want.append((1 - smooth) * f / factor + smooth * f)
    want = np.array(want)
    np.testing.assert_allclose(inv, want, rtol=1e-6)
    b = base(THETA, d)
    kinds = {"kept": np.isclose(want, b), "divided": np.isclose(want, b / factor)}
    assert kinds["kept"].any() and kinds["divided"].any() and (~kinds["kept"] & ~kinds["divided"]).any()


def _np_rope(x, pos, inv, mscale=1.0):
    half = x.shape[-1] // 2
    out = np.empty_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for l in range(x.shape[1]):
            for i in range(half):
                c, s = math.cos(pos[b, l] * inv[i]), math.sin(pos[b, l] * inv[i])
                a, bb = x[b, l, :, i], x[b, l, :, i + half]
                out[b, l, :, i], out[b, l, :, i + half] = a * c - bb * s, a * s + bb * c
    return out * mscale


def test_apply_rope_matches_numpy_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, D)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(2, 5)).astype(np.int32)
    inv, mscale = rope_inv_freq(D, scaling="yarn", factor=4.0, original_max_len=64)
    out = apply_rope(jnp.asarray(x), jnp.asarray(pos), inv, mscale)
    np.testing.assert_allclose(out, _np_rope(x, pos, inv.astype(np.float64), mscale), atol=2e-4, rtol=1e-4)
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos), inv).dtype == jnp.bfloat16


@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, D)).astype(np.float32)
    inv, mscale = rope_inv_freq(D, scaling=scaling, factor=4.0, original_max_len=64)
    L = 24
    pos = jnp.arange(L)[None]
    q_rot = np.asarray(apply_rope(jnp.broadcast_to(q, (1, L, 1, D)), pos, inv, mscale))[0, :, 0]
    k_rot = np.asarray(apply_rope(jnp.broadcast_to(k, (1, L, 1, D)), pos, inv, mscale))[0, :, 0]
    scores = q_rot @ k_rot.T
    for i, j, s in [(3, 1, 7), (10, 10, 5), (2, 9, 13), (0, 5, 18)]:
        assert math.isclose(scores[i, j], scores[i + s, j + s], rel_tol=1e-4, abs_tol=1e-4), (i, j, s)
    assert np.ptp([scores[i, 0] for i in range(L)]) > 0.1, "scores must vary with the offset"
    assert math.isclose(scores[0, 0], mscale**2 * float(q @ k), rel_tol=1e-4)


def test_sinusoidal_embedding_matches_vaswani():
    pos = np.array([[0, 1, 5, 100], [7, 3, 2, 9]], np.int32)
    d = 8
    emb = np.asarray(sinusoidal_embedding(jnp.asarray(pos), d))
    assert emb.shape == (2, 4, d) and emb.dtype == np.float32
    want = np.zeros((2, 4, d))
    for b in range(2):
        for l in range(4):
            for i in range(d // 2):
                want[b, l, 2 * i] = math.sin(pos[b, l] / 10000 ** (2 * i / d))
                want[b, l, 2 * i + 1] = math.cos(pos[b, l] / 10000 ** (2 * i / d))
    np.testing.assert_allclose(emb, want, atol=2e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: rope_inv_freq(15), "head_dim=15"),
    (lambda: rope_inv_freq(16, scaling="xpos"), "'xpos'.*'yarn'"),
    (lambda: rope_inv_freq(16, scaling="linear", factor=0.5), "factor=0.5"),
    (lambda: rope_inv_freq(16, theta=-1.0), "theta=-1.0"),
    (lambda: rope_inv_freq(16, scaling="yarn", factor=2.0), "original_max_len"),
    (lambda: rope_inv_freq(16, scaling="dynamic_ntk", factor=2.0, original_max_len=64), "seq_len"),
    (lambda: rope_inv_freq(16, scaling="llama3", factor=2.0, original_max_len=64, low_freq_factor=4.0,
                           high_freq_factor=1.0), "low_freq_factor=4.0"),
    (lambda: apply_rope(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 3)), np.ones(8, np.float32)), r"\(B, L, H, 16\)"),
    (lambda: apply_rope(jnp.zeros((1, 3, 2, 8)), jnp.zeros((1, 4)), np.ones(4, np.float32)), r"\(1, 4\)"),
    (lambda: sinusoidal_embedding(jnp.zeros((1, 3)), 7), "d_model=7"),
    (lambda: alibi_slopes(0), "num_heads=0"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
