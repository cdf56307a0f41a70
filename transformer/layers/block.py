"""Transformer block (self-attention, optional cross-attention, MLP or MoE) with pre- or post-norm
residuals, and `LayerGroup`, the unit the model scans over. A block is layer `layer` of its stack: that index
decides whether its FFN is the MoE (every moe.every_k_layers-th layer) and its sliding window
(model.attention_pattern).

pre-norm:  x = x + f(norm(x))     post-norm:  x = norm(x + f(x))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ModelConfig
from transformer.layers.attention import Attention
from transformer.layers.latent_attention import LatentAttention
from transformer.layers.mlp import MLP
from transformer.layers.norms import make_norm

_ACT = ("batch", "length", "embed")


class Block(nnx.Module):
    """One layer. `__call__` returns (x_BLD, aux): the MoE's aux dict, or {} for a dense MLP."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, causal: bool, cross: bool = False, layer: int = 0,
                 rngs: nnx.Rngs):
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self_attention = LatentAttention if cfg.attention == "mla" else Attention
        self.attn = self_attention(cfg, num_layers=num_layers, causal=causal, layer=layer, rngs=rngs)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, num_layers=num_layers, cross=True, rngs=rngs) if cross else None
        self.ffn_norm = make_norm(cfg)
        moe = cfg.is_moe_layer(layer)
        if moe:
            from transformer.layers.moe import MoE

            self.ffn = MoE(cfg, rngs=rngs)
        else:
            self.ffn = MLP(cfg, num_layers=num_layers, rngs=rngs)
        self.moe = bool(moe)

    def _residual(self, norm, f, x_BLD):
        if self.pre_norm:
            return x_BLD + f(norm(x_BLD))
        return norm(x_BLD + f(x_BLD))

    def __call__(self, x_BLD: jax.Array, *, positions_BL=None, segment_ids_BL=None, context_BSD=None,
                 context_segment_ids_BS=None, relative_bias_OH=None,
                 update_router_bias: bool = False) -> tuple[jax.Array, dict]:
        """relative_bias_OH: the stack's T5 bias table, for the self-attention."""
        x_BLD = sharding.constrain(x_BLD, _ACT)
        x_BLD = self._residual(self.attn_norm, lambda h: self.attn(h, positions_BL=positions_BL,
                                                                   segment_ids_BL=segment_ids_BL,
                                                                   relative_bias_OH=relative_bias_OH), x_BLD)
        if self.cross_attn is not None:
            x_BLD = self._residual(self.cross_norm, lambda h: self.cross_attn(
                h, segment_ids_BL=segment_ids_BL, context_BSD=context_BSD,
                context_segment_ids_BS=context_segment_ids_BS), x_BLD)
        aux = {}
        if self.moe:
            def ffn(h_BLD):
                y_BLD, aux_moe = self.ffn(h_BLD, update_router_bias=update_router_bias)
                aux.update(aux_moe)
                return y_BLD
        else:
            ffn = self.ffn
        x_BLD = self._residual(self.ffn_norm, ffn, x_BLD)
        return sharding.constrain(x_BLD, _ACT), aux


    def extend(self, x_BLD: jax.Array, kv, cross, layer, write, *, fresh: bool, source_valid_BS=None,
               context_BSD=None, relative_bias_OH=None):
        """The block over L new tokens with the KV cache (`Attention.extend`): (x_BLD, kv, cross). MoE layers
        route every token with no capacity drops."""
        x_BLD, kv = self._cached(self.attn_norm, lambda h: self.attn.extend(
            h, kv, layer, write, fresh=fresh, relative_bias_OH=relative_bias_OH), x_BLD)
        if self.cross_attn is not None:
            x_BLD, cross = self._cached(self.cross_norm, lambda h: self.cross_attn.extend_cross(
                h, cross, layer, source_valid_BS, context_BSD), x_BLD)
        ffn = (lambda h: self.ffn(h, no_drops=True)[0]) if self.moe else self.ffn
        return self._residual(self.ffn_norm, ffn, x_BLD), kv, cross

    def _cached(self, norm, f, x_BLD):
        """`_residual` for an f that also returns a cache."""
        out = {}

        def g(h_BLD):
            y_BLD, out["cache"] = f(h_BLD)
            return y_BLD

        return self._residual(norm, g, x_BLD), out["cache"]


class LayerGroup(nnx.Module):
    """`size` consecutive blocks, layers first_layer .. first_layer + size - 1 of the stack. Scanned groups
    start at `ModelConfig.lead_layers` plus a multiple of `ModelConfig.layer_group_size`, so they are identical.
    Returns (x_BLD, aux of its MoE blocks stacked on a leading axis, or {})."""

    def __init__(self, cfg: ModelConfig, *, first_layer: int, size: int, num_layers: int, causal: bool,
                 cross: bool = False, rngs: nnx.Rngs):
        self.blocks = nnx.List([
            Block(cfg, layer=first_layer + i, num_layers=num_layers, causal=causal, cross=cross, rngs=rngs)
            for i in range(size)])

    def __call__(self, x_BLD: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
        stats = []
        for block in self.blocks:
            x_BLD, block_aux = block(x_BLD, **kwargs)
            if block_aux:
                stats.append(block_aux)
        return x_BLD, jax.tree.map(lambda *values: jnp.stack(values), *stats) if stats else {}

    def extend(self, x_BLD: jax.Array, kv, cross, first_layer, write, **kwargs):
        """`Block.extend` of each block; block i is layer first_layer + i of the stacked caches."""
        for i, block in enumerate(self.blocks):
            x_BLD, kv, cross = block.extend(x_BLD, kv, cross, first_layer + i, write, **kwargs)
        return x_BLD, kv, cross
