"""Speculative decoding rules (Leviathan et al. 2023; Chen et al. 2023) and prompt-lookup drafts (Saxena 2023).

A draft proposes k tokens d_1..d_k per row; one target forward pass over them gives the target's
distributions p_1..p_{k+1} (p_i at d_i's position, p_{k+1} the bonus position after all k). The
verifiers return (accepted_B, next_B): the row keeps d_1..d_accepted and then emits `next`, so every
round emits accepted + 1 tokens. Arrays over draft positions end in K (k drafts) or have k+1 rows
along that axis (the target's positions).

Greedy verification emits exactly the target's greedy tokens; rejection sampling (accept d_i with
probability min(1, p_i(d_i) / q_i(d_i)), on the first rejection draw from normalize(max(0, p_i - q_i)))
emits tokens distributed exactly as sampling from the target. Any draft token is a valid proposal,
so padded drafts (`prompt_lookup_drafts`) need no mask: a padding token is one more guess, verified
by the same rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import ConfigError


def _check_draft(target_BKV, draft_tokens_BK) -> None:
    if draft_tokens_BK.ndim != 2 or target_BKV.ndim != 3:
        raise ValueError(f"need target (batch, k + 1, vocab) and draft tokens (batch, k); "
                         f"got {target_BKV.shape} and {draft_tokens_BK.shape}")
    B, k = draft_tokens_BK.shape
    if target_BKV.shape[:2] != (B, k + 1):
        raise ValueError(f"target must have k + 1 = {k + 1} positions for {k} draft tokens per row: "
                         f"expected ({B}, {k + 1}, vocab), got {target_BKV.shape}")


def _leading_true(accept_BK) -> jax.Array:
    """Number of leading True entries per row (int32)."""
    return jnp.sum(jnp.cumprod(accept_BK.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def verify_greedy(target_logits_BKV, draft_tokens_BK) -> tuple[jax.Array, jax.Array]:
    """(accepted_B, next_B): drafts matching the target's argmax, then the argmax at that position."""
    _check_draft(target_logits_BKV, draft_tokens_BK)
    k = draft_tokens_BK.shape[1]
    best_BK = jnp.argmax(target_logits_BKV, axis=-1).astype(jnp.int32)
    accepted_B = _leading_true(best_BK[:, :k] == draft_tokens_BK)
    return accepted_B, jnp.take_along_axis(best_BK, accepted_B[:, None], axis=1)[:, 0]


def verify_sampling(target_probs_BKV, draft_probs_BKV, draft_tokens_BK, keys_B) -> tuple[jax.Array, jax.Array]:
    """(accepted_B, next_B) by modified rejection sampling with each row's key (fresh each round, and
    not the one the draft sampled with).

    target_probs has k + 1 positions, draft_probs k. d_i is accepted while u_i * q_i(d_i) < p_i(d_i)
    (u_i ~ U[0, 1): u_i < min(1, p_i / q_i), and never a token the target gives probability 0). At the
    first rejection i, next ~ normalize(max(0, p_i - q_i)) (p_i if that is all zero); with all k
    accepted, next ~ p_{k+1}."""
    _check_draft(target_probs_BKV, draft_tokens_BK)
    B, k = draft_tokens_BK.shape
    if draft_probs_BKV.shape != (B, k, target_probs_BKV.shape[-1]):
        raise ValueError(f"draft probs must be ({B}, {k}, {target_probs_BKV.shape[-1]}); got {draft_probs_BKV.shape}")
    p_BKV = target_probs_BKV.astype(jnp.float32)
    q_BKV = jnp.pad(draft_probs_BKV.astype(jnp.float32), ((0, 0), (0, 1), (0, 0)))  # q_{k+1} = 0
    p_draft_BK = jnp.take_along_axis(p_BKV[:, :k], draft_tokens_BK[..., None], axis=-1)[..., 0]
    q_draft_BK = jnp.take_along_axis(q_BKV[:, :k], draft_tokens_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (k,)))(keys_B)
    accepted_B = _leading_true(u_BK * q_draft_BK < p_draft_BK)
    p_BV = jnp.take_along_axis(p_BKV, accepted_B[:, None, None], axis=1)[:, 0]
    q_BV = jnp.take_along_axis(q_BKV, accepted_B[:, None, None], axis=1)[:, 0]
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    dist_BV = jnp.where(jnp.sum(residual_BV, axis=-1, keepdims=True) > 0, residual_BV, p_BV)
    draw = lambda key, dist_V: jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(dist_V))
    return accepted_B, jax.vmap(draw)(keys_B, dist_BV).astype(jnp.int32)


def one_hot_draft_probs(draft_tokens_BK, vocab_size: int) -> jax.Array:
    """float32 draft distributions of a deterministic draft (prompt lookup): one-hot at each draft token."""
    return jax.nn.one_hot(draft_tokens_BK, vocab_size, dtype=jnp.float32)


def _check_lookup(k: int, max_ngram: int, min_ngram: int) -> None:
    if k < 1:
        raise ConfigError(f"k={k} draft tokens must be >= 1")
    if not 1 <= min_ngram <= max_ngram:
        raise ConfigError(f"min_ngram={min_ngram}, max_ngram={max_ngram} must satisfy 1 <= min_ngram <= max_ngram")


def prompt_lookup_draft(context: np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1) -> np.ndarray:
    """Up to k int32 tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    of `context` (n from max_ngram down to min_ngram); fewer near the end, empty when nothing matches."""
    _check_lookup(k, max_ngram, min_ngram)
    context = np.asarray(context)
    if context.ndim != 1:
        raise ValueError(f"context must be one row of tokens (1-D); got shape {context.shape}")
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        earlier = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # all but the suffix itself
        starts = np.flatnonzero(np.all(earlier == context[-n:], axis=-1))
        if starts.size:
            return context[starts[-1] + n:starts[-1] + n + k].astype(np.int32)
    return np.zeros((0,), np.int32)


def prompt_lookup_drafts(contexts, k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(draft_BK int32, lengths_B int32) of `prompt_lookup_draft` per row; a row's unfound tokens are its
    last context token (0 for an empty context)."""
    _check_lookup(k, max_ngram, min_ngram)
    draft_BK = np.zeros((len(contexts), k), np.int32)
    lengths_B = np.zeros((len(contexts),), np.int32)
    for row, context in enumerate(contexts):
        found = prompt_lookup_draft(context, k, max_ngram, min_ngram)
        draft_BK[row] = context[-1] if len(context) else 0
        draft_BK[row, :len(found)] = found
        lengths_B[row] = len(found)
    return draft_BK, lengths_B
