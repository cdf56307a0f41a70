"""Compile the train step ahead of time for a target mesh; report memory per device and FLOPs, or that it
does not fit and what to change.

Know whether a config fits before renting a pod:

    python -m transformer.aot --preset 1b mesh.fsdp=256 --devices 256            # 256 stand-in CPU devices
    python -m transformer.aot --preset 1b --topology v5e:16x16                    # a TPU topology (needs libtpu)
    python -m transformer.aot --preset 1b --topology v5e:4x4,v5e:8x8,v5e:16x16    # the smallest that fits: 8x8

With `--platform cpu` (the default without --topology) the step is compiled by XLA's CPU compiler for
`--devices` fake host devices (set through XLA_FLAGS before jax starts), so the numbers are an estimate of
the accelerator's: sharding, parameter/optimizer state and remat are exact, fusion and layout-dependent
temporaries differ. `--topology` compiles for real TPU topologies (`--platform tpu`; jax's AOT topology API,
no TPU attached needed; libtpu must be installed: pip install -e '.[tpu]'; off a TPU VM libtpu logs that it
cannot find the accelerator type, which is harmless). Given several, comma-separated, they are tried from
the fewest chips up until one fits. A mesh axis of -1 takes the devices each topology has (a device is one
chip on v5e, v5p and v6e).

Exit codes: 0 when the step compiles (fits), with the report; 1 when XLA finds it does not fit in HBM, with
the verdict (needed and available GiB per device, parsed from XLA's RESOURCE_EXHAUSTED error) and what to
change (more chips, a smaller batch per device, remat, gradient accumulation, fsdp, a chunked loss); 2 with
one line when the config or mesh is invalid for every target.

FLOPs: XLA's cost analysis of the compiled step next to `flops_per_token`'s model FLOPs (the MFU
numerator) and executed FLOPs. XLA counts a while loop's body once, so the report lists the loops
(scanned layers, blockwise or ring attention, chunked loss, gradient accumulation) and other work
(remat) that make its count differ; with none, it shows XLA's count over the executed FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, replace
from typing import Callable

from transformer.config import Config, ConfigError, config_from_args, print_help_if_asked

PLATFORMS = ("cpu", "tpu")
HBM_BYTES = {"TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30, "TPU v6 lite": 32 * 2**30}  # per device (= chip)
_NO_DATA = "not-read-by-aot"  # data.paths stand-in: presets on 'npy' data compile without their files


@dataclass(frozen=True)
class AotReport:
    devices: int
    mesh: dict
    params: int
    state_bytes_per_device: int  # params + optimizer state, from the shardings
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments
    temp_bytes: int
    code_bytes: int
    xla_flops_per_device: float | None
    model_flops_per_step: float  # 6N + attention (flops_per_token): the MFU numerator
    executed_flops_per_step: float  # flops_per_token(executed=True): what the matmuls run
    xla_flops_caveats: tuple[str, ...]  # why XLA's count differs from the executed FLOPs; () when comparable
    device_kind: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak estimate per device: live arguments + fresh outputs + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclass(frozen=True)
class OutOfMemory:
    """XLA's verdict that the step does not fit in a device's memory; byte counts are None when its message
    did not give them."""

    needed_bytes: float | None  # what XLA says the program needs per device (`needed_what`)
    available_bytes: float | None  # HBM per device
    needed_what: str  # "HLO temporaries" (the state comes on top) or "total"
    message: str  # XLA's line
    devices: int = 0
    mesh: dict | None = None
    state_bytes_per_device: int = 0  # params + optimizer state, from the shardings

    @property
    def total_needed_bytes(self) -> float | None:
        """At least this much per device: XLA's figure, plus the state when XLA counted temporaries only."""
        if self.needed_bytes is None:
            return None
        return self.needed_bytes + (self.state_bytes_per_device if self.needed_what == "HLO temporaries" else 0)


_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"
_OOM_PATTERNS = (  # (pattern with needed then available size, what the needed size counts)
    (re.compile(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)"), "HLO temporaries"),
    (re.compile(rf"Used {_SIZE} of {_SIZE} hbm"), "total"),
)


def _size_bytes(number: str, unit: str) -> float:
    return float(number) * 1024 ** "BKMGTP".index(unit or "B")


def parse_out_of_memory(message: str) -> OutOfMemory | None:
    """The OutOfMemory an XLA compile error `message` states (RESOURCE_EXHAUSTED), None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    line = next((ln.strip() for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message.strip())
    for pattern, what in _OOM_PATTERNS:
        found = pattern.search(message)
        if found:
            needed, available = _size_bytes(*found.group(1, 2)), _size_bytes(*found.group(3, 4))
            return OutOfMemory(needed, available, what, line)
    return OutOfMemory(None, None, "total", line)


def _jax_backends_started() -> bool:
    """Whether jax has created its backends (after which XLA_FLAGS no longer applies); importing jax is not enough."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # the private API moved: target_devices reports a shortfall in one line
        return False


def _fake_cpu_devices(count: int) -> None:
    """Ask for `count` CPU devices; must run before jax creates its backends."""
    if _jax_backends_started():
        import jax
        if jax.device_count() < count:
            raise ValueError(f"jax already started with {jax.device_count()} devices, fewer than --devices {count}; "
                             "run `python -m transformer.aot` in a fresh process")
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def target_devices(platform: str, count: int | None, topology: str | None):
    """The devices to compile for: the first `count` CPU devices, or a TPU topology's devices."""
    import jax

    if platform == "cpu":
        devices = jax.devices("cpu")
        if count is not None and len(devices) < count:
            raise ValueError(f"--devices {count} asked for, but jax has only {len(devices)} CPU devices")
        return devices[:count] if count is not None else devices
    if not topology:
        raise ValueError("--platform tpu needs --topology, e.g. v5e:16x16 or v4:2x2x4")
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as err:  # the TPU compiler plugin is missing, busy, or the name is unknown
        if "lockfile" in str(err):
            raise ValueError(f"cannot build TPU topology {topology!r}: another process holds libtpu; set "
                             "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile alongside it") from None
        raise ValueError(f"cannot build TPU topology {topology!r} ({type(err).__name__}: {err}); it needs libtpu "
                         "(pip install -e '.[tpu]') and a name like v5e:16x16") from None
    if count is not None and count != len(devices):
        raise ValueError(f"--devices {count} does not match topology {topology!r} with {len(devices)} devices")
    return devices


def compile_train_step(cfg: Config, mesh):
    """The train step of `transformer.train`, lowered with abstract (sharded) state and batch and compiled."""
    import jax

    from transformer import sharding
    from transformer.train import abstract_train_state, batch_shapes, make_train_step

    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        placed = lambda shape, dtype: jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.named_sharding(("batch", "length"), mesh, shape))
        batch = {key: placed(*shape_and_dtype) for key, shape_and_dtype in batch_shapes(cfg).items()}
        step = jax.jit(make_train_step(cfg), static_argnums=0, donate_argnums=1, out_shardings=(shardings, None))
        compiled = step.lower(graphdef, abstract, batch).compile()
    return compiled, abstract


def state_bytes_per_device(abstract) -> int:
    """Bytes of one device's shards of the abstract train state (params + optimizer state)."""
    import jax

    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)))


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled computation per device from XLA's cost analysis (None when it gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # one dict per device program in older jax
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def xla_flops_caveats(cfg: Config, mesh, platform: str) -> tuple[str, ...]:
    """Why XLA's FLOP count of this train step differs from `flops_per_token(executed=True)`: loops whose
    body XLA counts once, and work the formula leaves out. Empty when the two are comparable."""
    from transformer.layers.attention import attention_mask
    from transformer.loss import num_loss_chunks
    from transformer.ops.attention import ring_size, select_kernel
    from transformer.train import target_len

    model, accum = cfg.model, cfg.optim.grad_accum_steps
    groups = (model.num_layers - model.lead_layers) // model.layer_group_size
    chunks = num_loss_chunks(cfg.data.global_batch_size // accum, target_len(cfg), cfg.loss_chunk_size) \
        if cfg.loss_chunk_size else 1
    ring = ring_size(mesh)
    kernel = select_kernel(model.attention_kernel, attention_mask(model, causal=True), model.dtype,
                           model.dim_per_head, platform=platform)
    caveats = {
        f"scanned layers: loop body counted once, not {groups} times (model.scan_layers=false unrolls it)":
            model.scan_layers and groups > 1,
        f"gradient accumulation: loop body counted once, not {accum} times": accum > 1,
        f"chunked loss: loop body counted once, not {chunks} times": chunks > 1,
        f"ring attention: loop body counted once, not {ring} times": ring > 1,
        "blockwise attention: its block loops counted once, masked tiles skipped, scores recomputed backward":
            ring == 1 and kernel == "blockwise",
        "cuDNN attention: a custom call whose FLOPs XLA does not count": ring == 1 and kernel == "cudnn",
        f"remat={model.remat!r} recomputes forward work in the backward pass": model.remat != "none",
        "dropless MoE: on CPU ragged_dot computes every expert for every assignment":
            model.moe.num_experts > 0 and model.moe.dropless and platform == "cpu",
    }
    return tuple(text for text, applies in caveats.items() if applies)


def analyze(cfg: Config, mesh, compiled, abstract) -> AotReport:
    import jax
    from flax import nnx

    from transformer.train import step_work

    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(abstract["model"], nnx.Param)))
    memory = compiled.memory_analysis()
    per_step = lambda executed: math.prod(step_work(cfg, executed=executed))
    return AotReport(
        devices=mesh.size, mesh=dict(mesh.shape), params=params,
        state_bytes_per_device=state_bytes_per_device(abstract),
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), xla_flops_per_device=xla_flops(compiled),
        model_flops_per_step=per_step(False), executed_flops_per_step=per_step(True),
        xla_flops_caveats=xla_flops_caveats(cfg, mesh, mesh.devices.flat[0].platform),
        device_kind=mesh.devices.flat[0].device_kind)


def run(cfg: Config, devices) -> AotReport:
    """Build the mesh over `devices`, validate, compile and analyze (raises ConfigError on a bad fit)."""
    mesh = prepare_mesh(cfg, devices)
    compiled, abstract = compile_train_step(cfg, mesh)
    return analyze(cfg, mesh, compiled, abstract)


def fit(cfg: Config, devices) -> AotReport | OutOfMemory:
    """`run`, or the OutOfMemory XLA reports when the step does not fit in a device's memory (any other
    compile error propagates)."""
    mesh = prepare_mesh(cfg, devices)
    try:
        compiled, abstract = compile_train_step(cfg, mesh)
    except Exception as err:
        oom = parse_out_of_memory(str(err))
        if oom is None:
            raise
        from transformer.train import abstract_train_state

        _, abstract, _ = abstract_train_state(cfg, mesh)
        return replace(oom, devices=mesh.size, mesh=dict(mesh.shape),
                       state_bytes_per_device=state_bytes_per_device(abstract))
    return analyze(cfg, mesh, compiled, abstract)


def prepare_mesh(cfg: Config, devices):
    from transformer import sharding

    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.validate_for_mesh(cfg, mesh)
    return mesh


# ---------------------------------------------------------------- several targets


@dataclass(frozen=True)
class Attempt:
    target: str  # a topology name, or "N cpu devices"
    result: AotReport | OutOfMemory | str  # str: why the config cannot use this target


def topology_chips(name: str) -> int | None:
    """Chips of a topology name like v5e:4x8 or v4:2x2x4 (the product of its dimensions), None if unparsable."""
    dims = name.partition(":")[2].split("x")
    return math.prod(int(d) for d in dims) if all(d.isdigit() for d in dims) else None


def search(cfg: Config, targets: list[str], attempt: Callable[[Config, str], AotReport | OutOfMemory]) -> list[Attempt]:
    """Try `targets` from the fewest chips up (unparsable names last) until one fits; `attempt(cfg, target)`
    compiles for one, raising ConfigError or ValueError when the config cannot use it."""
    order = sorted(targets, key=lambda t: (topology_chips(t) is None, topology_chips(t) or 0))
    attempts = []
    for target in order:
        try:
            result = attempt(cfg, target)
        except (ConfigError, ValueError) as err:
            result = str(err)
        attempts.append(Attempt(target, result))
        if isinstance(result, AotReport):
            break
    return attempts


# ---------------------------------------------------------------- reports


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _gib_short(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(report: AotReport, platform: str) -> str:
    mesh = " x ".join(f"{axis}={size}" for axis, size in report.mesh.items() if size > 1) or "1 device"
    lines = [
        f"train step compiled for {report.devices} {platform} devices, mesh {mesh}",
        f"parameters:               {report.params:,}",
        f"state per device:         {_gib(report.state_bytes_per_device)} (params + optimizer, from shardings)",
        "memory per device (XLA memory_analysis):",
        f"  arguments:              {_gib(report.argument_bytes)}",
        f"  outputs:                {_gib(report.output_bytes)} ({_gib(report.alias_bytes)} reuse donated inputs)",
        f"  temporaries:            {_gib(report.temp_bytes)}",
        f"  total:                  {_gib(report.total_bytes)} (arguments + outputs - donated + temporaries)",
        f"  generated code:         {report.code_bytes / 2**20:.1f} MiB",
    ]
    lines += _flops_lines(report)
    hbm = HBM_BYTES.get(report.device_kind)
    if hbm and report.total_bytes > hbm:
        lines.append(f"note: XLA's compile-time HBM check passed, but its memory analysis sums to "
                     f"{_gib_short(report.total_bytes)}, more than the {_gib_short(hbm)} of a {report.device_kind} "
                     "device: the margin is uncertain until it runs")
    if platform == "cpu":
        lines.append("(CPU compile: an estimate of accelerator memory; temporaries depend on the target compiler)")
    return "\n".join(lines)


def _flops_lines(report: AotReport) -> list[str]:
    per_step = lambda flops: f"{flops:.4g} total, {flops / report.devices:.4g} per device"
    lines = [f"model FLOPs per step:      {per_step(report.model_flops_per_step)} (6N + attention: MFU's numerator)",
             f"executed FLOPs per step:   {per_step(report.executed_flops_per_step)} (the matmuls as run "
             "with reference attention)"]
    if report.xla_flops_per_device is None:
        return lines
    lines.append(f"XLA FLOPs per step:        {report.xla_flops_per_device:.4g} per device (XLA cost_analysis)")
    if report.xla_flops_caveats:
        lines += ["  not comparable with the executed FLOPs:",
                  *(f"  - {caveat}" for caveat in report.xla_flops_caveats)]
    else:
        ratio = report.xla_flops_per_device * report.devices / report.executed_flops_per_step
        lines.append(f"  XLA / executed: {ratio:.3f} (the excess is elementwise work: softmax, norms, optimizer)")
    return lines


def format_no_fit(target: str, oom: OutOfMemory) -> str:
    """One line: `target` does not fit, needing at least X GiB of Y GiB per device (what XLA's figure counts)."""
    head = f"{target} ({oom.devices} devices): does not fit"
    if oom.needed_bytes is None:
        return f"{head} in HBM (XLA: {oom.message})"
    line = (f"{head}: needs at least {_gib_short(oom.total_needed_bytes)} of {_gib_short(oom.available_bytes)} "
            "HBM per device")
    if oom.needed_what == "HLO temporaries":
        line += (f" ({_gib_short(oom.needed_bytes)} HLO temporaries + {_gib_short(oom.state_bytes_per_device)} "
                 "params and optimizer state)")
    return line


def _larger_topology(name: str, factor: float) -> str | None:
    """`name` with its smallest dimension (the last of equals) doubled until it has `factor` times the chips."""
    prefix, _, shape = name.partition(":")
    if topology_chips(name) is None:
        return None
    dims = [int(d) for d in shape.split("x")]
    target = math.prod(dims) * factor
    while math.prod(dims) < target:
        dims[max(i for i, d in enumerate(dims) if d == min(dims))] *= 2
    return f"{prefix}:{'x'.join(map(str, dims))}"


def suggestions(cfg: Config, target: str, oom: OutOfMemory) -> list[str]:
    """What would make the step fit: more chips, a smaller batch per device, remat, gradient accumulation, fsdp
    and a chunked loss, each with the override (those already in place are left out)."""
    mesh = oom.mesh or {}
    size = lambda *axes: math.prod(mesh.get(axis, 1) for axis in axes)
    batch_ways, devices = size("data", "fsdp", "expert"), max(oom.devices, 1)
    data, accum, model = cfg.data, cfg.optim.grad_accum_steps, cfg.model
    rows = data.global_batch_size // batch_ways
    factor = oom.total_needed_bytes / oom.available_bytes if oom.needed_bytes and oom.available_bytes else 2.0
    tips = []
    larger = _larger_topology(target, factor) if ":" in target else None
    tips.append(f"more chips: at least {math.ceil(factor)}x the devices if memory per device shrinks in proportion "
                f"(it does for fsdp-sharded state and the batch)" + (f", e.g. --topology {larger}" if larger else ""))
    if rows > 1:
        tips.append(f"a smaller batch per device: data.global_batch_size={rows // 2 * batch_ways} (now "
                    f"{data.global_batch_size}: {rows} rows of {data.seq_len} tokens per device)")
    if model.remat != "full":
        tips.append(f"remat: model.remat=full (now {model.remat}) recomputes activations in the backward pass")
    micro = data.global_batch_size // accum
    more = next((m for m in range(accum + 1, data.global_batch_size + 1)
                 if data.global_batch_size % m == 0 and (data.global_batch_size // m) % batch_ways == 0), None)
    if more and micro > batch_ways:
        tips.append(f"gradient accumulation: optim.grad_accum_steps={more} (now {accum}) keeps the global batch and "
                    f"holds {data.global_batch_size // more // batch_ways} rows per device at a time")
    if mesh.get("fsdp", 1) < devices and size("sequence", "tensor") < devices:
        tips.append(f"fsdp: mesh.data=1 mesh.fsdp=-1 shards params and optimizer state over the devices (now "
                    f"fsdp={mesh.get('fsdp', 1)}, state {_gib_short(oom.state_bytes_per_device)} per device)")
    if not cfg.loss_chunk_size:
        logits = micro // batch_ways * data.seq_len // size("sequence") * model.vocab_size // size("tensor") * 4
        if oom.available_bytes is None or logits > 0.05 * oom.available_bytes:
            tips.append(f"a chunked loss: loss_chunk_size={max(micro * data.seq_len // 16, 1)} (now 0; the float32 "
                        f"logits alone take {_gib_short(logits)} per device)")
    return tips


def format_verdict(cfg: Config, attempts: list[Attempt]) -> str:
    """A line per target tried and, when none fits, what to change for the largest that compiled."""
    lines = []
    for attempt in attempts:
        if isinstance(attempt.result, OutOfMemory):
            lines.append(format_no_fit(attempt.target, attempt.result))
        elif isinstance(attempt.result, str):
            lines.append(f"{attempt.target}: cannot be used: {attempt.result}")
        else:
            lines.append(f"{attempt.target} ({attempt.result.devices} devices): fits, "
                         f"{_gib_short(attempt.result.total_bytes)} per device")
    misses = [a for a in attempts if isinstance(a.result, OutOfMemory)]
    if misses and not isinstance(attempts[-1].result, AotReport):
        last = misses[-1]
        lines.append(f"what would make it fit on {last.target} (combine them when one is not enough):")
        lines += [f"  - {tip}" for tip in suggestions(cfg, last.target, last.result)]
    return "\n".join(lines)


def _json(cfg: Config, attempt: Attempt) -> str:
    result = attempt.result
    if isinstance(result, AotReport):
        return json.dumps({"target": attempt.target, "fits": True, **asdict(result), "total_bytes": result.total_bytes})
    if isinstance(result, OutOfMemory):
        return json.dumps({"target": attempt.target, "fits": False, **asdict(result),
                           "total_needed_bytes": result.total_needed_bytes,
                           "suggestions": suggestions(cfg, attempt.target, result)})
    return json.dumps({"target": attempt.target, "fits": None, "error": result})


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m transformer.aot", add_help=False, allow_abbrev=False,
                                     usage="python -m transformer.aot [--preset NAME | --config FILE.py] [a.b=value "
                                           "...] [--devices N | --topology T1,T2,...] [--json]")
    parser.add_argument("-h", "--help", action="store_true", help="this help, with presets and every config field")
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices to compile for (cpu: default = the mesh size)")
    parser.add_argument("--platform", choices=PLATFORMS, default=None, help="default: tpu with --topology, else cpu")
    parser.add_argument("--topology", default=None,
                        help="TPU topologies, comma-separated (e.g. v5e:2x2,v5e:4x4): the smallest that fits")
    parser.add_argument("--json", action="store_true", help="print one JSON object per target tried")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if print_help_if_asked(argv, __doc__ + "\n" + parser.format_help()):
        return 0
    args, rest = parser.parse_known_args(argv)
    platform = args.platform or ("tpu" if args.topology else "cpu")
    try:
        cfg = config_from_args([f"data.paths={_NO_DATA}", *rest])
        count = args.devices
        if count is not None and count < 1:
            raise ConfigError(f"--devices {count} must be >= 1")
        if count is None and platform == "cpu":
            if -1 in cfg.mesh.shape.values():
                raise ConfigError(f"mesh {cfg.mesh.shape} has a -1 axis; pass --devices N to size it")
            count = math.prod(cfg.mesh.shape.values())
        if platform == "cpu":
            if args.topology:
                raise ConfigError("--topology needs --platform tpu")
            _fake_cpu_devices(count)
            targets = [f"{count} cpu devices"]
        else:
            targets = [t for t in (args.topology or "").split(",") if t] or [""]
    except (ConfigError, ValueError) as err:
        print(f"aot: {err}", file=sys.stderr)
        return 2
    attempts = search(cfg, targets, lambda cfg, target: fit(
        cfg, target_devices(platform, count, target if platform == "tpu" else None)))
    errors = [a for a in attempts if isinstance(a.result, str)]
    if len(errors) == len(attempts):
        for a in errors:
            print(f"aot: {a.target + ': ' if len(attempts) > 1 else ''}{a.result}", file=sys.stderr)
        return 2
    fitted = attempts[-1].result if isinstance(attempts[-1].result, AotReport) else None
    if args.json:
        print("\n".join(_json(cfg, attempt) for attempt in attempts))
    else:
        if len(targets) > 1 or fitted is None:
            print(format_verdict(cfg, attempts))
        if fitted is not None:
            print(format_report(fitted, platform))
    return 0 if fitted is not None else 1


if __name__ == "__main__":
    sys.exit(main())
