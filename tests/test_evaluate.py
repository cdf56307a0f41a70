"""Evaluation: checkpoint loading, perplexity (chunks, sliding, RoPE-scaling override) against float64
references, passkey accuracy against greedy decoding, ring-attention evaluation, CLI."""

import dataclasses
import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from transformer import evaluate, sharding, train
from transformer.config import DataConfig, MeshConfig
from transformer.data import make_dataset, tokenizer
from transformer.data.synthetic import QUESTION, passkey_example
from transformer.model import build_model

from test_train import STEPS, tiny_config  # the same tiny run as test_train: its programs compile once

# raw orbax reads of saved checkpoints (no target shardings) in the assertions
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
PASSKEY_LENGTH = 96


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "run"
    train.train(tiny_config(path))
    return path


@pytest.fixture(scope="module")
def loaded(run_dir):
    return evaluate.load_model(str(run_dir))


@pytest.fixture(scope="module")
def noisy(loaded):
    """The trained model with random noise on every weight: it predicts from context and position
    (the 20-step model barely does), so misplaced reads or ignored overrides show."""
    noise = np.random.default_rng(0)
    state = jax.tree.map(lambda x: np.asarray(x) + noise.normal(0.0, 0.2, np.shape(x)).astype(x.dtype), loaded.state)
    return evaluate.load_model((loaded.cfg, state))


@nnx.jit
def logits_of(model, tokens_BL):
    return model(tokens_BL)[0]


def reference_perplexity(model, tokens_ZL: np.ndarray, score_from: int = 0) -> tuple[float, int]:
    """(float64 perplexity of targets score_from.. of one forward pass per row, scored tokens)."""
    logits = np.asarray(logits_of(model, tokens_ZL[:, :-1]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens_ZL[:, 1:, None], -1)[..., 0][:, score_from:]
    return float(np.exp(nll.mean())), nll.size


def test_load_model_restores_the_latest_checkpoint(run_dir, loaded):
    saved = ocp.PyTreeCheckpointer().restore((run_dir / "checkpoints" / str(STEPS) / "state").absolute())["model"]
    flat_saved = {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    flat_got = {"/".join(str(k.key) for k in p): x
                for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(loaded.state))}
    assert flat_got.keys() == flat_saved.keys() and len(flat_got) > 3
    for path, value in flat_got.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_saved[path]), err_msg=str(path))


def test_chunk_perplexity_matches_float64_reference(loaded):
    lengths = [32, 64]
    results = evaluate.perplexity_at_lengths(loaded, lengths, num_sequences=2)
    assert [r["length"] for r in results] == lengths
    model = nnx.merge(loaded.graphdef, loaded.state)
    data = make_dataset(loaded.cfg.data, "eval")
    for result, length in zip(results, lengths):
        want, tokens = reference_perplexity(model, data.eval_sequences(length, 2))
        assert result["tokens"] == tokens == 2 * length
        assert 1.0 < result["perplexity"] == pytest.approx(want, rel=1e-5)
        assert result["loss"] == pytest.approx(np.log(want), rel=1e-5)


def test_sliding_window_perplexity_matches_hand_windows(loaded):
    model = nnx.merge(loaded.graphdef, loaded.state)
    tokens_ZL = make_dataset(loaded.cfg.data, "eval").eval_sequences(64, 2)
    # window 32 (= data.seq_len), stride 16: windows at 0, 16, 32 score targets [0, 32), [32, 48), [48, 64)
    parts = [reference_perplexity(model, tokens_ZL[:, 0:33], 0), reference_perplexity(model, tokens_ZL[:, 16:49], 16),
             reference_perplexity(model, tokens_ZL[:, 32:65], 16)]
    want = np.exp(sum(np.log(p) * n for p, n in parts) / sum(n for _, n in parts))
    (got,) = evaluate.perplexity_at_lengths(loaded, [64], 2, mode="sliding", stride=16)
    assert got["tokens"] == 128 and got["window"] == 32 and got["stride"] == 16
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)
    (short,) = evaluate.perplexity_at_lengths(loaded, [32], 2, mode="sliding", stride=16)
    (chunk,) = evaluate.perplexity_at_lengths(loaded, [32], 2)
    assert short["perplexity"] == pytest.approx(chunk["perplexity"], rel=1e-6)


def test_rope_scaling_override_changes_the_model_not_the_params(noisy):
    scaled_cfg = dataclasses.replace(noisy.cfg.model, rope_scaling="linear", rope_scaling_factor=4.0)
    (scaled,) = evaluate.perplexity_at_lengths(noisy, [64], 2, model_cfg=scaled_cfg)
    (plain,) = evaluate.perplexity_at_lengths(noisy, [64], 2)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(scaled_cfg, rngs=nnx.Rngs(1))))
    model = nnx.merge(graphdef, noisy.state)
    want, _ = reference_perplexity(model, make_dataset(noisy.cfg.data, "eval").eval_sequences(64, 2))
    assert scaled["perplexity"] == pytest.approx(want, rel=1e-5)
    assert abs(scaled["perplexity"] - plain["perplexity"]) > 1e-3 * plain["perplexity"]


def greedy_answer(model, tokens_L: np.ndarray, start: int, end: int) -> np.ndarray:
    """Greedy decoding of tokens[start:end], one full causal forward pass per generated token."""
    tokens = tokens_L.copy()
    for t in range(start, end):
        tokens[t] = int(np.argmax(np.asarray(logits_of(model, tokens[None]))[0, t - 1]))
    return tokens[start:end]


@pytest.mark.slow  # keeps the default suite under 15 minutes (passkey evaluation: -m slow)
def test_passkey_accuracy_is_the_greedy_exact_match_rate(noisy, monkeypatch):
    loaded = noisy
    model = nnx.merge(loaded.graphdef, loaded.state)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(4):
        tokens, (start, end) = passkey_example(PASSKEY_LENGTH + 1, 0.5, rng)
        tokens[start:end] = greedy_answer(model, tokens, start, end)
        if i >= 2:  # wrong last digit: the model's answer misses this key by one token
            tokens[end - 1] = (tokens[end - 1] + 1) % 256
        examples.append((tokens, (start, end)))
    answers = np.concatenate([tokens[start:end] for tokens, (start, end) in examples])
    assert len(set(answers.tolist())) > 3

    def patched(length, depth, rng, *, digits):
        assert length == PASSKEY_LENGTH + 1 and digits == loaded.cfg.data.passkey_digits
        tokens, span = examples[len(calls) % len(examples)]
        calls.append(depth)
        return tokens.copy(), span

    monkeypatch.setattr(evaluate, "passkey_example", patched)
    for mesh in (None, sharding.make_mesh(MeshConfig(data=1, sequence=2), devices=jax.devices()[:2])):
        calls = []
        (result,) = evaluate.passkey_accuracy(loaded, [PASSKEY_LENGTH], depths=[0.5], trials=4, mesh=mesh)
        assert calls == [0.5] * 4
        assert result["accuracy"] == 0.5 and result["trials"] == 4
        assert result["digit_accuracy"] == pytest.approx(18 / 20)


def training_layout(length: int, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """(loss-masked positions, inputs) of passkey training rows at data.seq_len = length."""
    rows = make_dataset(DataConfig(dataset="passkey", seq_len=length, global_batch_size=4,
                                   passkey_digits=digits)).batch(0)
    masked = [np.flatnonzero(mask_L) for mask_L in rows["loss_mask_BL"]]
    assert all(np.array_equal(m, masked[0]) for m in masked) and len(masked[0]) == digits
    return masked[0], rows["inputs_BL"]


def test_passkey_prompts_have_the_training_layout():
    length, digits = PASSKEY_LENGTH, 4
    masked_Y, train_inputs_BL = training_layout(length, digits)
    prompts, answers_ZY = evaluate.passkey_prompts(length, 0.5, 3, np.random.default_rng(0), digits=digits)
    assert answers_ZY.shape == (3, digits)
    for row, prompt in enumerate(prompts):
        assert len(prompt) == masked_Y[0] + 1  # the answer's first digit is predicted where training masks it
        key = re.search(r"The pass key is (\d{4})\.", tokenizer.decode(prompt)).group(1)
        assert tokenizer.decode(answers_ZY[row]) == key
    question = slice(masked_Y[0] + 1 - len(QUESTION), masked_Y[0] + 1)
    for prompt in prompts:
        np.testing.assert_array_equal(prompt[question], train_inputs_BL[0, question])


def test_ring_attention_evaluation_matches_one_device(loaded):
    mesh = sharding.make_mesh(MeshConfig(data=1, sequence=2), devices=jax.devices()[:2])
    ring = evaluate.perplexity_at_lengths(loaded, [32, 64], 2, mesh=mesh)
    single = evaluate.perplexity_at_lengths(loaded, [32, 64], 2)
    for got, want in zip(ring, single):
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_cli_prints_tables_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [f"run_dir={run_dir}", "lengths=16,32", "num_sequences=2", f"passkey_lengths={PASSKEY_LENGTH}",
            "depths=0,1", "trials=2", f"out={out}", "model.rope_scaling=yarn", "model.rope_scaling_factor=2"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "passkey" in printed
    report = json.loads(out.read_text())
    assert report["model"]["rope_scaling"] == "yarn"
    assert [r["length"] for r in report["perplexity"]] == [16, 32]
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in report["perplexity"])
    assert [(r["length"], r["depth"]) for r in report["passkey"]] == [(PASSKEY_LENGTH, 0.0), (PASSKEY_LENGTH, 1.0)]
    assert all(0.0 <= r["accuracy"] <= r["digit_accuracy"] <= 1.0 for r in report["passkey"])


def test_cli_held_out_report_of_a_decoder_scores_its_eval_batches(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate.main([f"run_dir={run_dir}", "eval_batches=2", f"out={out}"]) == 0
    assert "held-out next_token batches" in capsys.readouterr().out
    report = json.loads(out.read_text())
    held_out, cfg = report["held_out"], tiny_config(run_dir)
    assert report["perplexity"] == [] and report["passkey"] == []
    assert held_out["tokens"] == 2 * cfg.data.global_batch_size * cfg.data.seq_len  # corpus rows: every token
    assert 0 < held_out["accuracy"] < 1 and held_out["perplexity"] == pytest.approx(np.exp(held_out["loss"]))


@pytest.mark.parametrize("argv, needle", [
    (["lengths=16"], "run_dir"),
    (["run_dir={run}"], "lengths=<comma-separated sequence lengths> is required for a decoder"),
    (["run_dir={run}", "lengths=16,x"], "lengths"),
    (["run_dir={run}", "lengths=16", "bogus=1"], "bogus"),
    (["run_dir={run}", "lengths=16", "mode=strided"], "mode"),
    (["run_dir={run}/nowhere", "lengths=16"], "config.json"),
    (["run_dir={run}", "lengths=16", "model.d_model=64"], "shape"),
])
def test_cli_errors_print_one_line_and_exit_2(run_dir, argv, needle, capsys):
    assert evaluate.main([a.format(run=run_dir) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
