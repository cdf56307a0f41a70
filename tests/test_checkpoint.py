"""Checkpointer: bitwise roundtrip, retention, corrupt-checkpoint fallback, config checks,
restore onto smaller meshes, params-only init, preemption signals."""

import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import sharding
from transformer.checkpoint import (CheckpointWarning, Checkpointer, PreemptionGuard, config_differences,
                                    restore_params)
from transformer.config import CheckpointConfig, Config, ConfigError, MeshConfig, ModelConfig, OptimConfig


class Bias(nnx.Variable):
    """Stands in for the MoE router bias: state that is not a Param."""


class TinyLM(nnx.Module):
    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.embed_VD = nnx.Param(jax.random.normal(rngs.params(), (32, d_model)), logical_axes=("vocab", "embed"))
        self.w_DF = nnx.Param(jax.random.normal(rngs.params(), (d_model, 16)), logical_axes=("embed", "mlp"))
        self.bias_E = Bias(jnp.zeros(4), logical_axes=("expert",))


class TrainState(nnx.Module):
    def __init__(self, d_model: int = 16, seed: int = 0):
        self.model = TinyLM(d_model, rngs=nnx.Rngs(seed))
        self.optimizer = nnx.Optimizer(self.model, optax.adamw(1e-2), wrt=nnx.Param)
        self.rngs = nnx.Rngs(dropout=seed + 1)


def trained_state(num_steps: int, d_model: int = 16, seed: int = 0):
    """nnx state after `num_steps` updates (every part of it differs from the initial one)."""
    ts = TrainState(d_model, seed)
    for _ in range(num_steps):
        tokens = jax.random.randint(ts.rngs.dropout(), (4,), 0, 32)

        def loss_fn(model):
            return jnp.sum(jnp.tanh(model.embed_VD[tokens] @ model.w_DF) ** 2)

        grads = nnx.grad(loss_fn)(ts.model)
        ts.optimizer.update(ts.model, grads)
        ts.model.bias_E.set_value(ts.model.bias_E.get_value() + 0.1)
    return nnx.state(ts)


def abstract_state(mesh, d_model: int = 16):
    state = nnx.state(nnx.eval_shape(lambda: TrainState(d_model)))
    shardings = sharding.state_shardings(state, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def mesh_of(n: int):
    return sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices=jax.devices()[:n])


def as_bytes(x) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.view(np.uint8) if x.ndim else x.reshape(1).view(np.uint8)


def assert_bitwise_equal(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    assert len(flat_a) > 10
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(as_bytes(x), as_bytes(y), err_msg=jax.tree_util.keystr(path))


def make_config(tmp_path, **checkpoint) -> Config:
    checkpoint.setdefault("async_save", False)
    return Config(model=ModelConfig(d_model=16, num_layers=1, num_heads=2), run_dir=str(tmp_path / "run"),
                  checkpoint=CheckpointConfig(**checkpoint))


def checkpointer(cfg: Config) -> Checkpointer:
    return Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg)


def saved_run(tmp_path, *steps: int) -> Config:
    """The config of a run in tmp_path/run that saved trained_state(step) as checkpoint `step` for each step."""
    cfg = make_config(tmp_path, every_steps=1)
    with checkpointer(cfg) as ckpt:
        for step in steps:
            ckpt.maybe_save(step, trained_state(step))
    return cfg


def test_roundtrip_is_bitwise_and_holds_everything(tmp_path):
    cfg = make_config(tmp_path, every_steps=1, async_save=True)
    state = trained_state(3)
    with checkpointer(cfg) as ckpt:
        assert ckpt.restore_latest(abstract_state(mesh_of(1))) is None
        assert ckpt.maybe_save(3, state)
        ckpt.wait_until_finished()
        restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert step == 3
    assert isinstance(restored, nnx.State)
    assert_bitwise_equal(restored, state)
    assert int(restored["optimizer"]["step"].get_value()) == 3
    assert isinstance(restored["model"]["bias_E"], Bias)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(cfg.to_json())
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    assert json.loads((step_dir / "meta" / "metadata").read_text())["step"] == 3
    assert json.loads((step_dir / "config" / "metadata").read_text())["model"]["d_model"] == 16
    # a fresh Checkpointer (a new process) resumes the same way, also into a plain dict
    with checkpointer(cfg) as ckpt:
        restored, step = ckpt.restore_latest(nnx.to_pure_dict(abstract_state(mesh_of(1))))
    assert step == 3
    assert isinstance(restored, dict) and not isinstance(restored, nnx.State)
    assert_bitwise_equal(restored, nnx.to_pure_dict(state))


def test_policies_and_retention(tmp_path):
    cfg = make_config(tmp_path, every_steps=2, keep_last=2, keep_every=4)
    state = trained_state(1)
    with checkpointer(cfg) as ckpt:
        saved = [step for step in range(1, 13) if ckpt.maybe_save(step, state)]
        assert saved == [2, 4, 6, 8, 10, 12]
        assert ckpt.maybe_save(13, state, force=True)
        assert not ckpt.maybe_save(13, state, force=True)
        assert not ckpt.maybe_save(12, state, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 8, 12, 13]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) \
        == [4, 8, 12, 13]


def test_every_seconds_policy(tmp_path):
    cfg = make_config(tmp_path, every_steps=0, every_seconds=0.3)
    state = trained_state(0)
    with checkpointer(cfg) as ckpt:
        assert not ckpt.maybe_save(1, state)
        time.sleep(0.35)
        assert ckpt.maybe_save(2, state)
        assert not ckpt.maybe_save(3, state)


def _truncate_data_files(step_dir: Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated_data": _truncate_data_files,
    "deleted_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "no_commit_marker": lambda d: (d / "commit_success.txt").unlink(),
    "unreadable_config": lambda d: (d / "config" / "metadata").write_text("{not json"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop after a failed read
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous(tmp_path, corruption):
    cfg = make_config(tmp_path, every_steps=1)
    state_1, state_2 = trained_state(1), trained_state(2)
    with checkpointer(cfg) as ckpt:
        ckpt.maybe_save(1, state_1)
        ckpt.maybe_save(2, state_2)
    bad = tmp_path / "run" / "checkpoints" / "2"
    CORRUPTIONS[corruption](bad)
    with checkpointer(cfg) as ckpt:
        with pytest.warns(CheckpointWarning) as record:
            restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
        messages = [str(w.message) for w in record]
        assert messages[0].startswith(f"skipping checkpoint {bad}: ")
        assert messages[1] == f"moved skipped checkpoint {bad} to {tmp_path / 'run' / 'checkpoints_skipped' / '2'}"
        assert step == 1
        assert_bitwise_equal(restored, state_1)
        assert (tmp_path / "run" / "checkpoints_skipped" / "2").is_dir()  # moved aside, not deleted
        assert not bad.exists()
        assert ckpt.maybe_save(2, state_2)  # the step can be saved again
        restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert step == 2
    assert_bitwise_equal(restored, state_2)


def test_interrupted_async_save_is_ignored(tmp_path):
    cfg = make_config(tmp_path, every_steps=1)
    state_1 = trained_state(1)
    with checkpointer(cfg) as ckpt:
        ckpt.maybe_save(1, state_1)
    checkpoints = tmp_path / "run" / "checkpoints"
    partial = checkpoints / "2.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    with checkpointer(cfg) as ckpt:
        with pytest.warns(CheckpointWarning, match=f"moved skipped checkpoint {partial} to"):
            restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert step == 1
    assert_bitwise_equal(restored, state_1)
    assert (tmp_path / "run" / "checkpoints_skipped" / partial.name).is_dir()


def test_no_good_checkpoint_raises(tmp_path):
    cfg = saved_run(tmp_path, 1)
    (tmp_path / "run" / "checkpoints" / "1" / "commit_success.txt").unlink()
    with checkpointer(cfg) as ckpt, pytest.warns(CheckpointWarning):
        with pytest.raises(ValueError, match="no restorable checkpoint"):
            ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_config_mismatch_names_fields(tmp_path):
    cfg = saved_run(tmp_path, 1)
    other = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=2), run_dir=cfg.run_dir,
                   checkpoint=cfg.checkpoint)
    with pytest.raises(ConfigError, match=r"model\.d_model: saved 16, current 32"):
        checkpointer(other)
    # without run_dir/config.json the checkpoint's own config is checked, before any shape error
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint .*/checkpoints/1.*model\.d_model"):
        checkpointer(other)
    assert not (tmp_path / "run" / "config.json").exists()


def test_renamed_arrays_fail_with_the_names_and_leave_the_checkpoint_alone(tmp_path):
    """A checkpoint written by other model code (here: a parameter renamed since) is a different run, not a
    corrupt one: one error naming the arrays, and nothing is moved aside."""
    cfg = saved_run(tmp_path, 1)
    renamed = jax.tree.map(lambda x: x, abstract_state(mesh_of(1)))
    renamed["model"]["w_DF_renamed"] = renamed["model"].pop("w_DF")
    with checkpointer(cfg) as ckpt:
        with pytest.raises(ConfigError, match=r"other model code.*model/w_DF_renamed.*model/w_DF"):
            ckpt.restore_latest(renamed)
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "run" / "checkpoints_skipped").exists()


def test_resumable_fields_may_change(tmp_path):
    cfg = saved_run(tmp_path, 1)
    longer = Config(model=cfg.model, mesh=MeshConfig(data=2, fsdp=-1), run_dir=cfg.run_dir, steps=5000,
                    checkpoint=CheckpointConfig(every_steps=7, async_save=False), progress_bar=False)
    assert config_differences(json.loads(cfg.to_json()), longer) == []
    with checkpointer(longer) as ckpt:
        assert ckpt.restore_latest(abstract_state(mesh_of(1)))[1] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 5000
    changed_lr = Config(model=cfg.model, run_dir=cfg.run_dir, optim=OptimConfig(lr=1.0))
    assert config_differences(json.loads(cfg.to_json()), changed_lr) == ["optim.lr: saved 0.003, current 1.0"]


@pytest.mark.parametrize("num_devices", [4, 2, 1])
def test_restore_onto_smaller_mesh(tmp_path, num_devices):
    cfg = make_config(tmp_path, every_steps=1)
    big = abstract_state(mesh_of(8))
    state = jax.device_put(trained_state(2), jax.tree.map(lambda a: a.sharding, big))
    assert state["model"]["w_DF"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert len(state["model"]["w_DF"].get_value().sharding.device_set) == 8
    with checkpointer(cfg) as ckpt:
        ckpt.maybe_save(2, state)
    small = abstract_state(mesh_of(num_devices))
    with checkpointer(cfg) as ckpt:
        restored, step = ckpt.restore_latest(small)
    assert step == 2
    assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(small)):
        assert got.sharding == want.sharding
    assert len(restored["model"]["embed_VD"].get_value().sharding.device_set) == num_devices


def test_restore_params_from_run_dir_and_step_dir(tmp_path):
    cfg = saved_run(tmp_path, 1, 2)
    abstract_params = nnx.state(nnx.eval_shape(lambda: TinyLM(16, rngs=nnx.Rngs(0))), nnx.Param)
    expected = {k: trained_state(2)["model"][k] for k in ("embed_VD", "w_DF")}
    params = restore_params(cfg.run_dir, abstract_params)
    assert set(params.keys()) == {"embed_VD", "w_DF"}
    for name, variable in expected.items():
        np.testing.assert_array_equal(np.asarray(params[name].get_value()), np.asarray(variable.get_value()))
    params_1 = restore_params(str(tmp_path / "run" / "checkpoints" / "1"), abstract_params)
    np.testing.assert_array_equal(np.asarray(params_1["w_DF"].get_value()),
                                  np.asarray(trained_state(1)["model"]["w_DF"].get_value()))


def test_restore_params_errors(tmp_path):
    abstract_params = nnx.state(nnx.eval_shape(lambda: TinyLM(16, rngs=nnx.Rngs(0))), nnx.Param)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"checkpoint.init_from='{missing}' does not exist"):
        restore_params(missing, abstract_params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        restore_params(str(tmp_path / "empty"), abstract_params)
    cfg = saved_run(tmp_path, 1)
    wider = nnx.state(nnx.eval_shape(lambda: TinyLM(24, rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.raises(ValueError, match=r"embed_VD has shape \(32, 16\) .* but \(32, 24\)"):
        restore_params(cfg.run_dir, wider)


def test_preemption_guard_catches_sigterm_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.requested and guard.signal == signal.SIGTERM
        assert guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_guard_second_sigint_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with PreemptionGuard() as guard:
            signal.raise_signal(signal.SIGINT)
            assert guard.requested and guard.signal == signal.SIGINT
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_restore_params_accepts_relative_paths(tmp_path, monkeypatch):
    """A run dir given relative to the working directory restores like an absolute one."""
    import jax.numpy as jnp

    from transformer.checkpoint import Checkpointer, restore_params
    from transformer.config import CheckpointConfig, Config

    monkeypatch.chdir(tmp_path)
    cfg = Config(run_dir="relative_run")
    state = {"model": {"w": jnp.arange(6.0).reshape(2, 3)}}
    with Checkpointer("relative_run", CheckpointConfig(async_save=False), config=cfg) as ckpt:
        assert ckpt.maybe_save(1, state, force=True)
    abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    restored = restore_params("relative_run", abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
