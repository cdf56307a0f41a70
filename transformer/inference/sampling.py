"""Next-token sampling: repetition penalty, temperature, top-k / top-p / min-p filters, per-row PRNG keys.

    cfg = SamplingConfig(temperature=0.8, top_p=0.9).validate(vocab_size)
    keys_B = row_keys(cfg.seed, B)
    tokens_B = sample(logits_BV, step_keys(keys_B, step), cfg, seen_BV)

The filters run in the order HF transformers applies them: repetition penalty, temperature, top-k,
top-p, min-p; each sees the distribution the previous one left. Removed tokens get logit -inf.
Ties: top-k and top-p keep every token whose logit equals the last one kept, so more may survive.
`cfg` is a frozen dataclass, hashable, so jitted callers pass it as a static argument.

Randomness is per row: row r's key is `fold_in(key(seed), r)` and step t's is `fold_in(row key, t)`,
so a row's tokens do not depend on the batch size or on the other rows.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from transformer.config import ConfigError, described


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; every filter's neutral value turns it off."""

    temperature: float = described(1.0, "softmax temperature; 0: greedy argmax")
    top_k: int = described(0, "sample among the k most likely tokens; 0: off")
    top_p: float = described(1.0, "nucleus: the smallest set with probability >= top_p; 1: off")
    min_p: float = described(0.0, "keep tokens with probability >= min_p * the largest; 0: off")
    repetition_penalty: float = described(1.0, "CTRL: seen tokens' logits / penalty (* if negative); 1: off")
    max_new_tokens: int = described(64, "tokens generated per row at most")
    stop_tokens: tuple[int, ...] = described((), "comma-separated token ids that end a row")
    seed: int = described(0, "sampling seed (row i uses fold_in(key(seed), i))")

    def __post_init__(self):
        if not isinstance(self.stop_tokens, tuple):
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))

    def validate(self, vocab_size: int | None = None) -> SamplingConfig:
        """Raise ConfigError naming the first bad field; return self."""
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        _check(vocab_size is None or (_integer(vocab_size) and vocab_size >= 1),
               f"vocab_size={vocab_size} must be an integer >= 1")
        _check(_finite(t) and t >= 0, f"temperature={t} must be finite and >= 0 (0: greedy)")
        k_range = "[0, vocab_size]" if vocab_size is None else f"[0, vocab_size={vocab_size}]"
        _check(_integer(k) and 0 <= k <= (vocab_size or k), f"top_k={k} must be an integer in {k_range} (0: off)")
        _check(_finite(p) and 0 < p <= 1, f"top_p={p} must be in (0, 1] (1: off)")
        _check(_finite(m) and 0 <= m < 1, f"min_p={m} must be in [0, 1) (0: off)")
        _check(_finite(r) and r > 0, f"repetition_penalty={r} must be finite and > 0 (1: off)")
        _check(_integer(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens={self.max_new_tokens} must be an integer >= 1")
        _check(_integer(self.seed), f"seed={self.seed!r} must be an integer")
        for token in self.stop_tokens:
            _check(_integer(token) and token >= 0 and (vocab_size is None or token < vocab_size),
                   f"stop_tokens={self.stop_tokens} holds {token!r}; stop tokens must be integers in "
                   f"[0, {'vocab_size' if vocab_size is None else vocab_size})")
        return self


def row_keys(seed: int, num_rows: int, first_row: int = 0) -> jax.Array:
    """One PRNG key per row: fold_in(key(seed), first_row + i) for row i."""
    if num_rows < 0 or first_row < 0:
        raise ValueError(f"num_rows={num_rows} and first_row={first_row} must be >= 0")
    base = jax.random.key(seed)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(first_row + jnp.arange(num_rows))


def step_keys(keys_B: jax.Array, step) -> jax.Array:
    """The rows' keys for decode step `step` (a Python or traced integer)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)


def _check_logits(logits_BV, seen_BV=None) -> None:
    if logits_BV.ndim != 2:
        raise ValueError(f"logits must be (batch, vocab); got shape {logits_BV.shape}")
    if seen_BV is not None and seen_BV.shape != logits_BV.shape:
        raise ValueError(f"seen must have the logits' shape {logits_BV.shape}; got {seen_BV.shape}")


def _penalised(logits_BV, penalty: float, seen_BV):
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV.astype(bool), penalised_BV, logits_BV)


def _top_k(logits_BV, k: int):
    """Keep logits >= the k-th largest value: ties with it are all kept, so more than k may survive."""
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)


def _top_p(logits_BV, top_p: float):
    """Keep the fewest most likely tokens whose probability sums to >= top_p (ties with the last kept
    token's logit are kept too); the most likely token always survives."""
    sorted_BV = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    count_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_BV, jnp.maximum(count_B1, 1) - 1, axis=-1)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def _min_p(logits_BV, min_p: float):
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    keep_BV = probs_BV >= min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def filtered_logits(logits_BV, cfg: SamplingConfig, seen_BV=None) -> jax.Array:
    """float32 logits after repetition penalty (when `seen_BV`, bool: tokens already in the row, is
    given), temperature (skipped at 0) and the top-k, top-p and min-p filters (removed: -inf)."""
    _check_logits(logits_BV, seen_BV)
    logits_BV = logits_BV.astype(jnp.float32)
    if seen_BV is not None and cfg.repetition_penalty != 1.0:
        logits_BV = _penalised(logits_BV, cfg.repetition_penalty, seen_BV)
    if cfg.temperature > 0:
        logits_BV = logits_BV / cfg.temperature
    if 0 < cfg.top_k < logits_BV.shape[-1]:
        logits_BV = _top_k(logits_BV, cfg.top_k)
    if cfg.top_p < 1.0:
        logits_BV = _top_p(logits_BV, cfg.top_p)
    if cfg.min_p > 0.0:
        logits_BV = _min_p(logits_BV, cfg.min_p)
    return logits_BV


def probabilities(logits_BV, cfg: SamplingConfig, seen_BV=None) -> jax.Array:
    """float32 next-token distribution: softmax of `filtered_logits`, or at temperature 0 a one-hot of
    the argmax of the penalised logits."""
    logits_BV = filtered_logits(logits_BV, cfg, seen_BV)
    if cfg.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits_BV, axis=-1)


def sample(logits_BV, keys_B, cfg: SamplingConfig, seen_BV=None) -> jax.Array:
    """int32 next tokens: the argmax at temperature 0, else a draw from `probabilities` with each row's key."""
    logits_BV = filtered_logits(logits_BV, cfg, seen_BV)
    if cfg.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if keys_B.shape[0] != logits_BV.shape[0]:
        raise ValueError(f"need one key per row: {keys_B.shape[0]} keys for {logits_BV.shape[0]} rows")
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def mark_seen(seen_BV, tokens_BL) -> jax.Array:
    """`seen_BV` with each row's tokens (shape (B,) or (B, L)) set; ids outside [0, V) (padding) are ignored."""
    tokens_BL = jnp.asarray(tokens_BL)
    if tokens_BL.ndim == 1:
        tokens_BL = tokens_BL[:, None]
    B, V = seen_BV.shape
    if tokens_BL.ndim != 2 or tokens_BL.shape[0] != B:
        raise ValueError(f"tokens must be ({B},) or ({B}, length) for seen of shape {seen_BV.shape}; "
                         f"got {tokens_BL.shape}")
    tokens_BL = jnp.where(tokens_BL < 0, V, tokens_BL)
    rows_BL = jnp.broadcast_to(jnp.arange(B)[:, None], tokens_BL.shape)
    return seen_BV.astype(bool).at[rows_BL, tokens_BL].set(True, mode="drop")
