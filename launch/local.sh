#!/usr/bin/env bash
# One training process on this machine (all its GPUs/TPUs, or CPU).
#
#   launch/local.sh --preset tiny steps=100                      # 1 GPU / all local accelerators / CPU
#   launch/local.sh --fake-devices 8 --preset tiny mesh.fsdp=8   # 8 fake CPU devices, to try a mesh without hardware
#
# Every argument after the launcher's own options goes to `python -m transformer.train`
# ([--preset NAME | --config FILE.py] [key.sub=value ...]). PYTHON overrides the interpreter (default: .venv/bin/python).
# The exit code is train's: 0 done, 75 preempted (SIGTERM/SIGINT, state saved: run the same command again to
# continue), 1 non-finite loss or failed save, 2 config error (transformer.distributed.PREEMPTED_EXIT_CODE etc.).
set -euo pipefail
cd "$(dirname "$0")/.."

fake_devices=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fake-devices) fake_devices="${2:?--fake-devices needs a number}"; shift 2 ;;
    --fake-devices=*) fake_devices="${1#*=}"; shift ;;
    *) break ;;
  esac
done
if ! [[ "$fake_devices" =~ ^[0-9]+$ ]]; then
  echo "launch/local.sh: --fake-devices $fake_devices must be a whole number" >&2
  exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "$fake_devices" -gt 0 ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$fake_devices"
fi
export TRANSFORMER_DISTRIBUTED=single
exec "$PYTHON" -m transformer.train "$@"
