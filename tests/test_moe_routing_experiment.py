"""experiments/moe_routing.py: the sweep config's runs reach the runs' configs, the table's load statistics equal
ones recomputed from the per-expert loads in metrics.jsonl, a rerun reuses finished runs while a changed override
makes a new one, and a sweep interrupted by SIGINT writes no row, exits 75 and resumes when rerun."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import harness
import moe_routing as mr

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = '''
from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig


def get_config():
    moe = MoEConfig(num_experts=8, top_k=2, router_z_loss_coef=0.0)
    base = Config(model=ModelConfig(d_model=32, num_layers=1, num_heads=2, max_seq_len=32, attention_block_size=32,
                                    moe=moe),
                  mesh=MeshConfig(data=-1), data=DataConfig(seq_len=32, global_batch_size=8),
                  optim=OptimConfig(warmup_steps=2), checkpoint=CheckpointConfig(every_steps={every}, keep_last=1),
                  steps={steps}, log_every=2, eval_every={steps}, eval_batches=1, tensorboard=False,
                  progress_bar=False)
    return dict(base=base, runs=[("model.moe.load_balance_coef=0",)], seeds=1)
'''


def tiny_sweep(tmp_path: Path, steps: int = 6, every: int = 3) -> list[str]:
    path = tmp_path / "tiny_sweep.py"
    path.write_text(TINY_SWEEP.format(steps=steps, every=every))
    return ["--sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _loads_NE(record: dict) -> np.ndarray:
    layers = sorted({int(k.split("/")[2][5:]) for k in record if k.startswith("moe/expert_load/")})
    return np.array([[record[f"moe/expert_load/layer{l}/expert{e}"] for e in range(8)] for l in layers])


@pytest.mark.slow  # ~1 minute of CPU: XLA compiles the init, train and eval steps of two tiny MoE configs
def test_sweep_row_matches_metrics_rerun_reuses_and_override_makes_a_new_run(tmp_path):
    argv = tiny_sweep(tmp_path)
    assert mr.main(argv) == 0
    (run_dir,) = (tmp_path / "runs").glob("softmax_topk_e8_k2_lb0-s0-*")
    results = tmp_path / "results"
    for name in ("load_over_training.png",):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(results / "moe_routing.csv") as f:
        (saved,) = list(csv.DictReader(f))
    assert (saved["run"], saved["seed"], saved["step"]) == ("softmax_topk_e8_k2_lb0", "0", "6")
    numbers = {k: float(v) for k, v in saved.items() if k not in ("run", "router")}
    assert all(math.isfinite(v) for v in numbers.values()), saved
    assert "| softmax_topk_e8_k2_lb0 | 0 |" in (results / "moe_routing.md").read_text()
    manifest = json.loads((results / "manifest.json").read_text())
    assert [r["run_dir"] for r in manifest["runs"]] == [str(run_dir)] and manifest["runs"][0]["trained_now"]

    records = _records(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6] and "eval_loss" in records[-1]
    saved_moe = json.loads((run_dir / "config.json").read_text())["model"]["moe"]
    assert saved_moe["load_balance_coef"] == 0.0 and saved_moe["router_z_loss_coef"] == 0.0
    assert all(r["aux_loss"] == 0.0 and r["moe/load_balance_loss/layer0"] > 0.5 for r in records)

    loads = [_loads_NE(r) for r in records]
    np.testing.assert_allclose([x.sum(-1) for x in loads], 1.0, rtol=1e-5)
    cv = [np.mean(x.std(-1) / x.mean(-1)) for x in loads]
    peak = [np.mean(x.max(-1) / x.mean(-1)) for x in loads]
    np.testing.assert_allclose(numbers["cv_load_end"], cv[-1], rtol=1e-5)
    np.testing.assert_allclose(numbers["cv_load_avg"], np.mean(cv), rtol=1e-5)
    np.testing.assert_allclose(numbers["max_over_mean_end"], peak[-1], rtol=1e-5)
    np.testing.assert_allclose(numbers["max_over_mean_avg"], np.mean(peak), rtol=1e-5)
    assert numbers["dead_experts_end"] == np.mean(np.sum(loads[-1] < 0.1 / 8, axis=-1))
    assert numbers["eval_loss"] == records[-1]["eval_loss"] and numbers["train_loss"] == records[-1]["loss"]
    assert numbers["cv_collapsed"] == pytest.approx(math.sqrt(3))

    before = (run_dir / "metrics.jsonl").read_text()
    table = (results / "moe_routing.md").read_text()
    assert mr.main(argv) == 0
    assert (run_dir / "metrics.jsonl").read_text() == before and (results / "moe_routing.md").read_text() == table
    assert not json.loads((results / "manifest.json").read_text())["runs"][0]["trained_now"]

    assert mr.main([*argv[:-1], str(tmp_path / "results_steps"), "steps=4", "eval_every=4"]) == 0
    assert len(list((tmp_path / "runs").glob("softmax_topk_e8_k2_lb0-s0-*"))) == 2
    assert (run_dir / "metrics.jsonl").read_text() == before
    with open(tmp_path / "results_steps" / "moe_routing.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["4"]


@pytest.mark.slow
def test_sigint_stops_the_sweep_after_a_checkpoint_without_a_row_and_rerun_resumes(tmp_path):
    """SIGINT arrives while the run is being set up (its config.json exists, training has not started): it is
    passed on to train's guard, which saves and stops the run at its first step."""
    argv = tiny_sweep(tmp_path, steps=40, every=20)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    process = subprocess.Popen([sys.executable, "experiments/moe_routing.py", *argv], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("*/config.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "the sweep started no run in 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == harness.INTERRUPTED_EXIT_CODE, err
    assert "stopped at step" in err and "rerun the same command to resume" in err, err
    (run_dir,) = (tmp_path / "runs").glob("softmax_topk_e8_k2_lb0-s0-*")
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) < 40
    assert not (tmp_path / "results").exists() and not (run_dir / "sweep_results").exists()

    assert mr.main(argv) == 0
    with open(tmp_path / "results" / "moe_routing.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["40"]
    assert list((tmp_path / "runs").glob("softmax_topk_e8_k2_lb0-s0-*")) == [run_dir]
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_summary_averages_layers_and_steps_in_float64():
    from transformer.config import MoEConfig

    rng = np.random.default_rng(0)
    loads = rng.dirichlet(np.full(4, 0.3), size=(5, 3))  # 5 logged steps, 3 MoE layers, 4 experts
    records = []
    for step, loads_NE in enumerate(loads, start=1):
        record = {"step": 10 * step, "loss": 3.0 - step / 10}
        for l, load_E in enumerate(loads_NE):
            record |= {f"moe/expert_load/layer{l}/expert{e}": float(x) for e, x in enumerate(load_E)}
            record |= {f"moe/load_cv/layer{l}": float(load_E.std() * 4), f"moe/load_max_over_mean/layer{l}":
                       float(load_E.max() * 4), f"moe/dropped_fraction/layer{l}": float(l / 10),
                       f"moe/router_entropy/layer{l}": 1.0, f"moe/expert_reuse/layer{l}": float(step)}
        records.append(record)
    records[-1]["eval_loss"] = 2.5
    moe = MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.0)
    row = mr.summarize(moe, records)
    cv_SL = loads.std(-1) * 4
    assert row["cv_load_end"] == pytest.approx(cv_SL[-1].mean(), rel=1e-12)
    assert row["cv_load_avg"] == pytest.approx(cv_SL.mean(), rel=1e-12)
    assert row["max_over_mean_avg"] == pytest.approx((loads.max(-1) * 4).mean(), rel=1e-12)
    assert row["dead_experts_end"] == pytest.approx(np.mean(np.sum(loads[-1] < 0.025, axis=-1)))
    assert row["dead_experts_end"] > 0
    assert (row["dropped_end"], row["expert_reuse_end"], row["eval_loss"], row["step"]) == \
        (pytest.approx(0.1), 5.0, 2.5, 50)
    assert row["cv_collapsed"] == 1.0
    with pytest.raises(ValueError, match="no final eval record"):
        mr.summarize(moe, records[:-1])


def test_cpu_sweep_runs_labels_and_overrides():
    args = mr.parse_args(["model.d_model=32"])
    labels = mr.run_labels(args.sweep)
    assert len(labels) == len(set(labels)) == 11 and labels[0] == "softmax_topk_e8_k2_lb0"
    assert {"sigmoid_bias_e8_k2_lb0", "switch_e8_k1_lb0", "softmax_topk_e4_k2_lb0.01"} <= set(labels)
    assert mr.coefficient_runs(args.sweep) == labels[:4]
    jobs = mr.jobs(args.sweep, Path("runs"))
    assert len(jobs) == 33 and [j.seed for j in jobs[::11]] == [0, 1, 2]
    by_label = {j.label: j.cfg for j in jobs if j.seed == 0}
    mixtral = by_label["mixtral_e8_k2_lb0.01"].model.moe  # the run's own overrides win over the base's
    assert (mixtral.router, mixtral.num_experts, mixtral.top_k, mixtral.load_balance_coef) == ("mixtral", 8, 2, 0.01)
    assert by_label["softmax_topk_e16_k2_lb0.01"].model.d_model == 32
    assert by_label["switch_e8_k1_lb0"].model.moe.top_k == 1 and mixtral.router_z_loss_coef == 0.0
    assert all(cfg.eval_every == cfg.steps for cfg in by_label.values())  # one evaluation, at the end
    extra = mr.Sweep(base=args.sweep.base, runs=(("model.moe.capacity_factor=2",), ()))
    assert mr.run_labels(extra) == ["softmax_topk_e8_k2_lb0.01 model.moe.capacity_factor=2",
                                    "softmax_topk_e8_k2_lb0.01"]
