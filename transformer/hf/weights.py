"""Every Hugging Face tensor of the supported families and the model parameters it becomes.

Llama / Mistral / Mixtral / Qwen2: torch's nn.Linear stores (out, in); the library stores (in, ...) with heads
split out: q_proj (H W, D) is q_DHW = q_proj.T reshaped (D, H, W), k/v likewise with G heads, o_proj (D, H W)
is o_HWD = o_proj.T reshaped (H, W, D), gate/up/down and the router are transposed, Mixtral's
experts.{e}.w1/w3/w2 (gate, up, down) are stacked on a leading expert axis. Biases are vectors as HF stores
them (q/k/v: H W head-major, like the library's). RoPE needs no permutation (both rotate halves), RMSNorm
weights are the scales as they are.

DeepSeek-V2: the MLA projections (q_proj, or q_a_proj + q_a_layernorm + q_b_proj; kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj) map onto `layers.latent_attention`'s leaves with the same transposes and head
splits; kv_b_proj's per-head rows [k_nope (N), value (V)] split into k_up and v_up. DeepSeek rotates interleaved
pairs (2j, 2j + 1), the library halves (j, j + R/2), so the RoPE rows of the queries and of the shared key are
reordered (evens, then odds) on import and back on export: the scores are unchanged. The first
first_k_dense_replace layers have the dense mlp.*_proj, the rest mlp.gate (the router), mlp.experts.{e}.* and
mlp.shared_experts.*.

GPT-2: Conv1D weights are stored (in, out) already, so nothing is transposed: the fused c_attn (D, 3 D) and
its bias are split into q, k, v (and joined again on export), c_proj / c_fc / mlp.c_proj are reshaped or
taken as they are; wpe is the learned position table, ln_* are LayerNorm scales and biases. Hub checkpoints
saved from GPT2Model name tensors without the "transformer." prefix, and old ones carry the causal-mask
buffers attn.bias / attn.masked_bias; both are read as well.

Layer i lives at LayerStack position `layer_slots(cfg)[i]`: in the scanned stack one leaf holds every group's
copy on a leading "layers" axis.

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

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # buffers, recomputed, never read
_GPT2_PREFIX = "transformer."


@dataclasses.dataclass(frozen=True)
class Tensor:
    """HF tensors `names(i)` (layer i's, for per-layer ones) holding the parameter leaves `paths` (inside a
    block for per-layer tensors): `to_lib` maps the HF arrays to the leaves, `to_hf` the leaves back."""

    paths: tuple[tuple, ...]
    names: Callable[[int], list[str]]
    to_lib: Callable[[list], list]
    to_hf: Callable[[list], list]
    in_layer: Callable[[int], bool] = lambda i: True  # per-layer tensors: which layers have it


def _one(path, name, to_lib, to_hf):
    """One HF tensor <-> one leaf."""
    return Tensor((path,), lambda i: [name.format(i=i)], lambda ws: [to_lib(ws[0])], lambda xs: [to_hf(xs[0])])


def _as_is(path, name):
    return _one(path, name, lambda w: w, lambda x: x)


def _transposed(path, name):
    return _one(path, name, lambda w: w.T, lambda x: x.T)


def _heads_in(path, name, D, heads, W):
    return _one(path, name, lambda w: w.T.reshape(D, heads, W), lambda x: x.reshape(D, heads * W).T)


def _experts(path, name, E):
    return Tensor((path,), lambda i: [name.format(i=i, e=e) for e in range(E)],
                  lambda ws: [np.stack([w.T for w in ws])], lambda xs: [x.T for x in xs[0]])


def _fused(paths, name, split, join):
    """One HF tensor <-> several leaves (GPT-2's c_attn: q, k, v). `join` takes jax arrays (shapes are checked
    with jax.eval_shape) or NumPy ones."""
    return Tensor(tuple(paths), lambda i: [name.format(i=i)], lambda ws: split(ws[0]), lambda xs: [join(xs)])


def _llama_like_map(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
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
        _one(("attn", "o_HWD"), p + "self_attn.o_proj.weight", lambda w: w.T.reshape(H, W, D),
             lambda x: x.reshape(H * W, D).T),
        _as_is(("attn_norm", "scale"), p + "input_layernorm.weight"),
        _as_is(("ffn_norm", "scale"), p + "post_attention_layernorm.weight"),
    ]
    if cfg.attention_bias != "none":
        layer += [_as_is(("attn", f"{x}_bias"), p + f"self_attn.{x}_proj.bias") for x in "qkv"]
    if cfg.attention_bias == "all":
        layer.append(_as_is(("attn", "o_bias"), p + "self_attn.o_proj.bias"))
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
        if cfg.mlp_bias:
            layer += [_as_is(("ffn", f"{x}_bias"), p + f"mlp.{x}_proj.bias") for x in ("gate", "up", "down")]
    return top, layer


def _rope_halves(x, start: int):
    """x with its last-axis entries from `start` on reordered from interleaved pairs to halves (evens, odds)."""
    width = x.shape[-1] - start
    return x[..., np.concatenate([np.arange(start), start + np.arange(0, width, 2), start + np.arange(1, width, 2)])]


def _rope_pairs(x, start: int):
    """The inverse of `_rope_halves`."""
    width = x.shape[-1] - start
    return x[..., np.concatenate([np.arange(start), start + np.argsort(np.r_[np.arange(0, width, 2),
                                                                              np.arange(1, width, 2)])])]


def _deepseek_map(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    D, H, C, Cq = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    N, R, V, E = cfg.nope_dim, cfg.rope_dim, cfg.value_dim, cfg.moe.num_experts
    top = [_as_is(("embed", "tokens_VD"), "model.embed_tokens.weight"),
           _as_is(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_embeddings:
        top.append(_transposed(("embed", "unembed_DV"), "lm_head.weight"))
    p = "model.layers.{i}."
    a = p + "self_attn."

    def queries(path, name, rows):
        return _one(path, name, lambda w: _rope_halves(w.T.reshape(rows, H, N + R), N),
                    lambda x: _rope_pairs(x, N).reshape(rows, H * (N + R)).T)

    if Cq:
        layer = [_transposed(("attn", "q_down_DC"), a + "q_a_proj.weight"),
                 _as_is(("attn", "q_norm", "scale"), a + "q_a_layernorm.weight"),
                 queries(("attn", "q_up_CHW"), a + "q_b_proj.weight", Cq)]
    else:
        layer = [queries(("attn", "q_DHW"), a + "q_proj.weight", D)]
    layer += [
        _one(("attn", "kv_down_DC"), a + "kv_a_proj_with_mqa.weight", lambda w: _rope_halves(w.T, C),
             lambda x: _rope_pairs(x, C).T),
        _as_is(("attn", "kv_norm", "scale"), a + "kv_a_layernorm.weight"),
        _fused([("attn", "k_up_CHN"), ("attn", "v_up_CHV")], a + "kv_b_proj.weight",
               lambda w: (lambda x: [x[..., :N], x[..., N:]])(w.T.reshape(C, H, N + V)),
               lambda xs: jnp.concatenate(xs, axis=-1).reshape(C, H * (N + V)).T),
        _one(("attn", "o_HVD"), a + "o_proj.weight", lambda w: w.T.reshape(H, V, D), lambda x: x.reshape(H * V, D).T),
        _as_is(("attn_norm", "scale"), p + "input_layernorm.weight"),
        _as_is(("ffn_norm", "scale"), p + "post_attention_layernorm.weight"),
    ]
    m = p + "mlp."
    dense = lambda i: not cfg.is_moe_layer(i)
    moe = cfg.is_moe_layer
    for leaf, proj in (("gate_DF", "gate_proj"), ("up_DF", "up_proj"), ("down_FD", "down_proj")):
        layer.append(dataclasses.replace(_transposed(("ffn", leaf), m + f"{proj}.weight"), in_layer=dense))
    if E:
        layer.append(dataclasses.replace(_transposed(("ffn", "router_w"), m + "gate.weight"), in_layer=moe))
        for leaf, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            layer.append(dataclasses.replace(_experts(("ffn", leaf), m + "experts.{e}." + proj + ".weight", E),
                                             in_layer=moe))
    if E and cfg.moe.num_shared_experts:
        for leaf, proj in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj")):
            layer.append(dataclasses.replace(_transposed(("ffn", leaf), m + f"shared_experts.{proj}.weight"),
                                             in_layer=moe))
    return top, layer


def _gpt2_map(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    D, H, W = cfg.d_model, cfg.num_heads, cfg.dim_per_head
    t = _GPT2_PREFIX
    top = [_as_is(("embed", "tokens_VD"), t + "wte.weight"), _as_is(("embed", "position_table"), t + "wpe.weight"),
           _as_is(("final_norm", "scale"), t + "ln_f.weight"), _as_is(("final_norm", "bias"), t + "ln_f.bias")]
    if not cfg.tie_embeddings:
        top.append(_transposed(("embed", "unembed_DV"), "lm_head.weight"))
    p = t + "h.{i}."
    qkv = [("attn", "q_DHW"), ("attn", "k_DGW"), ("attn", "v_DGW")]
    layer = [
        _fused(qkv, p + "attn.c_attn.weight", lambda w: [x.reshape(D, H, W) for x in np.split(w, 3, axis=1)],
               lambda xs: jnp.concatenate([x.reshape(D, H * W) for x in xs], axis=1)),
        _fused([("attn", f"{x}_bias") for x in "qkv"], p + "attn.c_attn.bias", lambda b: np.split(b, 3),
               jnp.concatenate),
        _one(("attn", "o_HWD"), p + "attn.c_proj.weight", lambda w: w.reshape(H, W, D), lambda x: x.reshape(H * W, D)),
        _as_is(("attn", "o_bias"), p + "attn.c_proj.bias"),
        _as_is(("ffn", "up_DF"), p + "mlp.c_fc.weight"), _as_is(("ffn", "up_bias"), p + "mlp.c_fc.bias"),
        _as_is(("ffn", "down_FD"), p + "mlp.c_proj.weight"), _as_is(("ffn", "down_bias"), p + "mlp.c_proj.bias"),
    ]
    for norm, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
        layer += [_as_is((norm, "scale"), p + hf + ".weight"), _as_is((norm, "bias"), p + hf + ".bias")]
    return top, layer


def _is_gpt2(cfg: ModelConfig) -> bool:
    return cfg.position == "learned"


def tensor_map(cfg: ModelConfig) -> tuple[list[Tensor], list[Tensor]]:
    """(model-level tensors, per-layer tensors) of cfg's layout: GPT-2's with learned positions, DeepSeek-V2's
    with MLA, else Llama's (with Mixtral's experts, and the biases cfg has)."""
    if cfg.attention == "mla":
        return _deepseek_map(cfg)
    return _gpt2_map(cfg) if _is_gpt2(cfg) else _llama_like_map(cfg)


def layer_slots(cfg: ModelConfig) -> list[tuple[tuple, int | None]]:
    """For each layer i: (path of its block in the model state, index on the stacked "layers" axis or None)."""
    size, lead = cfg.layer_group_size, cfg.lead_layers
    groups, leftover = divmod(cfg.num_layers - lead, size)
    slots = [(("layers", "lead", "blocks", b), None) for b in range(lead)]
    for i in range(groups * size):
        g, b = divmod(i, size)
        slots.append((("layers", "groups", "blocks", b), g) if cfg.scan_layers
                     else (("layers", "groups", g, "blocks", b), None))
    return slots + [(("layers", "leftover", "blocks", b), None) for b in range(leftover)]


def _instances(cfg: ModelConfig) -> Iterator[tuple[Tensor, int, list[tuple[tuple, int | None]]]]:
    """(tensor, layer i, [(model-state path of each of its leaves, index on the stacked axis or None)])."""
    top, per_layer = tensor_map(cfg)
    for t in top:
        yield t, 0, [(path, None) for path in t.paths]
    for i, (prefix, index) in enumerate(layer_slots(cfg)):
        for t in per_layer:
            if t.in_layer(i):
                yield t, i, [(prefix + path, index) for path in t.paths]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    tensor: Tensor
    part: int  # which of tensor.paths
    layers: list[int] | None  # HF layers stacked on the leaf's leading axis (None: not stacked)
    layer: int = 0  # the one layer of an unstacked leaf


def _plan(cfg: ModelConfig) -> dict[tuple, _Leaf]:
    """Model-state path of every mapped leaf -> where its values come from."""
    plan = {}
    for t, i, leaves in _instances(cfg):
        for part, (path, index) in enumerate(leaves):
            if index is None:
                plan[path] = _Leaf(t, part, None, i)
            else:
                plan.setdefault(path, _Leaf(t, part, []))
                plan[path].layers.append(i)
    return plan


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _stored_names(folder: HFFolder, cfg: ModelConfig) -> dict[str, str]:
    """Canonical tensor name -> the name in `folder` (GPT-2 hub checkpoints lack the "transformer." prefix),
    buffers left out."""
    names = {}
    for name in folder.shapes:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        bare = _is_gpt2(cfg) and not name.startswith((_GPT2_PREFIX, "lm_head."))
        names[_GPT2_PREFIX + name if bare else name] = name
    return names


def _expected_shapes(cfg: ModelConfig, abstract_pure: dict) -> dict[str, tuple]:
    expected = {}
    for t, i, leaves in _instances(cfg):
        shapes = []
        for path, index in leaves:
            shape = tuple(_get(abstract_pure, path).shape)
            shapes.append(jax.ShapeDtypeStruct(shape[1:] if index is not None else shape, jnp.float32))
        expected |= dict(zip(t.names(i), (tuple(s.shape) for s in jax.eval_shape(t.to_hf, shapes))))
    return expected


def check_folder(folder: HFFolder, cfg: ModelConfig, abstract_pure: dict) -> None:
    """ConfigError naming the first missing, unexpected or misshapen tensor (headers only; nothing read)."""
    expected = _expected_shapes(cfg, abstract_pure)
    stored = _stored_names(folder, cfg)
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()  # saved by some checkpoints, never read
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ConfigError(f"{folder.path} lacks tensor {missing[0]!r} ({len(missing)} missing) that its config.json "
                          "implies")
    extra = sorted(set(stored) - set(expected) - tied_head)
    if extra:
        raise ConfigError(f"{folder.path} has tensor {stored[extra[0]]!r} ({len(extra)} unexpected) that the mapped "
                          "model has no place for; its config.json and weights disagree, or the family has an option "
                          "the library lacks")
    for name, shape in expected.items():
        if folder.shapes[stored[name]] != shape:
            raise ConfigError(f"tensor {stored[name]!r} has shape {folder.shapes[stored[name]]} but config.json "
                              f"implies {shape}")


def import_state(folder: HFFolder, cfg: ModelConfig, abstract: nnx.State) -> nnx.State:
    """The model state (leaves sharded like `abstract`'s ShapeDtypeStructs) filled from `folder`, each device
    shard read by its own callback; state that HF has no tensor for (none for these families) is zeros."""
    abstract_pure = nnx.to_pure_dict(abstract)
    check_folder(folder, cfg, abstract_pure)
    plan = _plan(cfg)
    stored = _stored_names(folder, cfg)

    def build(path, spec):
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        if key not in plan:
            return jax.jit(lambda: jnp.zeros(spec.shape, spec.dtype), out_shardings=spec.sharding)()
        leaf = plan[key]

        def layer_values(i):
            return leaf.tensor.to_lib([folder.read(stored[n]) for n in leaf.tensor.names(i)])[leaf.part]

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
    for t, i, leaves in _instances(cfg):
        values = [np.asarray(_get(model_pure, path)[index] if index is not None else _get(model_pure, path))
                  for path, index in leaves]
        for name, array in zip(t.names(i), t.to_hf(values)):
            yield name, np.asarray(array).astype(dtype)
