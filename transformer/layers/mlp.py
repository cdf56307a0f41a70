"""Position-wise feed-forward: ReLU, GELU (exact erf, or the tanh approximation "gelu_tanh", GPT-2's
gelu_new), or SwiGLU (silu(x W_gate) * x W_up) W_down; with model.mlp_bias every projection adds a bias.

`activation` and `ffn_hidden` are the one definition of the hidden layer, shared with the MoE experts.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ACTIVATIONS, ConfigError, ModelConfig
from transformer.layers.projection import bias_param, project
from transformer.lora import adapter

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
                "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True), "swiglu": jax.nn.silu}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The nonlinearity of model.activation=`name` (for swiglu, the silu applied to the gate)."""
    if name not in _ACTIVATIONS:
        raise ConfigError(f"model.activation={name!r} is not valid; choose one of {', '.join(map(repr, ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def ffn_hidden(x, w_up, w_gate, name: str, matmul: Callable) -> jax.Array:
    """act(x W_gate) * x W_up with a gate (SwiGLU), else act(x W_up); `matmul(x, w)` applies one projection
    (w: whatever matmul takes, e.g. a (weight, bias) pair)."""
    act = activation(name)
    h = matmul(x, w_up)
    return act(matmul(x, w_gate)) * h if w_gate is not None else act(h)


class MLP(nnx.Module):
    """x_BLD -> y_BLD. The down projection starts at init_std / sqrt(2 * num_layers); biases (mlp_bias) at 0."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, rngs: nnx.Rngs):
        activation(cfg.activation)  # an unknown name fails here rather than at the first call
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
        self.up_bias = bias_param(cfg.mlp_bias, F, "mlp", param_dtype)
        self.gate_bias = bias_param(cfg.mlp_bias and self.gate_DF is not None, F, "mlp", param_dtype)
        self.down_bias = bias_param(cfg.mlp_bias, D, "embed", param_dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        gate = None if self.gate_DF is None else (self.gate_DF, self.gate_bias, adapter(self, "gate"))
        h_BLF = ffn_hidden(x_BLD, (self.up_DF, self.up_bias, adapter(self, "up")), gate, self.activation,
                           lambda x_BLD, w: project("BLD,DF->BLF", x_BLD, w[0], w[1], self.dtype, w[2]))
        h_BLF = sharding.constrain(h_BLF, ("batch", "length", "mlp"))
        y_BLD = project("BLF,FD->BLD", h_BLF, self.down_FD, self.down_bias, self.dtype, adapter(self, "down"))
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))
