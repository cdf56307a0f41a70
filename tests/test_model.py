"""Whole models: scan == unrolled, causality / bidirectionality by gradient, overfitting, MoE aux and router
bias through the scan, param metadata, dtypes, sharded forward passes."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from transformer import sharding
from transformer.config import ConfigError, MeshConfig, ModelConfig, MoEConfig
from transformer.layers.moe import RouterBias
from transformer.model import DecoderLM, EncoderDecoderLM, EncoderLM, build_model, count_params, flops_per_token
from transformer.ops.layout import to_zigzag

V, D, B, L = 64, 32, 2, 16
BASE = ModelConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                   attention_kernel="reference", attention_block_size=16)
MOE = dataclasses.replace(BASE, num_layers=3, moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=2,
                                                           router="sigmoid_bias", bias_update_rate=0.01))


def cfg_with(base=BASE, **kw):
    return dataclasses.replace(base, **kw)


def tokens(seed=0, batch=B, length=L):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _built(cfg):
    # an rbg key: init values differ from threefry's but compile about twice as fast on the shared CPUs
    return nnx.split(build_model(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))


def model_for(cfg):
    """A fresh model with the (cached) seed-0 initialisation for cfg; init compiles once per config."""
    return nnx.merge(*_built(cfg), copy=True)


@functools.lru_cache(maxsize=None)
def _jitted_call(graphdef, static):
    @jax.jit
    def f(state, args, arrays):
        m = nnx.merge(graphdef, state)
        return m(*args, **arrays, **dict(static)), nnx.state(m)

    return f


def call(model, *args, **kwargs):
    """model(*args, **kwargs) under jit (split -> jit -> merge); returns (output, new model state)."""
    graphdef, state = nnx.split(model)
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    return _jitted_call(graphdef, static)(state, args, arrays)


def unrolled_copy(cfg, scanned):
    """A model built from cfg (scan_layers=False) holding exactly the scanned model's parameters."""
    assert not cfg.scan_layers
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(scanned))
    stacked = pure["layers"]["groups"]
    num_groups = (cfg.num_layers - cfg.lead_layers) // cfg.layer_group_size
    pure["layers"]["groups"] = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(num_groups)}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def param_leaves(model_or_state):
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------- scan vs unrolled


def loss_and_grads(model, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean(logits**2) + aux["aux_loss"], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, nnx.to_pure_dict(grads)


def check_scan_equals_unrolled(scanned_cfg, unrolled_cfg):
    scanned = model_for(scanned_cfg)
    unrolled = unrolled_copy(unrolled_cfg, scanned)
    x = tokens()
    logits_s, grads_s = loss_and_grads(scanned, x)
    logits_u, grads_u = loss_and_grads(unrolled, x)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-6)
    groups = grads_s["layers"].pop("groups")
    for i, group in grads_u["layers"].pop("groups").items():
        jax.tree.map(lambda u, s: np.testing.assert_allclose(u, s[i], rtol=1e-4, atol=1e-7), group, groups)
    jax.tree.map(lambda u, s: np.testing.assert_allclose(u, s, rtol=1e-4, atol=1e-7), grads_u, grads_s)
    assert np.abs(grads_s["embed"]["tokens_VD"]).max() > 0


def test_scan_equals_unrolled_logits_and_grads():
    # the unrolled side also rematerialises: remat must not change values either
    check_scan_equals_unrolled(BASE, cfg_with(scan_layers=False, remat="dots_with_no_batch_dims_saveable"))


@pytest.mark.slow
def test_scan_equals_unrolled_with_moe_groups_and_leftover_layer():
    check_scan_equals_unrolled(cfg_with(MOE, remat="full"), cfg_with(MOE, scan_layers=False, remat="dots_saveable"))
    # both paths move the router bias alike (the unrolled one statefully, under nnx.jit)
    x = tokens()
    np.testing.assert_array_equal(router_bias(call(model_for(MOE), x)[1]), 0.0)  # no update unless asked
    (_, aux), state = call(model_for(MOE), x, update_router_bias=True)
    unrolled = unrolled_copy(cfg_with(MOE, scan_layers=False), model_for(MOE))
    nnx.jit(lambda m, x: m(x, update_router_bias=True))(unrolled, x)
    load = np.asarray(aux["moe/expert_load_NE"]).reshape(-1)
    np.testing.assert_allclose(router_bias(state), 0.01 * np.sign(load.mean() - load), atol=1e-7)
    np.testing.assert_allclose(router_bias(nnx.state(unrolled)), router_bias(state), atol=1e-7)


# ---------------------------------------------------------------- MoE aux and router bias


def router_bias(state) -> np.ndarray:
    biases = [v[...] for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, RouterBias))
              if isinstance(v, RouterBias)]
    assert len(biases) == 1
    return np.asarray(biases[0]).reshape(-1)


def test_moe_aux_stacked_and_router_bias_update_survives_scan():
    scanned = model_for(MOE)
    x = tokens()
    # the train-step pattern: update inside value_and_grad, read the non-Param state back out
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)

    def loss(params, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits, aux = model(x, update_router_bias=True)
        return jnp.mean(logits) + aux["aux_loss"], (aux, nnx.split(model, nnx.Param, ...)[2])

    (_, (aux, new_rest)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
    assert aux["moe/expert_load_NE"].shape == (1, 4)  # 3 layers, every 2nd is MoE: one MoE layer
    np.testing.assert_allclose(aux["moe/expert_load_NE"].sum(-1), 1.0, rtol=1e-6)
    want_aux = 1e-2 * aux["moe/load_balance_loss"].sum() + 1e-3 * aux["moe/router_z_loss"].sum()
    np.testing.assert_allclose(aux["aux_loss"], want_aux, rtol=1e-6)
    assert float(aux["aux_loss"]) > 0
    assert np.abs(np.asarray(grads["layers"]["groups"]["blocks"][1]["ffn"]["router_w"][...])).max() > 0
    load = np.asarray(aux["moe/expert_load_NE"]).reshape(-1)
    moved = router_bias(new_rest)
    np.testing.assert_allclose(moved, 0.01 * np.sign(load.mean() - load), atol=1e-7)
    assert np.abs(moved).max() > 0
    np.testing.assert_array_equal(router_bias(rest), 0.0)
    nnx.update(scanned, new_rest)
    np.testing.assert_array_equal(scanned.layers.groups.blocks[1].ffn.router_bias[...].reshape(-1), moved)


def test_dense_model_aux_is_zero():
    (logits, aux), _ = call(model_for(BASE), tokens())
    assert set(aux) == {"aux_loss"} and float(aux["aux_loss"]) == 0.0
    assert logits.shape == (B, L, V) and logits.dtype == jnp.float32


# ---------------------------------------------------------------- causality and bidirectionality


def input_jacobian_norms(model, length=L):
    """|d logits[0, t] / d x[0, s]| summed, for the embedded input x (all layers and the head included)."""
    graphdef, state = nnx.split(model)
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(1, length, D)), jnp.float32)

    def logits_of_x(x):
        m = nnx.merge(graphdef, state)
        h, _ = m.layers(x)
        h = m.final_norm(h) if m.final_norm is not None else h
        return m.logits(h)[0].sum(-1)

    jac = jax.jit(jax.jacrev(logits_of_x))(x0)  # (t, 1, s, D)
    return np.abs(np.asarray(jac)).sum(axis=(1, 3))


def test_decoder_is_causal_by_gradient():
    model = model_for(cfg_with(attention_kernel="auto"))
    norms = input_jacobian_norms(model)
    future = np.triu(np.ones((L, L), bool), k=1)
    assert np.all(norms[future] == 0.0)
    assert np.all(norms[~future] > 0)
    # the same through the token embedding: changing later tokens leaves earlier logits unchanged
    x = tokens()
    y = x.at[:, 10:].set((x[:, 10:] + 1) % V)
    (a, _), _ = call(model, x)
    (b, _), _ = call(model, y)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).min() > 0


def test_encoder_is_bidirectional_by_gradient():
    model = model_for(cfg_with(architecture="encoder"))
    assert isinstance(model, EncoderLM)
    assert np.all(input_jacobian_norms(model) > 0)


# ---------------------------------------------------------------- encoder-decoder


def test_encoder_decoder_shapes_and_cross_attention():
    cfg = cfg_with(architecture="encoder_decoder", num_encoder_layers=1)
    model = model_for(cfg)
    assert isinstance(model, EncoderDecoderLM)
    src, tgt = tokens(0, length=12), tokens(1, length=L)
    (logits, aux), _ = call(model, src, tgt)
    assert logits.shape == (B, L, V) and logits.dtype == jnp.float32 and float(aux["aux_loss"]) == 0.0
    # every target position reads the source
    (other, _), _ = call(model, src.at[:, 0].set((src[:, 0] + 1) % V), tgt)
    assert np.abs(np.asarray(other - logits)).max(-1).min() > 0
    # the decoder stays causal
    (later, _), _ = call(model, src, tgt.at[:, 9].set((tgt[:, 9] + 1) % V))
    np.testing.assert_array_equal(later[:, :9], logits[:, :9])
    # padded source tokens (segment 0) are invisible to target tokens (segment 1)
    src_seg = jnp.asarray(np.repeat((np.arange(12) < 8)[None].astype(np.int32), B, 0))
    kwargs = dict(source_segment_ids_BS=src_seg, segment_ids_BL=jnp.ones((B, L), jnp.int32))
    (padded, _), _ = call(model, src, tgt, **kwargs)
    (repadded, _), _ = call(model, src.at[:, 8:].set(0), tgt, **kwargs)
    np.testing.assert_allclose(padded, repadded, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- training


def test_tiny_model_overfits_fixed_batch():
    model = model_for(BASE)
    batch = tokens(0, batch=4, length=33)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits, aux = nnx.merge(graphdef, params, rest)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean() + aux["aux_loss"]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert abs(losses[0] - math.log(V)) < 0.1  # small init: near-uniform predictions
    assert losses[-1] < 0.2 * math.log(V), losses


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa"])
def test_gqa_mqa_shapes(kv_heads):
    model = nnx.eval_shape(lambda: build_model(cfg_with(num_kv_heads=kv_heads), rngs=nnx.Rngs(0)))
    attn = model.layers.groups.blocks[0].attn
    assert attn.q_DHW.shape == (2, D, 4, 8)
    assert attn.k_DGW.shape == attn.v_DGW.shape == (2, D, kv_heads, 8)
    graphdef, state = nnx.split(model)
    logits, _ = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, tokens())
    assert logits.shape == (B, L, V) and logits.dtype == jnp.float32


def test_tied_vs_untied():
    tied = model_for(BASE)
    untied = model_for(cfg_with(tie_embeddings=False))
    assert count_params(untied) - count_params(tied) == D * V
    h, _ = call(untied, tokens(), return_hidden=True)
    (logits, _), _ = call(untied, tokens())
    want = np.asarray(h[0], np.float64) @ np.asarray(untied.embed.unembed_DV[...], np.float64)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(untied.embed.unembed_DV[...], untied.embed.tokens_VD[...].T)


def test_pre_and_post_norm():
    pre = model_for(cfg_with(norm="layernorm"))
    post = model_for(cfg_with(norm="layernorm", norm_position="post"))
    assert pre.final_norm is not None and post.final_norm is None
    (h_pre, _), _ = call(pre, tokens(), return_hidden=True)
    (h_post, _), _ = call(post, tokens(), return_hidden=True)
    # both end normalised (final norm vs the last block's norm) but differ
    np.testing.assert_allclose(np.asarray(h_pre).mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h_post).mean(-1), 0.0, atol=1e-5)
    assert np.abs(np.asarray(h_pre - h_post)).max() > 1e-3


@pytest.mark.parametrize("position", ["rope", "alibi", "sinusoidal", "learned", "nope"])
def test_position_types_and_shift_invariance(position):
    model = model_for(cfg_with(position=position))
    x = tokens()
    base = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    (logits, _), _ = call(model, x, positions_BL=base)
    (shifted, _), _ = call(model, x, positions_BL=base + 7)
    assert np.all(np.isfinite(logits))
    if position in ("rope", "alibi", "nope"):  # relative or no positions: a constant shift changes nothing
        np.testing.assert_allclose(shifted, logits, rtol=1e-4, atol=1e-5)
    else:
        assert np.abs(np.asarray(shifted - logits)).max() > 1e-4


def test_learned_positions_beyond_max_seq_len_raise():
    model = model_for(cfg_with(position="learned", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        call(model, tokens(length=17))


@pytest.mark.parametrize("scaling", ["linear", "ntk", "llama3"])  # dynamic_ntk, yarn: test_layers
def test_rope_scalings_run_beyond_trained_length(scaling):
    model = model_for(cfg_with(rope_scaling=scaling, rope_scaling_factor=2.0, max_seq_len=8))
    (logits, _), _ = call(model, tokens(length=L))
    assert logits.shape == (B, L, V) and np.all(np.isfinite(logits))


def test_bfloat16_compute():
    f32 = model_for(BASE)
    bf16 = model_for(cfg_with(dtype="bfloat16"))
    assert all(v.dtype == jnp.float32 for _, v in param_leaves(bf16))
    (h, _), _ = call(bf16, tokens(), return_hidden=True)
    assert h.dtype == jnp.bfloat16
    (got, _), _ = call(bf16, tokens())
    (want, _), _ = call(f32, tokens())
    assert got.dtype == jnp.float32
    scale = np.abs(np.asarray(want)).max()
    assert np.abs(np.asarray(got - want)).max() < 0.05 * scale


def test_bad_inputs_raise():
    model = model_for(BASE)
    with pytest.raises(ValueError, match="tokens_BL must be 2-D"):
        model(jnp.zeros((L,), jnp.int32))
    with pytest.raises(ValueError, match="positions_BL has shape"):
        model(tokens(), positions_BL=jnp.zeros((B, L + 1), jnp.int32))
    with pytest.raises(ConfigError, match="model.architecture"):
        build_model(cfg_with(architecture="rnn"), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- params, init, FLOPs


CONFIGS = {
    "scan": BASE,
    "unrolled_untied_layernorm": cfg_with(scan_layers=False, tie_embeddings=False, norm="layernorm"),
    "moe_learned": cfg_with(MOE, position="learned"),
    "encoder_decoder": cfg_with(architecture="encoder_decoder"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_has_logical_axes(name):
    cfg = CONFIGS[name]
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    leaves = param_leaves(model)
    assert len(leaves) > 5
    for path, var in leaves:
        axes = var.get_metadata().get("logical_axes")
        where = jax.tree_util.keystr(path)
        assert axes is not None and len(axes) == len(var.shape), (where, axes, var.shape)
        assert all(a is None or a in sharding.LOGICAL_AXES for a in axes), (where, axes)
        stacked = cfg.scan_layers and "groups" in where
        assert (axes[0] == "layers") == stacked, (where, axes)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding.state_shardings(nnx.state(model), mesh)


def test_init_scales():
    model = model_for(BASE)  # init_std 0.02, 2 layers: output projections 0.02 / sqrt(4)
    blocks = model.layers.groups.blocks[0]
    std = lambda p: float(np.std(np.asarray(p[...])))
    assert abs(std(model.embed.tokens_VD) / 0.02 - 1) < 0.1
    assert abs(std(blocks.attn.q_DHW) / 0.02 - 1) < 0.1
    for out in (blocks.attn.o_HWD, blocks.ffn.down_FD):
        assert abs(std(out) / 0.01 - 1) < 0.1
    np.testing.assert_array_equal(blocks.attn_norm.scale[...], 1.0)


def test_count_params_and_flops_per_token():
    model = model_for(BASE)
    Hd, Gd, F = 4 * 8, 2 * 8, BASE.ffn_dim
    matmuls = 2 * (2 * D * Hd + 2 * D * Gd + 3 * D * F)
    norms = 2 * 2 * D + D
    assert count_params(model) == V * D + matmuls + norms
    want = 6 * (matmuls + D * V) + 12 * 2 * Hd * 128
    assert flops_per_token(BASE, 128) == want
    assert flops_per_token(cfg_with(sliding_window=32), 128) == want - 12 * 2 * Hd * 96
    moe_cfg = cfg_with(num_layers=2, moe=MoEConfig(num_experts=8, top_k=2, every_k_layers=2))
    moe_layer = 2 * D * Hd + 2 * D * Gd + D * 8 + 2 * 3 * D * F
    assert flops_per_token(moe_cfg, 128) == want + 6 * (moe_layer - (2 * D * Hd + 2 * D * Gd + 3 * D * F))


# ---------------------------------------------------------------- on a mesh


def test_sharded_forward_matches_single_device():
    cfg = cfg_with(tie_embeddings=False)
    model = model_for(cfg)
    x = tokens(0, batch=4)
    (want, _), _ = call(model, x)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    assert state["layers"]["groups"]["blocks"][0]["attn"]["q_DHW"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    with sharding.use_mesh(mesh):
        got, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def ring_logits(model, x_BL, ring: int = 2):
    """The model's logits on a `sequence=ring` mesh, tokens and positions in zigzag order (as place_batch lays
    them out)."""
    positions = jnp.broadcast_to(jnp.arange(x_BL.shape[1], dtype=jnp.int32), x_BL.shape)
    mesh = sharding.make_mesh(MeshConfig(data=1, sequence=ring), jax.devices()[:ring])
    graphdef, state = nnx.split(model)
    with sharding.use_mesh(mesh):
        logits, _ = jax.jit(lambda s, x, p: nnx.merge(graphdef, s)(x, positions_BL=p))(
            state, to_zigzag(x_BL, ring), to_zigzag(positions, ring))
    return logits


def test_sequence_parallel_ring_in_zigzag_order_matches_dense():
    model = model_for(cfg_with(attention_kernel="blockwise", attention_block_size=8))
    x = tokens(0)
    (want, _), _ = call(model, x)
    np.testing.assert_allclose(ring_logits(model, x), to_zigzag(want, 2), rtol=1e-5, atol=1e-6)
