"""LoRA: exact init, frozen base and adapter-only optimizer state, adapter-only checkpoints, exact resume, merge
into the base (same logits as base + adapters), dropout, config errors."""

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import convert, lora, sharding, train
from transformer.checkpoint import Checkpointer
from transformer.config import ConfigError, LoRAConfig, MeshConfig, config_from_args
from transformer.data.placement import local_batch, place_batch
from transformer.model import build_model
from transformer.runs import load_model

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="transformer-test-jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
TINY = ["--preset", "tiny", "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.max_seq_len=32", "model.attention_block_size=32", "data.seq_len=32", "data.global_batch_size=8",
        "optim.warmup_steps=2", "optim.lr=1e-2", "log_every=1", "eval_every=0", "progress_bar=false",
        "tensorboard=false", "checkpoint.every_steps=0", "checkpoint.async_save=false", "sample_tokens=0"]
LORA = ["lora.rank=2", "lora.alpha=4", "lora.targets=attention,mlp"]


def config(run_dir, *extra):
    return config_from_args([*TINY, f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A trained base run (3 steps, so its weights are not the init's)."""
    run_dir = tmp_path_factory.mktemp("base")
    train.train(config(run_dir, "steps=3"))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_run) -> Path:
    run_dir = tmp_path_factory.mktemp("lora")
    cfg = config(run_dir, "steps=4", f"checkpoint.init_from={base_run}", *LORA, "sample_tokens=4")
    train.train(cfg)
    train.print_sample(cfg)  # what the CLI prints at the end: generation from the LoRA run dir (base + adapters)
    return run_dir


def single_device_mesh():
    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 16), 0, 259)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def newest_step_dir(run_dir: Path) -> Path:
    return max((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.parametrize("scan", [pytest.param(True, marks=pytest.mark.slow), False])
def test_adapters_at_init_leave_the_model_bitwise_unchanged(scan):
    cfg = config("unused", f"model.scan_layers={str(scan).lower()}", "model.moe.num_experts=4",
                 "model.moe.every_k_layers=2", "model.moe.num_shared_experts=1", "model.attention_bias=all")
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    base_logits, _ = model(tokens())
    added = lora.add_adapters(model, LoRAConfig(rank=4, targets="q,k,v,o,mlp", dropout=0.1), jax.random.key(1))
    assert added >= 7  # attention 4 + dense MLP 3 (+ MoE shared experts 3 unless scanned in one group)
    lora.set_training(model, False)
    logits, _ = model(tokens())
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
    a_params = [v for _, v in nnx.iter_graph(model) if isinstance(v, lora.LoRAParam)]
    assert any(np.abs(np.asarray(v[...])).max() > 0 for v in a_params)  # A is random, only B starts at zero


def _state_after_steps(cfg, steps: int):
    """(state before, state after `steps` LoRA train steps) on the config's mesh."""
    mesh = sharding.make_mesh(cfg.mesh)
    data = train.training_dataset(cfg)
    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = train.abstract_train_state(cfg, mesh)
        with Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg) as ckpt:
            state, _, origin = train.load_or_init(cfg, graphdef, abstract, shardings, ckpt)
        assert origin == "init_from"
        before = jax.device_get(nnx.to_pure_dict(state))
        step_fn = train.jit_train_step(cfg, shardings)
        for step in range(steps):
            state, _ = step_fn(graphdef, state, place_batch(local_batch(data, step, mesh), mesh))
        return graphdef, before, state


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_training_changes_only_adapters_and_the_optimizer_holds_no_base_state(tmp_path, base_run):
    cfg = config(tmp_path / "run", "steps=3", f"checkpoint.init_from={base_run}", *LORA, "lora.dropout=0.2")
    graphdef, before, state = _state_after_steps(cfg, 3)
    after = jax.device_get(nnx.to_pure_dict(state))
    base = _flat(nnx.to_pure_dict(nnx.filter_state(state["model"], lora.BASE)))
    adapters = set(_flat(nnx.to_pure_dict(nnx.filter_state(state["model"], lora.LoRAParam))))
    assert base and adapters
    model_before, model_after = _flat(before["model"]), _flat(after["model"])
    for key in base:
        np.testing.assert_array_equal(model_after[key], model_before[key], err_msg=key)
    keys = _flat(nnx.to_pure_dict(nnx.filter_state(state["model"], lora.LoRADropoutKey)))
    assert keys and all(not np.array_equal(keys[k], model_before[k]) for k in keys)  # dropout drew masks
    changed = [key for key in adapters if not np.array_equal(model_after[key], model_before[key])]
    assert sorted(changed) == sorted(adapters)  # every A and B moved (B off zero)
    optimizer_leaves = _flat(after["optimizer"])
    moments = [key for key in optimizer_leaves if "mu" in key or "nu" in key]
    assert len(moments) == 2 * len(adapters)
    assert all(tuple(optimizer_leaves[k].shape) in {model_after[a].shape for a in adapters} for k in moments)


@pytest.mark.slow
def test_checkpoint_holds_adapters_only_and_is_small(lora_run, tmp_path):
    step_dir = newest_step_dir(lora_run)
    names = " ".join(json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"])
    assert "'a'" in names and "'b'" in names and "'optimizer'" in names
    for base_name in ("q_DHW", "up_DF", "table", "down_FD"):
        assert f"'{base_name}'" not in names, base_name
    # sizes at a realistic width: the tiny preset's model (d_model 256), rank 8 on q and v, saved at step 0
    model = ["--preset", "tiny", "data.global_batch_size=8", "progress_bar=false", "tensorboard=false",
             "sample_tokens=0", "eval_every=0"]
    base_cfg = config_from_args([*model, f"run_dir={tmp_path / 'base'}"])
    with Checkpointer(base_cfg.run_dir, base_cfg.checkpoint, config=base_cfg) as ckpt:
        params = nnx.state(build_model(base_cfg.model, rngs=nnx.Rngs(0)))
        ckpt.maybe_save(0, {"model": nnx.to_pure_dict(params)}, force=True)
    summary = train.train(config_from_args([*model, f"run_dir={tmp_path / 'lora'}", "steps=0", "lora.rank=8",
                                            "lora.targets=q,v", f"checkpoint.init_from={tmp_path / 'base'}"]))
    lora_dir, base_dir = (tmp_path / name / "checkpoints" / "0" for name in ("lora", "base"))
    ratio = dir_bytes(lora_dir) / dir_bytes(base_dir)
    print(f"\ntrainable {summary['trainable_params']:,} of {summary['params']:,}; adapter checkpoint / base "
          f"checkpoint bytes on disk: {ratio:.4f}")
    assert ratio < 0.2  # adapters + 2 AdamW moments are 5% of the base; orbax's per-file overhead varies


def test_merged_run_gives_the_logits_of_base_plus_adapters(lora_run, tmp_path):
    mesh = single_device_mesh()
    cfg, adapted = convert.adapted_model(lora_run, mesh)
    b_values = [np.asarray(v[...]) for _, v in nnx.iter_graph(adapted) if isinstance(v, lora.LoRAParam)]
    assert any(np.abs(b).max() > 0 for b in b_values)
    merged = tmp_path / "merged"
    convert.merge_lora(lora_run, merged)
    loaded = load_model(merged)
    assert loaded.cfg.lora.rank == 0 and not loaded.cfg.checkpoint.init_from
    with sharding.use_mesh(mesh):
        reference, _ = adapted(tokens(3))
        merged_model = nnx.merge(loaded.graphdef, loaded.state)
        logits, _ = merged_model(tokens(3))
        base = load_model(cfg.checkpoint.init_from)
        base_logits, _ = nnx.merge(base.graphdef, base.state)(tokens(3))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(reference) - np.asarray(base_logits)).max() > 1e-4  # the adapters do something
    direct = load_model(lora_run)  # what evaluate and generate load: base + adapters, merged in memory
    assert direct.cfg.lora.rank == 0
    with sharding.use_mesh(direct.mesh):
        direct_logits, _ = nnx.merge(direct.graphdef, direct.state)(tokens(3))
    np.testing.assert_allclose(np.asarray(direct_logits), np.asarray(reference), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_lora_run_resumes_with_the_same_loss_trace(tmp_path, base_run):
    args = [f"checkpoint.init_from={base_run}", *LORA, "lora.dropout=0.3"]
    whole = train.train(config(tmp_path / "whole", "steps=6", *args))
    first = train.train(config(tmp_path / "split", "steps=3", *args))
    second = train.train(config(tmp_path / "split", "steps=6", *args))
    assert second["origin"] == "checkpoint" and second["start_step"] == 3
    assert first["losses"] + second["losses"] == whole["losses"]
    assert whole["trainable_params"] < whole["params"] / 10


def test_adapter_dropout_only_while_training():
    adapter = lora.LoRA(LoRAConfig(rank=2, alpha=2, dropout=0.5), stack=(), input_shape=(8,), output_shape=(4,),
                        input_axes=(None,), output_axes=(None,), stack_axes=(), param_dtype=jnp.float32,
                        key=jax.random.key(0))
    adapter.b[...] = jnp.ones((2, 4))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    reference = (np.asarray(x, np.float64) @ np.asarray(adapter.a[...], np.float64)) @ np.ones((2, 4))
    np.testing.assert_allclose(np.asarray(adapter("BD,DF->BF", x, jnp.float32)), reference, rtol=1e-5)
    adapter.deterministic = False
    first = np.asarray(adapter("BD,DF->BF", x, jnp.float32))
    second = np.asarray(adapter("BD,DF->BF", x, jnp.float32))
    assert not np.allclose(first, reference) and not np.allclose(first, second)  # new mask each forward


@pytest.mark.parametrize("override, fragment", [
    ("lora.targets=q,x", "lora.targets='q,x': 'x' is not a projection"),
    ("lora.targets=,", "names no projection"),
    ("lora.rank=-1", "lora.rank=-1 must be >= 0"),
    ("lora.dropout=1.0", "lora.dropout=1.0 must be in [0, 1)"),
    ("lora.alpha=0", "lora.alpha=0.0 must be"),
    ("lora.quantize_base=nf4", "lora.quantize_base='nf4' is not valid; choose one of 'none', 'int8'"),
    ("lora.rank=0 lora.quantize_base=int8", "lora.quantize_base='int8' quantizes a frozen base; it needs lora.rank > 0"),
    ("lora.rank=2 lora.quantize_base=int8", "with model.remat='none' would keep a float copy of every dequantized"),
])
def test_bad_lora_options_are_refused_in_one_line(override, fragment):
    with pytest.raises(ConfigError) as error:
        config("unused", *override.split(), "checkpoint.init_from=somewhere").validate()
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_lora_without_a_base_is_refused():
    with pytest.raises(ConfigError, match="needs checkpoint.init_from"):
        config("unused", "lora.rank=2").validate()


def test_checkpoints_written_before_lora_existed_still_match():
    from transformer.checkpoint import config_differences

    current = config("unused")
    saved = json.loads(current.to_json())
    del saved["lora"]
    assert config_differences(saved, current) == []
    lora_cfg = config("unused", "lora.rank=2", "checkpoint.init_from=base")
    assert config_differences(saved, lora_cfg) == ["lora.rank: saved '<absent>', current 2"]


def test_merge_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    assert convert.main(["--merge", str(tmp_path)]) == 2
    assert convert.main(["--merge", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: --merge RUN needs --out") and "has no config.json" in lines[1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("q_lora_rank", [pytest.param(0, marks=pytest.mark.slow), 8], ids=["full_rank_q", "low_rank_q"])
def test_mla_adapters_merge_exactly_and_decode_through_the_latent_cache(q_lora_rank):
    """LoRA on MLA's q (or its up-projection), per-head key / value up-projections and output: the adapted model
    equals its merge, and its latent-cache decode (which absorbs the adapted up-projections) equals its full
    forward."""
    from test_inference import cfg_with, full_forward, incremental, random_rows, rel_errors

    cfg = cfg_with(attention="mla", kv_lora_rank=12, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=4,
                   v_head_dim=6)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    assert lora.add_adapters(model, LoRAConfig(rank=2, alpha=4, targets="q,k,v,o"), jax.random.key(1)) == 4
    lora.set_training(model, False)
    rng = np.random.default_rng(2)
    for _, value in nnx.iter_graph(model):
        if isinstance(value, lora.LoRAParam):
            value[...] = jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype)
    adapted, _ = model(tokens(4))
    rows = random_rows([9, 9])
    graphdef, state = nnx.split(model)
    got, _ = incremental(cfg, graphdef, state, rows, [5, 5])
    want = full_forward(cfg, graphdef, state, rows)
    assert max(rel_errors(g, w).max() for g, w in zip(got, want)) < 1e-5
    base_logits, _ = build_model(cfg, rngs=nnx.Rngs(0))(tokens(4))
    assert lora.merge_adapters(model) == 4
    merged, _ = model(tokens(4))
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(base_logits)).max() > 1e-2  # the adapters act


def test_int8_weights_read_as_their_dequantized_values_within_half_a_step():
    from transformer.quantize import Int8Weight, quantize

    w = jax.random.normal(jax.random.key(0), (3, 16, 4, 8)) * jnp.arange(1, 9)  # (layers, D, H, W): scale per (H, W)
    weight = nnx.Param(w, logical_axes=("layers", "embed", "heads", "head_dim"))
    int8 = Int8Weight(weight, contracted=(1,))
    values, scale = quantize(w, (1,))
    assert values.dtype == jnp.int8 and scale.shape == (3, 1, 4, 8) and int(jnp.abs(values).max()) == 127
    assert int8.scale.get_metadata()["logical_axes"] == ("layers", None, "heads", "head_dim")
    error = np.abs(np.asarray(int8[...]) - np.asarray(w))
    assert np.all(error <= np.asarray(scale) / 2 + 1e-6) and error.max() > 0
    np.testing.assert_array_equal(np.asarray(int8[1]), np.asarray(values[1] * scale[1]))


@pytest.mark.slow  # keeps the default suite under 15 minutes; int8 weights and options stay in the default run
def test_qlora_run_trains_adapters_on_an_int8_base_and_loads_as_it_trained(tmp_path, base_run):
    from transformer.quantize import Int8Weight, Quantized

    cfg = config(tmp_path / "qlora", "steps=3", f"checkpoint.init_from={base_run}", *LORA, "lora.quantize_base=int8",
                 "model.remat=dots_saveable")
    summary = train.train(cfg)
    assert summary["step"] == 3 and np.isfinite(summary["losses"]).all()
    mesh = single_device_mesh()
    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = train.abstract_train_state(cfg, mesh)
        with Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg) as ckpt:
            saved = ckpt.restore_latest(train.checkpointed(cfg, abstract))[0]
            state, step, origin = train.load_or_init(cfg, graphdef, abstract, shardings, ckpt)
        assert (step, origin) == (3, "checkpoint")
        assert not nnx.filter_state(saved, Quantized) and not nnx.filter_state(saved, lora.BASE)  # adapters etc.
        model = nnx.merge(graphdef, state).model
        int8 = [node for _, node in nnx.iter_graph(model) if isinstance(node, Int8Weight)]
        assert len(int8) == 7 and all(w.values.dtype == jnp.int8 and w.shape[0] == 2 for w in int8)  # q k v o
        # gate up down, each stacked over the 2 scanned layers
        trained, _ = model(tokens(5))
        base = load_model(base_run)
        base_logits, _ = nnx.merge(base.graphdef, base.state)(tokens(5))
        loaded = load_model(cfg.run_dir)  # the float base quantized and dequantized, the adapters merged in
        loaded_logits, _ = nnx.merge(loaded.graphdef, loaded.state)(tokens(5))
    np.testing.assert_allclose(np.asarray(loaded_logits), np.asarray(trained), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(trained) - np.asarray(base_logits)).max() > 1e-3
