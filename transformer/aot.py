"""Compile the train step ahead of time for a target mesh; report memory per device and FLOPs.

Know whether a config fits before renting a pod:

    python -m transformer.aot --preset 1b mesh.fsdp=256 --devices 256            # 256 stand-in CPU devices
    python -m transformer.aot --preset 1b mesh.fsdp=-1 --platform tpu --topology v5e:16x16   # needs libtpu

With `--platform cpu` (default) the step is compiled by XLA's CPU compiler for `--devices` fake
host devices (set through XLA_FLAGS before jax starts), so the numbers are an estimate of the
accelerator's: sharding, parameter/optimizer state and remat are exact, fusion and layout-
dependent temporaries differ. `--platform tpu` compiles for a real TPU topology (jax's AOT
topology API; no TPU attached needed, libtpu must be installed). Exit code 2 with one line when
the config or mesh is invalid.

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
from dataclasses import dataclass

from transformer.config import Config, ConfigError, config_from_args

PLATFORMS = ("cpu", "tpu")
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

    @property
    def total_bytes(self) -> int:
        """Peak estimate per device: live arguments + fresh outputs + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def _fake_cpu_devices(count: int) -> None:
    """Ask for `count` CPU devices; must run before jax creates its backends."""
    if "jax" in sys.modules:
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
    except Exception as err:  # the TPU compiler plugin is missing or the name is unknown
        raise ValueError(f"cannot build TPU topology {topology!r} ({type(err).__name__}: {err}); it needs libtpu "
                         "(pip install -e '.[tpu]') and a name like v5e:16x16") from None
    if count is not None and count != len(devices):
        raise ValueError(f"--devices {count} does not match topology {topology!r} with {len(devices)} devices")
    return devices


def compile_train_step(cfg: Config, mesh):
    """The train step of `transformer.train`, lowered with abstract (sharded) state and batch and compiled."""
    import jax
    import jax.numpy as jnp

    from transformer import sharding
    from transformer.data.pipeline import BATCH_KEYS
    from transformer.train import abstract_train_state, make_train_step

    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        shape = (cfg.data.global_batch_size, cfg.data.seq_len)
        batch_sharding = sharding.named_sharding(("batch", "length"), mesh, shape)
        batch = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == "loss_mask_BL" else jnp.int32,
                                           sharding=batch_sharding) for key in BATCH_KEYS}
        step = jax.jit(make_train_step(cfg), static_argnums=0, donate_argnums=1, out_shardings=(shardings, None))
        compiled = step.lower(graphdef, abstract, batch).compile()
    return compiled, abstract


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

    model, accum = cfg.model, cfg.optim.grad_accum_steps
    groups = model.num_layers // (model.moe.every_k_layers if model.moe.num_experts else 1)
    chunks = num_loss_chunks(cfg.data.global_batch_size // accum, cfg.data.seq_len, cfg.loss_chunk_size) \
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

    from transformer.model import flops_per_token

    leaves = jax.tree.leaves(abstract)
    state_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(abstract["model"], nnx.Param)))
    memory = compiled.memory_analysis()
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    per_step = lambda executed: flops_per_token(cfg.model, cfg.data.seq_len, executed=executed) * tokens
    return AotReport(
        devices=mesh.size, mesh=dict(mesh.shape), params=params, state_bytes_per_device=int(state_bytes),
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), xla_flops_per_device=xla_flops(compiled),
        model_flops_per_step=per_step(False), executed_flops_per_step=per_step(True),
        xla_flops_caveats=xla_flops_caveats(cfg, mesh, mesh.devices.flat[0].platform))


def run(cfg: Config, devices) -> AotReport:
    """Build the mesh over `devices`, validate, compile and analyze (raises ConfigError on a bad fit)."""
    mesh = prepare_mesh(cfg, devices)
    compiled, abstract = compile_train_step(cfg, mesh)
    return analyze(cfg, mesh, compiled, abstract)


def prepare_mesh(cfg: Config, devices):
    from transformer import sharding

    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.validate_for_mesh(cfg, mesh)
    return mesh


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m transformer.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices to compile for (cpu: default = the mesh size)")
    parser.add_argument("--platform", choices=PLATFORMS, default="cpu")
    parser.add_argument("--topology", default=None, help="TPU topology for --platform tpu, e.g. v5e:16x16")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = config_from_args([f"data.paths={_NO_DATA}", *rest])
        count = args.devices
        if count is not None and count < 1:
            raise ConfigError(f"--devices {count} must be >= 1")
        if count is None and args.platform == "cpu":
            if -1 in cfg.mesh.shape.values():
                raise ConfigError(f"mesh {cfg.mesh.shape} has a -1 axis; pass --devices N to size it")
            count = math.prod(cfg.mesh.shape.values())
        if args.platform == "cpu":
            _fake_cpu_devices(count)
        mesh = prepare_mesh(cfg, target_devices(args.platform, count, args.topology))
    except (ConfigError, ValueError) as err:
        print(f"aot: {err}", file=sys.stderr)
        return 2
    compiled, abstract = compile_train_step(cfg, mesh)
    report = analyze(cfg, mesh, compiled, abstract)
    if args.json:
        print(json.dumps({**report.__dict__, "total_bytes": report.total_bytes}))
    else:
        print(format_report(report, args.platform))
    return 0


if __name__ == "__main__":
    sys.exit(main())
