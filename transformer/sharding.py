"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names logical axes only (`batch`, `length`, `embed`, `heads`, ...). This
module is the single place that decides how they are laid out on the mesh:

    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        x_BLD = constrain(x_BLD, ("batch", "length", "embed"))

Resolution follows the rules in order; a mesh axis already used by an earlier
dimension of the same array is skipped (so `embed` is FSDP-sharded in weights but
replicated in activations, whose batch dimension already uses `fsdp`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from transformer.config import MESH_AXES, ConfigError, MeshConfig

# logical axis -> mesh axes it may be sharded over (in order of preference)
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", ("sequence",)),
    ("kv_length", ()),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("embed", ("fsdp",)),
    ("head_dim", ()),
    ("layers", ()),
    ("capacity", ()),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_AXIS_RULES)
_RULES = dict(LOGICAL_AXIS_RULES)

_current_mesh: list[Mesh] = []


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with axes (data, fsdp, sequence, tensor, expert)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolved(len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make `mesh` the target of `constrain` (and jax's own mesh context) inside the block."""
    _current_mesh.append(mesh)
    try:
        with jax.sharding.set_mesh(mesh):
            yield mesh
    finally:
        _current_mesh.pop()


def current_mesh() -> Mesh | None:
    return _current_mesh[-1] if _current_mesh else None


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
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, mesh, x.shape))


def mesh_axis_size(mesh: Mesh | None, logical_axis: str) -> int:
    """How many devices the activation axis `logical_axis` is split over."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in _RULES[logical_axis])


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
