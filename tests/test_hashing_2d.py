"""2D spatial hashing: stencil, causality, decode form, NumPy == jit, hash quality."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.studies import hash_quality as hq
from engram_jax import hashing, spatial_hashing

PAD = hashing.PAD_ID
SPEC = hashing.make_hash_spec((0, 2), 4, 3, (101, 211, 401), 11)
STENCIL = spatial_hashing.DEFAULT_STENCIL


def _cells(b, height, width, seed=0, vocab=5000):
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, size=(b, height * width)).astype(np.int32)


def _order_heads(spec, order_index):
  """The head columns of one order (H is order-major)."""
  return slice(order_index * spec.heads, (order_index + 1) * spec.heads)


# ----------------------------------------------------------------------------------
# Windows: which cells each row reads
# ----------------------------------------------------------------------------------
def test_windows_by_hand_on_a_3x4_grid():
  cells = np.arange(100, 112, dtype=np.int32)[None]  # cell i holds 100 + i
  w = spatial_hashing.spatial_windows(cells, 3, 4, ((0, -1), (-1, 0), (-1, -1), (-1, 1)))
  assert w.shape == (1, 12, 4) and w.dtype == np.uint32
  p = PAD
  expected = [  # left, up, up-left, up-right of cells 0..11
      [p, p, p, p], [100, p, p, p], [101, p, p, p], [102, p, p, p],
      [p, 100, p, 101], [104, 101, 100, 102], [105, 102, 101, 103], [106, 103, 102, p],
      [p, 104, p, 105], [108, 105, 104, 106], [109, 106, 105, 107], [110, 107, 106, p]]
  np.testing.assert_array_equal(w[0], np.array(expected, dtype=np.uint32))


def test_off_grid_neighbours_are_pad_on_first_row_and_column():
  height, width = 5, 6
  w = spatial_hashing.spatial_windows(_cells(2, height, width), height, width, STENCIL)
  grid = w.reshape(2, height, width, len(STENCIL))
  for k, (dy, dx) in enumerate(STENCIL):
    if dy < 0:
      assert (grid[:, :-dy, :, k] == PAD).all()  # rows above the image
    if dx < 0:
      assert (grid[:, :, :-dx, k] == PAD).all()  # columns left of the image
    if dx > 0:
      assert (grid[:, :, width - dx:, k] == PAD).all()  # columns right of it
  assert (w[:, 0] == PAD).all()  # cell 0 has no context at all
  on_grid = grid[:, 2:, 2:-1]  # far from every edge: no pad anywhere
  assert (on_grid != PAD).all()
  # The ids of a pad context are those of an explicit all-pad window.
  ids = spatial_hashing.spatial_hash_ids(_cells(2, height, width), SPEC, height, width)
  pad_ids = hashing.hash_windows(np.full((1, 1, SPEC.max_ngram), PAD, np.uint32), SPEC)
  np.testing.assert_array_equal(ids[:, 0],
                                np.broadcast_to(pad_ids[:, 0], ids[:, 0].shape))


def test_order_n_hashes_the_first_n_neighbours():
  """Ids equal the 1D hash of windows built by hand from the stencil."""
  height, width = 4, 5
  cells = _cells(1, height, width, seed=3)
  grid = cells.reshape(height, width)
  windows = np.full((1, height * width, SPEC.max_ngram), PAD, np.uint32)
  for t in range(height * width):
    r, c = divmod(t, width)
    for k, (dy, dx) in enumerate(STENCIL[:SPEC.max_ngram]):
      if r + dy >= 0 and 0 <= c + dx < width:
        windows[0, t, k] = grid[r + dy, c + dx]
  np.testing.assert_array_equal(spatial_hashing.spatial_hash_ids(cells, SPEC, height, width),
                                hashing.hash_windows(windows, SPEC))


# ----------------------------------------------------------------------------------
# Causality
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("changed", [0, 7, 13, 19])
def test_changing_a_cell_moves_no_id_at_or_before_it(changed):
  height, width = 4, 5
  cells = _cells(1, height, width, seed=4)
  base = spatial_hashing.spatial_hash_ids(cells, SPEC, height, width)
  other = cells.copy()
  other[0, changed] += 1
  diff = spatial_hashing.spatial_hash_ids(other, SPEC, height, width) != base  # [1, T, L, H]
  assert not diff[0, :changed + 1].any()
  r, c = divmod(changed, width)
  for order_index in range(SPEC.max_ngram - 1):
    n = order_index + 2
    readers = {(r - dy) * width + (c - dx) for dy, dx in STENCIL[:n]
               if 0 <= c - dx < width and r - dy < height}
    heads = _order_heads(SPEC, order_index)
    moved = set(np.flatnonzero(diff[0, :, :, heads].any(axis=(1, 2))))
    assert moved == readers  # exactly the cells whose order-n stencil holds it


def test_stencil_validation_names_the_field():
  for bad in [((0, 0),), ((0, 1),), ((1, -1),), ((-1, 0), (0, 2))]:
    with pytest.raises(ValueError, match=r"engram.stencil offset .* reads the pred"):
      spatial_hashing.validate_stencil(bad)
  with pytest.raises(ValueError, match="engram.stencil.*repeats"):
    spatial_hashing.validate_stencil(((0, -1), (0, -1)))
  with pytest.raises(ValueError, match="engram.stencil has 2 offsets.*max_ngram=4"):
    spatial_hashing.spatial_hash_ids(_cells(1, 3, 3), SPEC, 3, 3, ((0, -1), (-1, 0)))
  with pytest.raises(ValueError, match="engram.stencil offset \\(0, -4\\) never lands"):
    spatial_hashing.validate_stencil(((0, -4),), height=4, width=4)
  with pytest.raises(ValueError, match="engram.stencil.*pairs"):
    spatial_hashing.validate_stencil((0, -1))
  with pytest.raises(ValueError, match="engram.stencil is empty"):
    spatial_hashing.validate_stencil(())
  with pytest.raises(ValueError, match="more than the 3x3 grid"):
    spatial_hashing.spatial_windows(_cells(1, 3, 4), 3, 3)
  assert spatial_hashing.validate_stencil([[-1, 2], (0, -1)]) == ((-1, 2), (0, -1))


# ----------------------------------------------------------------------------------
# NumPy == jit, full and decode forms
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,stencil", [
    (8, 8, STENCIL), (3, 7, STENCIL), (6, 2, ((0, -1), (-1, 0), (-1, 1), (-2, -1))),
    (1, 9, ((0, -1), (0, -2), (0, -3), (0, -4)))])  # one row: only left neighbours
def test_numpy_and_jit_identical_on_random_grids(height, width, stencil):
  cells = np.random.default_rng(height * 31 + width).integers(
      0, 2**31 - 1, size=(3, height * width), dtype=np.int64).astype(np.int32)
  host = spatial_hashing.spatial_hash_ids(cells, SPEC, height, width, stencil)
  device = jax.jit(lambda x: spatial_hashing.spatial_hash_ids(x, SPEC, height, width, stencil))(
      jnp.asarray(cells))
  assert host.dtype == np.int32 and host.shape == (3, height * width, 2, 9)
  np.testing.assert_array_equal(host, np.asarray(device))
  assert (host >= 0).all() and (host < SPEC.sizes_LxH[None, None]).all()


def test_decode_step_equals_full_sequence_ids_and_ignores_later_cells():
  """Under jit with a traced start, as a generation loop calls it, per cell."""
  height, width = 4, 6
  cells = _cells(2, height, width, seed=5)
  full = spatial_hashing.spatial_hash_ids(cells, SPEC, height, width)
  step = jax.jit(lambda canvas, t: spatial_hashing.spatial_hash_ids_at(
      canvas, t, SPEC, height, width))
  garbage = _cells(2, height, width, seed=6)
  for t in range(height * width):
    # Cells from t on are not generated yet: the canvas holds garbage there.
    canvas = np.where(np.arange(height * width) < t, cells, garbage)
    device = np.asarray(step(jnp.asarray(canvas), jnp.int32(t)))
    host = spatial_hashing.spatial_hash_ids_at(canvas, t, SPEC, height, width)
    assert device.shape == (2, 1, 2, 9)
    np.testing.assert_array_equal(device, full[:, t:t + 1])
    np.testing.assert_array_equal(host, full[:, t:t + 1])


@pytest.mark.parametrize("start,length", [(0, 24), (0, 1), (5, 7), (17, 7)])
def test_decode_chunk_equals_full_sequence_ids(start, length):
  """A chunk reads only cells before its last one: later canvas entries are ignored."""
  height, width = 4, 6
  cells = _cells(1, height, width, seed=7)
  full = spatial_hashing.spatial_hash_ids(cells, SPEC, height, width)
  known = np.arange(height * width) < start + length - 1
  canvas = np.where(known, cells, _cells(1, height, width, seed=8))
  np.testing.assert_array_equal(
      spatial_hashing.spatial_hash_ids_at(canvas, start, SPEC, height, width, length=length),
      full[:, start:start + length])
  chunk = jax.jit(lambda c, s: spatial_hashing.spatial_hash_ids_at(
      c, s, SPEC, height, width, length=length))(jnp.asarray(canvas), jnp.int32(start))
  np.testing.assert_array_equal(np.asarray(chunk), full[:, start:start + length])


def test_prefix_of_an_image_hashes_like_the_whole_image():
  height, width = 5, 5
  cells = _cells(2, height, width, seed=9)
  full = spatial_hashing.spatial_hash_ids(cells, SPEC, height, width)
  np.testing.assert_array_equal(
      spatial_hashing.spatial_hash_ids(cells[:, :13], SPEC, height, width), full[:, :13])


# ----------------------------------------------------------------------------------
# Collision quality on real images (sklearn's 8x8 digits, all 17 pixel levels)
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_windows():
  datasets = pytest.importorskip("sklearn.datasets")
  cells = datasets.load_digits().images.astype(np.int32).reshape(-1, 64)
  return cells, spatial_hashing.spatial_windows(cells, 8, 8, STENCIL[:5])


def _report(cells, windows, spec):
  ids = spatial_hashing.spatial_hash_ids(cells, spec, 8, 8, STENCIL).reshape(-1, spec.heads * 4)
  flat = windows.reshape(-1, windows.shape[-1])
  rows = []
  for order_index in range(4):
    n = order_index + 2
    _, first = np.unique(flat[:, :n], axis=0, return_index=True)
    measured_all, measured_k = hq.collision_fractions(
        ids[first, _order_heads(spec, order_index)])
    ideal_all, ideal_k = hq.ideal_collision(len(first),
                                            spec.table_sizes_LxOxG[0, order_index])
    rows.append(dict(order=n, distinct=len(first), measured_all=measured_all,
                     ideal_all=ideal_all,
                     gap_per_head=np.abs(measured_k - ideal_k).max()))
  return rows


def _sized_spec(windows, heads=4):
  flat = windows.reshape(-1, windows.shape[-1])
  distinct = tuple(len(np.unique(flat[:, :n], axis=0)) for n in range(2, 6))
  return hashing.make_hash_spec((0,), 5, heads, distinct, 0)


def test_collisions_near_ideal_on_digits(digit_windows):
  cells, windows = digit_windows
  rows = _report(cells, windows, _sized_spec(windows))
  for row in rows[1:]:  # order 2 has only ~300 distinct contexts: too few to measure
    assert row["distinct"] > 1000, row
    assert row["measured_all"] <= 2 * row["ideal_all"] + 0.005, row
    assert row["measured_all"] >= 0.5 * row["ideal_all"] - 0.005, row
    assert row["gap_per_head"] < 0.03, row


def test_quality_check_detects_an_unmixed_hash(digit_windows):
  cells, windows = digit_windows
  spec = _sized_spec(windows)
  bad = dataclasses.replace(
      spec, multipliers_LxOxGxN=(spec.multipliers_LxOxGxN > 0).astype(np.uint32))
  for row in _report(cells, windows, bad)[1:]:
    assert row["measured_all"] > 3 * row["ideal_all"] + 0.05, row
