"""Derived caches (token streams, compressed vocabularies): a damaged file is rebuilt
equal to the original with one warning naming it; tokenizing reports progress."""
import errno
import functools
import io
import random
import string

import numpy as np
import pytest

from engram_jax import compressed_vocab, paths, progress
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.data import text, token_cache

VOCAB = 300


@pytest.fixture(scope="module")
def files_cfg(tmp_path_factory):
  """10 files of random words."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for i in range(10):
    words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))
             for _ in range(80))
    (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
  return text.TextDataConfig(source="files", files_glob=str(root / "*.txt"),
                             val_fraction=0.2, seq_len=8, batch_size=2,
                             vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok(files_cfg, tmp_path_factory):
  return text.build_tokenizer(files_cfg, str(tmp_path_factory.mktemp("run")))


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _random_bytes(path):
  size = len(open(path, "rb").read())
  open(path, "wb").write(np.random.default_rng(0).bytes(size))


def _empty(path):
  open(path, "wb").close()


def _out_of_range(path, value=VOCAB + 5, at=3):
  """Same size, header intact: one id past the vocabulary."""
  array = np.load(path)
  array[at] = value
  with open(path, "wb") as f:
    np.save(f, array)


DAMAGES = {"truncated": _truncate, "random bytes": _random_bytes, "empty": _empty,
           "out-of-range id": _out_of_range}


def _stream_file(cfg, tok, cache_dir):
  return token_cache.stream_path(tok, text.corpus_files(cfg, "train"), cfg.source,
                                 "train", cache_dir)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_token_cache_is_rebuilt_as_it_was(files_cfg, tok, tmp_path, capsys,
                                                    damage):
  cache_dir = str(tmp_path)
  first = np.array(text.token_stream(files_cfg, tok, "train", cache_dir))
  path = _stream_file(files_cfg, tok, cache_dir)
  assert capsys.readouterr().err == ""
  DAMAGES[damage](path)
  rows = token_cache.Rows(_stream_file(files_cfg, tok, cache_dir), files_cfg.seq_len + 1)
  err = capsys.readouterr().err
  assert err.startswith(f"warning: token cache {path} is damaged (") and err.endswith(
      "); rebuilding it\n") and len(err.splitlines()) == 1, err
  np.testing.assert_array_equal(text.token_stream(files_cfg, tok, "train", cache_dir),
                                first)
  assert np.array_equal(rows[1], first[9:18])
  assert capsys.readouterr().err == ""  # rebuilt once, sound since
  assert [p.name for p in tmp_path.iterdir()] == [path.rsplit("/", 1)[-1]]  # no temp left


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "bytes where its header needs"), (_random_bytes, "not a .npy file"),
    (_empty, "empty file"), (_out_of_range, f"token id {VOCAB + 5} at position 3 is "
                                            f"outside the tokenizer's {VOCAB} ids"),
    (functools.partial(_out_of_range, value=-1, at=0), "token id -1 at position 0"),
    (functools.partial(_out_of_range, value=7, at=-1), "does not end with the end-of")])
def test_the_warning_says_what_is_wrong(files_cfg, tok, tmp_path, capsys, damage, reason):
  path = _stream_file(files_cfg, tok, str(tmp_path))
  damage(path)
  _stream_file(files_cfg, tok, str(tmp_path))
  assert reason in capsys.readouterr().err


def test_a_stream_with_fewer_documents_than_files_is_damaged(files_cfg, tok, tmp_path):
  path = _stream_file(files_cfg, tok, str(tmp_path))
  files = text.corpus_files(files_cfg, "train")
  assert token_cache._damage(path, tok, len(files)) is None
  assert token_cache._damage(path, tok, len(files) + 1) == (
      f"{len(files)} end-of-document tokens for {len(files) + 1} files")
  tokens = np.load(path)
  with open(path, "wb") as f:
    np.save(f, tokens.astype(np.int64))
  assert token_cache._damage(path, tok, len(files)) == "dtype int64, expected int32"
  with open(path, "wb") as f:
    np.save(f, tokens[:len(tokens) // 2 * 2].reshape(-1, 2))
  assert token_cache._damage(path, tok, len(files)).startswith("shape (")


def _read_only(path, write):
  raise OSError(errno.EROFS, "Read-only file system")


def test_a_damaged_cache_that_cannot_be_rebuilt_is_one_error_naming_it(
    files_cfg, tok, tmp_path, monkeypatch, capsys):
  path = _stream_file(files_cfg, tok, str(tmp_path))
  _truncate(path)
  damaged = open(path, "rb").read()
  monkeypatch.setattr(paths, "atomic_write", _read_only)
  with pytest.raises(OSError) as err:
    _stream_file(files_cfg, tok, str(tmp_path))
  message = str(err.value)
  assert message.startswith(f"token cache {path} is damaged (") and "\n" not in message
  assert "cannot be rebuilt (Read-only file system)" in message and str(tmp_path) in message
  assert open(path, "rb").read() == damaged  # left as it was
  assert capsys.readouterr().err.count("\n") == 1  # the warning only


def test_a_cache_damaged_after_the_check_is_one_error_naming_it(files_cfg, tok, tmp_path):
  path = _stream_file(files_cfg, tok, str(tmp_path))
  _empty(path)
  with pytest.raises(ValueError, match=f"^token cache {path} is damaged \\(empty file\\); "
                                       "run again to rebuild it$"):
    token_cache.Rows(path, 9)


# ----------------------------------------------------------------------------------
# Compressed vocabulary in the workdir
# ----------------------------------------------------------------------------------
def _compressed_vocab_damages():
  def wrong_numbering(path):  # well-formed, but skips an id
    vocab = np.load(path)
    vocab[vocab == vocab.max()] += 1
    with open(path, "wb") as f:
      np.save(f, vocab)

  def too_short(path):
    vocab = np.load(path)
    with open(path, "wb") as f:
      np.save(f, vocab[:-1])

  return {**DAMAGES, "out-of-range id": wrong_numbering, "too short": too_short}


@pytest.mark.parametrize("damage", _compressed_vocab_damages())
def test_a_damaged_compressed_vocab_is_recomputed(tok, tmp_path, capsys, damage):
  want = compressed_vocab.compressed_vocab_for(tok, "engram_jax")
  np.testing.assert_array_equal(
      tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, "engram_jax"), want)
  (path,) = tmp_path.glob("compressed_vocab-engram_jax-*.npy")
  _compressed_vocab_damages()[damage](str(path))
  capsys.readouterr()
  got = tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, "engram_jax")
  err = capsys.readouterr().err
  assert err.startswith(f"warning: compressed vocabulary {path} is damaged (") and (
      err.endswith("); recomputing it\n")) and len(err.splitlines()) == 1, err
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.load(path), want)  # rewritten
  tokenizer_lib.workdir_compressed_vocab(str(tmp_path), tok, "engram_jax")
  assert capsys.readouterr().err == ""


def test_npy_layout_reads_what_np_save_writes():
  buffer = io.BytesIO()
  np.save(buffer, np.arange(5, dtype=np.int32))
  shape, offset = tokenizer_lib.npy_layout(buffer, np.dtype(np.int32))
  assert shape == (5,) and offset + 20 == len(buffer.getvalue())
  buffer.seek(0, io.SEEK_END)
  buffer.write(b"x")  # one byte more than the header says
  needed = offset + 20
  with pytest.raises(ValueError, match=f"^{needed + 1} bytes where its header needs "
                                       f"{needed}$"):
    tokenizer_lib.npy_layout(buffer, np.dtype(np.int32))


# ----------------------------------------------------------------------------------
# Progress while tokenizing
# ----------------------------------------------------------------------------------
def test_bytes_progress_is_throttled_and_silent_for_quick_work():
  ticks = iter([0.0, 1.0, 6.0, 7.0, 8.0, 8.0])  # start, after three adds, the end
  out = io.StringIO()
  meter = progress.BytesProgress("tokenizing", 4, 8_000_000, stream=out,
                                 clock=lambda: next(ticks))
  for done, nbytes in [(1, 2_000_000), (2, 4_000_000), (1, 2_000_000)]:
    meter.add(done, nbytes)
  meter.finish()
  assert out.getvalue().splitlines() == [
      "tokenizing: 3/4 files, 6.0/8.0 MB (1.0 MB/s, ETA 0m02s)",
      "tokenizing: 4/4 files, 8.0/8.0 MB (1.0 MB/s, 0m08s elapsed)"]
  quick = iter([0.0, 1.0, 2.0])
  meter = progress.BytesProgress("tokenizing", 1, 10, stream=out, clock=lambda: next(quick))
  meter.add(1, 10)
  meter.finish()
  assert len(out.getvalue().splitlines()) == 2  # nothing added


def test_tokenizing_reports_files_and_bytes(files_cfg, tok, tmp_path, monkeypatch, capsys):
  _stream_file(files_cfg, tok, str(tmp_path / "quiet"))
  assert capsys.readouterr().err == ""  # a small corpus tokenizes in silence
  monkeypatch.setattr(token_cache, "ENCODE_CHUNK", 4)
  monkeypatch.setattr(progress, "BytesProgress",
                      functools.partial(progress.BytesProgress, every_s=0.0))
  _stream_file(files_cfg, tok, str(tmp_path / "loud"))
  files = text.corpus_files(files_cfg, "train")
  lines = capsys.readouterr().err.splitlines()
  total_mb = sum(len(open(f, "rb").read()) for f in files) / 1e6
  assert len(lines) == -(-len(files) // 4)  # one per chunk, the last once
  assert lines[-1].startswith(f"token cache: tokenizing files train: {len(files)}/"
                              f"{len(files)} files, {total_mb:.1f}/{total_mb:.1f} MB (")


def test_training_the_tokenizer_reports_files_and_bytes(files_cfg, monkeypatch, capsys,
                                                        tmp_path):
  """BPE training reads the corpus as it counts words: one line per file read here
  (no throttle), the last after the merges; the tokenizer is the one trained quietly."""
  files = text.corpus_files(files_cfg, "train")
  quiet = tokenizer_lib.train_bpe(files, VOCAB, str(tmp_path / "quiet.json"))
  assert capsys.readouterr().err == ""
  monkeypatch.setattr(progress, "BytesProgress",
                      functools.partial(progress.BytesProgress, every_s=0.0))
  loud = tokenizer_lib.train_bpe(files, VOCAB, str(tmp_path / "loud.json"))
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == len(files)  # files 1..n-1 as read, then the closing line
  assert lines[-1].startswith(f"tokenizer: training BPE: {len(files)}/{len(files)} files")
  assert loud.to_str() == quiet.to_str()
