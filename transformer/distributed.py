"""Multi-process start-up through jax.distributed: one call, before any other JAX call.

    info = distributed.initialize()          # picks the mode from the environment
    mesh = sharding.make_mesh(cfg.mesh)      # then spans every process's devices

Modes ("auto" picks the first that applies):
- "local": an explicit coordinator, from the arguments or TRANSFORMER_COORDINATOR (default
  127.0.0.1:12355), TRANSFORMER_NUM_PROCESSES, TRANSFORMER_PROCESS_ID (launch/local_multiprocess.py).
- "slurm": inside `srun` with more than one task; jax.distributed's SLURM detection finds the
  coordinator and process ids, and this module picks each task's GPUs (launch/slurm.sbatch).
- "tpu": TRANSFORMER_DISTRIBUTED=tpu or TPU worker variables; jax detects everything (launch/tpu_pod.sh).
- "single": nothing to do.
TRANSFORMER_DISTRIBUTED=single|local|slurm|tpu forces a mode.

Exit codes, shared by every entry point and acted on by the launch scripts:
- PREEMPTED_EXIT_CODE (75, EX_TEMPFAIL): SIGTERM/SIGINT stopped the run after its state was saved; the
  same command continues it (tpu_pod.sh retries, slurm.sbatch requeues the job).
- PEER_LOST_EXIT_CODE (69, EX_UNAVAILABLE): a peer process never joined (`initialization_timeout`,
  default $TRANSFORMER_INIT_TIMEOUT or 300 s) or died mid-run. A dead peer is noticed at once by a
  collective that fails (gloo on CPU), else by `_PeerWatchdog` after `peer_timeout` seconds without its
  heartbeat (default $TRANSFORMER_PEER_TIMEOUT or 30 s; jax's own detection, an abort with a C++ stack
  trace, comes only after 2 * peer_timeout + 10 s). Each surviving process prints one line on stderr and
  exits. A coordinator (process 0) that dies while a process waits outside a collective still ends that
  process through jax's own fatal message: its distributed client aborts at once.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import jax

MODES = ("auto", "single", "local", "slurm", "tpu")
DEFAULT_COORDINATOR = "127.0.0.1:12355"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerunning the command continues the run
PEER_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE: a peer process never joined or died
TIMEOUT_EXIT_CODE = PEER_LOST_EXIT_CODE  # a peer never joined
_GRACE_SECONDS = 5
# What a collective raises when the process at the other end is gone (gloo on CPU, NCCL, the coordinator).
_PEER_LOST_ERRORS = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                               r"coordination service|remote process exited|NCCL.*(?:remote|peer)", re.IGNORECASE)

ENV_MODE = "TRANSFORMER_DISTRIBUTED"
ENV_COORDINATOR = "TRANSFORMER_COORDINATOR"
ENV_NUM_PROCESSES = "TRANSFORMER_NUM_PROCESSES"
ENV_PROCESS_ID = "TRANSFORMER_PROCESS_ID"
ENV_TIMEOUT = "TRANSFORMER_INIT_TIMEOUT"
ENV_PEER_TIMEOUT = "TRANSFORMER_PEER_TIMEOUT"


@dataclass(frozen=True)
class DistributedInfo:
    mode: str
    process_index: int
    process_count: int
    coordinator_address: str | None = None


_info: DistributedInfo | None = None


def initialize(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               initialization_timeout: int | None = None, peer_timeout: int | None = None) -> DistributedInfo:
    """Join (or skip) the multi-process JAX runtime; idempotent.

    Call before anything touches a JAX backend (jax.devices(), any computation). `peer_timeout`: seconds
    without a peer's heartbeat before it counts as dead (see the module docstring).
    """
    global _info
    if _info is not None:
        return _info
    if jax.distributed.is_initialized():
        _info = DistributedInfo("external", jax.process_index(), jax.process_count())
        return _info
    mode = os.environ.get(ENV_MODE, mode) if mode == "auto" else mode
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} (argument or ${ENV_MODE}) is not valid; choose one of "
                         f"{', '.join(MODES)}")
    if initialization_timeout is None:
        initialization_timeout = _env_int(ENV_TIMEOUT, 300)
    if initialization_timeout <= 0:
        raise ValueError(f"initialization_timeout={initialization_timeout} must be > 0 seconds")
    if peer_timeout is None:
        peer_timeout = _env_int(ENV_PEER_TIMEOUT, 30)
    if peer_timeout <= 0:
        raise ValueError(f"peer_timeout={peer_timeout} (argument or ${ENV_PEER_TIMEOUT}) must be > 0 seconds")
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if mode == "auto":
        mode = _detect_mode(explicit)
    if mode == "single":
        _info = DistributedInfo("single", 0, 1)
        return _info

    kwargs: dict = {}
    if mode == "local":
        kwargs = _local_args(coordinator_address, num_processes, process_id)
        kwargs["cluster_detection_method"] = "deactivate"
        kwargs["local_device_ids"] = local_device_ids
    elif mode == "slurm":
        kwargs["cluster_detection_method"] = "slurm"
        kwargs["local_device_ids"] = local_device_ids if local_device_ids is not None else slurm_local_device_ids()
    else:
        kwargs["local_device_ids"] = local_device_ids
    env = os.environ
    who = (f"process {kwargs.get('process_id', env.get('SLURM_PROCID', '?'))} of "
           f"{kwargs.get('num_processes', env.get('SLURM_NTASKS', '?'))}")
    where = kwargs.get("coordinator_address") or "the auto-detected coordinator"
    kwargs["heartbeat_timeout_seconds"] = 2 * peer_timeout + 10  # jax's own detection: after ours
    _run_with_watchdog(kwargs, initialization_timeout, f"{mode} mode, {who}, coordinator {where}")
    _info = DistributedInfo(mode, jax.process_index(), jax.process_count(),
                            kwargs.get("coordinator_address"))
    if _info.process_count > 1:
        sys.excepthook = _exit_on_uncaught(sys.excepthook)
        _start_peer_watchdog(peer_timeout)
    return _info


def is_multiprocess() -> bool:
    """Whether this process joined a runtime of several processes (without touching a backend)."""
    return _info is not None and _info.process_count > 1


def shutdown() -> None:
    """Leave the multi-process runtime (no-op when it was never joined)."""
    global _info, _watchdog
    if _watchdog is not None:
        _watchdog.mark("done")
        _watchdog = None
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _info = None


def _exit_on_uncaught(previous):
    """An excepthook that reports, then exits at once: a crashed process must not sit in
    jax.distributed's shutdown barrier while its peers keep waiting for it. A collective that failed
    because a peer is gone is reported in one line."""

    def hook(kind, value, traceback):
        if isinstance(value, Exception) and is_peer_lost(value):
            peer_lost(f"a collective failed because another process is gone ({_first_line(value)})")
        previous(kind, value, traceback)
        exit_now(1)

    return hook


def is_peer_lost(error: BaseException) -> bool:
    """Whether `error` (raised by a collective of a multi-process run) means that another process is gone."""
    return jax.process_count() > 1 and bool(_PEER_LOST_ERRORS.search(str(error)))


def peer_lost(reason: str) -> None:
    """Print one line naming this process and `reason`, then exit with PEER_LOST_EXIT_CODE."""
    who = f"process {jax.process_index()} of {jax.process_count()}" if _info is not None else "this process"
    sys.stderr.write(f"transformer.distributed: {who} stops: {reason}; rerun the command to resume from the last "
                     "checkpoint\n")
    exit_now(PEER_LOST_EXIT_CODE)


def exit_now(code: int) -> None:
    """Flush and end the process with `code` at once, without jax.distributed's shutdown barrier (which waits for
    every peer, and a failed process's peers may never arrive); its peers learn that it failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _watchdog is not None and code != 0:
        _watchdog.mark(f"failed (exit code {code})")
    os._exit(code)


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _detect_mode(explicit: bool) -> str:
    env = os.environ
    if explicit or ENV_NUM_PROCESSES in env or ENV_COORDINATOR in env:
        return "local"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if any(name in env for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID")):
        return "tpu"
    return "single"


def _local_args(coordinator_address, num_processes, process_id) -> dict:
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, DEFAULT_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES, None)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID, None)
    if num_processes is None or num_processes < 1:
        raise ValueError(f"local multi-process mode needs num_processes >= 1 (argument or ${ENV_NUM_PROCESSES}), "
                         f"got {num_processes}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"local multi-process mode needs process_id in [0, {num_processes}) (argument or "
                         f"${ENV_PROCESS_ID}), got {process_id}")
    if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", coordinator_address):
        raise ValueError(f"coordinator address {coordinator_address!r} must look like host:port, e.g. "
                         f"{DEFAULT_COORDINATOR}")
    return dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)


def _env_int(name: str, default: int | None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name}={text!r} must be an integer") from None


def _run_with_watchdog(kwargs: dict, timeout: int, description: str) -> None:
    """jax.distributed.initialize, ended with one clear line if peers do not all arrive in time.

    jax aborts the process with a C++ stack trace when its own deadline passes; the watchdog
    fires first (jax gets a few seconds more) and exits with TIMEOUT_EXIT_CODE. jax's preemption
    service is turned off: PreemptionGuard handles SIGTERM, and the service would swallow it until then.
    """
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout):
            sys.stderr.write(f"transformer.distributed: not every process joined within initialization_timeout="
                             f"{timeout} s ({description}); a peer never arrived: start all processes with the "
                             f"same coordinator and process count, or raise ${ENV_TIMEOUT}\n")
            sys.stderr.flush()
            os._exit(TIMEOUT_EXIT_CODE)

    thread = threading.Thread(target=watchdog, name="distributed-init-watchdog", daemon=True)
    thread.start()
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(initialization_timeout=timeout + _GRACE_SECONDS, **kwargs)
    finally:
        done.set()


class _PeerWatchdog:
    """Heartbeats through the coordination service's key-value store (a daemon thread per process).

    Every process bumps its counter each `interval` seconds. Process 0 watches every counter; the others
    watch process 0's. A counter that stands still for `timeout` seconds, a peer marked "failed" or a
    coordinator that stops answering ends the process with one line (`peer_lost`). Process 0 marks itself
    failed first and waits a moment, so the others read why instead of losing the coordinator. A process that
    exits normally marks itself "done" (atexit, before jax's shutdown barrier).
    """

    PREFIX = "transformer/heartbeat/"

    def __init__(self, client, timeout: float, interval: float = 1.0):
        self.client, self.timeout, self.interval = client, timeout, interval
        self.index, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distributed-peer-watchdog", daemon=True)

    def start(self) -> "_PeerWatchdog":
        self.thread.start()
        return self

    def mark(self, value: str) -> None:
        """Publish this process's final state ("done" or "failed ...") and stop beating (once)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.index}", value, allow_overwrite=True)
        except Exception:
            return
        if self.index == 0 and value != "done":
            time.sleep(2.5 * self.interval)  # the others read it while the coordinator still runs

    def _run(self) -> None:
        beat, seen = 0, {}
        while not self.stopped.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(f"{self.PREFIX}{self.index}", str(beat), allow_overwrite=True)
                values = self._peer_values()
            except Exception as error:
                if not self.stopped.is_set():
                    peer_lost(f"the coordinator (process 0) stopped answering ({_first_line(error)})")
                return
            now = time.monotonic()
            for peer, value in values.items():
                if self.stopped.is_set() or value == "done":
                    continue
                if value is not None and value.startswith("failed"):
                    peer_lost(f"process {peer} of {self.count} {value}")
                if peer not in seen or seen[peer][0] != value:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.timeout:
                    peer_lost(f"process {peer} of {self.count} sent no heartbeat for {self.timeout:g} s (it died or "
                              "hangs)")

    def _peer_values(self) -> dict[int, str | None]:
        """The watched peers' last published values (None: nothing published yet)."""
        if self.index != 0:
            try:
                return {0: self.client.key_value_try_get(f"{self.PREFIX}0")}
            except Exception as error:
                if "NOT_FOUND" in str(error).upper():
                    return {0: None}
                raise
        published = {int(key.rstrip("/").rsplit("/", 1)[-1]): value
                     for key, value in self.client.key_value_dir_get(self.PREFIX)}
        return {peer: published.get(peer) for peer in range(1, self.count)}


_watchdog: _PeerWatchdog | None = None


def _start_peer_watchdog(timeout: int) -> None:
    global _watchdog
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None or jax.process_count() < 2:
        return
    _watchdog = _PeerWatchdog(client, timeout).start()
    atexit.register(_watchdog.mark, "done")


# ---------------------------------------------------------------- SLURM


def slurm_local_device_ids(env: dict | None = None) -> list[int] | None:
    """The GPUs (local ordinals) this SLURM task should use, from the step's GPUs and tasks per node.

    One task per node: all GPUs it sees. One task per GPU: its own. k GPUs shared by t tasks:
    a contiguous block of k/t. None when the step has no GPUs recorded (jax then decides).
    """
    env = os.environ if env is None else env
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    gpus = _slurm_visible_gpus(env)
    if gpus is None:
        return None
    tasks = _slurm_tasks_on_node(env)
    local = int(env.get("SLURM_LOCALID", "0"))
    if tasks == 1:
        return list(range(gpus))
    if gpus == 1:
        return [0]
    if gpus % tasks:
        raise ValueError(f"this SLURM step shows {gpus} GPUs to each of its {tasks} tasks on this node, which do "
                         "not split evenly; run one task per node or one task per GPU")
    per_task = gpus // tasks
    return list(range(local * per_task, (local + 1) * per_task))


def _slurm_visible_gpus(env) -> int | None:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible not in ("", "NoDevFiles"):
        return len([g for g in visible.split(",") if g])
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name):
            return len([g for g in env[name].split(",") if g])
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    return None


def _slurm_tasks_on_node(env) -> int:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE like '4(x2),3'."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        text = env.get(name)
        if not text:
            continue
        counts: list[int] = []
        for part in text.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                break
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        else:
            node = int(env.get("SLURM_NODEID", "0"))
            if node < len(counts):
                return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return max(1, int(env.get("SLURM_NTASKS", "1")) // nodes)
