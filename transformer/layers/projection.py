"""Linear projections of attention and MLPs: one einsum with the weight, plus an optional bias.

A bias is a vector over the projection's output features, flattened when the output has several axes (q/k/v:
heads x head width, as Hugging Face stores them), so weight decay, which takes matrices only, skips it, and
it shards like the output's first axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def bias_param(enabled: bool, size: int, axis: str | None, param_dtype) -> nnx.Param | None:
    """A zero-initialised (size,) bias with logical axis `axis`, or None when not `enabled`."""
    return nnx.Param(jnp.zeros((size,), param_dtype), logical_axes=(axis,)) if enabled else None


def project(spec: str, x: jax.Array, weight: nnx.Param, bias: nnx.Param | None, dtype, adapter=None) -> jax.Array:
    """einsum(spec, x, weight) in `dtype`, plus `bias` shaped like the output's trailing axes that x lacks
    (spec "BLD,DHW->BLHW": a bias of H W values), plus a LoRA `adapter`'s term (`transformer.lora`)."""
    y = jnp.einsum(spec, x.astype(dtype), weight[...].astype(dtype))
    if adapter is not None:
        y = y + adapter(spec, x.astype(dtype), dtype)
    if bias is None:
        return y
    inputs, output = spec.split("->")
    added = sum(axis not in inputs.split(",")[0] for axis in output)
    return y + bias[...].astype(dtype).reshape(y.shape[y.ndim - added:])
