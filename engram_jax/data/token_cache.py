"""The token cache: a local corpus split, tokenized once, read as rows by random access.

A split's files become one flat int32 stream (every document followed by EOS) saved as
`.npy` under a key of the tokenizer and of every file's path, size and mtime: a later
run (or another process) with the same inputs maps the file instead of tokenizing
again, and any change makes a new file. A cached file is checked before use (header,
dtype, size, every id in the vocabulary) and a damaged one is tokenized again. `Rows`
cuts the mapped stream into rows of `seq_len + 1` tokens for grain: random access over
rows is what makes shuffling, per-process sharding and exact resume cheap
(data/text.py).
"""
from __future__ import annotations

import errno
import hashlib
import os
import sys
from typing import Any, Sequence

import numpy as np
import tokenizers

from engram_jax import paths, progress
from engram_jax import tokenizer as tokenizer_lib

_CACHE_VERSION = 1
ENCODE_CHUNK = 64          # documents per `encode_batch` call
_CHECK_CHUNK = 1 << 22     # tokens (16 MB) scanned at a time when checking a stream


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "engram_jax", "tokens")


def plain_encoder(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """The tokenizer without truncation or padding, which would silently cut documents."""
  if tok.truncation is None and tok.padding is None:
    return tok
  plain = tokenizers.Tokenizer.from_str(tok.to_str())
  plain.no_truncation()
  plain.no_padding()
  return plain


def encode_texts(tok: tokenizers.Tokenizer, texts: Sequence[str], eos: int) -> np.ndarray:
  """Token ids of documents, each followed by EOS, as one flat int32 array."""
  pieces = []
  for encoding in tok.encode_batch(list(texts), add_special_tokens=False):
    pieces += [np.asarray(encoding.ids, np.int32), np.array([eos], np.int32)]
  return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def _cache_key(tok: tokenizers.Tokenizer, files: Sequence[str]) -> str:
  """Changes when the tokenizer, the file list or any file's size/mtime changes."""
  digest = hashlib.sha256(f"v{_CACHE_VERSION}\n{tok.to_str()}".encode("utf-8"))
  for path in files:
    stat = os.stat(path)
    digest.update(f"\n{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}"
                  .encode("utf-8"))
  return digest.hexdigest()[:24]


def _tokenize_files(tok: tokenizers.Tokenizer, files: Sequence[str],
                    desc: str) -> np.ndarray:
  encoder, eos = plain_encoder(tok), tokenizer_lib.eos_id(tok)
  meter = progress.BytesProgress(desc, len(files),
                                 sum(os.path.getsize(f) for f in files))
  chunks = []
  for i in range(0, len(files), ENCODE_CHUNK):
    batch = files[i:i + ENCODE_CHUNK]
    chunks.append(encode_texts(encoder, [tokenizer_lib.read_text(f) for f in batch], eos))
    meter.add(len(batch), sum(os.path.getsize(f) for f in batch))
  meter.finish()
  return np.concatenate(chunks) if chunks else np.zeros(0, np.int32)


def _map(path: str) -> np.memmap:
  """The stream at `path`, memory-mapped after its header and size are checked (a
  ValueError with the reason otherwise)."""
  with open(path, "rb") as f:
    shape, offset = tokenizer_lib.npy_layout(f, np.dtype(np.int32))
  if len(shape) != 1:
    raise ValueError(f"shape {shape}, expected one dimension")
  if not shape[0]:
    raise ValueError("no tokens")
  return np.memmap(path, np.int32, "r", offset, shape)


def _content_damage(tokens: np.ndarray, vocab_size: int, eos: int,
                    num_files: int) -> str | None:
  """Why a mapped stream cannot be the tokenized `num_files` files, or None.

  Ids are checked against the vocabulary (one out of range would fail the model's
  embedding lookup mid-training), a chunk at a time so that memory stays flat; every
  file ends with EOS, so the stream does too and holds at least one per file.
  """
  eos_count = 0
  for start in range(0, len(tokens), _CHECK_CHUNK):
    chunk = tokens[start:start + _CHECK_CHUNK]
    bad = (chunk < 0) | (chunk >= vocab_size)
    if bad.any():
      at = int(np.argmax(bad))
      return (f"token id {int(chunk[at])} at position {start + at} is outside the "
              f"tokenizer's {vocab_size} ids")
    eos_count += int(np.count_nonzero(chunk == eos))
  if tokens[-1] != eos:
    return "it does not end with the end-of-document token"
  if eos_count < num_files:
    return f"{eos_count} end-of-document tokens for {num_files} files"
  return None


def _damage(path: str, tok: tokenizers.Tokenizer, num_files: int) -> str | None:
  """Why the cached stream at `path` is unusable, or None. Cheap enough to run on
  every use: ~10 ms for the 12 MB stdlib corpus (8 M tokens)."""
  try:
    tokens = _map(path)
  except ValueError as err:
    return str(err)
  return _content_damage(tokens, tok.get_vocab_size(with_added_tokens=True),
                         tokenizer_lib.eos_id(tok), num_files)


def stream_path(tok: tokenizers.Tokenizer, files: Sequence[str], source: str, split: str,
                cache_dir: str | None) -> str:
  """The `.npy` token stream of a split's `files`, tokenized on the first call only.

  An existing stream is checked first (`_damage`); a damaged one is tokenized again
  and replaced, with a warning: it is derived data. `cache_dir` must be local: the
  stream is memory-mapped."""
  cache_dir = cache_dir or default_cache_dir()
  if not paths.is_local(cache_dir):
    raise ValueError(f"token cache {cache_dir!r}: the cached token stream is "
                     "memory-mapped and needs a local directory")
  name = f"{source}-{split}-{_cache_key(tok, files)}.npy"
  path = os.path.join(cache_dir, name)
  damage = None
  if os.path.exists(path):
    try:
      damage = _damage(path, tok, len(files))
    except OSError as err:
      raise OSError(f"cannot read token cache {path} ({err.strerror or err}); make it "
                    "readable, or remove it to tokenize the corpus again") from None
    if damage is None:
      return path
    print(f"warning: token cache {path} is damaged ({damage}); rebuilding it",
          file=sys.stderr, flush=True)
  tokens = _tokenize_files(tok, files, f"token cache: tokenizing {source} {split}")
  if not (tokens != tokenizer_lib.eos_id(tok)).any():
    raise ValueError(
        f"data.files_glob: the {split} split ({len(files)} files) tokenizes to no "
        f"tokens; point data.source/data.files_glob at files with text.")

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.save(f, tokens)

  try:
    paths.atomic_write(path, write)
  except OSError as err:
    what = f"is damaged ({damage}) and cannot be rebuilt" if damage else "cannot be written"
    fix = ("free space on its disk" if err.errno == errno.ENOSPC else
           f"make {cache_dir} writable")
    raise OSError(f"token cache {path} {what} ({err.strerror or err}); {fix} or use "
                  "another cache directory") from None
  return path


def open_stream(path: str) -> np.memmap:
  """The cached stream at `path` (from `stream_path`), memory-mapped; a file damaged
  since then is a one-line ValueError naming it."""
  try:
    return _map(path)
  except ValueError as err:
    raise ValueError(f"token cache {path} is damaged ({err}); run again to rebuild "
                     "it") from None


class Rows:
  """Row i of a cached token stream: tokens [i*(T+1), (i+1)*(T+1)).

  A grain random-access source. It pickles as just the path, so worker processes map
  the file themselves. The map is opened at construction (and unpickling), never
  lazily in `__getitem__`: grain calls that from several threads, and reading the
  `.npy` header parses it with `ast`, which is not thread-safe in CPython 3.11
  ("SystemError: AST constructor recursion depth mismatch").
  """

  def __init__(self, path: str, row_len: int):
    self._path, self._row_len = path, row_len
    self._tokens = open_stream(path)

  def __len__(self) -> int:
    return len(self._tokens) // self._row_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self._row_len
    return np.array(self._tokens[start:start + self._row_len], np.int32)

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self._path, "row_len": self._row_len}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], state["row_len"])
