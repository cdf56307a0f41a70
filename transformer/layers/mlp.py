"""Position-wise feed-forward: ReLU, GELU, or SwiGLU (silu(x W_gate) * x W_up) W_down."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ACTIVATIONS, ConfigError, ModelConfig

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "swiglu": jax.nn.silu}


class MLP(nnx.Module):
    """x_BLD -> y_BLD. The down projection starts at init_std / sqrt(2 * num_layers)."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, rngs: nnx.Rngs):
        if cfg.activation not in _ACTIVATIONS:
            raise ConfigError(f"model.activation={cfg.activation!r} is not valid; "
                              f"choose one of {', '.join(map(repr, ACTIVATIONS))}")
        self.activation = cfg.activation
        self.dtype = jnp.dtype(cfg.dtype)
        D, F = cfg.d_model, cfg.ffn_dim
        param_dtype = jnp.dtype(cfg.param_dtype)
        init_in = jax.nn.initializers.normal(stddev=cfg.init_std)
        init_out = jax.nn.initializers.normal(stddev=cfg.init_std / math.sqrt(2 * num_layers))
        self.up_DF = nnx.Param(init_in(rngs.params(), (D, F), param_dtype), logical_axes=("embed", "mlp"))
        self.gate_DF = nnx.Param(init_in(rngs.params(), (D, F), param_dtype), logical_axes=("embed", "mlp")) \
            if cfg.activation == "swiglu" else None
        self.down_FD = nnx.Param(init_out(rngs.params(), (F, D), param_dtype), logical_axes=("mlp", "embed"))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = x_BLD.astype(self.dtype)
        w = lambda p: p[...].astype(self.dtype)
        h_BLF = jnp.einsum("BLD,DF->BLF", x_BLD, w(self.up_DF))
        act = _ACTIVATIONS[self.activation]
        if self.gate_DF is not None:
            h_BLF = act(jnp.einsum("BLD,DF->BLF", x_BLD, w(self.gate_DF))) * h_BLF
        else:
            h_BLF = act(h_BLF)
        h_BLF = sharding.constrain(h_BLF, ("batch", "length", "mlp"))
        y_BLD = jnp.einsum("BLF,FD->BLD", h_BLF, w(self.down_FD))
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))
