#!/usr/bin/env bash
# Runs one training job as N CPU processes on this machine (127.0.0.1), the way a
# multi-host pod runs one process per host: jax.distributed over a local coordinator,
# gloo collectives, each process reading its own share of every batch.
#
# Usage:
#   launch/multiprocess_cpu.sh N CONFIG WORKDIR [overrides...]
# Example:
#   launch/multiprocess_cpu.sh 2 configs/lm.py:tiny /tmp/mp --config.train.steps=40
#
# Environment:
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 2); the mesh spans
#                        all N * DEVICES_PER_PROCESS of them (config.mesh.num_devices=0
#                        is passed unless an override sets it)
#   PORT                 coordinator port (default: a free one)
#   PYTHON               interpreter (default: python)
#   TIMEOUT              seconds before every process is stopped (default: none)
#   ENGRAM_HUGEPAGES=0   do not add glibc.malloc.hugetlb=1 to GLIBC_TUNABLES (added by
#                        default: malloc'd XLA buffers on transparent huge pages,
#                        docs/benchmarks.md "Huge pages")
# Process i writes its output to WORKDIR/logs/process_i.log and also to this terminal
# with a "[i]" prefix. The script exits 0 when every process does; when one fails the
# others are stopped and the script exits with the failing process's status.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num="$1"; config="$2"; workdir="$3"; shift 3
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: N=$num: give the number of processes (a positive integer)" >&2
  exit 2
fi
devices="${DEVICES_PER_PROCESS:-2}"
python="${PYTHON:-python}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

mesh_override=(--config.mesh.num_devices=0)
for arg in "$@"; do
  [[ "$arg" == --config.mesh.num_devices=* ]] && mesh_override=()
done

# Transparent huge pages for malloc (XLA's host buffers): docs/benchmarks.md "Huge pages".
tunables="${GLIBC_TUNABLES:-}"
if [[ "${ENGRAM_HUGEPAGES:-1}" != 0 && "$tunables" != *glibc.malloc.hugetlb* ]]; then
  tunables="${tunables:+$tunables:}glibc.malloc.hugetlb=1"
fi
mkdir -p "$workdir/logs"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT

for ((i = 0; i < num; i++)); do
  (
    cd "$root"
    export JAX_PLATFORMS=cpu GLIBC_TUNABLES="$tunables"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    exec "$python" -u -m engram_jax.main --config="$config" --workdir="$workdir" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$i" \
      "${mesh_override[@]}" "$@"
  ) > >(tee "$workdir/logs/process_$i.log" | sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

deadline=$(( ${TIMEOUT:-0} > 0 ? SECONDS + TIMEOUT : 0 ))
remaining=$num
status=0
while (( remaining > 0 )); do
  if (( deadline && SECONDS >= deadline )); then
    echo "error: TIMEOUT=${TIMEOUT}s reached; stopping all processes" >&2
    status=124
    break
  fi
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    [[ -z "$pid" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      pids[$idx]=""
      remaining=$((remaining - 1))
      if (( rc != 0 )); then
        echo "error: process $idx exited with status $rc (log: $workdir/logs/process_$idx.log); stopping the others" >&2
        status=$rc
        break 2
      fi
    fi
  done
  sleep 0.5
done
exit "$status"
