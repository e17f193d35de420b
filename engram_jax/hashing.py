"""Compressed vocabulary and multi-head n-gram hashing for Engram.

Everything here is pure and deterministic. `ngram_hash_ids` has a single body that
runs on NumPy arrays (host: data pipelines, prefetch, offload) and on jax arrays under
`jit` (device: training, generation). It uses only wrapping unsigned 32-bit arithmetic
(multiply, XOR, shift, `mod p`), so both paths give bit-identical ids without
`jax_enable_x64`.

Shapes (docs/architecture.md): B batch, T positions, P positions before position 0,
L Engram layers, N max n-gram order (a window holds N tokens), O n-gram orders (2..N,
so O = N-1), G hash heads per order, H = O*G heads of a layer, Hi x Wi an image grid
(HiWi cells).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from typing import Any, Sequence

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
# Compressed vocabulary
# ----------------------------------------------------------------------------------
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]+")


def normalize_token_text(text: str) -> str:
  """The canonical form two tokens must share to be merged.

  NFKC, then NFD with combining marks removed (strip accents), lower-case, runs of
  whitespace folded to one space, outer spaces stripped; a token that is only
  whitespace keeps a single space so it does not merge with the empty string.
  """
  text = unicodedata.normalize("NFKC", text)
  text = unicodedata.normalize("NFD", text)
  text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
  text = _WHITESPACE_RUN.sub(" ", text.lower())
  if text == " ":
    return text
  return text.strip()


def compressed_vocab_from_texts(texts: Sequence[str | None],
                                raw_keys: Sequence[str] | None = None) -> np.ndarray:
  """Maps token id -> compressed id, merging tokens whose normalised texts are equal.

  `texts[i]` is the decoded text of token i, or None when it does not decode to valid
  text (a partial UTF-8 byte): such tokens keep an id of their own, or, with
  `raw_keys` (the published rule), are keyed by their raw token string `raw_keys[i]`
  in the same key space as normalised texts. Compressed ids are dense, assigned in
  order of first appearance.
  """
  key_to_new: dict[Any, int] = {}
  out = np.empty(len(texts), dtype=np.int32)
  for token_id, text in enumerate(texts):
    if text is None:
      raw = None if raw_keys is None else raw_keys[token_id]
      key: Any = ("raw", token_id) if raw is None else raw
    else:
      norm = normalize_token_text(text)
      key = norm if norm else text
    out[token_id] = key_to_new.setdefault(key, len(key_to_new))
  return out


def _decoded_texts(tokenizer) -> list[str | None]:
  texts = []
  for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    texts.append(None if "\ufffd" in text else text)
  return texts


def compressed_vocab_from_tokenizer(tokenizer) -> np.ndarray:
  """Compressed vocabulary of a Hugging Face `tokenizers.Tokenizer`."""
  return compressed_vocab_from_texts(_decoded_texts(tokenizer))


def published_compressed_vocab(tokenizer, expected_size: int | None = None) -> np.ndarray:
  """The published compressed vocabulary of a `tokenizers.Tokenizer`, `[V]` int32.

  As `compressed_vocab_from_tokenizer`, but a token whose decoded text holds U+FFFD is
  keyed by its raw token string (so it may merge with a text key, as in the
  reference). `expected_size` (e.g. V4.1's `engram_compressed_vocab_size`) is checked:
  the multipliers depend on it, so a mismatch is an error.
  """
  texts = _decoded_texts(tokenizer)
  raw = [tokenizer.id_to_token(i) for i in range(len(texts))]
  vocab = compressed_vocab_from_texts(texts, raw)
  size = int(vocab.max()) + 1 if vocab.size else 0
  if expected_size is not None and size != int(expected_size):
    raise ValueError(f"compressed vocabulary has {size} entries but "
                     f"{int(expected_size)} were declared: wrong tokenizer for this "
                     f"checkpoint?")
  return vocab


def compressed_vocab_for(tokenizer, mode: str = "engram_jax",
                         expected_size: int | None = None) -> np.ndarray:
  """The compressed vocabulary a hash mode expects (`engram.hash`): the published
  rule, size-checked, for "published"; ours otherwise."""
  if mode == "published":
    return published_compressed_vocab(tokenizer, expected_size or None)
  return compressed_vocab_from_tokenizer(tokenizer)


def identity_vocab(vocab_size: int) -> np.ndarray:
  """The map used when there is no tokenizer (images, toy data)."""
  return np.arange(vocab_size, dtype=np.int32)


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
def _xp(x):
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
  xp = _xp(windows_BxTxN)
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
  xp = _xp(tokens_BxT)
  return xp.where(xp.asarray(masked_BxT, dtype=bool), xp.uint32(DEAD_ID),
                  tokens_BxT.astype(xp.uint32))


def kill_dead(windows_BxTxN):
  """Windows with PAD_ID at and beyond (in lookback order) the first DEAD_ID entry.

  For 2D stencils, "beyond" follows the stencil's order: entry k is dead when any of
  entries 0..k is a dead cell.
  """
  xp = _xp(windows_BxTxN)
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
  xp = _xp(windows_BxTxN)
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
  xp = _xp(windows_BxTxN)
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
  xp = _xp(windows_BxTxN)
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
  xp = _xp(tokens_BxT)
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


# ----------------------------------------------------------------------------------
# 2D spatial hashing (images): one body for NumPy and jax
# ----------------------------------------------------------------------------------
# Causal neighbours (dy, dx) of the cell being predicted; order n hashes the first n.
# Left and up first: the two cells that say most about a pixel's surroundings.
DEFAULT_STENCIL = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0))


def validate_stencil(stencil, max_ngram: int | None = None, height: int | None = None,
                     width: int | None = None) -> tuple[tuple[int, int], ...]:
  """The stencil as int pairs; a ValueError naming `engram.stencil` if unusable.

  Every offset must point strictly before the predicted cell in raster order (dy < 0, or
  dy == 0 and dx < 0), so the hash reads only generated cells (KV-cache compatible).
  With `max_ngram`, there must be an entry per n-gram token; with `height`/`width`,
  every offset must land on the grid for some cell (else it is a constant pad).
  """
  try:
    offsets = tuple((int(dy), int(dx)) for dy, dx in stencil)
  except (TypeError, ValueError) as err:
    raise ValueError(f"engram.stencil={stencil!r} is invalid: give (dy, dx) integer "
                     f"pairs, e.g. {DEFAULT_STENCIL[:3]}.") from err
  if not offsets:
    raise ValueError("engram.stencil is empty: give at least max_ngram (dy, dx) pairs, "
                     f"e.g. {DEFAULT_STENCIL[:3]}.")
  for dy, dx in offsets:
    if not (dy < 0 or (dy == 0 and dx < 0)):
      raise ValueError(
          f"engram.stencil offset {(dy, dx)} reads the predicted cell or a later one: "
          f"use dy < 0, or dy == 0 and dx < 0 (cells already generated in raster "
          f"order).")
  if len(set(offsets)) != len(offsets):
    raise ValueError(f"engram.stencil={offsets} repeats an offset: every n-gram token "
                     f"must be a different neighbour.")
  if max_ngram is not None and len(offsets) < max_ngram:
    raise ValueError(
        f"engram.stencil has {len(offsets)} offsets but engram.max_ngram={max_ngram} "
        f"needs {max_ngram} (order n hashes the first n); add offsets, e.g. "
        f"{DEFAULT_STENCIL[:max_ngram]}, or lower engram.max_ngram.")
  if height is not None and width is not None:
    for dy, dx in offsets:
      if -dy >= height or abs(dx) >= width:
        raise ValueError(
            f"engram.stencil offset {(dy, dx)} never lands on a {height}x{width} grid: "
            f"use |dy| < {height} and |dx| < {width}.")
  return offsets


def _neighbour_index(cells_T, height: int, width: int, stencil, pad_index: int, xp):
  """Raster index `[T, N]` of each stencil neighbour of cells `cells_T`; off-grid: pad.

  Offsets point up or left, so a neighbour is on the grid iff its row is >= 0 and its
  column is in [0, width).
  """
  row_T, col_T = cells_T // width, cells_T % width
  cols = []
  for dy, dx in stencil:
    row, col = row_T + dy, col_T + dx
    on_grid = (row >= 0) & (col >= 0) & (col < width)
    cols.append(xp.where(on_grid, row * width + col, pad_index))
  return xp.stack(cols, axis=-1).astype(xp.int32)


def _gather_neighbours(canvas_BxHiWi, index_TxN):
  """`canvas[b, index]` as uint32, PAD_ID where the index is one past the end."""
  xp = _xp(canvas_BxHiWi)
  pad = xp.full((canvas_BxHiWi.shape[0], 1), PAD_ID, dtype=xp.uint32)
  ext = xp.concatenate([canvas_BxHiWi.astype(xp.uint32), pad], axis=1)
  return ext[:, index_TxN]


def _check_grid(height: int, width: int) -> None:
  if height < 1 or width < 1:
    raise ValueError(f"data.height={height}, data.width={width}: use positive sizes.")


def spatial_windows(cells_BxT, height: int, width: int,
                    stencil=DEFAULT_STENCIL):
  """Windows `[B, T, N]`: entry k is cell t's k-th stencil neighbour (N = len(stencil)).

  cells_BxT: the first T <= height*width cells of each image, in raster order. Row t is
  the context of cell t, which the model predicts at position t (position 0 holds the
  class token). Neighbours off the grid are PAD_ID. Feed to `hash_windows` with a
  stencil cut to `max_ngram` entries (as `spatial_hash_ids` does).
  """
  _check_grid(height, width)
  offsets = validate_stencil(stencil, height=height, width=width)
  t = cells_BxT.shape[1]
  if t > height * width:
    raise ValueError(f"cells_BxT has {t} cells per image, more than the "
                     f"{height}x{width} grid (data.height x data.width) holds.")
  index_TxN = _neighbour_index(np.arange(t), height, width, offsets, t, np)
  return _gather_neighbours(cells_BxT, index_TxN)


def spatial_windows_at(canvas_BxHiWi, start, length: int, height: int, width: int,
                       stencil=DEFAULT_STENCIL):
  """Windows `[B, length, N]` of cells [start, start+length) read from a canvas.

  The decode form of `spatial_windows`: canvas_BxHiWi holds the cells generated so far,
  and `start` may be a traced scalar (a `lax.scan` step). Cell t reads only cells < t,
  so canvas entries from start + length - 1 on (from `start` on when length == 1) may
  hold anything. Requires start + length <= height * width.
  """
  _check_grid(height, width)
  offsets = validate_stencil(stencil, height=height, width=width)
  if canvas_BxHiWi.shape[1] != height * width:
    raise ValueError(f"canvas_BxHiWi has {canvas_BxHiWi.shape[1]} cells per image; a "
                     f"{height}x{width} grid (data.height x data.width) needs "
                     f"{height * width}.")
  xp = np if isinstance(start, (int, np.integer, np.ndarray)) else jnp
  cells_T = xp.asarray(start, dtype=xp.int32) + xp.arange(length, dtype=xp.int32)
  index_TxN = _neighbour_index(cells_T, height, width, offsets, height * width, xp)
  return _gather_neighbours(canvas_BxHiWi, index_TxN)


def _spec_stencil(spec: HashSpec, stencil, height: int, width: int):
  return validate_stencil(stencil, spec.max_ngram, height, width)[:spec.max_ngram]


def spatial_hash_ids(cells_BxT, spec: HashSpec, height: int, width: int,
                     stencil=DEFAULT_STENCIL):
  """Row ids `[B, T, L, H]` of the 2D n-grams: row t hashes the context of cell t.

  Order n hashes the first n stencil neighbours. Same mix, primes and uint32 arithmetic
  as the 1D hash, so NumPy and jit agree bit for bit.
  """
  offsets = _spec_stencil(spec, stencil, height, width)
  return hash_windows(spatial_windows(cells_BxT, height, width, offsets), spec)


def spatial_hash_ids_at(canvas_BxHiWi, start, spec: HashSpec, height: int, width: int,
                        stencil=DEFAULT_STENCIL, length: int = 1):
  """Row ids `[B, length, L, H]` of cells [start, start+length), read from a canvas.

  What generation calls each step (length 1, `start` = the cell being predicted); equal
  to `spatial_hash_ids(cells)[:, start:start+length]` (see `spatial_windows_at`).
  """
  offsets = _spec_stencil(spec, stencil, height, width)
  return hash_windows(
      spatial_windows_at(canvas_BxHiWi, start, length, height, width, offsets), spec)
