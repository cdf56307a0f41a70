"""`transformer.aot`'s answer to "does it fit": XLA's out-of-memory error parsed into a verdict with suggestions
(exit 1, no traceback), and a list of topologies searched from the fewest chips up. The `tpu` tests compile for
real TPU topologies through libtpu (`pip install -e '.[tpu]'`) and are skipped without it."""

import dataclasses
import json
import subprocess
import sys

import pytest

from processes import REPO, cpu_env
from transformer import aot
from transformer.config import ConfigError, config_from_args

# XLA's error for `--preset 1b --topology v5e:2x2` (libtpu 0.0.50.1), and the older wording.
V5E_2X2_1B = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, "
              "the total memory required for HLO temporaries (189.49G) exceeds available HBM (15.75G). HLO module: "
              "jit_train_step.\nSee https://openxla.org/xla/errors/error_1000 for more details.")
OLD_WORDING = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
               "50.83G of 15.75G hbm. Exceeded hbm capacity by 35.08G.\n\nTotal hbm usage >= 51.08G:")
GIB = 2**30


def test_parse_out_of_memory_reads_needed_and_available_bytes():
    oom = aot.parse_out_of_memory(V5E_2X2_1B)
    assert oom.needed_bytes == pytest.approx(189.49 * GIB) and oom.available_bytes == pytest.approx(15.75 * GIB)
    assert oom.needed_what == "HLO temporaries" and oom.message.startswith("jax.errors.JaxRuntimeError: RESOURCE")
    old = aot.parse_out_of_memory(OLD_WORDING)
    assert (old.needed_bytes, old.available_bytes, old.needed_what) == (50.83 * GIB, 15.75 * GIB, "total")
    vague = aot.parse_out_of_memory("RESOURCE_EXHAUSTED: out of memory while trying to allocate")
    assert vague.needed_bytes is None and vague.available_bytes is None
    assert aot.parse_out_of_memory("INVALID_ARGUMENT: bad sharding") is None


def _oom(message=V5E_2X2_1B, devices=4, **mesh) -> aot.OutOfMemory:
    sizes = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, "expert": 1, **mesh}
    return dataclasses.replace(aot.parse_out_of_memory(message), devices=devices, mesh=sizes,
                               state_bytes_per_device=3 * GIB)


def test_verdict_names_need_capacity_and_suggestions():
    cfg = config_from_args(["--preset", "1b", "data.paths=x"])
    text = aot.format_verdict(cfg, [aot.Attempt("v5e:2x2", _oom(fsdp=4))])
    first, *rest = text.splitlines()
    assert first == ("v5e:2x2 (4 devices): does not fit: needs at least 192.49 GiB of 15.75 GiB HBM per device "
                     "(189.49 GiB HLO temporaries + 3.00 GiB params and optimizer state)")
    tips = "\n".join(rest)
    assert "at least 13x the devices" in tips and "--topology v5e:8x8" in tips  # 4 chips x 12.2 -> 64
    assert "data.global_batch_size=256 (now 512: 128 rows of 4096 tokens per device)" in tips
    assert "optim.grad_accum_steps=2 (now 1)" in tips and "loss_chunk_size=" in tips
    assert "model.remat" not in tips and "mesh.fsdp" not in tips  # 1b already uses full remat and fsdp=-1


def test_suggestions_include_remat_and_fsdp_when_not_in_place():
    cfg = config_from_args(["--preset", "tiny", "mesh.data=4"])
    tips = aot.suggestions(cfg, "v5e:2x2", _oom(OLD_WORDING, data=4))
    assert any(t.startswith("remat: model.remat=full (now none)") for t in tips)
    assert any(t.startswith("fsdp: mesh.data=1 mesh.fsdp=-1") for t in tips)
    assert not any("loss_chunk_size" in t for t in tips)  # tiny logits are far below 5% of HBM
    unknown = aot.suggestions(cfg, "v5e:2x2", _oom("RESOURCE_EXHAUSTED: no numbers", data=4))
    assert unknown[0].startswith("more chips: at least 2x")
    assert "does not fit in HBM (XLA: RESOURCE_EXHAUSTED: no numbers)" in aot.format_no_fit(
        "v5e:2x2", _oom("RESOURCE_EXHAUSTED: no numbers"))


def _fake_report(devices: int) -> aot.AotReport:
    return aot.AotReport(devices=devices, mesh={"data": devices}, params=1, state_bytes_per_device=GIB,
                         argument_bytes=GIB, output_bytes=GIB, alias_bytes=GIB, temp_bytes=GIB, code_bytes=0,
                         xla_flops_per_device=None, model_flops_per_step=1.0, executed_flops_per_step=1.0,
                         xla_flops_caveats=())


def test_report_notes_a_memory_analysis_above_the_device_hbm():
    report = dataclasses.replace(_fake_report(16), device_kind="TPU v5 lite", temp_bytes=20 * GIB)
    assert aot.format_report(report, "tpu").splitlines()[-1] == (
        "note: XLA's compile-time HBM check passed, but its memory analysis sums to 21.00 GiB, more than the "
        "16.00 GiB of a TPU v5 lite device: the margin is uncertain until it runs")
    assert "note:" not in aot.format_report(dataclasses.replace(report, temp_bytes=GIB), "tpu")


def test_search_tries_the_fewest_chips_first_and_stops_at_the_first_fit():
    tried = []

    def attempt(cfg, target):
        tried.append(target)
        chips = aot.topology_chips(target)
        if chips == 8:
            raise ConfigError("data.global_batch_size=12 is not divisible by 8")
        return _fake_report(chips) if chips >= 16 else _oom(devices=chips)

    attempts = aot.search(None, ["v5e:16x16", "v5e:4x4", "v5e:2x2", "v5e:2x4"], attempt)
    assert tried == ["v5e:2x2", "v5e:2x4", "v5e:4x4"]
    assert [type(a.result) for a in attempts] == [aot.OutOfMemory, str, aot.AotReport]
    text = aot.format_verdict(config_from_args(["--preset", "tiny"]), attempts)
    assert text.splitlines() == [
        "v5e:2x2 (4 devices): does not fit: needs at least 192.49 GiB of 15.75 GiB HBM per device "
        "(189.49 GiB HLO temporaries + 3.00 GiB params and optimizer state)",
        "v5e:2x4: cannot be used: data.global_batch_size=12 is not divisible by 8",
        "v5e:4x4 (16 devices): fits, 2.00 GiB per device"]


def test_cli_prints_the_verdict_and_exits_1_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(aot, "target_devices", lambda platform, count, topology: topology)
    monkeypatch.setattr(aot, "fit", lambda cfg, topology: _oom(devices=aot.topology_chips(topology), fsdp=4))
    assert aot.main(["--preset", "1b", "--topology", "v5e:2x4,v5e:2x2"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("v5e:2x2 (4 devices): does not fit: needs at least")
    assert lines[1].startswith("v5e:2x4 (8 devices): does not fit")
    assert lines[2] == "what would make it fit on v5e:2x4 (combine them when one is not enough):"
    assert err == ""
    assert aot.main(["--preset", "1b", "--topology", "v5e:2x2", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["fits"] is False and verdict["available_bytes"] == 15.75 * GIB and verdict["suggestions"]
    monkeypatch.setattr(aot, "fit", lambda cfg, topology: _fake_report(4))
    assert aot.main(["--preset", "tiny", "mesh.data=-1", "--topology", "v5e:2x2"]) == 0
    assert capsys.readouterr().out.startswith("train step compiled for 4 tpu devices")


def _aot(*args: str) -> subprocess.CompletedProcess:
    """`python -m transformer.aot *args`; several processes may load libtpu (no real TPU is used)."""
    return subprocess.run([sys.executable, "-m", "transformer.aot", *args], cwd=REPO,
                          env=cpu_env(1, ALLOW_MULTIPLE_LIBTPU_LOAD="1"), capture_output=True, text=True, timeout=600)


@pytest.mark.tpu
def test_tpu_topology_that_does_not_fit_exits_1_with_the_verdict():
    pytest.importorskip("libtpu")
    proc = _aot("--preset", "1b", "--topology", "v5e:2x2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("v5e:2x2 (4 devices): does not fit: needs at least") and "of 15.75 GiB HBM" in first
    assert "loss_chunk_size=" in proc.stdout


@pytest.mark.tpu
def test_tpu_topology_list_reports_the_smallest_that_fits():
    pytest.importorskip("libtpu")
    proc = _aot("--preset", "tiny", "mesh.data=-1", "--topology", "v5e:2x4,v5e:2x2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("v5e:2x2 (4 devices): fits") and not any(line.startswith("v5e:2x4") for line in lines)
    assert "train step compiled for 4 tpu devices, mesh data=4" in proc.stdout
