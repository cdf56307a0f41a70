"""experiments/bench_attention.py: every benchmarked kernel computes the same attention."""

from __future__ import annotations

import pytest

import bench_attention


def run_bench(tmp_path, methods: str, *extra: str):
    return bench_attention.main(["--preset", "cpu", "--lengths", "64", "--ring-sizes", "1,4", "--iters", "1",
                                 "--block-size", "16", "--methods", methods, "--results-dir", str(tmp_path), *extra])


def check_rows(rows, expected: set, tmp_path) -> None:
    assert {(r.method, r.devices) for r in rows} == expected
    for row in rows:
        assert row.status == "ok", (row.method, row.devices, row.pass_, row.status)
        if row.pass_ == "fwd":
            assert row.rel_err < 1e-5, (row.method, row.devices, row.rel_err)
    assert (tmp_path / "bench.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.slow  # keeps the default suite under 15 minutes; ring exactness: tests/test_ring_attention.py
def test_zigzag_ring_of_one_and_four_runs_and_matches_the_reference(tmp_path):
    check_rows(run_bench(tmp_path, "ring"), {("ring", 1), ("ring", 4)}, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--non-causal"]], ids=["causal", "bidirectional"])
def test_every_method_and_ring_size_runs_and_matches_the_reference(tmp_path, extra):
    rows = run_bench(tmp_path, "ring,ring_contiguous,blockwise,xla", *extra)
    check_rows(rows, {("ring", 1), ("ring", 4), ("ring_contiguous", 1), ("ring_contiguous", 4), ("blockwise", 1),
                      ("xla", 1)}, tmp_path)
