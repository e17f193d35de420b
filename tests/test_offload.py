"""Host-offloaded Engram tables: the device params hold no table, and generation,
teacher-forced and full-forward logits equal those of on-device tables."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from engram_jax.sampling import text as generate
from engram_jax import host_tables
from engram_jax.sampling import offload
from engram_jax.layers.engram import ROWS_COLLECTION
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config, with_random_conv

CFG = tiny_model_config()  # Engram at layers 1 and 3 of 4


@pytest.fixture(scope="module")
def setup():
  model = EngramLM(CFG)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, CFG.vocab_size, (3, 10)).astype(np.int32)
  lengths = np.array([4, 10, 7], np.int32)
  params = with_random_conv(nn.unbox(model.init(jax.random.key(0), prompt))["params"], CFG)
  # a many-to-one compressed vocabulary, so host and device both apply the map
  vocab_map = (np.arange(CFG.vocab_size) // 3).astype(np.int32)
  device_params, tables = host_tables.split_params(params, CFG)
  return model, params, device_params, tables, prompt, lengths, vocab_map


def _paths(tree):
  return ["/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_device_params_hold_no_table(setup):
  _, params, device_params, tables, *_ = setup
  assert not [p for p in _paths(device_params) if p.endswith("table")]
  table_paths = [p for p in _paths(params) if p.endswith("table")]
  assert table_paths == ["block_1/engram/table", "block_3/engram/table"]
  assert sorted(_paths(device_params)) == sorted(set(_paths(params)) - set(table_paths))
  assert all(type(t) is np.ndarray for t in tables.tables_L)
  for layer, table in zip(CFG.engram.layers, tables.tables_L):
    np.testing.assert_array_equal(table, np.asarray(params[f"block_{layer}"]["engram"]["table"]))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  assert nbytes(device_params) == nbytes(params) - tables.nbytes


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled", "top_k_top_p"])
def test_generation_equals_on_device_tables(setup, sampling):
  model, params, device_params, tables, prompt, lengths, vocab_map = setup
  run = jax.jit(generate.generate, static_argnums=0,
                static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
  want = run(model, params, prompt, lengths, jax.random.key(7), max_new_tokens=16,
             vocab_map_V=vocab_map, **sampling)
  got = offload.generate(model, device_params, tables, prompt, lengths, jax.random.key(7),
                         max_new_tokens=16, vocab_map_V=vocab_map, **sampling)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_teacher_forced_and_full_forward_logits_equal(setup):
  model, params, device_params, tables, prompt, lengths, vocab_map = setup
  forced = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 8)).astype(np.int32)
  want = generate.teacher_forced_logits(model, params, prompt, lengths, forced,
                                        jax.numpy.asarray(vocab_map))
  got = offload.teacher_forced_logits(model, device_params, tables, prompt, lengths, forced,
                                      vocab_map)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  full = model.apply({"params": params}, prompt, ngram_tokens_BxT=vocab_map[prompt])
  got_full = offload.logits(model, device_params, tables, prompt, vocab_map)
  np.testing.assert_allclose(np.asarray(got_full), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_prefetcher_gives_each_batch_its_rows(setup):
  model, params, device_params, tables, _, _, vocab_map = setup
  rng = np.random.default_rng(2)
  batches = [rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32) for _ in range(4)]
  apply = jax.jit(lambda v, x, ids: model.apply(v, x, hash_ids_BxTxLxH=ids))
  prefetcher = offload.RowPrefetcher(tables, batches, vocab_map, depth=2)
  seen = 0
  for (tokens, ids, rows), batch in zip(prefetcher, batches):
    np.testing.assert_array_equal(np.asarray(tokens), batch)
    got = apply({"params": device_params, ROWS_COLLECTION: rows}, tokens, ids)
    want = model.apply({"params": params}, batch, ngram_tokens_BxT=vocab_map[batch])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    seen += 1
  assert seen == len(batches)
  with pytest.raises(StopIteration):
    next(prefetcher)
  prefetcher.close()

  def broken():
    yield batches[0]
    raise OSError("disk gone")
  failing = offload.RowPrefetcher(tables, broken(), vocab_map)
  next(failing)
  with pytest.raises(OSError, match="disk gone"):
    next(failing)
  failing.close()


def test_errors_name_what_to_fix(setup):
  model, params, device_params, tables, *_ = setup
  with pytest.raises(ValueError, match="block_1/engram/table"):
    host_tables.split_params(device_params, CFG)
  with pytest.raises(ValueError, match="block_3/engram"):
    host_tables.HostTables(CFG, [tables.tables_L[0], tables.tables_L[1][:, :4]])
  with pytest.raises(ValueError, match="model.max_len=48"):
    offload.generate(model, device_params, tables, np.zeros((1, 40), np.int32),
                     np.array([40], np.int32), jax.random.key(0), max_new_tokens=9)


def test_load_with_host_tables_restores_them_into_host_memory(trained_workdir):
  from engram_jax import workdir
  host = workdir.load(trained_workdir, tables="host")
  model, device_params, tables, tok, vocab_map, step = (
      host.model, host.params, host.tables, host.tokenizer, host.vocab_map, host.step)
  ref = workdir.load(trained_workdir)
  ref_model, params, ref_vocab, ref_step = ref.model, ref.params, ref.vocab_map, ref.step
  assert step == ref_step == 3 and not [p for p in _paths(device_params) if "table" in p]
  for layer, table in zip(model.cfg.engram.layers, tables.tables_L):
    np.testing.assert_array_equal(table, np.asarray(params[f"block_{layer}"]["engram"]["table"]))
  ids = tok.encode("def main():", add_special_tokens=False).ids
  prompt, lengths = np.array([ids], np.int32), np.array([len(ids)], np.int32)
  want = generate.generate(ref_model, params, prompt, lengths, jax.random.key(0),
                           max_new_tokens=8, temperature=0.0, vocab_map_V=ref_vocab)
  got = offload.generate(model, device_params, tables, prompt, lengths, jax.random.key(0),
                         max_new_tokens=8, temperature=0.0, vocab_map_V=vocab_map)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
