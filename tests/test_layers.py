"""Layers (norms, MLP, embedding, attention, block) against float64 NumPy recomputations."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scipy.special import erf

from attention_oracle import np_attention as oracle_attention
from transformer import sharding
from transformer.config import MeshConfig, ModelConfig
from transformer.layers import attention as attention_layer
from transformer.layers.attention import Attention
from transformer.layers.block import Block
from transformer.layers.embed import Embed
from transformer.layers.mlp import MLP, activation
from transformer.layers.norms import LayerNorm, RMSNorm
from transformer.ops import positions as pos_ops

B, L, D, H = 2, 16, 32, 4
BASE = ModelConfig(vocab_size=64, d_model=D, num_layers=2, num_heads=H, num_kv_heads=2, max_seq_len=32,
                   attention_kernel="reference", attention_block_size=16, init_std=0.2)


def cfg_with(**kw):
    return dataclasses.replace(BASE, **kw)


def run(module, *args, method="__call__", **kwargs):
    """Apply `module.method` functionally under jit (split -> jit -> merge)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def f(state, args, kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return f(state, args, kwargs)


def arr(module_param):
    return np.asarray(module_param[...], np.float64)


def x_BLD(seed=0, length=L):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, length, D)), jnp.float32)


# ---------------------------------------------------------------- norms


def test_norms_match_numpy_with_float32_statistics():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(B, L, D))
    rms, ln = RMSNorm(D, eps=1e-6), LayerNorm(D, eps=1e-6)
    rng = np.random.default_rng(1)
    rms.scale[...] = jnp.asarray(rng.normal(size=D), jnp.float32)
    ln.scale[...] = jnp.asarray(rng.normal(size=D), jnp.float32)
    ln.bias[...] = jnp.asarray(rng.normal(size=D), jnp.float32)
    want_rms = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * arr(rms.scale)
    centred = x - x.mean(-1, keepdims=True)
    want_ln = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 1e-6) * arr(ln.scale) + arr(ln.bias)
    np.testing.assert_allclose(run(rms, jnp.asarray(x, jnp.float32)), want_rms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(ln, jnp.asarray(x, jnp.float32)), want_ln, rtol=1e-5, atol=1e-5)
    # bfloat16 in, bfloat16 out, statistics still float32 (a bf16 mean of 3.0 +- 2 would be off by ~1e-2)
    out = run(ln, jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    x_bf = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    c = x_bf - x_bf.mean(-1, keepdims=True)
    want = c / np.sqrt(np.mean(c**2, -1, keepdims=True) + 1e-6) * arr(ln.scale) + arr(ln.bias)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- MLP


_NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@pytest.mark.parametrize("mlp_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
def test_mlp_matches_numpy(activation, mlp_bias):
    cfg = cfg_with(activation=activation, d_ff=48, mlp_bias=mlp_bias)
    mlp = MLP(cfg, num_layers=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    for bias in (mlp.up_bias, mlp.gate_bias, mlp.down_bias):
        if bias is not None:
            bias[...] = jnp.asarray(rng.normal(size=bias.shape), jnp.float32)
            assert bias.logical_axes in (("mlp",), ("embed",))
    b = lambda p: 0.0 if p is None else arr(p)
    x = x_BLD()
    xn = np.asarray(x, np.float64)
    up = xn @ arr(mlp.up_DF) + b(mlp.up_bias)
    if activation == "swiglu":
        gate = xn @ arr(mlp.gate_DF) + b(mlp.gate_bias)
        h = gate / (1 + np.exp(-gate)) * up
    else:
        assert mlp.gate_DF is None
        h = _NP_ACTIVATIONS[activation](up)
    np.testing.assert_allclose(run(mlp, x), h @ arr(mlp.down_FD) + b(mlp.down_bias), rtol=1e-4, atol=1e-4)
    assert mlp.up_DF.logical_axes == ("embed", "mlp") and mlp.down_FD.logical_axes == ("mlp", "embed")
    assert (mlp.down_bias is not None) == mlp_bias


@pytest.mark.parametrize("name, other", [("gelu", "gelu_tanh"), ("gelu_tanh", "gelu")])
def test_gelu_is_exact_erf_and_gelu_tanh_the_approximation(name, other):
    x = np.linspace(-4, 4, 401)
    got = np.asarray(activation(name)(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, _NP_ACTIVATIONS[name](x), atol=2e-6)
    assert np.abs(got - _NP_ACTIVATIONS[other](x)).max() > 1e-4  # the two are told apart


# ---------------------------------------------------------------- embedding


def _np_sinusoid(pos, d):
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv
    out = np.zeros(pos.shape + (d,))
    out[..., 0::2], out[..., 1::2] = np.sin(ang), np.cos(ang)
    return out


@pytest.mark.parametrize("position, embed_scale, multiplier", [
    ("learned", "auto", math.sqrt(D)), ("sinusoidal", "auto", math.sqrt(D)), ("rope", "auto", 1.0),
    ("sinusoidal", "none", 1.0), ("rope", "sqrt_d", math.sqrt(D)), ("alibi", "auto", 1.0), ("nope", "auto", 1.0)])
def test_embedding_scales_tokens_then_adds_absolute_positions(position, embed_scale, multiplier):
    embed = Embed(cfg_with(position=position, embed_scale=embed_scale), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
    positions = rng.integers(0, 32, (B, L)).astype(np.int32)
    want = arr(embed.tokens_VD)[tokens] * multiplier
    if position == "learned":
        want = want + arr(embed.position_table)[positions]
    elif position == "sinusoidal":
        want = want + _np_sinusoid(positions.astype(np.float64), D)
    else:
        assert embed.position_table is None
    got = run(embed, jnp.asarray(tokens), jnp.asarray(positions))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_learned_positions_beyond_table_raise():
    embed = Embed(cfg_with(position="learned", max_seq_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        run(embed, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="position id 8 .*max_seq_len=8"):
        embed(jnp.zeros((1, 4), jnp.int32), jnp.asarray([[0, 1, 2, 8]], jnp.int32))


@pytest.mark.parametrize("tied", [True, False])
def test_output_projection_tied_or_untied(tied):
    embed = Embed(cfg_with(tie_embeddings=tied, position="sinusoidal"), rngs=nnx.Rngs(0))  # input scaled, output not
    h = x_BLD()
    w = arr(embed.tokens_VD).T if tied else arr(embed.unembed_DV)
    assert (embed.unembed_DV is None) == tied
    logits = run(embed, h, method="logits")
    assert logits.dtype == jnp.float32 and logits.shape == (B, L, 64)
    np.testing.assert_allclose(logits, np.asarray(h, np.float64) @ w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- attention


def _np_rope(x, pos, inv_freq, mscale=1.0):
    half = x.shape[-1] // 2
    ang = pos[:, :, None, None] * inv_freq
    cos, sin = np.cos(ang) * mscale, np.sin(ang) * mscale
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(layer, x, *, positions, causal=True, window=0, seg=None, rope=None, slopes=None, context=None,
                 ctx_seg=None):
    """float64 attention layer: projections here, attention from the shared oracle."""
    x = np.asarray(x, np.float64)
    src = x if context is None else np.asarray(context, np.float64)
    bias = lambda p, *shape: 0.0 if p is None else arr(p).reshape(shape)
    H_, W_, G_ = layer.q_DHW.shape[1], layer.q_DHW.shape[2], layer.k_DGW.shape[1]
    q = np.einsum("bld,dhw->blhw", x, arr(layer.q_DHW)) + bias(layer.q_bias, H_, W_)
    k = np.einsum("bsd,dgw->bsgw", src, arr(layer.k_DGW)) + bias(layer.k_bias, G_, W_)
    v = np.einsum("bsd,dgw->bsgw", src, arr(layer.v_DGW)) + bias(layer.v_bias, G_, W_)
    if rope is not None:
        q, k = _np_rope(q, positions, *rope), _np_rope(k, positions, *rope)
    S = src.shape[1]
    kv_pos = positions if context is None else np.broadcast_to(np.arange(S), (x.shape[0], S))
    kv_seg = seg if ctx_seg is None or seg is None else ctx_seg
    out, _ = oracle_attention(q, k, v, causal=causal, q_pos=positions, kv_pos=kv_pos, q_seg=seg, kv_seg=kv_seg,
                              window=window, slopes=slopes)
    return np.einsum("bqhw,hwd->bqd", out, arr(layer.o_HWD)) + bias(layer.o_bias, layer.o_HWD.shape[2])


def randomise_biases(layer, seed=4):
    """Biases are initialised to 0: give the layer's (if any) random values, so the references see them."""
    rng = np.random.default_rng(seed)
    found = [b for b in (layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias) if b is not None]
    for b in found:
        b[...] = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
    return len(found)


def _base_inv_freq(d, theta=10000.0):
    return theta ** (-np.arange(0, d, 2) / d)


ATTENTION_CASES = {
    "mha_rope_causal": dict(cfg=dict(num_kv_heads=0), causal=True),
    "gqa_rope_packed": dict(cfg=dict(num_kv_heads=2), causal=True, packed=True),
    "mqa_alibi_bidirectional": dict(cfg=dict(num_kv_heads=1, position="alibi"), causal=False),
    "gqa_nope_window": dict(cfg=dict(position="nope", sliding_window=3), causal=True),
    "bidirectional_window_blockwise": dict(cfg=dict(position="nope", sliding_window=5, attention_kernel="blockwise",
                                                    attention_block_size=8), causal=False),
    "gqa_rope_qkv_bias_packed": dict(cfg=dict(num_kv_heads=2, attention_bias="qkv"), causal=True, packed=True,
                                     biases=3),
    "mqa_alibi_all_biases_bidirectional": dict(cfg=dict(num_kv_heads=1, position="alibi", attention_bias="all"),
                                               causal=False, biases=4),
    # attention_pattern: layer 2 of "local,global,local" is local (window 3), layer 4 global (no window)
    "pattern_local_layer": dict(cfg=dict(position="nope", sliding_window=3, attention_pattern="local,global,local",
                                         num_layers=6), causal=True, layer=2, window=3),
    "pattern_global_layer": dict(cfg=dict(position="nope", sliding_window=3, attention_pattern="local,global,local",
                                          num_layers=6), causal=True, layer=4, window=0),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_self_attention_matches_numpy(name):
    case = ATTENTION_CASES[name]
    cfg = cfg_with(**case["cfg"])
    layer = Attention(cfg, num_layers=2, causal=case["causal"], layer=case.get("layer", 0), rngs=nnx.Rngs(0))
    G = cfg.kv_heads
    assert layer.q_DHW.shape == (D, H, 8) and layer.k_DGW.shape == (D, G, 8) and layer.o_HWD.shape == (H, 8, D)
    assert randomise_biases(layer) == case.get("biases", 0)
    x = x_BLD()
    rng = np.random.default_rng(3)
    seg = None
    if case.get("packed"):  # two documents per row, positions restart at each document, shifted start
        cut = [5, 11]
        seg = np.stack([(np.arange(L) >= c).astype(np.int32) for c in cut])
        positions = np.stack([np.where(np.arange(L) >= c, np.arange(L) - c, np.arange(L) + 3) for c in cut])
    else:
        positions = np.broadcast_to(np.arange(L), (B, L)) + rng.integers(0, 5, (B, 1))
    rope = (_base_inv_freq(8), 1.0) if cfg.position == "rope" else None
    slopes = np.asarray(pos_ops.alibi_slopes(H), np.float64) if cfg.position == "alibi" else None
    window = case.get("window", cfg.sliding_window)
    want = np_attention(layer, x, positions=positions, causal=case["causal"], window=window, seg=seg, rope=rope,
                        slopes=slopes)
    got = run(layer, x, positions_BL=jnp.asarray(positions, jnp.int32),
              segment_ids_BL=None if seg is None else jnp.asarray(seg))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scaling", ["dynamic_ntk", "yarn"])
def test_rope_scaling_uses_current_length_and_mscale(scaling):
    length = 40  # > max_seq_len=32, so dynamic NTK is active
    cfg = cfg_with(num_kv_heads=0, rope_scaling=scaling, rope_scaling_factor=4.0)
    layer = Attention(cfg, num_layers=2, causal=True, rngs=nnx.Rngs(0))
    x = x_BLD(length=length)
    positions = np.broadcast_to(np.arange(length), (B, length))
    inv_freq, mscale = pos_ops.rope_inv_freq(8, scaling=scaling, factor=4.0, original_max_len=32, seq_len=length)
    if scaling == "yarn":
        assert mscale > 1.0
    else:
        assert mscale == 1.0 and not np.allclose(inv_freq, _base_inv_freq(8))
    want = np_attention(layer, x, positions=positions, rope=(np.asarray(inv_freq, np.float64), mscale))
    np.testing.assert_allclose(run(layer, x), want, rtol=1e-4, atol=1e-4)


def test_cross_attention_matches_numpy_with_segments():
    cfg = cfg_with(num_kv_heads=1)
    layer = Attention(cfg, num_layers=2, cross=True, rngs=nnx.Rngs(0))
    x, context = x_BLD(0), x_BLD(1, length=10)
    seg = np.ones((B, L), np.int32)
    seg[:, 12:] = 2
    ctx_seg = np.ones((B, 10), np.int32)
    ctx_seg[:, 6:] = 2
    ctx_seg[1, 8:] = 0  # padding: seen by no query
    want = np_attention(layer, x, positions=np.broadcast_to(np.arange(L), (B, L)), causal=False, seg=seg,
                        context=context, ctx_seg=ctx_seg)
    got = run(layer, x, segment_ids_BL=jnp.asarray(seg), context_BSD=context,
              context_segment_ids_BS=jnp.asarray(ctx_seg))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="context_BSD"):
        layer(x)


def test_kernel_choice_follows_config_and_mesh(monkeypatch):
    calls = []
    real_attention, real_ring = attention_layer.attention_ops.attention, attention_layer.ring_attention_sharded

    def spy_attention(*args, **kwargs):
        calls.append(("dense", kwargs["implementation"], kwargs["block_size"]))
        return real_attention(*args, **kwargs)

    def spy_ring(*args, **kwargs):
        calls.append(("ring", kwargs["implementation"], kwargs["block_size"]))
        return real_ring(*args, **kwargs)

    monkeypatch.setattr(attention_layer.attention_ops, "attention", spy_attention)
    monkeypatch.setattr(attention_layer, "ring_attention_sharded", spy_ring)
    cfg = cfg_with(attention_kernel="blockwise", attention_block_size=8)
    layer = Attention(cfg, num_layers=2, causal=True, rngs=nnx.Rngs(0))
    x = x_BLD()
    dense = run(layer, x)
    mesh = sharding.make_mesh(MeshConfig(data=1, sequence=2), jax.devices()[:2])
    with sharding.use_mesh(mesh):
        ring = run(layer, x)
    assert calls[:2] == [("dense", "blockwise", 8), ("ring", "blockwise", 8)]  # the ring then runs its blocks
    np.testing.assert_allclose(ring, dense, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- block


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_residual_wiring(norm_position):
    cfg = cfg_with(norm_position=norm_position, norm="layernorm")
    block = Block(cfg, num_layers=2, causal=True, rngs=nnx.Rngs(0))
    x = x_BLD()
    got, aux = run(block, x)
    assert aux == {}

    def manual(block, x):
        attn = lambda h: block.attn(h)
        if norm_position == "pre":
            h = x + attn(block.attn_norm(x))
            return h + block.ffn(block.ffn_norm(h))
        h = block.attn_norm(x + attn(x))
        return block.ffn_norm(h + block.ffn(h))

    graphdef, state = nnx.split(block)
    want = jax.jit(lambda s, x: manual(nnx.merge(graphdef, s), x))(state, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if norm_position == "post":  # every token of the output is layer-normalised
        np.testing.assert_allclose(np.asarray(got).mean(-1), 0.0, atol=1e-5)
