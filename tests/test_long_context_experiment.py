"""experiments/long_context.py at a tiny length: the ring train step on 8 CPU devices gives the same loss and
gradient norm as the same model on one device with plain attention, and the results files are written."""

import csv

import pytest

import long_context as lc


@pytest.mark.slow  # keeps the default suite under 15 minutes; ring == dense: tests/test_sharding.py
def test_ring_step_matches_dense_step_and_writes_results(tmp_path):
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


def test_ring_larger_than_device_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"--ring 16 needs 16 devices but jax has 8"):
        lc.main(["--preset", "cpu", "--ring", "16", "--lengths", "64"])
