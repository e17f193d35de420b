"""Hugging Face `tokenizers`: byte-level BPE training, loading, and per-token facts.

A run's tokenizer lives in `workdir/tokenizer.json` so that a workdir is self-contained:
resuming, evaluating or generating from it never depends on where the tokenizer first
came from. Only the data side imports this module; the core never does. The workdir
and `data.tokenizer_path` may be local or remote (gs://, engram_jax.paths).
"""
from __future__ import annotations

import functools
import io
import json
import os
import sys
from typing import BinaryIO, Callable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from engram_jax import paths, progress

EOS_TOKEN = "<|eos|>"
# End-of-document tokens of common tokenizers, tried in order when loading one we did
# not train ourselves (GPT-2 style, SentencePiece style).
_EOS_CANDIDATES = (EOS_TOKEN, "<|endoftext|>", "</s>", "<eos>")
_BYTE_ALPHABET = 256
WORKDIR_TOKENIZER = "tokenizer.json"


def read_text(path: str) -> str:
  """A whole file as text; bytes that are not UTF-8 become U+FFFD rather than fail."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def train_bpe(files: Sequence[str], vocab_size: int,
              save_path: str) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on text files; `<|eos|>` gets id 0.

  Byte level means every byte string is encodable (no unknown token) and every token
  stands for an exact byte string, which bits-per-byte needs. Each file is one
  training text (not one per line, as `Tokenizer.train` does), so merges across
  newlines and indentation are learned as they occur when whole documents are encoded.
  """
  if vocab_size < _BYTE_ALPHABET + 1:
    raise ValueError(
        f"data.vocab_size={vocab_size} is too small: byte-level BPE needs at least "
        f"{_BYTE_ALPHABET + 1} (256 bytes + {EOS_TOKEN}); raise data.vocab_size.")
  if not files:
    raise ValueError("train_bpe: no training files; point data.files_glob (or the "
                     "tfds source) at a non-empty corpus.")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  sizes = [os.path.getsize(path) for path in files]  # a local corpus (data/corpus.py)
  meter = progress.BytesProgress("tokenizer: training BPE", len(files), sum(sizes))

  def texts():  # read as the trainer consumes them: progress while it counts words
    for path, size in zip(files, sizes):
      yield read_text(path)
      meter.add(1, size)
  tok.train_from_iterator(texts(), trainer, length=len(files))
  meter.finish()  # after the merges too: a long run's last line says when it ended
  assert tok.token_to_id(EOS_TOKEN) == 0, "special tokens come first in BpeTrainer"
  paths.atomic_write(save_path, tok.save)
  return tok


_TORN_WORKDIR_TOKENIZER = ("the run's checkpoints were trained on its token ids: "
                           "restore it from a copy (a tokenizer trained again may give "
                           "other ids)")


_NOT_A_TOKENIZER = "point it at a Hugging Face tokenizers JSON file."


def load_tokenizer(path: str, field: str = "data.tokenizer_path",
                   fix: str = _NOT_A_TOKENIZER) -> tokenizers.Tokenizer:
  """Loads a `tokenizers` JSON file (local or remote); anything unreadable is a
  one-line ValueError naming `field` and ending with `fix`."""
  try:
    if paths.is_local(path):
      return tokenizers.Tokenizer.from_file(path)
    return tokenizers.Tokenizer.from_str(paths.read_text(path))
  except Exception as err:  # tokenizers raises its own untyped Exception
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise ValueError(f"{field}: cannot load tokenizer {path!r} ({reason}); {fix}") from None


def workdir_tokenizer(workdir: str) -> tokenizers.Tokenizer:
  """The tokenizer a run keeps in its workdir (`WORKDIR_TOKENIZER`)."""
  return load_tokenizer(paths.join(workdir, WORKDIR_TOKENIZER), f"--workdir={workdir!r}",
                        _TORN_WORKDIR_TOKENIZER)


def _same_tokenizer(a: tokenizers.Tokenizer, b: tokenizers.Tokenizer) -> bool:
  return json.loads(a.to_str()) == json.loads(b.to_str())


def load_or_train(workdir: str, files: Sequence[str] | Callable[[], Sequence[str]],
                  vocab_size: int,
                  tokenizer_path: str | None = None) -> tokenizers.Tokenizer:
  """The run's tokenizer, kept in `workdir/tokenizer.json`.

  Given `tokenizer_path`: load it, and copy it into the workdir on first use; if the
  workdir already holds a different one (resuming with another tokenizer) refuse.
  Otherwise reuse the workdir's tokenizer, or train one on `files` (a list, or a
  callable returning one so that a costly corpus is only built when needed).
  """
  local = paths.join(workdir, WORKDIR_TOKENIZER)
  if tokenizer_path:
    tok = load_tokenizer(tokenizer_path)
    if paths.exists(local):
      if not _same_tokenizer(tok, workdir_tokenizer(workdir)):
        raise ValueError(
            f"data.tokenizer_path: {tokenizer_path!r} differs from the tokenizer this "
            f"workdir was trained with ({local}); resume with that tokenizer (leave "
            f"data.tokenizer_path empty) or use a new workdir.")
    else:
      paths.atomic_write(local, tok.save)
    return tok
  if paths.exists(local):
    return workdir_tokenizer(workdir)
  return train_bpe(files() if callable(files) else files, vocab_size, local)


def eos_id(tok: tokenizers.Tokenizer) -> int:
  """Id of the end-of-document token appended after every document."""
  for token in _EOS_CANDIDATES:
    token_id = tok.token_to_id(token)
    if token_id is not None:
      return int(token_id)
  raise ValueError(
      f"data.tokenizer_path: the tokenizer has none of the end-of-document tokens "
      f"{list(_EOS_CANDIDATES)}; add one as a special token.")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode: byte-level character -> the byte it encodes.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards
  in byte order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars = dict(zip(printable, printable))
  shifted = [b for b in range(_BYTE_ALPHABET) if b not in chars]
  chars.update({b: _BYTE_ALPHABET + i for i, b in enumerate(shifted)})
  return {chr(c): b for b, c in chars.items()}


def _is_byte_level(tok: tokenizers.Tokenizer) -> bool:
  decoder = json.loads(tok.to_str()).get("decoder")
  return '"ByteLevel"' in json.dumps(decoder)


def token_byte_lengths(tok: tokenizers.Tokenizer) -> np.ndarray:
  """UTF-8 bytes each token id stands for, int32 `[vocab]`; special tokens count 0.

  For bits-per-byte. Byte-level tokens are mapped back to their bytes character by
  character, which is exact even for tokens holding part of a multi-byte character
  (where decoding the token alone would give U+FFFD). Other tokenizers fall back to
  the UTF-8 length of the decoded token, an approximation.
  """
  vocab = tok.get_vocab_size(with_added_tokens=True)
  added = tok.get_added_tokens_decoder()
  byte_level = _is_byte_level(tok)
  inverse = _byte_decoder()
  lengths = np.zeros(vocab, dtype=np.int32)
  for token_id in range(vocab):
    token = tok.id_to_token(token_id)
    if token is None or (token_id in added and added[token_id].special):
      continue
    if token_id in added:  # plain added tokens are stored as raw text
      lengths[token_id] = len(token.encode("utf-8"))
    elif byte_level:
      lengths[token_id] = sum(1 if ch in inverse else len(ch.encode("utf-8"))
                              for ch in token)
    else:
      lengths[token_id] = len(tok.decode([token_id]).encode("utf-8"))
  return lengths


def npy_layout(f: BinaryIO, dtype: np.dtype) -> tuple[tuple[int, ...], int]:
  """The shape and data offset of the C-order `dtype` `.npy` file open in `f`.

  For the files derived from a tokenizer (compressed vocabularies, token caches),
  which are rebuilt when damaged: any flaw `np.load` would hit later (or, for a
  memory map, never notice) is a ValueError with a short reason, checked from the
  header and the file size without reading the data.
  """
  size = f.seek(0, io.SEEK_END)
  f.seek(0)
  if not size:
    raise ValueError("empty file")
  try:
    version = np.lib.format.read_magic(f)
  except ValueError:
    raise ValueError("not a .npy file") from None
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  if version not in readers:
    raise ValueError(f"unknown .npy version {version}")
  try:
    shape, fortran_order, found = readers[version](f)
  except ValueError:
    raise ValueError("unreadable .npy header") from None
  if found != np.dtype(dtype):
    raise ValueError(f"dtype {found}, expected {np.dtype(dtype)}")
  if fortran_order and len(shape) > 1:
    raise ValueError("Fortran order, expected C order")
  offset = f.tell()
  needed = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
  if size != needed:
    raise ValueError(f"{size} bytes where its header needs {needed}")
  return tuple(shape), offset


def _compressed_vocab_damage(vocab: np.ndarray, vocab_size: int) -> str | None:
  """Why a cached map cannot be what `compressed_vocab_from_texts` made for a
  `vocab_size` tokenizer (ids dense, numbered in order of first use), or None."""
  if vocab.shape != (vocab_size,):
    return f"shape {vocab.shape}, expected ({vocab_size},) for the tokenizer"
  if not vocab_size:
    return None
  seen_max = np.maximum.accumulate(vocab)
  if vocab[0] != 0 or vocab.min() < 0 or (vocab[1:] > seen_max[:-1] + 1).any():
    return "ids not numbered 0, 1, 2, ... in order of first use"
  return None


def _read_compressed_vocab(path: str, vocab_size: int) -> np.ndarray:
  data = paths.read_bytes(path)
  shape, offset = npy_layout(io.BytesIO(data), np.dtype(np.int32))
  vocab = np.frombuffer(data, np.int32, int(np.prod(shape)), offset).reshape(shape)
  reason = _compressed_vocab_damage(vocab, vocab_size)
  if reason:
    raise ValueError(reason)
  return vocab.copy()


def workdir_compressed_vocab(workdir: str, tok: tokenizers.Tokenizer, mode: str,
                             expected_size: int = 0) -> np.ndarray:
  """`compressed_vocab.compressed_vocab_for` of the run's tokenizer, cached in the workdir.

  Normalising every token of a 129k vocabulary takes seconds; training, generation and
  offloaded generation all read the same map, so it is computed once per (tokenizer,
  hash mode) and kept as `WORKDIR/compressed_vocab-MODE-KEY.npy`, KEY a hash of the
  tokenizer. Being derived, a damaged file is recomputed (with a warning), not an
  error. A declared size is checked on every read, not only the first.
  """
  import hashlib

  from engram_jax import compressed_vocab
  key = hashlib.blake2b(tok.to_str().encode("utf-8"), digest_size=8).hexdigest()
  path = paths.join(workdir, f"compressed_vocab-{mode}-{key}.npy")
  if paths.exists(path):
    try:
      vocab = _read_compressed_vocab(path, tok.get_vocab_size(with_added_tokens=True))
    except ValueError as err:
      print(f"warning: compressed vocabulary {path} is damaged ({err}); recomputing it",
            file=sys.stderr, flush=True)
    else:
      size = int(vocab.max()) + 1 if vocab.size else 0
      if expected_size and size != int(expected_size):
        raise ValueError(f"compressed vocabulary has {size} entries but "
                         f"{int(expected_size)} were declared "
                         "(engram.compressed_vocab_size): wrong tokenizer?")
      return vocab
  vocab = compressed_vocab.compressed_vocab_for(tok, mode, expected_size or None)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.save(f, vocab)
  try:
    paths.atomic_write(path, write)
  except OSError:  # a read-only workdir (inference): computed, just not cached
    pass
  return vocab
