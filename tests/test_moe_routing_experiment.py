"""experiments/moe_routing.py: the swept routing fields reach the run's config (and coefficient 0 the loss), the
table's load statistics equal ones recomputed from the per-expert loads in metrics.jsonl, the outputs are
written, and a rerun reuses the finished run."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

import moe_routing as mr

TINY = ["mesh.data=-1", "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "data.seq_len=32",
        "data.global_batch_size=8", "steps=6", "log_every=2", "eval_batches=1", "optim.warmup_steps=2"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _loads_NE(record: dict) -> np.ndarray:
    layers = sorted({int(k.split("/")[2][5:]) for k in record if k.startswith("moe/expert_load/")})
    return np.array([[record[f"moe/expert_load/layer{l}/expert{e}"] for e in range(8)] for l in layers])


@pytest.mark.slow  # ~40 s of CPU: XLA compiles the init (threefry), train and eval steps of one tiny run
def test_sweep_row_matches_metrics_and_rerun_reuses_the_run(tmp_path):
    argv = ["--preset", "cpu", "--groups", "coef", "--coefs", "0", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--compile-cache", "", *TINY]
    (row,) = mr.main(argv)
    run_dir = tmp_path / "runs" / "softmax_topk_e8_k2_lb0"
    assert row["run"] == run_dir.name and row["lb_coef"] == 0.0 and row["step"] == 6

    for name in ("load_over_training.png", "loss_vs_coef.png"):
        assert (tmp_path / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results" / "moe_routing.csv") as f:
        (saved,) = list(csv.DictReader(f))
    numbers = {k: float(v) for k, v in saved.items() if k not in ("run", "router")}
    assert all(math.isfinite(v) for v in numbers.values()), saved
    markdown = (tmp_path / "results" / "moe_routing.md").read_text()
    assert markdown.count("\n") == 3 and f"| {run_dir.name} | 0 |" in markdown

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
    assert mr.main(argv) == [row]
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_summary_averages_layers_and_steps_in_float64():
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
    row = mr.summarize(mr.Setting("softmax_topk", 4, 2, 0.0), records)
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
        mr.summarize(mr.Setting("softmax_topk", 4, 2, 0.0), records[:-1])


def test_swept_fields_win_over_overrides():
    p = mr.PRESETS["cpu"]
    setting = mr.Setting("mixtral", experts=4, top_k=1, coef=0.1)
    cfg = mr.run_config(p, setting, Path("unused"), ["model.moe.load_balance_coef=0.5", "model.moe.num_experts=16",
                                                     "steps=40", "eval_every=7", "model.d_model=32"])
    moe = cfg.model.moe
    assert (moe.router, moe.num_experts, moe.top_k, moe.load_balance_coef) == ("mixtral", 4, 1, 0.1)
    assert moe.router_z_loss_coef == 0.0 and cfg.model.d_model == 32
    assert (cfg.steps, cfg.eval_every) == (40, 7)
    assert mr.run_config(p, setting, Path("unused"), []).eval_every == p.steps  # one evaluation, at the end
    names = [s.name for s in mr.sweep(p, list(mr.GROUPS), mr.COEFS)]
    assert len(names) == len(set(names)) == 11 and names[0] == "softmax_topk_e8_k2_lb0"
    assert "sigmoid_bias_e8_k2_lb0" in names and "switch_e8_k1_lb0" in names
