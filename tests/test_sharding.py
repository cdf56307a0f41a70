"""Mesh construction, logical-axis resolution, config/mesh validation, batch placement, and
every parallelism (dp, fsdp, tp, sp, ep, mixed) against a single-device run of the same model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from transformer import sharding
from transformer.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig


def mesh_of(**axes) -> jax.sharding.Mesh:
    return sharding.make_mesh(MeshConfig(**{"data": 1, **axes}))


# ---------------------------------------------------------------- make_mesh


def test_make_mesh_axes_and_rest():
    mesh = sharding.make_mesh(MeshConfig(data=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "sequence": 1, "tensor": 2, "expert": 1}
    assert sharding.make_mesh(MeshConfig(), jax.devices()[:1]).size == 1


def test_make_mesh_larger_than_devices():
    with pytest.raises(ConfigError, match=r"needs at least 16 devices but only 8 are available") as err:
        sharding.make_mesh(MeshConfig(data=2, fsdp=8))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"needs at least 16 devices but only 8"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=16))


def test_make_mesh_product_must_match_devices():
    with pytest.raises(ConfigError, match=r"uses 4 devices but 8 are available"):
        sharding.make_mesh(MeshConfig(data=2, fsdp=2))
    with pytest.raises(ConfigError, match=r"divisible by 3, but there are 8 devices"):
        sharding.make_mesh(MeshConfig(data=-1, tensor=3))
    with pytest.raises(ConfigError, match=r"mesh.fsdp=0 must be -1 or >= 1"):
        sharding.make_mesh(MeshConfig(fsdp=0))


# ---------------------------------------------------------------- logical_to_spec


def test_embed_is_fsdp_sharded_in_weights_but_not_in_activations():
    mesh = mesh_of(fsdp=4, tensor=2)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh, (64, 128)) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed"), mesh, (8, 32, 64)) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("vocab", "embed"), mesh, (256, 64)) == P("tensor", "fsdp")


def test_batch_takes_all_batch_axes_and_length_takes_sequence():
    mesh = mesh_of(data=2, sequence=2, expert=2)
    assert sharding.logical_to_spec(("batch", "length", "embed"), mesh, (8, 32, 64)) == P(
        ("data", "expert"), "sequence", None)
    assert sharding.logical_to_spec(("expert", "batch", "capacity", "embed"), mesh, (4, 8, 5, 64)) == P(
        "expert", "data", None, None)


def test_non_dividing_dims_are_replicated():
    mesh = mesh_of(fsdp=4, tensor=2)
    assert sharding.logical_to_spec(("vocab", "embed"), mesh, (259, 6)) == P(None, None)
    assert sharding.logical_to_spec(("batch",), mesh_of(data=2, fsdp=4), (6,)) == P("data")
    assert sharding.logical_to_spec(("heads",), mesh, None) == P("tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        sharding.logical_to_spec(("hidden",), mesh)


def test_constrain_is_identity_outside_a_mesh_and_shards_inside():
    x_BLD = jnp.arange(8 * 4 * 16, dtype=jnp.float32).reshape(8, 4, 16)
    assert sharding.constrain(x_BLD, ("batch", "length", "embed")) is x_BLD
    mesh = mesh_of(data=8)
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "embed")))(x_BLD)
        assert sharding.current_mesh() is mesh
    assert sharding.current_mesh() is None
    assert y.sharding.shard_shape(y.shape) == (1, 4, 16)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x_BLD))


# ---------------------------------------------------------------- validate_for_mesh


def config(mesh_cfg=None, **model) -> Config:
    model_cfg = ModelConfig(**{"d_model": 64, "num_heads": 8, "num_kv_heads": 4, **model})
    return Config(model=model_cfg, data=DataConfig(seq_len=64, global_batch_size=8),
                  mesh=mesh_cfg or MeshConfig())


def test_validate_for_mesh_accepts_fitting_configs():
    sharding.validate_for_mesh(config(), mesh_of(data=2, fsdp=2, tensor=2))
    sharding.validate_for_mesh(config(moe=MoEConfig(num_experts=4)), mesh_of(data=2, expert=4))
    sharding.validate_for_mesh(config(), mesh_of(sequence=8, data=1))  # 64 % (2 * 8) == 0
    sharding.validate_for_mesh(config(architecture="encoder"), mesh_of(sequence=8))


@pytest.mark.parametrize("cfg, axes, message", [
    (config(), dict(data=8), None),
    (dataclasses.replace(config(), data=DataConfig(seq_len=64, global_batch_size=6)), dict(data=2, fsdp=4),
     r"data.global_batch_size=6 is not divisible by the 8 devices of mesh axes data=2 x fsdp=4"),
    (dataclasses.replace(config(), data=DataConfig(seq_len=64, global_batch_size=8),
                         optim=OptimConfig(grad_accum_steps=2)), dict(data=8),
     r"data.global_batch_size=8 / optim.grad_accum_steps=2 = 4 rows per micro-batch is not divisible by the 8 "),
    (config(num_heads=6, d_model=48, num_kv_heads=6), dict(tensor=4, data=2),
     r"model.num_heads=6 is not divisible by mesh.tensor=4"),
    (config(num_kv_heads=2), dict(tensor=4, data=2), r"model.num_kv_heads=2 is not divisible by mesh.tensor=4"),
    (dataclasses.replace(config(), data=DataConfig(seq_len=36, global_batch_size=8)), dict(sequence=4, data=2),
     r"data.seq_len=36 is not divisible by 2 x mesh.sequence=4 = 8 \(a causal ring"),
    (dataclasses.replace(config(architecture="encoder"), data=DataConfig(seq_len=42, global_batch_size=8)),
     dict(sequence=4, data=2), r"data.seq_len=42 is not divisible by mesh.sequence=4 = 4"),
    (config(moe=MoEConfig(num_experts=6)), dict(expert=4, data=2),
     r"model.moe.num_experts=6 is not divisible by mesh.expert=4"),
])
def test_validate_for_mesh_errors_name_both_numbers(cfg, axes, message):
    mesh = mesh_of(**axes)
    if message is None:
        sharding.validate_for_mesh(cfg, mesh)
        return
    with pytest.raises(ConfigError, match=message) as err:
        sharding.validate_for_mesh(cfg, mesh)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- batch placement


def test_batch_sharding_and_host_local_batch():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(mesh_of(tensor=8)).spec == P(None)
    assert sharding.process_batch_shard(mesh) == (0, 1)
    rows = {"inputs_BL": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
            "loss_mask_BL": np.ones((8, 6), np.float32)}
    batch = sharding.host_local_batch_to_global(rows, mesh)
    assert batch["inputs_BL"].shape == (8, 6) and batch["inputs_BL"].dtype == jnp.int32
    assert batch["inputs_BL"].sharding.spec == P(("data", "fsdp"))
    assert batch["inputs_BL"].addressable_shards[0].data.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(batch["inputs_BL"]), rows["inputs_BL"])
    with pytest.raises(ValueError, match="'step' is a scalar"):
        sharding.host_local_batch_to_global({"step": np.int32(3)}, mesh)


# ---------------------------------------------------------------- parallelisms vs one device


SOURCE_LEN = 24  # encoder_decoder: sources of 24 tokens, decoder rows of 16 (cross-attention with S != L)


def _model_cfg(architecture: str = "decoder", **overrides) -> ModelConfig:
    base = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=64,
                max_seq_len=SOURCE_LEN, attention_kernel="reference", attention_block_size=8,
                architecture=architecture, num_encoder_layers=int(architecture == "encoder_decoder"))
    return ModelConfig(**{**base, **overrides})


def _batch(model_cfg: ModelConfig, batch: int = 8, length: int = 16):
    """Next-token rows; an encoder-decoder's also have sources (padded: the last 4 tokens of odd rows are
    segment 0, hidden from the decoder rows, segment 1)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(batch, length + 1), dtype=np.int32)
    rows = {"inputs_BL": tokens[:, :-1], "targets_BL": tokens[:, 1:]}
    if model_cfg.architecture == "encoder_decoder":
        segments_BS = np.ones((batch, SOURCE_LEN), np.int32)
        segments_BS[1::2, -4:] = 0
        rows |= {"sources_BS": rng.integers(0, 256, size=(batch, SOURCE_LEN), dtype=np.int32),
                 "source_segment_ids_BS": segments_BS, "segment_ids_BL": np.ones((batch, length), np.int32)}
    return rows


def _loss_and_grads(model_cfg: ModelConfig, mesh, batch):
    """Cross-entropy (+ MoE aux loss) and parameter gradients; params placed by state_shardings,
    inputs by batch_sharding, run under `use_mesh(mesh)` (no mesh: one device, no constraints)."""
    from transformer.model import build_model

    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        if "sources_BS" in batch:
            logits_BLV, aux = model(batch["sources_BS"], batch["inputs_BL"],
                                    source_segment_ids_BS=batch["source_segment_ids_BS"],
                                    segment_ids_BL=batch["segment_ids_BL"])
        else:
            logits_BLV, aux = model(batch["inputs_BL"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets_BL"]).mean()
        return ce + aux["aux_loss"]

    step = jax.jit(jax.value_and_grad(loss_fn))
    if mesh is None:
        device = jax.devices()[0]
        loss, grads = step(jax.device_put(params, device), jax.device_put(rest, device), batch)
        return float(loss), grads, None
    with sharding.use_mesh(mesh):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        rest = jax.device_put(rest, sharding.state_shardings(rest, mesh))
        batch = sharding.host_local_batch_to_global(batch, mesh)
        loss, grads = step(params, rest, batch)
    return float(loss), grads, params


def _split_fraction(params) -> float:
    """Fraction of parameter elements that live on a shard smaller than the whole array."""
    leaves = jax.tree.leaves(params)
    split = sum(x.size for x in leaves if x.sharding.shard_shape(x.shape) != x.shape)
    return split / sum(x.size for x in leaves)


@functools.lru_cache(maxsize=3)
def _one_device(model_cfg: ModelConfig):
    loss, grads, _ = _loss_and_grads(model_cfg, None, _batch(model_cfg))
    return loss, grads


def _assert_matches_one_device(model_cfg: ModelConfig, axes: dict, *, min_split: float):
    batch = _batch(model_cfg)
    ref_loss, ref_grads = _one_device(model_cfg)
    mesh = mesh_of(**axes)
    data = (DataConfig(seq_len=SOURCE_LEN, target_len=16, global_batch_size=8)
            if model_cfg.architecture == "encoder_decoder" else DataConfig(seq_len=16, global_batch_size=8))
    sharding.validate_for_mesh(Config(model=model_cfg, data=data), mesh)
    loss, grads, params = _loss_and_grads(model_cfg, mesh, batch)
    assert _split_fraction(params) >= min_split
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert flat.keys() == flat_ref.keys()
    for path, ref in flat_ref.items():
        np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(ref), rtol=1e-4, atol=2e-7,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # keeps the default suite under 15 minutes; data parallel is part of the mixed-mesh tests
def test_data_parallel_matches_one_device():
    _assert_matches_one_device(_model_cfg(), dict(data=8), min_split=0.0)


def test_fsdp_matches_one_device():
    _assert_matches_one_device(_model_cfg(), dict(fsdp=8), min_split=0.9)


def test_tensor_parallel_matches_one_device():
    _assert_matches_one_device(_model_cfg(), dict(tensor=4, data=2), min_split=0.9)


@pytest.mark.parametrize("architecture", ["decoder", pytest.param("encoder", marks=pytest.mark.slow),
                                          pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_sequence_parallel_ring_matches_one_device(architecture):
    """Ring attention over 4 devices: causal, bidirectional, and cross-attention from 16 decoder rows to 24 source
    tokens, each split over the ring."""
    _assert_matches_one_device(_model_cfg(architecture), dict(sequence=4, data=2), min_split=0.0)


@pytest.mark.slow  # ~16 s; the MoE layer alone is checked on expert=4 in test_moe.py
def test_expert_parallel_matches_one_device():
    moe = MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)
    _assert_matches_one_device(_model_cfg(moe=moe), dict(expert=4, data=2), min_split=0.5)


@pytest.mark.parametrize("architecture", ["decoder", pytest.param("encoder", marks=pytest.mark.slow),
                                          pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_mixed_fsdp_sequence_tensor_matches_one_device(architecture):
    _assert_matches_one_device(_model_cfg(architecture), dict(fsdp=2, sequence=2, tensor=2), min_split=0.9)

