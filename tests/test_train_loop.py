"""The training loop: step N + 1 is dispatched before step N's metrics are read, with the same run as the
synchronous loop (loss trace, metrics, checkpoints, NaN guard, SIGTERM); the step-time breakdown names what
bounds a run; profile_steps writes a trace of those steps; the persistent compilation cache.

The runs use test_train's tiny config (its programs compile once per session), except the slow tests, whose
programs are new: a step with extra matmuls, and compilations into an empty cache.
"""

import gzip
import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import metrics, train
from transformer.config import ConfigError, config_from_args

from test_train import STEPS, assert_trees_equal, checkpoint_dirs, saved_state, tiny_args, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
TIME_KEYS = ("tokens_per_second", "time/")


def record_calls(monkeypatch) -> list[tuple[str, int]]:
    """("dispatch", step) for each call of the jitted train step and ("read", step) for each read of a step's
    metrics, in call order."""
    calls = []
    jit_step, finish = train.jit_train_step, train.Loop.finish

    def recording_jit(cfg, shardings):
        step_fn = jit_step(cfg, shardings)

        def dispatch(graphdef, state, batch):
            outputs = step_fn(graphdef, state, batch)
            calls.append(("dispatch", sum(kind == "dispatch" for kind, _ in calls) + 1))
            return outputs
        return dispatch

    def recording_finish(self, pending, *args, **kwargs):
        calls.append(("read", pending.step))
        return finish(self, pending, *args, **kwargs)

    monkeypatch.setattr(train, "jit_train_step", recording_jit)
    monkeypatch.setattr(train.Loop, "finish", recording_finish)
    return calls


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.startswith(TIME_KEYS)} for record in records]


# ---------------------------------------------------------------- asynchronous, and the same run as synchronous


@pytest.mark.parametrize("synchronous", [False, True])
def test_step_n_plus_1_is_dispatched_before_step_n_is_read(tmp_path, monkeypatch, synchronous):
    calls = record_calls(monkeypatch)
    train.train(tiny_config(tmp_path / "run", "eval_every=8", f"synchronous={synchronous}"))
    want = []
    read_first = set(range(1, STEPS + 1)) if synchronous else {8, 16, STEPS}  # evals and the last step
    for step in range(1, STEPS + 1):
        want.append(("dispatch", step))
        if step - 1 not in read_first | {0}:
            want.append(("read", step - 1))  # one step behind
        if step in read_first:
            want.append(("read", step))  # before the next dispatch donates this step's state
    assert calls == want


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """The same run with the asynchronous and the synchronous loop: eval every 4 steps, checkpoints every 5."""
    root = tmp_path_factory.mktemp("loops")
    extra = ("eval_every=4", "checkpoint.every_steps=5", "checkpoint.keep_last=10")
    return {mode: (root / mode, train.train(tiny_config(root / mode, *extra, f"synchronous={mode == 'sync'}")))
            for mode in ("async", "sync")}


def test_asynchronous_loop_gives_the_synchronous_run_bitwise(loop_runs):
    (async_dir, async_run), (sync_dir, sync_run) = loop_runs["async"], loop_runs["sync"]
    assert async_run["losses"] == sync_run["losses"] and len(set(async_run["losses"])) == STEPS
    assert async_run["eval_loss"] == sync_run["eval_loss"] is not None
    async_records, sync_records = metrics.read_metrics(str(async_dir)), metrics.read_metrics(str(sync_dir))
    assert [r["step"] for r in async_records] == list(range(1, STEPS + 1))
    assert without_times(async_records) == without_times(sync_records)
    assert sum("eval_loss" in r for r in async_records) == STEPS // 4
    assert checkpoint_dirs(async_dir) == checkpoint_dirs(sync_dir) == [5, 10, 15, 20]
    for step in (5, 20):
        assert_trees_equal(saved_state(async_dir, step), saved_state(sync_dir, step))


def test_sigterm_saves_the_step_in_flight_and_stops(loop_runs, tmp_path, monkeypatch):
    fetch = train.local_batch

    def signalling(data, step, mesh, **kwargs):
        if step == 5 and not kwargs.get("held_out"):  # while step 5 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return fetch(data, step, mesh, **kwargs)

    monkeypatch.setattr(train, "local_batch", signalling)
    run_dir = tmp_path / "run"
    summary = train.train(tiny_config(run_dir))
    assert summary["preempted"] and summary["step"] == 5
    assert summary["losses"] == loop_runs["sync"][1]["losses"][:5]
    assert checkpoint_dirs(run_dir) == [5] and metrics.read_metrics(str(run_dir))[-1]["step"] == 5
    assert_trees_equal(saved_state(run_dir, 5), saved_state(loop_runs["sync"][0], 5))


def test_nan_guard_one_step_behind_names_the_first_bad_step_and_never_saves_after_it(tmp_path, monkeypatch, capsys):
    """Step 3 is non-finite; step 4 (a checkpoint step) is dispatched before step 3 is read, and is not saved."""
    fetch = train.local_batch

    def poisoned(data, step, mesh, **kwargs):
        batch = fetch(data, step, mesh, **kwargs)
        if step == 2 and not kwargs.get("held_out"):
            batch["loss_mask_BL"][0, 0] = np.nan
        return batch

    monkeypatch.setattr(train, "local_batch", poisoned)
    calls = record_calls(monkeypatch)
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(run_dir, "checkpoint.every_steps=2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped: step 3: non-finite loss nan")
    assert "last checkpoint: 2" in err[0]
    assert calls[-2:] == [("dispatch", 4), ("read", 3)]
    assert checkpoint_dirs(run_dir) == [2]
    assert [r["step"] for r in metrics.read_metrics(str(run_dir))] == [1, 2]


# ---------------------------------------------------------------- step-time breakdown


@pytest.mark.slow  # keeps the default suite under 15 minutes; the breakdown itself is checked by the other loop tests
def test_breakdown_shows_a_slow_input_pipeline(tmp_path, monkeypatch):
    fetch = train.local_batch

    def slow(data, step, mesh, **kwargs):
        time.sleep(0.2)
        return fetch(data, step, mesh, **kwargs)

    monkeypatch.setattr(train, "local_batch", slow)
    run_dir = tmp_path / "run"
    summary = train.train(tiny_config(run_dir, "log_every=10"))
    first, last = metrics.read_metrics(str(run_dir))
    assert summary["first_step_seconds"] > 0 and first["time/first_step"] == summary["first_step_seconds"]
    assert "time/first_step" not in last
    parts = ("time/data", "time/wait", "time/checkpoint", "time/eval", "time/host")
    assert sum(first[k] for k in parts) == pytest.approx(first["time/step"])
    assert first["time/data"] >= 0.2 and first["time/data"] / first["time/step"] > 0.7  # batches 1-10 fetched
    assert first["time/host_fraction"] > 0.8 and first["time/wait"] < 0.05
    assert first["tokens_per_second"] == pytest.approx(8 * 32 / first["time/step"], rel=1e-6)


def slow_device_step(matmuls: int):
    """make_train_step whose step also runs `matmuls` 512 x 512 matmuls, replicated on every device, after the
    loss is known (a `heavy` metric)."""
    make = train.make_train_step

    def make_slow(cfg):
        step_fn = make(cfg)

        def slow(graphdef, state, batch):
            state, step_metrics = step_fn(graphdef, state, batch)
            x = jnp.full((512, 512), step_metrics["loss"]) / 512
            step_metrics["heavy"] = jax.lax.fori_loop(0, matmuls, lambda i, x: jnp.tanh(x @ x), x).sum()
            return state, step_metrics
        return slow
    return make_slow


@pytest.mark.slow
def test_slow_device_step_hides_the_host_work_and_shows_as_device_time(tmp_path, monkeypatch):
    """A device-bound step and 0.1 s of logging per step: the asynchronous loop logs while the device runs the next
    step, the synchronous one adds the logging to every step."""
    monkeypatch.setattr(train, "make_train_step", slow_device_step(16))
    write = metrics.MetricsWriter.write

    def slow_write(self, step, record):
        time.sleep(0.1)
        return write(self, step, record)

    monkeypatch.setattr(metrics.MetricsWriter, "write", slow_write)
    means = {}
    for mode in ("async", "sync"):
        train.train(tiny_config(tmp_path / mode, "steps=10", f"synchronous={mode == 'sync'}"))
        records = metrics.read_metrics(str(tmp_path / mode))[3:-1]  # steps 4-9
        means[mode] = {key: np.mean([r[key] for r in records if key in r])
                       for key in ("time/step", "time/device")}
    fast, slow = means["async"], means["sync"]
    assert fast["time/device"] > 0.15
    assert fast["time/step"] == pytest.approx(fast["time/device"], rel=0.25)
    assert slow["time/step"] > slow["time/device"] + 0.08
    assert fast["time/step"] < slow["time/step"] - 0.05, means


# ---------------------------------------------------------------- profiler


@pytest.mark.slow  # keeps the default suite under 15 minutes; the profiler is jax's
def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
    run_dir = tmp_path / "run"
    train.train(tiny_config(run_dir, "profile_steps=2,4"))
    (session,) = (run_dir / train.PROFILE_DIR / "plugins" / "profile").iterdir()
    assert list(session.glob("*.xplane.pb"))  # TensorBoard's profile plugin
    (trace,) = session.glob("perfetto_trace.json.gz")  # Perfetto (ui.perfetto.dev)
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [3, 4]
    executions = [e for e in events if e.get("name", "").startswith("CommonPjRtLoadedExecutable::Execute")
                  and e.get("args", {}).get("name") == "jit_train_step" and "num_partitions" in e["args"]]
    assert len(executions) == 2
    assert {"data", "wait"} <= {e.get("name") for e in events}


@pytest.mark.parametrize("value", ["4,2", "3", "-1,2", "2,2", "0,21"])
def test_bad_profile_steps_is_one_clear_error(value, tmp_path):
    with pytest.raises(ConfigError, match=rf"profile_steps={value} must be START,END with 0 <= START < END <= "
                                          rf"steps={STEPS}"):
        config_from_args(tiny_args(tmp_path, f"profile_steps={value}"))


# ---------------------------------------------------------------- compilation cache


@pytest.fixture
def own_cache(monkeypatch):
    """JAX without a compilation cache directory (as in a fresh process); the session's comes back afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setattr(train, "_cache_dir_of_train", None)
    jax.config.update("jax_compilation_cache_dir", None)
    train.compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    train.compilation_cache.reset_cache()


def test_cache_dir_is_under_the_run_dir_or_given_and_an_outside_setting_wins(own_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert train.use_compilation_cache(tiny_config(tmp_path / "run")) == str(tmp_path / "run" / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "run" / "jax_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    shared = tiny_config(tmp_path / "run", "compilation_cache_dir=~/cache")
    assert train.use_compilation_cache(shared) == str(tmp_path / "home" / "cache")
    assert train.use_compilation_cache(tiny_config(tmp_path / "run", "compilation_cache_dir=")) is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "outside"))  # e.g. JAX_COMPILATION_CACHE_DIR
    assert train.use_compilation_cache(shared) == str(tmp_path / "outside")


def cache_keys(cache_dir, program: str = "jit_train_step") -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.name.startswith(program + "-")}


@pytest.mark.slow
def test_resume_reuses_compiled_steps_and_a_changed_config_compiles_its_own(own_cache, tmp_path):
    cache = tmp_path / "cache"
    hits = []

    def count_hits(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    args = ("steps=4", "checkpoint.every_steps=2", f"compilation_cache_dir={cache}")
    fresh = train.train(tiny_config(tmp_path / "a", *args))
    (key,) = cache_keys(cache)
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "4")  # as if stopped after step 2: resume the same config
    jax.monitoring.register_event_listener(count_hits)
    try:
        resumed = train.train(tiny_config(tmp_path / "a", *args))
    finally:
        jax.monitoring.unregister_event_listener(count_hits)
    assert resumed["origin"] == "checkpoint" and resumed["start_step"] == 2
    assert resumed["losses"] == fresh["losses"][2:]
    assert hits and cache_keys(cache) == {key}
    assert resumed["first_step_seconds"] < fresh["first_step_seconds"]
    print(f"first step: fresh {fresh['first_step_seconds']:.1f} s, resumed {resumed['first_step_seconds']:.1f} s")
    train.train(tiny_config(tmp_path / "b", *args, "optim.lr=2e-2"))  # only a constant of the program differs
    assert len(cache_keys(cache)) == 2 and key in cache_keys(cache)
