"""N training processes on this machine joined by jax.distributed (coordinator on 127.0.0.1).

For debugging multi-host code without a cluster:

    python launch/local_multiprocess.py --num-processes 2 --fake-devices 4 -- --preset tiny mesh.fsdp=8
    python launch/local_multiprocess.py --num-processes 2 --gpus-per-process 4 -- --preset small

Everything after `--` goes to `python -m transformer.train` (or `--module`). Each process gets
TRANSFORMER_COORDINATOR / TRANSFORMER_NUM_PROCESSES / TRANSFORMER_PROCESS_ID (read by
transformer.distributed.initialize); output lines are prefixed with [pN]. If any process fails,
the others get SIGTERM (the train loop saves a checkpoint and stops), SIGKILL after --grace
seconds, and the launcher exits with the failed process's exit code. SIGTERM or SIGINT to the
launcher is passed on as SIGTERM to every process: they save the same step and exit with 75
(PREEMPTED_EXIT_CODE), which the launcher passes through; run the same command again to continue.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREEMPTED_EXIT_CODE = 75  # transformer.distributed.PREEMPTED_EXIT_CODE: stopped after saving; rerunning continues


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(rank: int, args, port: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["TRANSFORMER_DISTRIBUTED"] = "local"
    env["TRANSFORMER_COORDINATOR"] = f"127.0.0.1:{port}"
    env["TRANSFORMER_NUM_PROCESSES"] = str(args.num_processes)
    env["TRANSFORMER_PROCESS_ID"] = str(rank)
    env["TRANSFORMER_INIT_TIMEOUT"] = str(args.init_timeout)
    if args.fake_devices:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.fake_devices}"
    if args.gpus_per_process:
        first = rank * args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(first, first + args.gpus_per_process))
    return env


def pump(rank: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{rank}] {line}")
        out.flush()


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch(args, forwarded: list[str]) -> int:
    port = args.port or free_port()
    command = [args.python, "-m", args.module, *forwarded]
    procs, pumps = [], []
    for rank in range(args.num_processes):
        proc = subprocess.Popen(command, env=child_env(rank, args, port), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(proc)
        thread = threading.Thread(target=pump, args=(rank, proc.stdout, sys.stdout), daemon=True)
        thread.start()
        pumps.append(thread)
    signalled = threading.Event()

    def preempt(signum, frame):
        signalled.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, preempt) for signum in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while [proc.poll() for proc in procs].count(None):
            failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode not in (None, 0)]
            if failed and not signalled.is_set():  # once signalled, every process is saving: wait for all
                rank, status = failed[0]
                what = " (preempted: its state is saved)" if status == PREEMPTED_EXIT_CODE else ""
                sys.stderr.write(f"local_multiprocess: process {rank} exited with code {status}{what}; "
                                 "stopping the others\n")
                break
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stop(procs, args.grace)
    for thread in pumps:
        thread.join(timeout=5)
    if status == 0:
        codes = [proc.returncode for proc in procs]
        status = next((code for code in codes if code not in (0, PREEMPTED_EXIT_CODE)),
                      PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else 0)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, forwarded = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--num-processes", "-n", type=int, default=2)
    parser.add_argument("--fake-devices", type=int, default=0, help="CPU devices per process (JAX_PLATFORMS=cpu)")
    parser.add_argument("--gpus-per-process", type=int, default=0, help="give process i GPUs [i*k, (i+1)*k)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for all processes to join")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds between SIGTERM (checkpoint and stop) and SIGKILL when stopping the others")
    parser.add_argument("--module", default="transformer.train", help="python module each process runs")
    parser.add_argument("--python", default=sys.executable)
    args, unknown = parser.parse_known_args(own)
    forwarded = unknown + forwarded
    if args.num_processes < 1:
        parser.error(f"--num-processes={args.num_processes} must be >= 1")
    if args.fake_devices < 0 or args.gpus_per_process < 0:
        parser.error("--fake-devices and --gpus-per-process must be >= 0")
    if args.fake_devices and args.gpus_per_process:
        parser.error("use either --fake-devices (CPU) or --gpus-per-process, not both")
    return launch(args, forwarded)


if __name__ == "__main__":
    sys.exit(main())
