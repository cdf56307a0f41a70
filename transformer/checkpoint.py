"""Checkpoints that continue a run bit-for-bit, on any mesh and process count.

Layout of a run directory::

    run_dir/config.json                 the run's config (JSON)
    run_dir/checkpoints/<step>/state    the full nnx state (params, optimizer, rng, router biases)
    run_dir/checkpoints/<step>/config   the config that wrote the checkpoint
    run_dir/checkpoints/<step>/meta     step, process and device counts, library versions
    run_dir/checkpoints/<step>/checksums  a 64-bit digest of every saved array, verified on restore
    run_dir/checkpoints_skipped/        incomplete, unreadable or corrupt checkpoints moved aside on resume

Usage in a training loop (every process makes the same calls)::

    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg)
    restored = ckpt.restore_latest(abstract_state)      # None: start from scratch
    with PreemptionGuard() as guard:
        for step in range(start, cfg.steps):
            state = train_step(state, batch(step)); step += 1
            if guard.should_stop():
                ckpt.maybe_save(step, state, force=True); break
            ckpt.maybe_save(step, state)
    ckpt.close()

The saved step is the number of completed optimizer steps, which is also the data
position (batches are indexed by step).

Integrity: each array's digest (`array_digests`: its bits, position-weighted, summed modulo 2**32, so any
mesh gives the same value and any single flipped bit changes it) is computed on the devices before the
save and committed with it. A restored array whose digest differs makes the checkpoint corrupt: it is
skipped like a partial one. With cfg.nan_guard, a state holding NaN or inf is never saved
(NonFiniteStateError). A failed save (e.g. a full disk) raises SaveError at the next `check_saves` or
`maybe_save`, in one line; orbax's own tracebacks of it are not logged.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from transformer.config import CheckpointConfig, Config, ConfigError

CHECKPOINTS = "checkpoints"
SKIPPED = "checkpoints_skipped"
CONFIG_FILE = "config.json"
COMMIT_FILE = "commit_success.txt"
CHECKSUMS = "checksums"

# Config fields (paths of field names; a section covers all its fields) that may change when a run is
# resumed: they do not change what the checkpoint holds or which batch comes next (mesh changes reshard
# on restore).
RESUMABLE_FIELDS = (
    ("run_dir",), ("steps",), ("checkpoint",), ("mesh",), ("log_every",), ("eval_every",), ("eval_batches",),
    ("progress_bar",), ("tensorboard",), ("nan_guard",), ("loss_chunk_size",), ("synchronous",), ("profile_steps",),
    ("compilation_cache_dir",),
    ("model", "attention_kernel"), ("model", "attention_block_size"), ("model", "remat"),
)


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or moved aside."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the step and the cause."""


class NonFiniteStateError(FloatingPointError):
    """The state to save holds NaN or inf values; nothing was saved."""


class _OrbaxTracebacks(logging.Filter):
    """Drops orbax's logged tracebacks: every read or write failure they describe reaches the caller as one
    warning or error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_orbax_tracebacks() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxTracebacks) for f in logger.filters):
        logger.addFilter(_OrbaxTracebacks())


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


# ---------------------------------------------------------------- config comparison


def _flatten(values: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _resumable(path: tuple[str, ...]) -> bool:
    return any(path[:len(field)] == field for field in RESUMABLE_FIELDS)


def config_differences(saved: dict, current: Config) -> list[str]:
    """`field: saved X, current Y` for each field that must match to continue a run. A field the saved config
    lacks (added to the library since) matches its default."""
    old = _flatten(saved)
    new = _flatten(json.loads(current.to_json()))
    defaults = _flatten(json.loads(Config().to_json()))
    diffs = []
    for path in sorted(set(old) | set(new)):
        if _resumable(path) or old.get(path, defaults.get(path)) == new.get(path):
            continue
        diffs.append(f"{'.'.join(path)}: saved {old.get(path, '<absent>')!r}, current {new.get(path, '<absent>')!r}")
    return diffs


def _check_same_run(saved: dict, current: Config, where: str) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        raise ConfigError(
            f"{where} belongs to a run with a different config ({'; '.join(diffs)}). "
            "Use a new run_dir, or checkpoint.init_from=<that run_dir> to start from its params.")


def _check_same_layout(step_dir: Path, abstract_pure: dict) -> None:
    """ConfigError when the checkpoint's saved arrays have other names than this code's state (the model code
    changed, e.g. a renamed parameter). Read from orbax's tree metadata file, without touching the arrays; an
    unreadable layout is left to the restore to judge."""
    try:
        tree = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
        saved = {tuple(str(key) for key in ast.literal_eval(path)) for path in tree}
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return
    expected = set(_flat_paths(abstract_pure))
    if saved != expected:
        missing, extra = (sorted("/".join(path) for path in paths) for paths in (expected - saved, saved - expected))
        raise ConfigError(
            f"checkpoint {str(step_dir)!r} was written by other model code: it lacks {len(missing)} arrays this code "
            f"has (e.g. {', '.join(missing[:2]) or 'none'}) and has {len(extra)} it does not (e.g. "
            f"{', '.join(extra[:2]) or 'none'}). Restore it with the version that wrote it, or use a new run_dir.")


# ---------------------------------------------------------------- state trees


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _to_pure(tree) -> dict:
    """Nested dict of arrays (or ShapeDtypeStructs) from an nnx.State or a dict of Variables/arrays."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable)


def _from_pure(template, pure: dict):
    """`pure`'s values in the structure (and Variable types) of `template`."""
    if isinstance(template, nnx.State):
        result = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(result, pure)
        return result
    return jax.tree.map(lambda t, v: t.replace(v) if _is_variable(t) else v, template, pure, is_leaf=_is_variable)


def _abstract(tree):
    """ShapeDtypeStructs for a tree of arrays or ShapeDtypeStructs; leaves without a
    sharding go to the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) or default)
    return jax.tree.map(leaf, tree)


def _all_processes_agree(ok: bool) -> bool:
    """True only if `ok` holds on every process (every process must call this)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([ok], dtype=np.int32))))


def _problem_anywhere(problem: str | None) -> str | None:
    """This process's `problem`, or a stand-in when only another process has one (a collective)."""
    if _all_processes_agree(problem is None):
        return None
    return problem or "unreadable on another process"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- array digests


def _words(x):
    """The bits of `x` as uint32 words: one per element of up to 4 bytes, two (a trailing axis) per 8-byte one."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(z):
    """murmur3's 32-bit finaliser."""
    z = (z ^ (z >> 16)) * jnp.uint32(0x85EBCA6B)
    z = (z ^ (z >> 13)) * jnp.uint32(0xC2B2AE35)
    return z ^ (z >> 16)


def _digest(x):
    """([sum_i w_i (2i + 1), sum_i mix(w_i ^ i * golden)] mod 2**32 over the words w_i at row-major index i,
    whether every element is finite). Integer sums do not depend on the order of the reduction, so the
    digest is the same on any sharding; the odd weights make every single-bit change visible."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    first = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(_mix(words ^ (index * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    inexact = not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) and jnp.issubdtype(x.dtype, jnp.inexact)
    return jnp.stack([first, second]), (jnp.all(jnp.isfinite(x)) if inexact else jnp.bool_(True))


_digests = jax.jit(lambda arrays: [_digest(x) for x in arrays])


def array_digests(tree) -> tuple[dict[str, str], list[str]]:
    """({"a/b": 16 hex digits} for each array of `tree` (a nested dict of arrays, e.g. a pure state), the
    paths of floating arrays holding NaN or inf). Computed on the arrays' devices (a collective with
    several processes: call it on every process)."""
    flat = {"/".join(path): leaf for path, leaf in _flat_paths(tree).items()}
    groups: dict[frozenset, list[str]] = {}
    for path, leaf in flat.items():
        devices = getattr(leaf, "sharding", None)
        groups.setdefault(frozenset(devices.device_set) if devices is not None else frozenset(), []).append(path)
    digests, non_finite = {}, []
    for paths in groups.values():
        results = jax.device_get(_digests([flat[path] for path in paths]))
        for path, (words, finite) in zip(paths, results):
            digests[path] = f"{int(words[0]):08x}{int(words[1]):08x}"
            if not finite:
                non_finite.append(path)
    return digests, sorted(non_finite)


def _digest_mismatch(restored: dict, saved: dict[str, str] | None) -> str | None:
    """Why the restored arrays do not match the digests saved with them (None: they do, or none were saved)."""
    if saved is None:
        return None
    got, _ = array_digests(restored)
    bad = [path for path, digest in got.items() if saved.get(path, digest) != digest]
    if not bad:
        return None
    return (f"checksum mismatch in {len(bad)} array{'s' if len(bad) > 1 else ''} ({', '.join(bad[:3])}): "
            "the files changed after they were saved")


# ---------------------------------------------------------------- step directories


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Finished-looking step directories (integer names), newest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(p.name), p) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, reverse=True)


def _temporary_dirs(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def _missing_parts(step_dir: Path) -> str | None:
    """Why `step_dir` is not a complete checkpoint, or None if all its parts are there."""
    for part in (COMMIT_FILE, "state/_METADATA", "state/manifest.ocdbt", "config", "meta"):
        if not (step_dir / part).exists():
            return f"missing {part}" + (" (the save never finished)" if part == COMMIT_FILE else "")
    return None


def _step_checkpointer(state_handler) -> ocp.Checkpointer:
    """Reads one step directory outside a CheckpointManager (for init_from)."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        state=state_handler, config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
        checksums=ocp.JsonCheckpointHandler()))


def _checksums_arg(step_dir: Path) -> dict:
    """The restore argument of the checksums item, if the checkpoint has one (those written before checksums
    existed do not)."""
    return {CHECKSUMS: ocp.args.JsonRestore()} if (step_dir / CHECKSUMS).is_dir() else {}


def _run_dir_problem(run_dir: Path) -> str | None:
    """Why checkpoints cannot be written under `run_dir` (created if missing), or None."""
    if run_dir.exists() and not run_dir.is_dir():
        return "is a file, not a directory"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    return None


# ---------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Saves and restores the training state of the run in `run_dir` (orbax CheckpointManager)."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, *, config: Config):
        cfg.validate()
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / CHECKPOINTS
        self.cfg = cfg
        self.config = config
        self._config_json = json.loads(config.to_json())
        problem = _problem_anywhere(_run_dir_problem(self.run_dir))
        if problem:
            raise ConfigError(f"run_dir={str(self.run_dir)!r} {problem}; give a writable directory "
                              "(it is created if missing)")
        _quiet_orbax_tracebacks()
        self._check_run_dir()
        self._write_config_json()
        policies = [ocp.checkpoint_managers.LatestN(cfg.keep_last)]
        if cfg.keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})
        self._last_save_time = time.monotonic()
        self._last_saved_step = self._manager.latest_step()
        self._saving_step: int | None = None  # the step of the save in flight (async) or last started

    def _check_run_dir(self) -> None:
        """Refuse a run_dir whose config.json or newest readable checkpoint is from a different run."""
        config_path = self.run_dir / CONFIG_FILE
        if config_path.exists():
            _check_same_run(json.loads(config_path.read_text()), self.config, f"run_dir {str(self.run_dir)!r}")
        for _, step_dir in _step_dirs(self.directory):
            if _missing_parts(step_dir) is None:
                try:
                    saved = _step_checkpointer(ocp.StandardCheckpointHandler()).restore(
                        step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
                except Exception:  # unreadable: restore_latest skips it with a warning
                    continue
                _check_same_run(saved, self.config, f"checkpoint {str(step_dir)!r}")
                return

    def _write_config_json(self) -> None:
        if jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / CONFIG_FILE
            text = self.config.to_json() + "\n"
            if not path.exists() or path.read_text() != text:
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(text)
                tmp.replace(path)
        _barrier("transformer.checkpoint.config_json")

    def _read_config(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    # -------------------------------------------------------------- restore

    def restore_latest(self, abstract_state) -> tuple[Any, int] | None:
        """(state, step) from the newest good checkpoint, or None if the run has none.

        `abstract_state` holds jax.ShapeDtypeStructs whose shardings say where each array
        goes (any mesh, any process count). Incomplete or unreadable checkpoints newer than
        the one restored are skipped with a warning and moved to run_dir/checkpoints_skipped.
        """
        self.wait_until_finished()
        self._manager.reload()
        abstract_pure = _abstract(_to_pure(abstract_state))
        skipped: list[Path] = []
        for step, step_dir in _step_dirs(self.directory):
            problem = _missing_parts(step_dir)
            saved_config = None
            if problem is None:
                try:
                    saved_config = self._read_config(step)
                except Exception as e:
                    problem = f"unreadable config ({type(e).__name__}: {e})"
            problem = _problem_anywhere(problem)
            if problem is None:
                _check_same_run(saved_config, self.config, f"checkpoint {str(step_dir)!r}")
                _check_same_layout(step_dir, abstract_pure)
                try:
                    items = self._manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_pure), **_checksums_arg(step_dir)))
                    restored = items.state
                    problem = _digest_mismatch(restored, items.get(CHECKSUMS))
                except Exception as e:
                    problem = f"unreadable state ({type(e).__name__}: {str(e)[:500]})"
                problem = _problem_anywhere(problem)
            if problem is not None:
                warnings.warn(f"skipping checkpoint {step_dir}: {problem}; trying the previous one",
                              CheckpointWarning, stacklevel=2)
                skipped.append(step_dir)
                continue
            self._set_aside(skipped + [p for p in _temporary_dirs(self.directory)
                                       if not p.name.split(".")[0].isdigit() or int(p.name.split(".")[0]) > step])
            self._last_saved_step = step
            return _from_pure(abstract_state, restored), step
        if skipped:
            raise ConfigError(f"no restorable checkpoint in {self.directory}: all of "
                              f"{', '.join(p.name for p in skipped)} are incomplete or corrupt (see the warnings); "
                              "move them away to start the run from scratch")
        self._set_aside(_temporary_dirs(self.directory))
        return None

    def _set_aside(self, paths: list[Path]) -> None:
        """Move incomplete checkpoints out of the way (never deleted) so their steps can be saved again."""
        if paths and jax.process_index() == 0:
            target = self.run_dir / SKIPPED
            target.mkdir(parents=True, exist_ok=True)
            for path in paths:
                dest = target / path.name
                if dest.exists():
                    dest = target / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**6}"
                shutil.move(str(path), str(dest))
                warnings.warn(f"moved skipped checkpoint {path} to {dest}", CheckpointWarning, stacklevel=3)
        _barrier("transformer.checkpoint.set_aside")
        self._manager.reload()

    # -------------------------------------------------------------- save

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `step` is due (every_steps / every_seconds / force) and not saved yet.

        With several processes and checkpoint.every_seconds, process 0's clock decides (a
        collective: call on every process at every step)."""
        if self._last_saved_step is not None and step <= self._last_saved_step:
            return False
        if force or (self.cfg.every_steps and step % self.cfg.every_steps == 0):
            return True
        if not self.cfg.every_seconds:
            return False
        due = time.monotonic() - self._last_save_time >= self.cfg.every_seconds
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def maybe_save(self, step: int, state, *, force: bool = False) -> bool:
        """Save `state` as checkpoint `step` if a policy (or `force`) says so; True if saved.

        With checkpoint.async_save the write continues in the background; the arrays are
        copied off the device before this returns, so `state` may be donated afterwards.
        """
        self.check_saves()
        if not self.should_save(step, force=force):
            return False
        pure = _to_pure(state)
        digests, non_finite = array_digests(pure)
        if non_finite and self.config.nan_guard:
            saved = self.all_steps()
            raise NonFiniteStateError(
                f"step {step}: refusing to save a state with NaN or inf in {len(non_finite)} arrays "
                f"({', '.join(non_finite[:3])}); last checkpoint: {saved[-1] if saved else 'none'}")
        meta = {"step": int(step), "process_count": jax.process_count(), "device_count": jax.device_count(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": {"jax": jax.__version__, "orbax": ocp.__version__}}
        self._saving_step = step
        try:
            saved = self._manager.save(
                step, force=True,
                args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                        config=ocp.args.JsonSave(self._config_json),
                                        meta=ocp.args.JsonSave(meta), **{CHECKSUMS: ocp.args.JsonSave(digests)}))
        except Exception as e:
            raise self._save_error(e) from None
        if saved:
            self._last_saved_step = step
            self._last_save_time = time.monotonic()
        return saved

    def check_saves(self) -> None:
        """Raise SaveError if a background save has failed (cheap: call it at every step)."""
        if not self._manager.is_saving_in_progress():
            self.wait_until_finished()

    def _save_error(self, error: BaseException) -> SaveError:
        intact = [step for step, step_dir in _step_dirs(self.directory) if _missing_parts(step_dir) is None]
        return SaveError(f"checkpoint {self._saving_step} could not be saved ({_one_line(error)}); the earlier "
                         f"checkpoints are intact (newest: {intact[0] if intact else 'none'})")

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Block until the save in flight is written; SaveError if it failed (reported once)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e) from None

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- params-only initialisation


def _candidate_step_dirs(path: str) -> tuple[bool, list[Path]]:
    """(whether `path` names one checkpoint step directory, the step directories to try, newest first)."""
    root = Path(path).absolute()
    if not path or not root.exists():
        raise ConfigError(f"checkpoint.init_from={path!r} does not exist; give a run directory "
                          f"(with {CHECKPOINTS}/) or a checkpoint step directory (with state/)")
    if (root / "state").is_dir():
        return True, [root]
    steps = _step_dirs(root / CHECKPOINTS if (root / CHECKPOINTS).is_dir() else root)
    if not steps:
        raise ConfigError(f"checkpoint.init_from={path!r} holds no complete checkpoint; give a run directory "
                          f"(with {CHECKPOINTS}/<step>/) or a checkpoint step directory (with state/)")
    return False, [step_dir for _, step_dir in steps]


def _flat_paths(tree) -> dict[tuple, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in flat}


def _find_subtree(saved: dict, wanted: set[tuple]) -> tuple:
    """Key path of the subtree of `saved` (a nested dict) that holds every path in `wanted`."""
    queue = [((), saved)]
    while queue:
        prefix, node = queue.pop(0)
        if isinstance(node, dict):
            if wanted <= set(_flat_paths(node)):
                return prefix
            queue.extend((prefix + (key,), child) for key, child in node.items())
    raise ValueError("the checkpoint holds no subtree with all parameters; first missing ones: "
                     f"{sorted('/'.join(p) for p in wanted - set(_flat_paths(saved)))[:5]}")


def restore_params(path: str, abstract_params):
    """Params only (no optimizer state or step) from a run dir or a checkpoint step dir, placed on the
    shardings in `abstract_params`. From a run dir, the newest checkpoint that is complete and matches its
    checksums: newer ones are skipped with the warning `Checkpointer.restore_latest` gives (and left where
    they are); ConfigError when none is usable. A corrupt step dir is a ConfigError too."""
    explicit, candidates = _candidate_step_dirs(path)
    abstract_pure = _to_pure(abstract_params)
    for step_dir in candidates:
        problem, restored = _missing_parts(step_dir), None
        if problem is None:
            problem, restored = _read_params(step_dir, abstract_pure)
        problem = _problem_anywhere(problem)
        if problem is None:
            return _from_pure(abstract_params, restored)
        if explicit:
            raise ConfigError(f"checkpoint.init_from={path!r} is not a complete checkpoint: {problem}")
        warnings.warn(f"skipping checkpoint {step_dir}: {problem}; trying the previous one",
                      CheckpointWarning, stacklevel=2)
    raise ConfigError(f"no restorable checkpoint in {path!r}: all of {', '.join(p.name for p in candidates)} are "
                      "incomplete or corrupt (see the warnings)")


def _read_params(step_dir: Path, abstract_pure: dict) -> tuple[str | None, dict | None]:
    """(None, the params of `abstract_pure` read from `step_dir`) or (why they cannot be read, None). A
    checkpoint of another model (other names or shapes) raises ValueError instead."""
    _quiet_orbax_tracebacks()
    checkpointer = _step_checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        saved_tree = checkpointer.metadata(step_dir).item_metadata["state"].tree
    except Exception as e:
        return f"unreadable metadata ({_one_line(e)})", None
    wanted = _flat_paths(abstract_pure)
    prefix = _find_subtree(saved_tree, set(wanted))
    saved_leaves = _flat_paths(saved_tree)
    for key, leaf in wanted.items():
        saved_shape = tuple(saved_leaves[tuple(prefix) + key].shape)
        if saved_shape != tuple(leaf.shape):
            raise ValueError(f"param {'/'.join(key)} has shape {saved_shape} in {step_dir} "
                             f"but {tuple(leaf.shape)} in the model")
    target = abstract_pure
    for key in reversed(prefix):
        target = {key: target}
    target = _abstract(target)
    try:
        items = checkpointer.restore(step_dir, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True), **_checksums_arg(step_dir)))
        restored = items.state
        problem = _digest_mismatch(restored, items.get(CHECKSUMS))
    except Exception as e:
        return f"unreadable state ({_one_line(e)})", None
    if problem:
        return problem, None
    for key in prefix:
        restored = restored[key]
    return None, restored


# ---------------------------------------------------------------- preemption


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a request to stop after the current step.

    Inside the `with` block a signal sets `.requested` (a second SIGINT interrupts at
    once). On exit the previous handlers come back. With several processes call
    `should_stop()` once per step on every process: it is True on all of them as soon as
    any one was signalled, so they save the same step together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum

    def should_stop(self) -> bool:
        return not _all_processes_agree(not self.requested)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionGuard outside the main thread cannot install signal handlers; "
                          "SIGTERM will not be caught", CheckpointWarning, stacklevel=2)
            return self
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
