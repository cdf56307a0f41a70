"""Positional-encoding extrapolation: train short, test long.

    python experiments/pe_extrapolation.py --preset cpu    # 2 CPU cores, < 10 minutes
    python experiments/pe_extrapolation.py --preset gpu    # one GPU, < 15 minutes

One model per positional encoding (sinusoidal, learned, RoPE, ALiBi, NoPE) is trained on the KJV
corpus at length L with the library's own `train`, then evaluated on held-out text at L, 2L, 4L,
8L and 16L (non-overlapping chunks; plus sliding-window evaluation of RoPE). The RoPE model is also
evaluated with position interpolation (linear), NTK-aware, dynamic NTK and YaRN scaling applied at
inference without retraining (scale factor = eval length / L), and after a short fine-tune at 4L
with YaRN scaling (init_from the RoPE run). A second set of models per encoding is trained on the
synthetic passkey task (loss on the key digits only) and tested for retrieval accuracy across lengths
and depths with evaluate.passkey_accuracy, whose prompts at the training length are laid out exactly
like the training rows.

Writes perplexity.csv / perplexity.md / perplexity.png and passkey.csv / passkey.md / passkey.png
under --results-dir. Runs are resumable: rerunning the command continues unfinished training
runs from their checkpoints and reuses finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import harness


@dataclasses.dataclass(frozen=True)
class Preset(harness.TrainingPreset):
    """The perplexity models (trained at train_len, evaluated at train_len x factors) and the passkey models."""

    train_len: int
    factors: tuple[int, ...]
    eval_sequences: int
    finetune_steps: int
    passkey_len: int
    passkey_batch: int
    passkey_steps: int
    passkey_warmup: int
    passkey_factors: tuple[int, ...]
    passkey_trials: int
    block: int


PRESETS = {
    "cpu": Preset(train_len=64, factors=(1, 2, 4, 8, 16), d_model=128, layers=2, heads=4, batch=8, steps=400,
                  lr=2e-3, warmup=40, eval_sequences=8, finetune_steps=100, passkey_len=128, passkey_batch=16,
                  passkey_steps=250, passkey_warmup=20, passkey_factors=(1, 2, 4), passkey_trials=8, block=256),
    "gpu": Preset(train_len=512, factors=(1, 2, 4, 8, 16), d_model=512, layers=8, heads=8, batch=32, steps=3000,
                  lr=1e-3, warmup=200, eval_sequences=16, finetune_steps=300, passkey_len=512, passkey_batch=32,
                  passkey_steps=2000, passkey_warmup=200, passkey_factors=(1, 2, 4, 8), passkey_trials=20,
                  block=512),
}
ENCODINGS = ("sinusoidal", "learned", "rope", "alibi", "nope")
ROPE_SCALINGS = ("linear", "ntk", "dynamic_ntk", "yarn")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.Parser("pe_extrapolation", __doc__, PRESETS, runs_dir=True,
                            overrides="config overrides applied to every run, e.g. model.d_model=64")
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--skip-passkey", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.encodings.split(",")) - set(ENCODINGS))
    if unknown:
        parser.error(f"unknown encoding {unknown[0]!r}; choose from {', '.join(ENCODINGS)}")
    return args


def base_config(p: Preset, encoding: str, run_dir: Path, overrides: list[str]):
    from transformer.config import apply_overrides

    longest = p.train_len * max(p.factors)
    cfg = p.training_config(
        seq_len=p.train_len, run_dir=run_dir, checkpoints=4,
        model=dict(position=encoding, max_seq_len=longest if encoding == "learned" else p.train_len,
                   attention_block_size=p.block),
        eval_every=0, log_every=50)
    return apply_overrides(cfg, overrides).validate()


SECONDS = {"train": 0.0, "evaluate": 0.0}  # summed over runs, printed at the end


def train_run(cfg) -> None:
    SECONDS["train"] += harness.train_run(cfg)


def timed_evaluation(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    SECONDS["evaluate"] += time.perf_counter() - started
    return result


def single_device_mesh():
    import jax

    from transformer import sharding
    from transformer.config import MeshConfig

    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def perplexity_rows(p: Preset, runs: Path, encodings: list[str], overrides: list[str]) -> list[dict]:
    from transformer.evaluate import load_model, perplexity_at_lengths

    mesh = single_device_mesh()
    lengths = [p.train_len * f for f in p.factors]
    rows = []

    def record(method: str, results: list[dict]) -> None:
        for r in results:
            rows.append({"method": method, "length": r["length"], "perplexity": r["perplexity"], "loss": r["loss"]})
        print(f"  {method:>24}: " + "  ".join(f"{r['length']}:{r['perplexity']:.2f}" for r in results), flush=True)

    for encoding in encodings:
        cfg = base_config(p, encoding, runs / encoding, overrides)
        train_run(cfg)
        loaded = load_model(str(runs / encoding), mesh=mesh)
        record(encoding, timed_evaluation(perplexity_at_lengths, loaded, lengths, p.eval_sequences, mesh=mesh))
        if encoding != "rope":
            continue
        record("rope + sliding window", timed_evaluation(perplexity_at_lengths, loaded, lengths, p.eval_sequences,
                                                          mode="sliding", mesh=mesh))
        for scaling in ROPE_SCALINGS:
            results = []
            for length in lengths:
                factor = max(length / p.train_len, 1.0)
                model_cfg = dataclasses.replace(loaded.cfg.model, rope_scaling=scaling, rope_scaling_factor=factor)
                results += timed_evaluation(perplexity_at_lengths, loaded, [length], p.eval_sequences,
                                            model_cfg=model_cfg, mesh=mesh)
            record(f"rope + {scaling}", results)

        finetune_len = 4 * p.train_len
        ft = base_config(p, "rope", runs / "rope_yarn_finetune", overrides)
        ft = dataclasses.replace(
            ft,
            model=dataclasses.replace(ft.model, rope_scaling="yarn", rope_scaling_factor=4.0),
            data=dataclasses.replace(ft.data, seq_len=finetune_len, global_batch_size=max(p.batch // 4, 1)),
            optim=dataclasses.replace(ft.optim, warmup_steps=10, lr=p.lr / 4),
            checkpoint=dataclasses.replace(ft.checkpoint, init_from=str(runs / "rope")),
            steps=p.finetune_steps,
        ).validate()
        train_run(ft)
        record("rope + yarn fine-tune 4L", timed_evaluation(perplexity_at_lengths, str(runs / "rope_yarn_finetune"),
                                                             lengths, p.eval_sequences, mesh=mesh))
    return rows


def passkey_rows(p: Preset, runs: Path, encodings: list[str], overrides: list[str]) -> tuple[list[dict], int]:
    """(one row per encoding, length and depth; the number of key digits)."""
    from transformer.evaluate import passkey_accuracy

    mesh = single_device_mesh()
    lengths = [p.passkey_len * f for f in p.passkey_factors]
    rows = []
    for encoding in encodings:
        cfg = base_config(p, encoding, runs / f"passkey_{encoding}", overrides)
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model,
                                      max_seq_len=max(lengths) if encoding == "learned" else p.passkey_len),
            data=dataclasses.replace(cfg.data, dataset="passkey", seq_len=p.passkey_len,
                                     global_batch_size=p.passkey_batch),
            optim=dataclasses.replace(cfg.optim, warmup_steps=p.passkey_warmup),
            checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=max(p.passkey_steps // 4, 1)),
            steps=p.passkey_steps,
        ).validate()
        train_run(cfg)
        results = timed_evaluation(passkey_accuracy, str(runs / f"passkey_{encoding}"), lengths, DEPTHS,
                                   p.passkey_trials, mesh=mesh)
        for r in results:
            rows.append({"method": encoding, "length": r["length"], "depth": r["depth"], "accuracy": r["accuracy"],
                         "digit_accuracy": r["digit_accuracy"]})
        print(f"  passkey {encoding:>10}: " + "  ".join(
            f"{length}:{sum(r['accuracy'] for r in results if r['length'] == length) / len(DEPTHS):.2f}"
            for length in lengths), flush=True)
    return rows, cfg.data.passkey_digits


# ---------------------------------------------------------------- outputs


def pivot_markdown(rows: list[dict], row_key: str, col_key: str, value_key: str, fmt: str) -> str:
    row_values = sorted({r[row_key] for r in rows})
    columns = list(dict.fromkeys(r[col_key] for r in rows))
    cell = {(r[row_key], r[col_key]): r[value_key] for r in rows}
    table = [[rv] + [format(cell[(rv, c)], fmt) if (rv, c) in cell else "" for c in columns] for rv in row_values]
    return harness.markdown_table([row_key, *columns], table, align="---:")


def line_styles(methods: list[str]) -> dict[str, dict]:
    """A distinct colour per line (tab10, then black); solid for the encodings, a distinct dash pattern and
    marker for each variant of one ("rope + ...")."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + ["black", "gold"]
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


def plot_perplexity(rows: list[dict], train_len: int, path: Path) -> None:
    import matplotlib.ticker

    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method, style in line_styles(methods).items():
        points = sorted((r["length"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), label=method, markersize=4, linewidth=1.4, **style)
    ax.axvline(train_len, color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="held-out perplexity",
           title=f"Length extrapolation (trained at L={train_len})")
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    harness.save_figure(fig, path)


def plot_passkey(rows: list[dict], train_len: int, path: Path) -> None:
    import numpy as np

    plt = harness.pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = np.array([[next(r["accuracy"] for r in rows if r["method"] == method and r["length"] == length
                               and r["depth"] == depth) for length in lengths] for depth in DEPTHS])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set(title=method, xticks=range(len(lengths)), xticklabels=lengths, yticks=range(len(DEPTHS)),
               yticklabels=DEPTHS, xlabel="length")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.5 else "k", fontsize=7)
    axes[0][0].set_ylabel("depth")
    fig.suptitle(f"Passkey retrieval accuracy (trained at L={train_len})", fontsize=10)
    harness.save_figure(fig, path)


def write_perplexity(rows: list[dict], p: Preset, results_dir: Path) -> str:
    table = pivot_markdown(rows, "length", "method", "perplexity", ".2f")
    harness.write_results(results_dir, "perplexity", rows, table)
    plot_perplexity(rows, p.train_len, results_dir / "perplexity.png")
    return table


def write_passkey(rows: list[dict], digits: int, p: Preset, results_dir: Path) -> str:
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})

    def mean(method: str, length: int, key: str) -> float:
        return float(np.mean([r[key] for r in rows if r["method"] == method and r["length"] == length]))

    means = [{"method": m, "length": n, "accuracy": mean(m, n, "accuracy"),
              "digit_accuracy": mean(m, n, "digit_accuracy")} for m in methods for n in lengths]
    table = pivot_markdown(means, "length", "method", "accuracy", ".2f")
    digit_table = pivot_markdown(means, "length", "method", "digit_accuracy", ".2f")
    by_depth = [dict(r, **{"method, depth": f"{r['method']}, {r['depth']}"}) for r in rows]
    depth_table = pivot_markdown(by_depth, "method, depth", "length", "accuracy", ".2f")
    harness.write_results(results_dir, "passkey", rows, (
        f"Passkey retrieval, trained at L={p.passkey_len}, {p.passkey_trials} trials per (length, depth).\n\n"
        f"Accuracy (all {digits} digits right), mean over depths {', '.join(map(str, DEPTHS))}:\n\n{table}\n"
        f"Digit accuracy (chance 0.10), mean over depths:\n\n{digit_table}\n"
        f"Accuracy by depth (0 = key at the start of the filler, 1 = just before the question):\n\n{depth_table}"))
    plot_passkey(rows, p.passkey_len, results_dir / "passkey.png")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    p = PRESETS[args.preset]
    encodings = args.encodings.split(",")
    started = time.perf_counter()

    print(f"perplexity sweep ({args.preset}): train at L={p.train_len}", flush=True)
    rows = perplexity_rows(p, args.runs_dir, encodings, args.overrides)
    print(write_perplexity(rows, p, args.results_dir))
    if not args.skip_passkey:
        print(f"passkey sweep ({args.preset}): train at L={p.passkey_len}", flush=True)
        rows, digits = passkey_rows(p, args.runs_dir, encodings, args.overrides)
        print(write_passkey(rows, digits, p, args.results_dir))
    print(f"done in {time.perf_counter() - started:.0f} s (summed per run: training {SECONDS['train']:.0f} s, "
          f"evaluation {SECONDS['evaluate']:.0f} s); results in {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
