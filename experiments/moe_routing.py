"""MoE routing sweep: load-balancing coefficient, number of experts, top-k and router type.

    python experiments/moe_routing.py --preset cpu    # 2 CPU cores, < 10 minutes
    python experiments/moe_routing.py --preset gpu    # one GPU, < 15 minutes

Byte-level MoE decoders (every layer MoE, capacity factor 1.25, router z-loss off so the
balancing loss is the only force on the load) are trained on the KJV corpus with the library's
own `train`. The sweep: Switch load-balancing coefficient 0, 1e-3, 1e-2, 1e-1 at a base setting
(softmax top-2 of E = 8 experts on cpu, 16 on gpu); E/2 and 2E experts; routers switch (top-1, with
and without the loss), mixtral, expert_choice and sigmoid_bias (aux-loss-free bias balancing,
coefficient 0), each with the default coefficient 1e-2 unless stated.

Every number comes from the runs' metrics.jsonl, which holds the router statistics of the
training batch at each logged step. Load is measured like Shazeer et al. (2017): per MoE layer,
the fraction of the batch's routed assignments (all k choices, counted before capacity drops)
that each expert received; CV(load) = std / mean over experts, max/mean = max / mean. A fully
collapsed router (every token to the same k experts) has CV = sqrt(E / k - 1) and
max/mean = E / k. Per-run values are means over MoE layers, at the last step ("end") and over
all logged steps ("avg").

Writes moe_routing.csv / moe_routing.md, load_over_training.png and (with the coef group)
loss_vs_coef.png under --results-dir. Runs are resumable: rerunning the command continues
unfinished runs from their checkpoints and reuses finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import harness


@dataclasses.dataclass(frozen=True)
class Preset(harness.TrainingPreset):
    """The model and training run of every setting, and the base routing the sweep varies."""

    seq_len: int
    experts: int
    top_k: int
    expert_variants: tuple[int, ...]
    log_every: int
    eval_batches: int
    router_z_loss: float
    dtype: str = "float32"


PRESETS = {
    "cpu": Preset(d_model=64, layers=2, heads=4, seq_len=64, batch=16, steps=200, lr=3e-3, warmup=20, experts=8,
                  top_k=2, expert_variants=(4, 16), log_every=10, eval_batches=8, router_z_loss=0.0),
    "gpu": Preset(d_model=512, layers=8, heads=8, seq_len=512, batch=32, steps=500, lr=1e-3, warmup=50,
                  experts=16, top_k=2, expert_variants=(8, 32), log_every=20, eval_batches=16, router_z_loss=0.0,
                  dtype="bfloat16"),
}
COEFS = (0.0, 1e-3, 1e-2, 1e-1)
DEFAULT_COEF = 1e-2
GROUPS = ("coef", "experts", "router")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One run of the sweep: the routing choices that differ from the base model."""

    router: str
    experts: int
    top_k: int
    coef: float

    @property
    def name(self) -> str:
        return f"{self.router}_e{self.experts}_k{self.top_k}_lb{self.coef:g}"


def sweep(p: Preset, groups: list[str], coefs: Sequence[float]) -> list[Setting]:
    """The settings of the chosen groups, base first, without repeats."""
    base = dict(experts=p.experts, top_k=p.top_k)
    settings = []
    if "coef" in groups:
        settings += [Setting("softmax_topk", coef=c, **base) for c in coefs]
    if "experts" in groups:
        settings += [Setting("softmax_topk", e, p.top_k, DEFAULT_COEF) for e in p.expert_variants]
    if "router" in groups:
        settings += [Setting("switch", p.experts, 1, DEFAULT_COEF), Setting("switch", p.experts, 1, 0.0),
                     Setting("mixtral", coef=DEFAULT_COEF, **base), Setting("expert_choice", coef=DEFAULT_COEF, **base),
                     Setting("sigmoid_bias", coef=0.0, **base)]
    return list(dict.fromkeys(settings))


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.Parser("moe_routing", __doc__, PRESETS, runs_dir=True,
                            overrides="config overrides applied to every run before the swept moe fields, "
                                      "e.g. steps=100")
    parser.add_argument("--coefs", type=harness.floats, default=COEFS, help="load-balancing coefficients")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"subset of {','.join(GROUPS)}")
    parser.add_argument("--compile-cache", default=None,
                        help="persistent JAX compilation cache (runs of the sweep share their init executables); "
                             "default: <runs-dir>/jax_cache, unless JAX already has a cache directory; '' disables")
    args = parser.parse_args(argv)
    if any(c < 0 for c in args.coefs):
        parser.error(f"--coefs {','.join(map(str, args.coefs))}: give one or more coefficients >= 0")
    args.groups = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown or not args.groups:
        bad = f"unknown group {unknown[0]!r}" if unknown else "--groups is empty"
        parser.error(f"{bad}; choose from {', '.join(GROUPS)}")
    if args.compile_cache is None:
        args.compile_cache = str(args.runs_dir / "jax_cache")
    return args


def use_compile_cache(path: str) -> None:
    """Persist compiled executables in `path` (identical inits and reruns skip XLA compilation), unless JAX
    already has a cache directory or `path` is empty."""
    import jax

    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_config(p: Preset, setting: Setting, run_dir: Path, overrides: list[str]):
    from transformer.config import MoEConfig, apply_overrides

    moe = MoEConfig(num_experts=p.experts, top_k=p.top_k, router_z_loss_coef=p.router_z_loss)
    cfg = p.training_config(
        seq_len=p.seq_len, run_dir=run_dir, checkpoints=2,
        model=dict(max_seq_len=p.seq_len, attention_block_size=p.seq_len, dtype=p.dtype, moe=moe),
        eval_every=p.steps, eval_batches=p.eval_batches, log_every=p.log_every)
    cfg = apply_overrides(cfg, overrides)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=dataclasses.replace(
        cfg.model.moe, router=setting.router, num_experts=setting.experts, top_k=setting.top_k,
        load_balance_coef=setting.coef)))
    return cfg.validate()


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


def summarize(setting: Setting, records: list[dict]) -> dict:
    """One CSV row from a finished run's metrics records."""
    if not records or "eval_loss" not in records[-1]:
        raise ValueError(f"run {setting.name}: metrics.jsonl has no final eval record; was the run finished?")
    last = records[-1]
    avg = lambda stat: sum(layer_mean(r, stat) for r in records) / len(records)
    layers = num_moe_layers(last)
    dead = sum(load < 0.1 / setting.experts for layer in range(layers) for load in expert_loads(last, layer))
    return {
        "run": setting.name, "router": setting.router, "experts": setting.experts, "top_k": setting.top_k,
        "lb_coef": setting.coef, "step": last["step"], "train_loss": last["loss"], "eval_loss": last["eval_loss"],
        "cv_load_end": layer_mean(last, "load_cv"), "max_over_mean_end": layer_mean(last, "load_max_over_mean"),
        "cv_load_avg": avg("load_cv"), "max_over_mean_avg": avg("load_max_over_mean"),
        "cv_collapsed": math.sqrt(setting.experts / setting.top_k - 1),
        "dead_experts_end": dead / layers, "dropped_end": layer_mean(last, "dropped_fraction"),
        "dropped_avg": avg("dropped_fraction"), "router_entropy_end": layer_mean(last, "router_entropy"),
        "expert_reuse_end": layer_mean(last, "expert_reuse"),
    }


# ---------------------------------------------------------------- outputs


COLUMNS = (("run", "run", "s"), ("lb_coef", "LB coef", "g"), ("train_loss", "train loss", ".3f"),
           ("eval_loss", "eval loss", ".3f"), ("cv_load_end", "CV(load) end", ".2f"),
           ("cv_load_avg", "CV(load) avg", ".2f"), ("cv_collapsed", "CV collapsed", ".2f"),
           ("max_over_mean_end", "max/mean end", ".2f"), ("max_over_mean_avg", "max/mean avg", ".2f"),
           ("dead_experts_end", "dead experts/layer", ".1f"), ("dropped_end", "dropped", ".3f"),
           ("router_entropy_end", "router entropy", ".2f"), ("expert_reuse_end", "expert reuse", ".2f"))


def markdown_table(rows: list[dict]) -> str:
    return harness.markdown_table([title for _, title, _ in COLUMNS],
                                  [[format(r[key], fmt) for key, _, fmt in COLUMNS] for r in rows],
                                  align=[":---"] + ["---:"] * (len(COLUMNS) - 1))


def plot_load(runs: dict[Setting, list[dict]], coef_settings: list[Setting], path: Path) -> None:
    """Load imbalance over training: CV(load) of the runs with the base experts and top-k (coefficient sweep
    solid), CV(load) / CV(full collapse) of every run, and the per-expert load of the last MoE layer for the
    smallest and the default (else the largest) coefficient."""
    plt = harness.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    base = coef_settings[0]
    for setting, records in runs.items():
        swept = setting in coef_settings
        style = dict(linestyle="-" if swept else ":", linewidth=1.6 if swept else 1)
        steps = [r["step"] for r in records]
        cv = [layer_mean(r, "load_cv") for r in records]
        if (setting.experts, setting.top_k) == (base.experts, base.top_k):
            axes[0][0].plot(steps, cv, label=setting.name, **style)
        collapsed = math.sqrt(setting.experts / setting.top_k - 1)
        axes[0][1].plot(steps, [c / collapsed for c in cv], label=setting.name, **style)
    axes[0][0].axhline(math.sqrt(base.experts / base.top_k - 1), color="grey", linewidth=0.8, linestyle="--",
                       label="full collapse")
    axes[0][0].set(xlabel="step", ylabel="CV(load), mean over MoE layers",
                   title=f"Load imbalance, {base.experts} experts top-{base.top_k}")
    axes[0][1].set(xlabel="step", ylabel="CV(load) / CV(full collapse)", ylim=(0, 1.05),
                   title="Imbalance relative to full collapse, all runs")
    axes[0][0].legend(fontsize=6)
    axes[0][1].legend(fontsize=6, ncol=2)
    by_coef = sorted(coef_settings, key=lambda s: s.coef)
    default = [s for s in by_coef[1:] if s.coef == DEFAULT_COEF]
    shown = [by_coef[0], *(default or by_coef[-1:])][:len(by_coef)]
    for ax, setting in zip(axes[1], shown):
        records = runs[setting]
        layer = num_moe_layers(records[-1]) - 1
        loads = list(zip(*(expert_loads(r, layer) for r in records)))
        ax.stackplot([r["step"] for r in records], loads, labels=[f"expert {e}" for e in range(len(loads))])
        ax.set(xlabel="step", ylabel=f"load fraction, MoE layer {layer}", ylim=(0, 1),
               title=f"Per-expert load, LB coef {setting.coef:g}")
    axes[1][0].legend(fontsize=6, loc="upper right", ncol=2)
    harness.save_figure(fig, path)


def plot_coef(rows: list[dict], path: Path) -> None:
    """Eval loss, CV(load) and max/mean load against the coefficient (log x; coefficient 0 drawn one decade
    left of the smallest positive one)."""
    plt = harness.pyplot()
    rows = sorted(rows, key=lambda r: r["lb_coef"])
    positive = [r["lb_coef"] for r in rows if r["lb_coef"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-4
    xs = [r["lb_coef"] or zero_at for r in rows]
    labels = [f"{r['lb_coef']:g}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].plot(xs, [r["eval_loss"] for r in rows], marker="o", label="held-out")
    axes[0].plot(xs, [r["train_loss"] for r in rows], marker="s", linestyle="--", label="train (last step)")
    axes[0].set(ylabel="cross-entropy (nats/byte)", title="Loss vs load-balancing coefficient")
    axes[0].legend(fontsize=8)
    for ax, key, title in ((axes[1], "cv_load", "CV(load)"), (axes[2], "max_over_mean", "max/mean load")):
        ax.plot(xs, [r[f"{key}_end"] for r in rows], marker="o", label="last step")
        ax.plot(xs, [r[f"{key}_avg"] for r in rows], marker="s", linestyle="--", label="mean over training")
        bound = rows[0]["cv_collapsed"] if key == "cv_load" else rows[0]["experts"] / rows[0]["top_k"]
        ax.axhline(bound, color="grey", linewidth=0.8, linestyle=":", label="full collapse")
        ax.set(ylabel=title, title=f"{title} vs coefficient")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set(xscale="log", xlabel="LB coefficient (0 shown at the left)")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
    harness.save_figure(fig, path)


def main(argv=None) -> list[dict]:
    from transformer.metrics import read_metrics

    args = parse_args(argv)
    p = PRESETS[args.preset]
    settings = sweep(p, args.groups, args.coefs)
    use_compile_cache(args.compile_cache)
    started = time.perf_counter()
    print(f"MoE routing sweep ({args.preset}): {len(settings)} runs", flush=True)
    runs = {}
    for setting in settings:
        run_dir = args.runs_dir / setting.name
        harness.train_run(run_config(p, setting, run_dir, args.overrides))
        runs[setting] = read_metrics(str(run_dir))
    rows = [summarize(s, records) for s, records in runs.items()]
    coef_settings = [s for s in settings if s.router == "softmax_topk" and s.experts == p.experts
                     and s.top_k == p.top_k and "coef" in args.groups]
    table = markdown_table(rows)
    harness.write_results(args.results_dir, "moe_routing", rows, table)
    plot_load(runs, coef_settings or list(runs)[:1], args.results_dir / "load_over_training.png")
    if coef_settings:
        plot_coef([r for s, r in zip(runs, rows) if s in coef_settings], args.results_dir / "loss_vs_coef.png")
    print(table)
    print(f"done in {time.perf_counter() - started:.0f} s; results in {args.results_dir}")
    return rows


if __name__ == "__main__":
    main()
