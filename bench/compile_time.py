"""Compile time and program size of Engram vs the same backbone without it, in one process.

Builds an LM config (default `tiny`) twice: as configured, and with `engram.layers =
()` (`tiny_baseline`). For each it lowers and compiles the real jitted train step
(AdamW with the table group) and the full forward, alternating the two models in rounds
so that drift on a shared machine hits both, and prints the median wall and CPU seconds
(the process's CPU time, all threads: less sensitive to other jobs on a shared machine
than wall time), the size of the optimized HLO (instructions) and the Engram / baseline
ratios. `--engram_layers`
overrides the Engram layers, e.g. `--engram_layers=0,1,2,3` to see whether compile
time grows with their number; `--depth` the number of blocks.
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm as lm_configs  # noqa: E402
from engram_jax import optim, run_config, train_steps  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402


def build(config, vocab_size: int, layers, depth: int = 0):
  """(train step, abstract state, model, model config) of `config` with Engram `layers`
  (and `depth` blocks, 0 = the config's)."""
  config = config.copy_and_resolve_references()
  config.model.engram.layers = tuple(layers)
  config.model.depth = depth or config.model.depth
  run = run_config.from_config(config).with_tokenizer_vocab(vocab_size)
  model_cfg = run.model
  _, tx = optim.from_train_config(run.train, model_cfg.engram)
  model = EngramLM(model_cfg)
  seq = config.data.seq_len

  def init_state(rng):
    params = nn.unbox(model.init(rng, jnp.zeros((1, seq), jnp.int32)))["params"]
    return train_steps.init_train_state(tx, params)
  state = jax.eval_shape(init_state, jax.random.key(0))
  return train_steps.make_train_step(model, tx), state, model, model_cfg


def instructions(compiled) -> int:
  """Instructions of the optimized HLO module(s): lines that assign a value."""
  return sum(line.count(" = ") for line in compiled.as_text().splitlines())


def compile_once(fn, *args) -> tuple[float, float, int]:
  """(wall and CPU seconds to lower and compile, HLO instructions); a fresh trace."""
  jax.clear_caches()
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - wall, time.process_time() - cpu, instructions(compiled)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--engram_layers", default="", help="e.g. 0,1,2,3; default the config's")
  parser.add_argument("--depth", type=int, default=0, help="blocks; 0 = the config's")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
  args = parser.parse_args()

  config = lm_configs.get_config(args.variant)
  layers = (tuple(int(x) for x in args.engram_layers.split(",")) if args.engram_layers
            else tuple(config.model.engram.layers))
  vocab, batch, seq = config.data.vocab_size, config.data.batch_size, config.data.seq_len
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  data = {"inputs": tokens, "targets": tokens}
  models = {"engram": build(config, vocab, layers, args.depth),
            "baseline": build(config, vocab, (), args.depth)}

  results = {(name, what): [] for name in models for what in ("train_step", "forward")}
  sizes = {}
  for _ in range(args.rounds):
    for name, (step, state, model, _) in models.items():
      forward = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
      for what, fn, fn_args in (("train_step", step, (state, data)),
                                ("forward", forward, (state.params, tokens))):
        wall, cpu, size = compile_once(fn, *fn_args)
        results[(name, what)].append((wall, cpu))
        sizes[(name, what)] = size

  cfg = models["engram"][3]
  print(f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs); "
        f"{args.variant}: width {cfg.width}, depth {cfg.depth}, batch {batch} x seq {seq}, "
        f"Engram at {list(layers)} vs none; median of {args.rounds} rounds")
  for what in ("train_step", "forward"):
    wall, cpu = ({name: float(np.median([r[i] for r in results[(name, what)]]))
                  for name in models} for i in (0, 1))
    s = {name: sizes[(name, what)] for name in models}
    print(f"{what:10s}: compile {wall['engram']:6.2f} s vs {wall['baseline']:6.2f} s wall "
          f"({wall['engram'] / wall['baseline']:.2f}x), {cpu['engram']:6.2f} s vs "
          f"{cpu['baseline']:6.2f} s CPU ({cpu['engram'] / cpu['baseline']:.2f}x); HLO "
          f"{s['engram']} vs {s['baseline']} instructions ({s['engram'] / s['baseline']:.2f}x)")


if __name__ == "__main__":
  main()
