"""Batches onto the mesh: this process's rows of a step, then global arrays laid out ("batch", "length")."""

from __future__ import annotations

import jax
import numpy as np

from transformer import sharding
from transformer.config import SEQUENCE, ConfigError
from transformer.data.pipeline import Dataset
from transformer.ops.layout import ring_length_problem, to_zigzag


def local_batch(data: Dataset, step: int, mesh, *, held_out: bool = False) -> dict[str, np.ndarray]:
    """This process's rows of training batch `step` (or of held-out batch `step`)."""
    index, count = sharding.process_batch_shard(mesh)
    fetch = data.eval_batch if held_out else data.batch
    return fetch(step, process_index=index, process_count=count)


def place_batch(batch_np: dict[str, np.ndarray], mesh, *, causal: bool = True) -> dict[str, jax.Array]:
    """Global arrays sharded ("batch", "length") from this process's rows.

    With a sequence axis > 1 (ring attention) the rows of causal attention, the "_BL" entries of a decoder or
    an encoder-decoder (`causal`), are first put into zigzag order, which balances the causal ring; an
    encoder's rows (causal=False) and the "_BS" sources of an encoder-decoder are bidirectional, balanced in
    order, and stay so. Positions travel with the tokens, so the loss does not depend on the order. A length
    the ring cannot split is one ConfigError naming data.seq_len (data.target_len: the targets of an
    encoder-decoder)."""
    ring = mesh.shape[SEQUENCE]
    if ring > 1:
        encoder_decoder = "sources_BS" in batch_np
        for key, local in batch_np.items():
            source = key.endswith("_BS")
            zigzag = causal and not source
            length = np.shape(local)[1]
            name = "data.target_len" if encoder_decoder and not source else "data.seq_len"
            if problem := ring_length_problem(f"{name}={length}", length, f"mesh.sequence={ring}", ring, zigzag):
                raise ConfigError(problem)
            if zigzag:
                batch_np = {**batch_np, key: to_zigzag(np.asarray(local), ring, axis=1)}
    return sharding.host_local_batch_to_global(batch_np, mesh, logical_axes=("batch", "length"))
