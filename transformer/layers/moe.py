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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ConfigError, ModelConfig

_HIGHEST = jax.lax.Precision.HIGHEST
_ROUTING = ("batch", "length", None, None)
_TOKEN_BUFFER = (None, "batch", "capacity", "embed")  # laid out like the tokens: rows over every batch axis
_EXPERT_BUFFER = ("expert", "batch", "capacity", "embed")  # experts over `expert`: the hop between them is all-to-all
_EXPERT_HIDDEN = ("expert", "batch", "capacity", "mlp")


class RouterBias(nnx.Variable):
    """Per-expert selection bias for aux-loss-free balancing; not an nnx.Param, so the optimizer skips it."""


class Routing(NamedTuple):
    """Top-k routing of each token: router distribution, chosen experts (best first) and their gate weights."""

    probs_SE: jax.Array
    idx_SK: jax.Array
    gate_SK: jax.Array


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert accepts per group: ceil(capacity_factor * tokens * top_k / E), in [1, tokens]."""
    return max(1, min(tokens_per_group, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)))


def select_top_k(values_SE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values_SK, idx_SK) of the k largest along the last axis, best first, ties to the lower index.

    k passes of argmax: unlike lax.top_k (a custom call that XLA's SPMD partitioner replicates),
    this stays sharded over the token dimensions.
    """
    remaining_SE = values_SE
    picked = []
    for _ in range(k):
        idx_S = jnp.argmax(remaining_SE, axis=-1)
        picked.append(idx_S)
        hit_SE = jax.nn.one_hot(idx_S, values_SE.shape[-1], dtype=jnp.bool_)
        remaining_SE = jnp.where(hit_SE, -jnp.inf, remaining_SE)
    idx_SK = jnp.stack(picked, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(values_SE, idx_SK, axis=-1), idx_SK


def route(logits_SE: jax.Array, router: str, top_k: int, bias_E: jax.Array | None = None) -> Routing:
    """Top-k routing from float32 router logits (any leading dims).

    softmax_topk / switch: p = softmax(logits); top-k of p; gates = p (not renormalised).
    mixtral: top-k of logits; gates = softmax over the k chosen logits; probs = full softmax.
    sigmoid_bias: s = sigmoid(logits); top-k of s + bias; gates = s_chosen / sum(s_chosen);
    probs = s / sum(s) (the distribution used by the balance losses).
    """
    logits_SE = logits_SE.astype(jnp.float32)
    if router in ("softmax_topk", "switch"):
        probs_SE = jax.nn.softmax(logits_SE, axis=-1)
        gate_SK, idx_SK = select_top_k(probs_SE, top_k)
    elif router == "mixtral":
        probs_SE = jax.nn.softmax(logits_SE, axis=-1)
        top_logits_SK, idx_SK = select_top_k(logits_SE, top_k)
        gate_SK = jax.nn.softmax(top_logits_SK, axis=-1)
    elif router == "sigmoid_bias":
        if bias_E is None:
            raise ValueError("router='sigmoid_bias' needs bias_E (the RouterBias value)")
        affinity_SE = jax.nn.sigmoid(logits_SE)
        _, idx_SK = select_top_k(affinity_SE + jax.lax.stop_gradient(bias_E.astype(jnp.float32)), top_k)
        chosen_SK = jnp.take_along_axis(affinity_SE, idx_SK, axis=-1)
        gate_SK = chosen_SK / jnp.sum(chosen_SK, axis=-1, keepdims=True)
        probs_SE = affinity_SE / jnp.sum(affinity_SE, axis=-1, keepdims=True)
    else:
        raise ValueError(f"route() does not handle router={router!r}; valid: 'softmax_topk', 'switch', 'mixtral', "
                         "'sigmoid_bias' (expert_choice uses expert_choice_dispatch)")
    return Routing(probs_SE, idx_SK.astype(jnp.int32), gate_SK)


def capacity_dispatch(idx_BLK: jax.Array, gate_BLK: jax.Array, num_experts: int,
                      capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-hot dispatch/combine tensors (float32, BLEC) and keep_BLK for capacity routing (groups = rows).

    Slots fill choice-major, then token order: every token's first choice is placed before any
    second choice; an assignment beyond `capacity` for its expert is dropped (keep = False).
    """
    B, L, K = idx_BLK.shape
    mask_BLKE = jax.nn.one_hot(idx_BLK, num_experts, dtype=jnp.int32)
    mask_BQE = jnp.transpose(mask_BLKE, (0, 2, 1, 3)).reshape(B, K * L, num_experts)
    pos_BKLE = (jnp.cumsum(mask_BQE, axis=1) - 1).reshape(B, K, L, num_experts)
    pos_BLK = jnp.sum(jnp.transpose(pos_BKLE, (0, 2, 1, 3)) * mask_BLKE, axis=-1)
    keep_BLK = pos_BLK < capacity
    slot_BLKC = jax.nn.one_hot(jnp.where(keep_BLK, pos_BLK, capacity), capacity, dtype=jnp.float32)
    route_BLKEC = mask_BLKE.astype(jnp.float32)[..., None] * slot_BLKC[:, :, :, None, :]
    dispatch_BLEC = jnp.sum(route_BLKEC, axis=2)
    combine_BLEC = jnp.sum(route_BLKEC * gate_BLK.astype(jnp.float32)[..., None, None], axis=2)
    return dispatch_BLEC, combine_BLEC, keep_BLK


def expert_choice_dispatch(probs_BLE: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` highest-scoring tokens of the row.

    Returns float32 dispatch_BLEC and combine_BLEC (gate = the token's router probability for that expert).
    Ties go to the earlier token.
    """
    L = probs_BLE.shape[1]
    scores_BEL = jnp.swapaxes(probs_BLE, 1, 2)
    idx_BEC = jnp.argsort(-scores_BEL, axis=-1, stable=True)[..., :capacity]
    gate_BEC = jnp.take_along_axis(scores_BEL, idx_BEC, axis=-1)
    dispatch_BLEC = jnp.transpose(jax.nn.one_hot(idx_BEC, L, dtype=jnp.float32), (0, 3, 1, 2))
    return dispatch_BLEC, dispatch_BLEC * gate_BEC[:, None]


def balance_loss(probs_SE: jax.Array, assigned_SE: jax.Array) -> jax.Array:
    """Switch load-balancing loss E * sum_i f_i P_i over all leading dims.

    f_i = fraction of routed assignments (all k choices, counted before capacity drops) that went
    to expert i; P_i = mean router probability. Equals 1 for a perfectly balanced router.
    """
    E = probs_SE.shape[-1]
    counts_E = jnp.sum(assigned_SE.reshape(-1, E), axis=0)
    f_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
    P_E = jnp.mean(probs_SE.reshape(-1, E), axis=0)
    return E * jnp.sum(f_E * P_E)


def router_z_loss(logits_SE: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_SE.astype(jnp.float32), axis=-1)))


def _activation(name: str):
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return jax.nn.gelu
    if name == "swiglu":
        return jax.nn.silu
    raise ConfigError(f"model.activation={name!r} is not valid; choose one of 'relu', 'gelu', 'swiglu'")


class MoE(nnx.Module):
    """Routed experts (stacked FFNs following cfg.activation) plus optional always-on shared experts."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        if moe.num_experts < 1:
            raise ConfigError(f"model.moe.num_experts={moe.num_experts}: an MoE layer needs num_experts >= 1")
        cfg.validate()
        self.d_model = cfg.d_model
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.router = moe.router
        self.capacity_factor = moe.capacity_factor
        self.dropless = moe.dropless
        self.activation = cfg.activation
        self.bias_update_rate = moe.bias_update_rate
        self.coefs = (moe.load_balance_coef, moe.router_z_loss_coef, moe.seq_balance_coef)
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
        Fs = moe.num_shared_experts * F
        self.shared_up = param((D, Fs), ("embed", "mlp")) if Fs else None
        self.shared_gate = param((D, Fs), ("embed", "mlp")) if Fs and gated else None
        self.shared_down = param((Fs, D), ("mlp", "embed")) if Fs else None
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,)) \
            if moe.router == "sigmoid_bias" else None

    def __call__(self, x_BLD: jax.Array, *, update_router_bias: bool = False) -> tuple[jax.Array, dict]:
        """y_BLD (routed + shared experts, no residual) and aux (weighted "aux_loss", unweighted losses, stats).

        update_router_bias=True (training, router='sigmoid_bias' only; ignored otherwise) moves the
        RouterBias in place: bias += bias_update_rate * sign(mean load - load).
        """
        if x_BLD.ndim != 3 or x_BLD.shape[-1] != self.d_model:
            raise ValueError(f"MoE expects x_BLD of shape (batch, length, {self.d_model}), got {x_BLD.shape}")
        L = x_BLD.shape[1]
        E, K = self.num_experts, self.top_k
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "embed"))
        logits_BLE = jnp.einsum("BLD,DE->BLE", x_BLD.astype(jnp.float32), self.router_w[...].astype(jnp.float32),
                                precision=_HIGHEST)
        logits_BLE = sharding.constrain(logits_BLE, ("batch", "length", None))
        capacity = expert_capacity(L, E, K, self.capacity_factor)

        if self.router == "expert_choice":
            probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
            dispatch_BLEC, combine_BLEC = expert_choice_dispatch(probs_BLE, capacity)
            assigned_BLE = jnp.sum(dispatch_BLEC, axis=-1)
            y_BLD = self._capacity_experts(x_BLD, dispatch_BLEC, combine_BLEC)
            dropped = jnp.mean((jnp.sum(assigned_BLE, axis=-1) == 0).astype(jnp.float32))
            dropped_tokens = dropped
            top1_BL = jnp.argmax(probs_BLE, axis=-1)
        else:
            bias_E = self.router_bias[...] if self.router_bias is not None else None
            probs_BLE, idx_BLK, gate_BLK = route(logits_BLE, self.router, K, bias_E)
            assigned_BLE = jnp.sum(jax.nn.one_hot(idx_BLK, E, dtype=jnp.float32), axis=2)
            if self.dropless:
                y_BLD = self._dropless_experts(x_BLD, idx_BLK, gate_BLK)
                dropped = dropped_tokens = jnp.zeros((), jnp.float32)
            else:
                dispatch_BLEC, combine_BLEC, keep_BLK = capacity_dispatch(idx_BLK, gate_BLK, E, capacity)
                y_BLD = self._capacity_experts(x_BLD, dispatch_BLEC, combine_BLEC)
                dropped = 1.0 - jnp.mean(keep_BLK.astype(jnp.float32))
                dropped_tokens = jnp.mean((~jnp.any(keep_BLK, axis=-1)).astype(jnp.float32))
            top1_BL = idx_BLK[..., 0]
            if update_router_bias and self.router_bias is not None:
                counts_E = jnp.sum(assigned_BLE, axis=(0, 1))
                step_E = self.bias_update_rate * jnp.sign(jnp.mean(counts_E) - counts_E)
                self.router_bias[...] = jax.lax.stop_gradient(bias_E + step_E)

        if self.shared_up is not None:
            y_BLD = y_BLD + self._shared_experts(x_BLD)
        y_BLD = sharding.constrain(y_BLD.astype(x_BLD.dtype), ("batch", "length", "embed"))
        return y_BLD, self._aux(logits_BLE, probs_BLE, assigned_BLE, top1_BL, dropped, dropped_tokens)

    def _ffn(self, x, w_up, w_gate, w_down, matmul):
        act = _activation(self.activation)
        cast = lambda w: w[...].astype(self.dtype)
        h = matmul(x, cast(w_up))
        h = act(matmul(x, cast(w_gate))) * h if w_gate is not None else act(h)
        return h, (lambda h: matmul(h, cast(w_down)))

    def _capacity_experts(self, x_BLD, dispatch_BLEC, combine_BLEC):
        dispatch_BLEC = sharding.constrain(dispatch_BLEC.astype(self.dtype), _ROUTING)
        combine_BLEC = sharding.constrain(combine_BLEC.astype(self.dtype), _ROUTING)
        x_EBCD = jnp.einsum("BLEC,BLD->EBCD", dispatch_BLEC, x_BLD.astype(self.dtype))
        x_EBCD = sharding.constrain(sharding.constrain(x_EBCD, _TOKEN_BUFFER), _EXPERT_BUFFER)
        h_EBCF, down = self._ffn(x_EBCD, self.w_up, self.w_gate, self.w_down,
                                 lambda a, w: jnp.einsum("EBCX,EXY->EBCY", a, w))
        h_EBCF = sharding.constrain(h_EBCF, _EXPERT_HIDDEN)
        y_EBCD = sharding.constrain(sharding.constrain(down(h_EBCF), _EXPERT_BUFFER), _TOKEN_BUFFER)
        y_BLD = jnp.einsum("BLEC,EBCD->BLD", combine_BLEC, y_EBCD)
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))

    def _dropless_experts(self, x_BLD, idx_BLK, gate_BLK):
        B, L, D = x_BLD.shape
        K = idx_BLK.shape[-1]
        expert_A = idx_BLK.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)
        group_sizes_E = jnp.bincount(expert_A, length=self.num_experts).astype(jnp.int32)
        xs_AD = x_BLD.reshape(B * L, D).astype(self.dtype)[order_A // K]
        grouped = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes_E)
        h_AF, down = self._ffn(xs_AD, self.w_up, self.w_gate, self.w_down, grouped)
        y_AD = down(h_AF)[jnp.argsort(order_A)]
        y_BLKD = y_AD.reshape(B, L, K, D)
        return jnp.einsum("BLK,BLKD->BLD", gate_BLK.astype(self.dtype), y_BLKD)

    def _shared_experts(self, x_BLD):
        h_BLF, down = self._ffn(x_BLD.astype(self.dtype), self.shared_up, self.shared_gate, self.shared_down,
                                lambda a, w: jnp.einsum("BLX,XY->BLY", a, w))
        return down(sharding.constrain(h_BLF, ("batch", "length", "mlp")))

    def _aux(self, logits_BLE, probs_BLE, assigned_BLE, top1_BL, dropped, dropped_tokens) -> dict:
        """dropped_fraction: routed (token, expert) assignments lost to capacity (expert choice: tokens no
        expert picked); dropped_token_fraction: tokens none of whose assignments were kept (they ride the
        residual only)."""
        E = self.num_experts
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
        lb_coef, z_coef, seq_coef = self.coefs
        return {
            "aux_loss": lb_coef * lb + z_coef * z + seq_coef * seq,
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
