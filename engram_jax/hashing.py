"""Multi-head n-gram hashing for Engram: table sizes, multipliers, hash ids.

Everything here is pure and deterministic. `ngram_hash_ids` has a single body that
runs on NumPy arrays (host: data pipelines, prefetch, offload) and on jax arrays under
`jit` (device: training, generation). It uses only wrapping unsigned 32-bit arithmetic
(multiply, XOR, shift, `mod p`), so both paths give bit-identical ids without
`jax_enable_x64`.

Shapes (docs/architecture.md): B batch, T positions, P positions before position 0,
L Engram layers, N max n-gram order (a window holds N tokens), O n-gram orders (2..N,
so O = N-1), G hash heads per order, H = O*G heads of a layer. What is hashed: ids of
`engram_jax.compressed_vocab` (text) or the stencil windows of `engram_jax.spatial_hashing`
(images).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

try:  # the host path must work without jax installed (data workers)
  import jax.numpy as jnp
except ImportError:  # pragma: no cover
  jnp = None

# Id of positions before the start of a sequence (or off the image grid). No
# compressed token has this id: compressed vocabularies are far smaller than 2**32.
PAD_ID = 0xFFFFFFFF
# Id of a masked (non-text) token (`mark_dead`): a window reaching back to it reads
# PAD_ID from that lookback on, in both hash modes (DeepSeek-V4.1's dead tokens).
DEAD_ID = 0xFFFFFFFE
HASH_MODES = ("engram_jax", "published")

# Seed stride between layers, as in the reference implementation.
_LAYER_SEED_STRIDE = 10007
_MAX_HEAD_ROWS = 2**31 - 1  # row ids are int32 on device (no x64)


# ----------------------------------------------------------------------------------
# Table sizes and multipliers
# ----------------------------------------------------------------------------------
def is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin, exact for every n < 3.3e24."""
  if n < 2:
    return False
  small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
  for p in small:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d //= 2
    s += 1
  for a in small:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = pow(x, 2, n)
      if x == n - 1:
        break
    else:
      return False
  return True


def _next_prime(after: int, taken: set[int]) -> int:
  candidate = after + 1
  while not is_prime(candidate) or candidate in taken:
    candidate += 1
  return candidate


def head_table_sizes(num_layers: int, max_ngram: int, heads: int,
                     min_rows: Sequence[int]) -> np.ndarray:
  """Prime table sizes `[L, O, G]`, each >= its order's minimum, all distinct.

  Search order (layer, order, head) and start point (`min_rows[o] - 1`) follow the
  reference, so primes are distinct across heads, orders and layers.
  """
  taken: set[int] = set()
  sizes = np.zeros((num_layers, max_ngram - 1, heads), dtype=np.int64)
  for layer in range(num_layers):
    for order in range(max_ngram - 1):
      start = int(min_rows[order]) - 1
      for head in range(heads):
        start = _next_prime(start, taken)
        taken.add(start)
        sizes[layer, order, head] = start
  if sizes.size and sizes.max() > _MAX_HEAD_ROWS:
    raise ValueError(
        f"engram.table_size: a head table of {sizes.max()} rows does not fit int32 row "
        f"ids; use at most {_MAX_HEAD_ROWS} rows per head (add heads instead).")
  return sizes


def layer_multipliers(seed: int, layer_id: int, max_ngram: int,
                      heads: int) -> np.ndarray:
  """Odd uint32 multipliers `[O, G, N]` of one layer; zero past each order's length.

  Per-layer seeding (`seed + 10007 * layer_id`) decorrelates layers; every head has its
  own multipliers so the heads of one order are independent hash functions.
  """
  rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer_id)
  mult = rng.integers(0, 2**31, size=(max_ngram - 1, heads, max_ngram),
                      dtype=np.uint64) * 2 + 1
  order_len = np.arange(2, max_ngram + 1)[:, None, None]  # n of each order
  mult = np.where(np.arange(max_ngram)[None, None, :] < order_len, mult, 0)
  return mult.astype(np.uint32)


@dataclasses.dataclass(frozen=True)
class HashSpec:
  """Everything the hash of every Engram layer needs, as NumPy constants.

  table_sizes_LxOxG: prime rows of each head's table.
  multipliers_LxOxGxN: odd uint32 multipliers (0 past an order's length).
  offsets_LxH: first row of each head in its layer's flat table.
  """
  layer_ids: tuple[int, ...]
  max_ngram: int
  heads: int
  table_sizes_LxOxG: np.ndarray
  multipliers_LxOxGxN: np.ndarray
  # "published": the reference's int64 hash (one mix per order, heads differ only in
  # their prime), `published_multipliers_LxN` and pads of compressed id `pad_id`.
  mode: str = "engram_jax"
  pad_id: int = 0
  published_multipliers_LxN: np.ndarray | None = None

  @property
  def num_heads_total(self) -> int:  # H
    return (self.max_ngram - 1) * self.heads

  @property
  def sizes_LxH(self) -> np.ndarray:
    return self.table_sizes_LxOxG.reshape(len(self.layer_ids), -1)

  @property
  def offsets_LxH(self) -> np.ndarray:
    sizes = self.sizes_LxH
    return np.concatenate(
        [np.zeros_like(sizes[:, :1]), np.cumsum(sizes, axis=1)[:, :-1]], axis=1)

  def rows(self, layer_index: int) -> int:
    """Total rows of one layer's flat table."""
    return int(self.sizes_LxH[layer_index].sum())


def published_multipliers(seed: int, layer_ids: Sequence[int], max_ngram: int,
                          compressed_vocab_size: int) -> np.ndarray:
  """The reference's odd int64 multipliers `[L, N]`, one per n-gram position.

  Drawn below `int64_max // compressed_vocab_size`, so one product of a compressed id
  and a multiplier never overflows int64 (the XOR of such products cannot either).
  """
  half_bound = max(1, (np.iinfo(np.int64).max // int(compressed_vocab_size)) // 2)
  out = np.zeros((len(layer_ids), max_ngram), np.int64)
  for i, layer_id in enumerate(layer_ids):
    rng = np.random.default_rng(int(seed) + _LAYER_SEED_STRIDE * int(layer_id))
    out[i] = rng.integers(0, half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1
  return out


def check_layer_rows(spec: "HashSpec") -> None:
  """Row ids are head offset + hash id in a layer's flat table, int32 on device: a
  layer whose heads together exceed 2^31 - 1 rows would wrap to negative ids (and read
  row 0 under `mode="clip"`), so it is refused."""
  for i in range(len(spec.layer_ids)):
    if spec.rows(i) > _MAX_HEAD_ROWS:
      raise ValueError(
          f"engram.table_size: the {spec.num_heads_total} heads of one layer hold "
          f"{spec.rows(i):,} rows together, more than int32 row ids address "
          f"({_MAX_HEAD_ROWS:,}); lower engram.table_size, engram.heads or "
          "engram.max_ngram")


@functools.lru_cache(maxsize=64)
def make_hash_spec(layer_ids: tuple[int, ...], max_ngram: int, heads: int,
                   min_rows: tuple[int, ...], seed: int, mode: str = "engram_jax",
                   compressed_vocab_size: int = 0, pad_id: int = 0) -> HashSpec:
  """Builds (and caches) the hash constants of a configuration.

  mode "published" needs the compressed vocabulary's size (it bounds the multipliers)
  and the compressed id that pads windows (the reference: that of the pad token).
  """
  if mode not in HASH_MODES:
    raise ValueError(f"engram.hash={mode!r} is invalid: choose one of {HASH_MODES}")
  sizes = head_table_sizes(len(layer_ids), max_ngram, heads, min_rows)
  mults = np.zeros((0, max_ngram - 1, heads, max_ngram), np.uint32)
  if layer_ids:
    mults = np.stack([layer_multipliers(seed, l, max_ngram, heads) for l in layer_ids])
  published = None
  if mode == "published":
    if compressed_vocab_size < 1 or not 0 <= pad_id < compressed_vocab_size:
      raise ValueError(
          f"engram.hash='published' needs engram.compressed_vocab_size >= 1 (got "
          f"{compressed_vocab_size}) and 0 <= engram.pad_id < it (got {pad_id}).")
    published = published_multipliers(seed, layer_ids, max_ngram, compressed_vocab_size)
  for constant in (sizes, mults, published):  # cached and shared: never edited in place
    if constant is not None:
      constant.setflags(write=False)
  return HashSpec(tuple(layer_ids), max_ngram, heads, sizes, mults, mode, int(pad_id),
                  published)


def published_layout(layer_ids: Sequence[int], max_ngram: int, heads: int,
                     vocab_size_per_order: Sequence[int] | int) -> dict[int, dict]:
  """The reference's table layout: per layer id, its primes `[O, G]`, offsets `[H]`
  and rows (the sum of its primes). Primes are distinct over all layers, in
  `layer_ids` order, each order's search starting at its vocab size - 1."""
  if isinstance(vocab_size_per_order, (int, np.integer)):
    vocab_size_per_order = (int(vocab_size_per_order),) * (max_ngram - 1)
  sizes_LxOxG = head_table_sizes(len(layer_ids), max_ngram, heads, vocab_size_per_order)
  out = {}
  for layer_id, primes in zip(layer_ids, sizes_LxOxG):
    flat = primes.ravel()
    out[int(layer_id)] = dict(primes_OxG=primes, rows=int(flat.sum()),
                              offsets_H=np.concatenate([[0], np.cumsum(flat)[:-1]]))
  return out


# ----------------------------------------------------------------------------------
# Hashing: one body for NumPy and jax
# ----------------------------------------------------------------------------------
def array_module(x):
  """numpy for host arrays, jax.numpy for jax arrays and tracers: one body, two paths."""
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def _fmix32(h, xp):
  """Murmur3's 32-bit finaliser: spreads every input bit over the output bits."""
  h = h ^ (h >> xp.uint32(16))
  h = h * xp.uint32(0x85EBCA6B)
  h = h ^ (h >> xp.uint32(13))
  h = h * xp.uint32(0xC2B2AE35)
  return h ^ (h >> xp.uint32(16))


def mix_windows(windows_BxTxN, multipliers_LxOxGxN):
  """Per-(layer, order, head) hash values `[B, T, L, O, G]` of n-gram windows.

  `windows_BxTxN[..., k]` is the token k steps back from the predicted position (k = 0
  is the current token); the 1D and 2D hashes differ only in how they build windows.
  """
  xp = array_module(windows_BxTxN)
  w = windows_BxTxN.astype(xp.uint32)
  m = xp.asarray(multipliers_LxOxGxN, dtype=xp.uint32)
  mix = None
  for k in range(m.shape[-1]):
    term = w[:, :, None, None, None, k] * m[None, None, ..., k]
    mix = term if mix is None else mix ^ term
  return _fmix32(mix, xp)


def mark_dead(tokens_BxT, masked_BxT):
  """Tokens with masked (non-text) positions replaced by DEAD_ID.

  Hash the result: every window reaching back to a dead token reads the pad from that
  lookback on (`kill_dead`). Keep the marked tokens as decode history, so decoding
  sees the same windows.
  """
  xp = array_module(tokens_BxT)
  return xp.where(xp.asarray(masked_BxT, dtype=bool), xp.uint32(DEAD_ID),
                  tokens_BxT.astype(xp.uint32))


def kill_dead(windows_BxTxN):
  """Windows with PAD_ID at and beyond (in lookback order) the first DEAD_ID entry.

  For 2D stencils, "beyond" follows the stencil's order: entry k is dead when any of
  entries 0..k is a dead cell.
  """
  xp = array_module(windows_BxTxN)
  w = windows_BxTxN.astype(xp.uint32)
  dead = xp.zeros(w.shape[:-1], dtype=bool)
  cols = []
  for k in range(w.shape[-1]):
    dead = dead | (w[..., k] == xp.uint32(DEAD_ID))
    cols.append(xp.where(dead, xp.uint32(PAD_ID), w[..., k]))
  return xp.stack(cols, axis=-1)


# --- the published hash: int64 arithmetic emulated with (hi, lo) uint32 limbs ---------
def _split_int64(values) -> tuple[np.ndarray, np.ndarray]:
  """(hi, lo) uint32 words of int64 values (two's complement)."""
  u = np.asarray(values, dtype=np.int64).view(np.uint64)
  return (u >> np.uint64(32)).astype(np.uint32), (u & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _mul_wide(a, b, xp):
  """Full 64-bit product of uint32 arrays as (hi, lo), from 16-bit partial products."""
  m16, s16 = xp.uint32(0xFFFF), xp.uint32(16)
  a0, a1, b0, b1 = a & m16, a >> s16, b & m16, b >> s16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> s16) + (p01 & m16) + (p10 & m16)  # < 3 * 2**16: no overflow
  lo = (p00 & m16) | (mid << s16)
  hi = p11 + (p01 >> s16) + (p10 >> s16) + (mid >> s16)
  return hi, lo


def _mul64(w, m_hi, m_lo, xp):
  """(w * m) mod 2**64 for uint32 w >= 0 and a 64-bit m given as limbs: int64's
  wrapping multiply (two's complement products agree modulo 2**64)."""
  hi, lo = _mul_wide(w, m_lo, xp)
  return hi + w * m_hi, lo


def _mod_prime(hi, lo, p, two64_mod_p, step: int, xp):
  """NumPy's `x % p` for the int64 x with words (hi, lo) and 2 <= p < 2**31.

  x as unsigned: (hi mod p) * 2**32 + lo, reduced by long division in `step`-bit
  digits of lo (r < p < 2**(32-step), so r << step | digit fits 32 bits). A negative x
  (top bit set) is x_unsigned - 2**64, and `%` by a positive p is non-negative: subtract
  2**64 mod p, modulo p.
  """
  r = hi % p
  shift = 32
  while shift > 0:
    width = min(step, shift)
    shift -= width
    digit = (lo >> xp.uint32(shift)) & xp.uint32((1 << width) - 1)
    r = ((r << xp.uint32(width)) | digit) % p
  negative = (hi >> xp.uint32(31)) == xp.uint32(1)
  return xp.where(negative, (r + (p - two64_mod_p)) % p, r)


def published_mixes(windows_BxTxN, spec: HashSpec):
  """The reference's per-order mixes as (hi, lo) uint32 limbs, each `[B, T, L, O]`:
  mix_n = c_t*m_0 ^ c_{t-1}*m_1 ^ .. ^ c_{t-n+1}*m_{n-1} (int64, wrapping), pads
  (PAD_ID) replaced by `spec.pad_id`."""
  xp = array_module(windows_BxTxN)
  w = windows_BxTxN.astype(xp.uint32)
  w = xp.where(w == xp.uint32(PAD_ID), xp.uint32(spec.pad_id), w)
  m_hi_LxN, m_lo_LxN = (xp.asarray(a) for a in _split_int64(spec.published_multipliers_LxN))
  his, los = [], []
  x_hi = x_lo = None
  for k in range(spec.max_ngram):
    p_hi, p_lo = _mul64(w[:, :, None, k], m_hi_LxN[None, None, :, k],
                        m_lo_LxN[None, None, :, k], xp)
    x_hi, x_lo = (p_hi, p_lo) if k == 0 else (x_hi ^ p_hi, x_lo ^ p_lo)
    if k >= 1:
      his.append(x_hi)
      los.append(x_lo)
  return xp.stack(his, axis=-1), xp.stack(los, axis=-1)


def _published_ids(windows_BxTxN, spec: HashSpec):
  """Per-head row ids `[B, T, L, O, G]` (uint32) of the published hash."""
  xp = array_module(windows_BxTxN)
  hi_BxTxLxO, lo_BxTxLxO = published_mixes(windows_BxTxN, spec)
  sizes = spec.table_sizes_LxOxG.astype(np.int64)
  step = 32 - int(sizes.max() - 1).bit_length()
  two64 = np.vectorize(lambda p: (1 << 64) % int(p), otypes=[np.int64])(sizes)
  p = xp.asarray(sizes.astype(np.uint32))[None, None]
  return _mod_prime(hi_BxTxLxO[..., None], lo_BxTxLxO[..., None], p,
                    xp.asarray(two64.astype(np.uint32))[None, None], step, xp)


def hash_windows(windows_BxTxN, spec: HashSpec):
  """Row ids `[B, T, L, H]` (int32, within each head's table) of n-gram windows.

  `spec.mode` picks the hash: ours (uint32, per-head multipliers, fmix32) or the
  published one (int64 mix per order, emulated bit for bit with uint32 limbs).
  """
  xp = array_module(windows_BxTxN)
  windows_BxTxN = kill_dead(windows_BxTxN)
  b, t = windows_BxTxN.shape[:2]
  if spec.mode == "published":
    ids = _published_ids(windows_BxTxN, spec)
    return ids.reshape(b, t, len(spec.layer_ids), -1).astype(xp.int32)
  mix = mix_windows(windows_BxTxN, spec.multipliers_LxOxGxN)
  sizes = xp.asarray(spec.table_sizes_LxOxG.astype(np.uint32))
  ids = mix % sizes[None, None]
  return ids.reshape(b, t, len(spec.layer_ids), -1).astype(xp.int32)


def ngram_windows(tokens_BxT, max_ngram: int, history_BxP=None):
  """Windows `[B, T, N]` of the last N tokens at every position (1D, causal).

  history_BxP: the P >= N-1 tokens that precede position 0 (decoding); PAD_ID when
  None (start of sequence).
  """
  xp = array_module(tokens_BxT)
  tokens = tokens_BxT.astype(xp.uint32)
  b, t = tokens.shape
  if history_BxP is None:
    history = xp.full((b, max_ngram - 1), PAD_ID, dtype=xp.uint32)
  else:
    history = history_BxP.astype(xp.uint32)[:, history_BxP.shape[1] - (max_ngram - 1):]
  ext = xp.concatenate([history, tokens], axis=1)
  start = max_ngram - 1
  return xp.stack([ext[:, start - k:start - k + t] for k in range(max_ngram)], axis=-1)


def ngram_hash_ids(tokens_BxT, spec: HashSpec, history_BxP=None):
  """Row ids `[B, T, L, H]` of the 1D n-grams ending at every position."""
  return hash_windows(ngram_windows(tokens_BxT, spec.max_ngram, history_BxP), spec)
