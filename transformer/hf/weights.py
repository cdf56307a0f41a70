"""Every Hugging Face tensor of a Llama / Mistral / Mixtral and the model parameter it becomes.

torch's nn.Linear stores (out, in); the library stores (in, ...) with heads split out: q_proj (H W, D) is
q_DHW = q_proj.T reshaped (D, H, W), k/v likewise with G heads, o_proj (D, H W) is o_HWD = o_proj.T
reshaped (H, W, D), gate/up/down and the router are transposed, Mixtral's experts.{e}.w1/w3/w2 (gate, up,
down) are stacked on a leading expert axis. RoPE needs no permutation (both rotate halves), RMSNorm weights
are the scales as they are. Layer i lives at LayerStack position `layer_slots(cfg)[i]`: in the scanned stack
one leaf holds every group's copy on a leading "layers" axis.

Import streams: each device shard of each parameter is built by a callback that reads only the HF tensors
of the layers in that shard (`jax.make_array_from_callback`), so no process ever holds the whole model and a
multi-host mesh reads only what its devices hold.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.config import ConfigError, ModelConfig
from transformer.hf.folder import HFFolder

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed, never read


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter leaf (`path`, inside a block for per-layer tensors) and its HF tensors: `names(i)` for
    layer i, `to_lib` (HF arrays -> one layer's leaf), `to_hf` (the inverse)."""

    path: tuple
    names: Callable[[int], list[str]]
    to_lib: Callable[[list], np.ndarray]
    to_hf: Callable[[np.ndarray], list]


def _transposed(path, name):
    return Tensor(path, lambda i: [name.format(i=i)], lambda ws: ws[0].T, lambda x: [x.T])


def _as_is(path, name):
    return Tensor(path, lambda i: [name.format(i=i)], lambda ws: ws[0], lambda x: [x])


def _heads_in(path, name, D, heads, W):
    return Tensor(path, lambda i: [name.format(i=i)], lambda ws: ws[0].T.reshape(D, heads, W),
                  lambda x: [x.reshape(D, heads * W).T])


def _experts(path, name, E):
    return Tensor(path, lambda i: [name.format(i=i, e=e) for e in range(E)],
                  lambda ws: np.stack([w.T for w in ws]), lambda x: [x[e].T for e in range(E)])


def tensor_map(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(model-level tensors, per-layer tensors) of cfg's family."""
    D, H, G, W = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    top = [_as_is(("embed", "tokens_VD"), "model.embed_tokens.weight"),
           _as_is(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_embeddings:
        top.append(_transposed(("embed", "unembed_DV"), "lm_head.weight"))
    p = "model.layers.{i}."
    layer = [
        _heads_in(("attn", "q_DHW"), p + "self_attn.q_proj.weight", D, H, W),
        _heads_in(("attn", "k_DGW"), p + "self_attn.k_proj.weight", D, G, W),
        _heads_in(("attn", "v_DGW"), p + "self_attn.v_proj.weight", D, G, W),
        Tensor(("attn", "o_HWD"), lambda i: [(p + "self_attn.o_proj.weight").format(i=i)],
               lambda ws: ws[0].T.reshape(H, W, D), lambda x: [x.reshape(H * W, D).T]),
        _as_is(("attn_norm", "scale"), p + "input_layernorm.weight"),
        _as_is(("ffn_norm", "scale"), p + "post_attention_layernorm.weight"),
    ]
    if cfg.moe.num_experts:
        moe = p + "block_sparse_moe."
        layer += [_transposed(("ffn", "router_w"), moe + "gate.weight"),
                  _experts(("ffn", "w_gate"), moe + "experts.{e}.w1.weight", cfg.moe.num_experts),
                  _experts(("ffn", "w_up"), moe + "experts.{e}.w3.weight", cfg.moe.num_experts),
                  _experts(("ffn", "w_down"), moe + "experts.{e}.w2.weight", cfg.moe.num_experts)]
    else:
        layer += [_transposed(("ffn", "gate_DF"), p + "mlp.gate_proj.weight"),
                  _transposed(("ffn", "up_DF"), p + "mlp.up_proj.weight"),
                  _transposed(("ffn", "down_FD"), p + "mlp.down_proj.weight")]
    return top, layer


def layer_slots(cfg: ModelConfig) -> list[tuple[tuple, int | None]]:
    """For each layer i: (path of its block in the model state, index on the stacked "layers" axis or None)."""
    size = cfg.moe.every_k_layers if cfg.moe.num_experts else 1
    groups, leftover = divmod(cfg.num_layers, size)
    slots = []
    for i in range(groups * size):
        g, b = divmod(i, size)
        slots.append((("layers", "groups", "blocks", b), g) if cfg.scan_layers
                     else (("layers", "groups", g, "blocks", b), None))
    return slots + [(("layers", "leftover", "blocks", b), None) for b in range(leftover)]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    tensor: Tensor
    layers: list[int] | None  # HF layers stacked on the leaf's leading axis (None: not stacked)
    layer: int = 0  # the one layer of an unstacked per-layer leaf


def _plan(cfg: ModelConfig) -> dict[tuple, _Leaf]:
    """Model-state path of every mapped leaf -> where its values come from."""
    top, per_layer = tensor_map(cfg)
    plan = {t.path: _Leaf(t, None) for t in top}
    for i, (prefix, index) in enumerate(layer_slots(cfg)):
        for t in per_layer:
            path = prefix + t.path
            if index is None:
                plan[path] = _Leaf(t, None, i)
            else:
                plan.setdefault(path, _Leaf(t, []))
                plan[path].layers.append(i)
    return plan


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shapes(leaf: _Leaf, shape: tuple) -> list[tuple]:
    one = jax.ShapeDtypeStruct(shape[1:] if leaf.layers is not None else shape, jnp.float32)
    return [tuple(s.shape) for s in jax.eval_shape(leaf.tensor.to_hf, one)]


def check_folder(folder: HFFolder, cfg: ModelConfig, abstract_pure: dict) -> None:
    """ConfigError naming the first missing, unexpected or misshapen tensor (headers only; nothing read)."""
    plan = _plan(cfg)
    expected = {}
    for path, leaf in plan.items():
        shape = tuple(_get(abstract_pure, path).shape)
        layers = leaf.layers if leaf.layers is not None else [leaf.layer]
        for i in layers:
            expected |= dict(zip(leaf.tensor.names(i), _hf_shapes(leaf, shape)))
    if cfg.tie_embeddings:
        expected.setdefault("lm_head.weight", None)  # tied: saved by some checkpoints, never read
    found = {n for n in folder.shapes if not n.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - found - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise ConfigError(f"{folder.path} lacks tensor {missing[0]!r} ({len(missing)} missing) that its config.json "
                          "implies")
    extra = sorted(found - set(expected))
    if extra:
        raise ConfigError(f"{folder.path} has tensor {extra[0]!r} ({len(extra)} unexpected) that the mapped model has "
                          "no place for; its config.json and weights disagree, or the family has an option the "
                          "library lacks")
    for name, shape in expected.items():
        if shape is not None and folder.shapes[name] != shape:
            raise ConfigError(f"tensor {name!r} has shape {folder.shapes[name]} but config.json implies {shape}")


def import_state(folder: HFFolder, cfg: ModelConfig, abstract: nnx.State) -> nnx.State:
    """The model state (leaves sharded like `abstract`'s ShapeDtypeStructs) filled from `folder`, each device
    shard read by its own callback; state that HF has no tensor for (none for these families) is zeros."""
    abstract_pure = nnx.to_pure_dict(abstract)
    check_folder(folder, cfg, abstract_pure)
    plan = _plan(cfg)

    def build(path, spec):
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if key not in plan:
            return jax.jit(lambda: jnp.zeros(spec.shape, spec.dtype), out_shardings=spec.sharding)()
        leaf = plan[key]

        def layer_values(i):
            return leaf.tensor.to_lib([folder.read(n) for n in leaf.tensor.names(i)])

        def shard(index):
            if leaf.layers is None:
                return np.asarray(layer_values(leaf.layer)[index], spec.dtype)
            rows = [np.asarray(layer_values(i)[index[1:]], spec.dtype) for i in leaf.layers[index[0]]]
            return np.stack(rows)

        return jax.make_array_from_callback(spec.shape, spec.sharding, shard)

    pure = jax.tree_util.tree_map_with_path(build, abstract_pure)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return state


def export_tensors(cfg: ModelConfig, model_pure: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in `dtype`) for every tensor of cfg's family, one layer slice at a time."""
    for path, leaf in _plan(cfg).items():
        value = _get(model_pure, path)
        layers = leaf.layers if leaf.layers is not None else [leaf.layer]
        for position, i in enumerate(layers):
            one = np.asarray(value[position] if leaf.layers is not None else value)
            for name, array in zip(leaf.tensor.names(i), leaf.tensor.to_hf(one)):
                yield name, np.asarray(array).astype(dtype)
