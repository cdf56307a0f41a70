"""Load a trained run (or an in-memory model) for inference: its config, graph and state on a mesh. A LoRA run
loads as its base (from checkpoint.init_from) with its newest adapters folded in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from transformer import lora, sharding
from transformer.checkpoint import CONFIG_FILE, restore_params
from transformer.config import (ARCHITECTURES, Config, ConfigError, LoRAConfig, MeshConfig, ModelConfig,
                                apply_overrides)
from transformer.model import build_model


@dataclasses.dataclass
class LoadedModel:
    """A model ready for evaluation: its config, nnx graphdef and (sharded) state, and the mesh."""

    cfg: Config
    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: jax.sharding.Mesh


def load_model(source, *, model_cfg: ModelConfig | None = None, overrides: Sequence[str] = (), mesh=None,
               architectures: Sequence[str] = ARCHITECTURES) -> LoadedModel:
    """`source`: a run directory (newest complete checkpoint, params and router biases), a
    (Config, model state or nnx.Module) pair, or a LoadedModel. `model_cfg` replaces cfg.model and
    `overrides` ("a.b=value") are applied after it; neither may change parameter shapes. `mesh`
    defaults to one device, or to cfg.mesh over all devices when an override sets a mesh.* field.
    `architectures`: the model.architecture values the caller can use."""
    if isinstance(source, LoadedModel):
        if model_cfg is None and not overrides and mesh is None:
            _check_architecture(source.cfg, architectures)
            return source
        source = (source.cfg, source.state)
    if isinstance(source, (str, Path)):
        config_path = Path(source) / CONFIG_FILE
        if not config_path.exists():
            raise ValueError(f"run_dir={str(source)!r} has no {CONFIG_FILE}; give the directory of a training run")
        cfg = Config.from_dict(json.loads(config_path.read_text()))
        saved = None
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Config):
        cfg, saved = source
        if isinstance(saved, nnx.Module):
            saved = nnx.state(saved)
    else:
        raise ValueError(f"source={source!r:.80} must be a run directory, a (Config, model state) pair or a LoadedModel")
    if model_cfg is not None:
        cfg = dataclasses.replace(cfg, model=model_cfg)
    cfg = apply_overrides(cfg, list(overrides)).validate()
    _check_architecture(cfg, architectures)
    if mesh is None:
        mesh = (sharding.make_mesh(cfg.mesh) if any(o.startswith("mesh.") for o in overrides)
                else sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    if saved is None and cfg.lora.rank:
        model = adapted_model(source, cfg, mesh)
        with sharding.use_mesh(mesh):
            lora.merge_adapters(model)
        graphdef, state = nnx.split(model)
        return LoadedModel(dataclasses.replace(cfg, lora=LoRAConfig()), graphdef, state, mesh)
    with sharding.use_mesh(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))
        target, shardings = sharding.placed(abstract, mesh)
        if saved is None:
            state = restore_params(str(source), target)
        else:
            _check_shapes(saved, abstract)
            state = jax.device_put(saved, shardings)
    return LoadedModel(cfg, graphdef, state, mesh)


def adapted_model(run_dir: str | Path, cfg: Config, mesh) -> nnx.Module:
    """The LoRA run `run_dir`'s model with its adapters: the base params from cfg.checkpoint.init_from (with
    lora.quantize_base, as the run trained against them: quantized and dequantized), the adapters (and the other
    non-base state) from the run's newest checkpoint, placed on `mesh`."""
    with sharding.use_mesh(mesh):
        def build():
            model = build_model(cfg.model, rngs=nnx.Rngs(0))
            lora.add_adapters(model, cfg.lora, jax.random.key(0))
            return model

        graphdef, abstract = nnx.split(nnx.eval_shape(build))
        abstract, _ = sharding.placed(abstract, mesh)
        base = restore_params(cfg.checkpoint.init_from, nnx.filter_state(abstract, lora.BASE))
        adapters = restore_params(str(run_dir), lora.without_base(abstract))
        model = nnx.merge(graphdef, nnx.merge_state(base, adapters))
        if cfg.lora.quantize_base != "none":
            lora.dequantized_base(model)
    return model


def _check_architecture(cfg: Config, architectures: Sequence[str]) -> None:
    if cfg.model.architecture not in architectures:
        raise ConfigError(f"model.architecture={cfg.model.architecture!r} cannot be used here; this needs "
                          f"{' or '.join(map(repr, architectures))}")


def _check_shapes(saved, abstract) -> None:
    saved_shapes = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        key = jax.tree_util.keystr(path)
        if saved_shapes.get(key) != tuple(leaf.shape):
            raise ValueError(f"model state {key} has shape {saved_shapes.get(key)} but the model config needs "
                             f"{tuple(leaf.shape)}; overrides must not change parameter shapes")
