"""Mixture-of-experts FFN: routers, capacity (GShard one-hot) and dropless (ragged_dot) dispatch, losses, statistics.

Routing is per token in float32; a *group* is one batch row (`tokens_per_group = L`).

Capacity mode (default): each expert takes at most
`C = min(L, ceil(capacity_factor * L * top_k / E))` assignments per group. Priority is
GShard/Switch style: all first choices of the group (in token order) before all second
choices (in token order), and so on; an assignment that finds its expert full is dropped
(that expert contributes zero for the token; the block's residual carries it through).
Tokens travel to experts through one-hot dispatch/combine einsums whose expert buffers are
constrained to logical axes ("expert", "batch", "capacity", "embed"), so on a mesh with an
`expert` axis XLA moves tokens with all-to-all.

Dropless mode (`moe.dropless`): assignments are sorted by expert and the experts run as a
grouped matmul (`jax.lax.ragged_dot`); nothing is dropped. `expert_choice` always uses its
own capacity (each expert picks its top-C tokens of the group) and ignores `dropless`.

With model.mlp_bias every expert projection adds a bias: shared experts like the dense MLP, routed experts
one bias per expert, held flattened (experts x features, like `layers.projection`'s vectors).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ConfigError, ModelConfig
from transformer.layers.mlp import activation, ffn_hidden
from transformer.layers.projection import bias_param, project
from transformer.lora import adapter

_HIGHEST = jax.lax.Precision.HIGHEST
_ROUTING = ("batch", "length", None, None)
_TOKEN_BUFFER = (None, "batch", "capacity", "embed")  # laid out like the tokens: rows over every batch axis
_EXPERT_BUFFER = ("expert", "batch", "capacity", "embed")  # experts over `expert`: the hop between them is all-to-all
_EXPERT_HIDDEN = ("expert", "batch", "capacity", "mlp")


class RouterBias(nnx.Variable):
    """Per-expert selection bias for aux-loss-free balancing; not an nnx.Param, so the optimizer skips it."""


class Routing(NamedTuple):
    """Top-k routing of each token: router distribution, chosen experts (best first) and their gate weights."""

    probs_TE: jax.Array
    idx_TX: jax.Array
    gate_TX: jax.Array


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert accepts per group: ceil(capacity_factor * tokens * top_k / E), in [1, tokens]."""
    return max(1, min(tokens_per_group, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)))


def select_top_k(values_TE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values_TX, idx_TX) of the k largest along the last axis, best first, ties to the lower index.

    k passes of argmax: unlike lax.top_k (a custom call that XLA's SPMD partitioner replicates),
    this stays sharded over the token dimensions.
    """
    remaining_TE = values_TE
    picked = []
    for _ in range(k):
        idx_T = jnp.argmax(remaining_TE, axis=-1)
        picked.append(idx_T)
        hit_TE = jax.nn.one_hot(idx_T, values_TE.shape[-1], dtype=jnp.bool_)
        remaining_TE = jnp.where(hit_TE, -jnp.inf, remaining_TE)
    idx_TX = jnp.stack(picked, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(values_TE, idx_TX, axis=-1), idx_TX


def group_limited(probs_TE: jax.Array, groups: int, top_groups: int) -> jax.Array:
    """probs with every expert outside each token's `top_groups` best expert groups (ranked by their best expert's
    probability) set to -inf: DeepSeek-V2's group_limited_greedy."""
    E = probs_TE.shape[-1]
    grouped_TGe = probs_TE.reshape(*probs_TE.shape[:-1], groups, E // groups)
    _, best_TK = select_top_k(jnp.max(grouped_TGe, axis=-1), top_groups)
    keep_TG = jnp.any(jax.nn.one_hot(best_TK, groups, dtype=jnp.bool_), axis=-2)
    return jnp.where(keep_TG[..., None], grouped_TGe, -jnp.inf).reshape(probs_TE.shape)


def route(logits_TE: jax.Array, router: str, top_k: int, bias_E: jax.Array | None = None, *, groups: int = 1,
          top_groups: int = 1, scale: float = 1.0) -> Routing:
    """Top-k routing from float32 router logits (any leading dims).

    softmax_topk / switch: p = softmax(logits); top-k of p (with groups > 1: within the token's top_groups
    best groups, `group_limited`); gates = p (not renormalised).
    mixtral: top-k of logits; gates = softmax over the k chosen logits; probs = full softmax.
    sigmoid_bias: s = sigmoid(logits); top-k of s + bias; gates = s_chosen / sum(s_chosen);
    probs = s / sum(s) (the distribution used by the balance losses).
    Every router's gates are then multiplied by `scale` (moe.routed_scale).
    """
    logits_TE = logits_TE.astype(jnp.float32)
    if router in ("softmax_topk", "switch"):
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        candidates_TE = group_limited(probs_TE, groups, top_groups) if groups > 1 else probs_TE
        _, idx_TX = select_top_k(candidates_TE, top_k)
        gate_TX = jnp.take_along_axis(probs_TE, idx_TX, axis=-1)
    elif router == "mixtral":
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        top_logits_TX, idx_TX = select_top_k(logits_TE, top_k)
        gate_TX = jax.nn.softmax(top_logits_TX, axis=-1)
    elif router == "sigmoid_bias":
        if bias_E is None:
            raise ValueError("router='sigmoid_bias' needs bias_E (the RouterBias value)")
        affinity_TE = jax.nn.sigmoid(logits_TE)
        _, idx_TX = select_top_k(affinity_TE + jax.lax.stop_gradient(bias_E.astype(jnp.float32)), top_k)
        chosen_TX = jnp.take_along_axis(affinity_TE, idx_TX, axis=-1)
        gate_TX = chosen_TX / jnp.sum(chosen_TX, axis=-1, keepdims=True)
        probs_TE = affinity_TE / jnp.sum(affinity_TE, axis=-1, keepdims=True)
    else:
        raise ValueError(f"route() does not handle router={router!r}; valid: 'softmax_topk', 'switch', 'mixtral', "
                         "'sigmoid_bias' (expert_choice uses expert_choice_dispatch)")
    if scale != 1.0:
        gate_TX = gate_TX * scale
    return Routing(probs_TE, idx_TX.astype(jnp.int32), gate_TX)


def capacity_dispatch(idx_BLX: jax.Array, gate_BLX: jax.Array, num_experts: int,
                      capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-hot dispatch/combine tensors (float32, BLEC) and keep_BLX for capacity routing (groups = rows).

    Slots fill choice-major, then token order: every token's first choice is placed before any
    second choice; an assignment beyond `capacity` for its expert is dropped (keep = False).
    """
    X = idx_BLX.shape[-1]
    mask_BLXE = jax.nn.one_hot(idx_BLX, num_experts, dtype=jnp.int32)
    mask_BAE = einops.rearrange(mask_BLXE, "B L X E -> B (X L) E")  # choice-major assignment order
    pos_BLXE = einops.rearrange(jnp.cumsum(mask_BAE, axis=1) - 1, "B (X L) E -> B L X E", X=X)
    pos_BLX = jnp.sum(pos_BLXE * mask_BLXE, axis=-1)
    keep_BLX = pos_BLX < capacity
    slot_BLXC = jax.nn.one_hot(jnp.where(keep_BLX, pos_BLX, capacity), capacity, dtype=jnp.float32)
    route_BLXEC = mask_BLXE.astype(jnp.float32)[..., None] * slot_BLXC[:, :, :, None, :]
    dispatch_BLEC = jnp.sum(route_BLXEC, axis=2)
    combine_BLEC = jnp.sum(route_BLXEC * gate_BLX.astype(jnp.float32)[..., None, None], axis=2)
    return dispatch_BLEC, combine_BLEC, keep_BLX


def expert_choice_dispatch(probs_BLE: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` highest-scoring tokens of the row.

    Returns float32 dispatch_BLEC and combine_BLEC (gate = the token's router probability for that expert).
    Ties go to the earlier token.
    """
    L = probs_BLE.shape[1]
    scores_BEL = einops.rearrange(probs_BLE, "B L E -> B E L")
    idx_BEC = jnp.argsort(-scores_BEL, axis=-1, stable=True)[..., :capacity]
    gate_BEC = jnp.take_along_axis(scores_BEL, idx_BEC, axis=-1)
    dispatch_BLEC = einops.rearrange(jax.nn.one_hot(idx_BEC, L, dtype=jnp.float32), "B E C L -> B L E C")
    return dispatch_BLEC, dispatch_BLEC * gate_BEC[:, None]


def balance_loss(probs_TE: jax.Array, assigned_TE: jax.Array) -> jax.Array:
    """Switch load-balancing loss E * sum_e f_e p_e over all leading dims.

    f_e = fraction of routed assignments (all k choices, counted before capacity drops) that went
    to expert e; p_e = mean router probability. Equals 1 for a perfectly balanced router.
    """
    E = probs_TE.shape[-1]
    counts_E = jnp.sum(assigned_TE.reshape(-1, E), axis=0)
    fraction_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
    mean_prob_E = jnp.mean(probs_TE.reshape(-1, E), axis=0)
    return E * jnp.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def _per_expert(y_EBCF: jax.Array, bias_EF: jax.Array | None) -> jax.Array:
    """y plus each expert's bias (broadcast over its token slots), or y without one."""
    return y_EBCF if bias_EF is None else y_EBCF + bias_EF[:, None, None, :]


class MoE(nnx.Module):
    """Routed experts (stacked FFNs following cfg.activation) plus optional always-on shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        if moe.num_experts < 1:
            raise ConfigError(f"model.moe.num_experts={moe.num_experts}: an MoE layer needs num_experts >= 1")
        moe.validate()
        activation(cfg.activation)  # an unknown name fails here rather than at the first call
        self.moe = moe
        self.d_model = cfg.d_model
        self.activation = cfg.activation
        self.dtype = jnp.dtype(cfg.dtype)

        E, D = moe.num_experts, cfg.d_model
        F = moe.d_ff_expert or cfg.ffn_dim
        param_dtype = jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(stddev=cfg.init_std)

        def param(shape, axes):
            return nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=axes)

        gated = cfg.activation == "swiglu"
        self.router_w = param((D, E), ("embed", None))
        self.w_up = param((E, D, F), ("expert", "embed", "mlp"))
        self.w_gate = param((E, D, F), ("expert", "embed", "mlp")) if gated else None
        self.w_down = param((E, F, D), ("expert", "mlp", "embed"))
        shared_F = moe.num_shared_experts * F
        self.shared_up = param((D, shared_F), ("embed", "mlp")) if shared_F else None
        self.shared_gate = param((D, shared_F), ("embed", "mlp")) if shared_F and gated else None
        self.shared_down = param((shared_F, D), ("mlp", "embed")) if shared_F else None
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,)) \
            if moe.router == "sigmoid_bias" else None
        biased = cfg.mlp_bias
        self.up_bias = bias_param(biased, E * F, "expert", param_dtype)
        self.gate_bias = bias_param(biased and gated, E * F, "expert", param_dtype)
        self.down_bias = bias_param(biased, E * D, "expert", param_dtype)
        self.shared_up_bias = bias_param(biased and bool(shared_F), shared_F, "mlp", param_dtype)
        self.shared_gate_bias = bias_param(biased and bool(shared_F) and gated, shared_F, "mlp", param_dtype)
        self.shared_down_bias = bias_param(biased and bool(shared_F), D, "embed", param_dtype)

    def __call__(self, x_BLD: jax.Array, *, update_router_bias: bool = False,
                 no_drops: bool = False) -> tuple[jax.Array, dict]:
        """y_BLD (routed + shared experts, no residual) and aux (weighted "aux_loss", unweighted losses, stats).

        update_router_bias=True (training, router='sigmoid_bias' only; ignored otherwise) moves the
        RouterBias in place: bias += bias_update_rate * sign(mean load - load). no_drops=True (decoding)
        computes every routed token like moe.dropless, whatever the capacity.
        """
        if x_BLD.ndim != 3 or x_BLD.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects x_BLD of shape (batch, length, {self.d_model}), got {x_BLD.shape}")
        moe, L = self.moe, x_BLD.shape[1]
        E = moe.num_experts
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "embed"))
        logits_BLE = jnp.einsum("BLD,DE->BLE", x_BLD.astype(jnp.float32), self.router_w[...].astype(jnp.float32),
                                precision=_HIGHEST)
        logits_BLE = sharding.constrain(logits_BLE, ("batch", "length", None))
        capacity = expert_capacity(L, E, moe.top_k, moe.capacity_factor)

        if moe.router == "expert_choice":
            probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
            dispatch_BLEC, combine_BLEC = expert_choice_dispatch(probs_BLE, capacity)
            assigned_BLE = jnp.sum(dispatch_BLEC, axis=-1)
            y_BLD = self._capacity_experts(x_BLD, dispatch_BLEC, combine_BLEC)
            dropped = jnp.mean((jnp.sum(assigned_BLE, axis=-1) == 0).astype(jnp.float32))
            dropped_tokens = dropped
            top1_BL = jnp.argmax(probs_BLE, axis=-1)
        else:
            bias_E = self.router_bias[...] if self.router_bias is not None else None
            probs_BLE, idx_BLX, gate_BLX = route(logits_BLE, moe.router, moe.top_k, bias_E, groups=moe.router_groups,
                                                 top_groups=moe.router_top_groups, scale=moe.routed_scale)
            assigned_BLE = jnp.sum(jax.nn.one_hot(idx_BLX, E, dtype=jnp.float32), axis=2)
            if moe.dropless or no_drops:
                y_BLD = self._dropless_experts(x_BLD, idx_BLX, gate_BLX)
                dropped = dropped_tokens = jnp.zeros((), jnp.float32)
            else:
                dispatch_BLEC, combine_BLEC, keep_BLX = capacity_dispatch(idx_BLX, gate_BLX, E, capacity)
                y_BLD = self._capacity_experts(x_BLD, dispatch_BLEC, combine_BLEC)
                dropped = 1.0 - jnp.mean(keep_BLX.astype(jnp.float32))
                dropped_tokens = jnp.mean((~jnp.any(keep_BLX, axis=-1)).astype(jnp.float32))
            top1_BL = idx_BLX[..., 0]
            if update_router_bias and self.router_bias is not None:
                counts_E = jnp.sum(assigned_BLE, axis=(0, 1))
                step_E = moe.bias_update_rate * jnp.sign(jnp.mean(counts_E) - counts_E)
                self.router_bias[...] = jax.lax.stop_gradient(bias_E + step_E)

        if self.shared_up is not None:
            y_BLD = y_BLD + self._shared_experts(x_BLD)
        y_BLD = sharding.constrain(y_BLD.astype(x_BLD.dtype), ("batch", "length", "embed"))
        return y_BLD, self._aux(logits_BLE, probs_BLE, assigned_BLE, top1_BL, dropped, dropped_tokens)

    def _weight(self, w):
        return None if w is None else w[...].astype(self.dtype)

    def _routed(self, w, bias):
        """(weight, bias as one row per expert, or None) of a routed projection in the compute dtype; None
        without the weight."""
        if w is None:
            return None
        rows = None if bias is None else bias[...].astype(self.dtype).reshape(self.moe.num_experts, -1)
        return self._weight(w), rows

    def _capacity_experts(self, x_BLD, dispatch_BLEC, combine_BLEC):
        dispatch_BLEC = sharding.constrain(dispatch_BLEC.astype(self.dtype), _ROUTING)
        combine_BLEC = sharding.constrain(combine_BLEC.astype(self.dtype), _ROUTING)
        x_EBCD = jnp.einsum("BLEC,BLD->EBCD", dispatch_BLEC, x_BLD.astype(self.dtype))
        x_EBCD = sharding.constrain(sharding.constrain(x_EBCD, _TOKEN_BUFFER), _EXPERT_BUFFER)
        h_EBCF = ffn_hidden(x_EBCD, self._routed(self.w_up, self.up_bias), self._routed(self.w_gate, self.gate_bias),
                            self.activation, lambda x_EBCD, w: _per_expert(jnp.einsum("EBCD,EDF->EBCF", x_EBCD, w[0]),
                                                                           w[1]))
        h_EBCF = sharding.constrain(h_EBCF, _EXPERT_HIDDEN)
        w_down_EFD, bias_ED = self._routed(self.w_down, self.down_bias)
        y_EBCD = _per_expert(jnp.einsum("EBCF,EFD->EBCD", h_EBCF, w_down_EFD), bias_ED)
        y_EBCD = sharding.constrain(sharding.constrain(y_EBCD, _EXPERT_BUFFER), _TOKEN_BUFFER)
        y_BLD = jnp.einsum("BLEC,EBCD->BLD", combine_BLEC, y_EBCD)
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))

    def _dropless_experts(self, x_BLD, idx_BLX, gate_BLX):
        B, L, X = idx_BLX.shape
        expert_A = idx_BLX.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)
        group_sizes_E = jnp.bincount(expert_A, length=self.moe.num_experts).astype(jnp.int32)
        x_AD = einops.rearrange(x_BLD, "B L D -> (B L) D").astype(self.dtype)[order_A // X]
        sorted_expert_A = expert_A[order_A]

        def grouped(x, w):
            y = jax.lax.ragged_dot(x, w[0], group_sizes_E)
            return y if w[1] is None else y + w[1][sorted_expert_A]

        h_AF = ffn_hidden(x_AD, self._routed(self.w_up, self.up_bias), self._routed(self.w_gate, self.gate_bias),
                          self.activation, grouped)
        y_AD = grouped(h_AF, self._routed(self.w_down, self.down_bias))[jnp.argsort(order_A)]
        y_BLXD = einops.rearrange(y_AD, "(B L X) D -> B L X D", B=B, L=L)
        return jnp.einsum("BLX,BLXD->BLD", gate_BLX.astype(self.dtype), y_BLXD)

    def _shared_experts(self, x_BLD):
        gate = None if self.shared_gate is None else (self.shared_gate, self.shared_gate_bias, adapter(self, "gate"))
        h_BLF = ffn_hidden(x_BLD, (self.shared_up, self.shared_up_bias, adapter(self, "up")), gate, self.activation,
                           lambda x_BLD, w: project("BLD,DF->BLF", x_BLD, w[0], w[1], self.dtype, w[2]))
        h_BLF = sharding.constrain(h_BLF, ("batch", "length", "mlp"))
        return project("BLF,FD->BLD", h_BLF, self.shared_down, self.shared_down_bias, self.dtype, adapter(self, "down"))

    def _aux(self, logits_BLE, probs_BLE, assigned_BLE, top1_BL, dropped, dropped_tokens) -> dict:
        """dropped_fraction: routed (token, expert) assignments lost to capacity (expert choice: tokens no
        expert picked); dropped_token_fraction: tokens none of whose assignments were kept (they ride the
        residual only)."""
        moe = self.moe
        E = moe.num_experts
        lb = balance_loss(probs_BLE, assigned_BLE)
        z = router_z_loss(logits_BLE)
        seq = jnp.mean(jax.vmap(balance_loss)(probs_BLE, assigned_BLE))
        counts_E = jnp.sum(assigned_BLE, axis=(0, 1))
        load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
        mean_load = 1.0 / E
        entropy = jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs_BLE, probs_BLE), axis=-1))
        if top1_BL.shape[1] > 1:
            reuse = jnp.mean((top1_BL[:, 1:] == top1_BL[:, :-1]).astype(jnp.float32))
        else:
            reuse = jnp.zeros((), jnp.float32)
        return {
            "aux_loss": moe.load_balance_coef * lb + moe.router_z_loss_coef * z + moe.seq_balance_coef * seq,
            "load_balance_loss": lb,
            "router_z_loss": z,
            "seq_balance_loss": seq,
            "expert_load_E": load_E,
            "dropped_fraction": dropped,
            "dropped_token_fraction": dropped_tokens,
            "router_entropy": entropy,
            "load_cv": jnp.std(load_E) / mean_load,
            "load_max_over_mean": jnp.max(load_E) / mean_load,
            "expert_reuse": reuse,
        }
