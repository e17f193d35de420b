"""Row-sharded Engram lookup: psum and all_to_all vs the unsharded gather, 1-8 devices.

One Engram layer's flat table `[R, E]` (rows padded to `table_row_multiple`) is split
by rows over 1, 2, 4 and 8 devices (simulated CPU devices here: the process sets
XLA_FLAGS itself), ids `[B, T, H]` are batch-sharded, and each strategy of
`layers.engram.lookup_rows` is timed forward and forward+backward (the table gradient)
against `jnp.take` on one device with the whole table, in the same process. "gather"
on a sharded table is the plain `jnp.take` left to XLA's partitioner.

Bytes per step: the analytic per-device send volume (`sharding.lookup_comm_bytes`)
and the collectives in the compiled forward HLO (per-device result buffers, turned
into ring send volumes). Uniform random ids (what good hashing gives).

  python bench/sharded_lookup.py
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from engram_jax import config as config_lib  # noqa: E402
from engram_jax import sharding  # noqa: E402
from engram_jax.layers.engram import lookup_rows  # noqa: E402

_COLLECTIVE = re.compile(r"\s(all-to-all|reduce-scatter|all-gather|all-reduce|"
                         r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"\b(f32|s32|u32|bf16|f16|s64|pred)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=(?:\{\{([\d,]*)\}|\[\d+,(\d+)\]|"
                     r"mesh\[([^\]]*)\]\s*\{([^}]*)\})")
_ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s64": 8, "pred": 1}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8, help="global batch (divisible by 8)")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--heads", type=int, default=16, help="H = orders * heads per order")
  p.add_argument("--d-head", type=int, default=32)
  p.add_argument("--rows", type=int, default=16 * 20_011, help="rows of the flat table")
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--warmup", type=int, default=3)
  return p.parse_args()


def median_seconds(fn, args, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _group_size(match) -> int:
  """Devices per replica group, in any of the three HLO spellings."""
  listed, iota, mesh_axes, grouped = match.groups()
  if listed is not None:
    return len(listed.split(","))
  if iota is not None:
    return int(iota)
  sizes = {name.strip("'"): int(size) for name, size in
           (item.split("=") for item in mesh_axes.split(","))}
  return int(np.prod([sizes[name.strip(" '")] for name in grouped.split(",")]))


def hlo_send_bytes(hlo_text: str) -> tuple[int, str]:
  """Per-device ring send volume of the collectives in a compiled (SPMD) HLO module,
  and a summary `kind:result_bytes/group`; shapes there are per device."""
  total, parts = 0.0, []
  for line in hlo_text.splitlines():
    op = _COLLECTIVE.search(line)
    groups = _GROUPS.search(line)
    if " = " not in line or not op or not groups:
      continue
    kind = op.group(1)
    group = _group_size(groups)
    if group == 1:
      continue
    out_shapes = line[line.index(" = ") + 3:op.start()]
    result = sum(np.prod([int(d) for d in dims.split(",") if d] or [1]) * _ITEMSIZE[t]
                 for t, dims in _SHAPE.findall(out_shapes))
    if kind in ("all-to-all", "all-gather"):
      sent = result * (group - 1) / group
    elif kind == "reduce-scatter":
      sent = result * (group - 1)
    elif kind == "all-reduce":
      sent = 2 * result * (group - 1) / group
    else:
      sent = result
    total += sent
    parts.append(f"{kind}:{_mib(result)}/{group}")
  return int(total), " ".join(parts) or "none"


def _mib(nbytes) -> str:
  return f"{nbytes / 2**20:.2f}MiB"


def main():
  args = parse_args()
  engram = config_lib.EngramConfig()
  rows = engram.padded_rows(args.rows)
  rng = np.random.default_rng(0)
  table = rng.standard_normal((rows, args.d_head), dtype=np.float32)
  ids = rng.integers(0, args.rows, (args.batch, args.seq, args.heads)).astype(np.int32)
  weights = rng.standard_normal(ids.shape + (args.d_head,), dtype=np.float32)
  n_ids = ids.size

  def fwd(strategy):
    return jax.jit(lambda t, i: lookup_rows(t, i, strategy))

  def fwd_bwd(strategy):
    return jax.jit(jax.grad(lambda t, i, w: jnp.vdot(lookup_rows(t, i, strategy), w)))

  one = jax.devices()[0]
  base_args = jax.device_put((table, ids, weights), one)
  want = np.asarray(fwd("gather")(*base_args[:2]))
  base_fwd = median_seconds(fwd("gather"), base_args[:2], args.repeats, args.warmup)
  base_fb = median_seconds(fwd_bwd("gather"), base_args, args.repeats, args.warmup)

  print(f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"{jax.device_count()} simulated devices); table {rows} x {args.d_head} f32 "
        f"({_mib(table.nbytes)}, {args.rows} rows used), ids B={args.batch} T={args.seq} "
        f"H={args.heads} ({n_ids} lookups/step); median of {args.repeats}")
  print(f"unsharded gather (1 device, whole table): fwd {base_fwd * 1e3:.2f} ms, "
        f"fwd+bwd {base_fb * 1e3:.2f} ms")
  print("speed = unsharded time / this time (>1: faster); bytes = per-device send "
        "volume of one forward lookup")
  print(f"{'dev':>3} {'strategy':>10} {'fwd ms':>8} {'speed':>6} {'f+b ms':>8} {'speed':>6}"
        f" {'table/dev':>10} {'analytic':>10} {'HLO':>10}  HLO collectives (per-device "
        "result buffers)")
  for k in args.devices:
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:k])
    table_k = jax.device_put(table, NamedSharding(mesh, P(sharding.MESH_AXES, None)))
    batch = sharding.batch_sharding(mesh, batch_size=args.batch)
    ids_k, weights_k = jax.device_put((ids, weights), batch)
    table_bytes = sharding.bytes_per_device(
        jax.ShapeDtypeStruct(table.shape, table.dtype), table_k.sharding)
    for strategy in ("gather",) + sharding.STRATEGIES:
      with sharding.use_mesh(mesh):
        f, fb = fwd(strategy), fwd_bwd(strategy)
        np.testing.assert_array_equal(np.asarray(f(table_k, ids_k)), want)
        hlo_bytes, summary = hlo_send_bytes(f.lower(table_k, ids_k).compile().as_text())
        t_fwd = median_seconds(f, (table_k, ids_k), args.repeats, args.warmup)
        t_fb = median_seconds(fb, (table_k, ids_k, weights_k), args.repeats, args.warmup)
      analytic = ("-" if strategy == "gather" else _mib(sharding.lookup_comm_bytes(
          strategy, n_ids // k, args.d_head, 4, k)))
      print(f"{k:>3} {strategy:>10} {t_fwd * 1e3:>8.2f} {base_fwd / t_fwd:>5.2f}x "
            f"{t_fb * 1e3:>8.2f} {base_fb / t_fb:>5.2f}x {_mib(table_bytes):>10} "
            f"{analytic:>10} {_mib(hlo_bytes):>10}  {summary}")


if __name__ == "__main__":
  main()
