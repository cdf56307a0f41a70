"""The KV cache: an explicit pytree, stacked over layers like the scanned parameters, never module state.

    KVCache(k_NBKGW, v_NBKGW, positions_BK, lengths_B, cross_k_NBSGW, cross_v_NBSGW, source_valid_BS)

K slots per row hold the G key/value heads of every layer (MQA/GQA keys are never repeated); with
multi-head latent attention (`layers.latent_attention`) they hold one latent of width kv_lora_rank +
qk_rope_head_dim and the value array is empty. A slot records the position of the token it holds in
`positions_BK` (`EMPTY` for none), and attention masks by those positions through the layer's
`AttentionMask`, so empty slots, padding and a sliding window's ring buffer need no other mask code. A
token at position p goes to slot p mod K: with K >= the longest sequence that is the plain cache, with K = window (+ extra slots) it is a ring buffer whose memory is
bounded however long generation runs. Keys are stored after RoPE, except with dynamic NTK scaling,
whose frequencies change with the current length: then the cache keeps them unrotated and attention
rotates them with the current frequencies.

Placement follows the logical axis rules: layers unsharded, batch on data/fsdp, the slots on
`sequence` (a long context split over devices; see `inference.attention`), kv heads on tensor. The
encoder-decoder's cross-attention K/V (`cross_*`, computed once from the encoder output) are placed
the same way, with the source length unsharded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer import sharding
from transformer.config import ConfigError, ModelConfig

EMPTY = 2 ** 30  # the position of an empty slot (and of a padding token's key): every mask rule hides it
KV_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
CROSS_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Keys/values of every layer (N: attention layers of the decoder stack) and the slot bookkeeping.
    lengths_B: tokens written per row so far, i.e. the position of the row's next token."""

    k_NBKGW: jax.Array
    v_NBKGW: jax.Array
    positions_BK: jax.Array
    lengths_B: jax.Array
    cross_k_NBSGW: jax.Array | None = None
    cross_v_NBSGW: jax.Array | None = None
    source_valid_BS: jax.Array | None = None

    @property
    def slots(self) -> int:
        return self.k_NBKGW.shape[2]

    @property
    def batch(self) -> int:
        return self.k_NBKGW.shape[1]

    def nbytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self)))


class KV(NamedTuple):
    """Keys and values stacked over layers, as the layer stack carries them: (k_NBKGW, v_NBKGW) of the
    self-attention cache, or (k_NBSGW, v_NBSGW) of the cross-attention one."""

    k: jax.Array
    v: jax.Array


def rotated_in_cache(cfg: ModelConfig) -> bool:
    """Whether cached keys carry RoPE already (all but dynamic NTK, whose frequencies move with the length)."""
    return cfg.position == "rope" and cfg.rope_scaling != "dynamic_ntk"


def ring_window(cfg: ModelConfig) -> int:
    """The window every decoder layer attends within, which lets the cache be a ring buffer of it; 0 when some
    layer attends globally (model.attention_pattern with a global entry): then every layer keeps every slot
    (one slot count for all layers; per-layer counts would save the local layers' memory)."""
    return 0 if "global" in cfg.attention_kinds else cfg.sliding_window


def num_slots(cfg: ModelConfig, max_len: int, extra_slots: int = 0) -> int:
    """Slots per row for sequences of up to `max_len` tokens: max_len, or with a sliding window in every layer
    (`ring_window`) the window plus `extra_slots` (tokens written in one call beyond the first: chunk size - 1,
    or the draft length of speculative decoding) when that is smaller."""
    if max_len < 1 or extra_slots < 0:
        raise ValueError(f"max_len={max_len} must be >= 1 and extra_slots={extra_slots} >= 0")
    if ring_window(cfg):
        return min(max_len, ring_window(cfg) + extra_slots)
    return max_len


def cache_heads(cfg: ModelConfig) -> tuple[int, int, int]:
    """(G, key width, value width) of a layer's cache entry per token: the kv heads of K and V, or for
    model.attention='mla' one latent of width kv_lora_rank + qk_rope_head_dim and no separate V (width 0)."""
    if cfg.attention == "mla":
        return 1, cfg.kv_lora_rank + cfg.rope_dim, 0
    return cfg.kv_heads, cfg.dim_per_head, cfg.dim_per_head


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Key/value bytes one token of context costs over every decoder layer, in the compute dtype: MHA/GQA
    2 G W N, MLA (kv_lora_rank + qk_rope_head_dim) N (the DeepSeek-V2 paper's (d_c + d_R) l)."""
    G, k_width, v_width = cache_heads(cfg)
    return cfg.num_layers * G * (k_width + v_width) * jnp.dtype(cfg.dtype).itemsize


def bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes one token of context costs: `kv_bytes_per_token` plus its slot's int32 position."""
    return kv_bytes_per_token(cfg) + 4


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, *, extra_slots: int = 0, source_len: int = 0) -> int:
    """Bytes of `init_cache(cfg, batch, max_len, extra_slots=..., source_len=...)` (the calculator's figure)."""
    total = batch * num_slots(cfg, max_len, extra_slots) * bytes_per_token(cfg) + batch * 4
    if source_len:
        total += batch * source_len * (2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head
                                       * jnp.dtype(cfg.dtype).itemsize + 1)
    return total


def cache_specs(cfg: ModelConfig, batch: int, max_len: int, *, extra_slots: int = 0,
                source_len: int = 0) -> KVCache:
    """`KVCache` of jax.ShapeDtypeStruct (no memory), for shapes, byte counts and compilation."""
    N, G, W = cfg.num_layers, cfg.kv_heads, cfg.dim_per_head
    K = num_slots(cfg, max_len, extra_slots)
    dtype = jnp.dtype(cfg.dtype)
    spec = jax.ShapeDtypeStruct
    cross = (spec((N, batch, source_len, G, W), dtype),) * 2 + (spec((batch, source_len), jnp.bool_),) \
        if source_len else (None, None, None)
    cached_heads, k_width, v_width = cache_heads(cfg)
    return KVCache(spec((N, batch, K, cached_heads, k_width), dtype),
                   spec((N, batch, K, cached_heads, v_width), dtype),
                   spec((batch, K), jnp.int32), spec((batch,), jnp.int32), *cross)


def _logical_axes(cache: KVCache) -> KVCache:
    return KVCache(KV_AXES, KV_AXES, ("batch", "cache_length"), ("batch",),
                   *((CROSS_AXES, CROSS_AXES, ("batch", None)) if cache.cross_k_NBSGW is not None else (None,) * 3))


def cache_shardings(cache: KVCache, mesh) -> KVCache:
    """NamedShardings of every cache array from the logical axis rules (None entries stay None)."""
    axes = _logical_axes(cache)
    return KVCache(*(None if x is None else sharding.named_sharding(a, mesh, x.shape) for x, a in zip(cache, axes)))


def check_fits(cfg: ModelConfig, max_len: int, mesh=None) -> None:
    """ConfigError naming the value when a cache of `max_len` cannot be laid out on `mesh`."""
    if cfg.architecture == "encoder":
        raise ConfigError("model.architecture='encoder' has no causal decoder to generate with; "
                          "use a 'decoder' or 'encoder_decoder' model")
    if cfg.position == "learned" and max_len > cfg.max_seq_len:
        raise ConfigError(f"a cache of {max_len} tokens is longer than model.max_seq_len={cfg.max_seq_len}, the "
                          "learned position table; generate at most that many tokens in total")
    if mesh is not None:
        ring = dict(mesh.shape).get("sequence", 1)
        slots = num_slots(cfg, max_len)
        if slots % ring:
            raise ConfigError(f"the cache's {slots} slots do not split over mesh.sequence={ring}; "
                              f"use a total length that is a multiple of {ring}")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, extra_slots: int = 0, source_len: int = 0,
               mesh=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (see `num_slots`), placed on `mesh` (default:
    the current mesh, if any) by the logical axis rules."""
    check_fits(cfg, max_len, mesh)
    specs = cache_specs(cfg, batch, max_len, extra_slots=extra_slots, source_len=source_len)
    mesh = sharding.current_mesh() if mesh is None else mesh
    shardings = cache_shardings(specs, mesh) if isinstance(mesh, jax.sharding.Mesh) else (None,) * len(specs)

    def make(spec, placement, fill):
        if spec is None:
            return None
        return jnp.full(spec.shape, fill, spec.dtype, device=placement)

    fills = (0, 0, EMPTY, 0, 0, 0, False)
    return KVCache(*(make(s, p, f) for s, p, f in zip(specs, shardings, fills)))


class Write(NamedTuple):
    """Where one call's L new tokens per row go; computed once, shared by every layer.

    positions_BL: the new tokens' positions (queries). key_positions_BL: the same with padding tokens set to
    EMPTY. slots_BL: each token's slot (K, out of range, for tokens not written: padding, and in a ring
    buffer tokens that a later token of the same call overwrites). cache_positions_BK, lengths_B: the slot
    positions and row lengths once the tokens are written."""

    positions_BL: jax.Array
    key_positions_BL: jax.Array
    slots_BL: jax.Array
    cache_positions_BK: jax.Array
    lengths_B: jax.Array


def plan_write(cache: KVCache, valid_BL: jax.Array) -> Write:
    """The `Write` for L new tokens per row, of which the first valid_BL.sum(1) are real (right padding)."""
    from transformer.inference.decode_attention import write_slots

    K = cache.slots
    L = valid_BL.shape[1]
    counts_B = jnp.sum(valid_BL, axis=1, dtype=jnp.int32)
    index_L = jnp.arange(L, dtype=jnp.int32)
    positions_BL = cache.lengths_B[:, None] + index_L
    key_positions_BL = jnp.where(valid_BL, positions_BL, EMPTY)
    kept_BL = valid_BL & (index_L >= counts_B[:, None] - K)
    slots_BL = jnp.where(kept_BL, positions_BL % K, K)
    cache_positions_BK = write_slots(cache.positions_BK, key_positions_BL, slots_BL, axes=("batch", "cache_length"))
    return Write(positions_BL, key_positions_BL, slots_BL, cache_positions_BK, cache.lengths_B + counts_B)


def rewind(cache: KVCache, lengths_B: jax.Array) -> KVCache:
    """The cache cut back to `lengths_B` tokens per row (speculative decoding's rejected drafts): slots
    holding positions >= the new length become empty. The k/v left there are never read."""
    stale_BK = (cache.positions_BK >= lengths_B[:, None]) & (cache.positions_BK != EMPTY)
    return cache._replace(positions_BK=jnp.where(stale_BK, EMPTY, cache.positions_BK),
                          lengths_B=jnp.asarray(lengths_B, jnp.int32))


def describe(cfg: ModelConfig, batch: int, max_len: int, *, extra_slots: int = 0) -> dict:
    """Numbers for reports: slots, bytes per token and total bytes of a cache."""
    return {"slots": num_slots(cfg, max_len, extra_slots), "bytes_per_token": bytes_per_token(cfg),
            "bytes": cache_bytes(cfg, batch, max_len, extra_slots=extra_slots),
            "gib": cache_bytes(cfg, batch, max_len, extra_slots=extra_slots) / 2 ** 30,
            "dtype": np.dtype(jnp.dtype(cfg.dtype)).name}
