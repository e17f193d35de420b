"""XLA:CPU with and without transparent huge pages for malloc (GLIBC_TUNABLES).

`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc `madvise` its
large allocations for transparent huge pages, so the XLA:CPU buffers a step allocates
fault in 2 MiB at a time instead of 4 KiB. Each measurement runs in a fresh
subprocess (the tunable is read at process start), alternating with and without it:

  copy   GB/s of a jitted `x + 1` over a `--copy_mib` f32 array (a fresh output buffer
         every call: read + write bytes / time)
  step   ms of `tiny`'s real jitted train step (EngramLM from config dataclasses)
  rss    peak resident set (getrusage ru_maxrss) and AnonHugePages at exit

Usage: python bench/hugepages.py [--rounds 3] [--copy_mib 512]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

TUNABLE = "glibc.malloc.hugetlb=1"


def thp_mode() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().strip()
  except OSError:
    return "unavailable"


def _anon_huge_kib() -> int:
  try:
    with open("/proc/self/smaps_rollup") as f:
      for line in f:
        if line.startswith("AnonHugePages:"):
          return int(line.split()[1])
  except OSError:
    pass
  return -1


def child(copy_mib: int, steps: int) -> dict:
  """One process's measurements (run with or without the tunable by the parent)."""
  import resource
  import time

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from engram_jax import config as config_lib
  from engram_jax import optim, train_steps
  from engram_jax.models.lm import EngramLM

  x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(7):
    start = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - start)
  copy_gbps = 2 * x.nbytes / float(np.median(times)) / 1e9
  del x

  cfg = config_lib.validate(config_lib.ModelConfig(
      vocab_size=1024, width=64, depth=4, num_heads=4, num_kv_heads=2, max_len=128,
      engram=config_lib.EngramConfig(layers=(1,), max_ngram=3, heads=4, embed_per_ngram=32,
                                     table_size=(4001,))))
  model = EngramLM(cfg)
  tx = optim.make_optimizer(optim.warmup_cosine(3e-3, 30, 300), table_lr_multiplier=5.0)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
  state = train_steps.TrainState(jnp.array(0, jnp.int32), params["params"],
                           tx.init(params["params"]))
  step = train_steps.make_train_step(model, tx)
  tokens = np.random.default_rng(0).integers(0, 1024, (8, 65)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  step_ms = 1e3 * (time.perf_counter() - start) / steps
  return {"copy_gbps": copy_gbps, "step_ms": step_ms,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "anon_huge_mib": _anon_huge_kib() / 1024}


def run_child(hugepages: bool, copy_mib: int, steps: int) -> dict:
  env = dict(os.environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
              if t and not t.startswith("glibc.malloc.hugetlb")]
  if hugepages:
    tunables.append(TUNABLE)
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  env.setdefault("JAX_PLATFORMS", "cpu")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                        f"--copy_mib={copy_mib}", f"--steps={steps}"],
                       capture_output=True, text=True, env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--copy_mib", type=int, default=512)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.copy_mib, args.steps)))
    return
  runs = {False: [], True: []}
  for _ in range(args.rounds):  # alternate so load drift hits both
    for huge in (False, True):
      runs[huge].append(run_child(huge, args.copy_mib, args.steps))
  med = {h: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for h, rs in runs.items()}
  print(f"transparent_hugepage/enabled: {thp_mode()}; {args.rounds} alternating rounds, "
        f"one fresh process each; copy {args.copy_mib} MiB f32; tiny train step x {args.steps}")
  for h in (False, True):
    m = med[h]
    label = f"GLIBC_TUNABLES={TUNABLE}" if h else "default malloc            "
    print(f"{label}: copy {m['copy_gbps']:6.2f} GB/s, step {m['step_ms']:7.2f} ms, "
          f"peak RSS {m['peak_rss_mib']:7.0f} MiB, AnonHugePages {m['anon_huge_mib']:6.0f} MiB")
  print(f"huge pages / default: copy {med[True]['copy_gbps'] / med[False]['copy_gbps']:.2f}x "
        f"GB/s, step time {med[True]['step_ms'] / med[False]['step_ms']:.3f}x, peak RSS "
        f"{med[True]['peak_rss_mib'] / med[False]['peak_rss_mib']:.3f}x")
  print("all runs:", json.dumps({("huge" if h else "default"): rs for h, rs in runs.items()}))


if __name__ == "__main__":
  main()
