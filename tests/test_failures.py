"""Failure paths end in one line and a defined exit code: a torn metrics line, a full disk, preemption (and the
launch scripts acting on its exit code), a lost peer process, bad .npy token ids, NaN or negative floats in the
config, and a run_dir that cannot hold a run."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from transformer import checkpoint, distributed, metrics, train
from transformer.config import ConfigError, DataConfig
from transformer.data import make_dataset

from processes import REPO, cpu_env, free_port
from test_train import checkpoint_dirs, tiny_args

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
PREEMPTED = distributed.PREEMPTED_EXIT_CODE


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------- metrics.jsonl cut mid-write


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / metrics.METRICS_FILE
    records = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    path.write_text("\n".join(records) + "\n" + records[-1].replace("3", "4")[:9])  # '{"step": ' of step 4
    with pytest.warns(UserWarning, match=f"{path}: dropping line 4, not a JSON record"):
        assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
    with pytest.warns(UserWarning, match="dropping line 4"):
        writer = metrics.MetricsWriter(str(tmp_path), start_step=3)
    with writer:
        writer.write(4, {"loss": 0.25})
    assert path.read_text().splitlines() == records + ['{"step": 4, "loss": 0.25}']


def test_resume_after_a_kill_mid_write_rewrites_the_torn_record(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "steps=4", "checkpoint.every_steps=2")
    assert train.main(args) == 0
    path = run_dir / metrics.METRICS_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:len(lines[3]) // 2])  # killed while writing step 4
    shutil.rmtree(run_dir / "checkpoints" / "4")  # ... before its checkpoint was saved
    with pytest.warns(UserWarning, match="dropping line 4, not a JSON record"):
        assert train.main(args) == 0
    assert [r["step"] for r in metrics.read_metrics(str(run_dir))] == [1, 2, 3, 4]


# ---------------------------------------------------------------- a full disk during an asynchronous save


def test_full_disk_stops_training_at_once_with_one_line_and_earlier_checkpoints_intact(tmp_path, monkeypatch,
                                                                                       capsys):
    """The save of step 4 fails in orbax's background thread (ENOSPC while writing its `meta` item)."""
    save = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, item, directory):
        if item.get("step") == 4 and "versions" in item:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await save(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "steps=12", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
                     "checkpoint.async_save=true")
    assert train.main(args) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith("stopped: checkpoint 4 could not be saved (OSError: [Errno 28] No space left on device")
    assert err.endswith("the earlier checkpoints are intact (newest: 2)")
    assert max(r["step"] for r in metrics.read_metrics(str(run_dir))) <= 6  # not a whole interval later
    assert checkpoint_dirs(run_dir) == [2]  # keep_last=1 did not delete it for the failed 4
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save)
    with pytest.warns(checkpoint.CheckpointWarning, match="moved skipped checkpoint .*4.orbax-checkpoint-tmp"):
        assert train.main(args) == 0  # the rerun resumes from 2 and sets the partial save aside
    assert checkpoint_dirs(run_dir) == [12]


def test_a_failed_synchronous_save_is_one_line(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir = tmp_path / "run"
    assert train.main(tiny_args(run_dir, "steps=2", "checkpoint.every_steps=1")) == 0
    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    assert train.main(tiny_args(run_dir, "steps=4", "checkpoint.every_steps=1")) == 1
    assert one_line(capsys.readouterr().err) == (
        "stopped: checkpoint 3 could not be saved (OSError: [Errno 28] No space left on device); the earlier "
        "checkpoints are intact (newest: 2)")


# ---------------------------------------------------------------- preemption


def test_preemption_saves_and_exits_with_its_own_code(tmp_path, monkeypatch, capsys):
    fetch = train.local_batch

    def signalling(data, step, mesh, **kwargs):
        if step == 3 and not kwargs.get("held_out"):
            os.kill(os.getpid(), signal.SIGTERM)
        return fetch(data, step, mesh, **kwargs)

    monkeypatch.setattr(train, "local_batch", signalling)
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(run_dir, "steps=6")) == PREEMPTED == 75
    assert "preempted: saved and stopped" in capsys.readouterr().out
    assert checkpoint_dirs(run_dir) == [3]
    monkeypatch.setattr(train, "local_batch", fetch)
    assert train.main(tiny_args(run_dir, "steps=6")) == 0
    assert checkpoint_dirs(run_dir) == [3, 6]


def fake_command(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_local_sh_passes_the_exit_code_through(tmp_path):
    fake_command(tmp_path, "python", f"exit {PREEMPTED}\n")
    proc = subprocess.run([str(REPO / "launch/local.sh"), "--preset", "tiny"], env={**cpu_env(1),
                          "PYTHON": str(tmp_path / "python")}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == PREEMPTED, proc.stderr


def test_tpu_pod_retries_a_preempted_run_and_stops_when_done(tmp_path):
    """gcloud is a fake: training (`ssh ... --command`) exits 75 the first time, 0 the second."""
    fake_command(tmp_path, "gcloud", f"""
        echo "gcloud $*" >> {tmp_path}/calls
        case "$*" in
          *describe*) echo READY ;;
          *ssh*) n=$(grep -c ' ssh ' {tmp_path}/calls); [[ $n -ge 2 ]] && exit 0 || exit {PREEMPTED} ;;
        esac
    """)
    proc = subprocess.run([str(REPO / "launch/tpu_pod.sh"), "--tpu", "t", "--zone", "z", "--retries", "0",
                           "--retry-wait", "0", "--", "--preset", "tiny"],
                          env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attempt 1 was preempted after saving its state; resuming" in proc.stdout
    assert "tpu_pod.sh: training finished" in proc.stdout
    assert sum(" ssh " in line for line in (tmp_path / "calls").read_text().splitlines()) == 2


def test_tpu_pod_gives_up_after_failures(tmp_path):
    fake_command(tmp_path, "gcloud", """
        case "$*" in
          *describe*) echo READY ;;
          *ssh*) exit 1 ;;
        esac
    """)
    proc = subprocess.run([str(REPO / "launch/tpu_pod.sh"), "--tpu", "t", "--zone", "z", "--retries", "1",
                           "--retry-wait", "0"],
                          env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "giving up after 2 attempts" in proc.stderr


@pytest.mark.parametrize("code, requeued", [(PREEMPTED, True), (0, False), (1, False)])
def test_slurm_requeues_a_preempted_job(tmp_path, code, requeued):
    fake_command(tmp_path, "srun", f"exit {code}\n")
    fake_command(tmp_path, "scontrol", f'echo "$*" >> {tmp_path}/scontrol.log\n')
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_SUBMIT_DIR": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--preset", "tiny"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    log = tmp_path / "scontrol.log"
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == (["requeue 123"] if requeued else [])


WAIT_FOR_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit({code}))
print("ready", flush=True)
time.sleep(60)
"""


def test_local_multiprocess_passes_preemption_on_and_through(tmp_path):
    """SIGTERM to the launcher reaches every process; they exit 75 (as train does after saving) and so does it."""
    (tmp_path / "waits.py").write_text(WAIT_FOR_SIGTERM.format(code=PREEMPTED))
    proc = subprocess.Popen([sys.executable, str(REPO / "launch/local_multiprocess.py"), "-n", "2", "--module",
                             "waits"], env=cpu_env(1, PYTHONPATH=str(tmp_path)), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while seen.count("ready") < 2 and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED, seen + out + err
    assert "stopping the others" not in err


# ---------------------------------------------------------------- a lost peer process


@pytest.mark.slow
def test_a_killed_peer_ends_the_survivor_with_one_line(tmp_path):
    """Two `transformer.train` processes (4 CPU devices each); process 1 is killed mid-run. Process 0 exits with
    PEER_LOST_EXIT_CODE and one line, well before jax's own heartbeat timeout, without a stack trace."""
    run_dir = tmp_path / "run"
    args = [str(REPO / "tests/test_resume.py"), "slow-train", *tiny_args(run_dir, "steps=500", "mesh.data=-1",
                                                                          "checkpoint.every_steps=0")]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cpu_env(4, TRANSFORMER_COORDINATOR=f"127.0.0.1:{port}",
                                                     TRANSFORMER_NUM_PROCESSES="2", TRANSFORMER_PROCESS_ID=str(rank),
                                                     TRANSFORMER_PEER_TIMEOUT="10"))
             for rank in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / metrics.METRICS_FILE).exists() or len(metrics.read_metrics(str(run_dir))) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
            time.sleep(0.2)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == distributed.PEER_LOST_EXIT_CODE == 69, err[-3000:]
    assert waited < 30
    lines = [line for line in err.splitlines() if line.startswith("transformer.distributed:")]
    assert len(lines) == 1 and lines[0].startswith("transformer.distributed: process 0 of 2 stops: "), err[-3000:]
    assert "Traceback" not in err and "stack trace" not in err, err[-3000:]


# ---------------------------------------------------------------- bad input


def test_npy_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.arange(300, dtype=np.int32) % 100)
    cfg = DataConfig(dataset="npy", paths=(str(good),), seq_len=8, global_batch_size=2, eval_fraction=0.1)
    assert make_dataset(cfg, vocab_size=100).batch(0)["inputs_BL"].max() < 100
    too_large, negative = tmp_path / "large.npy", tmp_path / "negative.npy"
    ids = np.arange(300, dtype=np.int32) % 100
    ids[123] = 100
    np.save(too_large, ids)
    ids[123], ids[200] = 5, -1
    np.save(negative, ids)
    for path, bad, position in [(too_large, 100, 123), (negative, -1, 200)]:
        with pytest.raises(ConfigError) as error:
            make_dataset(DataConfig(dataset="npy", paths=(str(good), str(path)), seq_len=8), vocab_size=100)
        assert str(error.value) == (f"data.paths entry {str(path)!r} holds token id {bad} at position {position}, "
                                    "outside model.vocab_size=100 (valid ids: 0 to 99)")
    np.save(tmp_path / "bytes.npy", np.full(300, 255, np.uint8))  # every uint8 id is below 256
    make_dataset(DataConfig(dataset="npy", paths=(str(tmp_path / "bytes.npy"),), seq_len=8), vocab_size=256)


def test_train_refuses_bad_npy_ids_in_one_line(tmp_path, capsys):
    path = tmp_path / "tokens.npy"
    np.save(path, np.r_[np.arange(500) % 259, 300].astype(np.uint16))
    assert train.main(tiny_args(tmp_path / "run", "data.dataset=npy", f"data.paths={path}")) == 2
    assert one_line(capsys.readouterr().err) == (
        f"config error: data.paths entry {str(path)!r} holds token id 300 at position 500, outside "
        "model.vocab_size=259 (valid ids: 0 to 258)")


@pytest.mark.parametrize("override, message", [
    ("optim.eps=nan", "optim.eps=nan must be a finite number"),
    ("optim.eps=-1e-8", "optim.eps=-1e-08 must be > 0 (the AdamW denominator's epsilon)"),
    ("optim.eps=0", "optim.eps=0.0 must be > 0 (the AdamW denominator's epsilon)"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.b2=nan", "optim.b2=nan must be a finite number"),
    ("model.norm_eps=nan", "model.norm_eps=nan must be a finite number"),
    ("model.rope_theta=-inf", "model.rope_theta=-inf must be a finite number"),
    ("model.moe.load_balance_coef=nan", "moe.load_balance_coef=nan must be a finite number"),
    ("data.eval_fraction=nan", "data.eval_fraction=nan must be a finite number"),
    ("checkpoint.every_seconds=nan", "checkpoint.every_seconds=nan must be a finite number"),
])
def test_non_finite_or_negative_floats_are_one_config_error(override, message, tmp_path, capsys):
    assert train.main([*tiny_args(tmp_path / "run"), override]) == 2
    assert one_line(capsys.readouterr().err) == f"config error: {message}"


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    assert train.main(tiny_args(run_dir)) == 2
    assert one_line(capsys.readouterr().err) == (
        f"config error: run_dir={str(run_dir)!r} is a file, not a directory; give a writable directory (it is "
        "created if missing)")
    assert train.main(tiny_args(run_dir / "below")) == 2
    assert one_line(capsys.readouterr().err) == (
        f"config error: run_dir={str(run_dir / 'below')!r} cannot be written (Not a directory); give a writable "
        "directory (it is created if missing)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_run_dir_without_write_permission_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert train.main(tiny_args(locked / "run")) == 2
    assert one_line(capsys.readouterr().err) == (
        f"config error: run_dir={str(locked / 'run')!r} cannot be written (Permission denied); give a writable "
        "directory (it is created if missing)")


def test_run_dir_on_a_read_only_mount_is_one_line(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, "NamedTemporaryFile", read_only)
    assert train.main(tiny_args(tmp_path / "run")) == 2
    assert one_line(capsys.readouterr().err) == (
        f"config error: run_dir={str(tmp_path / 'run')!r} cannot be written (Read-only file system); give a "
        "writable directory (it is created if missing)")
