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

`speculative_generate` runs the loop: a draft model (or prompt lookup) proposes, the target verifies all
k proposals in one extend call of k + 1 tokens, and both KV caches are rewound to the kept tokens.
"""

from __future__ import annotations

import functools
import numbers
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import sharding
from transformer.config import ConfigError
from transformer.inference import cache as cache_ops
from transformer.inference import sampling as sampling_ops
from transformer.inference.cache import KVCache
from transformer.inference.generate import (FINISHED, Generation, Generator, extend_step, pad_prompts, prefill_step,
                                          to_generation)
from transformer.inference.sampling import SamplingConfig
from transformer.ops.layout import ring_multiple


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


# --- The speculative decoding loop --------------------------------------------------------------------
#
# Per round, every unfinished row holds `last` (its newest token, not yet in either cache) and both caches
# hold the row's tokens before it (the target's cache.lengths_B = n, last's position). The draft proposes
# d_1..d_k; the target runs [last, d_1..d_k] (positions n..n+k) in one extend call, the verifier keeps
# d_1..d_a and `next`, and both caches are cut back to n + a + 1 tokens (last and the kept drafts; `next`
# is the new `last`). The draft model wrote last, d_1..d_{k-1} only: when all k are accepted it owes d_k,
# which its next round feeds together with `last` in a two-token first step ("catch-up"). A stop token or
# max_new_tokens cuts the kept tokens short; the row then finishes and feeds nothing more (valid_BL False).
# Caches have draft_tokens extra slots, so a sliding window's ring buffer never overwrites a slot a kept
# token still needs while a round's rejected drafts occupy slots (see `cache.num_slots`).


def _filters(sampling: SamplingConfig) -> SamplingConfig:
    """The fields the jitted rounds compile against (the distribution's shape); stop tokens, max_new_tokens
    and the seed travel as arrays, so changing them does not recompile."""
    return SamplingConfig(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          min_p=sampling.min_p)


def _round_keys(keys_B, round_index, role: int) -> jax.Array:
    """Per-row keys of one round: fold_in(fold_in(row key, round), role); role 0 verifies, 1 drafts."""
    return sampling_ops.step_keys(sampling_ops.step_keys(keys_B, round_index), role)


_rewind = jax.jit(cache_ops.rewind, donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "k"), donate_argnames=("cache",))
def draft_round(graphdef, state, cache: KVCache, target_lengths_B, last_B, prev_B, catchup_B, done_B, keys_B,
                round_index, *, sampling: SamplingConfig, k: int):
    """The draft model's k proposals: (drafts_BK int32, draft_probs_BKV float32 or None when greedy, cache).

    The cache is first cut back to the target's length (minus one where the draft still owes the previous
    round's d_k, `prev_B`: catchup_B), then one extend of [prev, last] or [last] and k - 1 single-token
    steps, each sampling from `probabilities(logits, sampling)` with the row's draft keys of this round.
    Finished rows (done_B) write nothing."""
    model = nnx.merge(graphdef, state)
    active_B = ~done_B
    catchup_B = catchup_B & active_B
    cache = cache_ops.rewind(cache, jnp.where(done_B, cache.lengths_B, target_lengths_B - catchup_B))
    keys_B = _round_keys(keys_B, round_index, 1)
    first_BL = jnp.stack([jnp.where(catchup_B, prev_B, last_B), jnp.where(catchup_B, last_B, 0)], axis=1)
    valid_BL = jnp.stack([active_B, catchup_B], axis=1)
    hidden_BLD, cache = model.extend(first_BL, cache, valid_BL=valid_BL)
    hidden_BD = jnp.take_along_axis(hidden_BLD, catchup_B.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    logits_BV = model.logits(hidden_BD)
    B, V = logits_BV.shape
    greedy = sampling.temperature == 0

    def propose(i, logits_BV, drafts_BK, probs_BKV):
        token_B = sampling_ops.sample(logits_BV, sampling_ops.step_keys(keys_B, i), sampling)
        if not greedy:
            probs_BKV = probs_BKV.at[:, i].set(sampling_ops.probabilities(logits_BV, sampling))
        return token_B, drafts_BK.at[:, i].set(token_B), probs_BKV

    def step(i, carry):
        cache, logits_BV, drafts_BK, probs_BKV = carry
        token_B, drafts_BK, probs_BKV = propose(i, logits_BV, drafts_BK, probs_BKV)
        hidden_B1D, cache = model.extend(token_B[:, None], cache, valid_BL=active_B[:, None])
        return cache, model.logits(hidden_B1D[:, 0]), drafts_BK, probs_BKV

    drafts_BK = jnp.zeros((B, k), jnp.int32)
    probs_BKV = None if greedy else jnp.zeros((B, k, V), jnp.float32)
    cache, logits_BV, drafts_BK, probs_BKV = jax.lax.fori_loop(0, k - 1, step, (cache, logits_BV, drafts_BK, probs_BKV))
    _, drafts_BK, probs_BKV = propose(k - 1, logits_BV, drafts_BK, probs_BKV)
    return drafts_BK, probs_BKV, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "k"), donate_argnames=("cache",))
def verify_round(graphdef, state, cache: KVCache, last_B, drafts_BK, draft_probs_BKV, done_B, count_B, max_new,
                 stops, keys_B, round_index, *, sampling: SamplingConfig, k: int):
    """The target's check of one round: [last, d_1..d_k] in one `extend_step`, then `verify_greedy`
    (temperature 0) or `verify_sampling` (target probs from `probabilities`; draft_probs_BKV None: one-hot
    drafts). Each row keeps d_1..d_accepted and `next`, truncated after its first stop token and at
    max_new tokens in all; the cache is cut back to the kept tokens.

    Returns a dict: emitted_BL (k + 1 per row, FINISHED past the kept ones), accepted_B and active_B (rows
    that took part), cache, lengths_B, done_B, count_B, last_B, prev_B (d_k) and catchup_B (all k kept)."""
    B = drafts_BK.shape[0]
    active_B = ~done_B
    n_B = cache.lengths_B
    tokens_BL = jnp.concatenate([last_B[:, None], drafts_BK], axis=1)
    logits_BLV, cache = extend_step(graphdef, state, cache, tokens_BL, jnp.broadcast_to(active_B[:, None], (B, k + 1)))
    if sampling.temperature == 0:
        accepted_B, next_B = verify_greedy(logits_BLV, drafts_BK)
    else:
        V = logits_BLV.shape[-1]
        target_BLV = sampling_ops.probabilities(logits_BLV.reshape(B * (k + 1), V), sampling).reshape(B, k + 1, V)
        if draft_probs_BKV is None:
            draft_probs_BKV = one_hot_draft_probs(drafts_BK, V)
        accepted_B, next_B = verify_sampling(target_BLV, draft_probs_BKV, drafts_BK,
                                             _round_keys(keys_B, round_index, 0))
    index_L = jnp.arange(k + 1)
    candidates_BL = jnp.where(index_L < accepted_B[:, None], jnp.pad(drafts_BK, ((0, 0), (0, 1))), next_B[:, None])
    stop_BL = jnp.isin(candidates_BL, stops) & (index_L <= accepted_B[:, None])
    first_stop_B = jnp.where(jnp.any(stop_BL, axis=1), jnp.argmax(stop_BL, axis=1), k + 1)
    kept_B = jnp.minimum(jnp.minimum(accepted_B + 1, first_stop_B + 1), max_new - count_B)
    kept_B = jnp.where(active_B, kept_B, 0).astype(jnp.int32)
    emitted_BL = jnp.where(index_L < kept_B[:, None], candidates_BL, FINISHED)
    count_B = count_B + kept_B
    done_B = done_B | jnp.any(stop_BL & (index_L < kept_B[:, None]), axis=1) | (count_B >= max_new)
    new_last_B = jnp.take_along_axis(candidates_BL, jnp.maximum(kept_B - 1, 0)[:, None], axis=1)[:, 0]
    lengths_B = n_B + kept_B
    cache = cache_ops.rewind(cache, lengths_B)
    return dict(emitted_BL=emitted_BL, accepted_B=jnp.where(active_B, accepted_B, 0), active_B=active_B,
                cache=cache, lengths_B=lengths_B, done_B=done_B, count_B=count_B,
                last_B=jnp.where(active_B, new_last_B, last_B), prev_B=drafts_BK[:, k - 1],
                catchup_B=active_B & (kept_B == k + 1))


def _check_generator(gen: Generator, role: str) -> None:
    mcfg = gen.model_cfg
    if mcfg.architecture != "decoder":
        raise ConfigError(f"the {role} has model.architecture={mcfg.architecture!r}; speculative decoding runs "
                          "decoder-only models")
    if mcfg.moe.num_experts and mcfg.moe.router == "expert_choice":
        raise ConfigError(f"the {role} uses model.moe.router='expert_choice', which cannot decode a few tokens "
                          "at a time; use a token-choice router")


def _prefill(gen: Generator, prompts: list[list[int]], length: int, k: int) -> KVCache:
    """The rows' cache holding every prompt token but the last (prefilled whole, then rewound by one)."""
    loaded = gen.loaded
    ring = dict(loaded.mesh.shape).get("sequence", 1)
    tokens_BL, valid_BL = pad_prompts(prompts, ring_multiple(ring, True) if ring > 1 else 1)
    with sharding.use_mesh(loaded.mesh):
        cache = cache_ops.init_cache(gen.model_cfg, len(prompts), length, extra_slots=k, mesh=loaded.mesh)
        _, cache = prefill_step(loaded.graphdef, loaded.state, cache, jnp.asarray(tokens_BL), jnp.asarray(valid_BL),
                                None, fresh=True)
        return _rewind(cache, jnp.asarray([len(p) - 1 for p in prompts], jnp.int32))


def speculative_generate(target: Generator, prompts: Sequence[Sequence[int]],
                         sampling: SamplingConfig = SamplingConfig(), *, draft: Generator | None = None,
                         draft_tokens: int = 4, lookup_ngram: int = 3, max_len: int = 0) -> Generation:
    """New tokens for each prompt by speculative decoding: `target`'s output distribution (its greedy tokens
    at temperature 0, exactly), fewer target calls when the draft guesses well.

    draft: a smaller Generator with the target's vocabulary, proposing `draft_tokens` tokens per round by
    single-token decode steps with the same sampling filters; None: prompt lookup (the tokens that followed
    the latest earlier match of the row's last `lookup_ngram`..1 tokens in its prompt and output).
    max_len: cache positions per row (0: longest prompt + max_new_tokens + draft_tokens - 1, what a round
    may write). Stop tokens and max_new_tokens end rows as in `Generator.generate`; the target keeps the
    final cache like `generate` does. repetition_penalty is not supported.

    At temperature 0 verification is `verify_greedy` (the filters cannot change an argmax); otherwise
    `verify_sampling` against the target's `probabilities` with fresh keys per row and round.

    stats: proposed (draft_tokens per unfinished row per round) and accepted (by the verifier, before the
    cut at a stop token or max_new_tokens) draft tokens, acceptance_rate, target_calls (batched verify
    calls = rounds; the prefill not counted), tokens_per_target_call (new tokens per row per verify call it
    took part in), draft ("model" or "prompt_lookup"), draft_tokens."""
    sampling = sampling.validate(target.vocab_size)
    k = draft_tokens
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"draft_tokens={k!r} must be an integer >= 1")
    if not isinstance(lookup_ngram, numbers.Integral) or isinstance(lookup_ngram, bool) or lookup_ngram < 1:
        raise ConfigError(f"lookup_ngram={lookup_ngram!r} must be an integer >= 1")
    if not isinstance(max_len, numbers.Integral) or max_len < 0:
        raise ConfigError(f"max_len={max_len!r} must be an integer >= 0 (0: what the prompts need)")
    if sampling.repetition_penalty != 1.0:
        raise ConfigError(f"repetition_penalty={sampling.repetition_penalty} is not supported by speculative "
                          "decoding (the penalty would change within a round); use 1.0 or Generator.generate")
    _check_generator(target, "target")
    if draft is not None:
        _check_generator(draft, "draft")
        if draft.vocab_size != target.vocab_size:
            raise ConfigError(f"the draft's model.vocab_size={draft.vocab_size} differs from the target's "
                              f"{target.vocab_size}; draft and target must share one tokenizer")
    prompts = target.check_prompts(prompts)
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError(f"every prompt needs at least one token; got prompt lengths {[len(p) for p in prompts]}")
    B, longest = len(prompts), max(len(p) for p in prompts)
    lengths = [gen.cache_length(longest, sampling, max_len, extra=k - 1, extra_reason=f" plus draft_tokens={k} - 1")
               for gen in (target, draft) if gen is not None]
    filters = _filters(sampling)

    start = time.perf_counter()
    target_cache = _prefill(target, prompts, lengths[0], k)
    draft_cache = None if draft is None else _prefill(draft, prompts, lengths[1], k)
    jax.block_until_ready((target_cache, draft_cache))
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    tl, dl = target.loaded, None if draft is None else draft.loaded
    with sharding.use_mesh(tl.mesh):  # loop state placed like verify_round's outputs: no recompiles
        keys_B = sampling_ops.row_keys(sampling.seed, B)
        stops = jnp.asarray(sampling.stop_tokens or (-2,), jnp.int32)
        max_new = jnp.asarray(sampling.max_new_tokens, jnp.int32)
        done_B = jnp.zeros((B,), bool)
        count_B = jnp.zeros((B,), jnp.int32)
        lengths_B = jnp.array(target_cache.lengths_B)  # a copy: verify_round donates the cache
        last_B = jnp.asarray([p[-1] for p in prompts], jnp.int32)
        prev_B, catchup_B = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)
        contexts = [np.asarray(p, np.int32) for p in prompts]
        pieces, proposed, accepted, row_rounds, rounds = [], 0, 0, 0, 0
        done = np.zeros((B,), bool)
        while not done.all():
            index = jnp.asarray(rounds, jnp.int32)
            if draft is not None:
                with sharding.use_mesh(dl.mesh):
                    drafts_BK, draft_probs_BKV, draft_cache = draft_round(
                        dl.graphdef, dl.state, draft_cache, lengths_B, last_B, prev_B, catchup_B, done_B, keys_B, index,
                        sampling=filters, k=k)
            else:
                drafts_BK = jnp.asarray(prompt_lookup_drafts(contexts, k, lookup_ngram)[0])
                draft_probs_BKV = None
            out = verify_round(tl.graphdef, tl.state, target_cache, last_B, drafts_BK, draft_probs_BKV, done_B,
                               count_B, max_new, stops, keys_B, index, sampling=filters, k=k)
            target_cache, lengths_B, done_B, count_B = out["cache"], out["lengths_B"], out["done_B"], out["count_B"]
            last_B, prev_B, catchup_B = out["last_B"], out["prev_B"], out["catchup_B"]
            emitted_BL = np.asarray(out["emitted_BL"])
            active = np.asarray(out["active_B"])
            pieces.append(emitted_BL)
            proposed += k * int(active.sum())
            accepted += int(np.asarray(out["accepted_B"]).sum())
            row_rounds += int(active.sum())
            rounds += 1
            if draft is None:
                contexts = [np.concatenate([c, row[row != FINISHED]]) for c, row in zip(contexts, emitted_BL)]
            done = np.asarray(done_B)
    decode_seconds = time.perf_counter() - start
    target.cache = target_cache  # like generate: every kept token but each row's final one
    result = to_generation(np.concatenate(pieces, axis=1), sampling, [len(p) for p in prompts], prefill_seconds,
                           decode_seconds)
    result.stats = dict(proposed=proposed, accepted=accepted, acceptance_rate=accepted / max(proposed, 1),
                        target_calls=rounds, rounds=rounds,
                        tokens_per_target_call=result.new_tokens / max(row_rounds, 1),
                        draft="prompt_lookup" if draft is None else "model", draft_tokens=k)
    return result
