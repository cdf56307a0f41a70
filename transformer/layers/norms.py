"""LayerNorm and RMSNorm with float32 statistics; the result keeps the input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import NORMS, ConfigError, ModelConfig


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale."""

    def __init__(self, d_model: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype), logical_axes=("embed",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias."""

    def __init__(self, d_model: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((d_model,), param_dtype), logical_axes=("embed",))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        x = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return x.astype(x_BLD.dtype)


def make_norm(cfg: ModelConfig) -> RMSNorm | LayerNorm:
    """The norm named by cfg.norm over cfg.d_model features."""
    kinds = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
    if cfg.norm not in kinds:
        raise ConfigError(f"model.norm={cfg.norm!r} is not valid; choose one of {', '.join(map(repr, NORMS))}")
    return kinds[cfg.norm](cfg.d_model, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))
