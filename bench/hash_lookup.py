"""Tokens/s of n-gram hashing + table lookup: ours under jax.jit vs NumPy reference.

Ours: `hashing.ngram_hash_ids` (uint32, per-head multipliers, fmix32) + per-head row
offsets + `jnp.take` on each layer's flat f32 table `[rows, d_head]`, all in one jit.
Reference: the published algorithm (int64 multiply-XOR mix per order, `% p` per head)
in NumPy, then NumPy fancy-index gather from NumPy tables of the same sizes. Both see
the same token ids (real text: stdlib sources through a small in-process BPE) and
produce `[B, T, L, H, d_head]`. Tokens and tables are already where each path reads
them (jax: device buffers; NumPy: host arrays), so neither pays a transfer.

Published mode (`engram.hash="published"`): the reference's int64 hash emulated with
uint32 limbs under jit; checked equal to the NumPy reference, and its in-graph cost
printed as a ratio to our uint32 hash (hash alone, and hash + lookup).

  python bench/hash_lookup.py
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax.studies import hash_quality as hq  # noqa: E402
from engram_jax import hashing  # noqa: E402
from timing import median_seconds  # bench/timing.py (scripts run from bench/)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--layers", type=int, nargs="+", default=[1, 15],
                 help="Engram layer ids (L = how many)")
  p.add_argument("--max-ngram", type=int, default=3)
  p.add_argument("--heads", type=int, default=8, help="heads per order (K)")
  p.add_argument("--d-head", type=int, default=32)
  p.add_argument("--rows", type=int, default=100_003, help="min rows per head table")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--bpe-vocab", type=int, default=4096)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def token_batch(batch: int, seq: int, bpe_vocab: int) -> tuple[np.ndarray, int]:
  """Real (compressed) token ids `[B, T]` and their vocab size."""
  need, max_bytes = batch * seq, 200_000
  while True:
    tokens, vocab = hq.bpe_stream(hq.stdlib_source(max_bytes=max_bytes), bpe_vocab)
    if len(tokens) >= need:
      return tokens[:need].reshape(batch, seq).astype(np.int32), vocab
    max_bytes *= 2


def published_spec(spec: hashing.HashSpec, seed: int, vocab: int) -> hashing.HashSpec:
  """The same tables with the published hash, as the NumPy reference here runs it
  (compressed vocabulary vocab + 1, pad id vocab)."""
  return hashing.make_hash_spec(spec.layer_ids, spec.max_ngram, spec.heads,
                                tuple(int(r) for r in spec.table_sizes_LxOxG[0, :, 0]),
                                seed, "published", vocab + 1, vocab)


def make_jit_lookup(spec: hashing.HashSpec):
  """jit(tokens, tables) -> `[B, T, L, H, d]`: hash, offset, gather per layer."""
  offsets_LxH = jnp.asarray(spec.offsets_LxH.astype(np.int32))

  @jax.jit
  def lookup(tokens_BxT, tables_L):
    rows_BxTxLxH = hashing.ngram_hash_ids(tokens_BxT, spec) + offsets_LxH
    return jnp.stack([jnp.take(table, rows_BxTxLxH[:, :, l], axis=0, mode="clip")
                      for l, table in enumerate(tables_L)], axis=2)

  return lookup


def numpy_reference_lookup(tokens_BxT, sizes_LxOxG, mult_LxN, pad_id, offsets_LxH,
                           tables_L, use_take=False):
  """The reference algorithm in NumPy: int64 hash, then a gather per layer.

  Fancy indexing (`table[rows]`) is the headline baseline; `use_take` gathers with
  `np.take(table, rows, axis=0)`, which NumPy runs as a much faster row copy.
  """
  rows_BxTxLxH = hq.reference_hash_ids(tokens_BxT, sizes_LxOxG, mult_LxN, pad_id)
  rows_BxTxLxH += offsets_LxH
  b, t, num_layers, h = rows_BxTxLxH.shape
  out = np.empty((b, t, num_layers, h, tables_L[0].shape[1]), dtype=tables_L[0].dtype)
  for l, table in enumerate(tables_L):
    if use_take:
      out[:, :, l] = np.take(table, rows_BxTxLxH[:, :, l], axis=0)
    else:
      out[:, :, l] = table[rows_BxTxLxH[:, :, l]]
  return out


def main():
  args = parse_args()
  layer_ids = tuple(args.layers)
  spec = hashing.make_hash_spec(layer_ids, args.max_ngram, args.heads,
                                (args.rows,) * (args.max_ngram - 1), args.seed)
  tokens_BxT, vocab = token_batch(args.batch, args.seq, args.bpe_vocab)
  rng = np.random.default_rng(args.seed)
  tables_np = [rng.standard_normal((spec.rows(l), args.d_head), dtype=np.float32)
               for l in range(len(layer_ids))]
  mult_LxN = hq.reference_multipliers(args.seed, layer_ids, args.max_ngram, vocab + 1)
  offsets_LxH = spec.offsets_LxH.astype(np.int64)

  lookup = make_jit_lookup(spec)
  tokens_dev = jnp.asarray(tokens_BxT)
  tables_dev = tuple(jnp.asarray(t) for t in tables_np)
  run_jit = lambda: lookup(tokens_dev, tables_dev).block_until_ready()
  run_np = lambda: numpy_reference_lookup(tokens_BxT, spec.table_sizes_LxOxG, mult_LxN,
                                          vocab, offsets_LxH, tables_np)

  run_np_take = lambda: numpy_reference_lookup(
      tokens_BxT, spec.table_sizes_LxOxG, mult_LxN, vocab, offsets_LxH, tables_np,
      use_take=True)

  out_jit, out_np = run_jit(), run_np()  # warm-up: compile, touch tables
  assert out_jit.shape == out_np.shape, (out_jit.shape, out_np.shape)
  np.testing.assert_array_equal(run_np_take(), out_np)
  # Sanity: our jit lookup gathers exactly the rows our host hash names.
  host_rows = hashing.ngram_hash_ids(tokens_BxT, spec) + spec.offsets_LxH
  np.testing.assert_array_equal(np.asarray(out_jit)[:, :, 0],
                                tables_np[0][host_rows[:, :, 0]])

  t_jit = median_seconds(run_jit, args.repeats)
  t_np = median_seconds(run_np, args.repeats)
  t_np_take = median_seconds(run_np_take, args.repeats)
  # Breakdown (not part of the headline): the hashes alone, and our hash in NumPy.
  hash_jit = jax.jit(lambda x: hashing.ngram_hash_ids(x, spec))
  hash_jit(tokens_dev).block_until_ready()
  t_hash_jit = median_seconds(lambda: hash_jit(tokens_dev).block_until_ready(),
                              args.repeats)
  t_hash_ref = median_seconds(lambda: hq.reference_hash_ids(
      tokens_BxT, spec.table_sizes_LxOxG, mult_LxN, vocab), args.repeats)
  t_hash_ours_np = median_seconds(lambda: hashing.ngram_hash_ids(tokens_BxT, spec),
                                  args.repeats)
  # The published hash in-graph: bit-exact vs the NumPy reference, then its cost.
  pub = published_spec(spec, args.seed, vocab)
  np.testing.assert_array_equal(pub.table_sizes_LxOxG, spec.table_sizes_LxOxG)
  hash_pub = jax.jit(lambda x: hashing.ngram_hash_ids(x, pub))
  np.testing.assert_array_equal(np.asarray(hash_pub(tokens_dev)), hq.reference_hash_ids(
      tokens_BxT, spec.table_sizes_LxOxG, mult_LxN, vocab))
  t_hash_pub = median_seconds(lambda: hash_pub(tokens_dev).block_until_ready(),
                              args.repeats)
  lookup_pub = make_jit_lookup(pub)
  run_pub = lambda: lookup_pub(tokens_dev, tables_dev).block_until_ready()
  run_pub()
  t_pub = median_seconds(run_pub, args.repeats)
  ntok = tokens_BxT.size
  tps_jit, tps_np = ntok / t_jit, ntok / t_np
  rows_per_head = int(spec.table_sizes_LxOxG.mean())
  print(f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs), "
        f"numpy {np.__version__}; B={args.batch} T={args.seq} L={len(layer_ids)} "
        f"N={args.max_ngram} K={args.heads} H={spec.num_heads_total} "
        f"d_head={args.d_head} ~{rows_per_head} rows/head, "
        f"{sum(t.nbytes for t in tables_np) / 2**20:.0f} MiB tables; out {tuple(out_jit.shape)}; median of {args.repeats}")
  print(f"hash+lookup jit vs numpy-reference: {tps_jit / tps_np:.1f}x "
        f"(jit {tps_jit:.2e} tok/s, numpy {tps_np:.2e} tok/s)")
  print(f"hash+lookup jit vs numpy-reference with np.take gather: "
        f"{t_np_take / t_jit:.1f}x (numpy np.take {ntok / t_np_take:.2e} tok/s)")
  print(f"hash only: ours jit {ntok / t_hash_jit:.2e} tok/s, ours numpy "
        f"{ntok / t_hash_ours_np:.2e} tok/s, "
        f"reference numpy {ntok / t_hash_ref:.2e} tok/s")
  print(f"published hash in-graph (bit-exact, uint32 limbs): {ntok / t_hash_pub:.2e} tok/s, "
        f"{t_hash_pub / t_hash_jit:.1f}x the time of our uint32 hash; hash+lookup "
        f"{ntok / t_pub:.2e} tok/s, {t_pub / t_jit:.2f}x ours")


if __name__ == "__main__":
  main()
