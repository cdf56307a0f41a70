"""experiments/long_context.py at a tiny length: the ring train step on 8 CPU devices gives the same loss and
gradient norm as the same model on one device with plain attention, and the results files are written."""

import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "long_context.py"


def _load():
    if "long_context" not in sys.modules:
        spec = importlib.util.spec_from_file_location("long_context", SCRIPT)
        sys.modules["long_context"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["long_context"])
    return sys.modules["long_context"]


def test_ring_step_matches_dense_step_and_writes_results(tmp_path):
    lc = _load()
    out = lc.main(["--preset", "cpu", "--lengths", "256", "--check-len", "256", "--steps", "1",
                   "--results-dir", str(tmp_path), "model.num_layers=1"])
    (row,) = out["rows"]
    check = out["check"]
    assert row.kernel == "ring/blockwise" and row.ring == 8 and row.devices == 8
    assert row.finite and 4.0 < row.loss < 7.0  # ~ln(259) for an untrained byte model
    assert row.peak_mib > 0 and row.step_s > 0
    assert check["kernel"] == "ring/blockwise" and check["dense_kernel"] == "reference"
    assert check["loss"] == row.loss
    assert check["loss_rel_diff"] < 1e-5 and check["grad_norm_rel_diff"] < 1e-5, check
    assert check["grad_norm"] > 0.1
    with open(tmp_path / "long_context.csv") as f:
        (record,) = list(csv.DictReader(f))
    assert int(record["seq_len"]) == 256 and record["finite"] == "True"
    assert "same code path at L=256" in (tmp_path / "long_context.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--lengths", "1000"], r"1000, which is not divisible by 2 x ring 8 = 16"),
    (["--check-len", "24"], r"--check-len has 24.*multiple of 16"),
    (["--ring", "0"], r"--ring 0 must be >= 1"),
    (["--lengths", "8k"], r"'8k' is not a comma-separated list of integers"),
])
def test_bad_arguments_fail_before_compiling(argv, match, capsys):
    lc = _load()
    with pytest.raises(SystemExit):
        lc.parse_args(["--preset", "cpu", *argv])
    assert re.search(match, capsys.readouterr().err)


def test_ring_larger_than_device_count_is_a_clear_error():
    lc = _load()
    with pytest.raises(ValueError, match=r"--ring 16 needs 16 devices but jax has 8"):
        lc.main(["--preset", "cpu", "--ring", "16", "--lengths", "64"])
