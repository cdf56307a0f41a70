"""Multi-head attention with grouped KV heads (MHA: G = H, GQA: 1 < G < H, MQA: G = 1).

Self-attention (causal or bidirectional, optional sliding window) applies RoPE or ALiBi from
explicit position ids, so packed and zigzag-ordered sequences are exact; cross-attention
(queries from the decoder, keys/values from the encoder output) is bidirectional and
position-free. Scores are scaled by 1/sqrt(head_dim) (RoPE YaRN additionally scales q and
k by mscale). The kernel is ring attention when the active mesh splits "sequence", else
`transformer.ops.attention.attention(implementation=cfg.attention_kernel)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ModelConfig
from transformer.ops import attention as attention_ops
from transformer.ops import positions as pos_ops

_Q_AXES = ("batch", "length", "heads", None)
_KV_AXES = ("batch", "length", "kv_heads", None)


def rope_tables(cfg: ModelConfig, seq_len: int):
    """(inv_freq, mscale) for cfg's RoPE; dynamic NTK grows with the current `seq_len`."""
    return pos_ops.rope_inv_freq(
        cfg.dim_per_head, theta=cfg.rope_theta, scaling=cfg.rope_scaling, factor=cfg.rope_scaling_factor,
        original_max_len=cfg.max_seq_len, seq_len=seq_len, beta_fast=cfg.yarn_beta_fast,
        beta_slow=cfg.yarn_beta_slow, low_freq_factor=cfg.llama3_low_freq_factor,
        high_freq_factor=cfg.llama3_high_freq_factor)


def sequence_parallel() -> bool:
    mesh = sharding.current_mesh()
    return mesh is not None and dict(mesh.shape).get("sequence", 1) > 1


class Attention(nnx.Module):
    """q/k/v/o projections around one attention kernel call; the output projection starts at
    init_std / sqrt(2 * num_layers)."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, causal: bool = True, cross: bool = False,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.causal = bool(causal) and not cross
        self.cross = bool(cross)
        self.dtype = jnp.dtype(cfg.dtype)
        D, H, G, Dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        param_dtype = jnp.dtype(cfg.param_dtype)
        init_in = jax.nn.initializers.normal(stddev=cfg.init_std)
        init_out = jax.nn.initializers.normal(stddev=cfg.init_std / math.sqrt(2 * num_layers))

        def param(init, shape, axes):
            return nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=axes)

        self.q_DHK = param(init_in, (D, H, Dh), ("embed", "heads", "head_dim"))
        self.k_DGK = param(init_in, (D, G, Dh), ("embed", "kv_heads", "head_dim"))
        self.v_DGK = param(init_in, (D, G, Dh), ("embed", "kv_heads", "head_dim"))
        self.o_HKD = param(init_out, (H, Dh, D), ("heads", "head_dim", "embed"))

    def __call__(self, x_BLD: jax.Array, *, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None, context_BSD: jax.Array | None = None,
                 context_segment_ids_BS: jax.Array | None = None) -> jax.Array:
        """Self-attention over x_BLD, or cross-attention from x_BLD to context_BSD (cross=True).

        positions_BL default to arange. For cross-attention, segment ids (when either side gives
        them; the missing side counts as all ones) let a query see only context tokens of its segment.
        """
        cfg = self.cfg
        B, L, _ = x_BLD.shape
        if self.cross != (context_BSD is not None):
            raise ValueError("cross-attention needs context_BSD (the encoder output) and self-attention must not "
                             f"get one; this layer has cross={self.cross}")
        w = lambda p: p[...].astype(self.dtype)
        x_BLD = x_BLD.astype(self.dtype)
        source_BSD = x_BLD if context_BSD is None else context_BSD.astype(self.dtype)
        q_BLHK = sharding.constrain(jnp.einsum("BLD,DHK->BLHK", x_BLD, w(self.q_DHK)), _Q_AXES)
        k_BSGK = sharding.constrain(jnp.einsum("BSD,DGK->BSGK", source_BSD, w(self.k_DGK)), _KV_AXES)
        v_BSGK = sharding.constrain(jnp.einsum("BSD,DGK->BSGK", source_BSD, w(self.v_DGK)), _KV_AXES)

        options = dict(causal=self.causal, scale=1.0 / math.sqrt(cfg.dim_per_head))
        if self.cross:
            q_seg, kv_seg = _cross_segments(segment_ids_BL, context_segment_ids_BS, B, L, source_BSD.shape[1])
            options.update(q_segment_ids_BQ=q_seg, kv_segment_ids_BK=kv_seg)
        else:
            if positions_BL is not None and tuple(positions_BL.shape) != (B, L):
                raise ValueError(f"positions_BL has shape {tuple(positions_BL.shape)}; expected (B, L) = {(B, L)}")
            if cfg.position == "rope":
                inv_freq, mscale = rope_tables(cfg, L)
                rope_pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)) \
                    if positions_BL is None else positions_BL
                q_BLHK = pos_ops.apply_rope(q_BLHK, rope_pos_BL, inv_freq, mscale)
                k_BSGK = pos_ops.apply_rope(k_BSGK, rope_pos_BL, inv_freq, mscale)
            options.update(q_positions_BQ=positions_BL, kv_positions_BK=positions_BL,
                           q_segment_ids_BQ=segment_ids_BL, kv_segment_ids_BK=segment_ids_BL,
                           sliding_window=cfg.sliding_window,
                           alibi_slopes_H=pos_ops.alibi_slopes(cfg.num_heads) if cfg.position == "alibi" else None)
        out_BLHK = sharding.constrain(self._kernel(q_BLHK, k_BSGK, v_BSGK, options), _Q_AXES)
        y_BLD = jnp.einsum("BLHK,HKD->BLD", out_BLHK.astype(self.dtype), w(self.o_HKD))
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))

    def _kernel(self, q_BLHK, k_BSGK, v_BSGK, options: dict) -> jax.Array:
        cfg = self.cfg
        ring_ok = options.get("q_segment_ids_BQ") is None or not self.cross
        if sequence_parallel() and ring_ok:
            from transformer.ops.ring_attention import ring_attention_sharded

            return ring_attention_sharded(
                q_BLHK, k_BSGK, v_BSGK, sharding.current_mesh(), causal=options["causal"],
                q_positions=options.get("q_positions_BQ"), kv_positions=options.get("kv_positions_BK"),
                segment_ids=options.get("q_segment_ids_BQ"), sliding_window=options.get("sliding_window", 0),
                alibi_slopes_H=options.get("alibi_slopes_H"), scale=options["scale"],
                block_kernel=cfg.attention_kernel, block_size=cfg.attention_block_size)
        return attention_ops.attention(q_BLHK, k_BSGK, v_BSGK, implementation=cfg.attention_kernel,
                                       block_size=cfg.attention_block_size, **options)


def _cross_segments(q_seg_BL, kv_seg_BS, B: int, L: int, S: int):
    if q_seg_BL is None and kv_seg_BS is None:
        return None, None
    q_seg_BL = jnp.ones((B, L), jnp.int32) if q_seg_BL is None else q_seg_BL
    kv_seg_BS = jnp.ones((B, S), jnp.int32) if kv_seg_BS is None else kv_seg_BS
    return q_seg_BL, kv_seg_BS
