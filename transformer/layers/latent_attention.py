"""Multi-head latent attention (MLA, DeepSeek-V2, arXiv:2405.04434): keys and values come from one low-rank
latent shared by all heads, with a decoupled RoPE key.

    c_q = RMSNorm(x W_DQ), q = c_q W_UQ          (model.q_lora_rank = d_c' > 0; else q = x W_Q)
    q = [q_nope (H x N), q_rope (H x R)],  q_rope RoPE'd
    [c_kv (C), k_rope (R)] = x W_DKV,  c_kv = RMSNorm(c_kv),  k_rope RoPE'd and shared by all heads
    k = [c_kv W_UK (H x N), k_rope],  v = c_kv W_UV (H x V)
    out = softmax(q k^T / sqrt(N + R)) v W_O     (DeepSeek's YaRN: scores also times m(yarn_mscale_all_dim)^2)

(C = kv_lora_rank, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim.) Training materialises k and
v and runs the library's kernels (ring attention on a `sequence` mesh). Decoding caches per token only
[c_kv, rotated k_rope], one "kv head" of width C + R, with W_UK absorbed into the query
(q_nope W_UK^T: C wide) and W_UV applied after the weighted sum: MQA with one key of width C + R whose value
is the same vector, of which the first C entries are kept. The cache's value array is empty (width 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ModelConfig
from transformer.inference.cache import KV
from transformer.inference.decode_attention import cached_attention, write_slots
from transformer.layers.attention import _Q_AXES, attend, attention_mask, rope_frequencies
from transformer.layers.norms import RMSNorm
from transformer.layers.projection import project
from transformer.lora import adapted_weight, adapter
from transformer.ops import attention as attention_ops
from transformer.ops import positions as pos_ops


def matmul_params(cfg: ModelConfig) -> int:
    """Attention weights of one MLA layer (the paper's count, norms excluded): queries (D d_c' + d_c' H (N + R),
    or D H (N + R)), the latent and RoPE key D (C + R), the up-projections C H (N + V) and the output H V D."""
    D, H, C, N, R, V = (cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.nope_dim, cfg.rope_dim, cfg.value_dim)
    Cq = cfg.q_lora_rank
    queries = D * Cq + Cq * H * (N + R) if Cq else D * H * (N + R)
    return queries + D * (C + R) + C * H * (N + V) + H * V * D


def cache_width(cfg: ModelConfig) -> int:
    """Values one token's cache entry holds per layer: C + R."""
    return cfg.kv_lora_rank + cfg.rope_dim


class LatentAttention(nnx.Module):
    """MLA self-attention (see the module docstring); the output projection starts at
    init_std / sqrt(2 * num_layers). `layer`: the layer's index in its stack (its attention_pattern entry)."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, causal: bool = True, layer: int = 0,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.mask = attention_mask(cfg, causal=bool(causal), layer=layer)
        self.dtype = jnp.dtype(cfg.dtype)
        D, H, C, Cq = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
        N, R, V = cfg.nope_dim, cfg.rope_dim, cfg.value_dim
        param_dtype = jnp.dtype(cfg.param_dtype)
        init_in = jax.nn.initializers.normal(stddev=cfg.init_std)
        init_out = jax.nn.initializers.normal(stddev=cfg.init_std / math.sqrt(2 * num_layers))

        def param(init, shape, axes):
            return nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=axes)

        if Cq:
            self.q_down_DC = param(init_in, (D, Cq), ("embed", None))
            self.q_norm = RMSNorm(Cq, eps=cfg.norm_eps, param_dtype=param_dtype)
            self.q_up_CHW = param(init_in, (Cq, H, N + R), (None, "heads", "head_dim"))
        else:
            self.q_DHW = param(init_in, (D, H, N + R), ("embed", "heads", "head_dim"))
        self.kv_down_DC = param(init_in, (D, C + R), ("embed", None))
        self.kv_norm = RMSNorm(C, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.k_up_CHN = param(init_in, (C, H, N), (None, "heads", "head_dim"))
        self.v_up_CHV = param(init_in, (C, H, V), (None, "heads", "head_dim"))
        self.o_HVD = param(init_out, (H, V, D), ("heads", "head_dim", "embed"))

    def _queries(self, x_BLD, positions_BL, rope):
        """Queries (B, L, H, N + R) with RoPE on their last R entries."""
        if self.cfg.q_lora_rank:
            c_BLC = self.q_norm(project("BLD,DC->BLC", x_BLD, self.q_down_DC, None, self.dtype))
            q_BLHW = project("BLC,CHW->BLHW", c_BLC, self.q_up_CHW, None, self.dtype, adapter(self, "q"))
        else:
            q_BLHW = project("BLD,DHW->BLHW", x_BLD, self.q_DHW, None, self.dtype, adapter(self, "q"))
        N = self.cfg.nope_dim
        q_BLHW = jnp.concatenate([q_BLHW[..., :N], pos_ops.apply_rope(q_BLHW[..., N:], positions_BL, *rope)], -1)
        return sharding.constrain(q_BLHW, _Q_AXES)

    def _latent(self, x_BLD, positions_BL, rope):
        """(c_kv_BLC normed, k_rope_BL1R rotated): what the cache holds."""
        C = self.cfg.kv_lora_rank
        down_BLC = project("BLD,DC->BLC", x_BLD, self.kv_down_DC, None, self.dtype)
        k_rope_BL1R = pos_ops.apply_rope(down_BLC[:, :, None, C:], positions_BL, *rope)
        return self.kv_norm(down_BLC[..., :C]), k_rope_BL1R

    def _keys_values(self, c_BLC, k_rope_BL1R):
        """Per-head keys (B, L, H, N + R) and values (B, L, H, V) from the latent."""
        H = self.cfg.num_heads
        k_nope_BLHN = project("BLC,CHN->BLHN", c_BLC, self.k_up_CHN, None, self.dtype, adapter(self, "k"))
        k_rope_BLHR = jnp.broadcast_to(k_rope_BL1R, (*k_rope_BL1R.shape[:2], H, k_rope_BL1R.shape[-1]))
        k_BLHW = jnp.concatenate([k_nope_BLHN, k_rope_BLHR.astype(self.dtype)], -1)
        v_BLHV = project("BLC,CHV->BLHV", c_BLC, self.v_up_CHV, None, self.dtype, adapter(self, "v"))
        return sharding.constrain(k_BLHW, _Q_AXES), sharding.constrain(v_BLHV, _Q_AXES)

    def _scale(self) -> float:
        """1/sqrt(N + R), times m(yarn_mscale_all_dim)^2 with DeepSeek's YaRN."""
        cfg = self.cfg
        temperature = pos_ops.yarn_mscale_factor(cfg.rope_scaling_factor, cfg.yarn_mscale_all_dim) \
            if cfg.yarn_mscale_all_dim else 1.0
        return temperature ** 2 / math.sqrt(cfg.nope_dim + cfg.rope_dim)

    def _attend(self, q_BLHW, k_BLHW, v_BLHV, **tokens):
        """`attend` with the materialised keys; q/k or v are zero-padded to one width (which changes neither
        the scores nor the kept output) so every kernel runs."""
        W, V = q_BLHW.shape[-1], v_BLHV.shape[-1]
        pad = lambda x, width: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))
        width = max(W, V)
        out_BLHW = attend(pad(q_BLHW, width), pad(k_BLHW, width), pad(v_BLHV, width), self.mask, self.cfg,
                          scale=self._scale(), **tokens)
        return out_BLHW[..., :V]

    def _output(self, out_BLHV):
        y_BLD = project("BLHV,HVD->BLD", sharding.constrain(out_BLHV, _Q_AXES), self.o_HVD, None, self.dtype,
                        adapter(self, "o"))
        return sharding.constrain(y_BLD, ("batch", "length", "embed"))

    def __call__(self, x_BLD: jax.Array, *, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None, relative_bias_OH: jax.Array | None = None) -> jax.Array:
        """Self-attention over x_BLD; positions_BL default to arange. relative_bias_OH is unused (MLA takes
        RoPE positions only)."""
        B, L, _ = x_BLD.shape
        if positions_BL is not None and tuple(positions_BL.shape) != (B, L):
            raise ValueError(f"positions_BL has shape {tuple(positions_BL.shape)}; expected (B, L) = {(B, L)}")
        x_BLD = x_BLD.astype(self.dtype)
        rope = rope_frequencies(self.cfg, jnp.full((B,), L, jnp.int32))
        rope_pos_BL = attention_ops.arange_positions(positions_BL, B, L)
        q_BLHW = self._queries(x_BLD, rope_pos_BL, rope)
        k_BLHW, v_BLHV = self._keys_values(*self._latent(x_BLD, rope_pos_BL, rope))
        return self._output(self._attend(q_BLHW, k_BLHW, v_BLHV, q_positions_BQ=positions_BL,
                                         kv_positions_BK=positions_BL, q_segment_ids_BQ=segment_ids_BL,
                                         kv_segment_ids_BK=segment_ids_BL))

    def extend(self, x_BLD: jax.Array, kv, layer, write, *, fresh: bool, relative_bias_OH=None):
        """`Attention.extend` with the latent cache: kv.k is (N, B, K, 1, C + R), kv.v is empty. fresh=True
        attends the new tokens to each other with materialised keys; otherwise their absorbed queries
        read the whole cache with the decode kernel."""
        cfg = self.cfg
        C, N = cfg.kv_lora_rank, cfg.nope_dim
        x_BLD = x_BLD.astype(self.dtype)
        rope = rope_frequencies(cfg, write.lengths_B)
        q_BLHW = self._queries(x_BLD, write.positions_BL, rope)
        c_BLC, k_rope_BL1R = self._latent(x_BLD, write.positions_BL, rope)
        latent_BL1W = jnp.concatenate([c_BLC[:, :, None, :], k_rope_BL1R.astype(c_BLC.dtype)], -1)
        kv = KV(write_slots(kv.k, latent_BL1W, write.slots_BL, layer=layer), kv.v)
        if fresh:
            k_BLHW, v_BLHV = self._keys_values(c_BLC, k_rope_BL1R)
            out_BLHV = self._attend(q_BLHW, k_BLHW, v_BLHV, q_positions_BQ=write.positions_BL,
                                    kv_positions_BK=write.key_positions_BL)
        else:
            k_up_CHN = adapted_weight(self.k_up_CHN[...], adapter(self, "k"), 1, self.dtype)
            q_latent_BLHC = jnp.einsum("BLHN,CHN->BLHC", q_BLHW[..., :N], k_up_CHN)
            q_BLHW = jnp.concatenate([q_latent_BLHC, q_BLHW[..., N:]], -1)
            out_BLHW = cached_attention(q_BLHW, kv.k, kv.k, layer, self.mask, q_positions_BQ=write.positions_BL,
                                        cache_positions_BK=write.cache_positions_BK, scale=self._scale(),
                                        block_size=cfg.attention_block_size)
            v_up_CHV = adapted_weight(self.v_up_CHV[...], adapter(self, "v"), 1, self.dtype)
            out_BLHV = jnp.einsum("BLHC,CHV->BLHV", out_BLHW[..., :C], v_up_CHV)
        return self._output(out_BLHV), kv
