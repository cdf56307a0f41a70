"""Helpers for tests that start Python subprocesses on fake CPU devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    """This process's environment without launcher variables, on `devices` fake CPU devices, importing this repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMER_", "SLURM_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_two_processes(args: list[str], timeout: float, **env) -> list[str]:
    """stdout of `python *args` run as 2 jax.distributed processes on this machine (4 CPU devices each), after
    checking that both exited with 0."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cpu_env(4, TRANSFORMER_COORDINATOR=f"127.0.0.1:{port}",
                                                     TRANSFORMER_NUM_PROCESSES="2", TRANSFORMER_PROCESS_ID=str(rank),
                                                     **env))
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return [out for out, _ in outputs]
