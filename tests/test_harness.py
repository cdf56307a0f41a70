"""experiments/harness.py's sweep machinery: sweep config files, run names from the full config, results folders
of subsets and variants, mean ± std over seeds, the manifest, and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

import harness
import moe_routing
import pe_extrapolation
from transformer.config import Config, ConfigError, ModelConfig, apply_overrides


def test_run_name_changes_with_any_override_but_not_with_presentation_fields(tmp_path):
    base = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=2))
    name = lambda cfg, seed=0: Path(harness.sweep_run_config(cfg, "rope", seed, tmp_path).run_dir).name
    first = name(base)
    assert first.startswith("rope-s0-")
    changed = ["steps=100", "model.moe.capacity_factor=2", "optim.lr=1e-4", "data.seq_len=64", "eval_every=7",
               "checkpoint.init_from=runs/other"]
    names = {name(apply_overrides(base, [o])) for o in changed} | {name(base, seed=1)}
    assert len(names) == len(changed) + 1 and first not in names
    same = ["progress_bar=false", "tensorboard=true", "run_dir=elsewhere", "checkpoint.every_steps=3",
            "compilation_cache_dir=/tmp/x", "synchronous=true"]
    assert {name(apply_overrides(base, [o])) for o in same} == {first}
    cfg = harness.sweep_run_config(base, "a + b, c", 2, tmp_path)
    assert (cfg.seed, cfg.data.seed) == (2, 2) and Path(cfg.run_dir).name.startswith("a_b_c-s2-")
    assert cfg.compilation_cache_dir == str((tmp_path / "jax_cache").absolute())


@pytest.mark.parametrize("script, argv, folder", [
    (moe_routing, [], "cpu"),
    (moe_routing, ["--seeds", "3"], "cpu"),  # the preset's own seed count
    (moe_routing, ["--sweep", "experiments/configs/sweeps/moe_cpu.py"], "cpu"),
    (moe_routing, ["--preset", "gpu"], "gpu"),
    (moe_routing, ["steps=100"], "cpu-steps=100-"),
    (moe_routing, ["model.moe.capacity_factor=2"], "cpu-model.moe.capacity_factor=2-"),
    (moe_routing, ["--seeds", "1"], "cpu-seeds=1-"),
    (moe_routing, ["--only", "switch_e8_k1_lb0"], "cpu-only=switch_e8_k1_lb0-"),
    (pe_extrapolation, ["--only", "rope,alibi"], "cpu-only=rope_alibi-"),
    (pe_extrapolation, ["--skip-passkey"], "cpu-"),
])
def test_results_folder_is_the_presets_only_for_its_own_sweep(script, argv, folder):
    results_dir = script.parse_args(argv).results_dir
    root = Path("experiments/results") / script.__name__
    assert results_dir.parent == root
    if folder.endswith("-"):
        assert results_dir.name.startswith(folder) and len(results_dir.name) == len(folder) + 10
    else:
        assert results_dir.name == folder
    assert script.parse_args([*argv, "--results-dir", "mine"]).results_dir == Path("mine")


def test_copied_sweep_file_writes_to_its_own_folder(tmp_path):
    copy = tmp_path / "moe_cpu.py"
    copy.write_text(Path("experiments/configs/sweeps/moe_cpu.py").read_text())
    args = moe_routing.parse_args(["--sweep", str(copy)])
    assert args.results_dir.name.startswith("moe_cpu-") and args.sweep == moe_routing.parse_args([]).sweep


def test_subset_and_override_change_the_sweep():
    full = pe_extrapolation.parse_args([]).sweep
    subset = pe_extrapolation.parse_args(["--only", "alibi,nope", "steps=50"]).sweep
    assert list(subset.encodings) == ["alibi", "nope"] and subset.rope == "" and subset.base.steps == 50
    assert full.base.steps == 400 and len(full.encodings) > 2


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, needle", [
    (None, "no such Python file"),
    ("x = 1\n", "defines no get_config()"),
    ("def get_config():\n    return 3\n", "returned int, not a dict"),
    ("def get_config():\n    return {'base': 1, 'runs': ()}\n", "base is a int, not a Config"),
    ("from transformer.config import Config\ndef get_config():\n    return {'base': Config(), 'rns': ()}\n",
     "unknown field 'rns'"),
    ("from transformer.config import Config\ndef get_config():\n    return {'base': Config()}\n",
     "missing field 'runs'"),
])
def test_bad_sweep_files_fail_with_one_line(tmp_path, text, needle):
    path = str(tmp_path / "missing.py") if text is None else write(tmp_path / "sweep.py", text)
    with pytest.raises(ConfigError, match=needle) as error:
        harness.load_sweep(path, moe_routing.Sweep)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, needle", [
    (["--only", "rope,xpos"], "--only 'xpos' is not an encoding of this sweep"),
    (["--seeds", "0"], "--seeds 0 must be >= 1"),
    (["seed=3"], "use --seeds"),
    (["model.foo=1"], "unknown config field 'model.foo'"),
])
def test_bad_sweep_arguments_fail_before_running(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pe_extrapolation.parse_args(argv)
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_over_seeds_reports_mean_and_sample_std():
    rows = [{"m": "a", "n": 1, "x": 1.0}, {"m": "a", "n": 1, "x": 3.0}, {"m": "b", "n": 1, "x": 5.0},
            {"m": "a", "n": 1, "x": 2.0}]
    a, b = harness.over_seeds(rows, ["m", "n"], ["x"])
    assert (a["m"], a["seeds"], a["x_mean"], a["x_std"], a["x_seeds"]) == ("a", 3, 2.0, 1.0, [1.0, 3.0, 2.0])
    assert b["x_mean"] == 5.0 and math.isnan(b["x_std"])
    assert harness.mean_pm_std([1.0, 3.0, 2.0], ".2f") == "2.00 ± 1.00"
    assert harness.mean_pm_std([5.0], ".2f") == "5.00"


def test_manifest_holds_provenance_configs_and_times(tmp_path):
    sweep = moe_routing.parse_args(["--seeds", "2"]).sweep
    cfg = harness.sweep_run_config(sweep.base, "x", 1, tmp_path)
    job = harness.Job("x", 1, cfg, measure=None)
    path = harness.write_manifest(tmp_path / "results", sweep=sweep, sweep_file="f.py",
                                  finished=[harness.Finished(job, [], 12.34, 0.5, True)], seconds=13.0)
    manifest = json.loads(path.read_text())
    assert manifest["seeds"] == [0, 1] and manifest["sweep_file"] == "f.py" and manifest["wall_seconds"] == 13.0
    assert (manifest["train_seconds"], manifest["measure_seconds"]) == (12.3, 0.5)
    assert manifest["git"]["commit"] and isinstance(manifest["git"]["dirty"], bool)
    assert set(harness.PACKAGES) <= set(manifest["packages"]) and manifest["packages"]["jax"]
    assert manifest["jax"]["backend"] == "cpu" and manifest["jax"]["device_kinds"]
    assert manifest["cpu"]["cores"] >= 1 and "model" in manifest["cpu"]
    (run,) = manifest["runs"]
    assert (run["label"], run["seed"], run["train_seconds"], run["trained_now"]) == ("x", 1, 12.3, True)
    assert Config.from_dict(run["config"]) == cfg
    assert manifest["sweep"]["base"]["model"]["moe"]["num_experts"] == 8 and manifest["sweep"]["seeds"] == 2


def test_stop_request_before_the_train_guard_is_passed_on_to_it():
    """A signal that arrives while no train guard is installed is recorded, and re-sent once a guard (here a
    stand-in handler) replaces the sweep's handler; a second SIGINT raises KeyboardInterrupt."""
    received = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with harness.StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signal == signal.SIGTERM and not received
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.signal(signal.SIGTERM, previous)
        assert received == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_run_jobs_reuses_measured_results_and_never_measures_an_unfinished_run(tmp_path, monkeypatch):
    import transformer.train

    calls = []

    def fake_train(cfg):
        calls.append(cfg.run_dir)
        return {"step": cfg.steps if "done" in cfg.run_dir else 3, "preempted": "done" not in cfg.run_dir,
                "loss": 1.0}

    monkeypatch.setattr(transformer.train, "train", fake_train)
    base = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=2), steps=6)
    measured = []
    job = lambda label: harness.Job(label, 0, harness.sweep_run_config(base, label, 0, tmp_path),
                                    lambda cfg: measured.append(cfg.run_dir) or [{"v": 1.0}], "key")
    (first,) = harness.run_jobs([job("done")], "test")
    assert first.rows == [{"v": 1.0}] and first.trained_now and len(calls) == len(measured) == 1
    (again,) = harness.run_jobs([job("done")], "test")
    assert again.rows == first.rows and not again.trained_now and len(calls) == 1
    with pytest.raises(harness.SweepInterrupted, match="stopped at step 3 of 6"):
        harness.run_jobs([job("done"), job("cut")], "test")
    assert len(measured) == 1 and not (Path(job("cut").cfg.run_dir) / "sweep_results").exists()
    changed = dataclasses.replace(job("done"), measure_key="other key")
    harness.run_jobs([changed], "test")
    assert len(measured) == 2  # a changed measurement re-measures the finished run


def test_a_signal_the_train_guard_caught_after_its_last_check_still_stops_the_sweep():
    class Guard:  # stands in for checkpoint.PreemptionGuard: caught a SIGTERM during the run's final save
        requested, signal = False, None

        def _handle(self, signum, frame):
            self.requested, self.signal = True, signum

    guard = Guard()
    with harness.StopOnSignal() as stop:
        previous = signal.signal(signal.SIGTERM, guard._handle)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        signal.signal(signal.SIGTERM, previous)
        assert guard.requested and stop.signal is None and stop.requested() == signal.SIGTERM
        with pytest.raises(harness.SweepInterrupted, match="SIGTERM after run"):
            harness._check_stop(stop, "after run")


def test_an_interrupted_sweep_exits_like_a_preempted_train():
    from transformer import distributed

    assert harness.INTERRUPTED_EXIT_CODE == distributed.PREEMPTED_EXIT_CODE
