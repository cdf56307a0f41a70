"""Int8 weights for a frozen base (QLoRA-style fine-tuning, `lora.quantize_base=int8`).

A weight W becomes int8 values q = round(W / s) in [-127, 127] with one float32 scale s = max |W| / 127 per
output feature (the max over the axes the projection contracts), so |W - q s| <= s / 2 everywhere. An
`Int8Weight` stands where the float `nnx.Param` stood and reads like it: `w[...]` is the dequantized float32
array, so projections, MoE experts and MLA's absorbed decode use it unchanged. Training needs a model.remat
policy: without one the backward pass keeps every dequantized weight (`experiments/qlora_memory.py`). Its two
arrays are `Quantized` params: frozen (LoRA trains `LoRAParam`s only), left out of LoRA checkpoints like the rest of the base (they are
remade from checkpoint.init_from), and sharded with the weight's logical axes (the scale's contracted axes are
size 1 and unsharded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LEVELS = 127


class Quantized(nnx.Param):
    """An int8 weight's values or scales: part of the frozen base."""


class QuantizationScale(Quantized):
    """An int8 weight's scales (not counted as parameters)."""


def quantize(w: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales with the contracted axes kept at size 1) of w."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=contracted, keepdims=True) / LEVELS
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -LEVELS, LEVELS).astype(jnp.int8), scale


def round_trip(w: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """w quantized and dequantized: what an `Int8Weight` of w reads as, in w's dtype."""
    values, scale = quantize(w, contracted)
    return (values.astype(jnp.float32) * scale).astype(w.dtype)


class Int8Weight(nnx.Module):
    """A frozen weight stored as int8 values and per-output-feature scales; `w[...]` dequantizes."""

    def __init__(self, weight: nnx.Param, contracted: tuple[int, ...]):
        axes = weight.get_metadata().get("logical_axes") or (None,) * weight.ndim
        values, scale = quantize(weight[...], contracted)
        self.contracted = tuple(contracted)
        self.values = Quantized(values, logical_axes=axes)
        scale_axes = tuple(None if i in contracted else axis for i, axis in enumerate(axes))
        self.scale = QuantizationScale(scale, logical_axes=scale_axes)

    def __getitem__(self, index):
        return (self.values[...].astype(jnp.float32) * self.scale[...])[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    def load(self, w: jax.Array) -> None:
        """Quantize the float weight w into this one."""
        values, scale = quantize(w, self.contracted)
        self.values[...] = values
        self.scale[...] = scale
