"""Low-rank adapters (LoRA) on a frozen base: y = x W (+ b) + (alpha / r) * dropout(x) A B.

`add_adapters` attaches a `LoRA` module `<name>_lora` next to each chosen projection weight (attention q, k, v, o;
with MLA q (or its up-projection with low-rank queries), the per-head key and value up-projections from the latent
as k and v, and o; MLP and MoE shared-expert gate, up, down; routed experts are not adapted) of a built model;
`project` adds its output. MLA's decode, which absorbs the key and value up-projections into the query and output,
uses them with the adapter folded in (`adapted_weight`). A starts normal with std 1 / sqrt(fan-in) and B at zero,
so at init the model is the base model exactly.
Adapter weights are `LoRAParam`s (an nnx.Param subclass) with the logical axes of their projection (the input
axes and a replicated rank axis for A, the rank and the output axes for B; a scanned stack's "layers" axis first),
so they shard like it. Training differentiates and optimizes `LoRAParam`s only (`trainable`); the base params are
in the state but frozen, and a LoRA run's checkpoints hold everything but them (`without_base`).

Dropout (lora.dropout) masks the adapter input while training (`set_training`): each adapter holds its own RNG key
(a `LoRADropoutKey` variable, per layer when scanned), split at every training forward and carried in the
checkpointed state, so a resumed run draws the same masks. `merge_adapters` folds alpha / r * A B into the base
weights and removes the adapters.

With lora.quantize_base=int8 (QLoRA-style) every adaptable base projection weight and the routed experts are held
as `quantize.Int8Weight`s (`quantize_base`), filled from the float base of checkpoint.init_from
(`load_quantized_base`); embeddings, norms, routers and MLA's latent down-projections stay float.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
from flax import nnx

from transformer.config import ConfigError, LoRAConfig
from transformer.quantize import Int8Weight, QuantizationScale, Quantized, round_trip

# projection name -> weight attribute (the first the module has), per module kind (class name): the weights
# `project` is called with
WEIGHTS = {
    "Attention": {"q": "q_DHW", "k": "k_DGW", "v": "v_DGW", "o": "o_HWD"},
    "LatentAttention": {"q": ("q_DHW", "q_up_CHW"), "k": "k_up_CHN", "v": "v_up_CHV", "o": "o_HVD"},
    "MLP": {"gate": "gate_DF", "up": "up_DF", "down": "down_FD"},
    "MoE": {"gate": "shared_gate", "up": "shared_up", "down": "shared_down"},
}
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}  # leading weight axes x contracts


class LoRAParam(nnx.Param):
    """An adapter weight (A or B): the only params a LoRA run trains."""


class LoRADropoutKey(nnx.Variable):
    """Raw key data of an adapter's dropout RNG; split at each training forward."""


FROZEN = nnx.All(nnx.Param, nnx.Not(LoRAParam))  # what a LoRA run's checkpoints leave out
BASE = nnx.All(FROZEN, nnx.Not(Quantized))  # the float base params, restored from checkpoint.init_from as they are
ROUTED_EXPERTS = {"w_gate": 1, "w_up": 1, "w_down": 1}  # MoE weight -> leading axes before the contracted one


class LoRA(nnx.Module):
    """alpha / rank * dropout(x) A B for a projection with `input_shape` contracted and `output_shape` produced;
    `stack`: leading stacked-layer dims of the weight (with their logical axes `stack_axes`)."""

    def __init__(self, cfg: LoRAConfig, *, stack: tuple[int, ...], input_shape: tuple[int, ...],
                 output_shape: tuple[int, ...], input_axes: tuple, output_axes: tuple, stack_axes: tuple,
                 param_dtype, key: jax.Array):
        init_key, dropout_key = jax.random.split(key)
        fan_in = math.prod(input_shape)
        a = jax.random.normal(init_key, (*stack, *input_shape, cfg.rank), param_dtype) / math.sqrt(fan_in)
        self.a = LoRAParam(a, logical_axes=(*stack_axes, *input_axes, None))
        self.b = LoRAParam(jnp.zeros((*stack, cfg.rank, *output_shape), param_dtype),
                           logical_axes=(*stack_axes, None, *output_axes))
        self.scale = cfg.alpha / cfg.rank
        self.rate = cfg.dropout
        self.deterministic = True
        keys = jax.random.split(dropout_key, math.prod(stack)) if stack else dropout_key
        self.dropout_key = LoRADropoutKey(jax.random.key_data(keys).reshape(*stack, -1),
                                          logical_axes=(*stack_axes, None)) if cfg.dropout else None

    def __call__(self, spec: str, x: jax.Array, dtype) -> jax.Array:
        """The adapter's term of `project(spec, x, ...)` (spec: "x axes,weight axes->output axes")."""
        inputs, output = spec.split("->")
        x_axes, w_axes = inputs.split(",")
        contracted = w_axes[:self.a.ndim - 1]
        rank = next(c for c in string.ascii_lowercase if c not in spec)
        kept = "".join(axis for axis in x_axes if axis not in contracted)
        if self.rate and not self.deterministic:
            key, use = jax.random.split(jax.random.wrap_key_data(self.dropout_key[...]))
            self.dropout_key[...] = jax.random.key_data(key)
            keep = jax.random.bernoulli(use, 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)
        h = jnp.einsum(f"{x_axes},{contracted}{rank}->{kept}{rank}", x.astype(dtype), self.a[...].astype(dtype))
        y = jnp.einsum(f"{kept}{rank},{rank}{w_axes[len(contracted):]}->{output}", h, self.b[...].astype(dtype))
        return y * jnp.asarray(self.scale, dtype)


def adapter(module: nnx.Module, name: str) -> LoRA | None:
    """The adapter `add_adapters` attached to `module`'s projection `name`, or None."""
    return getattr(module, f"{name}_lora", None)


def adapted_modules(model: nnx.Module):
    """(module, projection name, weight attribute) of every projection `add_adapters` can adapt."""
    for _, module in nnx.iter_graph(model):
        for name, attributes in WEIGHTS.get(type(module).__name__, {}).items():
            present = [a for a in ((attributes,) if isinstance(attributes, str) else attributes)
                       if getattr(module, a, None) is not None]
            if present:
                yield module, name, present[0]


def add_adapters(model: nnx.Module, cfg: LoRAConfig, key: jax.Array) -> int:
    """Attach `<name>_lora` adapters of rank cfg.rank to every projection in cfg.targets; returns how many
    (per module; a scanned stack counts once). ConfigError when the model has none of the targets."""
    targets = cfg.target_names
    added = 0
    for index, (module, name, attribute) in enumerate(adapted_modules(model)):
        if name not in targets:
            continue
        weight = getattr(module, attribute)
        axes = weight.get_metadata().get("logical_axes") or (None,) * weight.ndim
        stacked = _stacked(weight)
        inputs = INPUT_AXES[name]
        shape = weight.shape
        setattr(module, f"{name}_lora", LoRA(
            cfg, stack=shape[:stacked], stack_axes=axes[:stacked],
            input_shape=shape[stacked:stacked + inputs], input_axes=axes[stacked:stacked + inputs],
            output_shape=shape[stacked + inputs:], output_axes=axes[stacked + inputs:],
            param_dtype=weight.dtype, key=jax.random.fold_in(key, index)))
        added += 1
    if not added:
        raise ConfigError(f"lora.targets={cfg.targets!r}: the model has none of these projections")
    return added


def set_training(model: nnx.Module, training: bool) -> None:
    """Turn adapter dropout on (training) or off."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRA):
            module.deterministic = not training


def trainable(cfg: LoRAConfig):
    """The nnx filter of the params a run trains: the adapters with lora.rank > 0, else every param."""
    return LoRAParam if cfg.rank else nnx.Param


def without_base(state: nnx.State) -> nnx.State:
    """`state` without the frozen base params (what a LoRA run checkpoints)."""
    return nnx.split_state(state, FROZEN, ...)[1]


def adapted_weight(weight: jax.Array, adapter: LoRA | None, inputs: int, dtype) -> jax.Array:
    """weight + alpha / r * A B in `dtype` (the weight as it is without an adapter); `inputs`: the leading weight
    axes x contracts (after any stacked-layer axes)."""
    if adapter is None:
        return weight.astype(dtype)
    a, b = adapter.a[...].astype(dtype), adapter.b[...].astype(dtype)
    stack = a.ndim - 1 - inputs
    letters = string.ascii_uppercase
    s, i, o = letters[:stack], letters[stack:stack + inputs], letters[stack + inputs:weight.ndim]
    delta = jnp.einsum(f"{s}{i}r,{s}r{o}->{s}{i}{o}", a, b) * jnp.asarray(adapter.scale, dtype)
    return weight.astype(dtype) + delta


def merge_adapters(model: nnx.Module) -> int:
    """Fold every adapter into its base weight (W += alpha / r * A B, in float32) and remove it; returns how many."""
    merged = 0
    for module, name, attribute in list(adapted_modules(model)):
        term = adapter(module, name)
        if term is None:
            continue
        weight = getattr(module, attribute)
        weight[...] = adapted_weight(weight[...], term, INPUT_AXES[name], jnp.float32).astype(weight.dtype)
        delattr(module, f"{name}_lora")
        merged += 1
    return merged


def _stacked(weight) -> int:
    axes = weight.get_metadata().get("logical_axes") or ()
    return sum(1 for axis in axes if axis == "layers")


def quantizable(model: nnx.Module):
    """(module, weight attribute, contracted axes) of every base weight `quantize_base` turns to int8: the
    projections `add_adapters` knows and the MoE routed experts."""
    for module, name, attribute in adapted_modules(model):
        stack = _stacked(getattr(module, attribute))
        yield module, attribute, tuple(range(stack, stack + INPUT_AXES[name]))
    for _, module in nnx.iter_graph(model):
        if type(module).__name__ == "MoE":
            for attribute, before in ROUTED_EXPERTS.items():
                weight = getattr(module, attribute, None)
                if weight is not None:
                    yield module, attribute, (_stacked(weight) + before,)


def quantize_base(model: nnx.Module) -> int:
    """Replace every `quantizable` weight by its `Int8Weight`; returns how many."""
    found = list(quantizable(model))
    for module, attribute, contracted in found:
        setattr(module, attribute, Int8Weight(getattr(module, attribute), contracted))
    return len(found)


def load_quantized_base(model: nnx.Module, base: dict) -> None:
    """Quantize the float weights of `base` (a pure dict of the unquantized model's params) into the model's
    `Int8Weight`s, found at the same paths."""
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Int8Weight):
            value = base
            for key in path:
                value = value[key]
            module.load(value)


def dequantized_base(model: nnx.Module) -> None:
    """Replace every `quantizable` float weight by its int8 round trip (what a QLoRA run trained against)."""
    for module, attribute, contracted in quantizable(model):
        weight = getattr(module, attribute)
        weight[...] = round_trip(weight[...], contracted)


def frozen_bytes(state: nnx.State, param_dtype) -> tuple[int, int]:
    """(bytes the frozen base holds, bytes it would hold unquantized in `param_dtype`) of a model state."""
    nbytes = lambda x, dtype: math.prod(jnp.shape(x)) * jnp.dtype(dtype).itemsize
    held = sum(nbytes(x, x.dtype) for x in jax.tree.leaves(nnx.filter_state(state, FROZEN)))
    plain = sum(nbytes(x, param_dtype) for x in jax.tree.leaves(nnx.filter_state(state, BASE)))
    values = [node for _, node in nnx.iter_graph(state) if isinstance(node, Quantized)]
    plain += sum(nbytes(v, param_dtype) for v in values if v.dtype == jnp.int8)
    return held, plain


def parameter_counts(state: nnx.State, cfg: LoRAConfig) -> tuple[int, int]:
    """(trained param elements, all param elements) of a model state."""
    def count(tree):
        return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))
    weights = nnx.All(nnx.Param, nnx.Not(QuantizationScale))
    return count(nnx.filter_state(state, trainable(cfg))), count(nnx.filter_state(state, weights))
