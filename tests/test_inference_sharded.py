"""Decode over a KV cache split across devices: on 8 fake devices (`mesh.sequence`, mixed with `data` and
`tensor`) and across 2 processes, generation and logits equal a single device's."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from processes import cpu_env, run_two_processes
from transformer import sharding
from transformer.config import Config, MeshConfig, ModelConfig
from transformer.inference.cache import init_cache
from transformer.inference.generate import Generator, extend_step, on_mesh, prefill_step
from transformer.inference.sampling import SamplingConfig
from transformer.model import build_model
from transformer.train import train

from test_train import REPO, tiny_config

MODEL = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256, attention_block_size=8,
                    init_std=0.3)
MESHES = [MeshConfig(data=1, sequence=8), MeshConfig(data=2, sequence=2, tensor=2), MeshConfig(data=1, sequence=4,
                                                                                                 tensor=2)]


def decode_logits(model_cfg, state, prompt_BL, new_BL, mesh):
    """Prefill then one token at a time on `mesh`: the logits of every new token, (B, T, V)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))))
    B, P = prompt_BL.shape
    with sharding.use_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        cache = init_cache(model_cfg, B, 40, mesh=mesh)
        valid = lambda x: on_mesh(np.ones(x.shape, bool), mesh)
        logits_BV, cache = prefill_step(graphdef, state, cache, on_mesh(prompt_BL, mesh), valid(prompt_BL), fresh=True)
        out = [np.asarray(jax.device_get(logits_BV))]
        for t in range(new_BL.shape[1]):
            token_B1 = new_BL[:, t:t + 1]
            logits_B1V, cache = extend_step(graphdef, state, cache, on_mesh(token_B1, mesh), valid(token_B1))
            out.append(np.asarray(jax.device_get(logits_B1V))[:, 0])
    return np.stack(out, axis=1), cache


@pytest.mark.parametrize("mesh_cfg", [pytest.param(MESHES[0], marks=pytest.mark.slow), *MESHES[1:]],
                         ids=lambda m: "x".join(f"{k}{v}" for k, v in m.shape.items() if v > 1))
def test_split_cache_decode_equals_one_device(mesh_cfg):
    model = build_model(MODEL, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    prompt_BL = rng.integers(0, 259, (2, 16)).astype(np.int32)
    new_BL = rng.integers(0, 259, (2, 12)).astype(np.int32)
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    want, _ = decode_logits(MODEL, state, prompt_BL, new_BL, one)
    got, cache = decode_logits(MODEL, state, prompt_BL, new_BL, sharding.make_mesh(mesh_cfg))
    assert "sequence" in str(cache.k_NBKGW.sharding.spec)
    error = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert error.max() < 1e-5
    full, _ = model(jnp.asarray(np.concatenate([prompt_BL, new_BL], 1)))
    np.testing.assert_allclose(got[:, 1:], np.asarray(full)[:, 16:], rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # keeps the default suite under 15 minutes; decode equality on these meshes stays in it
@pytest.mark.parametrize("mesh_cfg", MESHES[:2], ids=["sequence8", "data2_sequence2_tensor2"])
def test_split_cache_generation_equals_one_device(mesh_cfg):
    model = build_model(MODEL, rngs=nnx.Rngs(0))
    cfg = Config(model=MODEL)
    prompts = [list(range(10, 30)), list(range(40, 47))]
    for sampling in (SamplingConfig(temperature=0, max_new_tokens=20), SamplingConfig(temperature=1.0, seed=5,
                                                                                      max_new_tokens=20)):
        want = Generator((cfg, model)).generate(prompts, sampling, decode_steps_per_call=7).tokens
        got = Generator((cfg, nnx.state(model)), mesh=sharding.make_mesh(mesh_cfg)).generate(
            prompts, sampling, decode_steps_per_call=7).tokens
        assert got == want


@pytest.mark.slow
def test_two_processes_generate_like_one(tmp_path):
    """`python -m transformer.generate` over 2 processes x 4 devices (cache split over mesh.sequence=8) writes
    the same tokens as one process on one device."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, "steps=3"))
    args = ["-m", "transformer.generate", f"run_dir={run_dir}", "prompt=And God said", "max_new_tokens=24",
            "temperature=1", "seed=3", "num_samples=2", "stream=false"]
    single = subprocess.run([sys.executable, *args, f"out={tmp_path / 'one.json'}"], env=cpu_env(1), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    run_two_processes([*args, f"out={tmp_path / 'two.json'}", "mesh.data=1", "mesh.sequence=8"], timeout=300,
                      TRANSFORMER_INIT_TIMEOUT="120")
    rows = lambda name: [r["generated_ids"] for r in json.loads((tmp_path / name).read_text())["rows"]]
    assert rows("two.json") == rows("one.json")
    assert len(rows("one.json")[0]) == 24


def test_split_cache_decode_moves_no_cache():
    """The compiled decode step on mesh.sequence=8 has only all-reduces (of the lse and the weighted outputs),
    no all-gather or permute that would move the cache."""
    mesh = sharding.make_mesh(MeshConfig(data=1, sequence=8))
    graphdef, state = nnx.split(build_model(MODEL, rngs=nnx.Rngs(0)))
    with sharding.use_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        cache = init_cache(MODEL, 2, 64, mesh=mesh)
        token = on_mesh(np.zeros((2, 1), np.int32), mesh)
        hlo = extend_step.lower(graphdef, state, cache, token, on_mesh(np.ones((2, 1), bool), mesh)).compile().as_text()
    collectives = [line for line in hlo.splitlines() if any(
        op in line for op in (" all-gather(", " all-to-all(", " collective-permute(", " all-reduce(", " reduce-scatter("))]
    assert collectives and all(" all-reduce(" in line for line in collectives), collectives
