"""Train-step time as the Engram table grows, per `train.table_optimizer`, in one process.

Builds `configs/lm.py:tiny` (or another variant) at each `--rows` (min rows per hash
head; the layer's table holds orders x heads of them) and times the real jitted,
donated train step for dense `adam` and each row-sparse optimizer on the same random
token batches. Prints ms/step, the ratio to the smallest table, and the optimizer
state's bytes per table byte. A dense step grows with the table (a table-sized
gradient and Adam over every row); a row-sparse one should not.
"""
import argparse
import gc
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm as lm_configs  # noqa: E402
from engram_jax import tables, tasks, train  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def time_one(config, rows: int, optimizer: str, batches, steps: int, rounds: int):
  """(seconds per step, table bytes, table optimizer-state bytes) at `rows` per head."""
  config = config.copy_and_resolve_references()
  config.model.engram.table_size = (rows,)
  config.train.table_optimizer = optimizer
  model_cfg = tasks.lm_model_config(config, vocab_size=config.data.vocab_size)
  _, tx = train.optimizer_from_config(config, model_cfg)
  model = EngramLM(model_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batches[0]["inputs"]))["params"]
  state = train.init_train_state(tx, params)
  del params
  paths = tables.table_paths(model_cfg.engram)
  table_bytes = _bytes(tables.split_tables(state.params, paths)[1])
  if isinstance(tx, tables.SparseTx):
    state_bytes = _bytes(state.table_opt_state)
  else:
    state_bytes = _bytes(train._table_leaves(state.opt_state))
  step = train.make_train_step(model, tx)
  state, metrics = step(state, batches[0])  # compile + first step
  jax.block_until_ready(metrics["loss"])
  box = [state]

  def run():
    for i in range(steps):
      box[0], m = step(box[0], batches[i % len(batches)])
    return m["loss"]
  seconds = min(median_seconds(run, 1) for _ in range(rounds)) / steps
  del box, state
  gc.collect()
  return seconds, table_bytes, state_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--rows", default="4001,250007,1000003,2000003",
                      help="min rows per hash head, comma-separated")
  parser.add_argument("--optimizers", default=",".join(tables.TABLE_OPTIMIZERS))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=2, help="rounds (the fastest is kept)")
  args = parser.parse_args()

  config = lm_configs.get_config(args.variant)
  vocab, batch, seq = config.data.vocab_size, config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(4):
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    batches.append({"inputs": jnp.asarray(tokens[:, :-1]),
                    "targets": jnp.asarray(tokens[:, 1:])})
  sizes = [int(r) for r in args.rows.split(",")]
  names = args.optimizers.split(",")
  e = config.model.engram
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"{args.variant}: Engram at {list(e.layers)}, {e.max_ngram - 1} orders x "
        f"{e.heads} heads, head_dim {e.embed_per_ngram // e.heads}, batch {batch} x seq "
        f"{seq}; best of {args.rounds} rounds of {args.steps} steps")
  results = {}
  for name in names:
    for rows in sizes:
      results[name, rows] = time_one(config, rows, name, batches, args.steps, args.rounds)
      seconds, table_bytes, state_bytes = results[name, rows]
      print(f"  {name:<16} {rows:>10,} rows/head  table {table_bytes / 2**20:8.1f} MiB  "
            f"{seconds * 1e3:9.1f} ms/step", flush=True)
  print(f"\n{'optimizer':<16} " + " ".join(f"{r:>12,}" for r in sizes) +
        "   state bytes / table byte")
  for name in names:
    base = results[name, sizes[0]][0]
    ratios = " ".join(f"{results[name, r][0] / base:11.2f}x" for r in sizes)
    _, table_bytes, state_bytes = results[name, sizes[-1]]
    print(f"{name:<16} {ratios}   {state_bytes / table_bytes:.4f}")
  print("(step time as a ratio to the smallest table; ms/step above)")


if __name__ == "__main__":
  main()
