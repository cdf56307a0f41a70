"""transformer.distributed: mode selection, SLURM GPU assignment, errors, the peer timeout,
ahead-of-time compilation for a target mesh (transformer.aot), and a 2-process x 4-device run
that must match 1 process x 8 devices step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from flax import nnx

from transformer import aot, distributed, sharding
from transformer.config import Config, DataConfig, MeshConfig, ModelConfig
from transformer.train import abstract_train_state

from processes import REPO, cpu_env, free_port, run_two_processes


# ---------------------------------------------------------------- in-process behaviour


def test_single_process_is_a_no_op_and_idempotent(monkeypatch):
    monkeypatch.setattr(distributed, "_info", None)
    for name in (distributed.ENV_MODE, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    info = distributed.initialize()
    assert (info.mode, info.process_index, info.process_count) == ("single", 0, 1)
    assert distributed.initialize("local", num_processes=4, process_id=9) is info


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(mode="mpi"), {}, r"distributed mode 'mpi' .* choose one of auto, single, local, slurm, tpu"),
    (dict(), {"TRANSFORMER_DISTRIBUTED": "ray"}, r"distributed mode 'ray'"),
    (dict(mode="local"), {}, r"needs num_processes >= 1 .*TRANSFORMER_NUM_PROCESSES.*got None"),
    (dict(num_processes=2, process_id=2), {}, r"needs process_id in \[0, 2\) .* got 2"),
    (dict(), {"TRANSFORMER_NUM_PROCESSES": "two"}, r"\$TRANSFORMER_NUM_PROCESSES='two' must be an integer"),
    (dict(num_processes=2, process_id=0, coordinator_address="localhost"), {},
     r"coordinator address 'localhost' must look like host:port"),
    (dict(num_processes=2, process_id=0, initialization_timeout=0), {}, r"initialization_timeout=0 must be > 0"),
])
def test_bad_settings_raise_before_touching_jax(monkeypatch, kwargs, env, message):
    monkeypatch.setattr(distributed, "_info", None)
    for name in (distributed.ENV_MODE, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert distributed._info is None


def test_mode_detection(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("TRANSFORMER_", "SLURM_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    assert distributed._detect_mode(explicit=False) == "single"
    assert distributed._detect_mode(explicit=True) == "local"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[01-02]")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed._detect_mode(explicit=False) == "single"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed._detect_mode(explicit=False) == "slurm"
    monkeypatch.setenv("TRANSFORMER_NUM_PROCESSES", "2")
    assert distributed._detect_mode(explicit=False) == "local"
    for name in ("SLURM_JOB_ID", "TRANSFORMER_NUM_PROCESSES"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert distributed._detect_mode(explicit=False) == "tpu"


@pytest.mark.parametrize("env, expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_LOCALID": "0"},
     [0, 1, 2, 3, 4, 5, 6, 7]),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5"},
     [5]),
    ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "3"}, [0]),
    ({"SLURM_STEP_GPUS": "0,1,2,3", "SLURM_STEP_TASKS_PER_NODE": "2,2", "SLURM_NODEID": "1", "SLURM_LOCALID": "1"},
     [2, 3]),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "2"}, [2]),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "1", "SLURM_LOCALID": "1"}, None),
])
def test_slurm_local_device_ids(env, expected):
    assert distributed.slurm_local_device_ids(env) == expected


def test_slurm_uneven_gpu_split_is_an_error():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_LOCALID": "0"}
    with pytest.raises(ValueError, match="shows 6 GPUs to each of its 4 tasks"):
        distributed.slurm_local_device_ids(env)


# ---------------------------------------------------------------- ahead-of-time compilation


def test_aot_reports_fsdp_sharded_state_and_memory():
    cfg = Config(model=ModelConfig(d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=64, max_seq_len=16,
                                   attention_kernel="reference"), mesh=MeshConfig(data=1, fsdp=8),
                 data=DataConfig(seq_len=16, global_batch_size=8), steps=10).validate()
    report = aot.run(cfg, jax.devices())
    _, abstract, _ = abstract_train_state(cfg, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))
    leaves = jax.tree.leaves(abstract)
    total_state = sum(x.size * x.dtype.itemsize for x in leaves)
    params = sum(x.size for x in jax.tree.leaves(nnx.filter_state(abstract["model"], nnx.Param)))
    assert report.params == params
    # params and both Adam moments are split 8 ways; only scalars (step counts, rng) stay whole
    assert total_state / 8 <= report.state_bytes_per_device < total_state / 8 + 1024
    batch_bytes_per_device = 5 * 1 * 16 * 4  # five (B, L) int32/float32 arrays, one row per device
    assert report.argument_bytes == report.state_bytes_per_device + batch_bytes_per_device
    assert report.alias_bytes == report.state_bytes_per_device  # the state is donated and updated in place
    assert report.temp_bytes > 0 and report.output_bytes > 0
    assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                  + report.temp_bytes)
    assert report.xla_flops_per_device > 0 and report.model_flops_per_step > 0
    text = aot.format_report(report, "cpu")
    assert "temporaries" in text and "fsdp=8" in text and "counted once" in text


@pytest.mark.slow
def test_aot_cli_fakes_the_target_device_count():
    args = ["--preset", "tiny", "model.d_model=32", "model.d_ff=64", "data.seq_len=32", "data.global_batch_size=16",
            "mesh.data=1", "mesh.fsdp=16", "--devices", "16", "--json"]
    env = cpu_env(1)
    del env["XLA_FLAGS"]
    proc = subprocess.run([sys.executable, "-m", "transformer.aot", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 16 and report["mesh"]["fsdp"] == 16
    assert report["argument_bytes"] == report["state_bytes_per_device"] + 5 * 1 * 32 * 4
    assert report["total_bytes"] > report["temp_bytes"] > 0


def test_aot_cli_rejects_a_mesh_larger_than_the_devices(capsys):
    assert aot.main(["--preset", "tiny", "mesh.fsdp=16", "--devices", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aot: mesh") and "needs at least 16 devices but only 8" in err and "\n" not in err
    assert aot.main(["--preset", "tiny", "mesh.tensor=3", "mesh.data=1"]) == 2
    assert capsys.readouterr().err == ("aot: model.num_heads=4 is not divisible by mesh.tensor=3; "
                                       "use a tensor axis that divides 4\n")


# ---------------------------------------------------------------- real processes


def test_missing_peer_times_out_with_one_clear_line():
    script = "from transformer import distributed; distributed.initialize(); print('joined')"
    env = cpu_env(1, TRANSFORMER_COORDINATOR=f"127.0.0.1:{free_port()}", TRANSFORMER_NUM_PROCESSES="2",
                  TRANSFORMER_PROCESS_ID="1", TRANSFORMER_INIT_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == distributed.TIMEOUT_EXIT_CODE, proc.stderr[-2000:]
    assert "joined" not in proc.stdout
    assert "not every process joined within initialization_timeout=2 s (local mode, process 1 of 2" in proc.stderr


TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from transformer import distributed, sharding
    distributed.initialize()
    import jax, numpy as np, optax
    from flax import nnx
    from transformer.config import Config, DataConfig, MeshConfig, ModelConfig
    from transformer.model import build_model

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = Config(model=ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   d_ff=64, max_seq_len=16, attention_kernel="reference"),
                 mesh=MeshConfig(data=2, fsdp=2, tensor=2), data=DataConfig(seq_len=16, global_batch_size=8))
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.validate_for_mesh(cfg, mesh)
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adamw(1e-2)

    def loss_fn(params, rest, batch):
        logits, aux = nnx.merge(graphdef, params, rest)(batch["inputs_BL"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets_BL"]).mean()

    @jax.jit
    def step(params, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    index, count = sharding.process_batch_shard(mesh)
    rows = 8 // count
    losses = []
    with sharding.use_mesh(mesh):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        rest = jax.device_put(rest, sharding.state_shardings(rest, mesh))
        opt_state = optimizer.init(params)
        for i in range(4):
            tokens = np.random.default_rng(i).integers(0, 256, size=(8, 17), dtype=np.int32)
            local = tokens[index * rows:(index + 1) * rows]
            batch = sharding.host_local_batch_to_global({"inputs_BL": local[:, :-1], "targets_BL": local[:, 1:]}, mesh)
            params, opt_state, loss = step(params, opt_state, rest, batch)
            losses.append(float(loss))
    print("LOSSES " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                  "devices": jax.device_count(), "rows": rows, "losses": losses}), flush=True)
""")


def _losses(stdout: str) -> list[dict]:
    return [json.loads(line[len("LOSSES "):]) for line in stdout.splitlines() if line.startswith("LOSSES ")]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    single = subprocess.run([sys.executable, str(script)], env=cpu_env(8), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    (reference,) = _losses(single.stdout)
    assert (reference["count"], reference["devices"], reference["rows"]) == (1, 8, 8)

    outputs = run_two_processes([str(script)], timeout=300, TRANSFORMER_INIT_TIMEOUT="120")
    results = sorted((r for out in outputs for r in _losses(out)), key=lambda r: r["process"])
    assert [(r["process"], r["count"], r["devices"], r["rows"]) for r in results] == [(0, 2, 8, 4), (1, 2, 8, 4)]
    assert results[0]["losses"] == results[1]["losses"]
    assert reference["losses"][-1] < reference["losses"][0]
    for got, want in zip(results[0]["losses"], reference["losses"]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- launchers

TINY_RUN = ("--preset tiny model.d_model=32 model.num_heads=4 model.num_kv_heads=2 model.d_ff=64 data.seq_len=32 "
            "data.global_batch_size=8 steps=3 log_every=1 eval_every=0 checkpoint.every_steps=0 "
            "checkpoint.async_save=false tensorboard=false progress_bar=false mesh.data=2 mesh.fsdp=2 "
            "mesh.tensor=2").split()


def _metric(run_dir: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[name] for r in sorted(records, key=lambda r: r["step"])]


@pytest.mark.slow
def test_launchers_two_processes_train_like_one(tmp_path):
    """launch/local.sh (1 process x 8 fake devices) and launch/local_multiprocess.py (2 x 4) running
    `python -m transformer.train` give the same loss trace."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([str(REPO / "launch/local.sh"), "--fake-devices", "8", *TINY_RUN, f"run_dir={one}"],
                            env={**cpu_env(1), "PYTHON": sys.executable}, cwd=REPO, capture_output=True, text=True,
                            timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, str(REPO / "launch/local_multiprocess.py"), "-n", "2", "--fake-devices",
                            "4", "--", *TINY_RUN, f"run_dir={two}"],
                           env=cpu_env(1), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-2000:]
    assert "[p0] step 3 | loss" in multi.stdout and "[p1]" in multi.stdout
    reference, losses = _metric(one, "loss"), _metric(two, "loss")
    assert len(reference) == len(losses) == 3
    for got, want in zip(losses, reference):
        assert got == pytest.approx(want, rel=1e-5)
    assert _metric(two, "grad_norm") == pytest.approx(_metric(one, "grad_norm"), rel=1e-5)


def test_local_multiprocess_stops_everyone_when_one_fails(tmp_path):
    (tmp_path / "crash_one.py").write_text(textwrap.dedent("""
        import os, time
        from transformer import distributed
        info = distributed.initialize()
        print("joined", info.process_index, flush=True)
        if info.process_index == 1:
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(120)
    """))
    env = cpu_env(1, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, str(REPO / "launch/local_multiprocess.py"), "-n", "2", "--fake-devices",
                           "1", "--grace", "1", "--module", "crash_one"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[p1] RuntimeError: rank 1 failed on purpose" in proc.stdout
    assert "[p0] joined 0" in proc.stdout
    assert "process 1 exited with code 1; stopping the others" in proc.stderr
