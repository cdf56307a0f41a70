"""MoE layer against float64 NumPy references: routers, capacity drops, dropless, losses, bias balancing, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scipy.special import erf

from transformer import sharding
from transformer.config import ConfigError, MeshConfig, ModelConfig, MoEConfig
from transformer.layers import moe as moe_lib
from transformer.layers.moe import MoE, RouterBias

D, F = 16, 24


def make_cfg(**moe_kwargs) -> ModelConfig:
    activation = moe_kwargs.pop("activation", "swiglu")
    mlp_bias = moe_kwargs.pop("mlp_bias", False)
    defaults = dict(num_experts=4, top_k=2, router="softmax_topk", capacity_factor=1.0)
    defaults.update(moe_kwargs)
    return ModelConfig(d_model=D, d_ff=F, num_heads=2, activation=activation, mlp_bias=mlp_bias, init_std=0.3,
                       moe=MoEConfig(**defaults))


# ---------------------------------------------------------------- NumPy references (float64)


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_topk(v, k):
    """Indices of the k largest along the last axis, best first; ties to the lower index."""
    return np.argsort(-v, axis=-1, kind="stable")[..., :k]


def np_route(logits, router, k, bias=None):
    if router in ("softmax_topk", "switch"):
        probs = np_softmax(logits)
        idx = np_topk(probs, k)
        gate = np.take_along_axis(probs, idx, -1)
    elif router == "mixtral":
        probs = np_softmax(logits)
        idx = np_topk(logits, k)
        gate = np_softmax(np.take_along_axis(logits, idx, -1))
    elif router == "sigmoid_bias":
        aff = 1.0 / (1.0 + np.exp(-logits))
        idx = np_topk(aff + bias, k)
        chosen = np.take_along_axis(aff, idx, -1)
        gate = chosen / chosen.sum(-1, keepdims=True)
        probs = aff / aff.sum(-1, keepdims=True)
    else:
        raise AssertionError(router)
    return probs, idx, gate


def np_keep(idx_BLX, num_experts, capacity):
    """GShard priority: choice rank first, then token order; an expert accepts `capacity` per row."""
    B, L, X = idx_BLX.shape
    keep = np.zeros((B, L, X), bool)
    for b in range(B):
        taken = np.zeros(num_experts, int)
        for k in range(X):
            for t in range(L):
                e = idx_BLX[b, t, k]
                keep[b, t, k] = taken[e] < capacity
                taken[e] += 1
    return keep


def np_expert_choice(probs_BLE, capacity):
    """coef[b, t, e] = probs when expert e picked token t among its top-`capacity` of row b."""
    coef = np.zeros_like(probs_BLE)
    B, _, E = probs_BLE.shape
    for b in range(B):
        for e in range(E):
            chosen = np.argsort(-probs_BLE[b, :, e], kind="stable")[:capacity]
            coef[b, chosen, e] = probs_BLE[b, chosen, e]
    return coef


def np_act(h, name):
    if name == "relu":
        return np.maximum(h, 0)
    if name == "gelu":
        return 0.5 * h * (1 + erf(h / np.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h / (1 + np.exp(-h))


def np_ffn(x, up, gate, down, activation, up_bias=0.0, gate_bias=0.0, down_bias=0.0):
    h = x @ up + up_bias
    h = np_act(x @ gate + gate_bias, activation) * h if activation == "swiglu" else np_act(h, activation)
    return h @ down + down_bias


BIASES = ("up_bias", "gate_bias", "down_bias", "shared_up_bias", "shared_gate_bias", "shared_down_bias")


def np_params(layer):
    get = lambda v: None if v is None else np.asarray(v[...], np.float64)
    names = ("router_w", "w_up", "w_gate", "w_down", "shared_up", "shared_gate", "shared_down", "router_bias")
    return {n: get(getattr(layer, n)) for n in names + BIASES}


def np_biases(p, E, shared: bool):
    """The up/gate/down biases of expert e (routed: each expert's row of the flattened vectors; 0 without)."""
    prefix = "shared_" if shared else ""
    out = [0.0 if p[prefix + n] is None else p[prefix + n] for n in ("up_bias", "gate_bias", "down_bias")]
    return out if shared else [[0.0 if isinstance(b, float) else b.reshape(E, -1)[e] for b in out] for e in range(E)]


def np_layer(p, x, cfg: ModelConfig, dropless=False):
    """Dense per-token MoE: every expert on every token, weighted by the (kept) gate; plus stats."""
    m = cfg.moe
    B, L, _ = x.shape
    E, K = m.num_experts, m.top_k
    capacity = min(L, int(np.ceil(m.capacity_factor * L * K / E)))
    logits = x @ p["router_w"]
    if m.router == "expert_choice":
        probs = np_softmax(logits)
        coef = np_expert_choice(probs, capacity)
        assigned = (coef > 0).astype(float)
        dropped = dropped_tokens = np.mean(assigned.sum(-1) == 0)
        top1 = probs.argmax(-1)
    else:
        probs, idx, gate = np_route(logits, m.router, K, p["router_bias"])
        keep = np.ones(idx.shape, bool) if dropless else np_keep(idx, E, capacity)
        onehot = np.eye(E)[idx]
        coef = np.einsum("blk,blke->ble", gate * keep, onehot)
        assigned = onehot.sum(2)
        dropped = 1 - keep.mean()
        dropped_tokens = np.mean(~keep.any(-1))
        top1 = idx[..., 0]
    expert_out = np.stack([np_ffn(x, p["w_up"][e], None if p["w_gate"] is None else p["w_gate"][e],
                                  p["w_down"][e], cfg.activation, *np_biases(p, E, False)[e]) for e in range(E)],
                          axis=2)
    y = np.einsum("ble,bled->bld", coef, expert_out)
    if p["shared_up"] is not None:
        y = y + np_ffn(x, p["shared_up"], p["shared_gate"], p["shared_down"], cfg.activation,
                       *np_biases(p, E, True))
    load = assigned.sum((0, 1)) / assigned.sum()
    lb = E * np.sum(load * probs.mean((0, 1)))
    seq = np.mean([E * np.sum(assigned[b].sum(0) / assigned[b].sum() * probs[b].mean(0)) for b in range(B)])
    lse = np.log(np.exp(logits).sum(-1))
    stats = {
        "load_balance_loss": lb,
        "router_z_loss": np.mean(lse ** 2),
        "seq_balance_loss": seq,
        "expert_load_E": load,
        "dropped_fraction": dropped,
        "dropped_token_fraction": dropped_tokens,
        "router_entropy": np.mean(-np.sum(probs * np.log(probs), -1)),
        "load_cv": load.std() * E,
        "load_max_over_mean": load.max() * E,
        "expert_reuse": np.mean(top1[:, 1:] == top1[:, :-1]),
    }
    stats["aux_loss"] = m.load_balance_coef * lb + m.router_z_loss_coef * stats["router_z_loss"] + \
        m.seq_balance_coef * seq
    return y, stats


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward(graphdef, state, x, update_router_bias):
    model = nnx.merge(graphdef, state)
    y, aux = model(x, update_router_bias=update_router_bias)
    return y, aux, nnx.state(model)


def apply(layer, x, update_router_bias=False):
    """The layer's forward pass, jitted and cached per (graph, shapes); returns (y, aux, new state)."""
    graphdef, state = nnx.split(layer)
    return _forward(graphdef, state, x, update_router_bias)


def inputs(B=2, L=12, seed=1):
    return np.random.default_rng(seed).normal(size=(B, L, D)).astype(np.float32)


# ---------------------------------------------------------------- routers and dispatch


@pytest.mark.parametrize("router,k", [("softmax_topk", 2), ("switch", 1), ("mixtral", 2), ("sigmoid_bias", 3)])
def test_route_matches_numpy(router, k):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 6)).astype(np.float32) * 2
    bias = rng.normal(size=6).astype(np.float32) * 0.3 if router == "sigmoid_bias" else None
    probs, idx, gate = moe_lib.route(jnp.asarray(logits), router, k, None if bias is None else jnp.asarray(bias))
    ref_probs, ref_idx, ref_gate = np_route(logits.astype(np.float64), router, k, bias)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate, ref_gate, rtol=1e-5, atol=1e-6)
    if router in ("mixtral", "sigmoid_bias"):
        np.testing.assert_allclose(np.asarray(gate).sum(-1), 1.0, rtol=1e-6)
    else:
        assert np.all(np.asarray(gate).sum(-1) < 1.0)


@pytest.mark.parametrize("groups, top_groups, k", [(2, 1, 2), (4, 2, 3), (6, 3, 1)])
def test_group_limited_routing_matches_numpy(groups, top_groups, k):
    """DeepSeek-V2's group_limited_greedy: top-k of the softmax inside the token's best groups (by their best
    expert), gates the unrenormalised probabilities times routed_scale."""
    logits = np.random.default_rng(groups).normal(size=(3, 10, 12)) * 2
    probs, idx, gate = moe_lib.route(jnp.asarray(logits, jnp.float32), "softmax_topk", k, groups=groups,
                                     top_groups=top_groups, scale=2.5)
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    for t in np.ndindex(logits.shape[:2]):
        best = ref[t].reshape(groups, -1).max(-1)
        allowed = np.repeat(np.isin(np.arange(groups), np.argsort(-best)[:top_groups]), 12 // groups)
        want = np.argsort(-np.where(allowed, ref[t], -1.0), kind="stable")[:k]
        assert np.asarray(idx)[t].tolist() == want.tolist(), t
        np.testing.assert_allclose(np.asarray(gate)[t], 2.5 * ref[t][want], rtol=1e-5)
    _, plain_idx, _ = moe_lib.route(jnp.asarray(logits, jnp.float32), "softmax_topk", k)
    assert groups == 6 or not np.array_equal(np.asarray(plain_idx), np.asarray(idx))  # the limit changes choices


@pytest.mark.parametrize("changes, expected", [
    (dict(router_groups=3), "moe.num_experts=4 is not divisible by moe.router_groups=3"),
    (dict(router_groups=2, router_top_groups=3), "moe.router_top_groups=3 must be in [1, moe.router_groups=2]"),
    (dict(router_groups=2, top_k=3), "moe.top_k=3 exceeds the 2 experts of moe.router_top_groups=1 groups"),
    (dict(router_groups=2, router="mixtral"), "moe.router_groups=2 is read by router='softmax_topk' only"),
    (dict(router_top_groups=2), "moe.router_top_groups=2 needs moe.router_groups > 1"),
    (dict(routed_scale=0.0), "moe.routed_scale=0.0 must be > 0"),
    (dict(first_dense_layers=-1), "moe.first_dense_layers=-1 must be >= 0"),
])
def test_bad_deepseek_routing_options_fail_in_one_line(changes, expected):
    with pytest.raises(ConfigError) as error:
        MoEConfig(**{"num_experts": 4, "top_k": 2, **changes}).validate()
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_sigmoid_bias_changes_selection_not_gates():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    _, idx, gate = moe_lib.route(logits, "sigmoid_bias", 2, jnp.asarray([0.0, 0.0, 0.0, 5.0]))
    assert np.asarray(idx)[0].tolist() == [3, 0]
    aff = 1 / (1 + np.exp(-np.array([-1.0, 2.0])))
    np.testing.assert_allclose(np.asarray(gate)[0], aff / aff.sum(), rtol=1e-6)


def test_expert_capacity_rule():
    assert moe_lib.expert_capacity(12, 4, 2, 1.0) == 6
    assert moe_lib.expert_capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
    assert moe_lib.expert_capacity(8, 2, 2, 4.0) == 8  # clipped to the group size
    assert moe_lib.expert_capacity(4, 64, 1, 0.1) == 1


def test_capacity_drops_later_tokens_and_second_choices_first():
    # Row 0: top-1, all tokens pick expert 0, capacity 2: tokens 0, 1 kept, 2, 3 dropped.
    # Row 1: top-2; every first choice is placed before any second choice.
    idx = np.array([[[0], [0], [0], [0]]])
    _, _, keep = moe_lib.capacity_dispatch(jnp.asarray(idx), jnp.ones(idx.shape), 2, 2)
    np.testing.assert_array_equal(np.asarray(keep)[0, :, 0], [True, True, False, False])
    idx2 = np.array([[[1, 0], [0, 1], [0, 1], [1, 0]]])
    _, _, keep2 = moe_lib.capacity_dispatch(jnp.asarray(idx2), jnp.ones(idx2.shape), 2, 2)
    np.testing.assert_array_equal(np.asarray(keep2)[0], [[True, False], [True, False], [True, False], [True, False]])


def test_capacity_dispatch_matches_numpy():
    rng = np.random.default_rng(3)
    B, L, K, E, C = 3, 16, 2, 5, 4
    idx = np.stack([np.stack([rng.choice(E, size=K, replace=False, p=[0.4, 0.3, 0.1, 0.1, 0.1])
                              for _ in range(L)]) for _ in range(B)])
    gate = rng.uniform(size=(B, L, K)).astype(np.float32)
    dispatch, combine, keep = moe_lib.capacity_dispatch(jnp.asarray(idx), jnp.asarray(gate), E, C)
    ref_keep = np_keep(idx, E, C)
    assert 0 < ref_keep.sum() < ref_keep.size
    np.testing.assert_array_equal(np.asarray(keep), ref_keep)
    dispatch, combine = np.asarray(dispatch), np.asarray(combine)
    assert dispatch.sum((1, 3)).max() <= C  # per row and expert
    for b in range(B):
        for e in range(E):  # slots hold the kept assignments of expert e in priority order
            order = [(k, t) for k in range(K) for t in range(L) if idx[b, t, k] == e and ref_keep[b, t, k]]
            for slot, (k, t) in enumerate(order):
                assert dispatch[b, t, e, slot] == 1 and combine[b, t, e, slot] == gate[b, t, k]
            assert dispatch[b, :, e].sum() == len(order)


def test_expert_choice_dispatch_matches_numpy():
    rng = np.random.default_rng(4)
    probs = np_softmax(rng.normal(size=(2, 10, 4)) * 2)
    dispatch, combine = moe_lib.expert_choice_dispatch(jnp.asarray(probs, jnp.float32), 3)
    ref = np_expert_choice(probs, 3)
    np.testing.assert_array_equal(np.asarray(dispatch).sum(-1), ref > 0)
    np.testing.assert_allclose(np.asarray(combine).sum(-1), ref, rtol=1e-6)
    assert np.all(np.asarray(dispatch).sum(1) == 1)  # every slot of every expert is filled exactly once


# ---------------------------------------------------------------- full layer vs dense NumPy


LAYER_CASES = [
    dict(router="softmax_topk", top_k=2, capacity_factor=0.75),
    dict(router="switch", top_k=1, capacity_factor=1.0, activation="relu"),
    dict(router="mixtral", top_k=2, capacity_factor=0.75, num_shared_experts=1, activation="gelu_tanh"),
    dict(router="expert_choice", top_k=2, capacity_factor=1.0, seq_balance_coef=0.1),
    dict(router="sigmoid_bias", top_k=2, capacity_factor=0.75, num_shared_experts=2, seq_balance_coef=0.1),
    dict(router="mixtral", top_k=2, dropless=True, activation="gelu"),
    dict(router="sigmoid_bias", top_k=3, dropless=True, num_shared_experts=1),
    # mlp_bias: every routed expert its own biases (capacity drops, dropless, expert choice), shared ones too
    dict(router="softmax_topk", top_k=2, capacity_factor=0.75, num_shared_experts=1, mlp_bias=True),
    dict(router="mixtral", top_k=2, dropless=True, num_shared_experts=1, activation="gelu", mlp_bias=True),
    dict(router="expert_choice", top_k=2, capacity_factor=1.0, activation="relu", mlp_bias=True),
]


@pytest.mark.parametrize("case", LAYER_CASES,
                         ids=lambda c: c["router"] + ("-dropless" if c.get("dropless") else "-capacity"))
def test_layer_matches_dense_numpy(case):
    dropless = case.get("dropless", False)
    cfg = make_cfg(**case)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    if layer.router_bias is not None:
        layer.router_bias[...] = jnp.asarray([0.3, -0.2, 0.0, 0.1])
    rng = np.random.default_rng(5)
    for name in BIASES:
        if getattr(layer, name) is not None:
            getattr(layer, name)[...] = jnp.asarray(rng.normal(size=getattr(layer, name).shape), jnp.float32)
    assert (layer.up_bias is not None) == cfg.mlp_bias
    if cfg.mlp_bias:
        assert np.abs(np.asarray(layer.up_bias[...])).min() > 0  # the layer and the reference both see them
    x = inputs()
    y, aux, _ = apply(layer, jnp.asarray(x))
    ref_y, ref_aux = np_layer(np_params(layer), x.astype(np.float64), cfg, dropless=dropless)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
    assert set(aux) == set(ref_aux)
    for name, value in ref_aux.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    if not dropless and case["router"] != "expert_choice":
        assert float(aux["dropped_fraction"]) > 0  # the capacity really binds in these cases


def test_dropless_equals_huge_capacity():
    x = jnp.asarray(inputs(B=2, L=16))
    outs = []
    for dropless, factor in ((True, 1.0), (False, 100.0)):
        layer = MoE(make_cfg(router="softmax_topk", dropless=dropless, capacity_factor=factor), rngs=nnx.Rngs(0))
        outs.append(apply(layer, x)[:2])
    (y_dl, aux_dl), (y_cap, aux_cap) = outs
    np.testing.assert_allclose(y_dl, y_cap, rtol=1e-5, atol=1e-6)
    assert float(aux_cap["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux_dl["aux_loss"], aux_cap["aux_loss"], rtol=1e-6)


# ---------------------------------------------------------------- losses


def balanced_layer(lb_coef=0.5):
    """E=4, top-1, router_w = 3 * I on the first 4 dims, so token t (one-hot e_{t%4}) prefers expert t%4."""
    cfg = dataclasses.replace(make_cfg(router="switch", top_k=1), d_model=4, num_heads=1)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, load_balance_coef=lb_coef,
                                                           router_z_loss_coef=0.0))
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router_w[...] = 3.0 * jnp.eye(4)
    return layer


def skewed_tokens(num_on_zero, L=8):
    experts = np.array([0] * num_on_zero + [1 + t % 3 for t in range(L - num_on_zero)])
    return jnp.asarray(np.eye(4, dtype=np.float32)[experts][None])


def test_load_balance_loss_is_one_when_balanced_and_grows_with_imbalance():
    layer = balanced_layer(lb_coef=0.5)
    _, aux, _ = apply(layer, jnp.asarray(np.eye(4, dtype=np.float32)[np.arange(8) % 4][None]))
    np.testing.assert_allclose(aux["load_balance_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["aux_loss"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(aux["expert_load_E"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(aux["load_cv"], 0.0, atol=1e-6)
    losses = []
    for n in (3, 5, 7, 8):
        _, aux, _ = apply(layer, skewed_tokens(n))
        losses.append(float(aux["load_balance_loss"]))
    assert losses[0] > 1.0 and all(a < b for a, b in zip(losses, losses[1:])), losses


def test_load_balance_loss_formula():
    rng = np.random.default_rng(5)
    probs = np_softmax(rng.normal(size=(2, 7, 5)))
    idx = np_topk(probs, 2)
    assigned = np.eye(5)[idx].sum(2)
    f = assigned.sum((0, 1)) / (2 * 7 * 2)
    expected = 5 * np.sum(f * probs.mean((0, 1)))
    got = moe_lib.balance_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(assigned, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_router_z_loss_matches_numpy():
    logits = np.random.default_rng(6).normal(size=(2, 9, 5)) * 3
    expected = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(moe_lib.router_z_loss(jnp.asarray(logits, jnp.float32)), expected, rtol=1e-5)


def test_expert_reuse_counts_consecutive_top1():
    layer = balanced_layer()
    _, aux, _ = apply(layer, skewed_tokens(5))  # experts 0 0 0 0 0 1 2 3: 4 of 7 pairs repeat
    np.testing.assert_allclose(aux["expert_reuse"], 4 / 7, rtol=1e-6)
    _, aux, _ = apply(layer, jnp.asarray(np.eye(4, dtype=np.float32)[np.arange(8) % 4][None]))
    assert float(aux["expert_reuse"]) == 0.0


# ---------------------------------------------------------------- aux-loss-free balancing


def test_router_bias_is_not_a_param():
    layer = MoE(make_cfg(router="sigmoid_bias"), rngs=nnx.Rngs(0))
    assert isinstance(layer.router_bias, RouterBias) and not isinstance(layer.router_bias, nnx.Param)
    assert "router_bias" not in nnx.state(layer, nnx.Param)
    assert "router_bias" in nnx.state(layer, RouterBias)


def test_bias_update_moves_load_toward_uniform():
    cfg = make_cfg(router="sigmoid_bias", top_k=1, bias_update_rate=0.05, capacity_factor=4.0)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router_w[...] = layer.router_w[...].at[:, 0].add(0.5)
    x = jnp.asarray(inputs(B=4, L=16, seed=7) + 1.0)  # positive inputs: expert 0 dominates
    graphdef, state = nnx.split(layer)
    _, aux0, frozen = _forward(graphdef, state, x, False)
    np.testing.assert_array_equal(frozen["router_bias"][...], 0.0)
    assert float(aux0["load_max_over_mean"]) > 2.5, aux0["expert_load_E"]
    for _ in range(60):
        _, aux, state = _forward(graphdef, state, x, True)
    bias = np.asarray(state["router_bias"][...])
    assert bias[0] < 0 and bias[1:].max() > 0
    assert float(aux["load_max_over_mean"]) < 1.6, aux["expert_load_E"]
    assert float(aux["load_cv"]) < 0.5 * float(aux0["load_cv"])
    nnx.jit(lambda model, x: model(x, update_router_bias=True))(layer, x)  # stateful use mutates in place
    np.testing.assert_allclose(layer.router_bias[...], np.where(np.arange(4) == 0, -0.05, 0.05))


# ---------------------------------------------------------------- gradients


def reference_output(params, x, idx, router, activation):
    """Per-token gather of each chosen expert (indices fixed from NumPy), weighted by differentiable gates."""
    logits = jnp.einsum("bld,de->ble", x, params["router_w"])
    if router == "sigmoid_bias":
        chosen = jnp.take_along_axis(jax.nn.sigmoid(logits), idx, -1)
        gate = chosen / chosen.sum(-1, keepdims=True)
    else:
        gate = jnp.take_along_axis(jax.nn.softmax(logits, -1), idx, -1)
    up = params["w_up"][idx]
    h = jnp.einsum("bld,blkdf->blkf", x, up)
    if activation == "swiglu":
        h = jax.nn.silu(jnp.einsum("bld,blkdf->blkf", x, params["w_gate"][idx])) * h
    else:
        h = jax.nn.relu(h)
    out = jnp.einsum("blkf,blkfd->blkd", h, params["w_down"][idx])
    return jnp.einsum("blk,blkd->bld", gate, out)


@pytest.mark.parametrize("router,dropless,activation", [("softmax_topk", False, "swiglu"),
                                                         ("sigmoid_bias", True, "relu")])
def test_gradients_reach_router_and_experts(router, dropless, activation):
    cfg = make_cfg(router=router, dropless=dropless, capacity_factor=100.0, activation=activation)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(inputs(B=2, L=8))
    r = jnp.asarray(np.random.default_rng(8).normal(size=(2, 8, D)), jnp.float32)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * r)

    grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
    pure = {k: v for k, v in nnx.to_pure_dict(params).items()}
    p64 = np_params(layer)
    _, idx, _ = np_route(np.asarray(x, np.float64) @ p64["router_w"], router, cfg.moe.top_k, p64["router_bias"])
    ref = jax.jit(jax.grad(lambda p: jnp.sum(reference_output(p, x, jnp.asarray(idx), router, activation) * r)))(pure)
    assert set(grads) == set(ref)
    for name in ref:
        np.testing.assert_allclose(grads[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(np.asarray(grads["router_w"])).max() > 1e-3
    assert np.abs(np.asarray(grads["w_down"])).max() > 1e-3


def test_aux_loss_gradient_reaches_router():
    layer = MoE(make_cfg(load_balance_coef=1.0, router_z_loss_coef=0.0), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jnp.asarray(inputs())
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(x)[1]["aux_loss"]))(params)
    assert np.abs(np.asarray(grads["router_w"][...])).max() > 1e-4
    np.testing.assert_array_equal(grads["w_up"][...], 0.0)


# ---------------------------------------------------------------- expert parallelism


def loss_and_grads(layer, x, r, mesh=None):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, rest, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * r) + aux["aux_loss"]

    fn = jax.jit(jax.value_and_grad(loss))
    if mesh is None:
        return fn(params, rest, x), None
    with sharding.use_mesh(mesh):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        rest = jax.device_put(rest, sharding.state_shardings(rest, mesh))
        x = jax.device_put(x, sharding.batch_sharding(mesh))
        compiled = fn.lower(params, rest, x).compile()
        return compiled(params, rest, x), (params, compiled.as_text())


@pytest.mark.parametrize("router,dropless", [("softmax_topk", False),
                                             pytest.param("sigmoid_bias", True, marks=pytest.mark.slow)])
def test_expert_parallel_matches_single_device(router, dropless):
    cfg = make_cfg(router=router, num_experts=8, top_k=2, dropless=dropless, capacity_factor=0.75,
                   num_shared_experts=1, seq_balance_coef=0.1)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(inputs(B=8, L=8))
    r = jnp.asarray(np.random.default_rng(9).normal(size=(8, 8, D)), jnp.float32)
    (loss_1, grads_1), _ = loss_and_grads(layer, x, r)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    (loss_n, grads_n), (params_n, hlo) = loss_and_grads(layer, x, r, mesh)
    spec = params_n["w_up"][...].sharding.spec
    assert spec[0] == "expert", spec
    if not dropless:
        assert "all-to-all" in hlo
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    flat_1, flat_n = nnx.to_pure_dict(grads_1), nnx.to_pure_dict(grads_n)
    for name in flat_1:
        np.testing.assert_allclose(flat_n[name], flat_1[name], rtol=1e-4, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="num_experts=0"):
        MoE(make_cfg(num_experts=0), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="top_k"):
        MoE(make_cfg(router="switch", top_k=2), rngs=nnx.Rngs(0))
    layer = MoE(make_cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"\\(batch, length, {D}\\)"):
        layer(jnp.zeros((2, 4, D + 1)))
    with pytest.raises(ValueError, match="router="):
        moe_lib.route(jnp.zeros((2, 4)), "expert_choice", 1)
