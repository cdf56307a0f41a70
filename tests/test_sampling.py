"""Sampling filters against float64 NumPy references, per-row keys, empirical frequencies, config validation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.config import ConfigError
from transformer.inference.sampling import (SamplingConfig, filtered_logits, mark_seen, probabilities, row_keys,
                                            sample, step_keys)

V = 10
CHI2_999 = {5: 20.515, 7: 24.322}  # 0.999 quantiles of chi-square by degrees of freedom (alpha = 0.001)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_nucleus(probs_V, top_p):
    """Indices of the fewest most likely tokens whose probability sums to >= top_p."""
    order = np.argsort(-probs_V, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(probs_V[order])[:-1]])
    return set(order[before < top_p].tolist())


def np_penalised(logits, seen, penalty):
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)


def np_pipeline(logits, seen, cfg):
    """The documented filter order in float64: penalty, temperature, top-k, top-p, min-p."""
    x = np_penalised(np.asarray(logits, np.float64), seen, cfg.repetition_penalty) / cfg.temperature
    for row in x:
        row[row < np.sort(row)[-cfg.top_k]] = -np.inf
        row[[i for i in range(V) if i not in np_nucleus(np_softmax(row), cfg.top_p)]] = -np.inf
        p = np_softmax(row)
        row[p < cfg.min_p * p.max()] = -np.inf
    return np_softmax(x)


def kept(logits_BV):
    return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in np.asarray(logits_BV)]


def random_logits(seed, rows=6, scale=2.0):
    return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32) * scale


def chi_square(counts, probs):
    expected = counts.sum() * probs
    return float(np.sum((counts - expected) ** 2 / expected))


def test_greedy_is_argmax_of_penalised_logits():
    logits = random_logits(0)
    seen = np.random.default_rng(1).random((6, V)) < 0.3
    keys = row_keys(0, 6)
    np.testing.assert_array_equal(sample(logits, keys, SamplingConfig(temperature=0)), logits.argmax(-1))
    cfg = SamplingConfig(temperature=0, repetition_penalty=3.0)
    want = np_penalised(logits, seen, 3.0).argmax(-1)
    np.testing.assert_array_equal(sample(logits, keys, cfg, seen), want)
    np.testing.assert_array_equal(probabilities(logits, cfg, seen), np.eye(V)[want])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_numpy_softmax(temperature):
    logits = random_logits(2)
    got = probabilities(logits, SamplingConfig(temperature=temperature))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_softmax(logits / temperature), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = random_logits(3)
    got = kept(filtered_logits(logits, SamplingConfig(top_k=k)))
    assert got == [set(np.argsort(row)[-k:].tolist()) for row in logits]


def test_top_k_keeps_ties_with_the_kth_value():
    logits = np.array([[3.0, 2.0, 2.0, 1.0] + [0.0] * (V - 4)], np.float32)
    assert kept(filtered_logits(logits, SamplingConfig(top_k=2))) == [{0, 1, 2}]


@pytest.mark.parametrize("seed", range(4))
def test_top_p_matches_numpy_nucleus_at_cumulative_boundaries(seed):
    logits = random_logits(10 + seed, rows=1, scale=0.4 * (seed + 1))
    probs = np_softmax(logits[0])
    assert probs.min() > 1e-4
    cumulative = np.cumsum(np.sort(probs)[::-1])
    for j in range(V - 1):
        for top_p in (cumulative[j] - 1e-5, cumulative[j] + 1e-5, 0.5 * (cumulative[j] + cumulative[j + 1])):
            want = np_nucleus(probs, top_p)
            assert len(want) == j + (1 if top_p < cumulative[j] else 2)
            assert kept(filtered_logits(logits, SamplingConfig(top_p=float(top_p)))) == [want], (j, top_p)


def test_top_p_always_keeps_the_most_likely_token():
    logits = np.array([[5.0] + [0.0] * (V - 1)], np.float32)
    assert kept(filtered_logits(logits, SamplingConfig(top_p=1e-6))) == [{0}]


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_matches_numpy(min_p):
    logits = random_logits(4)
    probs = np_softmax(logits)
    want = [set(np.flatnonzero(row >= min_p * row.max()).tolist()) for row in probs]
    assert kept(filtered_logits(logits, SamplingConfig(min_p=min_p))) == want


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_on_positive_and_negative_logits(penalty):
    logits = random_logits(5)
    seen = np.random.default_rng(6).random((6, V)) < 0.5
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any()
    got = filtered_logits(logits, SamplingConfig(repetition_penalty=penalty), seen)
    np.testing.assert_allclose(got, np_penalised(logits, seen, penalty), rtol=1e-6)
    np.testing.assert_array_equal(filtered_logits(logits, SamplingConfig(repetition_penalty=penalty)), logits)


def test_all_filters_together_match_numpy_pipeline_under_jit():
    logits = random_logits(7)
    seen = np.random.default_rng(8).random((6, V)) < 0.3
    cfg = SamplingConfig(temperature=0.7, top_k=7, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    got = jax.jit(probabilities, static_argnames="cfg")(logits, cfg=cfg, seen_BV=seen)
    np.testing.assert_allclose(got, np_pipeline(logits, seen, cfg), rtol=1e-5, atol=1e-7)


def test_row_keys_are_fold_ins_of_the_row_index():
    keys = row_keys(3, 4, first_row=5)
    want = [jax.random.fold_in(jax.random.key(3), 5 + i) for i in range(4)]
    np.testing.assert_array_equal(jax.random.key_data(keys), np.stack([jax.random.key_data(k) for k in want]))
    step = jax.random.key_data(step_keys(keys, 9))
    np.testing.assert_array_equal(step[2], jax.random.key_data(jax.random.fold_in(want[2], 9)))


def test_row_sample_does_not_depend_on_batch():
    logits = random_logits(9, rows=4, scale=0.5)
    cfg = SamplingConfig(temperature=1.0, seed=11)
    for step in range(5):
        batch = sample(logits, step_keys(row_keys(cfg.seed, 4), step), cfg)
        alone = [int(sample(logits[i:i + 1], step_keys(row_keys(cfg.seed, 1, first_row=i), step), cfg)[0])
                 for i in range(4)]
        np.testing.assert_array_equal(batch, alone)
    identical_rows = np.repeat(logits[:1], 64, axis=0)
    assert len(set(np.asarray(sample(identical_rows, row_keys(0, 64), cfg)).tolist())) > 1


def test_sample_frequencies_match_probabilities():
    """Chi-square with df = 5 (6 tokens survive top_k=6) against its 0.999 quantile; a sampler of the
    unfiltered temperature-1 distribution must fail the same test."""
    n = 20_000
    logits = np.repeat(random_logits(12, rows=1, scale=1.0), n, axis=0)
    seen = np.zeros((n, V), bool)
    seen[:, :3] = True
    cfg = SamplingConfig(temperature=0.9, top_k=6, repetition_penalty=1.2)
    probs = np.asarray(probabilities(logits[:1], cfg, seen[:1]), np.float64)[0]
    tokens = np.asarray(jax.jit(sample, static_argnames="cfg")(logits, row_keys(0, n), cfg=cfg, seen_BV=seen))
    counts = np.bincount(tokens, minlength=V)
    support = probs > 0
    assert support.sum() == 6 and counts[~support].sum() == 0
    assert chi_square(counts[support], probs[support]) < CHI2_999[5]
    wrong = np.bincount(np.asarray(sample(logits, row_keys(0, n), SamplingConfig())), minlength=V)
    assert chi_square(wrong[support], probs[support]) > CHI2_999[5]


def test_mark_seen_ignores_padding():
    seen = jnp.zeros((2, 6), bool)
    seen = mark_seen(seen, jnp.array([1, -1]))
    seen = mark_seen(seen, jnp.array([[4, 4, -1], [0, 5, -1]]))
    want = np.zeros((2, 6), bool)
    want[0, [1, 4]] = want[1, [0, 5]] = True
    np.testing.assert_array_equal(seen, want)


def test_shape_errors():
    cfg = SamplingConfig()
    with pytest.raises(ValueError, match="batch, vocab"):
        filtered_logits(np.zeros(V, np.float32), cfg)
    with pytest.raises(ValueError, match="seen"):
        filtered_logits(np.zeros((2, V), np.float32), cfg, np.zeros((2, V + 1), bool))
    with pytest.raises(ValueError, match="one key per row"):
        sample(np.zeros((2, V), np.float32), row_keys(0, 3), cfg)
    with pytest.raises(ValueError, match="tokens"):
        mark_seen(jnp.zeros((2, V), bool), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("field, value", [
    ("top_p", 1.5), ("top_p", 0.0), ("top_p", math.nan),
    ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_k", V + 1), ("top_k", 2.5),
    ("min_p", 1.0), ("min_p", -0.1), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", math.nan),
    ("max_new_tokens", 0), ("stop_tokens", (V,)), ("stop_tokens", (-1,)), ("seed", 1.5),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}=") as info:
        SamplingConfig(**{field: value}).validate(vocab_size=V)
    assert "\n" not in str(info.value)


def test_valid_config_is_returned_and_hashable():
    cfg = SamplingConfig(temperature=0, top_k=V, top_p=0.5, min_p=0.1, stop_tokens=[1, 2])
    assert cfg.validate(vocab_size=V) is cfg and cfg.stop_tokens == (1, 2)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert SamplingConfig(top_k=10_000).validate() is not None
