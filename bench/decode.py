"""Cached `lax.scan` decoding vs re-running the full forward for every new token.

Same model, same process, same prompts: prints tokens/s of both, their ratio, and the
per-token latency of the cached path. Greedy, so both paths emit the same tokens
(checked before timing).
"""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import config as config_lib
from engram_jax import generate
from engram_jax.models.lm import EngramLM
from timing import median_seconds  # bench/timing.py (scripts run from bench/)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new", type=int, default=224)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--engram_layers", default="1,3")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  total = args.prompt + args.new
  layers = tuple(int(x) for x in args.engram_layers.split(",") if x)
  cfg = config_lib.validate(config_lib.ModelConfig(
      vocab_size=1024, width=args.width, depth=args.depth, num_heads=4, num_kv_heads=2,
      max_len=total, engram=config_lib.EngramConfig(layers=layers, table_size=(10007,))))
  model = EngramLM(cfg)
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt))
  prompt = jnp.asarray(prompt, jnp.int32)
  lengths = jnp.full((args.batch,), args.prompt, jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), prompt))["params"]

  cached = jax.jit(lambda p, x: generate.generate(
      model, p, x, lengths, jax.random.key(0), max_new_tokens=args.new, temperature=0.0))

  @jax.jit
  def recompute(p, x):
    """Each step runs the whole (fixed-size, causal) buffer through the model."""
    buf = jnp.zeros((args.batch, total), jnp.int32).at[:, :args.prompt].set(x)

    def step(buf, pos):
      logits = model.apply({"params": p}, buf)
      token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, 1, False), -1)
      return jax.lax.dynamic_update_index_in_dim(buf, token.astype(jnp.int32), pos, 1), None

    buf, _ = jax.lax.scan(step, buf, jnp.arange(args.prompt, total))
    return buf[:, args.prompt:]

  same = np.array_equal(np.asarray(cached(params, prompt)), np.asarray(recompute(params, prompt)))
  t_cached = median_seconds(lambda: cached(params, prompt), args.repeats)
  t_full = median_seconds(lambda: recompute(params, prompt), args.repeats)
  new_tokens = args.batch * args.new
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"batch {args.batch}, prompt {args.prompt} + {args.new} new, width {args.width}, "
        f"depth {args.depth}, Engram at {layers}; same tokens: {same}")
  print(f"cached scan decode vs full recompute: {t_full / t_cached:.1f}x "
        f"(cached {new_tokens / t_cached:.0f} tok/s, {1e3 * t_cached / args.new:.2f} ms/step; "
        f"recompute {new_tokens / t_full:.0f} tok/s)")


if __name__ == "__main__":
  main()
