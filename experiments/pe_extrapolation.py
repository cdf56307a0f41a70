"""Positional-encoding extrapolation: train short, test long.

    python experiments/pe_extrapolation.py --preset cpu    # 2 CPU cores, 3 seeds
    python experiments/pe_extrapolation.py --preset gpu    # one GPU
    python experiments/pe_extrapolation.py --preset cpu --only rope,alibi --seeds 1 steps=200   # its own folder

The sweep is read from a sweep config file (experiments/configs/sweeps/pe_cpu.py for --preset cpu,
pe_gpu.py for gpu; `--sweep FILE` for another one; copy one to make a new sweep). Its `get_config()`
returns the fields of `Sweep`: a base Config and the grid. Per seed, one model per encoding column is
trained on the KJV corpus at length L = base.data.seq_len with the library's own `train`, then
evaluated on held-out text at L x each factor (non-overlapping chunks). The `rope` column's model is
also evaluated with a sliding window and with each RoPE scaling applied at inference without retraining
(scale factor = eval length / L), and fine-tuned with the `finetune` overrides starting from its
parameters. A second model per encoding is trained on the synthetic passkey task (loss on the key
digits only), after that encoding's stages in `passkey_curriculum` if any (each starting from the
previous one's parameters), and tested by greedy generation across lengths and depths with evaluate.passkey_accuracy,
whose prompts at the training length are laid out exactly like the training rows.

Writes perplexity.{csv,md,png} and passkey.{csv,md,png} (mean ± std over seeds in the markdown and as
bands in the plots; one CSV row per seed, plus *_summary.csv) and manifest.json (configs, command,
commit, versions, machine, seconds) under --results-dir. Run folders under --runs-dir are named by a
hash of their full config: rerunning continues unfinished runs from their checkpoints and reuses
finished, measured ones. SIGINT/SIGTERM stops after the current run has saved; no table is written and
the exit code is 75.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import harness

PRESETS = {"cpu": harness.SweepPreset("experiments/configs/sweeps/pe_cpu.py"),
           "gpu": harness.SweepPreset("experiments/configs/sweeps/pe_gpu.py")}
ABSOLUTE = ("sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A positional-encoding sweep: `get_config()` of a sweep config file returns these fields as a dict."""

    base: object  # Config of every run: model, data (data.seq_len = training length L), optimizer, steps
    encodings: dict  # column name -> overrides of base, e.g. {"alibi": ("model.position=alibi",)}
    factors: tuple  # perplexity at lengths L x factor
    eval_sequences: int  # held-out sequences per length
    rope: str = ""  # the column also evaluated with rope_scalings and a sliding window, and fine-tuned
    rope_scalings: tuple = ()  # model.rope_scaling values applied at inference, factor = length / L
    sliding_window: bool = False
    finetune: tuple = ()  # overrides of the rope column's config for a fine-tune from its parameters; (): none
    finetune_label: str = "rope + fine-tune"
    passkey: tuple = ()  # overrides of base for one passkey model per encoding; (): no passkey sweep
    passkey_curriculum: dict = dataclasses.field(default_factory=dict)  # column -> earlier stages, each a tuple of
    # overrides of its passkey config; each stage and then the passkey model start from the previous stage's parameters
    passkey_skip: tuple = ()  # encoding columns without a passkey model
    passkey_factors: tuple = (1, 2, 4)  # passkey accuracy at passkey training length x factor
    passkey_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 8  # prompts per (length, depth)
    seeds: int = 3

    def validate(self) -> None:
        """Raise ConfigError unless every named column exists and every run's config is valid."""
        from transformer.config import ConfigError

        for name in (*([self.rope] if self.rope else []), *self.passkey_skip, *self.passkey_curriculum):
            if name not in self.encodings:
                raise ConfigError(f"{name!r} (rope, passkey_skip or passkey_curriculum) is not an encoding column; "
                                  f"columns: {', '.join(self.encodings)}")
        jobs(self, Path("runs"))

    def select(self, names: list[str]) -> "Sweep":
        """Only the encoding columns in `names` (the RoPE variants go with the `rope` column)."""
        from transformer.config import ConfigError

        unknown = [n for n in names if n not in self.encodings]
        if unknown:
            raise ConfigError(f"--only {unknown[0]!r} is not an encoding of this sweep; "
                              f"choose from {', '.join(self.encodings)}")
        return dataclasses.replace(self, encodings={k: v for k, v in self.encodings.items() if k in names},
                                   rope=self.rope if self.rope in names else "",
                                   passkey_skip=tuple(k for k in self.passkey_skip if k in names),
                                   passkey_curriculum={k: v for k, v in self.passkey_curriculum.items() if k in names})

    @property
    def train_len(self) -> int:
        return self.base.data.seq_len

    @property
    def lengths(self) -> list[int]:
        return [self.train_len * f for f in self.factors]


def make_parser() -> harness.SweepParser:
    parser = harness.SweepParser("pe_extrapolation", __doc__, PRESETS, Sweep, customize=skip_passkey,
                                 only="comma-separated encoding columns to run, e.g. rope,alibi")
    parser.add_argument("--skip-passkey", action="store_true", help="only the perplexity half")
    return parser


def skip_passkey(sweep: Sweep, args: argparse.Namespace) -> Sweep:
    return dataclasses.replace(sweep, passkey=()) if args.skip_passkey else sweep


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


# ---------------------------------------------------------------- runs


def encoding_config(sweep: Sweep, column: str, extra: tuple = ()):
    """base + the column's overrides (+ `extra`); learned positions get a table as long as the longest length
    either half evaluates (a passkey prompt plus its generated answer is one token longer than its length)."""
    from transformer.config import apply_overrides

    cfg = apply_overrides(sweep.base, (*extra, *sweep.encodings[column]))
    if cfg.model.position == "learned":
        longest = max(sweep.lengths + [passkey_length(sweep) * f + 1 for f in sweep.passkey_factors])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, max_seq_len=max(cfg.model.max_seq_len, longest)))
    return cfg


def passkey_length(sweep: Sweep) -> int:
    from transformer.config import apply_overrides

    return apply_overrides(sweep.base, sweep.passkey).data.seq_len if sweep.passkey else 0


def jobs(sweep: Sweep, runs_dir: Path) -> tuple[list[harness.Job], list[harness.Job]]:
    """(perplexity jobs, passkey jobs), seed by seed."""
    perplexity, passkey = [], []
    for seed in range(sweep.seeds):
        for column in sweep.encodings:
            cfg = harness.sweep_run_config(encoding_config(sweep, column), column, seed, runs_dir)
            rope = column == sweep.rope
            key = {"lengths": sweep.lengths, "sequences": sweep.eval_sequences,
                   "scalings": sweep.rope_scalings if rope else (), "sliding": sweep.sliding_window and rope}
            perplexity.append(harness.Job(column, seed, cfg, measure_perplexity(sweep, column, rope), key))
            if rope and sweep.finetune:
                from transformer.config import apply_overrides

                ft = with_init(apply_overrides(dataclasses.replace(cfg, run_dir=""), sweep.finetune), cfg.run_dir)
                ft = harness.sweep_run_config(ft, sweep.finetune_label, seed, runs_dir)
                key = {"lengths": sweep.lengths, "sequences": sweep.eval_sequences}
                perplexity.append(harness.Job(sweep.finetune_label, seed, ft,
                                              measure_perplexity(sweep, sweep.finetune_label, False), key))
        for column in [c for c in sweep.encodings if c not in sweep.passkey_skip] if sweep.passkey else ():
            init_from = ""
            for stage, overrides in enumerate(sweep.passkey_curriculum.get(column, ())):
                cfg = encoding_config(sweep, column, (*sweep.passkey, *overrides))
                cfg = harness.sweep_run_config(with_init(cfg, init_from), f"passkey {column} stage {stage}", seed,
                                               runs_dir)
                passkey.append(harness.Job(f"{column} stage {stage}", seed, cfg, lambda cfg: [], "stage"))
                init_from = cfg.run_dir
            cfg = encoding_config(sweep, column, sweep.passkey)
            cfg = harness.sweep_run_config(with_init(cfg, init_from), f"passkey {column}", seed, runs_dir)
            lengths = [cfg.data.seq_len * f for f in sweep.passkey_factors]
            key = {"lengths": lengths, "depths": sweep.passkey_depths, "trials": sweep.passkey_trials}
            passkey.append(harness.Job(column, seed, cfg, measure_passkey(sweep, column, lengths), key))
    return perplexity, passkey


def with_init(cfg, init_from: str):
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=init_from))


def single_device_mesh():
    import jax

    from transformer import sharding
    from transformer.config import MeshConfig

    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def measure_perplexity(sweep: Sweep, method: str, rope: bool):
    """The `measure` of a perplexity job: rows of (method, length, perplexity, loss); for the rope column also the
    sliding-window and inference-time-scaling methods."""

    def measure(cfg) -> list[dict]:
        from transformer.evaluate import load_model, perplexity_at_lengths

        mesh = single_device_mesh()
        loaded = load_model(cfg.run_dir, mesh=mesh)
        rows = []

        def record(name: str, results: list[dict]) -> None:
            rows.extend({"method": name, "length": r["length"], "perplexity": r["perplexity"], "loss": r["loss"]}
                        for r in results)

        record(method, perplexity_at_lengths(loaded, sweep.lengths, sweep.eval_sequences, mesh=mesh))
        if rope and sweep.sliding_window:
            record(f"{method} + sliding window", perplexity_at_lengths(
                loaded, sweep.lengths, sweep.eval_sequences, mode="sliding", mesh=mesh))
        for scaling in sweep.rope_scalings if rope else ():
            results = []
            for length in sweep.lengths:
                model_cfg = dataclasses.replace(loaded.cfg.model, rope_scaling=scaling,
                                                rope_scaling_factor=max(length / sweep.train_len, 1.0))
                results += perplexity_at_lengths(loaded, [length], sweep.eval_sequences, model_cfg=model_cfg,
                                                 mesh=mesh)
            record(f"{method} + {scaling}", results)
        return rows

    return measure


def measure_passkey(sweep: Sweep, method: str, lengths: list[int]):
    """The `measure` of a passkey job: one row per (length, depth) with accuracy and digit accuracy."""

    def measure(cfg) -> list[dict]:
        from transformer.evaluate import passkey_accuracy

        results = passkey_accuracy(cfg.run_dir, lengths, sweep.passkey_depths, sweep.passkey_trials,
                                   mesh=single_device_mesh())
        return [{"method": method, "length": r["length"], "depth": r["depth"], "accuracy": r["accuracy"],
                 "digit_accuracy": r["digit_accuracy"]} for r in results]

    return measure


def seeded_rows(finished: list[harness.Finished]) -> list[dict]:
    return [{"seed": f.job.seed} | row for f in finished for row in f.rows]


# ---------------------------------------------------------------- outputs


def pivot_markdown(summary: list[dict], row_key: str, col_key: str, value: str, fmt: str) -> str:
    """A `row_key` x `col_key` table of "mean ± std" cells of `value` from `harness.over_seeds` rows."""
    row_values = list(dict.fromkeys(r[row_key] for r in summary))
    columns = list(dict.fromkeys(r[col_key] for r in summary))
    cell = {(r[row_key], r[col_key]): r for r in summary}

    def text(r: dict | None) -> str:
        if r is None:
            return ""
        return harness.mean_pm_std(r[f"{value}_seeds"], fmt)

    table = [[rv] + [text(cell.get((rv, c))) for c in columns] for rv in row_values]
    return harness.markdown_table([row_key, *columns], table, align="---:")


def line_styles(methods: list[str]) -> dict[str, dict]:
    """A distinct colour per line (tab10, then five more); solid for the encodings, a distinct dash pattern and
    marker for each variant of one ("rope + ...")."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + ["black", "gold", "darkviolet", "lime", "navy"]
    if len(methods) > len(colours):
        raise ValueError(f"{len(methods)} lines but only {len(colours)} distinct colours")
    dashes = ["--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (2, 2)), (0, (4, 1, 1, 1))]
    markers = ["s", "^", "v", "D", "P", "X", "*"]
    styles, variant = {}, 0
    for i, method in enumerate(methods):
        if "+" in method:
            style = dict(linestyle=dashes[variant % len(dashes)], marker=markers[variant % len(markers)])
            variant += 1
        else:
            style = dict(linestyle="-", marker="o")
        styles[method] = dict(color=colours[i], **style)
    return styles


def plot_perplexity(summary: list[dict], train_len: int, seeds: int, path: Path) -> None:
    """Mean perplexity against length per method, with a band from mean - std to mean + std over seeds."""
    import matplotlib.ticker

    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for method, style in line_styles(methods).items():
        points = sorted((r["length"], r["perplexity_mean"], r["perplexity_std"]) for r in summary
                        if r["method"] == method)
        lengths, means, stds = zip(*points)
        ax.plot(lengths, means, label=method, markersize=4, linewidth=1.4, **style)
        if seeds > 1:
            ax.fill_between(lengths, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=style["color"], alpha=0.15, linewidth=0)
    ax.axvline(train_len, color="grey", linewidth=0.8)
    band = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="held-out perplexity",
           title=f"Length extrapolation (trained at L={train_len}{band})")
    lengths = sorted({r["length"] for r in summary})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    harness.save_figure(fig, path)


def plot_passkey(summary: list[dict], train_len: int, seeds: int, path: Path) -> None:
    """Depth x length heatmaps of accuracy per encoding: mean over seeds, "± std" under each cell."""
    import numpy as np

    plt = harness.pyplot()
    methods = list(dict.fromkeys(r["method"] for r in summary))
    lengths = sorted({r["length"] for r in summary})
    depths = sorted({r["depth"] for r in summary})
    cell = {(r["method"], r["length"], r["depth"]): r for r in summary}
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mean = np.array([[cell[method, n, d]["accuracy_mean"] for n in lengths] for d in depths])
        std = np.array([[cell[method, n, d]["accuracy_std"] for n in lengths] for d in depths])
        ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set(title=method, xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(depths)),
               yticklabels=depths, xlabel="length")
        for (i, j), value in np.ndenumerate(mean):
            label = f"{value:.2f}" if seeds < 2 else f"{value:.2f}\n±{std[i, j]:.2f}"
            ax.text(j, i, label, ha="center", va="center", color="w" if value < 0.5 else "k", fontsize=6)
    axes[0][0].set_ylabel("depth")
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"Passkey retrieval accuracy (trained at L={train_len}{over})", fontsize=10)
    harness.save_figure(fig, path)


def write_perplexity(rows: list[dict], sweep: Sweep, results_dir: Path) -> str:
    summary = harness.over_seeds(rows, ["method", "length"], ["perplexity", "loss"])
    table = pivot_markdown(summary, "length", "method", "perplexity", ".2f")
    note = (f"Held-out perplexity, trained at L={sweep.train_len}; mean ± std over {sweep.seeds} seeds "
            f"(seeds 0..{sweep.seeds - 1}; per-seed values in perplexity.csv).\n\n")
    harness.write_results(results_dir, "perplexity", rows, note + table)
    harness.write_csv(results_dir / "perplexity_summary.csv", summary)
    plot_perplexity(summary, sweep.train_len, sweep.seeds, results_dir / "perplexity.png")
    return table


def write_passkey(rows: list[dict], sweep: Sweep, train_len: int, results_dir: Path) -> str:
    import numpy as np

    by_depth = harness.over_seeds(rows, ["method", "length", "depth"], ["accuracy", "digit_accuracy"])
    per_seed = [{"method": m, "length": n, "seed": s} | {
        key: float(np.mean([r[key] for r in rows if (r["method"], r["length"], r["seed"]) == (m, n, s)]))
        for key in ("accuracy", "digit_accuracy")}
        for m, n, s in dict.fromkeys((r["method"], r["length"], r["seed"]) for r in rows)]
    summary = harness.over_seeds(per_seed, ["length", "method"], ["accuracy", "digit_accuracy"])
    table = pivot_markdown(summary, "length", "method", "accuracy", ".2f")
    digit_table = pivot_markdown(summary, "length", "method", "digit_accuracy", ".2f")
    labelled = [dict(r, **{"method, depth": f"{r['method']}, {r['depth']}"}) for r in by_depth]
    depth_table = pivot_markdown(labelled, "method, depth", "length", "accuracy", ".2f")
    depths = ", ".join(map(str, sweep.passkey_depths))
    harness.write_results(results_dir, "passkey", rows, (
        f"Passkey retrieval, trained at L={train_len}, {sweep.passkey_trials} prompts per (length, depth); "
        f"mean ± std over {sweep.seeds} seeds of each seed's mean over depths {depths}.\n\n"
        f"Accuracy (every digit right):\n\n{table}\n"
        f"Digit accuracy (chance 0.10):\n\n{digit_table}\n"
        f"Accuracy by depth (0 = key at the start of the filler, 1 = just before the question):\n\n{depth_table}"))
    harness.write_csv(results_dir / "passkey_summary.csv", summary)
    plot_passkey(by_depth, train_len, sweep.seeds, results_dir / "passkey.png")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    return harness.main_exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    sweep: Sweep = args.sweep
    started = time.perf_counter()
    perplexity_jobs, passkey_jobs = jobs(sweep, args.runs_dir)
    print(f"positional-encoding sweep {args.sweep_file}: {len(perplexity_jobs) + len(passkey_jobs)} runs "
          f"({sweep.seeds} seeds), results to {args.results_dir}", flush=True)
    finished = harness.run_jobs(perplexity_jobs + passkey_jobs, "pe sweep")
    done_perplexity, done_passkey = finished[:len(perplexity_jobs)], finished[len(perplexity_jobs):]
    print(write_perplexity(seeded_rows(done_perplexity), sweep, args.results_dir))
    if passkey_jobs:
        print(write_passkey(seeded_rows(done_passkey), sweep, passkey_length(sweep), args.results_dir))
    seconds = time.perf_counter() - started
    harness.write_manifest(args.results_dir, sweep=sweep, sweep_file=args.sweep_file, finished=finished,
                           seconds=seconds)
    train = sum(f.train_seconds for f in finished)
    measure = sum(f.measure_seconds for f in finished)
    print(f"done in {seconds:.0f} s (summed per run: training {train:.0f} s, evaluation {measure:.0f} s); "
          f"results in {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
