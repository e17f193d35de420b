"""Hashing: host (NumPy) and device (jit) agree bit for bit; tables and vocab are right."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import compressed_vocab, hashing

SPEC = hashing.make_hash_spec((1, 5, 9), 4, 3, (1009, 2003, 4001), 7)


def _both(tokens, history=None):
  host = hashing.ngram_hash_ids(tokens, SPEC, history)
  fn = jax.jit(lambda x, h: hashing.ngram_hash_ids(x, SPEC, h))
  device = fn(jnp.asarray(tokens), None if history is None else jnp.asarray(history))
  return host, np.asarray(device)


def test_numpy_and_jit_identical_random():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 2**31 - 1, size=(4, 257), dtype=np.int64).astype(np.int32)
  host, device = _both(tokens)
  assert host.dtype == np.int32 and host.shape == (4, 257, 3, 9)
  np.testing.assert_array_equal(host, device)


def test_numpy_and_jit_identical_real_stream(real_token_stream):
  tokens = real_token_stream[: 8 * 1024].reshape(8, 1024)
  host, device = _both(tokens)
  np.testing.assert_array_equal(host, device)
  sizes = SPEC.sizes_LxH
  assert (host >= 0).all() and (host < sizes[None, None]).all()
  # Every head actually spreads the stream over its table.
  assert all(len(np.unique(host[:, :, 0, h])) > 0.3 * min(sizes[0, h], 2000)
             for h in range(SPEC.num_heads_total))


def test_history_continues_the_sequence():
  """Hashing a suffix with the preceding tokens as history equals slicing the full hash."""
  tokens = np.random.default_rng(1).integers(0, 5000, size=(2, 40)).astype(np.int32)
  full, _ = _both(tokens)
  host, device = _both(tokens[:, 17:], history=tokens[:, :17])
  np.testing.assert_array_equal(host, full[:, 17:])
  np.testing.assert_array_equal(device, full[:, 17:])


def test_hash_depends_on_exactly_the_last_n_tokens():
  tokens = np.random.default_rng(2).integers(0, 5000, size=(1, 30)).astype(np.int32)
  base = hashing.ngram_hash_ids(tokens, SPEC)
  changed = tokens.copy()
  changed[0, 10] += 1
  diff = hashing.ngram_hash_ids(changed, SPEC) != base  # [1, T, L, H]
  assert not diff[0, :10].any()  # causal: nothing before the change moves
  for order_index in range(SPEC.max_ngram - 1):
    n = order_index + 2
    heads = slice(order_index * SPEC.heads, (order_index + 1) * SPEC.heads)
    assert diff[0, 10:10 + n, :, heads].any(axis=(1, 2)).all()  # the n windows holding it
    assert not diff[0, 10 + n:, :, heads].any()  # and no later window of that order


def test_pad_before_start():
  tokens = np.array([[5, 6, 7]], np.int32)
  explicit = np.full((1, 3), hashing.PAD_ID, np.uint32)
  np.testing.assert_array_equal(hashing.ngram_hash_ids(tokens, SPEC),
                                hashing.ngram_hash_ids(tokens, SPEC, explicit))


def test_table_sizes_distinct_primes_above_minimum():
  sizes = SPEC.table_sizes_LxOxG
  flat = sizes.ravel().tolist()
  assert len(set(flat)) == len(flat)
  assert all(hashing.is_prime(p) for p in flat)
  for order, minimum in enumerate((1009, 2003, 4001)):
    assert (sizes[:, order] >= minimum).all()
  assert [hashing.is_prime(n) for n in (1, 2, 9, 97, 561, 7919, 2**31 - 1)] == \
      [False, True, False, True, False, True, True]


def test_offsets_lay_heads_out_back_to_back():
  offsets, sizes = SPEC.offsets_LxH, SPEC.sizes_LxH
  np.testing.assert_array_equal(offsets[:, 1:], np.cumsum(sizes, axis=1)[:, :-1])
  assert (offsets[:, 0] == 0).all() and SPEC.rows(0) == sizes[0].sum()


def test_multipliers_odd_per_layer_and_masked_past_order():
  m = SPEC.multipliers_LxOxGxN
  for order_index in range(3):
    n = order_index + 2
    assert (m[:, order_index, :, :n] % 2 == 1).all()
    assert (m[:, order_index, :, n:] == 0).all()
  assert not np.array_equal(m[0], m[1])  # layers decorrelated by seed
  assert len(np.unique(m[0, 0, :, 0])) == SPEC.heads  # heads are distinct functions


def test_too_large_head_table_is_a_clear_error():
  with pytest.raises(ValueError, match="engram.table_size"):
    hashing.make_hash_spec((0,), 2, 1, (2**31,), 0)


# ----------------------------------------------------------------------------------
# Compressed vocabulary
# ----------------------------------------------------------------------------------
def test_our_normalisation_equals_the_reference_on_latin_text():
  """Our stdlib normaliser ("engram_jax" runs) equals the reference's `tokenizers`
  sequence on Latin text, and differs where its docstring says it does."""
  pytest.importorskip("tokenizers")
  reference = compressed_vocab.reference_normalizer()
  samples = ["Hello", " hello", "HÉLLO", "ﬁne", "Ａ", "\t", "  ", "\n\n", " x ", "Straße",
             "ÅNGSTRÖM", "  tab\tbed ", "naïve", "Ω", "①", "é", "", "déjà vu"]
  for text in samples:
    assert compressed_vocab.normalize_token_text(text) == reference.normalize_str(text), text
  for text in ["ΟΣ", "का", " \x1c"]:  # final sigma, a spacing mark (Mc), U+001C
    assert compressed_vocab.normalize_token_text(text) != reference.normalize_str(text), text


def test_compressed_vocab_merges_equal_texts_and_keeps_undecodable():
  texts = ["Hello", " hello", "HÉLLO", "world", "\t", " ", None, None, "World"]
  vocab = compressed_vocab.compressed_vocab_from_texts(texts)
  assert vocab[0] == vocab[1] == vocab[2]
  assert vocab[3] == vocab[8] != vocab[0]
  assert vocab[4] == vocab[5]
  assert vocab[6] != vocab[7] and len({vocab[6], vocab[7]} & set(vocab[:6])) == 0
  assert sorted(set(vocab.tolist())) == list(range(vocab.max() + 1))  # dense ids


def test_compressed_vocab_from_real_tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"Apple": 0, "apple": 1, "APPLÉ": 2, "pear": 3, "[UNK]": 4}, unk_token="[UNK]"))
  vocab = compressed_vocab.compressed_vocab_from_tokenizer(tok)
  assert vocab.shape == (5,)
  assert vocab[0] == vocab[1] == vocab[2] != vocab[3]
  np.testing.assert_array_equal(compressed_vocab.identity_vocab(4), np.arange(4))
