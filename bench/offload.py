"""Decode and scoring time with host-offloaded Engram tables vs tables on the device.

Same model, same params, same process. On-device: `generate.generate` (jitted) with
the tables in the params. Offloaded: `offload.generate`, the tables as NumPy arrays in
host memory, the prompt's rows gathered on the host before the call and every decode
step's rows by a host callback inside the scan. Greedy, so both emit the same tokens
(checked before timing). The decode step's time is the difference between generating
`--new` tokens and 2 tokens, over the steps between. The scoring line times
full-forward scoring of a stream of batches: the jitted forward with on-device
tables vs `offload.RowPrefetcher` (a thread hashes, gathers and sends the next
batches' rows) feeding the table-free forward. Each group is timed in alternation
(`--rounds` rounds, the median of each), so that load from other processes falls on
all alike. The last line times one decode step's lookup alone: the host gather, and a
jitted call whose only work is the host callback.

  python bench/offload.py
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax import config as config_lib  # noqa: E402
from engram_jax.sampling import text as generate  # noqa: E402
from engram_jax import host_tables
from engram_jax.sampling import offload as offload  # noqa: E402
from engram_jax.layers.engram import ROWS_COLLECTION  # noqa: E402
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--engram_layers", default="1,5")
  p.add_argument("--rows", type=int, default=262_139, help="min rows per hash head")
  p.add_argument("--score_batches", type=int, default=4)
  p.add_argument("--rounds", type=int, default=7)
  return p.parse_args()


def alternating_medians(fns, rounds: int) -> list[float]:
  """Median seconds of each function, timed one call each, in turn, `rounds` times."""
  times = [[] for _ in fns]
  for _ in range(rounds):
    for fn, t in zip(fns, times):
      t.append(median_seconds(fn, 1))
  return [float(np.median(t)) for t in times]


def main():
  args = parse_args()
  layers = tuple(int(x) for x in args.engram_layers.split(",") if x)
  cfg = config_lib.validate(config_lib.ModelConfig(
      vocab_size=4096, width=args.width, depth=args.depth, num_heads=8, num_kv_heads=4,
      max_len=args.prompt + args.new, engram=config_lib.EngramConfig(
          layers=layers, max_ngram=3, heads=8, embed_per_ngram=256,
          table_size=(args.rows,))))
  model = EngramLM(cfg)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
  lengths = np.full((args.batch,), args.prompt, np.int32)
  params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.asarray(prompt[:, :8])))["params"])(
      jax.random.key(0))
  device_params, tables = host_tables.split_params(params, cfg)

  def runs(new):
    """(on-device, offloaded) generation of `new` tokens after the prompt."""
    on_device = jax.jit(lambda p, x, n: generate.generate(
        model, p, x, n, jax.random.key(0), max_new_tokens=new, temperature=0.0))
    return (lambda: on_device(params, prompt, lengths),
            lambda: offload.generate(model, device_params, tables, prompt, lengths,
                                     jax.random.key(0), max_new_tokens=new,
                                     temperature=0.0))

  run_device, run_offload = runs(args.new)
  short_device, short_offload = runs(2)  # prefill + 1 step: the difference is per step
  same = np.array_equal(np.asarray(run_device()), np.asarray(run_offload()))
  for fn in (short_device, short_offload):
    fn()
  t_device, t_offload, t_short_device, t_short_offload = alternating_medians(
      [run_device, run_offload, short_device, short_offload], args.rounds)
  step_device = (t_device - t_short_device) / (args.new - 2)
  step_offload = (t_offload - t_short_offload) / (args.new - 2)

  # Scoring a stream of batches (all ids known up front): prefetch vs on-device.
  batches = [rng.integers(0, cfg.vocab_size, (args.batch, args.prompt + args.new))
             .astype(np.int32) for _ in range(args.score_batches)]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  forward_rows = jax.jit(lambda v, x, ids: model.apply(v, x, hash_ids_BxTxLxH=ids))

  def score_device():
    return [forward(params, x) for x in batches]

  def score_offload():
    prefetcher = offload.RowPrefetcher(tables, batches, depth=2)
    out = [forward_rows({"params": device_params, ROWS_COLLECTION: rows}, x, ids)
           for x, ids, rows in prefetcher]
    prefetcher.close()
    return out

  scores_close = all(np.allclose(a, b, atol=1e-4, rtol=1e-4)
                     for a, b in zip(score_device(), score_offload()))
  t_score_device, t_score_offload = alternating_medians([score_device, score_offload],
                                                        args.rounds)

  # One decode step's lookup on its own: np.take of B x H rows per layer, and a jitted
  # call doing nothing but the host callback (ids to the host, rows back).
  step_ids = tables.hash_ids(prompt[:, -1:])
  t_gather = median_seconds(lambda: tables.gather(step_ids), 50)
  callback = jax.jit(tables.callback_rows)
  step_ids_device = jnp.asarray(step_ids)
  callback(step_ids_device)
  t_callback = median_seconds(lambda: callback(step_ids_device), 50)

  steps, n = args.new, args.score_batches
  print(f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs); "
        f"width {args.width}, depth {args.depth}, Engram at {layers}, tables "
        f"{tables.nbytes / 2**30:.2f} GiB ({sum(t.shape[0] for t in tables.tables_L):,} "
        f"rows x {cfg.engram.head_dim}); batch {args.batch}, prompt {args.prompt} + "
        f"{steps} new; {args.rounds} alternating rounds; same tokens: {same}")
  print(f"decode step offloaded / on-device: {step_offload / step_device:.3f}x "
        f"(offloaded {1e3 * step_offload:.2f} ms/step, on-device "
        f"{1e3 * step_device:.2f} ms/step)")
  print(f"whole generate call (prompt rows gathered on the host + prefill + {steps} "
        f"tokens) offloaded / on-device: {t_offload / t_device:.3f}x (offloaded "
        f"{1e3 * t_offload:.0f} ms, on-device {1e3 * t_device:.0f} ms)")
  print(f"scoring {n} batches of {args.batch}x{args.prompt + steps}, prefetched / "
        f"on-device: {t_score_offload / t_score_device:.3f}x (prefetched "
        f"{1e3 * t_score_offload / n:.1f} ms/batch, on-device "
        f"{1e3 * t_score_device / n:.1f} ms/batch; logits close: {scores_close})")
  print(f"one decode step's lookup alone: host gather {1e3 * t_gather:.3f} ms, jitted "
        f"callback round trip {1e3 * t_callback:.3f} ms")


if __name__ == "__main__":
  t0 = time.perf_counter()
  main()
  print(f"(bench wall time {time.perf_counter() - t0:.0f} s)")
