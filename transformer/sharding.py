"""Device mesh, the one table that maps logical axis names to mesh axes, and batch placement.

The model names logical axes only (`batch`, `length`, `embed`, `heads`, ...). This
module is the single place that decides how they are laid out on the mesh:

    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))

Resolution follows the rules in order; a mesh axis already used by an earlier
dimension of the same array is skipped (so `embed` is FSDP-sharded in weights but
replicated in activations, whose batch dimension already uses `fsdp`).

Mesh axes: `data` (pure data parallel: params replicated), `fsdp` (data parallel with
params and optimizer state sharded over `embed`), `sequence` (sequence parallel: the
length axis, ring attention), `tensor` (heads, kv_heads, mlp, vocab split across
devices), `expert` (MoE experts split across devices; also shards the batch).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from transformer.config import DATA, EXPERT, FSDP, MESH_AXES, SEQUENCE, TENSOR, Config, ConfigError, MeshConfig
from transformer.ops import layout

# logical axis -> mesh axes it may be sharded over (in order of preference)
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", (DATA, FSDP, EXPERT)),
    ("length", (SEQUENCE,)),
    ("kv_length", ()),
    ("cache_length", (SEQUENCE,)),  # KV-cache slots: a long context split over devices
    ("vocab", (TENSOR,)),
    ("heads", (TENSOR,)),
    ("kv_heads", (TENSOR,)),
    ("mlp", (TENSOR,)),
    ("expert", (EXPERT,)),
    ("embed", (FSDP,)),
    ("head_dim", ()),
    ("layers", ()),
    ("capacity", ()),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_AXIS_RULES)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes (data, fsdp, sequence, tensor, expert).

    Raises ConfigError (one line) when the axis sizes need more devices than there are or do
    not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh_cfg.validate()
    fixed = math.prod(size for size in mesh_cfg.shape.values() if size != -1)
    if fixed > len(devices):
        raise ConfigError(f"mesh {_format_sizes(mesh_cfg.shape)} needs at least {fixed} devices but only "
                          f"{len(devices)} are available; shrink the mesh axes or use more devices")
    sizes = mesh_cfg.resolved(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _format_sizes(sizes: dict[str, int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in sizes.items())


def use_mesh(mesh: Mesh):
    """Context manager: `mesh` becomes jax's current mesh (`jax.sharding.set_mesh`), the target of
    `constrain` and of ring attention inside the block."""
    return jax.sharding.set_mesh(mesh)


def current_mesh() -> Mesh | AbstractMesh | None:
    """jax's current mesh: the concrete Mesh outside jit, its AbstractMesh while tracing; None outside any
    `use_mesh` (or under a mesh that lacks this library's axes, which the logical axis rules cannot use)."""
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty or not set(MESH_AXES) <= set(abstract.axis_names):
        return None
    try:
        return jax.sharding.get_mesh()
    except ValueError:  # inside jit only the abstract mesh is known
        return abstract


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    Mesh axes of size 1 are left out. With `shape`, a mesh axis that does not divide
    its dimension is left out too (that dimension is then replicated over it).
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXES)}")
        chosen = []
        size = 1
        for axis in _RULES[name]:
            axis_size = mesh.shape[axis]
            if axis in used or axis_size == 1:
                continue
            if shape is not None and shape[dim] % (size * axis_size) != 0:
                continue
            chosen.append(axis)
            size *= axis_size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def named_sharding(logical_axes: Sequence[str | None], mesh: Mesh,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside `use_mesh`."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh, x.shape))


def mesh_axis_size(mesh: Mesh | None, logical_axis: str) -> int:
    """How many devices the activation axis `logical_axis` is split over."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in _RULES[logical_axis])


def placed(abstract, mesh: Mesh):
    """(abstract with each leaf a ShapeDtypeStruct carrying its `state_shardings` sharding, those shardings): the
    target of a sharded restore or jit; allocates nothing."""
    import jax

    shardings = state_shardings(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        shardings), shardings


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx.State (or any pytree of nnx.Variables) from each
    variable's `logical_axes` metadata; variables without it are replicated."""
    from flax import nnx

    def sharding_of(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = getattr(variable, "logical_axes", None)
        if axes is None or np.ndim(value) == 0:
            spec = P()
        else:
            if len(axes) != np.ndim(value):
                raise ValueError(f"logical_axes {axes} do not match a value of shape {np.shape(value)}")
            spec = logical_to_spec(axes, mesh, np.shape(value))
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_divisible(name: str, size: int, mesh: Mesh, logical_axis: str) -> None:
    """Raise ConfigError unless `size` splits evenly over the mesh axes of `logical_axis`."""
    ways = mesh_axis_size(mesh, logical_axis)
    if size % ways:
        axes = " x ".join(f"{a}={mesh.shape[a]}" for a in _RULES[logical_axis] if mesh.shape[a] > 1)
        raise ConfigError(f"{name}={size} is not divisible by the {ways} devices of mesh axes {axes} "
                          f"that shard '{logical_axis}'; choose a multiple of {ways}")


def validate_for_mesh(cfg: Config, mesh: Mesh) -> None:
    """Raise ConfigError (one line, naming both numbers) unless `cfg` splits evenly over `mesh`.

    Checks the global (micro)batch over the batch axes, query and KV heads
    over `tensor`, the sequences over `sequence` (`ring_lengths`: 2 x ring size for the causal rows that
    `place_batch` puts in zigzag order), and the experts over `expert`. Call it before compiling anything.
    """
    model, data = cfg.model, cfg.data
    accum = cfg.optim.grad_accum_steps
    if accum == 1:
        check_divisible("data.global_batch_size", data.global_batch_size, mesh, "batch")
    elif (data.global_batch_size // accum) % mesh_axis_size(mesh, "batch"):
        ways = mesh_axis_size(mesh, "batch")
        raise ConfigError(f"data.global_batch_size={data.global_batch_size} / optim.grad_accum_steps={accum} = "
                          f"{data.global_batch_size // accum} rows per micro-batch is not divisible by the {ways} "
                          f"devices that shard 'batch'; choose a micro-batch that is a multiple of {ways}")
    tensor = mesh.shape[TENSOR]
    for name, heads in (("model.num_heads", model.num_heads), ("model.num_kv_heads", model.kv_heads)):
        if heads % tensor:
            raise ConfigError(f"{name}={heads} is not divisible by mesh.tensor={tensor}; "
                              f"use a tensor axis that divides {heads}")
    ring = mesh.shape[SEQUENCE]
    for name, length, causal in ring_lengths(cfg) if ring > 1 else ():
        if problem := layout.ring_length_problem(f"{name}={length}", length, f"mesh.sequence={ring}", ring, causal):
            raise ConfigError(problem)
    experts = model.moe.num_experts
    if experts and experts % mesh.shape[EXPERT]:
        raise ConfigError(f"model.moe.num_experts={experts} is not divisible by mesh.expert={mesh.shape[EXPERT]}; "
                          f"use an expert axis that divides {experts}")


def ring_lengths(cfg: Config) -> tuple[tuple[str, int, bool], ...]:
    """(config field, length, causal) of each sequence a training row splits over `sequence`: the rows of a
    decoder (causal) or an encoder (bidirectional); an encoder-decoder's source (bidirectional) and target
    rows (causal)."""
    architecture, seq_len = cfg.model.architecture, cfg.data.seq_len
    if architecture == "encoder_decoder":
        from transformer.data.objectives import target_length

        target = "data.target_len" if cfg.data.target_len else "the derived data.target_len"
        return ("data.seq_len", seq_len, False), (target, target_length(cfg.data, cfg.objective), True)
    return (("data.seq_len", seq_len, architecture != "encoder"),)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that split the batch dimension."""
    return tuple(axis for axis in _RULES["batch"] if mesh.shape[axis] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of input batches: rows over the batch axes, every other dimension replicated."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes if axes else None))


def process_batch_shard(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
    """(index, count): this process loads rows [index/count, (index+1)/count) of each global batch.

    Processes whose devices hold the same rows (replicas over non-batch axes) get the same
    index; pass the pair to `Dataset.batch(step, process_index=index, process_count=count)`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    num_shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    index_map = batch_sharding(mesh).devices_indices_map((num_shards,))
    rows: dict[int, set[int]] = {}
    for device, (index,) in index_map.items():
        rows.setdefault(device.process_index, set()).update(range(*index.indices(num_shards)))
    spans = {}
    for process, held in rows.items():
        first, size = min(held), len(held)
        if held != set(range(first, first + size)) or first % size or num_shards % size:
            raise ValueError(f"process {process} holds batch shards {sorted(held)} of {num_shards}, not one aligned "
                             "contiguous block; reorder the mesh so each process owns whole batch shards")
        spans[process] = (first // size, num_shards // size)
    if len({count for _, count in spans.values()}) != 1:
        raise ValueError(f"processes hold different numbers of batch shards: {spans}")
    return spans[process_index]


def host_local_batch_to_global(batch_np: dict, mesh: Mesh,
                               logical_axes: Sequence[str | None] | None = None) -> dict:
    """Global jax.Arrays (rows over the batch axes) from this process's rows of the batch.

    `batch_np` holds only the rows named by `process_batch_shard(mesh)`; each process passes
    its own rows and no process ever materialises the whole batch. With `logical_axes` (e.g.
    ("batch", "length")) each entry is laid out by the logical axis rules instead.
    """
    rows_only = batch_sharding(mesh)
    _, count = process_batch_shard(mesh)
    out = {}
    for name, local in batch_np.items():
        local = np.asarray(local)
        if local.ndim == 0:
            raise ValueError(f"batch entry {name!r} is a scalar; batch entries need a leading batch dimension")
        global_shape = (local.shape[0] * count, *local.shape[1:])
        target = rows_only if logical_axes is None else named_sharding(logical_axes, mesh, global_shape)
        out[name] = jax.make_array_from_process_local_data(target, local, global_shape)
    return out
