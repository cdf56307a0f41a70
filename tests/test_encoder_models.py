"""Encoder-only (MLM) and encoder-decoder models through the train step: a tiny model overfits a fixed batch,
steps sharded over data, fsdp, tensor and sequence (ring attention: bidirectional encoder, causal decoder,
cross-attention with source and target split over the ring, S != L) and micro-batched equal one device, the
loss and masked-token accuracy sums against a float64 reference, and `transformer.evaluate` on trained runs.
(Kill-and-resume of every architecture: test_resume.py; the sharded model alone: test_sharding.py.)

Batches are built here from the batch contract of `transformer.data` (numpy): MLM rows of two packed
documents each with ~15% of the tokens masked and scored; encoder-decoder rows of a source and right-padded
targets with teacher-forced decoder inputs.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import evaluate, sharding, train
from transformer.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig
from transformer.data.placement import place_batch
from transformer.data.tokenizer import BOS, EOS, MASK, PAD
from transformer.loss import loss_sums

from test_train import assert_trees_equal, mesh_of

V, B, S, L = 320, 8, 24, 16  # vocab, rows, source length, decoder length (S != L: cross-attention over the ring)
ARCHITECTURES = ("encoder", "encoder_decoder")


def config(architecture: str, **changes) -> Config:
    model = ModelConfig(architecture=architecture, vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, d_ff=64, max_seq_len=32, attention_kernel="blockwise",
                        attention_block_size=8, num_encoder_layers=1 if architecture == "encoder_decoder" else 0)
    seq_len = S if architecture == "encoder_decoder" else L
    data = DataConfig(seq_len=seq_len, global_batch_size=B, target_len=L if architecture == "encoder_decoder" else 0)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0)
    return dataclasses.replace(Config(model=model, data=data, optim=optim, steps=50), **changes)


def packed_positions(starts_B: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions_BL, segment_ids_BL) of rows holding document 1 then document 2 from starts_B on."""
    t_BL = np.broadcast_to(np.arange(length), (len(starts_B), length))
    second_BL = t_BL >= starts_B[:, None]
    positions_BL = np.where(second_BL, t_BL - starts_B[:, None], t_BL)
    return positions_BL.astype(np.int32), (1 + second_BL).astype(np.int32)


def mlm_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of two packed documents (the first ends in EOS); 15% of the tokens masked: inputs carry MASK there,
    targets the original tokens, loss_mask 1 there only."""
    rng = np.random.default_rng(seed)
    tokens_BL = rng.integers(0, 256, (B, L)).astype(np.int32)
    starts_B = rng.integers(4, L - 4, B)
    tokens_BL[np.arange(B), starts_B - 1] = EOS
    positions_BL, segments_BL = packed_positions(starts_B, L)
    masked_BL = rng.random((B, L)) < 0.15
    masked_BL[:, 0] = True  # at least one scored token per row
    return {"inputs_BL": np.where(masked_BL, MASK, tokens_BL).astype(np.int32), "targets_BL": tokens_BL,
            "loss_mask_BL": masked_BL.astype(np.float32), "positions_BL": positions_BL,
            "segment_ids_BL": segments_BL}


def seq2seq_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Sources of varied length (right-padded, segment 0); targets = the first half of the source reversed, then
    EOS, right-padded; decoder inputs = BOS + targets[:-1]; loss on the real target tokens."""
    rng = np.random.default_rng(seed)
    sources_BS = np.full((B, S), PAD, np.int32)
    targets_BL = np.full((B, L), PAD, np.int32)
    source_lengths_B = rng.integers(S // 2, S + 1, B)
    target_lengths_B = np.minimum(source_lengths_B // 2, L - 1)
    for row, (n, m) in enumerate(zip(source_lengths_B, target_lengths_B)):
        sources_BS[row, :n] = rng.integers(0, 256, n)
        targets_BL[row, :m + 1] = [*sources_BS[row, :m][::-1], EOS]
    inputs_BL = np.concatenate([np.full((B, 1), BOS, np.int32), targets_BL[:, :-1]], axis=1)
    real_BS = np.arange(S) < source_lengths_B[:, None]
    real_BL = np.arange(L) <= target_lengths_B[:, None]
    arange = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (B, n)).copy()
    return {"inputs_BL": inputs_BL, "targets_BL": targets_BL, "loss_mask_BL": real_BL.astype(np.float32),
            "positions_BL": arange(L), "segment_ids_BL": real_BL.astype(np.int32),
            "sources_BS": sources_BS, "source_positions_BS": arange(S),
            "source_segment_ids_BS": real_BS.astype(np.int32)}


BATCHES = {"encoder": mlm_batch, "encoder_decoder": seq2seq_batch}


@functools.cache
def initial_state(architecture: str):
    """(graphdef, host state) of config(architecture) at init, created once and placed on each mesh."""
    cfg, mesh = config(architecture), mesh_of(data=1)
    with sharding.use_mesh(mesh):
        graphdef, _, shardings = train.abstract_train_state(cfg, mesh)
        return graphdef, jax.device_get(train.init_train_state(cfg, shardings))


def train_steps(cfg: Config, mesh, batches: list[dict]) -> tuple[list[dict], dict]:
    """(host metrics of each step, final state as host arrays): `train.jit_train_step` over `batches` on `mesh`
    from `initial_state`, each batch placed like the train loop places it."""
    sharding.validate_for_mesh(cfg, mesh)
    graphdef, state = initial_state(cfg.model.architecture)
    causal = cfg.model.causal
    with sharding.use_mesh(mesh):
        _, _, shardings = train.abstract_train_state(cfg, mesh)
        state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)  # the step donates it
        step = train.jit_train_step(cfg, shardings)
        history = []
        for batch in batches:
            state, step_metrics = step(graphdef, state, place_batch(batch, mesh, causal=causal))
            history.append(jax.device_get(step_metrics))
        return history, jax.device_get(nnx.to_pure_dict(state))


@functools.cache
def one_device_steps(architecture: str):
    """`train_steps` of three different batches on one device, without micro-batches."""
    return train_steps(config(architecture), mesh_of(data=1), [BATCHES[architecture](seed) for seed in range(3)])


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("architecture", [pytest.param(a, marks=pytest.mark.slow) if a != "encoder_decoder"
                                          else a for a in ARCHITECTURES])  # decoder: test_model / test_train
# overfit it; encoder: slow, for the 15-minute default budget
def test_tiny_model_overfits_a_fixed_batch(architecture):
    batch = BATCHES[architecture]()
    history, _ = train_steps(config(architecture), mesh_of(data=1), [batch] * 40)
    losses = [float(m["loss"]) for m in history]
    assert losses[0] == pytest.approx(np.log(V), abs=0.3)  # near-uniform predictions at init
    assert losses[-1] < 0.1 * losses[0], losses
    assert float(history[-1]["accuracy"]) > 0.95 > float(history[0]["accuracy"])


# ---------------------------------------------------------------- sharded equals one device


@pytest.mark.slow  # the model alone is checked on these meshes in test_sharding.py
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("axes", [dict(fsdp=2, sequence=2, tensor=2), dict(data=2, sequence=4)],
                         ids=["fsdp-sequence-tensor", "data-sequence4"])
def test_sharded_micro_batched_steps_equal_one_device(architecture, axes):
    """Three steps on one device against the same steps sharded and split into 2 micro-batches: the loss
    trace, the accuracy and the final state agree. The ring splits S = 24 and L = 16 (zigzag: causal rows)."""
    cfg = config(architecture)
    want, want_state = one_device_steps(architecture)
    accumulated = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=2))
    got, got_state = train_steps(accumulated, mesh_of(**axes), [BATCHES[architecture](seed) for seed in range(3)])
    for step, (g, w) in enumerate(zip(got, want)):
        assert float(g["loss"]) == pytest.approx(float(w["loss"]), rel=1e-5), step
        assert float(g["accuracy"]) == pytest.approx(float(w["accuracy"]), abs=1e-6), step
        assert float(g["grad_norm"]) == pytest.approx(float(w["grad_norm"]), rel=1e-4), step
    assert len({float(m["loss"]) for m in want}) == 3
    # Adam moves a weight by ~lr = 1e-2 per step whatever its gradient's size, so near-zero gradients that
    # differ in rounding may move it differently by a small fraction of that
    assert_trees_equal(got_state["model"], want_state["model"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- loss sums


def _reference(logits_BLV, targets_BL, mask_BL) -> tuple[float, float]:
    """float64 (cross-entropy sum, correct-prediction sum) over the masked tokens."""
    logits = np.asarray(logits_BLV, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(targets_BL)[..., None], -1)[..., 0]
    mask = np.asarray(mask_BL, np.float64)
    return float(np.sum((lse - target) * mask)), float(np.sum((logits.argmax(-1) == targets_BL) * mask))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loss_sums_whole_and_chunked_score_only_the_masked_tokens(architecture):
    """Cross-entropy and correct predictions of the scored tokens against float64, with every other target
    replaced by the model's own prediction, so that some are right."""
    model = nnx.merge(*initial_state(architecture)).model
    batch = {k: jnp.asarray(v) for k, v in BATCHES[architecture]().items()}

    @nnx.jit
    def sums_and_logits(model):
        if architecture == "encoder":
            logits_BLV, _ = model(batch["inputs_BL"], positions_BL=batch["positions_BL"],
                                  segment_ids_BL=batch["segment_ids_BL"])
        else:
            logits_BLV, _ = model(batch["sources_BS"], batch["inputs_BL"],
                                  source_positions_BS=batch["source_positions_BS"],
                                  source_segment_ids_BS=batch["source_segment_ids_BS"],
                                  positions_BL=batch["positions_BL"], segment_ids_BL=batch["segment_ids_BL"])
        predicted_BL = jnp.argmax(logits_BLV, axis=-1).astype(jnp.int32)
        targets_BL = jnp.where(jnp.arange(L) % 2 == 0, predicted_BL, batch["targets_BL"])
        scored = batch | {"targets_BL": targets_BL}
        whole, chunked = (loss_sums(model, scored, loss_chunk_size=chunk)[0] for chunk in (0, 24))
        return whole, chunked, logits_BLV, targets_BL

    whole, chunked, logits_BLV, targets_BL = sums_and_logits(model)
    ce, correct = _reference(logits_BLV, targets_BL, batch["loss_mask_BL"])
    assert 0 < correct < float(np.sum(batch["loss_mask_BL"]))
    for sums in (whole, chunked):
        assert float(sums["tokens"]) == float(np.sum(batch["loss_mask_BL"])) < B * L
        assert float(sums["ce"]) == pytest.approx(ce, rel=1e-5)
        assert float(sums["correct"]) == correct


def test_a_batch_for_the_other_kind_of_model_is_one_clear_error():
    model = nnx.merge(*initial_state("encoder")).model
    with pytest.raises(ValueError, match="the batch has sources_BS but the model is EncoderLM"):
        loss_sums(model, seq2seq_batch())


# ---------------------------------------------------------------- evaluate


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_evaluate_reports_the_held_out_loss_and_accuracy_of_a_trained_run(architecture, tmp_path, capsys):
    """A run trained on its objective's batches (mlm; span corruption), then `transformer.evaluate run_dir=...`:
    the report holds the loss and accuracy the train loop's last eval logged, over the scored tokens of the
    run's eval batches; decoder-only measurements are refused in one line naming the option."""
    run_dir = tmp_path / "run"
    cfg = dataclasses.replace(config(architecture), run_dir=str(run_dir), steps=10, eval_every=10, eval_batches=2,
                              progress_bar=False, tensorboard=False, sample_tokens=0,
                              checkpoint=CheckpointConfig(every_steps=10, async_save=False))
    summary = train.train(cfg)
    assert 0 < summary["eval_accuracy"] < 1 and summary["eval_loss"] < summary["losses"][0]
    out = tmp_path / "evaluation.json"
    assert evaluate.main([f"run_dir={run_dir}", f"out={out}"]) == 0
    assert "accuracy" in capsys.readouterr().out
    held_out = json.loads(out.read_text())["held_out"]
    data = train.training_dataset(cfg)
    scored = sum(float(np.sum(data.eval_batch(index)["loss_mask_BL"])) for index in range(2))
    assert held_out["objective"] == {"encoder": "mlm", "encoder_decoder": "span_corruption"}[architecture]
    assert held_out["batches"] == 2 and held_out["tokens"] == scored
    assert held_out["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert held_out["accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-9)
    assert held_out["perplexity"] == pytest.approx(np.exp(summary["eval_loss"]), rel=1e-6)
    assert evaluate.main([f"run_dir={run_dir}", "passkey_lengths=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "passkey_lengths=" in err[0] and repr(architecture) in err[0]
