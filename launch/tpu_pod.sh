#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker, retried after preemption.
#
#   launch/tpu_pod.sh --tpu my-v5e-256 --zone us-east5-b -- --preset 1b mesh.fsdp=-1 run_dir=gs://bucket/runs/1b
#
# Options (before `--`; everything after it goes to `python -m transformer.train`):
#   --tpu NAME --zone ZONE [--project P]   the TPU VM (required: --tpu, --zone)
#   --setup                                copy this repository to ~/transformer on every worker and
#                                          install it (`pip install -e ".[tpu]"`) before training
#   --accelerator-type T --version V       with these, a preempted TPU is deleted and re-created
#   --spot                                 re-create as a Spot TPU
#   --retries N                            attempts after a failure (default 10), --retry-wait S (default 60)
# Needs gcloud, authenticated, on the machine you run this from. Put run_dir on GCS (gs://...) so
# checkpoints survive preemption: every attempt resumes from the latest checkpoint. jax.distributed
# finds the coordinator and worker ids itself (TRANSFORMER_DISTRIBUTED=tpu).
# Exit codes of training: 0 is done (this script stops); 75 (transformer.distributed.PREEMPTED_EXIT_CODE:
# SIGTERM, e.g. a maintenance event, state saved) starts the next attempt at once without counting it
# against --retries; anything else is a failure: the TPU's state is checked (re-created if it was
# preempted) and training is retried after --retry-wait, at most --retries times.
set -euo pipefail
cd "$(dirname "$0")/.."

tpu="" zone="" project="" setup=0 accelerator="" version="" spot=0 retries=10 retry_wait=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --accelerator-type) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --retries) retries="$2"; shift 2 ;;
    --retry-wait) retry_wait="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --tpu NAME and --zone ZONE are required" >&2
  exit 2
fi
if [[ -n "$accelerator" && -z "$version" || -z "$accelerator" && -n "$version" ]]; then
  echo "tpu_pod.sh: --accelerator-type and --version go together (both are needed to re-create the TPU)" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")

train_args=$(printf ' %q' "$@")
remote_train="cd ~/transformer && TRANSFORMER_DISTRIBUTED=tpu PYTHONUNBUFFERED=1 .venv/bin/python -m transformer.train$train_args"
remote_setup='cd ~/transformer && (test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q -e ".[tpu]"'

state() { "${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format='value(state)' 2>/dev/null || echo UNKNOWN; }

on_all_workers() { "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command "$1"; }

push_code() {
  local archive
  archive=$(mktemp /tmp/transformer.XXXXXX.tar.gz)
  tar czf "$archive" --exclude=.venv --exclude=runs --exclude=.git --exclude='__pycache__' .
  "${gcloud_tpu[@]}" scp "$archive" "$tpu":/tmp/transformer.tar.gz "${where[@]}" --worker=all
  rm -f "$archive"
  on_all_workers "mkdir -p ~/transformer && tar xzf /tmp/transformer.tar.gz -C ~/transformer && $remote_setup"
}

recreate() {
  echo "tpu_pod.sh: re-creating $tpu ($accelerator, $version)"
  "${gcloud_tpu[@]}" delete "$tpu" "${where[@]}" --quiet || true
  local extra=()
  [[ "$spot" == 1 ]] && extra+=(--spot)
  "${gcloud_tpu[@]}" create "$tpu" "${where[@]}" --accelerator-type "$accelerator" --version "$version" "${extra[@]}"
  push_code
}

[[ "$setup" == 1 ]] && push_code

preempted=75  # transformer.distributed.PREEMPTED_EXIT_CODE

attempt=0 failures=0
while true; do
  attempt=$((attempt + 1))
  echo "tpu_pod.sh: attempt $attempt on $tpu: python -m transformer.train$train_args"
  status=0
  on_all_workers "$remote_train" || status=$?
  if [[ "$status" -eq 0 ]]; then
    echo "tpu_pod.sh: training finished"
    exit 0
  fi
  if [[ "$status" -eq "$preempted" && "$(state)" == READY ]]; then
    echo "tpu_pod.sh: attempt $attempt was preempted after saving its state; resuming"
    continue
  fi
  failures=$((failures + 1))
  if [[ "$failures" -gt "$retries" ]]; then
    echo "tpu_pod.sh: giving up after $attempt attempts" >&2
    exit 1
  fi
  current=$(state)
  echo "tpu_pod.sh: attempt $attempt failed (exit code $status); TPU state: $current"
  case "$current" in
    PREEMPTED|TERMINATED|STOPPED)
      if [[ -n "$accelerator" ]]; then
        recreate
      else
        echo "tpu_pod.sh: $tpu is $current; pass --accelerator-type and --version to re-create it automatically" >&2
        exit 1
      fi ;;
    READY) on_all_workers "pkill -f -- '-m transformer.train' || true" || true ;;
  esac
  sleep "$retry_wait"
done
