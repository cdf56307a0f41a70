"""Attention kernel benchmark: fwd and fwd+bwd TFLOP/s and peak memory vs sequence length.

    python experiments/bench_attention.py --preset cpu      # smoke test: 8 fake CPU devices, small lengths
    python experiments/bench_attention.py --preset gpu      # 8K..1M tokens, 16 heads, head dim 128, bf16

Methods: ring (ours, zigzag; ring size 1 and across all local devices), ring_contiguous (ours, no
zigzag), cudnn and xla (jax.nn.dot_product_attention), blockwise (transformer.ops.attention), and
the `ringattention` PyPI package's (LWM) pure-JAX ring when it is installed (`pip install -e ".[bench]"`;
on a machine without network, unzip its wheel into a folder put on PYTHONPATH). Also tabulates the
per-device work of the causal ring schedule, zigzag vs contiguous (`ops.layout.ring_work`).

FLOPs: forward 4*B*H*L^2*D (halved for causal), backward 2.5x forward (FlashAttention-2
convention), so fwd+bwd = 3.5x forward; ring TFLOP/s are summed over the ring's devices.
Memory is the compiled peak per device (XLA memory analysis: arguments + outputs + temporaries).
rel_err: forward output vs the float32 reference attention on the same inputs (lengths <= --check-max-len).
Writes bench.csv / bench.md / work_balance.csv / work_balance.md under --results-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import harness


@dataclasses.dataclass(frozen=True)
class Preset:
    """The defaults of the command-line flags of the same names."""

    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: str
    ring_sizes: tuple[int, ...]
    block_size: int
    iters: int
    cpu_devices: int
    max_seconds: float
    max_xla_gib: float


PRESETS = {
    "cpu": Preset(lengths=(256, 1024), heads=4, kv_heads=4, head_dim=32, batch=1, dtype="float32",
                  ring_sizes=(1, 8), block_size=128, iters=2, cpu_devices=8, max_seconds=60.0, max_xla_gib=2.0),
    "gpu": Preset(lengths=tuple(2 ** p * 1024 for p in range(3, 11)), heads=16, kv_heads=16, head_dim=128,
                  batch=1, dtype="bfloat16", ring_sizes=(1, -1), block_size=1024, iters=3, cpu_devices=0,
                  max_seconds=300.0, max_xla_gib=40.0),
}
METHODS = ("ring", "ring_contiguous", "cudnn", "xla", "blockwise", "ringattention")
PASSES = ("fwd", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.Parser("bench_attention", __doc__, PRESETS)
    parser.add_argument("--lengths", type=harness.ints, help="comma-separated sequence lengths (overrides the preset)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--ring-sizes", type=harness.ints, help="ring sizes; -1 means all local devices")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS)
    parser.add_argument("--non-causal", action="store_true", help="bidirectional attention (default causal)")
    parser.add_argument("--cpu-devices", type=int, help="fake CPU devices (sets XLA_FLAGS before jax starts)")
    parser.add_argument("--max-seconds", type=float, help="stop a method at longer lengths after a run this slow")
    parser.add_argument("--max-xla-gib", type=float, help="skip xla when its score matrices would exceed this")
    parser.add_argument("--check-max-len", type=int, default=4096,
                        help="compare forward outputs with the float32 reference up to this length")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    return args


@dataclasses.dataclass
class Row:
    method: str
    devices: int
    seq_len: int
    pass_: str
    status: str = "ok"
    ms: float = float("nan")
    tflops: float = float("nan")
    peak_mib: float = float("nan")
    rel_err: float = float("nan")


def attention_flops(args, seq_len: int, pass_: str) -> float:
    fwd = 4.0 * args.batch * args.heads * seq_len * seq_len * args.head_dim * (0.5 if not args.non_causal else 1.0)
    return fwd if pass_ == "fwd" else 3.5 * fwd


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    harness.fake_cpu_devices(args.cpu_devices)
    import jax

    from transformer.ops import ring_attention as ra

    print(f"backend {jax.default_backend()}, {len(jax.devices())} devices ({jax.devices()[0].device_kind}); "
          f"B={args.batch} H={args.heads} G={args.kv_heads} D={args.head_dim} {args.dtype} "
          f"{'bidirectional' if args.non_causal else 'causal'}")
    ring_sizes = sorted({len(jax.devices()) if r == -1 else r for r in args.ring_sizes})
    runs = []
    for method in args.methods:
        for size in (ring_sizes if method in ("ring", "ring_contiguous", "ringattention") else [1]):
            runs.append((method, size))
    rows: list[Row] = []
    for method, size in runs:
        too_slow = False
        for seq_len in args.lengths:
            for pass_ in PASSES:
                row = Row(method, size, seq_len, pass_)
                if too_slow:
                    row.status = f"skipped: a shorter run took > {args.max_seconds:.0f} s"
                else:
                    _bench_one(args, ra, row)
                    too_slow = row.status == "ok" and row.ms / 1e3 > args.max_seconds
                rows.append(row)
                print(_format_row(row), flush=True)
    balance = work_balance(args, ring_sizes)
    write_results(args, rows, balance)
    return rows


def _bench_one(args, ra, row: Row) -> None:
    import jax

    try:
        fn, inputs, skip = build(args, ra, row)
    except ValueError as e:
        row.status = f"skipped: {e}"
        return
    if skip:
        row.status = f"skipped: {skip}"
        return
    try:
        compiled = jax.jit(fn).lower(*inputs).compile()
        jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  (out of memory, unsupported kernel options: recorded in the table)
        row.status = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return
    row.ms = 1e3 * statistics.median(times)
    row.tflops = attention_flops(args, row.seq_len, row.pass_) / (row.ms / 1e3) / 1e12
    row.peak_mib = harness.compiled_memory_mib(compiled)[0]
    if row.pass_ == "fwd" and row.seq_len <= args.check_max_len:
        row.rel_err = _relative_error(args, row, compiled(*inputs), inputs)


def _relative_error(args, row: Row, out_BQHW, inputs) -> float:
    """max |out - reference| / max |reference|, the reference computed in float32 on the same inputs (for
    the zigzag ring, token i of the inputs is at position zigzag_permutation[i])."""
    import numpy as np

    from transformer.ops import layout
    from transformer.ops.attention import attention
    from transformer.ops.mask import AttentionMask

    q, k, v = (np.asarray(x, np.float32) for x in inputs[:3])
    causal = not args.non_causal
    positions = layout.zigzag_permutation(row.seq_len, row.devices)[None] if row.method == "ring" and causal else None
    expected = np.asarray(attention(q, k, v, AttentionMask(causal=causal), q_positions_BQ=positions,
                                    kv_positions_BK=positions, implementation="reference"))
    return float(np.max(np.abs(np.asarray(out_BQHW, np.float32) - expected)) / np.max(np.abs(expected)))


def build(args, ra, row: Row):
    """(function of (q, k, v, cot), inputs, skip reason or None) for one table row."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from transformer import sharding
    from transformer.ops import attention as attention_ops
    from transformer.ops import layout
    from transformer.ops.mask import AttentionMask

    B, L, H, G, D = args.batch, row.seq_len, args.heads, args.kv_heads, args.head_dim
    causal = not args.non_causal
    mask = AttentionMask(causal=causal)
    dtype = jnp.dtype(args.dtype)
    mesh, specs = None, None
    if row.method in ("ring", "ring_contiguous", "ringattention"):
        mesh = ra.ring_mesh(row.devices)
        specs = (sharding.logical_to_spec(("batch", "length", "heads", None), mesh, (B, L, H, D)),
                 sharding.logical_to_spec(("batch", "length", "kv_heads", None), mesh, (B, L, G, D)))

    if row.method in ("ring", "ring_contiguous"):
        zigzag = row.method == "ring" and causal
        positions = layout.zigzag_permutation(L, row.devices) if zigzag else None
        attend = functools.partial(ra.ring_attention_sharded, mask=mask, mesh=mesh, q_positions_BQ=positions,
                                   block_size=args.block_size)
    elif row.method == "blockwise":
        attend = functools.partial(attention_ops.attention, mask=mask, implementation="blockwise",
                                   block_size=args.block_size)
    elif row.method in ("xla", "cudnn"):
        if row.method == "cudnn" and jax.default_backend() != "gpu":
            return None, None, "cuDNN needs a GPU"
        score_gib = B * H * L * L * 4 * (1 if row.pass_ == "fwd" else 3) / 2 ** 30
        if row.method == "xla" and score_gib > args.max_xla_gib:
            return None, None, f"scores need ~{score_gib:.0f} GiB > --max-xla-gib={args.max_xla_gib:g}"
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=row.method)
    else:
        attend = _ringattention_package(args, mesh, specs, L)
        if isinstance(attend, str):
            return None, None, attend

    def forward(q, k, v, cot):
        return attend(q, k, v)

    def forward_backward(q, k, v, cot):
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(cot.astype(out.dtype))

    keys = jax.random.split(jax.random.key(0), 4)
    shapes = ((B, L, H, D), (B, L, G, D), (B, L, G, D), (B, L, H, D))
    placements = (specs[0], specs[1], specs[1], specs[0]) if specs else (None,) * 4
    inputs = []
    for key, shape, spec in zip(keys, shapes, placements):
        make = functools.partial(jax.random.normal, key, shape, dtype)
        if mesh is not None:
            make = jax.jit(make, out_shardings=NamedSharding(mesh, spec))
        inputs.append(make())
    return (forward if row.pass_ == "fwd" else forward_backward), inputs, None


def _ringattention_package(args, mesh, specs, seq_len):
    """The `ringattention` package's (LWM) pure-JAX ring, or why it is skipped. MHA only, so kv heads are
    repeated. Its module is loaded from its file: the package __init__ calls jax.lib.xla_bridge, which
    current jax no longer has."""
    import importlib.metadata
    import importlib.util

    import jax
    import jax.numpy as jnp

    try:
        path = importlib.metadata.distribution("ringattention").locate_file("ringattention/ringattention_jax.py")
    except importlib.metadata.PackageNotFoundError:
        return "the ringattention package is not installed (pip install ringattention==0.1.2 --no-deps)"
    spec = importlib.util.spec_from_file_location("ringattention_jax", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    repeat = args.heads // args.kv_heads
    chunk = min(args.block_size, seq_len // mesh.shape["sequence"])
    blockwise_kwargs = dict(causal_block_size=None if args.non_causal else 1, query_chunk_size=chunk,
                            key_chunk_size=chunk, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                            dtype=jnp.dtype(args.dtype), policy=jax.checkpoint_policies.nothing_saveable,
                            precision=None, prevent_cse=True)

    def local(q, k, v):
        k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))
        return module.ring_attention(q, k, v, None, None, None, "sequence", True, blockwise_kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(specs[0], specs[1], specs[1]), out_specs=specs[0],
                         check_vma=False)


def work_balance(args, ring_sizes) -> list[dict]:
    """Per-device causal ring work, zigzag vs contiguous, at the longest benchmarked length."""
    from transformer.ops import layout
    from transformer.ops.mask import AttentionMask

    rows = []
    length = max(args.lengths)
    for size in ring_sizes:
        if size < 2:
            continue
        for order in layout.LAYOUTS:
            try:
                work = layout.ring_work(length, size, layout=order, mask=AttentionMask(causal=not args.non_causal))
            except ValueError as e:
                print(f"work balance ring {size} {order}: {e}")
                continue
            pairs = work["pairs_computed"]
            rows.append(dict(ring_size=size, layout=order, seq_len=length,
                             blocks_min=int(work["blocks"].min()), blocks_max=int(work["blocks"].max()),
                             pairs_min=int(pairs.min()), pairs_max=int(pairs.max()),
                             imbalance=round(float(pairs.max() / pairs.mean()), 3)))
    if rows:
        print("\nper-device work of the ring schedule (pairs = (q, k) pairs in the kernels run; "
              "imbalance = max / mean, 1.0 is perfect)")
        print(_table(list(rows[0]), [list(r.values()) for r in rows]))
    return rows


def _format_row(row: Row) -> str:
    if row.status != "ok":
        return f"{row.method:>16} x{row.devices:<2} L={row.seq_len:>8} {row.pass_:>8}  {row.status}"
    return (f"{row.method:>16} x{row.devices:<2} L={row.seq_len:>8} {row.pass_:>8}  {row.ms:10.2f} ms "
            f"{row.tflops:8.3f} TFLOP/s {row.peak_mib:9.1f} MiB"
            + (f"  rel err {row.rel_err:.1e}" if row.rel_err == row.rel_err else ""))


def _table(header, rows) -> str:
    cells = [[str(c) for c in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.1e}" if 0 < abs(value) < 1e-2 else f"{value:.3f}"


def write_results(args, rows: list[Row], balance: list[dict]) -> None:
    header = ["method", "devices", "seq_len", "pass", "ms", "TFLOP/s", "peak_MiB", "rel_err", "status"]
    table = [[r.method, r.devices, r.seq_len, r.pass_, r.ms, r.tflops, r.peak_mib, r.rel_err, r.status]
             for r in rows]
    settings = (f"preset {args.preset}: B={args.batch} H={args.heads} G={args.kv_heads} D={args.head_dim} "
                f"{args.dtype} {'bidirectional' if args.non_causal else 'causal'}, block {args.block_size}, "
                f"median of {args.iters} runs\n\n")
    written = harness.write_results(args.results_dir, "bench", [dict(zip(header, r)) for r in table],
                                    settings + _markdown(header, table))
    if balance:
        written += harness.write_results(args.results_dir, "work_balance", balance,
                                         _markdown(list(balance[0]), [list(b.values()) for b in balance]))
    ok = [row for row in table if row[-1] == "ok"]
    print("\n" + _table(header[:-1], [r[:-1] for r in ok]))
    print(f"\nwrote {', '.join(map(str, written))}")


def _markdown(header, rows) -> str:
    return harness.markdown_table(header, [[_cell(c) for c in r] for r in rows])


if __name__ == "__main__":
    main()
