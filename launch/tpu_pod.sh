#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: creates the slice (or reuses one of that name),
# copies this checkout to every worker, installs it, and runs
# `python -m engram_jax.main` on all workers at once. Each worker is one jax process;
# `--distributed=on` lets jax find the others from the TPU metadata.
#
# Usage:
#   TPU_NAME=engram-v5p ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [overrides...]
# Example:
#   TPU_NAME=engram-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 \
#     launch/tpu_pod.sh configs/lm.py:paper_dense_v5p gs://my-bucket/runs/paper_dense
#
# Arguments:
#   CONFIG     a config file and variant, as for engram_jax.main (configs/lm.py:VARIANT)
#   WORKDIR    a gs:// directory: every worker writes its checkpoint shards there and
#              resumes from it, so it must be storage all workers share. By default the
#              bucket is mounted with Cloud Storage FUSE at /mnt/gcs/BUCKET on every
#              worker and the job gets --workdir=/mnt/gcs/BUCKET/PATH; with GCSFUSE=0
#              the job gets --workdir=gs://BUCKET/PATH itself (docs/scale_out.md,
#              "Workdirs on GCS")
#   overrides  passed on to engram_jax.main, e.g. --config.train.steps=1000
# Environment:
#   TPU_NAME          TPU VM name (required)
#   ZONE              zone of the TPU (required; the bucket should be in its region)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  slice to create if TPU_NAME does not exist (default v5p-128)
#   RUNTIME_VERSION   TPU VM software version (default: by accelerator family,
#                     v5p: v2-alpha-tpuv5, v5litepod: v2-alpha-tpuv5-lite,
#                     v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)
#   SPOT=1            create a Spot slice (preemptible; the run resumes from WORKDIR)
#   REMOTE_DIR        checkout on each worker (default: engram_jax, in the home dir)
#   EXTRAS            pip extras to install (default: tpu,train)
#   GCSFUSE=0         no FUSE mount: pass the gs:// WORKDIR to the trainer, which writes
#                     it through etils.epath, orbax and TensorBoard (no one-trainer lock)
#   DETACH=1          start the job under nohup (log: ~/engram_run.log on each worker)
#                     and return; otherwise stream every worker's output
#   DRY_RUN=1         print the gcloud commands instead of running them
#   ENGRAM_HUGEPAGES=0  do not run the job with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
#                     (transparent huge pages for host buffers; docs/benchmarks.md)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
config="$1"; workdir="$2"; shift 2
: "${TPU_NAME:?set TPU_NAME to the TPU VM name (see the header of $0)}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-east5-a}"
if [[ "$workdir" != gs://* ]]; then
  echo "error: WORKDIR=$workdir: use a gs:// directory; every worker must read and write" \
       "the same checkpoints" >&2
  exit 2
fi
accelerator="${ACCELERATOR_TYPE:-v5p-128}"
case "$accelerator" in
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v4-*) default_runtime=tpu-ubuntu2204-base ;;
  *) default_runtime="" ;;
esac
runtime="${RUNTIME_VERSION:-$default_runtime}"
if [[ -z "$runtime" ]]; then
  echo "error: ACCELERATOR_TYPE=$accelerator has no default runtime; set RUNTIME_VERSION" >&2
  exit 2
fi
bucket="${workdir#gs://}"; bucket="${bucket%%/*}"
mount_point="/mnt/gcs/$bucket"
local_workdir="$mount_point/${workdir#gs://$bucket}"
local_workdir="${local_workdir%/}"; local_workdir="${local_workdir//\/\//\/}"
remote_dir="${REMOTE_DIR:-engram_jax}"
extras="${EXTRAS:-tpu,train}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

# Single-quotes an argument when the shell would otherwise split or expand it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (quoted, so it can be pasted) under DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do
      out+="${out:+ }$(quote "$arg")"
    done
    echo "$out"
  else
    "$@"
  fi
}

# 1. The slice: reuse TPU_NAME if it exists, else create it.
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# if '${gcloud_tpu[*]} describe $TPU_NAME' fails, the slice is created:"
  run "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)'
  create=1
elif state="$("${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null)"; then
  echo "reusing TPU $TPU_NAME (state $state)"
  create=0
else
  create=1
fi
if [[ "$create" == 1 ]]; then
  spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  run "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" \
    --accelerator-type="$accelerator" --version="$runtime" "${spot[@]}"
fi

# 2. This checkout on every worker (tracked and untracked files, not venvs or runs).
archive="$(mktemp -u "${TMPDIR:-/tmp}/engram_jax.XXXXXX").tar.gz"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  run tar -C "$root" -czf "$archive" --exclude=.git --exclude=.venv --exclude=workdirs \
    --exclude=__pycache__ .
else
  tar -C "$root" -czf "$archive" --exclude=.git --exclude=.venv --exclude=workdirs \
    --exclude=__pycache__ .
  trap 'rm -f "$archive"' EXIT
fi
run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:engram_jax.tar.gz" "${where[@]}" --worker=all
setup="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf engram_jax.tar.gz -C $remote_dir"
setup+=" && python3 -m venv ~/engram_venv && . ~/engram_venv/bin/activate"
setup+=" && cd $remote_dir && pip install -q --upgrade pip && pip install -q -e \".[$extras]\""
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$setup"

# 3. The bucket at the same path on every worker. No metadata caching: a file one
#    worker writes (process 0's tokenizer, checkpoint markers) is seen by the others at
#    once; orbax renames finished checkpoint directories, which needs rename-dir-limit.
mount="if ! mountpoint -q $mount_point; then"
mount+=" if ! command -v gcsfuse > /dev/null; then"
mount+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
mount+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null"
mount+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
mount+=" && sudo mkdir -p $mount_point && sudo chown \$(id -u):\$(id -g) $mount_point"
mount+=" && gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0"
mount+=" $bucket $mount_point; fi && mkdir -p $local_workdir"
if [[ "${GCSFUSE:-1}" == 0 ]]; then
  local_workdir="${workdir%/}"  # the trainer writes gs:// itself
else
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$mount"
fi

# 4. The job: the same command on every worker at once.
job="cd $remote_dir && . ~/engram_venv/bin/activate && "
# Transparent huge pages for malloc (host buffers): docs/benchmarks.md "Huge pages".
if [[ "${ENGRAM_HUGEPAGES:-1}" != 0 ]]; then
  job+="GLIBC_TUNABLES=\${GLIBC_TUNABLES:+\$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1 "
fi
job+="python -m engram_jax.main"
for arg in --config="$config" --workdir="$local_workdir" --distributed=on "$@"; do
  job+=" $(quote "$arg")"
done
if [[ "${DETACH:-0}" == 1 ]]; then
  job="nohup bash -c $(quote "$job") > ~/engram_run.log 2>&1 &"
fi
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$job"
