"""Checkpoint integrity: a digest per saved array, verified on restore; a corrupt checkpoint is skipped like a
partial one (train and `restore_params`, hence evaluate); all corrupt is one line; no non-finite state is saved."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from transformer import runs, train
from transformer.checkpoint import CheckpointWarning, NonFiniteStateError, array_digests, restore_params
from transformer.config import CheckpointConfig, Config, ConfigError

from processes import REPO, cpu_env
from test_checkpoint import (TinyLM, abstract_state, assert_bitwise_equal, checkpointer, make_config, mesh_of,
                             trained_state)
from test_train import checkpoint_dirs, tiny_args, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                        "ignore:Sharding info not provided when restoring")


def flip_bit(x: np.ndarray, element: int, bit: int) -> np.ndarray:
    """`x` with one bit of its element `element` (row-major) flipped."""
    words = np.array(x, order="C")
    view = words.reshape(-1).view(np.uint8)
    start = element * words.dtype.itemsize
    view[start + bit // 8] ^= np.uint8(1 << (bit % 8))
    return words


def flip_leaf(tree, path: tuple, bit: int = 3):
    """`tree` with one bit flipped in the middle element of its leaf at `path` (PRNG keys: in their key data)."""
    node = tree
    for key in path[:-1]:
        node = node[key]
    value = node[path[-1]]
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(value))
        node[path[-1]] = jax.random.wrap_key_data(flip_bit(data, data.size // 2, bit),
                                                  impl=jax.random.key_impl(value))
    else:
        value = np.asarray(value)
        node[path[-1]] = flip_bit(value, value.size // 2, bit)
    return tree


def as_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), tree)


# ---------------------------------------------------------------- the digest


def test_digest_sees_every_single_bit_and_ignores_the_sharding():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6)), jnp.float32)
    reference = array_digests({"x": x})[0]["x"]
    words = np.asarray(x).view(np.uint32).reshape(-1).astype(np.uint64)
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    assert int(reference[:8], 16) == int(np.sum(words * weights) % 2**32)  # sum_i w_i (2i + 1) mod 2**32
    for element, bit in [(0, 0), (0, 31), (47, 17), (20, 7)]:
        flipped = jnp.asarray(flip_bit(np.asarray(x), element, bit))
        assert array_digests({"x": flipped})[0]["x"] != reference, (element, bit)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh_of(8), jax.sharding.PartitionSpec("fsdp")))
    assert len(sharded.sharding.device_set) == 8
    assert array_digests({"x": sharded})[0]["x"] == reference
    # the same bits under another dtype of the same width digest alike; other values do not
    assert array_digests({"x": jax.lax.bitcast_convert_type(x, jnp.int32)})[0]["x"] == reference
    assert array_digests({"x": x + 1})[0]["x"] != reference


def test_digest_reports_non_finite_floating_arrays():
    tree = {"a": jnp.array([1.0, jnp.nan]), "b": {"c": jnp.array([jnp.inf], jnp.bfloat16)}, "d": jnp.arange(3),
            "e": jax.random.key(0)}
    digests, non_finite = array_digests(tree)
    assert sorted(digests) == ["a", "b/c", "d", "e"] and all(len(d) == 16 for d in digests.values())
    assert non_finite == ["a", "b/c"]


# ---------------------------------------------------------------- Checkpointer.restore_latest


def saved_steps(tmp_path) -> tuple:
    cfg = make_config(tmp_path, every_steps=1, keep_last=5)
    with checkpointer(cfg) as ckpt:
        ckpt.maybe_save(1, trained_state(1))
        ckpt.maybe_save(2, trained_state(2))
    return cfg, tmp_path / "run" / "checkpoints"


def rewrite_state(step_dir: Path, change) -> None:
    """Re-save `step_dir`'s state with `change` applied to its (host) tree: a corruption that orbax reads back
    without complaint."""
    tree = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    replacement = step_dir.parent / "replacement"
    ocp.PyTreeCheckpointer().save(replacement, change(tree))
    shutil.rmtree(step_dir / "state")
    shutil.move(replacement, step_dir / "state")


def leaf_paths(tree) -> list[tuple]:
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_a_bit_flipped_in_any_array_is_detected_and_the_previous_checkpoint_used(tmp_path):
    cfg, checkpoints = saved_steps(tmp_path)
    pristine = tmp_path / "pristine_2"
    shutil.copytree(checkpoints / "2", pristine)
    paths = leaf_paths(ocp.PyTreeCheckpointer().restore(pristine / "state"))
    assert len(paths) >= 8
    for path in paths:
        name = "/".join(path)
        rewrite_state(checkpoints / "2", lambda tree: flip_leaf(tree, path))
        with checkpointer(cfg) as ckpt, pytest.warns(CheckpointWarning) as record:
            restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
        messages = [str(w.message) for w in record]
        assert step == 1, name
        assert messages[0] == (f"skipping checkpoint {checkpoints / '2'}: checksum mismatch in 1 array ({name}): "
                               "the files changed after they were saved; trying the previous one"), messages
        assert messages[1].startswith(f"moved skipped checkpoint {checkpoints / '2'} to")
        assert_bitwise_equal(restored, trained_state(1))
        shutil.rmtree(tmp_path / "run" / "checkpoints_skipped")
        shutil.copytree(pristine, checkpoints / "2")
    with checkpointer(cfg) as ckpt:  # the untouched copy restores as step 2
        restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert step == 2
    assert_bitwise_equal(restored, trained_state(2))


def test_a_byte_flipped_in_any_data_file_never_restores_changed_arrays(tmp_path):
    """A flipped byte in each file of the state's data: the checkpoint is skipped, or restores exactly what was
    saved (a file the restore does not read, e.g. a per-process b-tree superseded by the merged one, or chunk data
    served from tensorstore's in-process cache, keyed by the data file's unique name). Each case corrupts a fresh
    copy of the run."""
    saved_steps(tmp_path / "original")
    original = tmp_path / "original" / "run" / "checkpoints" / "2" / "state"
    data_files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file() and p.parent.name == "d")
    steps = []
    for index, relative in enumerate(data_files):
        case = tmp_path / f"case{index}"
        shutil.copytree(tmp_path / "original" / "run", case / "run")
        flip_byte(case / "run" / "checkpoints" / "2" / "state" / relative)
        with checkpointer(make_config(case)) as ckpt:  # warnings are not checked: orbax's reader threads,
            restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))  # failing, reset warnings' capture
        assert_bitwise_equal(restored, trained_state(step))
        assert (case / "run" / "checkpoints_skipped" / "2").is_dir() == (step == 1), relative
        steps.append(step)
    assert 1 in steps


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


RESTORE_SCRIPT = """
import sys, warnings
import jax, jax.numpy as jnp
from transformer.checkpoint import Checkpointer
from transformer.config import Config
cfg = Config(run_dir=sys.argv[1])
abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
with warnings.catch_warnings(record=True) as caught, Checkpointer(sys.argv[1], cfg.checkpoint, config=cfg) as ckpt:
    warnings.simplefilter("always")
    restored, step = ckpt.restore_latest(abstract)
print(step, float(restored["w"][0, 0]), [str(w.message).split(";")[0] for w in caught if "skipping" in str(w.message)])
"""


def test_a_byte_flipped_in_saved_array_data_is_caught_by_the_checksum(tmp_path):
    """The silent case: a byte of an array's stored chunk (incompressible data, so zstd stores it raw) changes one
    value and orbax reads it without complaint. The restore runs in a fresh process (no tensorstore cache)."""
    run_dir = tmp_path / "run"
    cfg = Config(run_dir=str(run_dir), checkpoint=CheckpointConfig(every_steps=1, async_save=False))
    rng = np.random.default_rng(0)
    states = {step: {"w": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32), "b": jnp.zeros(4) + step}
              for step in (1, 2)}
    with checkpointer(cfg) as ckpt:
        for step, state in states.items():
            ckpt.maybe_save(step, state)
    chunks = max((p for p in (run_dir / "checkpoints" / "2" / "state").rglob("*") if p.parent.name == "d"),
                 key=lambda p: p.stat().st_size)
    assert chunks.stat().st_size > 0.8 * 256 * 256 * 4  # w, compressed a little (its exponent bytes)
    flip_byte(chunks)
    proc = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=cpu_env(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    step, first, skipped = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (int(step), float(first)) == (1, float(states[1]["w"][0, 0]))
    assert skipped == str([f"skipping checkpoint {run_dir / 'checkpoints' / '2'}: checksum mismatch in 1 array (w): "
                           "the files changed after they were saved"])


def test_every_checkpoint_corrupt_is_one_config_error(tmp_path):
    cfg, checkpoints = saved_steps(tmp_path)
    for step in (1, 2):
        rewrite_state(checkpoints / str(step), lambda tree: flip_leaf(tree, ("model", "w_DF")))
    with checkpointer(cfg) as ckpt, pytest.warns(CheckpointWarning):
        with pytest.raises(ConfigError) as error:
            ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert str(error.value) == (f"no restorable checkpoint in {checkpoints}: all of 2, 1 are incomplete or corrupt "
                                "(see the warnings); move them away to start the run from scratch")
    assert checkpoint_dirs(tmp_path / "run") == [1, 2]  # left where they are


# ---------------------------------------------------------------- restore_params (init_from, evaluate)


def test_restore_params_falls_back_past_a_corrupt_checkpoint_and_leaves_it(tmp_path):
    cfg, checkpoints = saved_steps(tmp_path)
    rewrite_state(checkpoints / "2", lambda tree: flip_leaf(tree, ("model", "embed_VD"), bit=30))
    abstract_params = nnx.state(nnx.eval_shape(lambda: TinyLM(16, rngs=nnx.Rngs(0))), nnx.Param)
    with pytest.warns(CheckpointWarning) as record:
        params = restore_params(cfg.run_dir, abstract_params)
    assert [str(w.message) for w in record] == [
        f"skipping checkpoint {checkpoints / '2'}: checksum mismatch in 1 array (model/embed_VD): the files changed "
        "after they were saved; trying the previous one"]
    want = trained_state(1)["model"]
    for name in ("embed_VD", "w_DF"):
        np.testing.assert_array_equal(np.asarray(params[name].get_value()), np.asarray(want[name].get_value()))
    assert checkpoint_dirs(tmp_path / "run") == [1, 2]
    with pytest.raises(ConfigError, match=r"is not a complete checkpoint: checksum mismatch in 1 array "
                                          r"\(model/embed_VD\)"):
        restore_params(str(checkpoints / "2"), abstract_params)
    rewrite_state(checkpoints / "1", lambda tree: flip_leaf(tree, ("model", "w_DF"), bit=0))
    with pytest.warns(CheckpointWarning), pytest.raises(ConfigError, match="no restorable checkpoint in .*: all of "
                                                                            "2, 1 are incomplete or corrupt"):
        restore_params(cfg.run_dir, abstract_params)


def test_checkpoints_without_checksums_still_restore(tmp_path):
    """Checkpoints written before checksums existed have no checksums item: they restore unverified."""
    cfg, checkpoints = saved_steps(tmp_path)
    shutil.rmtree(checkpoints / "2" / "checksums")
    with checkpointer(cfg) as ckpt:
        restored, step = ckpt.restore_latest(abstract_state(mesh_of(1)))
    assert step == 2
    assert_bitwise_equal(restored, trained_state(2))


# ---------------------------------------------------------------- the NaN guard at saves


def test_nan_guard_refuses_to_save_a_non_finite_state(tmp_path):
    cfg = make_config(tmp_path, every_steps=1)
    good = trained_state(1)
    bad = jax.tree.map(lambda x: x, trained_state(2))
    w = bad["model"]["w_DF"].get_value()
    bad["model"]["w_DF"].set_value(w.at[0, 0].set(jnp.nan))
    with checkpointer(cfg) as ckpt:
        assert ckpt.maybe_save(1, good)
        with pytest.raises(NonFiniteStateError) as error:
            ckpt.maybe_save(2, bad)
        assert ckpt.all_steps() == [1]
    assert str(error.value) == ("step 2: refusing to save a state with NaN or inf in 1 arrays (model/w_DF); "
                                "last checkpoint: 1")
    unguarded = dataclasses.replace(make_config(tmp_path / "unguarded", every_steps=1), nan_guard=False)
    with checkpointer(unguarded) as ckpt:
        assert ckpt.maybe_save(2, bad)  # nan_guard=false: saved as it is


# ---------------------------------------------------------------- train and evaluate on a real run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run with checkpoints 2 and 4."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    train.train(tiny_config(run_dir, "steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5"))
    assert checkpoint_dirs(run_dir) == [2, 4]
    return run_dir


def corrupt_params(step_dir: Path) -> None:
    """Flip a bit of the token embedding of checkpoint `step_dir`."""
    def change(tree):
        path = next(p for p in leaf_paths(tree["model"]) if "embed" in "/".join(p))
        return flip_leaf(tree, ("model", *path), bit=22)
    rewrite_state(step_dir, change)


def flat(tree) -> dict[str, np.ndarray]:
    """{"a/b/0/c": host array} of a nested dict (integer and string keys alike)."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(as_host(tree))}


def saved_params(step_dir: Path) -> dict:
    tree = ocp.PyTreeCheckpointer().restore(step_dir.absolute() / "state")
    return as_host(tree["model"])


def test_evaluate_and_train_fall_back_past_a_corrupt_checkpoint(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    corrupt_params(run_dir / "checkpoints" / "4")
    warning = f"skipping checkpoint {run_dir / 'checkpoints' / '4'}: checksum mismatch in 1 array"
    with pytest.warns(CheckpointWarning, match=warning):
        loaded = runs.load_model(str(run_dir))
    want, got = flat(saved_params(run_dir / "checkpoints" / "2")), flat(nnx.to_pure_dict(loaded.state))
    assert len(got) > 5 and set(got) <= set(want)
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    with pytest.warns(CheckpointWarning, match=warning):
        assert train.main(tiny_args(run_dir, "steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5")) == 0
    assert (run_dir / "checkpoints_skipped" / "4").is_dir() and checkpoint_dirs(run_dir) == [2, 4]
    resumed = flat(saved_params(run_dir / "checkpoints" / "4"))
    reference = flat(saved_params(trained_run / "checkpoints" / "4"))
    assert resumed.keys() == reference.keys()
    for name, value in resumed.items():  # steps 3 and 4 ran again from checkpoint 2, as in the first run
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_train_with_every_checkpoint_corrupt_prints_one_line(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for step in (2, 4):
        corrupt_params(run_dir / "checkpoints" / str(step))
    with pytest.warns(CheckpointWarning):
        assert train.main(tiny_args(run_dir, "steps=4", "checkpoint.every_steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"config error: no restorable checkpoint in {run_dir / 'checkpoints'}: all of 4, 2 are incomplete "
                   "or corrupt (see the warnings); move them away to start the run from scratch"]
