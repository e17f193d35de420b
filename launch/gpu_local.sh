#!/usr/bin/env bash
# Trains on every GPU of this machine with one process (jax drives all local GPUs;
# the config's mesh spans them: config.mesh.num_devices=0 means all).
#
# Usage:
#   launch/gpu_local.sh CONFIG WORKDIR [overrides...]
# Example (an 8xH100 box):
#   launch/gpu_local.sh configs/lm.py:paper_dense_8gpu workdirs/paper_dense \
#     --config.train.steps=1000 --config.train.warmup_steps=100
#
# Environment:
#   CUDA_VISIBLE_DEVICES  which GPUs (default: all)
#   PYTHON                interpreter with `pip install -e ".[gpu,train]"` (default: python)
#   XLA_FLAGS             extra XLA flags; the latency-hiding scheduler (overlaps
#                         collectives with compute) is added unless XLA_FLAGS sets it
#   DRY_RUN=1             print the command instead of running it
#   ENGRAM_HUGEPAGES=0    do not add glibc.malloc.hugetlb=1 to GLIBC_TUNABLES (added by
#                         default: malloc'd XLA buffers on transparent huge pages,
#                         docs/benchmarks.md "Huge pages")
# The job fails (JAX_PLATFORMS=cuda) rather than falling back to the CPU when jax sees
# no GPU.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
python="${PYTHON:-python}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

xla_flags="${XLA_FLAGS:-}"
if [[ "$xla_flags" != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
  xla_flags="${xla_flags:+$xla_flags }--xla_gpu_enable_latency_hiding_scheduler=true"
fi
# Transparent huge pages for malloc (XLA's host buffers): docs/benchmarks.md "Huge pages".
tunables="${GLIBC_TUNABLES:-}"
if [[ "${ENGRAM_HUGEPAGES:-1}" != 0 && "$tunables" != *glibc.malloc.hugetlb* ]]; then
  tunables="${tunables:+$tunables:}glibc.malloc.hugetlb=1"
fi
cmd=(env JAX_PLATFORMS=cuda XLA_FLAGS="$xla_flags" GLIBC_TUNABLES="$tunables"
     "$python" -m engram_jax.main --config="$config" --workdir="$workdir" --distributed=off "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf 'cd %q && ' "$root"
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "error: no NVIDIA GPU found (nvidia-smi -L failed); use launch/multiprocess_cpu.sh" \
       "or python -m engram_jax.main on CPU" >&2
  exit 2
fi
nvidia-smi -L
cd "$root"
exec "${cmd[@]}"
