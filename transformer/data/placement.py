"""Batches onto the mesh: this process's rows of a step, then global arrays laid out ("batch", "length")."""

from __future__ import annotations

import jax
import numpy as np

from transformer import sharding
from transformer.config import SEQUENCE
from transformer.data.pipeline import Dataset
from transformer.ops.layout import to_zigzag


def local_batch(data: Dataset, step: int, mesh, *, held_out: bool = False) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step` (or of held-out batch `step`)."""
    index, count = sharding.process_batch_shard(mesh)
    fetch = data.eval_batch if held_out else data.batch
    return fetch(step, process_index=index, process_count=count)


def place_batch(batch_np: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays sharded ("batch", "length") from this process's rows; with a sequence axis > 1
    the length axis is first put into zigzag order (the loss does not depend on token order)."""
    ring = mesh.shape[SEQUENCE]
    if ring > 1:
        batch_np = {key: to_zigzag(np.asarray(local), ring, axis=1) for key, local in batch_np.items()}
    return sharding.host_local_batch_to_global(batch_np, mesh, logical_axes=("batch", "length"))
