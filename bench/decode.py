"""Cached `lax.scan` decoding vs re-running the full forward for every new token.

Same model, same process, same prompts: prints tokens/s of both, their ratio, and the
per-token latency of the cached path. Greedy, so both paths emit the same tokens
(checked before timing).

`--sweep` instead reports the cached path's per-step time against batch and against
`max_len` (the KV cache size): a step should cost about the same at any `max_len`
that holds the sequence, and batch 8 should cost well under 8x batch 1. Per-step time
is (time for `--new` tokens - time for 2 tokens) / (`--new` - 2), so the prefill and
call overhead cancel.

Each batch is also set against its weight-streaming floor, measured in the same run: a
`lax.scan` of as many steps whose body only multiplies `[batch, in]` rows by every
weight matrix of the model once (tables, which a step gathers a few rows of, and the
input embedding, a gather unless tied, left out), with the same matmul FLOPs and weight
bytes as the step's dense layers. At batch 1 that is the in-cache weight-streaming
bound; at larger batches the CPU's small-GEMM compute floor. A step's ratio to it is
what the decode loop adds (attention, Engram, sampling, cache writes, loop overhead).
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# This checkout's engram_jax, not an installed one (as the other bench scripts do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engram_jax import config as config_lib  # noqa: E402
from engram_jax.sampling import text as generate  # noqa: E402
from engram_jax import param_groups  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py (scripts run from bench/)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new", type=int, default=224)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--engram_layers", default="1,3")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sweep", action="store_true", help="per-step time vs batch, max_len")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--max_lens", default="128,1024")
  args = parser.parse_args()
  if args.sweep:
    return sweep(args)

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


def model_config(args, max_len: int):
  layers = tuple(int(x) for x in args.engram_layers.split(",") if x)
  return config_lib.validate(config_lib.ModelConfig(
      vocab_size=1024, width=args.width, depth=args.depth, num_heads=4, num_kv_heads=2,
      max_len=max_len, engram=config_lib.EngramConfig(layers=layers, table_size=(10007,))))


def streaming_floor(params, tied: bool, batch: int, steps: int):
  """A jitted scan of `steps` steps that streams every dense weight through a matmul of
  `batch` rows (see the module docstring; a `[V, D]` tied embedding as `[B, V] @ [V, D]`,
  the unembedding's FLOPs and bytes); returns `() -> result`."""
  weights = [leaf.reshape(-1, leaf.shape[-1])
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if leaf.ndim >= 2 and param_groups.group(path) != "engram_tables"
             and (tied or param_groups.names(path)[:1] != ["embed"])]

  @jax.jit
  def run(weights, s):
    def step(s, _):
      for w in weights:  # rows that depend on the step, so no matmul is hoisted
        s = s + 1e-9 * jnp.sum(jnp.full((batch, w.shape[0]), s, w.dtype) @ w)
      return s, None
    return jax.lax.scan(step, s, None, length=steps)[0]

  return lambda: run(weights, jnp.float32(1.0))


def sweep(args):
  """Per-step cached decode time for each (batch, max_len), in alternating rounds."""
  batches = [int(b) for b in args.batches.split(",")]
  max_lens = [int(m) for m in args.max_lens.split(",")]
  params = nn.unbox(EngramLM(model_config(args, max(max_lens))).init(
      jax.random.key(0), jnp.zeros((1, args.prompt), jnp.int32)))["params"]
  calls, compile_s = {}, []
  for max_len in max_lens:
    model = EngramLM(model_config(args, max_len))  # same params: the cache size differs
    for batch in batches:
      prompt = jnp.asarray(np.random.default_rng(batch).integers(0, 1024, (batch, args.prompt)),
                           jnp.int32)
      lengths = jnp.full((batch,), args.prompt, jnp.int32)
      for new in (2, args.new):
        fn = jax.jit(lambda p, x, n, model=model, new=new: generate.generate(
            model, p, x, n, jax.random.key(0), max_new_tokens=new, temperature=0.0))
        start = time.perf_counter()
        jax.block_until_ready(fn(params, prompt, lengths))
        compile_s.append(time.perf_counter() - start)
        calls[(max_len, batch, new)] = lambda fn=fn, x=prompt, n=lengths: fn(params, x, n)
  tied = model_config(args, max_lens[0]).tie_embeddings
  for batch in batches:
    for new in (2, args.new):
      floor = streaming_floor(params, tied, batch, new - 1)
      jax.block_until_ready(floor())
      calls[("floor", batch, new)] = floor
  times = {key: [] for key in calls}
  for _ in range(args.repeats):
    for key, call in calls.items():
      times[key].append(median_seconds(call, 3))
  step_ms = {(m, b): 1e3 * (np.median(times[(m, b, args.new)]) - np.median(times[(m, b, 2)]))
             / (args.new - 2) for m in [*max_lens, "floor"] for b in batches}
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"width {args.width}, depth {args.depth}, Engram at {args.engram_layers}; prompt "
        f"{args.prompt}, {args.new} new tokens; {args.repeats} alternating rounds")
  print(f"compile + first call of generate: median {np.median(compile_s):.2f} s")
  print("ms per decode step (rows: max_len, columns: batch)")
  print("max_len " + "".join(f"{b:>10d}" for b in batches))
  for m in max_lens:
    print(f"{m:7d} " + "".join(f"{step_ms[(m, b)]:10.3f}" for b in batches))
  print("  floor " + "".join(f"{step_ms[('floor', b)]:10.3f}" for b in batches)
        + "   (weight streaming: every dense weight once through a matmul)")
  b0, m0 = batches[0], max_lens[0]
  for b in batches[1:]:
    print(f"batch {b} / batch {b0} at max_len {m0}: {step_ms[(m0, b)] / step_ms[(m0, b0)]:.2f}x")
  for b in batches:
    print(f"batch {b}: step / weight-streaming floor at max_len {m0}: "
          f"{step_ms[(m0, b)] / step_ms[('floor', b)]:.2f}x")
  fb = step_ms[("floor", batches[-1])] / step_ms[("floor", b0)]
  print(f"the floor itself: batch {batches[-1]} / batch {b0}: {fb:.2f}x")
  for m in max_lens[1:]:
    print(f"max_len {m} / {m0} at batch {b0}: {step_ms[(m, b0)] / step_ms[(m0, b0)]:.2f}x")


if __name__ == "__main__":
  main()
