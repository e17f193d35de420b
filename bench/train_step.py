"""Train-step time with Engram vs the same backbone without it, in one process.

Builds the `tiny` (or `small`) LM config twice: as configured, and with
`engram.layers = ()`. Both run the real jitted, donated train step (AdamW with the
table group) on the same random token batches; prints step time, tokens/s and the
Engram overhead as a ratio (Engram time / baseline time).
"""
import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm as lm_configs  # noqa: E402
from engram_jax import optim, run_config, train_steps  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py


def build(config, vocab_size: int, engram: bool):
  config = config.copy_and_resolve_references()
  if not engram:
    config.model.engram.layers = ()
  run = run_config.from_config(config).with_tokenizer_vocab(vocab_size)
  model_cfg = run.model
  _, tx = optim.from_train_config(run.train, model_cfg.engram)
  model = EngramLM(model_cfg)
  seq = config.data.seq_len
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, seq), jnp.int32)))
  state = train_steps.init_train_state(tx, params["params"])
  return model_cfg, train_steps.make_train_step(model, tx), state


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--batch", type=int, default=0, help="0 = the config's batch")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
  parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
  parser.add_argument("--table_optimizer", default="",
                      help="train.table_optimizer for the Engram path (adam = dense; "
                           "lazy_adam / rowwise_adagrad / sgd = row-sparse); default: the "
                           "config's")
  args = parser.parse_args()

  config = lm_configs.get_config(args.variant)
  if args.table_optimizer:
    config.train.table_optimizer = args.table_optimizer
  vocab = config.data.vocab_size
  batch = args.batch or config.data.batch_size
  seq = config.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  data = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

  paths = {}
  for name, engram in (("engram", True), ("baseline", False)):
    model_cfg, step, state = build(config, vocab, engram)
    state, metrics = step(state, data)  # compile + first step
    jax.block_until_ready(metrics["loss"])
    paths[name] = [step, state, model_cfg]

  def run(name):
    step, state, _ = paths[name]
    for _ in range(args.steps):
      state, metrics = step(state, data)
    paths[name][1] = state
    return metrics["loss"]

  times = {"engram": [], "baseline": []}
  for _ in range(args.rounds):  # alternate so drift on a shared machine hits both
    for name in times:
      times[name].append(median_seconds(lambda: run(name), 1) / args.steps)
  t_engram, t_base = (float(np.median(times[n])) for n in ("engram", "baseline"))
  tokens_per_step = batch * seq
  cfg = paths["engram"][2]
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"{args.variant}: width {cfg.width}, depth {cfg.depth}, vocab {vocab}, batch {batch} "
        f"x seq {seq}, Engram at {list(cfg.engram.layers)} ({cfg.engram.heads} heads x "
        f"{cfg.engram.orders} orders, ~{cfg.engram.table_size[0]} rows/head), tables: "
        f"{config.train.table_optimizer}")
  print(f"engram  : {t_engram * 1e3:8.2f} ms/step, {tokens_per_step / t_engram:10.0f} tok/s")
  print(f"baseline: {t_base * 1e3:8.2f} ms/step, {tokens_per_step / t_base:10.0f} tok/s")
  print(f"Engram step-time overhead: {t_engram / t_base:.2f}x the baseline")


if __name__ == "__main__":
  main()
