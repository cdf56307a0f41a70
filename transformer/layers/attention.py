"""Multi-head attention with grouped KV heads (MHA: G = H, GQA: 1 < G < H, MQA: G = 1).

Each layer holds one `AttentionMask` built from the config (`attention_mask`): self-attention is causal
or bidirectional with the layer's sliding window (model.sliding_window, per layer when
model.attention_pattern is set), ALiBi slopes or T5 relative-position buckets; cross-attention (queries
from the decoder, keys/values from the encoder output) is bidirectional and position-free. RoPE is applied
from explicit position ids, so packed and zigzag-ordered sequences are exact. Scores are scaled by
1/sqrt(head width) (RoPE YaRN additionally scales q and k by mscale). With model.attention_bias the q, k, v
(and, for "all", output) projections add biases (`layers.projection`).

T5's relative bias (model.position="t5_bias") adds table[bucket(key position - query position), head] to
the scores; the (buckets, H) table belongs to the layer stack (T5 shares it over a stack's layers) and
comes in with each call as relative_bias_OH. T5 itself does not scale scores by 1/sqrt(head width) (its
initialisation absorbs the factor); keeping the scale is an equivalent reparametrisation of q.

The mask, the positions, the segment ids and the bias table go to ring attention when the current mesh
splits `sequence`, else to `ops.attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ModelConfig
from transformer.inference.cache import KV, rotated_in_cache
from transformer.inference.decode_attention import cached_attention, write_slots
from transformer.layers.projection import bias_param, project
from transformer.lora import adapter
from transformer.ops import attention as attention_ops
from transformer.ops import positions as pos_ops
from transformer.ops.mask import AttentionMask, RelativeBuckets
from transformer.ops.ring_attention import ring_attention_sharded

_Q_AXES = ("batch", "length", "heads", None)
_KV_AXES = ("batch", "length", "kv_heads", None)


def rope_tables(cfg: ModelConfig, seq_len: int):
    """(inv_freq, mscale) for cfg's RoPE; dynamic NTK grows with the current `seq_len`."""
    return pos_ops.rope_inv_freq(
        cfg.rope_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling, factor=cfg.rope_scaling_factor,
        original_max_len=cfg.max_seq_len, seq_len=seq_len, beta_fast=cfg.yarn_beta_fast,
        beta_slow=cfg.yarn_beta_slow, low_freq_factor=cfg.llama3_low_freq_factor,
        high_freq_factor=cfg.llama3_high_freq_factor, yarn_mscale=cfg.yarn_mscale,
        yarn_mscale_all_dim=cfg.yarn_mscale_all_dim)


def rope_frequencies(cfg: ModelConfig, lengths_B: jax.Array):
    """(inv_freq, mscale) for rows whose current lengths are lengths_B: (J,) frequencies, or (B, J) for
    dynamic NTK, whose frequencies grow with each row's length."""
    if cfg.rope_scaling == "dynamic_ntk":
        return pos_ops.dynamic_ntk_inv_freq_BJ(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                               cfg.max_seq_len, lengths_B), 1.0
    return rope_tables(cfg, int(cfg.max_seq_len))


def attention_mask(cfg: ModelConfig, *, causal: bool, cross: bool = False, layer: int = 0) -> AttentionMask:
    """The mask of self-attention layer `layer` of a stack (causal or bidirectional, with that layer's window)
    or of a cross-attention layer. T5 buckets are bidirectional in a bidirectional layer, one-sided in a causal
    one."""
    if cross:
        return AttentionMask(causal=False)
    slopes = pos_ops.alibi_slopes(cfg.num_heads) if cfg.position == "alibi" else None
    buckets = RelativeBuckets(cfg.relative_buckets, cfg.relative_max_distance, bidirectional=not causal) \
        if cfg.position == "t5_bias" else None
    return AttentionMask(causal=causal, sliding_window=cfg.layer_window(layer), alibi_slopes=slopes,
                         relative_buckets=buckets)


def attend(q_BQHW, k_BKGW, v_BKGW, mask: AttentionMask, cfg: ModelConfig, *, scale: float | None = None,
           **tokens) -> jax.Array:
    """Attention with cfg's kernel choice: Ring Attention when the current mesh splits `sequence`, else
    `ops.attention`. `tokens`: q_positions_BQ, kv_positions_BK, q_segment_ids_BQ, kv_segment_ids_BK and
    relative_bias_OH; scale defaults to 1/sqrt(model.dim_per_head)."""
    mesh = sharding.current_mesh()
    scale = 1.0 / math.sqrt(cfg.dim_per_head) if scale is None else scale
    kernel = dict(scale=scale, implementation=cfg.attention_kernel,
                  block_size=cfg.attention_block_size)
    if attention_ops.ring_size(mesh) > 1:
        return ring_attention_sharded(q_BQHW, k_BKGW, v_BKGW, mask, mesh, **tokens, **kernel)
    return attention_ops.attention(q_BQHW, k_BKGW, v_BKGW, mask, **tokens, **kernel)


class Attention(nnx.Module):
    """q/k/v/o projections around one attention kernel call; the output projection starts at
    init_std / sqrt(2 * num_layers). `layer`: the layer's index in its stack (its attention_pattern entry)."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, causal: bool = True, cross: bool = False,
                 layer: int = 0, rngs: nnx.Rngs):
        self.cfg = cfg
        self.causal = bool(causal) and not cross
        self.cross = bool(cross)
        self.mask = attention_mask(cfg, causal=self.causal, cross=self.cross, layer=layer)
        self.dtype = jnp.dtype(cfg.dtype)
        D, H, G, W = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        param_dtype = jnp.dtype(cfg.param_dtype)
        init_in = jax.nn.initializers.normal(stddev=cfg.init_std)
        init_out = jax.nn.initializers.normal(stddev=cfg.init_std / math.sqrt(2 * num_layers))

        def param(init, shape, axes):
            return nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=axes)

        self.q_DHW = param(init_in, (D, H, W), ("embed", "heads", "head_dim"))
        self.k_DGW = param(init_in, (D, G, W), ("embed", "kv_heads", "head_dim"))
        self.v_DGW = param(init_in, (D, G, W), ("embed", "kv_heads", "head_dim"))
        self.o_HWD = param(init_out, (H, W, D), ("heads", "head_dim", "embed"))
        qkv, out = cfg.attention_bias in ("qkv", "all"), cfg.attention_bias == "all"
        self.q_bias = bias_param(qkv, H * W, "heads", param_dtype)
        self.k_bias = bias_param(qkv, G * W, "kv_heads", param_dtype)
        self.v_bias = bias_param(qkv, G * W, "kv_heads", param_dtype)
        self.o_bias = bias_param(out, D, "embed", param_dtype)

    def __call__(self, x_BLD: jax.Array, *, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None, context_BSD: jax.Array | None = None,
                 context_segment_ids_BS: jax.Array | None = None,
                 relative_bias_OH: jax.Array | None = None) -> jax.Array:
        """Self-attention over x_BLD, or cross-attention from x_BLD to context_BSD (cross=True).

        positions_BL default to arange. For cross-attention, segment ids (when either side gives
        them; the missing side counts as all ones) let a query see only context tokens of its segment.
        relative_bias_OH: the stack's T5 bias table (self-attention with model.position="t5_bias").
        """
        cfg = self.cfg
        B, L, _ = x_BLD.shape
        if self.cross != (context_BSD is not None):
            raise ValueError("cross-attention needs context_BSD (the encoder output) and self-attention must not "
                             f"get one; this layer has cross={self.cross}")
        x_BLD = x_BLD.astype(self.dtype)
        q_BLHW = self._queries(x_BLD)
        k_BSGW, v_BSGW = self._keys_values(x_BLD if context_BSD is None else context_BSD)

        if self.cross:
            q_seg_BL, kv_seg_BS = _cross_segments(segment_ids_BL, context_segment_ids_BS, B, L, k_BSGW.shape[1])
            tokens = dict(q_segment_ids_BQ=q_seg_BL, kv_segment_ids_BK=kv_seg_BS)
        else:
            if positions_BL is not None and tuple(positions_BL.shape) != (B, L):
                raise ValueError(f"positions_BL has shape {tuple(positions_BL.shape)}; expected (B, L) = {(B, L)}")
            if cfg.position == "rope":
                inv_freq, mscale = rope_frequencies(cfg, jnp.full((B,), L, jnp.int32))
                rope_pos_BL = attention_ops.arange_positions(positions_BL, B, L)
                q_BLHW = pos_ops.apply_rope(q_BLHW, rope_pos_BL, inv_freq, mscale)
                k_BSGW = pos_ops.apply_rope(k_BSGW, rope_pos_BL, inv_freq, mscale)
            tokens = dict(q_positions_BQ=positions_BL, kv_positions_BK=positions_BL, q_segment_ids_BQ=segment_ids_BL,
                          kv_segment_ids_BK=segment_ids_BL, relative_bias_OH=relative_bias_OH)
        return self._output(attend(q_BLHW, k_BSGW, v_BSGW, self.mask, cfg, **tokens))

    def _queries(self, x_BLD):
        return sharding.constrain(project("BLD,DHW->BLHW", x_BLD, self.q_DHW, self.q_bias, self.dtype,
                                          adapter(self, "q")), _Q_AXES)

    def _keys_values(self, source_BSD):
        return tuple(sharding.constrain(project("BSD,DGW->BSGW", source_BSD, w, b, self.dtype, lora), _KV_AXES)
                     for w, b, lora in ((self.k_DGW, self.k_bias, adapter(self, "k")),
                                        (self.v_DGW, self.v_bias, adapter(self, "v"))))

    def _output(self, out_BLHW):
        out_BLHW = sharding.constrain(out_BLHW, _Q_AXES)
        y_BLD = project("BLHW,HWD->BLD", out_BLHW, self.o_HWD, self.o_bias, self.dtype, adapter(self, "o"))
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))

    def extend(self, x_BLD: jax.Array, kv, layer, write, *, fresh: bool, relative_bias_OH=None):
        """Self-attention of L new tokens with the KV cache: (y_BLD, kv with this layer's new keys written).

        kv: the stacked (k_NBKGW, v_NBKGW) cache; layer: this layer's index in it; write: the call's
        `inference.cache.Write`. fresh=True (the first chunk of a prompt, empty cache) attends the new tokens
        to each other with the training kernels (ring attention on a `sequence` mesh); otherwise the tokens
        are written first and their queries read the whole cache with the decode kernel."""
        cfg = self.cfg
        q_BLHW = self._queries(x_BLD)
        k_BLGW, v_BLGW = self._keys_values(x_BLD)
        stored_k_BLGW, rope = k_BLGW, None
        if cfg.position == "rope":
            rope = rope_frequencies(cfg, write.lengths_B)
            q_BLHW = pos_ops.apply_rope(q_BLHW, write.positions_BL, *rope)
            k_BLGW = pos_ops.apply_rope(k_BLGW, write.positions_BL, *rope)
            stored_k_BLGW = k_BLGW if rotated_in_cache(cfg) else stored_k_BLGW
        kv = KV(write_slots(kv.k, stored_k_BLGW, write.slots_BL, layer=layer),
                write_slots(kv.v, v_BLGW, write.slots_BL, layer=layer))
        if fresh:
            out_BLHW = attend(q_BLHW, k_BLGW, v_BLGW, self.mask, cfg, q_positions_BQ=write.positions_BL,
                              kv_positions_BK=write.key_positions_BL, relative_bias_OH=relative_bias_OH)
        else:
            unrotated = cfg.position == "rope" and not rotated_in_cache(cfg)
            out_BLHW = cached_attention(q_BLHW, kv.k, kv.v, layer, self.mask, q_positions_BQ=write.positions_BL,
                                        cache_positions_BK=write.cache_positions_BK,
                                        scale=1.0 / math.sqrt(cfg.dim_per_head), block_size=cfg.attention_block_size,
                                        rope=rope if unrotated else None, relative_bias_OH=relative_bias_OH)
        return self._output(out_BLHW), kv

    def extend_cross(self, x_BLD: jax.Array, cross, layer, source_valid_BS: jax.Array, context_BSD=None):
        """Cross-attention of new decoder tokens to the cached encoder keys/values: (y_BLD, cross). With
        context_BSD (the first call) this layer's keys/values are computed from it and stored at `layer`."""
        if context_BSD is not None:
            k_BSGW, v_BSGW = self._keys_values(context_BSD)
            cross = KV(cross.k.at[layer].set(k_BSGW.astype(cross.k.dtype)),
                       cross.v.at[layer].set(v_BSGW.astype(cross.v.dtype)))
        k_BSGW, v_BSGW = (jax.lax.dynamic_index_in_dim(x, layer, keepdims=False) for x in cross)
        B, L = x_BLD.shape[:2]
        out_BLHW = attention_ops.attention(
            self._queries(x_BLD), k_BSGW, v_BSGW, self.mask, q_segment_ids_BQ=jnp.ones((B, L), jnp.int32),
            kv_segment_ids_BK=source_valid_BS.astype(jnp.int32), scale=1.0 / math.sqrt(self.cfg.dim_per_head),
            implementation=self.cfg.attention_kernel, block_size=self.cfg.attention_block_size)
        return self._output(out_BLHW), cross


def _cross_segments(q_seg_BL, kv_seg_BS, B: int, L: int, S: int):
    if q_seg_BL is None and kv_seg_BS is None:
        return None, None
    q_seg_BL = jnp.ones((B, L), jnp.int32) if q_seg_BL is None else q_seg_BL
    kv_seg_BS = jnp.ones((B, S), jnp.int32) if kv_seg_BS is None else kv_seg_BS
    return q_seg_BL, kv_seg_BS
