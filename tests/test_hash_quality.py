"""Hash quality: on real text our hash collides like an ideal one; a bad hash fails."""
import dataclasses

import numpy as np
import pytest

from engram_jax.studies import hash_quality as hq
from engram_jax import hashing


def _spec_sized_to(tokens_T, heads=4, factor=1.0, seed=0):
  """One-layer spec whose tables are `factor` x the distinct n-grams of each order."""
  distinct = [len(hq.distinct_ngram_positions(tokens_T, n)) for n in (2, 3)]
  return hashing.make_hash_spec((0,), 3, heads, tuple(int(d * factor) for d in distinct),
                                seed)


def _assert_near_ideal(report):
  for row in report:
    assert row["distinct_ngrams"] > 1000
    # All heads: within a factor 2 of ideal (plus slack for sampling noise).
    assert row["measured_all_heads"] <= 2 * row["ideal_all_heads"] + 0.005, row
    assert row["measured_all_heads"] >= 0.5 * row["ideal_all_heads"] - 0.005, row
    # One head: within a few percent (absolute) of ideal, for every head.
    gaps = np.subtract(row["measured_per_head_list"], row["ideal_per_head_list"])
    assert np.abs(gaps).max() < 0.03, row


def _assert_much_worse(report):
  for row in report:
    assert row["measured_all_heads"] > 3 * row["ideal_all_heads"] + 0.05, row


# ----------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------
def test_distinct_ngram_positions_matches_set():
  tokens = np.array([5, 6, 5, 6, 5, 7, 5, 6], dtype=np.int32)
  for n in (2, 3):
    windows = hashing.ngram_windows(tokens[None], n)[0]
    first = hq.distinct_ngram_positions(tokens, n)
    seen = {}
    for t, w in enumerate(map(tuple, windows.tolist())):
      seen.setdefault(w, t)
    np.testing.assert_array_equal(first, sorted(seen.values()))


def test_collision_fractions_by_hand():
  # n-gram 0 and 1 share head 0; 1 and 2 share head 1: only 1 collides in both heads.
  ids_IxG = np.array([[0, 5], [0, 7], [3, 7], [4, 9]])
  all_heads, per_head = hq.collision_fractions(ids_IxG)
  assert all_heads == pytest.approx(1 / 4)
  np.testing.assert_allclose(per_head, [2 / 4, 2 / 4])


def test_ideal_matches_uniform_random_ids():
  """The formula is right: truly random ids collide at the ideal rate."""
  rng = np.random.default_rng(0)
  d, sizes = 20000, [20011, 20021, 20023]
  ids_IxG = np.stack([rng.integers(0, p, size=d) for p in sizes], axis=1)
  measured_all, measured_G = hq.collision_fractions(ids_IxG)
  ideal_all, ideal_G = hq.ideal_collision(d, sizes)
  np.testing.assert_allclose(measured_G, ideal_G, atol=0.015)
  assert measured_all == pytest.approx(ideal_all, abs=0.01)


# ----------------------------------------------------------------------------------
# Our hash on real streams
# ----------------------------------------------------------------------------------
def test_our_hash_near_ideal_on_stdlib_bytes(real_token_stream):
  report = hq.collision_report(real_token_stream, _spec_sized_to(real_token_stream))
  assert [r["order"] for r in report] == [2, 3]
  _assert_near_ideal(report)


def test_our_hash_near_ideal_on_stdlib_bpe():
  pytest.importorskip("tokenizers")
  tokens, _ = hq.bpe_stream(hq.stdlib_source(max_bytes=300_000), vocab_size=2048)
  spec = _spec_sized_to(tokens, heads=8, factor=1.0, seed=5)
  _assert_near_ideal(hq.collision_report(tokens, spec))


def test_report_of_other_layer_uses_its_own_tables(real_token_stream):
  tokens = real_token_stream[:100_000]
  spec = hashing.make_hash_spec((1, 4), 3, 2, (2003, 8009), 1)
  report = hq.collision_report(tokens, spec, layer_index=1)
  assert report[1]["table_sizes"] == spec.table_sizes_LxOxG[1, 1].tolist()


# ----------------------------------------------------------------------------------
# The check can fail
# ----------------------------------------------------------------------------------
def test_detects_unmixed_hash(real_token_stream):
  """All multipliers 1: x_t ^ x_{t-1} ^ ..., symmetric and tiny for bytes."""
  spec = _spec_sized_to(real_token_stream)
  mult = spec.multipliers_LxOxGxN
  bad = dataclasses.replace(spec, multipliers_LxOxGxN=(mult > 0).astype(np.uint32))
  _assert_much_worse(hq.collision_report(real_token_stream, bad))


def test_detects_correlated_heads(real_token_stream):
  """Heads sharing mix and table size look ideal one by one but fail all-heads."""
  spec = _spec_sized_to(real_token_stream)
  mult, sizes = spec.multipliers_LxOxGxN, spec.table_sizes_LxOxG
  bad = dataclasses.replace(
      spec, multipliers_LxOxGxN=np.broadcast_to(mult[:, :, :1], mult.shape).copy(),
      table_sizes_LxOxG=np.broadcast_to(sizes[:, :, :1], sizes.shape).copy())
  report = hq.collision_report(real_token_stream, bad)
  for row in report:
    assert abs(row["measured_per_head_mean"] - row["ideal_per_head"]) < 0.03
  _assert_much_worse(report)


# ----------------------------------------------------------------------------------
# The reference hash
# ----------------------------------------------------------------------------------
def _wrap64(v: int) -> int:
  v &= (1 << 64) - 1
  return v - (1 << 64) if v >= 1 << 63 else v


def _reference_loop(tokens, b, t, sizes_OxG, mult_N, pad_id):
  """One position of the reference hash, in plain Python ints with int64 wrapping."""
  out = []
  for o in range(sizes_OxG.shape[0]):
    mix = 0
    for k in range(o + 2):
      x = int(tokens[b, t - k]) if t - k >= 0 else pad_id
      mix ^= _wrap64(x * int(mult_N[k]))
    out += [mix % int(p) for p in sizes_OxG[o]]
  return out


@pytest.mark.parametrize("big_multipliers", [False, True])
def test_reference_hash_matches_python_loop(big_multipliers):
  rng = np.random.default_rng(3)
  vocab, pad_id = 5000, 5000
  tokens = rng.integers(0, vocab, size=(2, 50))
  sizes = hashing.head_table_sizes(2, 4, 3, (1009, 2003, 4001))
  if big_multipliers:  # products overflow int64 and must wrap as numpy does
    mult = rng.integers(-2**63, 2**63 - 1, size=(2, 4), dtype=np.int64) | 1
  else:
    mult = hq.reference_multipliers(0, (1, 15), 4, vocab + 1)
  ids = hq.reference_hash_ids(tokens, sizes, mult, pad_id)
  assert ids.shape == (2, 50, 2, 9) and ids.dtype == np.int64
  for b, t in [(0, 0), (0, 1), (1, 2), (1, 3), (0, 49), (1, 27)]:
    for l in range(2):
      assert ids[b, t, l].tolist() == _reference_loop(tokens, b, t, sizes[l], mult[l],
                                                      pad_id)


def test_reference_multipliers_do_not_overflow():
  vocab = 3000
  mult = hq.reference_multipliers(0, (1, 15), 3, vocab)
  assert (mult % 2 == 1).all() and (mult > 0).all()
  assert max(int(m) for m in mult.ravel()) * (vocab - 1) < 2**63


def test_reference_hash_near_ideal(real_token_stream):
  """For context: the reference is also near ideal on this stream."""
  spec = _spec_sized_to(real_token_stream)
  mult = hq.reference_multipliers(0, (0,), 3, 257)
  _assert_near_ideal(hq.reference_collision_report(
      real_token_stream, spec.table_sizes_LxOxG, mult, pad_id=256))
