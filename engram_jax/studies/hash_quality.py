"""Hash quality: how often the n-grams of a real token stream collide, against ideal.

Engram looks every n-gram up in G hashed tables per order. A collision in one head only
blurs that head's row; an n-gram is truly lost (its memory fully shared) when it
collides in *every* head. We measure, for the distinct n-grams of a stream, the
fraction that collide in every head and the per-head fraction, and compare them with
an ideal uniform hash with independent heads on the same prime table sizes.

For context we also implement the published reference hash (DeepSeek's Engram demo):
one int64 multiply-XOR mix per order, shared by the heads, which differ only by
`mod p_k`. Our hash (`hashing.py`) gives each head its own uint32 multipliers and a
murmur3 fmix32 finaliser.

Core functions import only numpy (and `hashing`). The corpus helpers at the end read
the Python standard library and import `tokenizers` lazily, only when asked for BPE.
"""
from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

from engram_jax import compressed_vocab, hashing

# Layer seed stride of the reference implementation (same as ours).
_REF_LAYER_SEED_STRIDE = 10007


# ----------------------------------------------------------------------------------
# Collision statistics
# ----------------------------------------------------------------------------------
def distinct_ngram_positions(tokens_T: np.ndarray, n: int) -> np.ndarray:
  """Position of the first occurrence of every distinct n-gram (pad before start).

  N-grams are the windows the hash sees, so the ones reaching before the start
  (holding PAD_ID) count as n-grams of their own.
  """
  windows_TxN = hashing.ngram_windows(np.asarray(tokens_T)[None], n)[0]
  # Rank prefixes one column at a time: 1D sorts of uint64 keys, much faster than
  # np.unique(axis=0). A rank is < T <= 2**32, so rank * 2**32 + id fits in uint64.
  rank_T = np.zeros(len(windows_TxN), dtype=np.uint64)
  for k in range(n):
    key_T = (rank_T << np.uint64(32)) | windows_TxN[:, k].astype(np.uint64)
    _, rank_T = np.unique(key_T, return_inverse=True)
    rank_T = rank_T.astype(np.uint64).reshape(-1)
  _, first_I = np.unique(rank_T, return_index=True)
  return np.sort(first_I)


def collision_fractions(ids_IxG: np.ndarray) -> tuple[float, np.ndarray]:
  """(all-heads, per-head `[G]`) fractions of I distinct n-grams sharing a row.

  An n-gram collides in head k when some other distinct n-gram has its row id in k;
  it collides in all heads when that holds for every k (the partners may differ).
  """
  ids_IxG = np.asarray(ids_IxG, dtype=np.int64)
  collide_IxG = np.stack(
      [np.bincount(ids_IxG[:, k])[ids_IxG[:, k]] > 1 for k in range(ids_IxG.shape[1])],
      axis=1)
  return float(collide_IxG.all(axis=1).mean()), collide_IxG.mean(axis=0)


def ideal_collision(num_distinct: int,
                    sizes_G: Sequence[int]) -> tuple[float, np.ndarray]:
  """(all-heads, per-head `[G]`) collision probability of an ideal uniform hash.

  A given n-gram collides in head k with probability 1 - (1 - 1/p_k)^(I-1); with
  independent heads the all-heads probability is the product.
  """
  p_G = np.asarray(sizes_G, dtype=np.float64)
  per_head_G = -np.expm1((num_distinct - 1) * np.log1p(-1.0 / p_G))
  return float(np.prod(per_head_G)), per_head_G


def report_from_ids(tokens_T: np.ndarray, ids_TxH: np.ndarray,
                    sizes_OxG: np.ndarray) -> list[dict]:
  """Collision report of one layer's row ids `[T, H]` (H = O*G, order-major)."""
  sizes_OxG = np.asarray(sizes_OxG)
  num_orders, heads = sizes_OxG.shape
  rows = []
  for o in range(num_orders):
    first_I = distinct_ngram_positions(tokens_T, o + 2)
    ids_IxG = ids_TxH[first_I, o * heads:(o + 1) * heads]
    measured_all, measured_G = collision_fractions(ids_IxG)
    ideal_all, ideal_G = ideal_collision(len(first_I), sizes_OxG[o])
    rows.append(dict(
        order=o + 2, distinct_ngrams=len(first_I), heads=heads,
        table_sizes=[int(p) for p in sizes_OxG[o]],
        measured_all_heads=measured_all, ideal_all_heads=ideal_all,
        # Counts, so a reader can judge sampling noise (about sqrt(count)).
        measured_all_heads_count=int(round(measured_all * len(first_I))),
        ideal_all_heads_count=ideal_all * len(first_I),
        measured_per_head_mean=float(measured_G.mean()),
        ideal_per_head=float(ideal_G.mean()),
        measured_per_head_list=[float(v) for v in measured_G],
        ideal_per_head_list=[float(v) for v in ideal_G]))
  return rows


def single_layer_spec(spec: hashing.HashSpec, layer_index: int) -> hashing.HashSpec:
  """The spec restricted to one Engram layer (hashing the others is wasted work)."""
  sl = slice(layer_index, layer_index + 1)
  return dataclasses.replace(
      spec, layer_ids=(spec.layer_ids[layer_index],),
      table_sizes_LxOxG=spec.table_sizes_LxOxG[sl],
      multipliers_LxOxGxN=spec.multipliers_LxOxGxN[sl])


def collision_report(tokens_T: np.ndarray, spec: hashing.HashSpec,
                     layer_index: int = 0) -> list[dict]:
  """Collision report (one dict per order) of our hash on a stream, vs ideal."""
  one = single_layer_spec(spec, layer_index)
  tokens_1xT = np.asarray(tokens_T, dtype=np.int32)[None]
  ids_TxH = hashing.ngram_hash_ids(tokens_1xT, one)[0, :, 0]
  return report_from_ids(tokens_T, ids_TxH, one.table_sizes_LxOxG[0])


# ----------------------------------------------------------------------------------
# The published reference hash (DeepSeek Engram demo), in NumPy int64
# ----------------------------------------------------------------------------------
def reference_multipliers(seed: int, layer_ids: Sequence[int], max_ngram: int,
                          vocab_size: int) -> np.ndarray:
  """Odd int64 multipliers `[L, N]` drawn as the reference does.

  Bounded by int64 max / vocab so that a single product never overflows.
  """
  half_bound = max(1, (np.iinfo(np.int64).max // vocab_size) // 2)
  out = []
  for layer_id in layer_ids:
    rng = np.random.default_rng(seed + _REF_LAYER_SEED_STRIDE * layer_id)
    out.append(rng.integers(0, half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1)
  return np.stack(out).astype(np.int64)


def reference_shifts(tokens_BxT: np.ndarray, max_ngram: int,
                     pad_id: int) -> list[np.ndarray]:
  """`[x_t, x_{t-1}, ..]` as int64 `[B, T]` arrays, `pad_id` before the start."""
  x = np.asarray(tokens_BxT, dtype=np.int64)
  t = x.shape[1]
  return [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad_id)[:, :t]
                for k in range(1, max_ngram)]


def reference_mix(shifts_N: Sequence[np.ndarray], multipliers_N: np.ndarray,
                  n: int) -> np.ndarray:
  """The reference's per-order mix `x_t*m0 ^ x_{t-1}*m1 ^ ...` (int64, wrapping)."""
  m = np.asarray(multipliers_N, dtype=np.int64)
  mix = shifts_N[0] * m[0]
  for k in range(1, n):
    mix = mix ^ (shifts_N[k] * m[k])
  return mix


def reference_hash_ids(tokens_BxT: np.ndarray, table_sizes_LxOxG: np.ndarray,
                       multipliers_LxN: np.ndarray, pad_id: int) -> np.ndarray:
  """Row ids `[B, T, L, H]` (int64) of the reference hash: heads share the mix.

  Same layout as `hashing.ngram_hash_ids` (H order-major), so both compare directly.
  """
  sizes = np.asarray(table_sizes_LxOxG, dtype=np.int64)
  num_layers, num_orders, heads = sizes.shape
  shifts_N = reference_shifts(tokens_BxT, num_orders + 1, pad_id)
  b, t = shifts_N[0].shape
  out = np.empty((b, t, num_layers, num_orders * heads), dtype=np.int64)
  for l in range(num_layers):
    for o in range(num_orders):
      mix = reference_mix(shifts_N, multipliers_LxN[l], o + 2)
      for k in range(heads):
        out[:, :, l, o * heads + k] = mix % sizes[l, o, k]
  return out


def reference_collision_report(tokens_T: np.ndarray, table_sizes_LxOxG: np.ndarray,
                               multipliers_LxN: np.ndarray, pad_id: int,
                               layer_index: int = 0) -> list[dict]:
  """Collision report of the reference hash on a stream, vs ideal.

  Distinct n-grams are counted with our PAD_ID windows; pass a `pad_id` that is not a
  token id so the reference does not merge pre-start n-grams with real ones.
  """
  sl = slice(layer_index, layer_index + 1)
  sizes = np.asarray(table_sizes_LxOxG)[sl]
  ids_TxH = reference_hash_ids(np.asarray(tokens_T)[None], sizes,
                               np.asarray(multipliers_LxN)[sl], pad_id)[0, :, 0]
  return report_from_ids(tokens_T, ids_TxH, sizes[0])


# ----------------------------------------------------------------------------------
# A real token stream: the running interpreter's standard library
# ----------------------------------------------------------------------------------
def stdlib_source(max_bytes: int = 2_000_000, max_files: int | None = None) -> bytes:
  """Whole stdlib *.py files in sorted name order, up to `max_bytes`: a fixed corpus.

  Fixed by the interpreter version only, so reports are reproducible on any machine
  with the same Python.
  """
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(stdlib.glob("*.py"))[:max_files]
  chunks, size = [], 0
  for f in files:
    data = f.read_bytes()
    if size and size + len(data) > max_bytes:
      break
    chunks.append(data)
    size += len(data)
  return b"".join(chunks)


def byte_stream(source: bytes) -> np.ndarray:
  """UTF-8 bytes as token ids (vocab 256)."""
  return np.frombuffer(source, dtype=np.uint8).astype(np.int32)


def bpe_stream(source: bytes, vocab_size: int = 4096,
               compress: bool = True) -> tuple[np.ndarray, int]:
  """(token ids, vocab size) of a byte-level BPE trained in-process on `source`.

  With `compress`, ids go through Engram's compressed vocabulary, as the hash sees them.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = source.decode("utf-8", errors="replace")
  lines = text.splitlines(keepends=True)
  tok.train_from_iterator(lines, trainer=trainer)
  ids = np.concatenate(
      [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(lines)])
  if not compress:
    return ids, tok.get_vocab_size()
  table = compressed_vocab.compressed_vocab_from_tokenizer(tok)
  return table[ids], int(table.max()) + 1
