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
    experiments/results/<name>/<preset> and runs/<name>/<preset>. --help prints the script's docstring, its
    options, every preset's values and, with overrides, every config field (`transformer.config.help_text`)."""

    def __init__(self, name: str, doc: str, presets: dict, *, runs_dir: bool = False, overrides: str = ""):
        super().__init__(description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
        self.name, self.presets = name, presets
        self.add_argument("--preset", choices=sorted(presets), default="cpu")
        self.add_argument("--results-dir", help=f"default: experiments/results/{name}/<preset>")
        if runs_dir:
            self.add_argument("--runs-dir", help=f"default: runs/{name}/<preset>")
        if overrides:
            self.add_argument("overrides", nargs="*", help=overrides)

    def format_help(self) -> str:
        from transformer.config import (CONFIG_FIELDS_TITLE, Config, columns, config_file_lines, describe_fields,
                                        wrapped_entry)

        sections = [super().format_help().rstrip(), "Presets (--preset NAME):\n" + "\n".join(
            line for name, preset in self.presets.items()
            for line in wrapped_entry(name, [f"{key}={value}" for key, value, _ in describe_fields(preset)]))]
        if "--config" in self._option_string_actions:
            sections.append("Config files (--config FILE.py):\n" + "\n".join(config_file_lines()))
        if "--sweep" in self._option_string_actions:
            sweeps = Path(__file__).resolve().parent / "configs" / "sweeps"
            sections.append("Sweep config files (--sweep FILE.py):\n" + "\n".join(config_file_lines(sweeps)))
        if any(action.dest == "overrides" for action in self._actions):
            sections.append(f"{CONFIG_FIELDS_TITLE}:\n" + "\n".join(columns(describe_fields(Config))))
        return "\n\n".join(sections) + "\n"

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


def write_csv(path: Path, rows: list[dict]) -> Path:
    """`rows` as CSV with one column per key of the first row; a list cell is written space-separated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: " ".join(f"{x:.6g}" for x in v) if isinstance(v, list) else v for k, v in row.items()}
                         for row in rows)
    return path


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


# ---------------------------------------------------------------- sweeps: config files, runs, provenance

INTERRUPTED_EXIT_CODE = 75  # EX_TEMPFAIL, as distributed.PREEMPTED_EXIT_CODE: rerunning the command resumes
UNHASHED_FIELDS = ("run_dir", "progress_bar", "tensorboard", "compilation_cache_dir", "synchronous",
                   "profile_steps", "sample_tokens", "sample_prompt")


class SweepInterrupted(Exception):
    """SIGINT or SIGTERM stopped a sweep; finished runs are kept and rerunning the command resumes."""


@dataclasses.dataclass(frozen=True)
class SweepPreset:
    """A sweep script's preset: the sweep config file it runs."""

    sweep: str


class SweepParser(Parser):
    """The command line of a sweep script: --preset or --sweep FILE, --seeds, --only, --runs-dir, --results-dir and
    config overrides of the sweep's base config. `parse_args` loads the sweep (`sweep_cls(**get_config())`),
    applies the overrides, seeds and selection, and picks the results folder (`sweep_results_dir`). `sweep_cls`
    is a frozen dataclass with fields `base` (a Config) and `seeds`, and methods `select(names)` and `validate()`
    (every run's config is valid, or a ConfigError); `customize(sweep, args)` may change the sweep by the script's
    own flags."""

    def __init__(self, name: str, doc: str, presets: dict[str, SweepPreset], sweep_cls, *, only: str,
                 customize=None):
        super().__init__(name, doc, presets, runs_dir=True,
                         overrides="config overrides of the sweep's base config (every run), e.g. steps=100; "
                                   "each run's own overrides in the sweep config win")
        self.sweep_cls, self.customize = sweep_cls, customize or (lambda sweep, args: sweep)
        self._option_string_actions["--results-dir"].help = (
            f"default: experiments/results/{name}/<preset> for a preset's own sweep; any other sweep file, --only, "
            f"--seeds or override writes to experiments/results/{name}/<label>-<hash> instead")
        self._option_string_actions["--runs-dir"].help = (
            f"default: runs/{name}; run folders are named by a hash of their full config, so sweeps share "
            "finished runs and a changed override never reuses one")
        self.add_argument("--sweep", help="sweep config file (experiments/configs/sweeps/*.py) instead of the "
                                          "preset's; copy one to make a new sweep")
        self.add_argument("--seeds", type=int, help="seeds per run (default: the sweep config's)")
        self.add_argument("--only", help=only)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        from transformer.config import ConfigError

        parsed = argparse.ArgumentParser.parse_args(self, args, namespace)
        if parsed.seeds is not None and parsed.seeds < 1:
            self.error(f"--seeds {parsed.seeds} must be >= 1")
        parsed.sweep_file = parsed.sweep or self.presets[parsed.preset].sweep
        parsed.runs_dir = Path(parsed.runs_dir or f"runs/{self.name}")
        try:
            loaded = load_sweep(parsed.sweep_file, self.sweep_cls)
            parsed.sweep = self.customize(customize_sweep(loaded, parsed.overrides, parsed.seeds, parsed.only), parsed)
            parsed.sweep.validate()
            own_preset = next((name for name, p in self.presets.items() if _same_file(p.sweep, parsed.sweep_file)),
                              None)
            canonical = parsed.sweep == (loaded if own_preset else None)
        except ConfigError as e:
            self.error(str(e))
        changes = [*parsed.overrides, *([f"only={parsed.only}"] if parsed.only else []),
                   *([f"seeds={parsed.seeds}"] if parsed.seeds else [])]
        label = "-".join([own_preset or Path(parsed.sweep_file).stem, *changes])
        parsed.results_dir = Path(parsed.results_dir) if parsed.results_dir else sweep_results_dir(
            self.name, label, parsed.sweep, canonical, own_preset)
        return parsed


def _in_repo(path: str) -> str:
    """`path`, or the same path under the repository root when it does not exist from here."""
    root = Path(__file__).resolve().parents[1]
    return path if Path(path).exists() or Path(path).is_absolute() else str(root / path)


def _same_file(a: str, b: str) -> bool:
    return Path(_in_repo(a)).resolve() == Path(_in_repo(b)).resolve()


def load_sweep(path: str, sweep_cls):
    """`sweep_cls(**get_config())` of the Python file `path` (relative to here or to the repository root); a
    ConfigError names the file and the problem."""
    import importlib.util

    from transformer.config import Config, ConfigError

    file = Path(_in_repo(path))
    if not (file.is_file() and file.suffix == ".py"):
        raise ConfigError(f"--sweep {path!r}: no such Python file")
    spec = importlib.util.spec_from_file_location(f"_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--sweep {path!r} defines no get_config() function")
    values = get_config()
    if not isinstance(values, dict):
        raise ConfigError(f"--sweep {path!r}: get_config() returned {type(values).__name__}, not a dict of "
                          f"{sweep_cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(sweep_cls)}
    unknown = sorted(set(values) - set(fields))
    missing = sorted(name for name, f in fields.items() if name not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        raise ConfigError(f"--sweep {path!r}: {problem}; fields: {', '.join(fields)}")
    if not isinstance(values["base"], Config):
        raise ConfigError(f"--sweep {path!r}: base is a {type(values['base']).__name__}, not a Config")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return sweep_cls(**values)


def customize_sweep(sweep, overrides: list[str], seeds: int | None, only: str | None):
    """`sweep` with the config overrides applied to its base config, `seeds` seeds and only the runs named in
    the comma-separated `only`."""
    from transformer.config import ConfigError, apply_overrides

    if any(key.split("=", 1)[0].strip() in ("seed", "data.seed", "run_dir") for key in overrides):
        raise ConfigError("seed, data.seed and run_dir are set per run by the sweep; use --seeds and --runs-dir")
    sweep = dataclasses.replace(sweep, base=apply_overrides(sweep.base, overrides), seeds=seeds or sweep.seeds)
    if sweep.seeds < 1:
        raise ConfigError(f"seeds={sweep.seeds} must be >= 1")
    return sweep.select([n.strip() for n in only.split(",") if n.strip()]) if only else sweep


def sweep_results_dir(name: str, label: str, sweep, canonical: bool, preset: str | None) -> Path:
    """experiments/results/<name>/<preset> for a preset's own sweep (`canonical`), else a folder of its own named
    by `label` (shortened) and a digest of the whole sweep, so a subset or variant never writes over the
    committed tables."""
    root = Path("experiments/results") / name
    return root / preset if canonical else root / f"{slug(label)[:60]}-{digest(sweep)[:10]}"


def digest(value) -> str:
    """sha256 of a canonical JSON form of `value` (dataclasses as dicts)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True, default=str).encode()).hexdigest()


def _changed(value):
    """The fields of a config dataclass that differ from its defaults (recursively); other values as they are.
    A field added to the library later, at its default, therefore leaves every existing run name unchanged."""
    if not dataclasses.is_dataclass(value):
        return value
    default = type(value)()
    return {f.name: _changed(getattr(value, f.name)) for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(default, f.name)}


def config_digest(cfg) -> str:
    """Digest of everything in `cfg` that changes what a run computes: the fields that differ from the defaults,
    but UNHASHED_FIELDS and the checkpoint cadence; checkpoint.init_from counts by the name of the run it
    points to."""
    changed = _changed(dataclasses.replace(cfg, checkpoint=type(cfg.checkpoint)(
        init_from=Path(cfg.checkpoint.init_from).name)))
    return digest({name: value for name, value in changed.items() if name not in UNHASHED_FIELDS})


def slug(text: str) -> str:
    """`text` as a folder name: letters, digits, '.', '=' and '-', other runs of characters as one '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "run"


def sweep_run_config(cfg, label: str, seed: int, runs_dir: Path):
    """`cfg` as run `label` with `seed` (parameter init and data order): run_dir runs_dir/<label>-s<seed>-<digest>,
    the compilation cache shared by the sweep's runs, validated."""
    cfg = dataclasses.replace(cfg, seed=seed, data=dataclasses.replace(cfg.data, seed=seed),
                              compilation_cache_dir=str((runs_dir / "jax_cache").absolute()))
    cfg = cfg.validate()
    return dataclasses.replace(cfg, run_dir=str(runs_dir / f"{slug(label)}-s{seed}-{config_digest(cfg)[:10]}"))


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of a sweep and what is measured on it once it has reached its last step: `measure(cfg)`
    returns table rows; `measure_key` is everything else they depend on (part of the cached result's key)."""

    label: str
    seed: int
    cfg: object
    measure: object
    measure_key: object = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def result_path(self) -> Path:
        return self.run_dir / "sweep_results" / f"{digest([config_digest(self.cfg), self.measure_key])[:16]}.json"


@dataclasses.dataclass(frozen=True)
class Finished:
    """A measured run: its rows and seconds (training summed over sessions; measuring) and whether this
    invocation trained it."""

    job: Job
    rows: list
    train_seconds: float
    measure_seconds: float
    trained_now: bool


class StopOnSignal:
    """Inside the block SIGINT and SIGTERM request a stop (`requested()`) instead of killing the process; a second
    SIGINT raises KeyboardInterrupt. `train` replaces these handlers with its own guard while it steps, which
    saves and stops the run. A watcher thread bridges the two: a request that arrived outside the guard is passed
    on to it once it is installed (so a run that has not started stepping stops at its first step), and a signal
    the guard caught after its loop had stopped checking (during the final save) still counts as a request."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signal = None
        self._passed_on = True
        self._previous = {}
        self._guards = []
        self._closed = None

    def _handle(self, signum, frame) -> None:
        import signal

        if signum == signal.SIGINT and self.requested() is not None:
            raise KeyboardInterrupt
        self.signal, self._passed_on = signum, False

    def requested(self):
        """The signal that asked for a stop (ours or a train guard's), else None."""
        import signal

        if self.signal is not None:
            return self.signal
        for guard in self._guards:
            if getattr(guard, "requested", False):
                return getattr(guard, "signal", None) or signal.SIGTERM
        return None

    def _watch(self) -> None:
        import signal

        while not self._closed.wait(0.05):
            handler = signal.getsignal(signal.SIGTERM)
            guard = getattr(handler, "__self__", None)
            if handler != self._handle and hasattr(guard, "requested") and guard not in self._guards:
                self._guards.append(guard)
            if not self._passed_on and signal.getsignal(self.signal) != self._handle:
                self._passed_on = True
                os.kill(os.getpid(), self.signal)

    def __enter__(self) -> "StopOnSignal":
        import signal
        import threading

        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        self._closed = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self._closed.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_jobs(jobs: list[Job], title: str) -> list[Finished]:
    """Train and measure every job in order, reusing results measured before (same config and measure_key) and
    resuming unfinished runs. One progress bar counts runs (with ETA) above each run's own bar. SIGINT/SIGTERM
    stop the sweep after the current run has saved its checkpoint (and, if it had finished, its measurement):
    SweepInterrupted. A run that did not reach its last step is never measured."""
    from tqdm import tqdm

    cached = [_load_result(job) for job in jobs]
    bar = tqdm(total=len(jobs), initial=sum(r is not None for r in cached), desc=title, unit="run", position=0,
               dynamic_ncols=True)
    finished = []
    try:
        with StopOnSignal() as stop:
            for job, result in zip(jobs, cached):
                if result is None:
                    _check_stop(stop, f"before {job.run_dir}")
                    result = _train_and_measure(job, bar)
                    bar.update(1)
                    _check_stop(stop, f"after {job.run_dir}")
                finished.append(result)
    finally:
        bar.close()
    return finished


def _check_stop(stop: StopOnSignal, where: str) -> None:
    import signal

    if (signum := stop.requested()) is not None:
        raise SweepInterrupted(f"{signal.Signals(signum).name} {where}")


def _load_result(job: Job) -> Finished | None:
    import json

    if not job.result_path.is_file():
        return None
    saved = json.loads(job.result_path.read_text())
    return Finished(job, saved["rows"], saved["train_seconds"], saved["measure_seconds"], trained_now=False)


def _train_and_measure(job: Job, bar) -> Finished:
    import json

    from transformer.train import train

    timing = job.run_dir / "sweep_train_seconds.json"
    started = time.perf_counter()
    try:
        summary = train(job.cfg)
    finally:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        before = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
        timing.write_text(json.dumps({"seconds": before + time.perf_counter() - started}))
    if summary["preempted"] or summary["step"] != job.cfg.steps:
        raise SweepInterrupted(f"{job.run_dir} stopped at step {summary['step']} of {job.cfg.steps}, saved")
    train_seconds = json.loads(timing.read_text())["seconds"]
    started = time.perf_counter()
    rows = job.measure(job.cfg)
    result = Finished(job, rows, train_seconds, time.perf_counter() - started, trained_now=True)
    job.result_path.parent.mkdir(exist_ok=True)
    tmp = job.result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "train_seconds": result.train_seconds,
                               "measure_seconds": result.measure_seconds}, indent=1))
    tmp.replace(job.result_path)
    loss = "" if summary["loss"] is None else f", loss {summary['loss']:.4f}"
    bar.write(f"  {job.label} seed {job.seed}: step {summary['step']}{loss} ({train_seconds:.0f} s training, "
              f"{result.measure_seconds:.0f} s measuring) in {job.run_dir}")
    return result


def main_exit_code(run) -> int:
    """`run()` (a sweep's main body) with the exit code of how it ended: its own, INTERRUPTED_EXIT_CODE after
    SIGINT/SIGTERM (one line says how to resume), 130 after a second Ctrl-C, 2 for a config error."""
    from transformer.config import ConfigError

    try:
        return run()
    except SweepInterrupted as e:
        print(f"interrupted ({e}); no table was written; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted at once (second Ctrl-C); rerun the same command to resume from the last checkpoints",
              file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- seeds: mean ± std


def mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation; NaN for one value)."""
    import statistics

    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def mean_pm_std(values, fmt: str) -> str:
    """"mean ± std" formatted with `fmt` ("mean" alone for one value)."""
    mean, std = mean_std(values)
    return format(mean, fmt) if len(values) < 2 else f"{format(mean, fmt)} ± {format(std, fmt)}"


def over_seeds(rows: list[dict], keys: list[str], values: list[str]) -> list[dict]:
    """One row per distinct `keys` (first-seen order) with, for each of `values`, <v>_mean, <v>_std and the
    list of per-seed values <v>_seeds, plus `seeds`, the number of rows averaged."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, group in groups.items():
        summary = dict(zip(keys, key)) | {"seeds": len(group)}
        for v in values:
            summary[f"{v}_mean"], summary[f"{v}_std"] = mean_std(r[v] for r in group)
            summary[f"{v}_seeds"] = [r[v] for r in group]
        out.append(summary)
    return out


# ---------------------------------------------------------------- provenance


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain", "matplotlib")


def provenance() -> dict:
    """The command line, git commit and dirty flag, package versions, jax backend and devices, CPU model and
    core count of this process."""
    import importlib.metadata
    import platform
    import subprocess

    import jax

    def git(*args) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "cwd": os.getcwd(),
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)},
        "python": platform.python_version(), "packages": versions,
        "jax": {"backend": jax.default_backend(), "device_count": jax.device_count(),
                "device_kinds": sorted({d.device_kind for d in jax.devices()})},
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "machine": platform.machine()},
    }


def _cpu_model() -> str | None:
    """The first "model name" of /proc/cpuinfo, else platform.processor()."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def write_manifest(results_dir: Path, *, sweep, sweep_file: str, finished: list[Finished], seconds: float) -> Path:
    """results_dir/manifest.json: provenance, the sweep (file and resolved fields), seeds, this invocation's wall
    time, the seconds of training (summed over the sessions that trained each run) and measuring summed over runs,
    and per run its label, seed, run_dir, full config and seconds."""
    import json

    manifest = provenance() | {
        "sweep_file": sweep_file, "sweep": json.loads(json.dumps(_plain(sweep), default=str)),
        "seeds": list(range(sweep.seeds)), "wall_seconds": seconds,
        "train_seconds": round(sum(f.train_seconds for f in finished), 1),
        "measure_seconds": round(sum(f.measure_seconds for f in finished), 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [{"label": f.job.label, "seed": f.job.seed, "run_dir": str(f.job.run_dir),
                  "train_seconds": round(f.train_seconds, 1), "measure_seconds": round(f.measure_seconds, 1),
                  "trained_now": f.trained_now, "config": f.job.cfg.to_dict()} for f in finished],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
