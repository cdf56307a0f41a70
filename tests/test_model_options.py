"""model.attention_pattern, model.attention_bias and model.mlp_bias through whole models: config errors, the
keys each layer sees (by gradient), scanned == unrolled with the groups a pattern makes, Ring Attention == one
device, FLOPs and cache slots per layer, the biases' axes, sharding and weight decay.

Elsewhere: layers with biases and both GELUs against float64 NumPy (test_layers, test_moe), decode == forward
with biases and patterns (test_inference), Qwen2 / GPT-2 / Llama with biases against float64 NumPy and
transformers (test_hf_convert)."""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_model import (BASE, D, L, call, check_scan_equals_unrolled, cfg_with, model_for, ring_logits, tokens,
                        unrolled_copy)
from transformer import sharding
from transformer.config import ConfigError, MeshConfig, MoEConfig, config_from_args
from transformer.inference.cache import num_slots
from transformer.model import build_model, flops_per_token
from transformer.ops.layout import to_zigzag
from transformer.train import decays

WINDOW = 3
PATTERN = cfg_with(num_layers=3, attention_pattern="local,global", sliding_window=WINDOW)  # local, global, local


def with_random_biases(model, seed=0):
    """The model with every projection bias (zero at init) drawn from N(0, 0.2)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def fill(path, value):
        name = str(path[-1].key)
        if name.endswith("_bias") and name != "router_bias":
            return jnp.asarray(0.2 * rng.standard_normal(value.shape), value.dtype)
        return value

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def abstract(cfg):
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def num_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def blocks_in_order(model):
    """An unrolled model's blocks, layer 0 first (the dense lead, the groups, then the leftover group)."""
    groups = list(model.layers.groups) if model.layers.groups is not None else []
    lead = list(model.layers.lead.blocks) if model.layers.lead else []
    return lead + [b for g in groups for b in g.blocks] + (list(model.layers.leftover.blocks) if model.layers.leftover
                                                           else [])


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("changes, expected", [
    (dict(attention_pattern="local,glob", sliding_window=3),
     "model.attention_pattern='local,glob' has entry 'glob'; write a comma list of 'local' and 'global'"),
    (dict(attention_pattern="local,global"),
     "model.attention_pattern='local,global' has local layers: set model.sliding_window > 0"),
    (dict(attention_pattern="global", sliding_window=4),
     "model.attention_pattern='global' has no local layer, so model.sliding_window=4 would be unused"),
    (dict(attention_pattern="local,global,local", sliding_window=2),
     "model.attention_pattern='local,global,local' has 3 entries, more than model.num_layers=2"),
    (dict(attention_bias="q"), "model.attention_bias='q' is not valid; choose one of 'none', 'qkv', 'all'"),
    (dict(activation="gelu_new"), "model.activation='gelu_new' is not valid; choose one of 'relu', 'gelu', "
                                  "'gelu_tanh', 'swiglu'"),
])
def test_bad_options_are_refused_with_one_line(changes, expected):
    with pytest.raises(ConfigError) as error:
        cfg_with(**changes).validate()
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_options_from_the_command_line():
    cfg = config_from_args(["model.num_layers=4", "model.attention_pattern=local, local,global",
                            "model.sliding_window=8", "model.attention_bias=qkv", "model.mlp_bias=true",
                            "model.activation=gelu_tanh"]).model
    assert cfg.attention_kinds == ("local", "local", "global") and cfg.attention_bias == "qkv" and cfg.mlp_bias
    assert [cfg.layer_window(i) for i in range(4)] == [8, 8, 0, 8]  # cycled: layer 3 takes entry 0


# ---------------------------------------------------------------- what each layer sees


def test_local_layers_see_only_their_window_and_global_ones_everything():
    model = with_random_biases(model_for(cfg_with(PATTERN, scan_layers=False, attention_bias="all")))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(L, D)), jnp.float32)
    q, k = np.arange(L)[:, None], np.arange(L)[None]
    blocks = blocks_in_order(model)
    assert len(blocks) == 3 and len(model.layers.leftover.blocks) == 1  # group (local, global) + leftover local
    for layer, (block, window) in enumerate(zip(blocks, [WINDOW, 0, WINDOW])):
        graphdef, state = nnx.split(block)
        out = lambda x: nnx.merge(graphdef, state)(x[None])[0][0].sum(-1)
        norms = np.abs(np.asarray(jax.jit(jax.jacrev(out))(x))).sum(-1)  # (t, s): d out[t] / d x[s]
        visible = (k <= q) & ((q - k < window) if window else True)
        assert np.all(norms[~visible] == 0) and np.all(norms[visible] > 0), layer


@pytest.mark.slow
def test_scan_equals_unrolled_with_pattern_groups_of_moe_blocks_and_a_leftover_moe_layer():
    # every layer MoE, a pattern of 2: scanned groups of 2 MoE blocks and a leftover MoE layer (window 3)
    moe = MoEConfig(num_experts=4, top_k=2, every_k_layers=1, router="mixtral", capacity_factor=1.0,
                    num_shared_experts=1)
    cfg = cfg_with(PATTERN, moe=moe, attention_bias="qkv", mlp_bias=True, activation="gelu")
    assert cfg.layer_group_size == 2
    check_scan_equals_unrolled(cfg, cfg_with(cfg, scan_layers=False))
    scanned = model_for(cfg)
    leftover = scanned.layers.leftover.blocks[0]
    assert leftover.moe and leftover.attn.mask.sliding_window == WINDOW
    (_, aux), _ = call(scanned, tokens())
    (_, aux_unrolled), _ = call(unrolled_copy(cfg_with(cfg, scan_layers=False), scanned), tokens())
    assert aux["moe/expert_load_NE"].shape == (3, 4)  # one row per MoE layer, in layer order
    for name, value in aux.items():
        np.testing.assert_allclose(value, aux_unrolled[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow  # keeps the default suite under 15 minutes; the lead group decodes in test_inference and
# imports against float64 in test_hf_convert (deepseek_v2)
def test_first_dense_layers_lead_the_scanned_moe_groups_and_scan_equals_unrolled():
    # DeepSeek's layout: layer 0 dense, then (MoE local, MoE global) groups, one leftover MoE local layer
    moe = MoEConfig(num_experts=4, top_k=2, first_dense_layers=1, router_groups=2, router_top_groups=1,
                    routed_scale=2.0, num_shared_experts=1, d_ff_expert=16, capacity_factor=1.0)
    cfg = cfg_with(PATTERN, num_layers=4, moe=moe)
    check_scan_equals_unrolled(cfg, cfg_with(cfg, scan_layers=False))
    blocks = blocks_in_order(model_for(cfg_with(cfg, scan_layers=False)))
    assert [b.moe for b in blocks] == [False, True, True, True]
    assert [b.attn.mask.sliding_window for b in blocks] == [WINDOW, 0, WINDOW, 0]  # the pattern by layer index
    scanned = model_for(cfg)
    assert scanned.layers.lead is not None and not scanned.layers.lead.blocks[0].moe
    assert scanned.layers.groups.blocks[0].attn.mask.sliding_window == 0  # group 0 = layers 1, 2
    (_, aux), _ = call(scanned, tokens())
    assert aux["moe/expert_load_NE"].shape == (3, 4)  # the three MoE layers only
    dense = num_params(abstract(cfg_with(cfg, moe=MoEConfig())))
    assert num_params(abstract(cfg)) - dense == 3 * (D * 4 + 5 * 3 * D * 16 - 3 * D * cfg.ffn_dim)
    all_moe = cfg_with(cfg, moe=dataclasses.replace(moe, first_dense_layers=0))
    assert flops_per_token(cfg, L) > flops_per_token(all_moe, L)  # a dense d_ff layer costs more than 3 narrow experts
    with pytest.raises(ConfigError, match="moe.first_dense_layers=4 with moe.every_k_layers=1 leaves no MoE layer in a "
                                          "stack of 4"):
        cfg_with(cfg, moe=dataclasses.replace(moe, first_dense_layers=4)).validate()


def test_ring_attention_with_a_pattern_matches_one_device():
    cfg = cfg_with(PATTERN, attention_kernel="blockwise", attention_block_size=4, attention_bias="all", mlp_bias=True)
    model = with_random_biases(model_for(cfg))
    x = tokens(0)
    (want, _), _ = call(model, x)
    np.testing.assert_allclose(ring_logits(model, x), to_zigzag(want, 2), rtol=1e-5, atol=1e-5)
    (uniform, _), _ = call(with_random_biases(model_for(cfg_with(cfg, attention_pattern=""))), x)
    assert np.abs(np.asarray(uniform - want)).max() > 1e-3  # the global layer changes the function


# ---------------------------------------------------------------- FLOPs and the KV cache


def test_flops_count_each_layers_window():
    per_key = 12 * BASE.num_heads * BASE.dim_per_head
    full = flops_per_token(BASE, 128)
    assert flops_per_token(cfg_with(sliding_window=32), 128) == full - 2 * per_key * 96
    mixed = cfg_with(sliding_window=32, attention_pattern="global,local")
    assert flops_per_token(mixed, 128) == full - per_key * 96
    assert flops_per_token(mixed, 128, executed=True) == flops_per_token(BASE, 128, executed=True)
    encoder = cfg_with(mixed, architecture="encoder")  # bidirectional: 2 w - 1 keys
    assert flops_per_token(encoder, 128) == flops_per_token(cfg_with(encoder, sliding_window=0,
                                                                     attention_pattern=""), 128) - per_key * 65


def test_a_global_layer_makes_the_cache_keep_every_slot():
    assert num_slots(cfg_with(sliding_window=8), 100, extra_slots=3) == 11
    assert num_slots(cfg_with(sliding_window=8, attention_pattern="local"), 100, extra_slots=3) == 11
    assert num_slots(cfg_with(sliding_window=8, attention_pattern="local,global"), 100, extra_slots=3) == 100


# ---------------------------------------------------------------- bias parameters


def test_biases_follow_their_projections_axes_shard_with_them_and_are_not_decayed():
    moe = MoEConfig(num_experts=4, top_k=2, every_k_layers=2, num_shared_experts=1)
    cfg = cfg_with(attention_bias="all", mlp_bias=True, moe=moe)
    model = abstract(cfg)
    F, E, H, G, W = cfg.ffn_dim, 4, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    want = {"q_bias": ((H * W,), "heads"), "k_bias": ((G * W,), "kv_heads"), "v_bias": ((G * W,), "kv_heads"),
            "o_bias": ((D,), "embed"), "up_bias": {(F,): "mlp", (E * F,): "expert"},
            "gate_bias": {(F,): "mlp", (E * F,): "expert"}, "down_bias": {(D,): "embed", (E * D,): "expert"},
            "shared_up_bias": ((F,), "mlp"), "shared_gate_bias": ((F,), "mlp"), "shared_down_bias": ((D,), "embed")}
    found = set()
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                         is_leaf=lambda v: isinstance(v, nnx.Variable)):
        name = str(path[-1].key)
        assert decays(var) == (not name.endswith(("bias", "scale"))), name
        if name not in want:
            continue
        found.add(name)
        shape, axis = tuple(var.get_value().shape[1:]), var.logical_axes[1]  # scanned: a leading "layers" axis
        expected = want[name] if isinstance(want[name], dict) else dict([want[name]])
        assert expected.get(shape) == axis and var.logical_axes[0] == "layers", (name, shape, var.logical_axes)
        spec = sharding.named_sharding(var.logical_axes, mesh, var.get_value().shape).spec
        assert spec[1] == {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "embed": "fsdp",
                           "expert": "expert"}[axis], (name, spec)
    assert found == set(want)
    plain = cfg_with(cfg, attention_bias="none", mlp_bias=False)
    dense_layer = H * W + 2 * G * W + D + 2 * F + D
    moe_layer = H * W + 2 * G * W + D + E * (2 * F + D) + 2 * F + D
    assert num_params(abstract(cfg)) - num_params(abstract(plain)) == dense_layer + moe_layer


def test_qkv_biases_leave_the_output_projection_unbiased():
    model = model_for(cfg_with(attention_bias="qkv"))
    attn = model.layers.groups.blocks[0].attn
    assert attn.q_bias is not None and attn.o_bias is None
    assert model.layers.groups.blocks[0].ffn.up_bias is None
