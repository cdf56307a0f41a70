"""The speculative decoding loop against independent references: greedy output identical to the target's own
`Generator.generate` (draft model, prompt lookup, sliding-window ring buffer, draft = target), the first
token's distribution under rejection sampling equal to the target's `probabilities` (chi-square, with the
draft's distribution as a negative control), stop tokens, and input errors.

Tiny random models (init_std 0.4: varied, non-degenerate greedy text). Drafts are the target's weights plus
N(0, 0.01) noise ("near": partly agreeing, so rounds accept some drafts and reject others), an unrelated model,
prompt lookup, or the target itself."""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import Config, ConfigError, ModelConfig
from transformer.inference.generate import Generator
from transformer.inference.sampling import SamplingConfig, probabilities
from transformer.inference.speculative import speculative_generate
from transformer.model import build_model

CFG = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
                  init_std=0.4)
WINDOW_CFG = dataclasses.replace(CFG, sliding_window=5)  # K = 5 + draft_tokens = 9 slots < the 10-token prompt
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 8, 7, 9]]
NEW, K = 32, 4
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=NEW)
MAX_LEN = max(map(len, PROMPTS)) + NEW + K - 1  # what speculative_generate allocates: one prefill compile for both


def perturbed(state, scale, seed):
    """`state` with N(0, scale) noise on every float array: a different model that often agrees."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), len(leaves))
    noisy = [x + scale * jax.random.normal(key, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
             for x, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def models():
    build = lambda seed: nnx.state(build_model(CFG, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))  # rbg: fast init
    target_state, other_state = build(0), build(1)
    near_state = perturbed(target_state, 0.01, seed=2)
    make = lambda cfg, state: Generator((Config(model=cfg), state))
    return dict(target=make(CFG, target_state), other=make(CFG, other_state), near=make(CFG, near_state),
                window=make(WINDOW_CFG, target_state), window_near=make(WINDOW_CFG, near_state))


@pytest.fixture(scope="module")
def reference(models):
    return models["target"].generate(PROMPTS, GREEDY, max_len=MAX_LEN)


def check_cache(generator, result):
    """The target keeps every emitted token but each row's last in its cache, as `generate` does."""
    lengths = np.asarray(generator.cache.lengths_B)
    np.testing.assert_array_equal(lengths, [len(p) + len(t) - 1 for p, t in zip(PROMPTS, result.tokens)])


@pytest.mark.parametrize("draft", ["other", "near", "lookup", "target"])
def test_greedy_matches_target_generate(models, reference, draft):
    result = speculative_generate(models["target"], PROMPTS, GREEDY, draft=None if draft == "lookup" else models[draft],
                                  draft_tokens=K)
    print(draft, result.stats)
    assert all(len(t) == NEW for t in reference.tokens)
    assert result.tokens == reference.tokens
    assert result.finish == ["length", "length"]
    stats = result.stats
    assert stats["target_calls"] == stats["rounds"] and stats["proposed"] > 0
    if draft == "target":
        assert stats["acceptance_rate"] == 1.0 and stats["target_calls"] == math.ceil(NEW / (K + 1))
    if draft == "near":  # partial acceptance: the rewind paths (target and draft, catch-up of d_k) are exercised
        assert 0.2 < stats["acceptance_rate"] < 1.0
    check_cache(models["target"], result)


@pytest.mark.parametrize("draft", [pytest.param("window_near", marks=pytest.mark.slow), "lookup"])
def test_greedy_sliding_window_ring_buffer(models, draft):
    target = models["window"]
    reference = target.generate(PROMPTS, GREEDY)
    result = speculative_generate(target, PROMPTS, GREEDY, draft=None if draft == "lookup" else models[draft],
                                  draft_tokens=K)
    print("window", draft, result.stats)
    assert target.cache.slots == WINDOW_CFG.sliding_window + K  # a ring buffer the generation wraps many times
    assert result.tokens == reference.tokens
    if draft == "window_near":
        assert 0.2 < result.stats["acceptance_rate"] < 1.0


def test_stop_tokens_end_rows(models, reference):
    stop = reference.tokens[0][5]
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in reference.tokens]
    result = speculative_generate(models["target"], PROMPTS, dataclasses.replace(GREEDY, stop_tokens=(stop,)),
                                  draft=models["near"], draft_tokens=K)
    assert result.tokens == expected
    assert result.finish == ["stop" if stop in row else "length" for row in reference.tokens]
    assert result.finish[0] == "stop"


ROWS, SHORT_PROMPT = 2000, [3, 1, 4, 1, 5]
SAMPLE = SamplingConfig(temperature=1.0, max_new_tokens=1, seed=7)
SAMPLE_MAX_LEN = len(SHORT_PROMPT) + 8 + K - 1  # shared by both sampling tests: one compile


def next_token_probs(generator, prompt):
    """The model's distribution after `prompt` from a plain full forward pass (no cache), through `probabilities`."""
    loaded = generator.loaded
    logits_LV = jax.jit(lambda state: nnx.merge(loaded.graphdef, state)(jnp.asarray([prompt]))[0][0])(loaded.state)
    return np.asarray(probabilities(logits_LV[-1:], SAMPLE)[0], np.float64)


def chi_square(tokens, probs, min_expected=5.0):
    """(statistic, degrees of freedom): cells with expected count < min_expected merged into one."""
    counts = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = tokens.size * probs
    big = expected >= min_expected
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    return float(np.sum((observed - expected) ** 2 / expected)), int(keep.sum()) - 1


def chi2_critical(dof, z=3.0902):
    """The 0.999 quantile of chi-square (alpha = 0.001) by the Wilson-Hilferty approximation (z: the normal's
    0.999 quantile); within 1.2% of the exact value for dof >= 5, 0.1% at dof 56 (this test's)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampling_first_token_matches_target_distribution(models):
    target, draft = models["target"], models["near"]
    result = speculative_generate(target, [SHORT_PROMPT] * ROWS, SAMPLE, draft=draft, draft_tokens=K,
                                  max_len=SAMPLE_MAX_LEN)
    first = np.asarray([row[0] for row in result.tokens])
    p, q = next_token_probs(target, SHORT_PROMPT), next_token_probs(draft, SHORT_PROMPT)
    statistic, dof = chi_square(first, p)
    print(f"chi2 vs target {statistic:.1f} (dof {dof}, critical {chi2_critical(dof):.1f}); stats {result.stats}; "
          f"total variation p-q {0.5 * np.abs(p - q).sum():.3f}")
    assert dof >= 5
    assert statistic < chi2_critical(dof)
    # negative control: the same test rejects the draft's distribution (what accepting every draft would give)
    statistic_q, dof_q = chi_square(first, q)
    assert statistic_q > chi2_critical(dof_q)
    assert 0.1 < result.stats["acceptance_rate"] < 0.95  # both branches (accept, residual draw) are taken


def test_sampling_draft_equal_to_target_accepts_everything(models):
    target = models["target"]
    sampling = dataclasses.replace(SAMPLE, max_new_tokens=8)
    result = speculative_generate(target, [SHORT_PROMPT] * ROWS, sampling, draft=target, draft_tokens=K,
                                  max_len=SAMPLE_MAX_LEN)
    print("sampling draft=target", result.stats)
    assert result.stats["acceptance_rate"] == 1.0
    assert result.stats["target_calls"] == 2 and all(len(row) == 8 for row in result.tokens)
    assert len({tuple(row) for row in result.tokens}) > ROWS // 2  # rows sample with their own keys


def test_bad_inputs_raise_config_errors(models):
    target = models["target"]
    wide = copy.copy(models["other"])  # a draft whose model config has another vocabulary
    wide.model_cfg = dataclasses.replace(wide.model_cfg, vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size=300 differs"):
        speculative_generate(target, PROMPTS, GREEDY, draft=wide)
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="draft_tokens"):
            speculative_generate(target, PROMPTS, GREEDY, draft_tokens=bad)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        speculative_generate(target, PROMPTS, dataclasses.replace(GREEDY, repetition_penalty=1.3))
    with pytest.raises(ConfigError, match="max_len=20"):
        speculative_generate(target, PROMPTS, GREEDY, max_len=20)
    with pytest.raises(ConfigError, match="lookup_ngram"):
        speculative_generate(target, PROMPTS, GREEDY, lookup_ngram=0)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        speculative_generate(target, [[1, 259]], GREEDY)
