"""End-to-end resume: a run killed (SIGKILL) or stopped (SIGTERM) and restarted gives the same
loss trace and final state, bitwise on CPU, as an uninterrupted run (killed runs of every model
architecture, each on its objective's batches, and of a LoRA fine-tune whose checkpoints hold only the adapters
and which reloads its frozen base from checkpoint.init_from); checkpoints written by 2 processes restore into 1.
Every test here starts training subprocesses (tens of seconds of compilation each), so all are
marked slow: run them with `-m slow`.

`python tests/test_resume.py save2 RUN_DIR` is the worker of the 2-process checkpointer test;
`python tests/test_resume.py slow-train ARGS...` runs transformer.train with a short sleep before
each batch (same numerics) so a test can interrupt it at a chosen step.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from processes import REPO, cpu_env, run_two_processes

TESTS = Path(__file__).resolve().parent
STEPS = 30
TRAIN_ARGS = ["--preset", "tiny", f"steps={STEPS}", "checkpoint.every_steps=5", "checkpoint.keep_last=10",
              "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
              "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.router=sigmoid_bias",
              "data.seq_len=32", "data.global_batch_size=4", "optim.warmup_steps=5",
              "log_every=1", "eval_every=0", "progress_bar=false", "tensorboard=false"]
TIMING_KEYS = ("tokens_per_second", "mfu", "time/")  # keys and key prefixes
ARCHITECTURE_ARGS = {  # what each architecture adds to TRAIN_ARGS (MLM and span corruption need ids above the bytes)
    "decoder": (),
    "encoder": ("model.architecture=encoder", "model.vocab_size=320"),
    "encoder_decoder": ("model.architecture=encoder_decoder", "model.vocab_size=320", "model.num_encoder_layers=1"),
    "lora": ("lora.rank=2", "lora.alpha=4", "lora.targets=attention,mlp", "lora.dropout=0.1"),  # + init_from a base
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Child processes share compiled steps (same executables, so the same numerics)."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


def train_command(run_dir: Path, *extra: str, slow: bool = False) -> list[str]:
    entry = [str(Path(__file__)), "slow-train"] if slow else ["-m", "transformer.train"]
    return [sys.executable, *entry, *TRAIN_ARGS, f"run_dir={run_dir}", *extra]


def run_train(run_dir: Path, *extra: str, devices: int = 2, timeout: float = 300) -> str:
    proc = subprocess.run(train_command(run_dir, *extra), cwd=REPO, env=cpu_env(devices), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """The logged metrics per step (a later record for a step replaces an earlier one), timings dropped."""
    records = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        records[record["step"]] = {k: v for k, v in record.items() if not k.startswith(TIMING_KEYS)}
    return records


def raw_records(run_dir: Path) -> dict[int, str]:
    """metrics.jsonl lines by step, timings included (they differ whenever a step is run again)."""
    return {json.loads(line)["step"]: line for line in (run_dir / "metrics.jsonl").read_text().splitlines()}


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def checkpoint_state(run_dir: Path, step: int) -> dict:
    """The full saved state of checkpoint `step` as host numpy arrays (PRNG keys as key data)."""
    import jax
    import orbax.checkpoint as ocp

    path = run_dir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    as_numpy = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                                    else x)
    return jax.tree.map(as_numpy, tree)


def assert_states_equal(a: dict, b: dict, *, rtol: float = 0.0):
    import jax

    flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert flat_a.keys() == flat_b.keys()
    assert any("router_bias" in jax.tree_util.keystr(path) for path in flat_a), "no MoE router biases in the state"
    for path, x in flat_a.items():
        name = jax.tree_util.keystr(path)
        if rtol:
            np.testing.assert_allclose(x, flat_b[path], rtol=rtol, atol=1e-6, err_msg=name)
        else:
            assert x.dtype == flat_b[path].dtype, name
            np.testing.assert_array_equal(x.view(np.uint8) if x.ndim else x, flat_b[path].view(np.uint8)
                                          if x.ndim else flat_b[path], err_msg=name)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> int:
    """Block until metrics.jsonl shows `step` and the first checkpoint is committed (returns the
    latest logged step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = metrics_by_step(run_dir)
        if logged and max(logged) >= step and (run_dir / "checkpoints" / "5" / "commit_success.txt").exists():
            return max(logged)
        assert proc.poll() is None, f"training exited early with {proc.returncode}: {proc.stdout.read()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """`references(architecture)`: (an uninterrupted run of STEPS steps of that architecture, the arguments it
    adds to TRAIN_ARGS), run when first asked for. "lora" fine-tunes a 4-step base run."""
    runs = {}

    def reference(architecture: str) -> tuple[Path, tuple[str, ...]]:
        if architecture not in runs:
            extra = ARCHITECTURE_ARGS[architecture]
            if architecture == "lora":
                base = tmp_path_factory.mktemp("lora_base") / "run"
                run_train(base, "steps=4")
                extra = (*extra, f"checkpoint.init_from={base}")
            run_dir = tmp_path_factory.mktemp(f"reference_{architecture}") / "run"
            run_train(run_dir, *extra)
            assert sorted(metrics_by_step(run_dir)) == list(range(1, STEPS + 1))
            runs[architecture] = run_dir, extra
        return runs[architecture]

    return reference


@pytest.fixture(scope="module")
def reference(references) -> Path:
    return references("decoder")[0]


def assert_same_as_reference(run_dir: Path, reference: Path):
    got, want = metrics_by_step(run_dir), metrics_by_step(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == want[step], f"step {step}: {got[step]} != {want[step]}"
    final = checkpoint_state(reference, STEPS)
    assert_states_equal(checkpoint_state(run_dir, STEPS), final)
    biases = [x for path, x in jax_leaves_with_names(final) if "router_bias" in path]
    assert biases and any(np.any(b != 0) for b in biases), "router biases never moved; resume of them is untested"


def resume_and_compare(run_dir: Path, reference: Path, saved_step: int, context: str, *extra: str) -> None:
    """Rerun the interrupted run (its TRAIN_ARGS + `extra`): it ends equal to the reference, and the records of
    steps up to the checkpoint it resumed from are untouched (a restart from scratch would rewrite their
    timings)."""
    raw_before = raw_records(run_dir)
    run_train(run_dir, *extra)
    assert_same_as_reference(run_dir, reference)
    raw_after = raw_records(run_dir)
    assert all(raw_after[step] == raw_before[step] for step in range(1, saved_step + 1)), \
        f"{context}, newest checkpoint {saved_step}"


def jax_leaves_with_names(tree) -> list[tuple[str, np.ndarray]]:
    import jax

    return [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURE_ARGS)
def test_killed_run_resumes_bitwise(tmp_path, references, architecture):
    reference, extra = references(architecture)
    run_dir = tmp_path / "run"
    kill_at = random.randrange(6, STEPS - 3)
    proc = subprocess.Popen(train_command(run_dir, *extra, slow=True), cwd=REPO, env=cpu_env(2), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        killed_after = wait_for_step(proc, run_dir, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = metrics_by_step(run_dir)
    want = metrics_by_step(reference)
    assert all(before[step] == want[step] for step in before), f"killed after step {killed_after}"
    assert killed_after < STEPS
    resume_from = committed_steps(run_dir)[-1]
    resume_and_compare(run_dir, reference, resume_from, f"killed after step {killed_after}", *extra)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(run_dir, slow=True), cwd=REPO, env=cpu_env(2), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_step(proc, run_dir, 7)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]  # distributed.PREEMPTED_EXIT_CODE: saved, rerun to continue
    assert "preempted" in output
    stopped_at = max(metrics_by_step(run_dir))
    assert 7 <= stopped_at < STEPS
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped_at and (run_dir / "checkpoints" / str(stopped_at) / "commit_success.txt").exists()
    assert not list((run_dir / "checkpoints").glob("*tmp*"))
    resume_and_compare(run_dir, reference, stopped_at, "stopped by SIGTERM")


@pytest.mark.slow
def test_two_process_run_resumes_in_one_process(tmp_path):
    """A 2-process run (4 CPU devices each) restored into 1 process on 2 devices continues the same
    trajectory (close, not bitwise: the reductions run over a different device layout)."""
    two = tmp_path / "two"
    extra = ["steps=10", "data.global_batch_size=8"]
    run_two_processes(train_command(two, *extra)[1:], timeout=400)
    one = tmp_path / "one"
    shutil.copytree(two, one)
    shutil.move(one / "checkpoints" / "10", tmp_path / "moved_10")
    output = run_train(one, *extra, "progress_bar=true", devices=2)
    assert "train (checkpoint)" in output  # resumed (the progress bar names where the state came from)
    got, want = metrics_by_step(one), metrics_by_step(two)
    assert sorted(got) == list(range(1, 11))
    for step in range(6, 11):
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-4, err_msg=f"step {step}")
    assert_states_equal(checkpoint_state(one, 10), checkpoint_state(two, 10), rtol=1e-3)


# ---------------------------------------------------------------- checkpointer across process counts


def _save_from_two_processes(run_dir: str) -> None:
    """Worker: each of 2 processes (4 CPU devices each) saves its shards of one 8-device state."""
    from transformer import distributed

    info = distributed.initialize()
    assert info.process_count == 2
    import jax

    sys.path.insert(0, str(TESTS))
    from test_checkpoint import abstract_state, checkpointer, make_config, trained_state
    from transformer import sharding
    from transformer.checkpoint import PreemptionGuard
    from transformer.config import MeshConfig

    local = trained_state(2)
    abstract = abstract_state(sharding.make_mesh(MeshConfig(data=1, fsdp=-1)))

    def to_global(value, target):
        is_key = jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        host = np.asarray(jax.random.key_data(value) if is_key else value)
        sharding = target.sharding
        if is_key:
            spec = jax.sharding.PartitionSpec(*sharding.spec, None)
            sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
        array = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.random.wrap_key_data(array, impl=jax.random.key_impl(value)) if is_key else array

    state = jax.tree.map(to_global, local, abstract)
    assert not state["model"]["w_DF"].get_value().is_fully_addressable
    cfg = make_config(Path(run_dir).parent, every_steps=1, async_save=True)
    with checkpointer(cfg) as ckpt:
        assert ckpt.maybe_save(2, state)
        guard = PreemptionGuard()
        guard.requested = jax.process_index() == 1  # a signal that reached one process only
        assert guard.should_stop()  # ... stops every process at the same step
        assert ckpt.maybe_save(3, state, force=True)
    restored, step = checkpointer(cfg).restore_latest(abstract)
    assert step == 3
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    distributed.shutdown()


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(tmp_path):
    run_dir = tmp_path / "run"
    run_two_processes([str(Path(__file__)), "save2", str(run_dir)], timeout=240)
    step_dir = run_dir / "checkpoints" / "3"
    assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                                       "ocdbt.process_1"]
    from test_checkpoint import abstract_state, assert_bitwise_equal, checkpointer, make_config, mesh_of, \
        trained_state

    cfg = make_config(tmp_path, every_steps=1)
    for num_devices in (8, 1):
        with checkpointer(cfg) as ckpt:
            restored, step = ckpt.restore_latest(abstract_state(mesh_of(num_devices)))
        assert step == 3
        assert_bitwise_equal(restored, trained_state(2))


def _slow_train(argv: list[str]) -> int:
    """transformer.train.main with a 0.2 s pause before each batch is fetched (numerics unchanged)."""
    from transformer import train

    fetch = train.local_batch

    def slow_fetch(*args, **kwargs):
        time.sleep(0.2)
        return fetch(*args, **kwargs)

    train.local_batch = slow_fetch
    return train.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "save2":
        _save_from_two_processes(sys.argv[2])
    elif sys.argv[1] == "slow-train":
        sys.exit(_slow_train(sys.argv[2:]))
