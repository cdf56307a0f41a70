"""Speculative decoding rules: greedy verification, rejection sampling against chi-square tests with
negative controls (wrong rules must fail the same test), and prompt-lookup drafts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.config import ConfigError
from transformer.inference.sampling import row_keys
from transformer.inference.speculative import (one_hot_draft_probs, prompt_lookup_draft, prompt_lookup_drafts,
                                               verify_greedy, verify_sampling)

V, K, N = 6, 3, 20_000
# 0.999 quantiles of chi-square by degrees of freedom (alpha = 0.001)
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 35: 66.619}
verify_sampling_jit = jax.jit(verify_sampling)


def tables(seed, positions):
    """Random distributions over V, one per position, none below 1/(2V) (every chi-square cell well filled)."""
    rng = np.random.default_rng(seed)
    return 0.5 * rng.dirichlet(np.full(V, 0.5), size=positions) + 0.5 / V


def draw(rng, probs_KV, rows):
    """rows x positions tokens, position i drawn from probs_KV[i]."""
    return np.stack([rng.choice(V, size=rows, p=p / p.sum()) for p in probs_KV], axis=1).astype(np.int32)


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=probs.size)
    expected = tokens.size * probs / probs.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


def first_emitted(draft_BK, accepted_B, next_B):
    return np.where(accepted_B >= 1, draft_BK[:, 0], next_B)


def run_round(p_KV, q_KV, seed, one_hot=False):
    """One vectorised verification of N rows: (draft_BK, accepted_B, next_B) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    draft = rng.integers(0, V, size=(N, K), dtype=np.int32) if one_hot else draw(rng, q_KV, N)
    draft_probs = one_hot_draft_probs(draft, V) if one_hot else np.broadcast_to(q_KV, (N, K, V))
    accepted, nxt = verify_sampling_jit(np.broadcast_to(p_KV, (N, K + 1, V)), draft_probs, draft, row_keys(seed, N))
    return draft, np.asarray(accepted), np.asarray(nxt)


def np_round(p_KV, q_KV, seed, accept_probability, correction):
    """A NumPy verifier with pluggable rules, for the negative controls: acceptance probability of d
    given (p, q) and the correction distribution given (p, q)."""
    rng = np.random.default_rng(seed)
    draft = draw(rng, q_KV, N)
    accepted = np.full(N, K)
    for i in range(K - 1, -1, -1):
        p_d, q_d = p_KV[i, draft[:, i]], q_KV[i, draft[:, i]]
        accepted = np.where(rng.random(N) < accept_probability(p_d, q_d), accepted, i)
    nxt = np.empty(N, np.int32)
    for i in range(K + 1):
        rows = np.flatnonzero(accepted == i)
        dist = p_KV[i] if i == K else correction(p_KV[i], q_KV[i])
        nxt[rows] = rng.choice(V, size=rows.size, p=dist / dist.sum())
    return draft, accepted, nxt


def test_verify_greedy_examples():
    best = np.array([2, 4, 1, 3])
    logits = np.tile(np.eye(V, dtype=np.float32)[best][None], (4, 1, 1))
    draft = np.array([[2, 4, 0], [2, 4, 1], [0, 4, 1], [2, 0, 1]], np.int32)
    accepted, nxt = verify_greedy(logits, draft)
    np.testing.assert_array_equal(accepted, [2, 3, 0, 1])
    np.testing.assert_array_equal(nxt, [1, 3, 2, 4])
    assert accepted.dtype == jnp.int32 and nxt.dtype == jnp.int32


@pytest.mark.parametrize("drafter", ["lookup", "random"])
def test_greedy_speculative_decoding_equals_target_greedy(drafter):
    """A bigram target (logits = table[last token]) decoded speculatively emits its own greedy tokens."""
    rng = np.random.default_rng(0)
    vocab, k, length = 8, 4, 40
    table = rng.normal(size=(vocab, vocab)).astype(np.float32)
    prompt = rng.integers(0, vocab, size=5)
    greedy = list(prompt)
    while len(greedy) < len(prompt) + length:
        greedy.append(int(table[greedy[-1]].argmax()))
    context, total_accepted = list(prompt), 0
    while len(context) < len(prompt) + length:
        if drafter == "lookup":
            draft = prompt_lookup_drafts([np.array(context)], k)[0]
        else:
            draft = rng.integers(0, vocab, size=(1, k)).astype(np.int32)
        logits = table[np.concatenate([[context[-1]], draft[0]])][None]
        accepted, nxt = verify_greedy(logits, draft)
        context += draft[0, :int(accepted[0])].tolist() + [int(nxt[0])]
        total_accepted += int(accepted[0])
    assert context[:len(greedy)] == greedy
    if drafter == "lookup":
        assert total_accepted > length // 2


def test_verify_shape_errors():
    with pytest.raises(ValueError, match="k \\+ 1"):
        verify_greedy(np.zeros((2, K, V), np.float32), np.zeros((2, K), np.int32))
    with pytest.raises(ValueError, match="draft probs"):
        verify_sampling(np.zeros((2, K + 1, V)), np.zeros((2, K, V + 1)), np.zeros((2, K), np.int32), row_keys(0, 2))


@pytest.mark.parametrize("one_hot", [False, True], ids=["sampled_draft", "deterministic_draft"])
def test_first_emitted_token_is_distributed_as_p1(one_hot):
    p, q = tables(1, K + 1), tables(2, K)
    draft, accepted, nxt = run_round(p, q, seed=3, one_hot=one_hot)
    assert 0 < accepted.mean() < K
    assert chi_square(first_emitted(draft, accepted, nxt), p[0]) < CHI2_999[5]


def test_accepted_counts_follow_the_overlaps_of_p_and_q():
    """P(accepted >= i) = a_1 ... a_i with a_j = sum_x min(p_j(x), q_j(x)), the chance d_j is accepted."""
    p, q = tables(4, K + 1), tables(5, K)
    _, accepted, _ = run_round(p, q, seed=6)
    at_least = np.cumprod(np.concatenate([[1.0], np.minimum(p[:K], q).sum(-1)]))
    exactly = at_least - np.append(at_least[1:], 0.0)
    assert chi_square(accepted, exactly) < CHI2_999[K]


def test_next_token_is_the_residual_at_the_rejection_or_the_bonus():
    """Given accepted = i < k, next ~ normalize(max(0, p_{i+1} - q_{i+1})); given all k, next ~ p_{k+1}."""
    p, q = tables(11, K + 1), tables(12, K)
    _, accepted, nxt = run_round(p, q, seed=13)
    for i in range(K + 1):
        dist = p[K] if i == K else np.maximum(p[i] - q[i], 0.0)
        rows = accepted == i
        assert rows.sum() > 500 and np.all(dist[nxt[rows]] > 0)
        support = dist > 0
        tokens = np.searchsorted(np.flatnonzero(support), nxt[rows])
        assert chi_square(tokens, dist[support]) < CHI2_999[support.sum() - 1], i


def test_first_two_emitted_tokens_are_independent_draws_of_p():
    """With the same p at every position the first two emitted tokens are i.i.d. p; a row that accepts
    nothing emits its second token in a second round."""
    p, q = np.tile(tables(7, 1), (K + 1, 1)), tables(8, K)
    draft, accepted, nxt = run_round(p, q, seed=9)
    draft2, accepted2, nxt2 = run_round(p, q, seed=10)
    first = first_emitted(draft, accepted, nxt)
    second = np.select([accepted >= 2, accepted == 1], [draft[:, 1], nxt], first_emitted(draft2, accepted2, nxt2))
    assert np.bincount(accepted, minlength=K + 1).min() > 0
    assert chi_square(first * V + second, np.outer(p[0], p[0]).ravel()) < CHI2_999[35]


@pytest.mark.parametrize("rule", ["accept_q_over_p", "correct_from_p"])
def test_wrong_rules_fail_the_first_token_test(rule):
    """Negative controls: the chi-square test above has the power to reject a wrong verifier."""
    p, q = tables(1, K + 1), tables(2, K)
    right_accept = lambda p_d, q_d: np.minimum(1.0, p_d / q_d)
    right_correction = lambda p_V, q_V: np.maximum(p_V - q_V, 0.0)
    accept = (lambda p_d, q_d: np.minimum(1.0, q_d / p_d)) if rule == "accept_q_over_p" else right_accept
    correction = (lambda p_V, q_V: p_V) if rule == "correct_from_p" else right_correction
    draft, accepted, nxt = np_round(p, q, 3, accept, correction)
    assert chi_square(first_emitted(draft, accepted, nxt), p[0]) > CHI2_999[5]
    draft, accepted, nxt = np_round(p, q, 3, right_accept, right_correction)
    assert chi_square(first_emitted(draft, accepted, nxt), p[0]) < CHI2_999[5]


def test_zero_probability_drafts_are_rejected_and_zero_residual_falls_back_to_p():
    """Target one-hot at 1. Row 0 drafts 1 (accepted, bonus 1); row 1 drafts 2 with q one-hot at 2
    (rejected, residual p); row 2 drafts 2 with q = p (rejected, residual 0: fall back to p)."""
    p = np.zeros((3, 2, V), np.float32)
    p[:, :, 1] = 1.0
    q = one_hot_draft_probs(np.array([[1], [2], [1]]), V)
    accepted, nxt = verify_sampling(p, q, np.array([[1], [2], [2]], np.int32), row_keys(0, 3))
    np.testing.assert_array_equal(accepted, [1, 0, 0])
    np.testing.assert_array_equal(nxt, [1, 1, 1])


def test_prompt_lookup_prefers_the_longest_ngram():
    context = np.array([1, 2, 3, 9, 5, 2, 3, 7, 8, 1, 2, 3])
    np.testing.assert_array_equal(prompt_lookup_draft(context, 3), [9, 5, 2])
    np.testing.assert_array_equal(prompt_lookup_draft(context, 3, max_ngram=2), [7, 8, 1])


def test_prompt_lookup_takes_the_most_recent_match():
    np.testing.assert_array_equal(prompt_lookup_draft(np.array([4, 1, 5, 4, 2, 6, 4]), 3), [2, 6, 4])


def test_prompt_lookup_returns_fewer_tokens_near_the_end():
    np.testing.assert_array_equal(prompt_lookup_draft(np.array([7, 8, 9, 7, 8]), 5), [9, 7, 8])
    np.testing.assert_array_equal(prompt_lookup_draft(np.array([1, 2, 3, 3]), 4), [3])


def test_prompt_lookup_is_empty_without_a_match():
    for context in ([1, 2, 3, 4], [5], []):
        assert prompt_lookup_draft(np.array(context, np.int32), 3).shape == (0,)
    assert prompt_lookup_draft(np.array([4, 1, 5, 4, 2, 6, 4]), 3, min_ngram=2).shape == (0,)


def test_prompt_lookup_drafts_pads_with_the_last_token():
    contexts = [np.array([7, 8, 9, 7, 8]), np.array([1, 2, 3]), np.array([4, 1, 5, 4, 2, 6, 4])]
    draft, lengths = prompt_lookup_drafts(contexts, 4)
    np.testing.assert_array_equal(draft, [[9, 7, 8, 8], [3, 3, 3, 3], [2, 6, 4, 4]])
    np.testing.assert_array_equal(lengths, [3, 0, 3])
    assert draft.dtype == np.int32 and lengths.dtype == np.int32


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=2, min_ngram=0), dict(k=2, max_ngram=1, min_ngram=2)])
def test_prompt_lookup_validation(kwargs):
    with pytest.raises(ConfigError):
        prompt_lookup_draft(np.arange(5), **kwargs)
