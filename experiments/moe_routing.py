"""MoE routing sweep: load-balancing coefficient, number of experts, top-k and router type.

    python experiments/moe_routing.py --preset cpu    # 2 CPU cores, 3 seeds
    python experiments/moe_routing.py --preset gpu    # one GPU
    python experiments/moe_routing.py --preset cpu --only softmax_topk_e8_k2_lb0 --seeds 1 steps=100   # own folder

The sweep is read from a sweep config file (experiments/configs/sweeps/moe_cpu.py for --preset cpu,
moe_gpu.py for gpu; `--sweep FILE` for another one; copy one to make a new sweep). Its `get_config()`
returns the fields of `Sweep`: a base Config (byte-level KJV MoE decoder, every layer MoE, capacity
factor 1.25, router z-loss off so the balancing loss is the only force on the load) and one tuple of
config overrides per run (router, experts, top-k, coefficient or any other field). Every run is trained
with the library's own `train` once per seed.

Every number comes from the runs' metrics.jsonl, which holds the router statistics of the
training batch at each logged step. Load is measured like Shazeer et al. (2017): per MoE layer,
the fraction of the batch's routed assignments (all k choices, counted before capacity drops)
that each expert received; CV(load) = std / mean over experts, max/mean = max / mean. A fully
collapsed router (every token to the same k experts) has CV = sqrt(E / k - 1) and
max/mean = E / k. Per-run values are means over MoE layers, at the last step ("end") and over
all logged steps ("avg").

Writes moe_routing.{csv,md} (mean ± std over seeds in the markdown; one CSV row per run and seed, plus
moe_routing_summary.csv), load_over_training.png, loss_vs_coef.png (when runs differ only in the
coefficient) and manifest.json under --results-dir. Run folders are named by a hash of their full config;
rerunning continues unfinished runs and reuses finished ones. SIGINT/SIGTERM stops after the current run
has saved; no table is written and the exit code is 75.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import harness

PRESETS = {"cpu": harness.SweepPreset("experiments/configs/sweeps/moe_cpu.py"),
           "gpu": harness.SweepPreset("experiments/configs/sweeps/moe_gpu.py")}
ROUTING_FIELDS = ("router", "num_experts", "top_k", "load_balance_coef")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An MoE routing sweep: `get_config()` of a sweep config file returns these fields as a dict."""

    base: object  # Config of every run: the MoE model (model.moe), data, optimizer, steps, log_every
    runs: tuple  # one tuple of config overrides of base per run, e.g. ("model.moe.load_balance_coef=0",)
    seeds: int = 3

    def validate(self) -> None:
        """Raise ConfigError unless every run's config is valid."""
        jobs(self, Path("runs"))

    def select(self, names: list[str]) -> "Sweep":
        """Only the runs labelled `names`."""
        from transformer.config import ConfigError

        labels = run_labels(self)
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise ConfigError(f"--only {unknown[0]!r} is not a run of this sweep; choose from {', '.join(labels)}")
        return dataclasses.replace(self, runs=tuple(r for r, label in zip(self.runs, labels) if label in names))


def parse_args(argv=None) -> argparse.Namespace:
    return harness.SweepParser("moe_routing", __doc__, PRESETS, Sweep,
                               only="comma-separated run labels to run, e.g. softmax_topk_e8_k2_lb0").parse_args(argv)


def run_config(sweep: Sweep, overrides: tuple):
    from transformer.config import apply_overrides

    return apply_overrides(sweep.base, overrides)


def run_labels(sweep: Sweep) -> list[str]:
    """<router>_e<experts>_k<top_k>_lb<coef> of each run, followed by its other overrides if it has any."""
    labels = []
    for overrides in sweep.runs:
        moe = run_config(sweep, overrides).model.moe
        others = [o.strip() for o in overrides if o.split("=", 1)[0].strip().split(".")[-1] not in ROUTING_FIELDS]
        labels.append(" ".join([f"{moe.router}_e{moe.num_experts}_k{moe.top_k}_lb{moe.load_balance_coef:g}",
                                *others]))
    if len(set(labels)) < len(labels):
        from transformer.config import ConfigError

        raise ConfigError(f"two runs of the sweep have the same label {labels}; give them different overrides")
    return labels


def jobs(sweep: Sweep, runs_dir: Path) -> list[harness.Job]:
    labels = run_labels(sweep)
    return [harness.Job(label, seed, harness.sweep_run_config(run_config(sweep, overrides), label, seed, runs_dir),
                        measure, "moe_routing summary")
            for seed in range(sweep.seeds) for label, overrides in zip(labels, sweep.runs)]


# ---------------------------------------------------------------- reading metrics.jsonl


def layer_mean(record: dict, stat: str) -> float:
    """Mean over MoE layers of "moe/<stat>/layer<l>" in one metrics record."""
    values = [v for k, v in record.items() if k.startswith(f"moe/{stat}/layer")]
    if not values:
        raise ValueError(f"metrics record of step {record.get('step')} has no moe/{stat}/layer* values; "
                         "is this an MoE run?")
    return sum(values) / len(values)


def expert_loads(record: dict, layer: int) -> list[float]:
    """Load fraction of each expert of MoE layer `layer` in one metrics record."""
    prefix = f"moe/expert_load/layer{layer}/expert"
    loads = {int(k[len(prefix):]): v for k, v in record.items() if k.startswith(prefix)}
    return [loads[e] for e in range(len(loads))]


def num_moe_layers(record: dict) -> int:
    return sum(k.startswith("moe/load_cv/layer") for k in record)


def measure(cfg) -> list[dict]:
    """The `measure` of a run: its summary row, from metrics.jsonl."""
    from transformer.metrics import read_metrics

    return [summarize(cfg.model.moe, read_metrics(cfg.run_dir))]


def summarize(moe, records: list[dict]) -> dict:
    """One row from a finished run's metrics records (`moe`: the run's MoEConfig)."""
    if not records or "eval_loss" not in records[-1]:
        raise ValueError("metrics.jsonl has no final eval record; was the run finished?")
    last = records[-1]
    avg = lambda stat: sum(layer_mean(r, stat) for r in records) / len(records)
    layers = num_moe_layers(last)
    dead = sum(load < 0.1 / moe.num_experts for layer in range(layers) for load in expert_loads(last, layer))
    return {
        "router": moe.router, "experts": moe.num_experts, "top_k": moe.top_k, "lb_coef": moe.load_balance_coef,
        "step": last["step"], "train_loss": last["loss"], "eval_loss": last["eval_loss"],
        "cv_load_end": layer_mean(last, "load_cv"), "max_over_mean_end": layer_mean(last, "load_max_over_mean"),
        "cv_load_avg": avg("load_cv"), "max_over_mean_avg": avg("load_max_over_mean"),
        "cv_collapsed": math.sqrt(moe.num_experts / moe.top_k - 1),
        "dead_experts_end": dead / layers, "dropped_end": layer_mean(last, "dropped_fraction"),
        "dropped_avg": avg("dropped_fraction"), "router_entropy_end": layer_mean(last, "router_entropy"),
        "expert_reuse_end": layer_mean(last, "expert_reuse"),
    }


# ---------------------------------------------------------------- outputs


COLUMNS = (("lb_coef", "LB coef", "g"), ("train_loss", "train loss", ".3f"),
           ("eval_loss", "eval loss", ".3f"), ("cv_load_end", "CV(load) end", ".2f"),
           ("cv_load_avg", "CV(load) avg", ".2f"), ("cv_collapsed", "CV collapsed", ".2f"),
           ("max_over_mean_end", "max/mean end", ".2f"), ("max_over_mean_avg", "max/mean avg", ".2f"),
           ("dead_experts_end", "dead experts/layer", ".1f"), ("dropped_end", "dropped", ".3f"),
           ("router_entropy_end", "router entropy", ".2f"), ("expert_reuse_end", "expert reuse", ".2f"))
MEASURED = [key for key, _, _ in COLUMNS if key not in ("lb_coef", "cv_collapsed")] + ["dropped_avg"]


def markdown_table(summary: list[dict]) -> str:
    """One line per run: "mean ± std" over seeds of each measured column."""
    def cell(row: dict, key: str, fmt: str) -> str:
        return harness.mean_pm_std(row[f"{key}_seeds"], fmt) if key in MEASURED else format(row[key], fmt)

    return harness.markdown_table(["run", *(title for _, title, _ in COLUMNS)],
                                  [[r["run"], *(cell(r, key, fmt) for key, _, fmt in COLUMNS)] for r in summary],
                                  align=[":---"] + ["---:"] * len(COLUMNS))


def seed_curves(records_by_seed: list[list[dict]], value) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) over seeds of value(record) at the steps every seed logged."""
    steps = sorted(set.intersection(*({r["step"] for r in records} for records in records_by_seed)))
    per_step = [[value(next(r for r in records if r["step"] == step)) for records in records_by_seed]
                for step in steps]
    means, stds = zip(*(harness.mean_std(values) for values in per_step))
    return steps, list(means), [0.0 if math.isnan(s) else s for s in stds]


def plot_load(runs: dict[str, dict], coef_labels: list[str], path: Path) -> None:
    """Load imbalance over training (mean over seeds, band ± std): CV(load) of the runs with the first run's
    experts and top-k (coefficient runs solid), CV(load) / CV(full collapse) of every run, and the per-expert load
    of seed 0's last MoE layer for the smallest and the default (else the largest) coefficient."""
    plt = harness.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    first = runs[coef_labels[0]]["moe"]
    for label, run in runs.items():
        moe, records = run["moe"], run["records"]
        swept = label in coef_labels
        style = dict(linestyle="-" if swept else ":", linewidth=1.6 if swept else 1)
        collapsed = math.sqrt(moe.num_experts / moe.top_k - 1)
        steps, cv, std = seed_curves(records, lambda r: layer_mean(r, "load_cv"))
        panels = [(axes[0][1], 1 / collapsed)]
        if (moe.num_experts, moe.top_k) == (first.num_experts, first.top_k):
            panels.append((axes[0][0], 1.0))
        for ax, scale in panels:
            (line,) = ax.plot(steps, [c * scale for c in cv], label=label, **style)
            ax.fill_between(steps, [(c - s) * scale for c, s in zip(cv, std)],
                            [(c + s) * scale for c, s in zip(cv, std)], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    seeds = len(runs[coef_labels[0]]["records"])
    axes[0][0].axhline(math.sqrt(first.num_experts / first.top_k - 1), color="grey", linewidth=0.8, linestyle="--",
                       label="full collapse")
    axes[0][0].set(xlabel="step", ylabel="CV(load), mean over MoE layers",
                   title=f"Load imbalance, {first.num_experts} experts top-{first.top_k} ({seeds} seeds, ± std)")
    axes[0][1].set(xlabel="step", ylabel="CV(load) / CV(full collapse)", ylim=(0, 1.05),
                   title="Imbalance relative to full collapse, all runs")
    axes[0][0].legend(fontsize=6)
    axes[0][1].legend(fontsize=6, ncol=2)
    by_coef = sorted(coef_labels, key=lambda label: runs[label]["moe"].load_balance_coef)
    default = [label for label in by_coef[1:] if runs[label]["moe"].load_balance_coef == 1e-2]
    shown = [by_coef[0], *(default or by_coef[-1:])][:len(by_coef)]
    for ax, label in zip(axes[1], shown):
        records = runs[label]["records"][0]
        layer = num_moe_layers(records[-1]) - 1
        loads = list(zip(*(expert_loads(r, layer) for r in records)))
        ax.stackplot([r["step"] for r in records], loads, labels=[f"expert {e}" for e in range(len(loads))])
        ax.set(xlabel="step", ylabel=f"load fraction, MoE layer {layer}", ylim=(0, 1),
               title=f"Per-expert load, LB coef {runs[label]['moe'].load_balance_coef:g} (seed 0)")
    axes[1][0].legend(fontsize=6, loc="upper right", ncol=2)
    harness.save_figure(fig, path)


def plot_coef(summary: list[dict], path: Path) -> None:
    """Eval loss, CV(load) and max/mean load against the coefficient, mean ± std over seeds as error bars (log x;
    coefficient 0 drawn one decade left of the smallest positive one)."""
    plt = harness.pyplot()
    rows = sorted(summary, key=lambda r: r["lb_coef"])
    positive = [r["lb_coef"] for r in rows if r["lb_coef"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-4
    xs = [r["lb_coef"] or zero_at for r in rows]
    labels = [f"{r['lb_coef']:g}" for r in rows]

    def errorbar(ax, key: str, **style) -> None:
        ax.errorbar(xs, [r[f"{key}_mean"] for r in rows],
                    yerr=[0.0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in rows], capsize=3, **style)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    errorbar(axes[0], "eval_loss", marker="o", label="held-out")
    errorbar(axes[0], "train_loss", marker="s", linestyle="--", label="train (last step)")
    axes[0].set(ylabel="cross-entropy (nats/byte)", title="Loss vs load-balancing coefficient")
    axes[0].legend(fontsize=8)
    for ax, key, title in ((axes[1], "cv_load", "CV(load)"), (axes[2], "max_over_mean", "max/mean load")):
        errorbar(ax, f"{key}_end", marker="o", label="last step")
        errorbar(ax, f"{key}_avg", marker="s", linestyle="--", label="mean over training")
        bound = rows[0]["cv_collapsed"] if key == "cv_load" else rows[0]["experts"] / rows[0]["top_k"]
        ax.axhline(bound, color="grey", linewidth=0.8, linestyle=":", label="full collapse")
        ax.set(ylabel=title, title=f"{title} vs coefficient (± std over {rows[0]['seeds']} seeds)")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set(xscale="log", xlabel="LB coefficient (0 shown at the left)")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
    harness.save_figure(fig, path)


def coefficient_runs(sweep: Sweep) -> list[str]:
    """Labels of the runs whose config equals the first run's but for model.moe.load_balance_coef."""
    def without_coef(overrides: tuple):
        cfg = run_config(sweep, overrides)
        return dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, moe=dataclasses.replace(cfg.model.moe, load_balance_coef=0.0)))

    first = without_coef(sweep.runs[0])
    return [label for label, overrides in zip(run_labels(sweep), sweep.runs) if without_coef(overrides) == first]


def main(argv=None) -> int:
    args = parse_args(argv)
    return harness.main_exit_code(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from transformer.metrics import read_metrics

    sweep: Sweep = args.sweep
    started = time.perf_counter()
    todo = jobs(sweep, args.runs_dir)
    print(f"MoE routing sweep {args.sweep_file}: {len(todo)} runs ({sweep.seeds} seeds), "
          f"results to {args.results_dir}", flush=True)
    finished = harness.run_jobs(todo, "moe sweep")
    rows = [{"run": f.job.label, "seed": f.job.seed} | row for f in finished for row in f.rows]
    summary = harness.over_seeds(rows, ["run", "router", "experts", "top_k", "lb_coef", "cv_collapsed"], MEASURED)
    table = markdown_table(summary)
    note = (f"Mean ± std over {sweep.seeds} seeds (seeds 0..{sweep.seeds - 1}; per-seed values in "
            "moe_routing.csv).\n\n")
    harness.write_results(args.results_dir, "moe_routing", rows, note + table)
    harness.write_csv(args.results_dir / "moe_routing_summary.csv", summary)
    runs = {}
    for f in finished:
        run_entry = runs.setdefault(f.job.label, {"moe": f.job.cfg.model.moe, "records": []})
        run_entry["records"].append(read_metrics(f.job.cfg.run_dir))
    coef_labels = coefficient_runs(sweep)
    plot_load(runs, coef_labels, args.results_dir / "load_over_training.png")
    if len(coef_labels) > 1:
        plot_coef([r for r in summary if r["run"] in coef_labels], args.results_dir / "loss_vs_coef.png")
    seconds = time.perf_counter() - started
    harness.write_manifest(args.results_dir, sweep=sweep, sweep_file=args.sweep_file, finished=finished,
                           seconds=seconds)
    print(table)
    print(f"done in {seconds:.0f} s (summed per run: training {sum(f.train_seconds for f in finished):.0f} s); "
          f"results in {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
