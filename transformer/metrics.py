"""Training metrics: JSONL (always) and TensorBoard logs, throughput, MFU, flattened MoE statistics and the
training loop's step-time breakdown (`StepTimes`).

    writer = MetricsWriter(run_dir, tensorboard=True, start_step=0)
    writer.write(step, {"loss": 2.3, "moe/expert_load_NE": load_NE})
    writer.close()

Only process 0 writes. `run_dir/metrics.jsonl` holds one JSON object per logged step; a
resumed run appends to it after dropping the records of steps later than its restored step, and any
line that is not a JSON record (the last one, torn by a kill mid-write) with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s (no sparsity) per jax device, matched in order as substrings of device_kind. A TPU v4
# or v5p chip (two TensorCores as one megacore) is one device, as is a v5e or v6e chip (one TensorCore);
# a v2 or v3 chip is two devices, one per TensorCore.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # also GH200
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),
    ("TPU v2", 22.5e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device from its `device_kind`, or None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind:
            return flops
    return None


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak, or None when the peak is unknown."""
    peak = peak_flops_per_device(device_kind)
    if peak is None or num_devices < 1:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


def flatten(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars from a dict of scalars and arrays.

    Arrays are split by the trailing legend letters of their key (`_LETTER_NAMES`): "moe/expert_load_NE" of
    shape (MoE layers, E) becomes "moe/expert_load/layer{l}/expert{e}"; an unsuffixed 1-D "moe/..." array is per MoE layer
    ("moe/dropped_fraction/layer{l}"); other arrays get "dim{d}_{i}" parts.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        array = np.asarray(value)
        if array.ndim == 0:
            flat[key] = array.item() if array.dtype.kind in "biu" else float(array)
            continue
        base, names = _split_shape_suffix(key, array.ndim)
        for index in np.ndindex(array.shape):
            parts = [f"{name}{i}" for name, i in zip(names, index)]
            flat["/".join([base, *parts])] = float(array[index])
    return flat


_LETTER_NAMES = {"N": "layer", "E": "expert", "X": "choice", "B": "row", "H": "head"}


def _split_shape_suffix(key: str, ndim: int) -> tuple[str, list[str]]:
    base, _, suffix = key.rpartition("_")
    if base and len(suffix) == ndim and suffix.isalpha() and suffix.isupper():
        return base, [_LETTER_NAMES.get(letter, letter.lower()) for letter in suffix]
    if key.removeprefix("eval/").startswith("moe/") and ndim == 1:  # MoE statistics are stacked per MoE layer
        return key, ["layer"]
    return key, [f"dim{d}_" for d in range(ndim)]


class MetricsWriter:
    """Appends flattened scalars to run_dir/metrics.jsonl and, optionally, TensorBoard (process 0 only)."""

    def __init__(self, run_dir: str, *, tensorboard: bool = False, start_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.path, start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log `metrics` (scalars or arrays, flattened) for `step`; returns the flattened record."""
        record = flatten(metrics)
        if not self.active:
            return record
        line = {"step": int(step), **{k: (v if math.isfinite(v) else repr(v)) for k, v in record.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run_dir/metrics.jsonl, in order (lines that are not records are left out, with a warning)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [record for _, record in _records(path)]


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each line of `path` that holds a JSON object; warns about the others."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            bad.append(number)
    if bad:
        warnings.warn(f"{path}: dropping line {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}, "
                      "not a JSON record (a write cut off by a kill)", stacklevel=3)
    return records


def _drop_records_after(path: Path, step: int) -> None:
    """Remove records of steps > `step` (logged after the checkpoint a resumed run restarts from) and lines
    that are not records."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept = [line for line, record in _records(path) if record.get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


class StepTimes:
    """Where a training loop's wall time goes, in seconds per step averaged over the steps read since the last
    `report` (a window starts when the first dispatch returns, so a session's compilation is left out):

    - `time/step`: wall time; `time/data`: fetching and placing batches; `time/wait`: blocked on a step's
      results (the loop reads them one step behind, so it waits only while the device is the bottleneck);
      `time/checkpoint`: the blocking part of saves; `time/eval`: held-out evaluation; `time/host`: the rest
      (the loop itself, logging, dispatching).
    - `time/host_fraction`: (data + host) / step, the share of a step the host spends on its own work.
    - `time/device`: the device's time per step, from steps whose results were waited for and whose start is
      known: right after the previous step's end (when that was waited for too) or at dispatch (when the
      previous step had been read before it). Absent when the loop never waited: it is then host-bound.
    """

    PARTS = ("data", "wait", "checkpoint", "eval")
    BLOCKED_S = 1e-4  # a wait this long means the step was still running when its results were asked for

    def __init__(self):
        self.start: float | None = None
        self.last_read, self.last_blocked = -math.inf, False
        self._new_window()

    def _new_window(self) -> None:
        self.steps, self.device = 0, []
        self.parts = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def part(self, name: str):
        """Time the block as `name` (one of PARTS); it also shows as a span of that name in a profiler trace."""
        started = time.perf_counter()
        try:
            with jax.profiler.TraceAnnotation(name):
                yield
        finally:
            self.parts[name] += time.perf_counter() - started

    def dispatched(self) -> float:
        """Note that a step was just dispatched; returns the time, the earliest the device can start it."""
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        return now

    def read(self, results, dispatched_at: float):
        """`results` (a step's device arrays) on the host, after waiting for them; `dispatched_at` is the
        step's `dispatched()` time."""
        with self.part("wait"):
            began = time.perf_counter()
            jax.block_until_ready(results)
            now = time.perf_counter()
        blocked = now - began > self.BLOCKED_S
        if blocked and (self.last_blocked or self.last_read <= dispatched_at):
            self.device.append(now - max(self.last_read, dispatched_at))
        self.last_read, self.last_blocked = now, blocked
        self.steps += 1
        return jax.device_get(results)

    def report(self) -> dict[str, float]:
        """The window's per-step means (empty when no step was read in it); starts the next window."""
        now = time.perf_counter()
        if self.start is None or not self.steps:
            return {}
        step = (now - self.start) / self.steps
        means = {f"time/{name}": total / self.steps for name, total in self.parts.items()}
        host = step - sum(means.values())
        record = {"time/step": step, **means, "time/host": host,
                  "time/host_fraction": (means["time/data"] + host) / step}
        if self.device:
            record["time/device"] = float(np.mean(self.device))
        self.start = now
        self._new_window()
        return record
