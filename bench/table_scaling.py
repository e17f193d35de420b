"""Train-step time as the Engram table grows, per `train.table_optimizer`, in one process.

Builds `configs/lm.py:tiny` (or another variant) at each `--rows` (min rows per hash
head; the layer's table holds orders x heads of them) and times the real jitted,
donated train step for dense `adam` and each row-sparse optimizer on the same random
token batches (all sizes of one optimizer built first, then timed in alternating
rounds). Prints ms/step, the ratio to the smallest table, and the optimizer state's
bytes per table byte. A dense step grows with the table (a table-sized
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
from engram_jax import optim, run_config, sizing, tables, train_steps  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def build(config, rows: int, optimizer: str, batch):
  """(jitted step, state after one step, table bytes, table optimizer-state bytes)."""
  config = config.copy_and_resolve_references()
  config.model.engram.table_size = (rows,)
  config.train.table_optimizer = optimizer
  run = run_config.from_config(config)
  model_cfg = run.model
  _, tx = optim.from_train_config(run.train, model_cfg.engram)
  model = EngramLM(model_cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"]))["params"]
  state = train_steps.init_train_state(tx, params)
  del params
  table_bytes = _bytes(tables.split_tables(state.params,
                                           tables.table_paths(model_cfg.engram))[1])
  if isinstance(tx, tables.SparseTx):
    state_bytes = _bytes(state.table_opt_state)
  else:
    state_bytes = _bytes(sizing.table_leaves(state.opt_state))
  step = train_steps.make_train_step(model, tx)
  state, metrics = step(state, batch)  # compile + first step
  jax.block_until_ready(metrics["loss"])
  return step, state, table_bytes, state_bytes


def time_sizes(config, sizes, optimizer: str, batches, steps: int, rounds: int):
  """{rows: (seconds per step, table bytes, state bytes)}: every size built first, then
  timed in alternating rounds (drift on a shared machine hits all sizes alike), the
  fastest round kept."""
  built = {rows: list(build(config, rows, optimizer, batches[0])) for rows in sizes}

  def run(rows):
    entry = built[rows]
    for i in range(steps):
      entry[1], metrics = entry[0](entry[1], batches[i % len(batches)])
    return metrics["loss"]
  times = {rows: [] for rows in sizes}
  for _ in range(rounds):
    for rows in sizes:
      times[rows].append(median_seconds(lambda: run(rows), 1) / steps)
  out = {rows: (min(times[rows]), built[rows][2], built[rows][3]) for rows in sizes}
  del built
  gc.collect()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--rows", default="4001,250007,1000003,2000003",
                      help="min rows per hash head, comma-separated")
  parser.add_argument("--optimizers", default=",".join(tables.TABLE_OPTIMIZERS))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds over all sizes (each size's fastest is kept)")
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
    for rows, result in time_sizes(config, sizes, name, batches, args.steps,
                                   args.rounds).items():
      results[name, rows] = result
      seconds, table_bytes, state_bytes = result
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
