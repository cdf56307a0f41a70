"""Masked token cross-entropy and accuracy sums of any model (decoder, encoder, encoder-decoder), whole or in
chunks of positions (train and evaluate). A batch with "sources_BS" goes to an encoder-decoder: the encoder
reads the sources and the decoder's inputs_BL are scored against targets_BL; other batches go to a
single-stack model (next-token or masked-token prediction alike: what is scored is up to the batch)."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from transformer.model import EncoderDecoderLM

SUMS = ("ce", "z", "correct", "tokens")


def token_loss_sums(logits_BLV, targets_BL, mask_BL) -> dict[str, jax.Array]:
    """Masked sums of cross-entropy, log(Z)^2 and correct predictions (argmax == target), and the number of
    scored tokens."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    correct_BL = jax.lax.stop_gradient(jnp.argmax(logits_BLV, axis=-1) == targets_BL)
    return {"ce": jnp.sum((lse_BL - target_BL) * mask_BL), "z": jnp.sum(lse_BL ** 2 * mask_BL),
            "correct": jnp.sum(correct_BL * mask_BL), "tokens": jnp.sum(mask_BL)}


def num_loss_chunks(batch: int, length: int, chunk_tokens: int) -> int:
    """Fewest chunks n dividing `length` with batch * length / n <= chunk_tokens (length if none)."""
    for n in range(1, length + 1):
        if length % n == 0 and batch * (length // n) <= chunk_tokens:
            return n
    return length


def chunked_loss_sums(model, hidden_BLD, targets_BL, mask_BL, chunk_tokens: int) -> dict[str, jax.Array]:
    """`token_loss_sums(model.logits(hidden))` without materialising all logits: the output projection
    and loss run on strided chunks of positions (p * U + u for chunk u), each recomputed in the backward
    pass, so only one chunk's logits are alive at a time. Strided chunks keep every sequence shard busy."""
    B, L, _ = hidden_BLD.shape
    U = num_loss_chunks(B, L, chunk_tokens)
    h_BPUD = einops.rearrange(hidden_BLD, "B (P U) D -> B P U D", U=U)
    t_BPU = einops.rearrange(targets_BL, "B (P U) -> B P U", U=U)
    m_BPU = einops.rearrange(mask_BL, "B (P U) -> B P U", U=U)
    graphdef, model_state = nnx.split(model)

    @jax.checkpoint
    def chunk(model_state, u):
        take = lambda x: jax.lax.dynamic_index_in_dim(x, u, axis=2, keepdims=False)
        logits_BPV = nnx.merge(graphdef, model_state).logits(take(h_BPUD))
        return token_loss_sums(logits_BPV, take(t_BPU), take(m_BPU))

    def body(sums, u):
        return jax.tree.map(jnp.add, sums, chunk(model_state, u)), None

    zeros = {name: jnp.zeros((), jnp.float32) for name in SUMS}
    sums, _ = jax.lax.scan(body, zeros, jnp.arange(U))
    return sums


def forward(model, batch: dict, **options):
    """`model(...)` on the inputs of `batch`: an encoder-decoder batch ("sources_BS") with its source and
    decoder positions and segment ids, any other batch with its positions and segment ids."""
    tokens = dict(positions_BL=batch["positions_BL"], segment_ids_BL=batch["segment_ids_BL"], **options)
    encoder_decoder = isinstance(model, EncoderDecoderLM)
    if encoder_decoder != ("sources_BS" in batch):
        raise ValueError(f"the batch {'has' if 'sources_BS' in batch else 'lacks'} sources_BS but the model is "
                         f"{type(model).__name__}; an EncoderDecoderLM, and only it, reads a source")
    if not encoder_decoder:
        return model(batch["inputs_BL"], **tokens)
    return model(batch["sources_BS"], batch["inputs_BL"], source_positions_BS=batch["source_positions_BS"],
                 source_segment_ids_BS=batch["source_segment_ids_BS"], **tokens)


def loss_sums(model, batch: dict, *, loss_chunk_size: int = 0, update_router_bias: bool = False):
    """(masked sums of `token_loss_sums`, aux) of one forward pass over `batch`; chunked when
    loss_chunk_size > 0."""
    if loss_chunk_size:
        hidden_BLD, aux = forward(model, batch, return_hidden=True, update_router_bias=update_router_bias)
        sums = chunked_loss_sums(model, hidden_BLD, batch["targets_BL"], batch["loss_mask_BL"], loss_chunk_size)
    else:
        logits_BLV, aux = forward(model, batch, update_router_bias=update_router_bias)
        sums = token_loss_sums(logits_BLV, batch["targets_BL"], batch["loss_mask_BL"])
    return sums, aux
