"""The token cache: a local corpus split, tokenized once, read as rows by random access.

A split's files become one flat int32 stream (every document followed by EOS) saved as
`.npy` under a key of the tokenizer and of every file's path, size and mtime: a later
run (or another process) with the same inputs maps the file instead of tokenizing
again, and any change makes a new file. `Rows` cuts the mapped stream into rows of
`seq_len + 1` tokens for grain: random access over rows is what makes shuffling,
per-process sharding and exact resume cheap (data/text.py).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np
import tokenizers

from engram_jax import paths
from engram_jax import tokenizer as tokenizer_lib

_CACHE_VERSION = 1
ENCODE_CHUNK = 64          # documents per `encode_batch` call


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


def _tokenize_files(tok: tokenizers.Tokenizer, files: Sequence[str]) -> np.ndarray:
  encoder, eos = plain_encoder(tok), tokenizer_lib.eos_id(tok)
  chunks = [encode_texts(encoder, [tokenizer_lib.read_text(f) for f in
                                   files[i:i + ENCODE_CHUNK]], eos)
            for i in range(0, len(files), ENCODE_CHUNK)]
  return np.concatenate(chunks) if chunks else np.zeros(0, np.int32)


def stream_path(tok: tokenizers.Tokenizer, files: Sequence[str], source: str, split: str,
                cache_dir: str | None) -> str:
  """The `.npy` token stream of a split's `files`, tokenized on the first call only.
  `cache_dir` must be local: the stream is memory-mapped."""
  cache_dir = cache_dir or default_cache_dir()
  if not paths.is_local(cache_dir):
    raise ValueError(f"token cache {cache_dir!r}: the cached token stream is "
                     "memory-mapped and needs a local directory")
  name = f"{source}-{split}-{_cache_key(tok, files)}.npy"
  path = os.path.join(cache_dir, name)
  if os.path.exists(path):
    return path
  tokens = _tokenize_files(tok, files)
  if not (tokens != tokenizer_lib.eos_id(tok)).any():
    raise ValueError(
        f"data.files_glob: the {split} split ({len(files)} files) tokenizes to no "
        f"tokens; point data.source/data.files_glob at files with text.")

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.save(f, tokens)

  paths.atomic_write(path, write)
  return path


class Rows:
  """Row i of a cached token stream: tokens [i*(T+1), (i+1)*(T+1)).

  A grain random-access source. It pickles as just the path, so worker processes map
  the file themselves. The map is opened at construction (and unpickling), never
  lazily in `__getitem__`: grain calls that from several threads, and `np.load`
  parses the header with `ast`, which is not thread-safe in CPython 3.11 ("SystemError:
  AST constructor recursion depth mismatch").
  """

  def __init__(self, path: str, row_len: int):
    self._path, self._row_len = path, row_len
    self._tokens = np.load(path, mmap_mode="r")

  def __len__(self) -> int:
    return len(self._tokens) // self._row_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self._row_len
    return np.array(self._tokens[start:start + self._row_len], np.int32)

  def __getstate__(self) -> dict[str, Any]:
    return {"path": self._path, "row_len": self._row_len}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["path"], state["row_len"])
