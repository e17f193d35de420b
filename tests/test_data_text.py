"""Text pipeline: splits, packing, resume, process shards, host hashing, tfds, errors."""
import dataclasses
import json
import os
import random
import string

import numpy as np
import pytest
import tokenizers

from engram_jax import compressed_vocab, hashing
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.data import text

from tests.conftest import same_batches, take

SPEC = hashing.make_hash_spec((1, 3), 3, 2, (61, 67), 5)


def _rows_of(batch):
  """The packed rows `[b, T+1]` a batch was cut from."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)




def _stream_rows(cfg, tok, split, cache_dir):
  stream = np.asarray(text.token_stream(cfg, tok, split, cache_dir))
  row_len = cfg.seq_len + 1
  return stream[:len(stream) // row_len * row_len].reshape(-1, row_len)


# ----------------------------------------------------------------------------------
# Fixtures: a slice of the standard library, and a small corpus of unique lines
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="module")
def stdlib_cfg():
  return text.TextDataConfig(max_files=6, seq_len=16, batch_size=4, vocab_size=300)


@pytest.fixture(scope="module")
def stdlib_tok(stdlib_cfg, tmp_path_factory):
  return text.build_tokenizer(stdlib_cfg, str(tmp_path_factory.mktemp("stdlib_run")))


@pytest.fixture(scope="module")
def files_cfg(tmp_path_factory):
  """12 files of random words: every packed row of the corpus is distinct."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for i in range(12):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(exist_ok=True)
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))
             for _ in range(120))
    (sub / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
  return text.TextDataConfig(source="files", files_glob=str(root / "**" / "*.txt"),
                             val_fraction=0.2, seq_len=8, batch_size=4,
                             vocab_size=300)


@pytest.fixture(scope="module")
def files_tok(files_cfg, tmp_path_factory):
  return text.build_tokenizer(files_cfg, str(tmp_path_factory.mktemp("files_run")))


# ----------------------------------------------------------------------------------
# Corpus splits, batch format, packing
# ----------------------------------------------------------------------------------
def test_stdlib_split_is_deterministic_and_disjoint():
  cfg = text.TextDataConfig()
  train, val = text.corpus_files(cfg, "train"), text.corpus_files(cfg, "val")
  assert train == text.corpus_files(cfg, "train") and val == text.corpus_files(cfg, "val")
  assert not set(train) & set(val)
  assert 0 < len(val) < 0.1 * len(train)
  assert all(f.endswith(".py") for f in train + val)
  assert not any({"site-packages", "test", "tests"} & set(f.split(os.sep))
                 for f in train + val)
  small = text.corpus_files(dataclasses.replace(cfg, max_files=5), "train")
  assert len(small) == 5 and set(small) <= set(train)


def test_batches_are_shifted_rows_of_the_packed_stream(stdlib_cfg, stdlib_tok, cache_dir):
  it = text.train_iterator(stdlib_cfg, stdlib_tok, cache_dir=cache_dir)
  rows = {r.tobytes() for r in _stream_rows(stdlib_cfg, stdlib_tok, "train", cache_dir)}
  for batch in take(it, 3):
    assert set(batch) == {"inputs", "targets"}
    for v in batch.values():
      assert v.shape == (4, 16) and v.dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert all(r.tobytes() in rows for r in _rows_of(batch))
  eos = tokenizer_lib.eos_id(stdlib_tok)
  stream = np.asarray(text.token_stream(stdlib_cfg, stdlib_tok, "train", cache_dir))
  assert (stream == eos).sum() == len(text.corpus_files(stdlib_cfg, "train"))


def test_eval_batches_are_the_leading_val_rows_every_time(stdlib_cfg, stdlib_tok,
                                                          cache_dir):
  kw = dict(max_batches=3, cache_dir=cache_dir)
  ev = text.eval_batches(stdlib_cfg, stdlib_tok, **kw)
  first = list(ev)
  assert len(ev) == len(first) == 3
  assert same_batches(first, list(ev))
  assert same_batches(first, list(text.eval_batches(stdlib_cfg, stdlib_tok, **kw)))
  rows = _stream_rows(stdlib_cfg, stdlib_tok, "val", cache_dir)
  np.testing.assert_array_equal(np.concatenate([_rows_of(b) for b in first]), rows[:12])
  # Two processes split every global batch between them, in order.
  halves = [list(text.eval_batches(stdlib_cfg, stdlib_tok, process_index=p,
                                   process_count=2, **kw)) for p in range(2)]
  for j, batch in enumerate(first):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][j]["inputs"], halves[1][j]["inputs"]]), batch["inputs"])


# ----------------------------------------------------------------------------------
# Determinism, resume, epochs, shards
# ----------------------------------------------------------------------------------
def test_resume_gives_the_same_following_batches(files_cfg, files_tok, cache_dir):
  it = text.train_iterator(files_cfg, files_tok, cache_dir=cache_dir)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  following = take(it, 5)
  fresh = text.train_iterator(files_cfg, files_tok, cache_dir=cache_dir)
  fresh.set_state(state)
  assert same_batches(take(fresh, 5), following)
  it.set_state(state)  # rewinding an iterator in use works too
  assert same_batches(take(it, 5), following)


def test_seed_decides_the_order(files_cfg, files_tok, cache_dir):
  def first(seed):
    cfg = dataclasses.replace(files_cfg, seed=seed)
    return take(text.train_iterator(cfg, files_tok, cache_dir=cache_dir), 4)
  assert same_batches(first(0), first(0))
  assert not same_batches(first(0), first(1))


def test_every_epoch_is_a_new_permutation_of_all_rows(files_cfg, files_tok, cache_dir):
  rows = _stream_rows(files_cfg, files_tok, "train", cache_dir)
  it = text.train_iterator(files_cfg, files_tok, cache_dir=cache_dir)
  seen = np.concatenate([_rows_of(b) for b in take(it, 2 * len(rows) // 4 + 1)])
  epoch0, epoch1 = seen[:len(rows)], seen[len(rows):2 * len(rows)]
  key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
  assert key(epoch0) == key(epoch1) == key(rows)
  assert not np.array_equal(epoch0, epoch1)


def test_processes_read_disjoint_halves(files_cfg, files_tok, cache_dir):
  rows = _stream_rows(files_cfg, files_tok, "train", cache_dir)
  half = len(rows) // 2
  shards = []
  for p in range(2):
    it = text.train_iterator(files_cfg, files_tok, process_index=p, process_count=2,
                             cache_dir=cache_dir)
    batches = take(it, -(-half // 2))
    assert batches[0]["inputs"].shape == (2, 8)  # batch_size 4 over 2 processes
    epoch = np.concatenate([_rows_of(b) for b in batches])[:half]
    shards.append({r.tobytes() for r in epoch})
  assert len(shards[0]) == len(shards[1]) == half
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == {r.tobytes() for r in rows[:2 * half]}


def test_worker_processes_give_the_same_batches(files_cfg, files_tok, cache_dir):
  in_process = text.train_iterator(files_cfg, files_tok, cache_dir=cache_dir)
  expected = take(in_process, 6)
  cfg = dataclasses.replace(files_cfg, worker_count=1)
  with text.train_iterator(cfg, files_tok, cache_dir=cache_dir) as workers:
    assert same_batches(take(workers, 4), expected[:4])
    state = workers.get_state()
  in_process.set_state(state)  # a local-corpus state does not depend on worker_count
  assert same_batches(take(in_process, 2), expected[4:])


# ----------------------------------------------------------------------------------
# Host-side n-gram features
# ----------------------------------------------------------------------------------
def test_host_hashing_matches_hashing_module(stdlib_cfg, stdlib_tok, cache_dir):
  vocab = compressed_vocab.compressed_vocab_from_tokenizer(stdlib_tok)
  kw = dict(compressed_vocab=vocab, hash_spec=SPEC, cache_dir=cache_dir)
  train = take(text.train_iterator(stdlib_cfg, stdlib_tok, **kw), 2)
  evals = list(text.eval_batches(stdlib_cfg, stdlib_tok, max_batches=2, **kw))
  for batch in train + evals:
    np.testing.assert_array_equal(batch["ngram_tokens"], vocab[batch["inputs"]])
    ids = batch["hash_ids"]
    assert ids.dtype == np.int32 and ids.shape == (4, 16, 2, SPEC.num_heads_total)
    expected = hashing.ngram_hash_ids(batch["ngram_tokens"], SPEC)
    np.testing.assert_array_equal(ids, expected)
  with pytest.raises(ValueError, match="compressed_vocab"):
    text.train_iterator(stdlib_cfg, stdlib_tok, compressed_vocab=vocab[:10])


# ----------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------
def test_tokenizer_eos_and_exact_byte_lengths(stdlib_tok):
  assert tokenizer_lib.eos_id(stdlib_tok) == 0
  lengths = tokenizer_lib.token_byte_lengths(stdlib_tok)
  assert lengths.dtype == np.int32 and lengths[0] == 0
  assert len(lengths) == stdlib_tok.get_vocab_size()
  sample = "déjà vu — 日本語 🙂\n    return x\n"
  ids = stdlib_tok.encode(sample).ids
  assert stdlib_tok.decode(ids) == sample
  assert lengths[ids].sum() == len(sample.encode("utf-8"))


def test_tokenizer_file_is_copied_reused_and_guarded(stdlib_tok, files_tok, tmp_path):
  given = str(tmp_path / "given.json")
  stdlib_tok.save(given)
  run = str(tmp_path / "run")
  tok = tokenizer_lib.load_or_train(run, [], 300, tokenizer_path=given)
  assert tok.to_str() == stdlib_tok.to_str()
  assert os.path.exists(os.path.join(run, "tokenizer.json"))
  assert tokenizer_lib.load_or_train(run, [], 300).to_str() == tok.to_str()  # reused
  other = str(tmp_path / "other.json")
  files_tok.save(other)
  with pytest.raises(ValueError, match="differs from the tokenizer this workdir"):
    tokenizer_lib.load_or_train(run, [], 300, tokenizer_path=other)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    tokenizer_lib.load_tokenizer(str(bad))
  with pytest.raises(ValueError, match="data.vocab_size"):
    tokenizer_lib.train_bpe([given], 100, str(tmp_path / "t.json"))


# ----------------------------------------------------------------------------------
# Errors name the field and the fix
# ----------------------------------------------------------------------------------
def test_errors_name_the_field(files_cfg, files_tok, cache_dir, tmp_path):
  with pytest.raises(ValueError, match="data.files_glob=.*matches no files"):
    text.corpus_files(dataclasses.replace(files_cfg, files_glob=str(tmp_path / "*.none")),
                      "train")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="data.files_glob=.*only empty files"):
    text.corpus_files(dataclasses.replace(files_cfg, files_glob=str(tmp_path / "*.txt")),
                      "train")
  (tmp_path / "blank.txt").write_text(" \n\n ")
  blank_cfg = dataclasses.replace(files_cfg, files_glob=str(tmp_path / "blank.txt"))
  words_only = tokenizers.Tokenizer(  # drops whitespace, as word-level tokenizers do
      tokenizers.models.WordLevel({"<|eos|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
  words_only.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  with pytest.raises(ValueError, match="data.files_glob.*no tokens"):
    text.train_iterator(blank_cfg, words_only, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="data.batch_size=4 is not divisible"):
    text.train_iterator(files_cfg, files_tok, process_count=3, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="data.seq_len/data.batch_size"):
    text.train_iterator(dataclasses.replace(files_cfg, seq_len=100_000), files_tok,
                        cache_dir=cache_dir)
  with pytest.raises(ValueError, match="data.source"):
    text.corpus_files(dataclasses.replace(files_cfg, source="web"), "train")


# ----------------------------------------------------------------------------------
# tfds: a tiny dataset written here as ArrayRecord, read through tfds.data_source
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Sentences of random words; read back by name from the data dir alone."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 300),
              "test": self._generate_examples(1, 60)}

    def _generate_examples(self, seed, count):
      rng = random.Random(seed)
      for i in range(count):
        words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6)))
                 for _ in range(rng.randint(3, 20)))
        yield i, {"text": " ".join(words)}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_trains_resumes_and_evaluates(tfds_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)  # data.tfds_data_dir left empty
  cfg = text.TextDataConfig(source="tfds", tfds_name="tiny_text", seq_len=12,
                            batch_size=4, vocab_size=300)
  tok = text.build_tokenizer(cfg, str(tmp_path))
  assert tok.get_vocab_size() > 257
  it = text.train_iterator(cfg, tok, compressed_vocab=compressed_vocab.identity_vocab(300),
                           hash_spec=SPEC)
  batch = next(it)
  assert batch["inputs"].shape == (4, 12) and batch["hash_ids"].shape == (4, 12, 2, 4)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  following = take(it, 4)
  fresh = text.train_iterator(cfg, tok, compressed_vocab=compressed_vocab.identity_vocab(300),
                              hash_spec=SPEC)
  fresh.set_state(state)
  resumed = take(fresh, 2)
  fresh.close()  # closing keeps the position
  assert same_batches(resumed + take(fresh, 2), following)
  ev = text.eval_batches(cfg, tok, max_batches=2)
  assert len(ev) == 2
  assert same_batches(list(ev), list(text.eval_batches(cfg, tok, max_batches=2)))
  shards = [next(text.train_iterator(cfg, tok, process_index=p, process_count=2))
            for p in range(2)]
  assert shards[0]["inputs"].shape == (2, 12)
  assert not np.array_equal(shards[0]["inputs"], shards[1]["inputs"])


def test_tfds_errors_name_the_field(tfds_dir, stdlib_tok):
  cfg = text.TextDataConfig(source="tfds", tfds_name="no_such_set",
                            tfds_data_dir=tfds_dir)
  with pytest.raises(ValueError, match="data.tfds_name='no_such_set'.*array_record"):
    text.eval_batches(cfg, stdlib_tok, max_batches=1)
  cfg = dataclasses.replace(cfg, tfds_name="tiny_text", text_field="body")
  with pytest.raises(ValueError, match="data.text_field='body'.*text"):
    text.eval_batches(cfg, stdlib_tok, max_batches=1)


def test_an_unprepared_tfds_folder_is_one_line_without_library_warnings(
    tfds_dir, stdlib_tok, caplog):
  """A version folder with no dataset_info.json (a build that never finished): tfds
  logged an absl warning on the console before the one-line error."""
  import tensorflow_datasets as tfds
  version = str(tfds.builder_cls("lm1b").VERSION)  # a registered set, as a user names one
  os.makedirs(os.path.join(tfds_dir, "lm1b", version))
  cfg = text.TextDataConfig(source="tfds", tfds_name="lm1b", tfds_data_dir=tfds_dir)
  with pytest.raises(ValueError, match="data.tfds_name='lm1b'.*array_record"):
    text.eval_batches(cfg, stdlib_tok, max_batches=1)
  assert not [r for r in caplog.records if r.levelno >= 30], caplog.records


def test_site_packages_source_is_real_installed_code():
  import sysconfig
  from engram_jax.data import text
  cfg = text.TextDataConfig(source="site_packages", max_files=8, val_fraction=0.02)
  train_files, val_files = text.corpus_files(cfg, "train"), text.corpus_files(cfg, "val")
  root = sysconfig.get_paths()["purelib"]
  assert len(train_files) == 8 and val_files and not set(train_files) & set(val_files)
  assert all(f.startswith(root) and f.endswith(".py") for f in train_files + val_files)
  assert "site-packages" in text.describe_corpus(cfg)


def test_compressed_vocab_is_cached_in_the_workdir(tmp_path):
  import tokenizers
  from engram_jax import tokenizer as tokenizer_lib
  tok = tokenizer_lib.train_bpe(text.corpus_files(
      text.TextDataConfig(max_files=3), "train"), 300, str(tmp_path / "tok.json"))
  assert isinstance(tok, tokenizers.Tokenizer)
  for mode in ("engram_jax", "published"):
    want = compressed_vocab.compressed_vocab_for(tok, mode)
    first = tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, mode)
    cached = list(tmp_path.glob(f"compressed_vocab-{mode}-*.npy"))
    assert len(cached) == 1 and np.array_equal(first, want)
    np.testing.assert_array_equal(
        tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, mode), want)
  with pytest.raises(ValueError, match="compressed_vocab_size"):
    tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, "published",
                                           int(want.max()) + 7)


def test_binary_files_a_glob_caught_are_named(files_cfg, tmp_path):
  """`data.files_glob` over a directory with an executable trained on its bytes as text
  with no word (90% of one corpus tried); the trainer now warns, naming them."""
  import shutil
  root = tmp_path / "mixed"
  shutil.copytree(os.path.dirname(os.path.dirname(files_cfg.files_glob)), root)
  assert text.binary_files(dataclasses.replace(
      files_cfg, files_glob=str(root / "**" / "*.txt"))) == []
  (root / "a" / "tool.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00" + bytes(100))
  (root / "a" / "late_nul.txt").write_bytes(b"x" * text.BINARY_PROBE_BYTES + b"\x00")
  cfg = dataclasses.replace(files_cfg, files_glob=str(root / "**" / "*.txt"))
  assert text.binary_files(cfg) == [str(root / "a" / "tool.txt")]
  assert text.binary_files(dataclasses.replace(cfg, source="stdlib")) == []
