"""Long-context demonstration: one full training step (forward, backward, AdamW update) at up to 1M tokens.

    python experiments/long_context.py --preset cpu     # 8 fake CPU devices, ring over sequence=8, 4K..16K tokens
    python experiments/long_context.py --preset gpu     # one GPU, 1,048,576 tokens in one sequence
    python experiments/long_context.py --preset gpu --lengths 131072,262144,524288,1048576   # memory vs length

Everything is the library's own training path: `Config`/`ModelConfig` (bf16 on GPU, full remat,
`loss_chunk_size` so the L x vocab logits never exist at once), `sharding.make_mesh`,
`train.abstract_train_state` / `init_train_state` / `make_train_step`, `data.placement.place_batch`,
and KJV text from `data.make_dataset`. With mesh.sequence > 1 the attention layers run Ring Attention over the
zigzag-ordered sequence; with mesh.sequence = 1 (the GPU preset) they run `ops.attention`'s "auto"
kernel, cuDNN flash attention for these unpacked batches on a GPU.

Per length: compile time, step time (median over the timed steps after the first), tokens/s, the
compiled memory per device (XLA memory analysis: arguments + outputs - aliased + temporaries; on GPU
also the allocator's measured peak) and whether the loss is finite. The same-code-path check runs the
preset's step at --check-len twice from the same initial state and batch: on the preset's mesh (the
ring on CPU) and on one device with plain ("reference") attention, and prints the relative difference
of the loss and of the gradient norm. Writes long_context.csv / long_context.md (and long_context.png
for several lengths) under experiments/results/long_context/<preset>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import harness


@dataclasses.dataclass(frozen=True)
class Preset:
    """Where the preset runs, the defaults of --lengths, --ring, --check-len and --steps, and the model."""

    platform: str
    devices: int
    ring: int
    lengths: tuple[int, ...]
    check_len: int
    steps: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    dtype: str
    block: int
    loss_chunk: int


PRESETS = {
    "cpu": Preset(platform="cpu", devices=8, ring=8, lengths=(4096, 8192, 16384), check_len=1024, steps=1,
                  d_model=64, layers=2, heads=4, kv_heads=2, dtype="float32", block=256, loss_chunk=4096),
    "gpu": Preset(platform="gpu", devices=1, ring=1, lengths=(1 << 20,), check_len=4096, steps=2,
                  d_model=512, layers=4, heads=4, kv_heads=2, dtype="bfloat16", block=1024, loss_chunk=65536),
}
COLUMNS = ("seq_len", "devices", "ring", "kernel", "params", "compile_s", "step_s", "tokens_per_s", "peak_mib",
           "temp_mib", "measured_peak_mib", "loss", "finite", "status")
MIB = 2.0 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.Parser("long_context", __doc__, PRESETS,
                            overrides="config overrides, e.g. model.d_model=128 loss_chunk_size=0")
    parser.add_argument("--lengths", type=harness.ints,
                        help="comma-separated sequence lengths (default: the preset's)")
    parser.add_argument("--ring", type=int, help="mesh.sequence: the ring size (default: the preset's)")
    parser.add_argument("--check-len", type=int, help="length of the ring-vs-dense check (0: skip it)")
    parser.add_argument("--steps", type=int, help="train steps per length (the first is not timed when > 1)")
    args = parser.parse_args(argv)
    problems = [f"--lengths has {n}; lengths must be >= 2" for n in args.lengths if n < 2]
    if args.ring < 1:
        problems.append(f"--ring {args.ring} must be >= 1")
    if args.steps < 1:
        problems.append(f"--steps {args.steps} must be >= 1")
    if args.check_len < 0:
        problems.append(f"--check-len {args.check_len} must be >= 0 (0 skips the check)")
    multiple = 2 * args.ring if args.ring > 1 else 1
    for name, lengths in (("--lengths", args.lengths), ("--check-len", (args.check_len,) if args.check_len else ())):
        for n in lengths:
            if n % multiple:
                problems.append(f"{name} has {n}, which is not divisible by 2 x ring {args.ring} = {multiple} "
                                f"(zigzag gives every device two equal chunks); use a multiple of {multiple}")
    if problems:
        parser.error(problems[0])
    return args


def _start_jax(args):
    """Import jax on the preset's platform; the CPU preset asks for fake host devices first."""
    preset = PRESETS[args.preset]
    if preset.platform == "cpu" and "jax" not in sys.modules:
        harness.fake_cpu_devices(preset.devices)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if preset.platform == "gpu" and jax.default_backend() != "gpu":
        raise ValueError(f"--preset gpu needs a GPU, but the JAX backend is {jax.default_backend()!r}; "
                         "use --preset cpu")
    devices = jax.devices()
    if preset.platform == "cpu" and jax.default_backend() != "cpu":
        raise ValueError(f"--preset cpu must run on the CPU backend, but jax started on {jax.default_backend()!r}; "
                         "run it in a fresh process (the script sets JAX_PLATFORMS=cpu)")
    if args.ring > len(devices):
        raise ValueError(f"--ring {args.ring} needs {args.ring} devices but jax has {len(devices)}; "
                         "use a smaller ring (or, on CPU, start with more fake devices in XLA_FLAGS)")
    return jax, devices[:args.ring]


def make_config(args, seq_len: int, *, ring: int, kernel: str | None = None):
    """The preset's Config with the command-line overrides; seq_len, the ring size and (when given) the
    attention kernel are set last, so overrides cannot contradict them."""
    from dataclasses import replace

    from transformer.config import Config, DataConfig, MeshConfig, ModelConfig, apply_overrides

    p = PRESETS[args.preset]
    cfg = Config(
        model=ModelConfig(d_model=p.d_model, num_layers=p.layers, num_heads=p.heads, num_kv_heads=p.kv_heads,
                          rope_theta=10_000_000.0, dtype=p.dtype, remat="full", attention_block_size=p.block),
        data=DataConfig(dataset="kjv", global_batch_size=1),
        loss_chunk_size=p.loss_chunk, steps=100, eval_every=0, run_dir="runs/long_context",
        progress_bar=False, tensorboard=False)
    cfg = apply_overrides(cfg, list(args.overrides))
    model = replace(cfg.model, max_seq_len=seq_len, attention_kernel=kernel or cfg.model.attention_kernel)
    return replace(cfg, model=model, mesh=MeshConfig(data=1, sequence=ring),
                   data=replace(cfg.data, seq_len=seq_len)).validate()


@dataclasses.dataclass
class StepResult:
    seq_len: int
    devices: int
    ring: int
    kernel: str
    params: int
    compile_s: float
    step_s: float
    tokens_per_s: float
    peak_mib: float
    temp_mib: float
    measured_peak_mib: float
    loss: float
    finite: bool
    grad_norm: float
    status: str


def kernel_name(cfg, batch_np: dict) -> str:
    """The attention kernel the model runs for this config and batch (as the layers decide it)."""
    from transformer.layers.attention import attention_mask
    from transformer.ops import attention as attention_ops

    m = cfg.model
    mask = attention_mask(m, causal=True)
    if cfg.mesh.sequence > 1:
        return "ring/" + attention_ops.select_kernel(m.attention_kernel, mask, m.dtype, m.dim_per_head)
    pos, seg = batch_np["positions_BL"], batch_np["segment_ids_BL"]
    return attention_ops.select_kernel(m.attention_kernel, mask, m.dtype, m.dim_per_head,
                                       layout_ok=attention_ops.cudnn_layout_ok(pos, pos, seg, seg))


def initial_state(cfg, cache: dict):
    """cfg's initial train state, made once on one device by `init_train_state` and shared by every run
    whose state has the same shapes: the ring and the dense runs start from identical weights."""
    import jax

    from transformer import sharding
    from transformer.config import MeshConfig
    from transformer.train import abstract_train_state, init_train_state

    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with sharding.use_mesh(mesh):
        _, abstract, shardings = abstract_train_state(cfg, mesh)
        key = str(jax.tree.map(lambda x: (x.shape, x.dtype), abstract))
        if key not in cache:
            cache[key] = init_train_state(cfg, shardings)
    return cache[key]


def run_steps(cfg, devices, steps: int, initial) -> StepResult:
    """Compile the train step for `cfg` on `devices`, run `steps` steps from (a copy of) the state `initial`
    on KJV batch 0, measure. A step whose compiled memory exceeds the device's, or that runs out of memory,
    is reported in `status` instead of stopping a sweep."""
    import jax
    from flax import nnx

    from transformer import sharding
    from transformer.data import make_dataset
    from transformer.data.placement import place_batch
    from transformer.train import abstract_train_state, make_train_step

    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.validate_for_mesh(cfg, mesh)
    batch_np = make_dataset(cfg.data, "train").batch(0)
    kernel = kernel_name(cfg, batch_np)
    fresh = jax.tree.map(jax.numpy.copy, initial)  # the step donates its state; `initial` stays intact
    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        batch = place_batch(batch_np, mesh)
        step = jax.jit(make_train_step(cfg), static_argnums=0, donate_argnums=1, out_shardings=(shardings, None))
        started = time.perf_counter()
        compiled = step.lower(graphdef, abstract, batch).compile()
        compile_s = time.perf_counter() - started
        params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(abstract["model"], nnx.Param)))
        peak, temp = harness.compiled_memory_mib(compiled)
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
        status, first, seconds = "ok", {}, []
        if limit and peak * MIB > limit:
            status = f"skipped: compiled peak {peak / 1024:.1f} GiB > device memory {limit / 2**30:.1f} GiB"
        else:
            state = jax.device_put(fresh, shardings)
            try:
                for _ in range(steps):
                    started = time.perf_counter()
                    state, metrics = compiled(state, batch)
                    metrics = jax.device_get(metrics)
                    seconds.append(time.perf_counter() - started)
                    first = first or metrics
            except jax.errors.JaxRuntimeError as err:
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                status, seconds = "out of device memory at run time", []
    step_s = statistics.median(seconds[1:] or seconds) if seconds else float("nan")
    stats = devices[0].memory_stats() or {}
    measured = stats["peak_bytes_in_use"] / MIB if "peak_bytes_in_use" in stats else float("nan")
    return StepResult(cfg.data.seq_len, len(devices), cfg.mesh.sequence, kernel, params, compile_s, step_s,
                      cfg.data.global_batch_size * cfg.data.seq_len / step_s, peak, temp, measured,
                      float(first.get("loss", float("nan"))), bool(first.get("finite", False)),
                      float(first.get("grad_norm", float("nan"))), status)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def same_code_path_check(args, devices, results: dict, states: dict) -> dict:
    """The preset's step at --check-len on its mesh vs on one device with plain attention (same init, batch)."""
    n = args.check_len
    ring_cfg, dense_cfg = make_config(args, n, ring=args.ring), make_config(args, n, ring=1, kernel="reference")
    ring_result = results.get(n) or run_steps(ring_cfg, devices, 1, initial_state(ring_cfg, states))
    dense = run_steps(dense_cfg, devices[:1], 1, initial_state(dense_cfg, states))
    return {"seq_len": n, "ring": args.ring, "kernel": ring_result.kernel, "dense_kernel": dense.kernel,
            "loss": ring_result.loss, "dense_loss": dense.loss,
            "loss_rel_diff": relative_difference(ring_result.loss, dense.loss),
            "grad_norm": ring_result.grad_norm, "dense_grad_norm": dense.grad_norm,
            "grad_norm_rel_diff": relative_difference(ring_result.grad_norm, dense.grad_norm)}


def main(argv=None) -> dict:
    """Run the preset; returns {"rows": [StepResult, ...], "check": dict or None}."""
    args = parse_args(argv)
    jax, devices = _start_jax(args)
    configs = {n: make_config(args, n, ring=args.ring) for n in args.lengths}  # every config valid before compiling
    cfg0 = next(iter(configs.values()))
    print(f"preset {args.preset}: backend {jax.default_backend()} ({devices[0].device_kind}), ring {args.ring}, "
          f"d_model {cfg0.model.d_model}, {cfg0.model.num_layers} layers, {cfg0.model.num_heads} heads "
          f"({cfg0.model.kv_heads} kv), {cfg0.model.dtype}, remat {cfg0.model.remat}, "
          f"loss chunk {cfg0.loss_chunk_size} tokens", flush=True)
    results, states = {}, {}
    for n, cfg in configs.items():
        results[n] = row = run_steps(cfg, devices, args.steps, initial_state(cfg, states))
        print(_format(row), flush=True)
    check = same_code_path_check(args, devices, results, states) if args.check_len else None
    if check:
        print(_format_check(check), flush=True)
    write_results(args, list(results.values()), check)
    return {"rows": list(results.values()), "check": check}


def _format(r: StepResult) -> str:
    head = f"L={r.seq_len:>9,} {r.kernel:>16} x{r.devices}: compile {r.compile_s:6.1f} s, "
    memory = f"peak {r.peak_mib:9.1f} MiB/device (temp {r.temp_mib:.1f}"
    memory += f", measured {r.measured_peak_mib:.1f})" if r.measured_peak_mib == r.measured_peak_mib else ")"
    if r.status != "ok":
        return f"{head}{memory}: {r.status}"
    return (f"{head}step {r.step_s:8.2f} s, {r.tokens_per_s:10.0f} tok/s, {memory}, loss {r.loss:.4f} "
            f"{'finite' if r.finite else 'NOT FINITE'}")


def _format_check(c: dict) -> str:
    return (f"same code path at L={c['seq_len']}: {c['kernel']} x{c['ring']} loss {c['loss']:.6f} vs 1-device "
            f"{c['dense_kernel']} {c['dense_loss']:.6f} (rel diff {c['loss_rel_diff']:.1e}); grad norm "
            f"{c['grad_norm']:.6f} vs {c['dense_grad_norm']:.6f} (rel diff {c['grad_norm_rel_diff']:.1e})")


def _cell(column: str, value) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.4f}" if column == "loss" else f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_results(args, rows: list[StepResult], check: dict | None) -> None:
    table = [{c: getattr(r, c) for c in COLUMNS} for r in rows]
    markdown = harness.markdown_table(COLUMNS, [[_cell(c, v) for c, v in row.items()] for row in table])
    if check:
        markdown += f"\n{_format_check(check)}\n"
    written = harness.write_results(args.results_dir, "long_context", table,
                                    f"{_settings(args, rows[0].seq_len)}\n\n{markdown}")
    ok = [r for r in rows if r.status == "ok"]
    if len(ok) > 1:
        written.append(args.results_dir / "long_context.png")
        plot(ok, written[-1])
    print(f"wrote {', '.join(map(str, written))}")


def _settings(args, seq_len: int) -> str:
    """The markdown's first paragraph: what was run and how to read it."""
    cfg = make_config(args, seq_len, ring=args.ring)
    m = cfg.model
    return (f"preset {args.preset}: one train step (fwd + bwd + AdamW) on KJV text, batch 1, d_model "
            f"{m.d_model}, {m.num_layers} layers, {m.num_heads} heads ({m.kv_heads} kv), {m.dtype}, remat "
            f"{m.remat}, loss chunk {cfg.loss_chunk_size} tokens, attention block {m.attention_block_size}; "
            f"step time is the median of {max(args.steps - 1, 1)} timed step(s); peak = compiled "
            "arguments + outputs - aliased + temporaries per device."
            + (" CPU: the fake devices share the host's cores, so only memory, loss and the check are "
               "meaningful, not the speed." if PRESETS[args.preset].platform == "cpu" else ""))


def plot(rows: list[StepResult], path: Path) -> None:
    plt = harness.pyplot()
    lengths = [r.seq_len for r in rows]
    unit, scale = ("GiB", 1024) if max(r.peak_mib for r in rows) > 1024 else ("MiB", 1)
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    mem.plot(lengths, [r.peak_mib / scale for r in rows], "o-", label="compiled peak")
    if any(r.measured_peak_mib == r.measured_peak_mib for r in rows):
        mem.plot(lengths, [r.measured_peak_mib / scale for r in rows], "s--", label="measured peak (allocator)")
    mem.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel=f"{unit} per device",
            title="memory of one train step")
    mem.legend()
    speed.plot(lengths, [r.step_s for r in rows], "o-")
    speed.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="seconds",
              title="train step time")
    harness.save_figure(fig, path)


def cli(argv=None) -> int:
    from transformer.config import ConfigError

    try:
        main(argv)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
