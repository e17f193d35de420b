"""The published hash (engram.hash = "published"): bit for bit the reference's int64 NumPy.

The reference below is written independently and plainly with np.int64 arithmetic
(numpy arrays wrap on overflow; `%` by a positive int is non-negative); ours emulates it
with uint32 limbs, on the host and under jit, without jax_enable_x64.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax import compressed_vocab, hashing, spatial_hashing

from tests.equivalence import assert_cached_equals_full


def reference_multipliers(seed, layer_ids, max_ngram, compressed_vocab_size):
  bound = (np.iinfo(np.int64).max // compressed_vocab_size) // 2
  return np.stack([np.random.default_rng(seed + 10007 * layer).integers(
      0, bound, size=(max_ngram,), dtype=np.int64) * 2 + 1 for layer in layer_ids])


def reference_ids(tokens_BxT, primes_LxOxG, multipliers_LxN, pad_id, masked_BxT=None):
  """Row ids `[B, T, L, O*K]` of the published algorithm, in int64 NumPy."""
  x = np.asarray(tokens_BxT, dtype=np.int64)
  b, t = x.shape
  num_layers, orders, heads = primes_LxOxG.shape
  masked = np.zeros((b, t), bool) if masked_BxT is None else np.asarray(masked_BxT)
  shifted, dead = [], np.zeros((b, t), bool)
  for k in range(orders + 1):
    xk = np.concatenate([np.full((b, k), pad_id, np.int64), x], axis=1)[:, :t]
    mk = np.concatenate([np.zeros((b, k), bool), masked], axis=1)[:, :t]
    dead = dead | mk  # a masked token kills this lookback and every longer one
    shifted.append(np.where(dead, np.int64(pad_id), xk))
  out = np.zeros((b, t, num_layers, orders * heads), np.int64)
  for l in range(num_layers):
    m = multipliers_LxN[l].astype(np.int64)
    mix = shifted[0] * m[0]
    for n in range(2, orders + 2):
      mix = np.bitwise_xor(mix, shifted[n - 1] * m[n - 1])
      for k in range(heads):
        out[:, :, l, (n - 2) * heads + k] = mix % np.int64(primes_LxOxG[l, n - 2, k])
  return out


def _spec(layer_ids=(1, 4), max_ngram=4, heads=2, min_rows=(1009, 2003, 4001), seed=7,
          vocab=5000, pad=2):
  return hashing.make_hash_spec(layer_ids, max_ngram, heads, min_rows, seed, "published",
                                vocab, pad)


def _host_and_jit(tokens, spec, history=None):
  host = hashing.ngram_hash_ids(tokens, spec, history)
  fn = jax.jit(lambda x, h: hashing.ngram_hash_ids(x, spec, h))
  dev = fn(jnp.asarray(tokens), None if history is None else jnp.asarray(history))
  return host, np.asarray(dev)


def _check(tokens, spec, masked=None):
  want = reference_ids(tokens, spec.table_sizes_LxOxG, spec.published_multipliers_LxN,
                       spec.pad_id, masked)
  if masked is not None:
    tokens = hashing.mark_dead(tokens, masked)
  host, dev = _host_and_jit(tokens, spec)
  assert host.dtype == np.int32
  np.testing.assert_array_equal(host, want)
  np.testing.assert_array_equal(dev, want)
  return host


def test_multipliers_are_the_references():
  spec = _spec()
  np.testing.assert_array_equal(spec.published_multipliers_LxN,
                                reference_multipliers(7, (1, 4), 4, 5000))


def test_random_tokens_host_and_jit_equal_int64_numpy():
  tokens = np.random.default_rng(0).integers(0, 5000, size=(3, 301)).astype(np.int32)
  _check(tokens, _spec())


def test_real_token_stream(real_token_stream):
  spec = _spec(vocab=256, pad=0)
  ids = _check(real_token_stream[:4 * 1024].reshape(4, 1024), spec)
  assert all(len(np.unique(ids[:, :, 0, h])) > 200 for h in range(spec.num_heads_total))


def test_wrapping_negative_mixes_and_primes_near_2_31():
  """Full-range int64 multipliers (products wrap, mixes go negative), ids up to 2**31,
  and primes from tiny to just below 2**31 in one spec (the long division's digit
  width follows the largest)."""
  spec = _spec(layer_ids=(0, 3), max_ngram=3, heads=2,
               min_rows=(67, 2**31 - 20_000), vocab=2**31 - 1)
  rng = np.random.default_rng(1)
  wild = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=(2, 3),
                      dtype=np.int64)
  spec = dataclasses.replace(spec, published_multipliers_LxN=wild)
  tokens = rng.integers(0, 2**31 - 1, size=(2, 2000), dtype=np.int64).astype(np.uint32)
  tokens[0, :50] = 2**31 - 2  # large ids next to each other
  want = reference_ids(tokens, spec.table_sizes_LxOxG, wild, spec.pad_id)
  mixes = (tokens.astype(np.int64) * wild[0, 0]) ^ np.roll(tokens.astype(np.int64) * wild[0, 1], 1)
  assert (mixes < 0).mean() > 0.3  # the signed branch is exercised
  assert spec.table_sizes_LxOxG.max() > 2**31 - 20_000
  host, dev = _host_and_jit(tokens, spec)
  np.testing.assert_array_equal(host, want)
  np.testing.assert_array_equal(dev, want)


def test_decode_history_continues_the_sequence():
  spec = _spec()
  tokens = np.random.default_rng(2).integers(0, 5000, size=(2, 40)).astype(np.int32)
  full = hashing.ngram_hash_ids(tokens, spec)
  host, dev = _host_and_jit(tokens[:, 23:], spec, history=tokens[:, :23])
  np.testing.assert_array_equal(host, full[:, 23:])
  np.testing.assert_array_equal(dev, full[:, 23:])


def test_dead_masks_cut_the_windows():
  spec = _spec()
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 5000, size=(2, 64)).astype(np.int32)
  masked = rng.random((2, 64)) < 0.15
  ids = _check(tokens, spec, masked)
  assert not np.array_equal(ids, hashing.ngram_hash_ids(tokens, spec))
  # Decoding with marked history gives the same ids.
  marked = hashing.mark_dead(tokens, masked)
  np.testing.assert_array_equal(
      hashing.ngram_hash_ids(marked[:, 30:], spec, marked[:, :30]), ids[:, 30:])


def test_config_selects_the_published_hash():
  engram = config_lib.EngramConfig(layers=(1,), max_ngram=3, heads=2, embed_per_ngram=8,
                                   table_size=(101,), hash="published",
                                   compressed_vocab_size=300, pad_id=5)
  cfg = config_lib.validate(config_lib.ModelConfig(depth=2, engram=engram))
  spec = cfg.engram.hash_spec()
  assert spec.mode == "published" and spec.pad_id == 5
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
  for bad, match in ((dict(hash="murmur"), "engram.hash"),
                     (dict(hash="published", compressed_vocab_size=0), "engram.compressed_vocab_size"),
                     (dict(hash="published", compressed_vocab_size=10, pad_id=10),
                      "engram.pad_id")):
    with pytest.raises(ValueError, match=match):
      config_lib.validate(config_lib.ModelConfig(
          depth=2, engram=dataclasses.replace(engram, **{"hash": "engram_jax", **bad})))


def test_v41_layout_rows():
  layout = hashing.published_layout((1, 14), 4, 8, 16_000_000)
  assert [layout[l]["rows"] for l in (1, 14)] == [384_006_168, 384_016_682]
  primes = np.concatenate([layout[l]["primes_OxG"].ravel() for l in (1, 14)])
  assert len(set(primes.tolist())) == 48 and primes.min() >= 16_000_000
  offsets = layout[14]["offsets_H"]
  assert offsets[0] == 0 and offsets[-1] + primes[-1] == 384_016_682


def test_2d_stencil_is_lookbacks_in_stencil_order():
  """Stencil entry k plays lookback k: on a 1-row grid with stencil (0,-1),(0,-2),..
  cell t's hash is the 1D hash of the tokens shifted right by one (pad first)."""
  spec = _spec(pad=3)
  cells = np.random.default_rng(4).integers(0, 5000, size=(2, 50)).astype(np.int32)
  stencil = ((0, -1), (0, -2), (0, -3), (0, -4))
  shifted = np.concatenate([np.full((2, 1), spec.pad_id, np.int32), cells[:, :-1]], axis=1)
  want = reference_ids(shifted, spec.table_sizes_LxOxG, spec.published_multipliers_LxN,
                       spec.pad_id)
  host = spatial_hashing.spatial_hash_ids(cells, spec, 1, 50, stencil)
  dev = jax.jit(lambda c: spatial_hashing.spatial_hash_ids(c, spec, 1, 50, stencil))(cells)
  np.testing.assert_array_equal(host, want)
  np.testing.assert_array_equal(np.asarray(dev), want)


def test_lm_with_published_hash_decodes_like_the_full_forward():
  """In-graph hashing, host hash ids and the decode state all use the published hash."""
  import flax.linen as nn
  from engram_jax.models.lm import EngramLM
  from tests.conftest import tiny_model_config, with_random_conv
  cfg = tiny_model_config(hash="published", compressed_vocab_size=97, pad_id=2)
  rng = np.random.default_rng(5)
  seq = rng.integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
  model = EngramLM(cfg)
  params = with_random_conv(nn.unbox(jax.jit(model.init)(jax.random.key(0), seq))["params"], cfg)
  apply = jax.jit(lambda p, x, ids: model.apply({"params": p}, x, hash_ids_BxTxLxH=ids))
  full = np.asarray(apply(params, seq, None))
  host_ids = hashing.ngram_hash_ids(seq, cfg.engram.hash_spec())
  np.testing.assert_array_equal(host_ids, reference_ids(
      seq, cfg.engram.hash_spec().table_sizes_LxOxG,
      cfg.engram.hash_spec().published_multipliers_LxN, 2))
  np.testing.assert_allclose(np.asarray(apply(params, seq, host_ids)), full,
                             rtol=1e-6, atol=1e-6)
  assert_cached_equals_full(model, params, seq, np.array([5, 8], np.int32), full, 8, 10)


# ----------------------------------------------------------------------------------
# Compressed vocabulary (published rule)
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
  from engram_jax import tokenizer as tok_lib
  root = tmp_path_factory.mktemp("tok")
  corpus = root / "corpus.txt"
  corpus.write_text("Hello hello HÉLLO héllo naïve NAÏVE Straße strasse\t\n  x  \n" * 20,
                    encoding="utf-8")
  tok_lib.train_bpe([str(corpus)], 300, str(root / "tokenizer.json"))
  return root


def test_published_vocab_normalises_as_the_reference_beyond_latin():
  """The published rule merges tokens as the reference's `tokenizers` normaliser does,
  also where a standard-library transcription of it does not (our own rule)."""
  from tokenizers import Tokenizer, models
  tokens = ["ΟΣ", "οσ", "ος", "का", "क", "\x1c", " \x1c", "[UNK]"]
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
  got = compressed_vocab.published_compressed_vocab(tok)
  assert got[0] == got[1] != got[2]  # per-character lower case: no final sigma
  assert got[3] == got[4]  # the vowel sign (a spacing mark, Mc) is stripped
  assert got[5] == got[6]  # U+001C is not White_Space: only the space is stripped
  assert len(set(got.tolist())) == 5
  ours = compressed_vocab.compressed_vocab_from_tokenizer(tok)
  assert ours[0] == ours[2] and ours[3] != ours[4]  # our rule, kept for its runs


def test_published_vocab_equals_a_plain_transcription(small_tokenizer_dir):
  from tokenizers import Regex, Tokenizer, normalizers
  tok = Tokenizer.from_file(str(small_tokenizer_dir / "tokenizer.json"))
  sentinel = "\uE000"
  norm = normalizers.Sequence([
      normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
      normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), sentinel), normalizers.Strip(),
      normalizers.Replace(sentinel, " ")])
  keys, want = {}, []
  for i in range(tok.get_vocab_size(with_added_tokens=True)):
    text = tok.decode([i], skip_special_tokens=False)
    if "\ufffd" in text:
      key = tok.id_to_token(i)
    else:
      key = norm.normalize_str(text) or text
    want.append(keys.setdefault(key, len(keys)))
  got = compressed_vocab.published_compressed_vocab(tok, expected_size=len(keys))
  np.testing.assert_array_equal(got, want)
  assert len(keys) < tok.get_vocab_size()  # something merged
  with pytest.raises(ValueError, match=f"has {len(keys)} entries but 99092 were declared"):
    compressed_vocab.published_compressed_vocab(tok, expected_size=99092)


def test_masked_prompt_decodes_like_the_masked_full_forward():
  """Non-text prompt spans: cached decoding (marks carried in the n-gram history, output
  mask in prefill) equals the full forward with the same marks and mask."""
  import flax.linen as nn
  from engram_jax.models.lm import EngramLM
  from tests.conftest import tiny_model_config, with_random_conv
  cfg = tiny_model_config(hash="published", compressed_vocab_size=97, pad_id=2)
  rng = np.random.default_rng(6)
  seq = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
  model = EngramLM(cfg)
  params = with_random_conv(nn.unbox(jax.jit(model.init)(jax.random.key(0), seq))["params"], cfg)
  lengths = np.array([6, 8], np.int32)
  masked = np.zeros((2, 16), bool)
  masked[0, 2:4] = masked[1, 6] = True  # inside each prompt
  full = jax.jit(lambda p, x, m: model.apply(
      {"params": p}, x, ngram_tokens_BxT=hashing.mark_dead(x, m), masked_BxT=m))(
          params, seq, masked)
  assert_cached_equals_full(model, params, seq, lengths, full, 8, 8, None, masked[:, :8])
