"""Collision quality of our n-gram hash vs the published reference vs an ideal hash.

Stream: the running interpreter's stdlib sources (sorted *.py, whole files up to
--max-bytes), as UTF-8 bytes and as a byte-level BPE trained in-process (ids through
Engram's compressed vocabulary). Tables are sized to `factor` x the distinct n-grams
of each order, so collisions are frequent enough to measure.

  python bench/hash_quality.py            # prints markdown tables
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from engram_jax.studies import hash_quality as hq  # noqa: E402
from engram_jax import hashing  # noqa: E402

MAX_NGRAM = 3


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--max-bytes", type=int, default=2_000_000)
  p.add_argument("--bpe-vocab", type=int, default=4096)
  p.add_argument("--heads", type=int, nargs="+", default=[4, 8])
  p.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                 help="table rows per head / distinct n-grams of the order")
  p.add_argument("--streams", nargs="+", default=["bytes", "bpe"])
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def load_streams(names, max_bytes, bpe_vocab):
  """{name: (tokens_T, vocab_size)} of the chosen streams."""
  source = hq.stdlib_source(max_bytes=max_bytes)
  out = {}
  for name in names:
    if name == "bytes":
      out["utf-8 bytes"] = (hq.byte_stream(source), 256)
    elif name == "bpe":
      tokens, vocab = hq.bpe_stream(source, vocab_size=bpe_vocab)
      out[f"BPE {bpe_vocab} (compressed {vocab})"] = (tokens, vocab)
    else:
      raise ValueError(f"unknown stream {name!r}")
  return out, len(source)


def pct(x: float) -> str:
  return f"{100 * x:.3g}%"


def table_rows(name, tokens_T, vocab, distinct, heads, factor, seed):
  """Markdown rows (one per order) comparing ours, reference and ideal."""
  spec = hashing.make_hash_spec((0,), MAX_NGRAM, heads,
                                tuple(int(d * factor) for d in distinct), seed)
  ours = hq.collision_report(tokens_T, spec)
  # The reference draws multipliers bounded by the vocab; pad_id = vocab is no token.
  mult = hq.reference_multipliers(seed, (0,), MAX_NGRAM, vocab + 1)
  ref = hq.reference_collision_report(tokens_T, spec.table_sizes_LxOxG, mult, vocab)
  lines = []
  for o, r in zip(ours, ref):
    lines.append(
        f"| {name} | {o['order']} | {heads} | {o['distinct_ngrams']} | {factor:g}x | "
        f"{pct(o['measured_all_heads'])} ({o['measured_all_heads_count']}) | "
        f"{pct(r['measured_all_heads'])} ({r['measured_all_heads_count']}) | "
        f"{pct(o['ideal_all_heads'])} ({o['ideal_all_heads_count']:.1f}) | "
        f"{pct(o['measured_per_head_mean'])} | {pct(r['measured_per_head_mean'])} | "
        f"{pct(o['ideal_per_head'])} |")
  return lines


def main():
  args = parse_args()
  start = time.perf_counter()
  streams, num_bytes = load_streams(args.streams, args.max_bytes, args.bpe_vocab)
  print(f"Python {platform.python_version()} stdlib, {num_bytes} bytes of sorted *.py; "
        f"numpy {np.__version__}; seed {args.seed}\n")
  print("Fraction of distinct n-grams colliding in **every** head (count in brackets; "
        "ideal: expected count), and in one head (mean over heads).\n")
  print("| stream | n | K | distinct | table/D | all heads: ours | reference | ideal | "
        "one head: ours | reference | ideal |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, (tokens_T, vocab) in streams.items():
    distinct = [len(hq.distinct_ngram_positions(tokens_T, n))
                for n in range(2, MAX_NGRAM + 1)]
    for heads in args.heads:
      for factor in args.factors:
        for line in table_rows(name, tokens_T, vocab, distinct, heads, factor,
                               args.seed):
          print(line, flush=True)
  print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
