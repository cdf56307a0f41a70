"""Training: end-to-end CLI run with metrics, learning, exact gradient accumulation, chunked loss,
sequence-parallel equivalence, NaN guard, bitwise determinism, weight-decay mask, schedule, init_from,
config errors; metrics helpers.

Most tests share one tiny config so that its programs compile once per session (persistent
compilation cache in a session temp dir; runs of one config are still separate executions).
"""

import dataclasses
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from transformer import metrics, sharding, train
from transformer.config import Config, MeshConfig, OptimConfig, config_from_args
from transformer.data import make_dataset
from transformer.data.placement import place_batch
from transformer.loss import loss_sums, num_loss_chunks

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="transformer-test-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# raw orbax reads of saved checkpoints (no target shardings) in the assertions
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
REPO = Path(__file__).resolve().parent.parent
STEPS = 20
TINY = ["--preset", "tiny", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.max_seq_len=32", "model.attention_block_size=32", "data.seq_len=32", "data.global_batch_size=8",
        "optim.warmup_steps=2", "optim.lr=1e-2", f"steps={STEPS}", "log_every=1", "eval_every=0", "eval_batches=2",
        "progress_bar=false", "tensorboard=false", "checkpoint.every_steps=0", "checkpoint.async_save=false",
        "sample_tokens=0"]


def tiny_args(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"run_dir={run_dir}", *extra]


def tiny_config(run_dir: Path, *extra: str) -> Config:
    return config_from_args(tiny_args(run_dir, *extra))


def mesh_of(**axes):
    mesh_cfg = MeshConfig(**{"data": 1, **axes})
    size = int(np.prod(list(mesh_cfg.shape.values())))
    return sharding.make_mesh(mesh_cfg, devices=jax.devices()[:size])


def checkpoint_dirs(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def saved_state(run_dir: Path, step: int) -> dict:
    return ocp.PyTreeCheckpointer().restore((run_dir / "checkpoints" / str(step) / "state").absolute())


def as_numpy(x) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_trees_equal(got, want, **allclose):
    flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want] and len(flat_got) > 3
    for (path, a), (_, b) in zip(flat_got, flat_want):
        check = np.testing.assert_allclose if allclose else np.testing.assert_array_equal
        check(as_numpy(a), as_numpy(b), err_msg=jax.tree_util.keystr(path), **allclose)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under log_dir (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list] = {}
    for path in sorted(log_dir.glob("events.out.tfevents*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# ---------------------------------------------------------------- end to end


def test_main_runs_and_writes_metrics_tensorboard_and_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "log_every=10", "eval_every=10", "tensorboard=true", "checkpoint.every_steps=10")
    assert train.main(args) == 0
    assert f"step {STEPS}" in capsys.readouterr().out
    records = metrics.read_metrics(str(run_dir))
    assert [r["step"] for r in records] == [10, 20]
    for record in records:
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["lr"] > 0
        assert record["eval_perplexity"] == pytest.approx(np.exp(record["eval_loss"]), rel=1e-6)
        assert record["tokens_per_second"] > 0
        assert "mfu" not in record  # no known peak FLOP/s on CPU
    assert records[1]["eval_loss"] < records[0]["eval_loss"]
    assert checkpoint_dirs(run_dir) == [10, 20]
    scalars = tensorboard_scalars(run_dir / metrics.TENSORBOARD_DIR)
    assert [step for step, _ in scalars["loss"]] == [10, 20]
    assert scalars["eval_loss"][1][1] == pytest.approx(records[1]["eval_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """Two runs of the same config in different directories."""
    root = tmp_path_factory.mktemp("twins")
    return [(root / name, train.train(tiny_config(root / name, f"checkpoint.every_steps={STEPS}")))
            for name in ("a", "b")]


def test_loss_decreases(twin_runs):
    losses = twin_runs[0][1]["losses"]
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(np.log(259), abs=0.3)  # near-uniform predictions at init
    assert np.mean(losses[-3:]) < losses[0] - 1.0


def test_identical_configs_give_bitwise_identical_runs(twin_runs):
    (dir_a, run_a), (dir_b, run_b) = twin_runs
    assert run_a["losses"] == run_b["losses"]
    assert len(set(run_a["losses"])) == len(run_a["losses"])
    assert_trees_equal(saved_state(dir_a, STEPS), saved_state(dir_b, STEPS))


def test_init_from_starts_with_the_source_params_and_a_fresh_optimizer(twin_runs, tmp_path):
    source_dir, _ = twin_runs[0]
    run_dir = tmp_path / "finetune"
    summary = train.train(tiny_config(run_dir, "steps=0", f"checkpoint.init_from={source_dir}"))
    assert summary["origin"] == "init_from" and summary["step"] == 0
    got, source = saved_state(run_dir, 0), saved_state(source_dir, STEPS)
    assert_trees_equal(got["model"], source["model"])
    assert int(got["optimizer"]["step"]) == 0 and int(source["optimizer"]["step"]) == STEPS


def test_params_stay_float32_with_bfloat16_compute(tmp_path):
    cfg = tiny_config(tmp_path, "model.dtype=bfloat16")
    _, abstract, _ = train.abstract_train_state(cfg, mesh_of(data=8))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.filter_state(abstract["model"], nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------- step numerics


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """(cfg with a 16-row batch, graphdef, initial state on 8 devices, batch 0 on the host)."""
    cfg = tiny_config(tmp_path_factory.mktemp("initial"), "data.global_batch_size=16")
    mesh = mesh_of(data=8)
    with sharding.use_mesh(mesh):
        graphdef, _, shardings = train.abstract_train_state(cfg, mesh)
        state = train.init_train_state(cfg, shardings)
    return cfg, graphdef, state, make_dataset(cfg.data).batch(0)


def one_step(cfg: Config, initial, mesh):
    """(new state, host metrics) of one train step of `cfg` on `mesh` from the shared initial state."""
    _, graphdef, state, batch = initial
    with sharding.use_mesh(mesh):
        _, _, shardings = train.abstract_train_state(cfg, mesh)
        step = jax.jit(train.make_train_step(cfg), static_argnums=0)
        state, step_metrics = step(graphdef, jax.device_put(state, shardings), place_batch(batch, mesh))
        return jax.device_get(nnx.to_pure_dict(state)), jax.device_get(step_metrics)


@pytest.fixture(scope="module")
def data_parallel_step(initial):
    return one_step(initial[0], initial, mesh_of(data=8))


def assert_same_step(got, want):
    (state_got, m_got), (state_want, m_want) = got, want
    assert m_got["loss"] == pytest.approx(m_want["loss"], rel=1e-6)
    assert m_got["grad_norm"] == pytest.approx(m_want["grad_norm"], rel=1e-5)
    assert m_got["lr"] == m_want["lr"] > 0
    assert_trees_equal(state_got["model"], state_want["model"], rtol=1e-4, atol=2e-5)  # Adam step: 5e-3


def test_grad_accumulation_equals_full_batch(initial, data_parallel_step):
    cfg = initial[0]
    accumulated = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=2))
    assert_same_step(one_step(accumulated, initial, mesh_of(data=8)), data_parallel_step)


@pytest.mark.slow
@pytest.mark.parametrize("loss_chunk_size", [0, 100])
def test_sequence_parallel_zigzag_step_matches_data_parallel(initial, data_parallel_step, loss_chunk_size):
    cfg = dataclasses.replace(initial[0], loss_chunk_size=loss_chunk_size)
    assert_same_step(one_step(cfg, initial, mesh_of(data=4, sequence=2)), data_parallel_step)


@pytest.mark.slow
def test_moe_router_bias_updates_survive_accumulated_micro_batches(tmp_path):
    cfg = tiny_config(tmp_path, "model.num_layers=1", "model.moe.num_experts=4", "model.moe.top_k=1",
                      "model.moe.router=sigmoid_bias", "model.moe.bias_update_rate=0.01", "optim.grad_accum_steps=2")
    mesh = mesh_of(data=4)
    batch = make_dataset(cfg.data).batch(0)
    with sharding.use_mesh(mesh):
        graphdef, _, shardings = train.abstract_train_state(cfg, mesh)
        state = train.init_train_state(cfg, shardings)
        model = nnx.merge(graphdef, jax.device_get(state)).model
        new_state, step_metrics = jax.jit(train.make_train_step(cfg), static_argnums=0)(
            graphdef, state, place_batch(batch, mesh))

    @nnx.jit
    def route(model, inputs_BL):  # reference: the two micro-batches (rows 0, 2, ... then 1, 3, ...) in order
        model(inputs_BL[0::2], update_router_bias=True)
        model(inputs_BL[1::2], update_router_bias=True)

    route(model, jnp.asarray(batch["inputs_BL"]))
    want = jax.tree.leaves(nnx.state(model, lambda path, v: "router_bias" in str(path)))
    got = jax.tree.leaves(nnx.state(nnx.merge(graphdef, new_state).model, lambda path, v: "router_bias" in str(path)))
    assert len(got) == len(want) == 1 and np.any(np.asarray(got[0]) != 0)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert step_metrics["aux_loss"] > 0 and step_metrics["moe/expert_load_NE"].shape == (1, 4)


def _reference_sums(logits_BLV, targets_BL, mask_BL) -> tuple[float, float]:
    logits = np.asarray(logits_BLV, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(targets_BL)[..., None], -1)[..., 0]
    mask = np.asarray(mask_BL, np.float64)
    return float(np.sum((lse - target) * mask)), float(np.sum(lse ** 2 * mask))


@pytest.mark.parametrize("batch, length, chunk_tokens, chunks", [(4, 32, 40, 4), (4, 32, 128, 1), (4, 32, 1, 32),
                                                                 (2, 30, 25, 3)])
def test_num_loss_chunks(batch, length, chunk_tokens, chunks):
    assert num_loss_chunks(batch, length, chunk_tokens) == chunks


def test_chunked_loss_and_grads_equal_unchunked_and_float64_reference(initial):
    _, graphdef, state, batch_np = initial
    model = nnx.merge(graphdef, jax.device_get(state)).model
    batch = {k: jnp.asarray(v[:4]) for k, v in batch_np.items()}
    batch["loss_mask_BL"] = batch["loss_mask_BL"].at[:, :5].set(0.0)

    def loss(model, chunk):
        sums, _ = loss_sums(model, batch, loss_chunk_size=chunk)
        return (sums["ce"] + 0.1 * sums["z"]) / sums["tokens"], sums

    @nnx.jit
    def both(model):
        logits_BLV, _ = model(batch["inputs_BL"], positions_BL=batch["positions_BL"],
                              segment_ids_BL=batch["segment_ids_BL"])
        grad_fn = nnx.value_and_grad(loss, has_aux=True)
        return logits_BLV, grad_fn(model, 0), grad_fn(model, 40)  # 40 tokens: 4 chunks of 8 positions

    logits_BLV, ((value, sums), grads), ((value_chunked, _), grads_chunked) = both(model)
    ce, z = _reference_sums(logits_BLV, batch["targets_BL"], batch["loss_mask_BL"])
    assert float(sums["tokens"]) == 4 * 27
    assert float(sums["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(sums["z"]) == pytest.approx(z, rel=1e-5)
    assert float(value_chunked) == pytest.approx(float(value), rel=1e-6)
    assert_trees_equal(nnx.state(grads_chunked), nnx.state(grads), rtol=1e-5, atol=1e-7)


def test_weight_decay_applies_to_matrices_only(initial):
    cfg, graphdef, state, _ = initial
    cfg = dataclasses.replace(cfg, optim=OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, clip_norm=0.0))
    model = nnx.merge(graphdef, jax.device_get(state)).model
    optimizer = nnx.Optimizer(model, train.make_optimizer(cfg, model), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    nnx.jit(lambda opt, m, g: opt.update(m, g))(optimizer, model, jax.tree.map(jnp.zeros_like, params))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # zero gradients: Adam moves nothing, only decay acts
    decayed, kept = [], []
    for path, variable in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        name = jax.tree_util.keystr(path)
        old, new = _get(before, path), np.asarray(_get(after, path))
        matrix = sum(axis != "layers" for axis in variable.logical_axes) >= 2
        (decayed if matrix else kept).append(name)
        np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5) if matrix else old, rtol=1e-6, err_msg=name)
    assert decayed and any("norm" in name.lower() for name in kept)


def _get(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "name", key))]
    return tree


def test_lr_schedule_warmup_then_cosine_to_min():
    schedule = train.lr_schedule(OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), steps=20)
    expected = {0: 0.25, 3: 1.0, 4: 1.0, 12: 0.55, 20: 0.1, 25: 0.1}
    for count, lr in expected.items():
        assert float(schedule(count)) == pytest.approx(lr, rel=1e-6), count


# ---------------------------------------------------------------- guard and errors


def test_nan_guard_names_the_first_bad_step_and_saves_nothing_after_it(tmp_path, monkeypatch, capsys):
    fetch = train.local_batch

    def poisoned(data, step, mesh, **kwargs):
        batch = fetch(data, step, mesh, **kwargs)
        if step == 2 and not kwargs.get("held_out"):  # the batch of the 3rd optimizer step
            batch["loss_mask_BL"][0, 0] = np.nan
        return batch

    monkeypatch.setattr(train, "local_batch", poisoned)
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(run_dir, "checkpoint.every_steps=1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped: step 3: non-finite loss nan")
    assert checkpoint_dirs(run_dir) == [1, 2]
    assert [r["step"] for r in metrics.read_metrics(str(run_dir))] == [1, 2]


def test_bad_override_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "transformer.train", "model.d_model=abc"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.d_model" in lines[0] and "integer" in lines[0]


@pytest.mark.parametrize("argv, needle", [(["optim.lr=-1"], "optim.lr"), (["nosuch.field=1"], "nosuch"),
                                          (["data.global_batch_size=12"], "data.global_batch_size=12"),
                                          (["data.objective=mlm"], "data.objective='mlm' cannot train"),
                                          (["model.architecture=encoder_decoder", "model.vocab_size=320",
                                            "data.target_len=14", "mesh.data=4", "mesh.sequence=2"],
                                           "data.target_len=14 is not divisible by 2 x mesh.sequence=2")])
def test_config_errors_in_process_exit_2(argv, needle, tmp_path, capsys):
    assert train.main([*tiny_args(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


# ---------------------------------------------------------------- metrics helpers


def test_flatten_names_layers_and_experts():
    flat = metrics.flatten({"loss": np.float32(2.5), "moe/expert_load_NE": np.arange(6.0).reshape(2, 3),
                            "moe/dropped_fraction": np.array([0.25, 0.5]), "steps": np.int32(3), "misc": np.ones(2)})
    assert flat["loss"] == 2.5 and flat["steps"] == 3
    assert flat["moe/expert_load/layer1/expert2"] == 5.0 and flat["moe/expert_load/layer0/expert0"] == 0.0
    assert flat["moe/dropped_fraction/layer1"] == 0.5
    assert sorted(k for k in flat if k.startswith("misc")) == ["misc/dim0_0", "misc/dim0_1"]


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v4", 275e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6e", 918e12),
                                        ("cpu", None)])
def test_peak_flops_table(kind, peak):
    assert metrics.peak_flops_per_device(kind) == peak


def test_mfu():
    assert metrics.mfu(1e6, 6e9, 8, "NVIDIA H100") == pytest.approx(1e6 * 6e9 / (8 * 989e12))
    assert metrics.mfu(1e6, 6e9, 8, "cpu") is None


def test_writer_drops_records_past_the_resume_step(tmp_path):
    with metrics.MetricsWriter(str(tmp_path)) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)})
    with metrics.MetricsWriter(str(tmp_path), start_step=2) as writer:
        writer.write(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_held_out_eval_reports_loss_and_routing_statistics_of_the_eval_batches(tmp_path):
    cfg = tiny_config(tmp_path, "model.num_layers=1", "model.moe.num_experts=4", "model.moe.top_k=2")
    mesh = mesh_of(data=1)
    data = make_dataset(cfg.data, "train")
    with sharding.use_mesh(mesh):
        graphdef, _, shardings = train.abstract_train_state(cfg, mesh)
        state = train.init_train_state(cfg, shardings)
        result = train.evaluate_held_out(jax.jit(train.make_eval_step(cfg), static_argnums=0), graphdef, state,
                                         data, mesh, num_batches=2)
    model = nnx.merge(graphdef, jax.device_get(state)).model
    ce = tokens = 0.0
    loads = []
    for index in range(2):
        batch = data.eval_batch(index)
        logits, aux = model(jnp.asarray(batch["inputs_BL"]), positions_BL=jnp.asarray(batch["positions_BL"]),
                            segment_ids_BL=jnp.asarray(batch["segment_ids_BL"]))
        batch_ce, _ = _reference_sums(logits, batch["targets_BL"], batch["loss_mask_BL"])
        ce, tokens = ce + batch_ce, tokens + float(np.sum(batch["loss_mask_BL"]))
        loads.append(np.asarray(aux["moe/expert_load_NE"]))
    assert result["eval_loss"] == pytest.approx(ce / tokens, rel=1e-5)
    np.testing.assert_allclose(result["eval/moe/expert_load_NE"], np.mean(loads, axis=0), rtol=1e-5)
    assert not np.allclose(loads[0], loads[1])  # two different batches really were averaged
    flat = metrics.flatten(result)
    assert {"eval/moe/load_cv/layer0", "eval/moe/dropped_token_fraction/layer0",
            "eval/moe/expert_load/layer0/expert3"} <= set(flat)
