"""Training-loop speed: the library's `train` loop reading each step's metrics before dispatching the next
(synchronous=true, the loop before it was made asynchronous) against reading them one step behind (the default),
and the time to the first step of fresh and resumed starts with and without the persistent compilation cache.

    python experiments/bench_train_loop.py --preset cpu    # tiny, small (batch 2 x 128) and micro on the CPU, ~6 min
    python experiments/bench_train_loop.py --preset gpu    # tiny and small at full size in bfloat16 on the GPU(s)

micro is the tiny preset at d_model 32 and 32 tokens per row: a step as short as the host's work for it, as
small models are on an accelerator. On CPU the device is the host's own cores, so the other models leave the
host little to hide.

Loop: per model, `repeats` runs of each loop (alternating) of `steps` steps with log_every = steps / 2; the figures
are the medians over runs of the second logged window (the last half of the steps: no compilation, warm), from
the step-time breakdown the loop logs (`metrics.StepTimes`): steps/s = 1 / time/step, host fraction = (data +
host) / step, the share of a step the host spends on its own work between dispatches, and the device time per
step where it was measured ("–": never waited for, so host-bound). Programs come from a compilation cache under
the runs dir, so only the first run of a model compiles (outside the timed window anyway).

First step: `python -m transformer.train --preset tiny` processes: a fresh start into an empty cache; a restart
of that run with the same config (as after a preemption: its newest checkpoint removed) with the cache warm; the
same restart with compilation_cache_dir="" (no cache); a fresh start in a new run dir sharing the warm cache.
`first step` is time/first_step (from train() to the first step's results: init or restore, compilation, the
step); `process` is the wall time of the whole command, Python and JAX start-up included.

Writes loop.csv/md and first_step.csv/md under experiments/results/bench_train_loop/<preset>/.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Model:
    """A model timed: a name, the config preset it starts from and overrides."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Preset:
    """Platform, the models timed, steps per run, runs per loop and model, and the steps of the first-step runs
    (0: skip them)."""

    platform: str
    configs: tuple[Model, ...]
    steps: int
    repeats: int
    first_step_steps: int


MICRO = ("model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=32",
         "model.attention_block_size=32", "data.seq_len=32")  # a step as short as the host's work for it
PRESETS = {
    "cpu": Preset(platform="cpu", steps=40, repeats=5, first_step_steps=20,
                  configs=(Model("tiny", "tiny"), Model("small", "small", ("data.global_batch_size=2",
                                                                             "data.seq_len=128")),
                           Model("micro", "tiny", MICRO))),
    "gpu": Preset(platform="gpu", steps=200, repeats=3, first_step_steps=20,
                  configs=(Model("tiny", "tiny", ("model.dtype=bfloat16",)),
                           Model("small", "small", ("model.dtype=bfloat16",)))),
}
LOOPS = {"synchronous (before)": True, "asynchronous": False}
FIRST_STEP_STARTS = ("fresh, empty cache", "resumed, warm cache", "resumed, no cache", "fresh, shared warm cache")


def parse_args(argv=None):
    parser = harness.Parser("bench_train_loop", __doc__, PRESETS, runs_dir=True,
                            overrides="config overrides for every run, e.g. model.remat=full")
    parser.add_argument("--models", help="comma-separated model names of the preset (default: all)")
    parser.add_argument("--steps", type=int, help="steps per timed run (>= 4)")
    parser.add_argument("--repeats", type=int, help="runs per loop and model")
    parser.add_argument("--first-step-steps", type=int, help="steps of the first-step runs (0: skip them)")
    args = parser.parse_args(argv)
    configs = {model.name: model for model in PRESETS[args.preset].configs}
    names = [m for m in (args.models or ",".join(configs)).split(",") if m]
    if not names or any(name not in configs for name in names):
        parser.error(f"--models {','.join(names)}: choose from {', '.join(configs)}")
    args.models = [configs[name] for name in names]
    if args.steps < 4 or args.repeats < 1 or args.first_step_steps < 0:
        parser.error(f"--steps {args.steps}, --repeats {args.repeats}, --first-step-steps {args.first_step_steps}: "
                     "need steps >= 4, repeats >= 1, first-step steps >= 0")
    return args


def start_jax(platform: str):
    if platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.default_backend() != platform:
        raise ValueError(f"--preset {platform} needs the {platform} backend, but JAX started on "
                         f"{jax.default_backend()!r}; use the preset of this machine")
    return jax


def loop_config(args, model: Model, synchronous: bool, run_dir: Path):
    from transformer.config import apply_overrides, get_preset

    fixed = [f"steps={args.steps}", f"log_every={args.steps // 2}", "eval_every=0", "checkpoint.every_steps=0",
             "progress_bar=false", "tensorboard=false", f"run_dir={run_dir}",
             f"compilation_cache_dir={(args.runs_dir / 'jax_cache').absolute()}", f"synchronous={synchronous}"]
    return apply_overrides(get_preset(model.preset), [*model.overrides, *args.overrides, *fixed]).validate()


def time_loop(args, model: Model, loop: str, repeat: int) -> dict:
    """The second logged window of one run of `model` with `loop`."""
    from transformer import metrics, train

    run_dir = args.runs_dir / f"{model.name}-{'sync' if LOOPS[loop] else 'async'}-{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train.train(loop_config(args, model, LOOPS[loop], run_dir))
    record = metrics.read_metrics(str(run_dir))[-1]
    shutil.rmtree(run_dir)
    return record


def loop_rows(args) -> list[dict]:
    rows = []
    for model in args.models:
        windows = {loop: [] for loop in LOOPS}
        for repeat in range(args.repeats):
            for loop in LOOPS:
                windows[loop].append(time_loop(args, model, loop, repeat))
                print(f"  {model.name} {loop} #{repeat}: {1 / windows[loop][-1]['time/step']:.2f} steps/s", flush=True)
        for loop, records in windows.items():
            median = lambda key: statistics.median(r[key] for r in records) if all(key in r for r in records) else None
            step, device = median("time/step"), median("time/device")
            rows.append({"model": model.name, "loop": loop, "steps_per_s": 1 / step, "step_ms": 1e3 * step,
                         **{f"{part}_ms": 1e3 * median(f"time/{part}") for part in ("data", "host", "wait")},
                         "device_ms": 1e3 * device if device is not None else float("nan"),
                         "host_fraction": median("time/host_fraction"),
                         "tokens_per_s": median("tokens_per_second"), "runs": len(records)})
    return rows


def first_step_rows(args) -> list[dict]:
    """Time to the first step of `--preset tiny` started four ways (see the module docstring)."""
    from transformer import metrics

    root = args.runs_dir / "first_step"
    shutil.rmtree(root, ignore_errors=True)
    cache, steps, half = (root / "jax_cache").absolute(), args.first_step_steps, max(args.first_step_steps // 2, 1)
    common = ["--preset", "tiny", *args.overrides, f"steps={steps}", f"checkpoint.every_steps={half}",
              f"log_every={half}", "eval_every=0", "progress_bar=false", "tensorboard=false"]
    plans = [(root / "a", str(cache)), (root / "a", str(cache)), (root / "a", ""), (root / "b", str(cache))]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # it would win over the runs'
    env |= {"PYTHONPATH": str(REPO), **({"JAX_PLATFORMS": "cpu"} if args.preset == "cpu" else {})}
    rows = []
    for start, (run_dir, cache_dir) in zip(FIRST_STEP_STARTS, plans):
        if start.startswith("resumed"):
            shutil.rmtree(run_dir / "checkpoints" / str(steps))  # restart from step `half`, same config
        command = [sys.executable, "-m", "transformer.train", *common, f"run_dir={run_dir}",
                   f"compilation_cache_dir={cache_dir}"]
        began = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
        process = time.perf_counter() - began
        first = [r for r in metrics.read_metrics(str(run_dir)) if "time/first_step" in r][-1]
        rows.append({"start": start, "from_step": 0 if start.startswith("fresh") else half,
                     "first_step_s": first["time/first_step"], "process_s": process})
        print(f"  {start}: first step {first['time/first_step']:.1f} s, process {process:.1f} s", flush=True)
    return rows


def loop_markdown(rows: list[dict], args, device: str) -> str:
    table = harness.markdown_table(
        ["model", "loop", "steps/s", "step ms", "data ms", "host ms", "wait ms", "device ms", "host fraction"],
        [[r["model"], r["loop"], f"{r['steps_per_s']:.2f}", f"{r['step_ms']:.1f}", f"{r['data_ms']:.1f}",
          f"{r['host_ms']:.1f}", f"{r['wait_ms']:.1f}", _ms(r["device_ms"]), f"{r['host_fraction']:.3f}"]
         for r in rows], align=["---"] * 2 + ["---:"] * 7)
    return (f"Training loop on {device}: medians of {args.repeats} runs x the last {args.steps // 2} of {args.steps} "
            f"steps.\n\n{table}")


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def first_step_markdown(rows: list[dict], device: str) -> str:
    table = harness.markdown_table(["start", "from step", "first step s", "process s"],
                                   [[r["start"], r["from_step"], f"{r['first_step_s']:.1f}", f"{r['process_s']:.1f}"]
                                    for r in rows], align=["---", "---:", "---:", "---:"])
    return f"Time to the first step of `--preset tiny` on {device}.\n\n{table}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    jax = start_jax(PRESETS[args.preset].platform)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    out = {"loop": loop_rows(args), "first_step": first_step_rows(args) if args.first_step_steps else []}
    written = harness.write_results(args.results_dir, "loop", out["loop"], loop_markdown(out["loop"], args, device))
    if out["first_step"]:
        written += harness.write_results(args.results_dir, "first_step", out["first_step"],
                                         first_step_markdown(out["first_step"], device))
    for path in written:
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
