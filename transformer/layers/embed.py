"""Token embedding, absolute positions (learned table or sinusoidal) and the output projection.

RoPE, ALiBi and T5's relative bias act inside attention and NoPE adds nothing, so for those the embedding
is the token lookup alone. With absolute positions the looked-up token vectors are multiplied by
sqrt(d_model) before the position embedding is added, as in Vaswani et al. (2017) and fairseq
(`model.embed_scale`: "auto" does this for sinusoidal and learned positions only). The output
projection reuses the unscaled token table (`tie_embeddings`) or owns a separate (embed, vocab)
matrix; logits are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import sharding
from transformer.config import ModelConfig
from transformer.ops import positions as pos_ops


def default_positions(batch: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def check_tokens(name: str, tokens_BL) -> None:
    if jnp.ndim(tokens_BL) != 2:
        raise ValueError(f"{name} must be 2-D (batch, length) int token ids, got shape {jnp.shape(tokens_BL)}")
    if not jnp.issubdtype(jnp.result_type(tokens_BL), jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {jnp.result_type(tokens_BL)}")


def embed_multiplier(cfg: ModelConfig) -> float:
    """The factor applied to looked-up token vectors: sqrt(d_model) for embed_scale="sqrt_d" (and "auto" with
    sinusoidal or learned positions), else 1."""
    absolute = cfg.position in ("sinusoidal", "learned")
    if cfg.embed_scale == "sqrt_d" or (cfg.embed_scale == "auto" and absolute):
        return float(np.sqrt(cfg.d_model))
    return 1.0


class Embed(nnx.Module):
    """tokens_BL (+ positions_BL) -> x_BLD in the compute dtype; `logits(h_BLD)` -> float32 BLV."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.position = cfg.position
        self.max_seq_len = cfg.max_seq_len
        self.d_model = cfg.d_model
        self.scale = embed_multiplier(cfg)
        self.dtype = jnp.dtype(cfg.dtype)
        param_dtype = jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(stddev=cfg.init_std)
        V, D = cfg.vocab_size, cfg.d_model
        self.tokens_VD = nnx.Param(init(rngs.params(), (V, D), param_dtype), logical_axes=("vocab", "embed"))
        self.position_table = nnx.Param(init(rngs.params(), (cfg.max_seq_len, D), param_dtype),
                                        logical_axes=(None, "embed")) if cfg.position == "learned" else None
        self.unembed_DV = None if cfg.tie_embeddings else nnx.Param(
            init(rngs.params(), (D, V), param_dtype), logical_axes=("embed", "vocab"))

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None) -> jax.Array:
        check_tokens("tokens_BL", tokens_BL)
        B, L = tokens_BL.shape
        table_VD = sharding.constrain(self.tokens_VD[...], ("vocab", None))  # gather whole rows: no fsdp split
        x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(self.dtype)
        if self.scale != 1.0:
            x_BLD = x_BLD * jnp.asarray(self.scale, self.dtype)
        if self.position in ("learned", "sinusoidal"):
            positions_BL = default_positions(B, L) if positions_BL is None else positions_BL
            if tuple(positions_BL.shape) != (B, L):
                raise ValueError(f"positions_BL has shape {tuple(positions_BL.shape)}; expected (B, L) = {(B, L)}")
            x_BLD = x_BLD + self._absolute(positions_BL, L).astype(self.dtype)
        return sharding.constrain(x_BLD, ("batch", "length", "embed"))

    def _absolute(self, positions_BL: jax.Array, length: int) -> jax.Array:
        if self.position == "sinusoidal":
            return pos_ops.sinusoidal_embedding(positions_BL, self.d_model)
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len={self.max_seq_len}, the size of "
                             "the learned position table; use sequences of at most that length or another "
                             "model.position (rope, alibi, t5_bias, sinusoidal, nope)")
        try:
            largest = int(np.max(np.asarray(positions_BL)))
        except (jax.errors.TracerArrayConversionError, RuntimeError):
            largest = None  # traced (or not fully addressable) ids: only the length is checked
        if largest is not None and largest >= self.max_seq_len:
            raise ValueError(f"position id {largest} is outside the learned position table of "
                             f"model.max_seq_len={self.max_seq_len} rows (valid ids: 0..{self.max_seq_len - 1})")
        table = sharding.constrain(self.position_table[...], (None, None))  # (max_seq_len, D)
        return jnp.take(table, positions_BL, axis=0, mode="clip")

    def logits(self, h_BLD: jax.Array) -> jax.Array:
        if self.unembed_DV is None:
            w_DV = self.tokens_VD[...].T
        else:
            w_DV = self.unembed_DV[...]
        logits_BLV = jnp.einsum("...D,DV->...V", h_BLD.astype(self.dtype), w_DV.astype(self.dtype),
                                preferred_element_type=jnp.float32)
        if logits_BLV.ndim == 3:
            logits_BLV = sharding.constrain(logits_BLV, ("batch", "length", "vocab"))
        return logits_BLV
