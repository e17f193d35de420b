"""2D spatial hashing for images: the n-gram of a cell is its causal stencil neighbours.

One body for NumPy (data pipelines) and jax (the model, the sampler), as in
`engram_jax.hashing`, whose mixing it reuses: order n hashes the first n stencil cells.
Shapes (docs/architecture.md): B batch, T cells in raster order, Hi x Wi the grid (HiWi
cells), N stencil cells per window.
"""
from __future__ import annotations

import numpy as np

from engram_jax.hashing import PAD_ID, HashSpec, array_module, hash_windows, jnp

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
  xp = array_module(canvas_BxHiWi)
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
