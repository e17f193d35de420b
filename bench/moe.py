"""MoE FFN throughput: vs a dense SwiGLU of equal activated parameters, and by dispatch.

Same process, same tokens: the MoE layer (shared + top-k routed experts) with sorted
dropless dispatch (grouped matmul as block-sparse tiles, and as `jax.lax.ragged_dot`),
with capacity buffers, and with the one-hot reference (every expert on every token),
against a dense SwiGLU whose hidden size equals the activated expert width
(num_shared + top_k) * expert_dim. Forward and forward+backward, jitted, warmed up,
median of `--repeats` runs; every MoE path is checked to match the one-hot reference
before timing.
"""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import MoEConfig
from engram_jax.layers import moe
from engram_jax.layers.mlp import SwiGLU
from timing import median_seconds  # bench/timing.py (scripts run from bench/)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--experts", type=int, default=16)
  parser.add_argument("--expert_dim", type=int, default=128)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--shared", type=int, default=1)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--tile", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()

  tokens = args.batch * args.length
  x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.width))
  layer = lambda **kw: moe.MoE(MoEConfig(args.experts, args.expert_dim, args.top_k,
                                         args.shared, balance="none", **kw))
  models = {
      "sort": layer(group_matmul="tiles", tile=args.tile),
      "ragged": layer(group_matmul="ragged_dot"),
      "capacity": layer(capacity_factor=args.capacity_factor),
      "one_hot": layer(dispatch="one_hot"),
      "dense": SwiGLU((args.shared + args.top_k) * args.expert_dim),
  }
  params = {name: nn.unbox(m.init(jax.random.key(1), x))["params"]
            for name, m in models.items()}
  for name in ("ragged", "capacity", "one_hot"):
    params[name] = params["sort"]

  def fwd(model):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))

  def fwd_bwd(model):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)))

  want = fwd(models["one_hot"])(params["one_hot"], x)
  diff = max(float(jnp.max(jnp.abs(fwd(models[name])(params[name], x) - want)))
             for name in ("sort", "ragged", "capacity"))
  _, stats = models["capacity"].apply({"params": params["sort"]}, x,
                                      mutable=[moe.STATS])
  dropped = float(stats[moe.STATS]["dropped_fraction"][0])

  def n_params(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tree))

  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"tokens {tokens} (B={args.batch} T={args.length}), D={args.width}, "
        f"E={args.experts} x F={args.expert_dim}, top-{args.top_k}, {args.shared} shared; "
        f"params moe {n_params(params['sort'])} dense {n_params(params['dense'])}; "
        f"tile {args.tile}; max |diff| vs one-hot {diff:.1e}; capacity "
        f"{args.capacity_factor} drops {dropped:.1%}; median of {args.repeats}")
  for label, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
    rate = {}
    for name, model in models.items():
      fn = make(model)
      jax.block_until_ready(fn(params[name], x))      # compile + warm up
      rate[name] = tokens / median_seconds(lambda: fn(params[name], x), args.repeats)
    print(f"{label}: moe sort (tiles) vs dense {rate['sort'] / rate['dense']:.2f}x, "
          f"moe capacity vs dense {rate['capacity'] / rate['dense']:.2f}x; "
          f"sort (tiles) vs one-hot dispatch {rate['sort'] / rate['one_hot']:.2f}x, "
          f"sort (ragged_dot) vs one-hot {rate['ragged'] / rate['one_hot']:.2f}x "
          f"(tok/s: dense {rate['dense']:.3g}, tiles {rate['sort']:.3g}, ragged_dot "
          f"{rate['ragged']:.3g}, capacity {rate['capacity']:.3g}, "
          f"one-hot {rate['one_hot']:.3g})")


if __name__ == "__main__":
  main()
