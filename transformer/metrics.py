"""Training metrics: JSONL (always) and TensorBoard logs, throughput, MFU and flattened MoE statistics.

    writer = MetricsWriter(run_dir, tensorboard=True, start_step=0)
    writer.write(step, {"loss": 2.3, "moe/expert_load_NE": load_NE})
    writer.close()

Only process 0 writes. `run_dir/metrics.jsonl` holds one JSON object per logged step; a
resumed run appends to it after dropping the records of steps later than its restored step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device (no sparsity), matched as substrings of device_kind.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
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
    """The records of run_dir/metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop_records_after(path: Path, step: int) -> None:
    """Remove records of steps > `step` (logged after the checkpoint a resumed run restarts from)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
