"""Train-step time with Engram tables in host memory vs device tables, in one process.

For `configs/lm.py:tiny` (or `--variant=small`) at `--rows` rows per hash head, times
the real jitted train step with `train.table_optimizer` (lazy_adam by default) and:
  device   the tables in device memory (row-sparse update in the step),
  exact    host tables: gather after the last update, step, host update,
  overlap  host tables: the next batch's rows gathered while the step runs, the update
           on a host thread (engram_jax.host_tables.HostFeed).
Prints ms/step and the ratio to `device`, then the host gather's rows/s and GB/s next
to this machine's memcpy bandwidth (np.copyto of `--copy_mib` MiB) measured here.
On a CPU-only machine "device" is the CPU too: the ratio is the host path's bookkeeping
(gather, transfer, update), not the accelerator/host split it is built for.
"""
import argparse
import itertools
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm as lm_configs  # noqa: E402
from engram_jax import hashing, host_tables, optim, run_config, train_steps  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402


def batches(model_cfg, batch_size: int, seq_len: int, count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  spec = model_cfg.engram.hash_spec()
  out = []
  for _ in range(count):
    tokens = rng.integers(0, model_cfg.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    inputs = tokens[:, :-1]
    out.append({"inputs": inputs, "targets": tokens[:, 1:],
                "hash_ids": np.asarray(hashing.ngram_hash_ids(inputs, spec))})
  return out


class _Cycle:
  """The same few batches forever, with no position to save."""

  def __init__(self, items):
    self._it = itertools.cycle(items)

  def __next__(self):
    return next(self._it)

  def get_state(self):
    return {}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--rows", type=int, default=100003, help="min rows per hash head")
  parser.add_argument("--optimizer", default="lazy_adam")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=0, help="0 = the config's")
  parser.add_argument("--copy_mib", type=int, default=256)
  args = parser.parse_args(argv)

  config = lm_configs.get_config(args.variant)
  config.model.engram.table_size = (args.rows,)
  config.train.table_optimizer = args.optimizer
  batch_size = args.batch_size or config.data.batch_size
  seq_len = config.data.seq_len
  run = run_config.from_config(config)
  model_cfg = run.model
  schedule, tx = optim.from_train_config(run.train, model_cfg.engram)
  model = EngramLM(model_cfg)
  data = batches(model_cfg, batch_size, seq_len, 4)

  def init():
    variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
    return train_steps.init_train_state(tx, variables["params"])
  full = jax.jit(init)()
  table_mib = sum(e["table"].nbytes for e in host_tables.store_layout(full, tx).values())
  print(f"{args.variant}: {args.rows:,} rows per head, tables {table_mib / 2**20:,.1f} MiB, "
        f"batch {batch_size} x {seq_len}, {args.optimizer}, {jax.devices()[0].platform}")

  device_step = train_steps.make_train_step(model, tx)
  host_step = train_steps.make_train_step(model, tx, host_tables=True)

  def run_device(n):
    state = jax.tree_util.tree_map(jnp.copy, full)
    state, m = device_step(state, data[0])  # compile
    jax.block_until_ready(m["loss"])
    start = time.perf_counter()
    for i in range(n):
      state, m = device_step(state, data[i % len(data)])
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - start) / n

  def run_host(n, mode):
    dense, store = host_tables.HostTableStore.from_params(model_cfg, full.params, tx.table,
                                                          full.table_opt_state)
    state = jax.tree_util.tree_map(jnp.copy, host_tables.drop_tables(full, tx))
    feed = host_tables.HostFeed(store, _Cycle(data), mode, tx.table_lr)
    def one(step, state):
      batch = feed.next_batch()
      state, m = host_step(state, batch)
      feed.gather_ahead()
      feed.apply(m.pop("table_rows"), step)
      return state, m
    state, m = one(1, state)  # compile
    feed.wait()
    start = time.perf_counter()
    for step in range(2, n + 2):
      state, m = one(step, state)
    jax.block_until_ready(m["loss"])
    feed.wait()
    elapsed = (time.perf_counter() - start) / n
    gather_ids = data[0]["hash_ids"]
    gstart = time.perf_counter()
    for _ in range(5):
      rows = store.gather(gather_ids)
    gtime = (time.perf_counter() - gstart) / 5
    feed.close()
    return elapsed, gtime, sum(r.size for r in rows) // rows[0].shape[-1], sum(r.nbytes for r in rows)

  device = run_device(args.steps)
  print(f"  device tables   {device * 1e3:8.2f} ms/step  1.00x")
  for mode in ("exact", "overlap"):
    t, gtime, nrows, nbytes = run_host(args.steps, mode)
    print(f"  host {mode:<8}   {t * 1e3:8.2f} ms/step  {t / device:.2f}x")
  src = np.ones(args.copy_mib * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  cstart = time.perf_counter()
  for _ in range(5):
    np.copyto(dst, src)
  copy_gbs = 5 * src.nbytes / (time.perf_counter() - cstart) / 1e9
  print(f"  host gather: {nrows / gtime / 1e6:.2f} M rows/s, {nbytes / gtime / 1e9:.2f} GB/s "
        f"({nrows:,} rows of {nbytes // nrows} B); memcpy {copy_gbs:.2f} GB/s here")


if __name__ == "__main__":
  main()
