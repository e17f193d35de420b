"""What the checkpoint digest costs a save: its first call (trace + compile) and a
steady call, against the save itself, in one process.

Builds the train state of an LM config (`tiny` by default, random-initialised, real
shapes: tables, backbone, AdamW state), then times `state_digest.digest(state)` (the
arrays read once more on the device, two uint32 sums each) and
`checkpoints.save` + wait (the same state written to a temporary directory), medians
over rounds, and prints the digest's share of a save.

    python bench/state_digest.py [--variant tiny] [--rounds 5]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import lm as lm_configs
  from engram_jax import checkpoints, optim, run_config, state_digest, train_steps
  from engram_jax.models.lm import EngramLM

  config = lm_configs.get_config(args.variant)
  run = run_config.from_config(config).with_tokenizer_vocab(config.data.vocab_size)
  _, tx = optim.from_train_config(run.train, run.model.engram)
  model = EngramLM(run.model)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  state = jax.block_until_ready(train_steps.init_train_state(tx, params))
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))

  start = time.perf_counter()
  state_digest.digest(state)
  first = time.perf_counter() - start
  digests, saves = [], []
  for r in range(args.rounds):
    start = time.perf_counter()
    state_digest.digest(state)
    digests.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as workdir:  # this script's own, removed after
      mngr = checkpoints.manager(workdir)
      start = time.perf_counter()
      checkpoints.save(mngr, 1, state, {"round": r})
      mngr.wait_until_finished()
      saves.append(time.perf_counter() - start)
      mngr.close()
  digest_s, save_s = statistics.median(digests), statistics.median(saves)
  print(f"jax {jax.__version__} ({jax.default_backend()}); {args.variant}: train state "
        f"{size / 2**20:,.1f} MiB in {len(jax.tree_util.tree_leaves(state))} arrays")
  print(f"digest first call (trace + compile + run): {first * 1e3:8.1f} ms")
  print(f"digest, steady:                            {digest_s * 1e3:8.1f} ms")
  print(f"checkpoint save until on disk:             {save_s * 1e3:8.1f} ms")
  print(f"digest / save: {digest_s / save_s:.3f}x steady, {first / save_s:.2f}x first call")


if __name__ == "__main__":
  main()
