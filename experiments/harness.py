"""What the experiment scripts share: the command line with typed presets, fake CPU devices, result files,
figures and training runs.

The scripts run as `python experiments/NAME.py`, so this folder is on `sys.path` and `import harness` finds
this module.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class Parser(argparse.ArgumentParser):
    """--preset, --results-dir and, when asked for, --runs-dir and config overrides. After parsing, a flag left
    unset (None) takes the value of the preset's field of the same name, and the directories default to
    experiments/results/<name>/<preset> and runs/<name>/<preset>."""

    def __init__(self, name: str, doc: str, presets: dict, *, runs_dir: bool = False, overrides: str = ""):
        super().__init__(description=doc.splitlines()[0])
        self.name, self.presets = name, presets
        self.add_argument("--preset", choices=sorted(presets), default="cpu")
        self.add_argument("--results-dir", help=f"default: experiments/results/{name}/<preset>")
        if runs_dir:
            self.add_argument("--runs-dir", help=f"default: runs/{name}/<preset>")
        if overrides:
            self.add_argument("overrides", nargs="*", help=overrides)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        preset = self.presets[parsed.preset]
        for field in dataclasses.fields(preset):
            if field.name in parsed and getattr(parsed, field.name) is None:
                setattr(parsed, field.name, getattr(preset, field.name))
        parsed.results_dir = Path(parsed.results_dir or f"experiments/results/{self.name}/{parsed.preset}")
        if "runs_dir" in parsed:
            parsed.runs_dir = Path(parsed.runs_dir or f"runs/{self.name}/{parsed.preset}")
        return parsed


@dataclasses.dataclass(frozen=True)
class TrainingPreset:
    """A small model and how long and fast it is trained."""

    d_model: int
    layers: int
    heads: int
    batch: int
    steps: int
    lr: float
    warmup: int

    def training_config(self, *, seq_len: int, run_dir: Path, checkpoints: int, model: dict, **fields):
        """The Config that trains this model at `seq_len` on one device, saving `checkpoints` times (keeping the
        last); `model` adds ModelConfig fields and `fields` Config fields."""
        from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig

        return Config(
            model=ModelConfig(d_model=self.d_model, num_layers=self.layers, num_heads=self.heads, **model),
            mesh=MeshConfig(data=1),
            data=DataConfig(seq_len=seq_len, global_batch_size=self.batch),
            optim=OptimConfig(lr=self.lr, warmup_steps=self.warmup),
            checkpoint=CheckpointConfig(every_steps=max(self.steps // checkpoints, 1), keep_last=1),
            steps=self.steps, run_dir=str(run_dir), progress_bar=False, tensorboard=False, **fields,
        )


def ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers."""
    return _numbers(text, int, "integers")


def floats(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers."""
    return _numbers(text, float, "numbers")


def _numbers(text: str, kind, noun: str) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part)
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {noun}")
    return values


def fake_cpu_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices. Does nothing for 0, once jax is imported, or when XLA_FLAGS already
    sets a device count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count and "jax" not in sys.modules and DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def compiled_memory_mib(compiled) -> tuple[float, float]:
    """(peak, temporaries) per device in MiB from XLA's memory analysis of a compiled function: peak =
    arguments + outputs - aliased (donated) + temporaries. NaN when the backend has no analysis."""
    memory = compiled.memory_analysis()
    if memory is None:
        return float("nan"), float("nan")
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return peak / 2**20, memory.temp_size_in_bytes / 2**20


def train_run(cfg) -> float:
    """Train the run of `cfg` with the library's `train` (resuming an unfinished run, reusing a finished
    one); returns the seconds it took."""
    from transformer.train import train

    started = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - started
    print(f"  trained {cfg.run_dir}: step {summary['step']} loss {summary['loss']} ({seconds:.0f} s)", flush=True)
    return seconds


def markdown_table(header: list, rows: list[list], align: str | list[str] = "---") -> str:
    """A markdown table of already formatted cells; `align` is the separator of every column, or one per column."""
    aligns = [align] * len(header) if isinstance(align, str) else align
    lines = [_markdown_row(header), "|" + "".join(f"{a}|" for a in aligns)]
    return "\n".join(lines + [_markdown_row(row) for row in rows]) + "\n"


def _markdown_row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def write_results(results_dir: Path, name: str, rows: list[dict], markdown: str) -> list[Path]:
    """Write `rows` to <name>.csv (one column per key) and `markdown` to <name>.md under `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = results_dir / f"{name}.csv", results_dir / f"{name}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown)
    return [csv_path, md_path]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
