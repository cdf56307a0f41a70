"""experiments/bench_train_loop.py on test_train's tiny model (its programs are compiled once per session): both
loops run, their breakdowns add up and the result files are written; the first-step runs (slow: four processes)
show the compilation cache at work."""

import csv

import pytest

import bench_train_loop as bench

from test_train import STEPS, TINY

TINY_OVERRIDES = TINY[2:]  # without --preset tiny: the bench picks the preset


@pytest.mark.slow  # keeps the default suite under 15 minutes; loop equivalence: tests/test_train_loop.py
def test_both_loops_run_and_their_breakdowns_add_up(tmp_path):
    out = bench.main(["--preset", "cpu", "--models", "tiny", "--steps", str(STEPS), "--repeats", "1",
                      "--first-step-steps", "0", "--runs-dir", str(tmp_path / "runs"),
                      "--results-dir", str(tmp_path / "results"), *TINY_OVERRIDES])
    rows = out["loop"]
    assert [(r["model"], r["loop"]) for r in rows] == [("tiny", loop) for loop in bench.LOOPS]
    for row in rows:
        assert row["steps_per_s"] == pytest.approx(1e3 / row["step_ms"])
        assert 0 < row["data_ms"] + row["host_ms"] + row["wait_ms"] <= row["step_ms"] * (1 + 1e-9)
        assert 0 < row["host_fraction"] < 1
        # tokens/s leaves out the time of checkpoint checks (and saves), so it is at least batch x length x steps/s
        assert 8 * 32 * row["steps_per_s"] * (1 - 1e-3) <= row["tokens_per_s"] <= 8 * 32 * row["steps_per_s"] * 1.05
    with open(tmp_path / "results" / "loop.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "| tiny | asynchronous |" in (tmp_path / "results" / "loop.md").read_text()
    assert not (tmp_path / "results" / "first_step.csv").exists()


@pytest.mark.slow
def test_first_step_is_faster_from_a_warm_cache(tmp_path):
    out = bench.main(["--preset", "cpu", "--models", "tiny", "--steps", "4", "--repeats", "1",
                      "--first-step-steps", "4", "--runs-dir", str(tmp_path / "runs"),
                      "--results-dir", str(tmp_path / "results"), *TINY_OVERRIDES])
    seconds = {r["start"]: r["first_step_s"] for r in out["first_step"]}
    assert list(seconds) == list(bench.FIRST_STEP_STARTS)
    assert seconds["resumed, warm cache"] < seconds["resumed, no cache"]
    assert seconds["fresh, shared warm cache"] < seconds["fresh, empty cache"]
    assert (tmp_path / "results" / "first_step.md").exists()
