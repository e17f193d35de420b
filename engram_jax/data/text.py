"""Text batches for LM training: documents -> tokens -> packed rows -> batches (grain).

Sources (`TextDataConfig.source`):
  "stdlib": the running interpreter's standard-library `*.py` files (a real corpus on
            every machine); `site-packages`, `test`/`tests`/`idle_test` dirs skipped.
  "site_packages": the `*.py` files of the installed packages (sysconfig's purelib;
            hundreds of MB wherever this project is installed), test dirs skipped.
  "files":  local text files matching `files_glob` (recursive `**` allowed).
  "tfds":   a tfds dataset prepared as ArrayRecord, read with `tfds.data_source`.

Local corpora are split into train/val by file (a stable hash of the path relative to
the corpus root: data/corpus.py), tokenized once into a flat int32 stream (every
document followed by EOS) cached as `.npy` (data/token_cache.py), and cut into rows of
`seq_len + 1` tokens: random access over rows makes shuffling, per-process sharding
and resuming exact and cheap. tfds datasets (too large to tokenize up front) are
streamed: records are shuffled, tokenized and packed by grain's concat-then-split. The
iterators (`TrainIterator`, `EvalBatches`) are data/iterators.py's.

Every batch is a dict of int32 NumPy arrays: `inputs`, `targets` `[b, T]` (a row's
tokens shifted by one), plus `ngram_tokens` `[b, T]` (compressed ids) and `hash_ids`
`[b, T, L, H]` when asked to hash on the host. Rows are independent sequences: the
n-gram history is padding at every row start, as in the model.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import grain
import numpy as np
import tokenizers

from engram_jax import hashing
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.data import corpus as corpus_lib
from engram_jax.data import fingerprint as fingerprint_lib
from engram_jax.data import iterators, token_cache

_SOURCES = ("stdlib", "site_packages", "files", "tfds")
_SPLITS = ("train", "val")
_TOKENIZER_SAMPLE_RECORDS = 50_000  # leading tfds train records a BPE is trained on
_TOKENIZER_SAMPLE_FILES = 64
# A few batches ahead is enough for a trainer; grain's default (500) would hold
# hundreds of batches of hash ids in memory. tfds records are small: read further ahead.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_RECORD_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
  """Where text comes from and how it is cut into batches (see the module docstring)."""
  source: str = "stdlib"            # "stdlib" | "site_packages" | "files" | "tfds"
  files_glob: str = ""
  tfds_name: str = ""               # e.g. "lm1b"
  tfds_data_dir: str = ""           # default: $TFDS_DATA_DIR (gs:// works)
  tfds_train_split: str = "train"
  tfds_val_split: str = "test"
  text_field: str = "text"
  val_fraction: float = 0.02
  max_files: int = 0                # 0 = all; small values for tests/tiny runs
  seq_len: int = 128
  batch_size: int = 8               # global; per process: batch_size // process_count
  seed: int = 0
  worker_count: int = 0
  tokenizer_path: str = ""
  vocab_size: int = 1024            # BPE size when training a tokenizer


def validate(cfg: TextDataConfig) -> TextDataConfig:
  """Fails on the first bad field, naming it, before any file is read."""
  if cfg.source not in _SOURCES:
    raise ValueError(f"data.source={cfg.source!r}: use one of {list(_SOURCES)}.")
  if cfg.source == "files" and not cfg.files_glob:
    raise ValueError("data.files_glob is empty: set it to a glob of text files "
                     "(e.g. '/data/**/*.txt') when data.source='files'.")
  if cfg.source == "tfds" and not cfg.tfds_name:
    raise ValueError("data.tfds_name is empty: set it (e.g. 'lm1b') when "
                     "data.source='tfds'.")
  if not 0.0 <= cfg.val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={cfg.val_fraction}: use a value in [0, 1).")
  for name in ("seq_len", "batch_size"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"data.{name}={getattr(cfg, name)}: use a positive integer.")
  for name in ("max_files", "worker_count"):
    if getattr(cfg, name) < 0:
      raise ValueError(f"data.{name}={getattr(cfg, name)}: use 0 or more.")
  return cfg


def _check_split(split: str) -> None:
  if split not in _SPLITS:
    raise ValueError(f"split={split!r}: use one of {list(_SPLITS)}.")


# ----------------------------------------------------------------------------------
# Local corpora: file lists and their train/val split (data/corpus.py)
# ----------------------------------------------------------------------------------
def corpus_files(cfg: TextDataConfig, split: str) -> list[str]:
  """Sorted files of one split ("train" | "val") of a local source."""
  validate(cfg)
  _check_split(split)
  if cfg.source == "tfds":
    raise ValueError("data.source='tfds' has no files: corpus_files is for the "
                     "local sources ('stdlib', 'site_packages', 'files').")
  return _local_corpus(cfg).used(split, cfg.max_files)


def _local_corpus(cfg: TextDataConfig) -> corpus_lib.LocalCorpus:
  return corpus_lib.local_corpus(cfg.source, cfg.files_glob, cfg.val_fraction)


def fingerprint(cfg: TextDataConfig) -> dict:
  """What decides the train stream (see `data.fingerprint`); lists local files, so a
  glob that matches nothing fails here, before a workdir is made."""
  validate(cfg)
  fields = ["source", "seq_len", "batch_size", "seed"]
  if cfg.source == "tfds":
    return fingerprint_lib.config_fields(
        cfg, fields + ["tfds_name", "tfds_train_split", "text_field"])
  corpus = _local_corpus(cfg)
  return {**fingerprint_lib.config_fields(cfg, fields + ["val_fraction", "max_files"]),
          **fingerprint_lib.files_fingerprint(corpus.used("train", cfg.max_files),
                                              corpus.root)}


BINARY_PROBE_BYTES = 8192  # how much of each file `binary_files` reads


def binary_files(cfg: TextDataConfig) -> list[str]:
  """Files of a `files` source (both splits) holding NUL bytes near their start: an
  executable or a shared library a broad glob caught, which text never holds."""
  if cfg.source != "files":
    return []
  corpus = _local_corpus(cfg)
  found = []
  for path in corpus.used("train", cfg.max_files) + corpus.used("val", cfg.max_files):
    try:
      with open(path, "rb") as f:
        if b"\0" in f.read(BINARY_PROBE_BYTES):
          found.append(path)
    except OSError:  # unreadable now: reading it for training says so
      continue
  return found


def describe_corpus(cfg: TextDataConfig) -> str:
  """One line saying which files a local source trains on (and what caps them)."""
  if cfg.source == "tfds":
    return (f"data: tfds {cfg.tfds_name!r} split {cfg.tfds_train_split!r} "
            f"(field {cfg.text_field!r})")
  corpus = _local_corpus(cfg)
  files, train_all, val = corpus.files, corpus.train_all, corpus.val_all
  train = corpus.used("train", cfg.max_files)
  where = {"stdlib": "the standard library", "site_packages": "site-packages"}.get(
      cfg.source, repr(cfg.files_glob))
  capped = (f", capped by data.max_files={cfg.max_files} (0 = all)"
            if len(train) < len(train_all) else "")
  nbytes = sum(os.path.getsize(f) for f in train)
  return (f"data: {len(train)} train files ({nbytes / 1e6:.1f} MB) of {len(files)} "
          f"matching {where}{capped}; {len(val)} held out for validation")


# ----------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------
def _tfds_sample_files(cfg: TextDataConfig, directory: str) -> list[str]:
  """The leading train records as a few text files, for training a BPE on tfds data.

  Leading records are a fair sample: tfds shuffles examples when it prepares a
  dataset, and reading them in order is fast even from gs://.
  """
  source = _tfds_source(cfg, cfg.tfds_train_split)
  count = min(len(source), _TOKENIZER_SAMPLE_RECORDS)
  paths = []
  parts = np.array_split(np.arange(count), _TOKENIZER_SAMPLE_FILES)
  for part, records in enumerate(parts):
    if not len(records):
      continue
    path = os.path.join(directory, f"sample-{part:03d}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(_record_text(source[int(i)], cfg.text_field) for i in records))
    paths.append(path)
  return paths


def build_tokenizer(cfg: TextDataConfig, workdir: str) -> tokenizers.Tokenizer:
  """The run's tokenizer (see `tokenizer.load_or_train`); trains on the train split."""
  validate(cfg)
  path = cfg.tokenizer_path or None
  if cfg.source != "tfds":
    return tokenizer_lib.load_or_train(
        workdir, lambda: corpus_files(cfg, "train"), cfg.vocab_size, path)
  with tempfile.TemporaryDirectory() as tmp:
    return tokenizer_lib.load_or_train(
        workdir, lambda: _tfds_sample_files(cfg, tmp), cfg.vocab_size, path)


def _check_compressed_vocab(compressed_vocab, tok: tokenizers.Tokenizer):
  if compressed_vocab is None:
    return None
  vocab = np.asarray(compressed_vocab)
  size = tok.get_vocab_size(with_added_tokens=True)
  if vocab.ndim != 1 or len(vocab) < size:
    raise ValueError(
        f"compressed_vocab has shape {vocab.shape} but the tokenizer has {size} tokens; "
        f"build it with engram_jax.compressed_vocab.compressed_vocab_from_tokenizer(tokenizer).")
  return vocab.astype(np.int32)


# ----------------------------------------------------------------------------------
# Local corpora: cached token stream (data/token_cache.py)
# ----------------------------------------------------------------------------------
def _token_stream_path(cfg: TextDataConfig, tok: tokenizers.Tokenizer, split: str,
                       cache_dir: str | None) -> str:
  """Tokenizes a split once; later calls (and other processes) reuse the `.npy`."""
  files = corpus_files(cfg, split)
  if not files:
    raise ValueError(
        f"data.val_fraction={cfg.val_fraction}: the {split} split of the "
        f"{cfg.source!r} corpus has no files; raise data.val_fraction or add files.")
  return token_cache.stream_path(tok, files, cfg.source, split, cache_dir)


def token_stream(cfg: TextDataConfig, tok: tokenizers.Tokenizer, split: str,
                 cache_dir: str | None = None) -> np.ndarray:
  """A local split as one flat int32 token stream (documents + EOS), memory-mapped."""
  return token_cache.open_stream(_token_stream_path(cfg, tok, split, cache_dir))


# ----------------------------------------------------------------------------------
# tfds
# ----------------------------------------------------------------------------------
def tfds_data_dir(cfg: TextDataConfig) -> str | None:
  """`data.tfds_data_dir`, else $TFDS_DATA_DIR, else tfds' default."""
  return cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _tfds_source(cfg: TextDataConfig, split: str):
  """A random-access tfds source over ArrayRecord files; never downloads."""
  import tensorflow_datasets as tfds  # only tfds runs pay for the import

  from engram_jax import quiet
  data_dir = tfds_data_dir(cfg)
  try:
    with quiet.quiet_library_logs():  # e.g. an absl warning ahead of the error below
      return tfds.data_source(cfg.tfds_name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as err:  # tfds raises many types; all mean "not readable here"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise ValueError(
        f"data.tfds_name={cfg.tfds_name!r} split {split!r} is not readable from "
        f"data dir {data_dir or 'tfds default (~/tensorflow_datasets)'} ({reason}); "
        f"prepare it with `tfds build {cfg.tfds_name} --file_format=array_record "
        f"--data_dir=DIR` and set data.tfds_data_dir or TFDS_DATA_DIR.") from err


def _record_text(record: Any, field: str) -> str:
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"data.text_field={field!r} is not in the tfds records ({keys}); "
                     f"set data.text_field to the text feature.")
  text = record[field]
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


class _EncodeRecord:
  """tfds record -> {'tokens': its token ids + EOS}."""

  def __init__(self, tok: tokenizers.Tokenizer, field: str):
    self._tok, self._field = token_cache.plain_encoder(tok), field
    self._eos = tokenizer_lib.eos_id(tok)

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    ids = self._tok.encode(_record_text(record, self._field),
                           add_special_tokens=False).ids
    return {"tokens": np.asarray([*ids, self._eos], np.int32)}


def _packed_tokens(packed: dict[str, np.ndarray]) -> np.ndarray:
  return packed["tokens"]


def _tfds_prefix(cfg: TextDataConfig, tok: tokenizers.Tokenizer, split: str,
                 num_tokens: int) -> np.ndarray:
  """The first `num_tokens` of a split's token stream, reading records in order."""
  source = _tfds_source(cfg, split)
  encoder, eos = token_cache.plain_encoder(tok), tokenizer_lib.eos_id(tok)
  pieces, total, start = [], 0, 0
  while total < num_tokens and start < len(source):
    stop = min(start + token_cache.ENCODE_CHUNK, len(source))
    texts = [_record_text(source[i], cfg.text_field) for i in range(start, stop)]
    pieces.append(token_cache.encode_texts(encoder, texts, eos))
    total += len(pieces[-1])
    start = stop
  return np.concatenate(pieces)[:num_tokens] if pieces else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------
class _Features:
  """Packed rows `[b, T+1]` -> the batch dict (and host-side n-gram hashing)."""

  def __init__(self, compressed_vocab: np.ndarray | None,
               hash_spec: hashing.HashSpec | None):
    self._vocab, self._spec = compressed_vocab, hash_spec

  def __call__(self, rows_BxT1: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.asarray(rows_BxT1, np.int32)
    inputs_BxT = np.ascontiguousarray(rows[:, :-1])
    batch = {"inputs": inputs_BxT, "targets": np.ascontiguousarray(rows[:, 1:])}
    if self._vocab is None and self._spec is None:
      return batch
    ngram_BxT = inputs_BxT if self._vocab is None else self._vocab[inputs_BxT]
    batch["ngram_tokens"] = ngram_BxT
    if self._spec is not None:
      batch["hash_ids"] = hashing.ngram_hash_ids(ngram_BxT, self._spec)
    return batch


def _rows_of_process(rows: grain.MapDataset, process_index: int,
                     process_count: int) -> grain.MapDataset:
  """Every process_count-th row: disjoint, equal-sized shards that mix the corpus."""
  usable = len(rows) // process_count * process_count
  return rows[:usable][process_index::process_count]


def _too_small(cfg: TextDataConfig, split: str, rows: int, needed: int,
               what: str) -> ValueError:
  return ValueError(
      f"data.seq_len/data.batch_size: the {split} split has {rows} rows of "
      f"seq_len+1={cfg.seq_len + 1} tokens {what}, fewer than one batch of {needed}; "
      f"use more data (data.max_files, data.val_fraction) or lower data.batch_size "
      f"or data.seq_len.")


def _local_train(cfg: TextDataConfig, tok: tokenizers.Tokenizer, process_index: int,
                 process_count: int, features: _Features,
                 cache_dir: str | None) -> iterators.TrainIterator:
  per_process = iterators.per_process_batch(cfg, process_index, process_count)
  path = _token_stream_path(cfg, tok, "train", cache_dir)
  rows = _rows_of_process(grain.MapDataset.source(token_cache.Rows(path, cfg.seq_len + 1)),
                          process_index, process_count)
  if len(rows) < per_process:
    raise _too_small(cfg, "train", len(rows), per_process, "per process")
  batches = (rows.shuffle(seed=cfg.seed).repeat()
             .batch(per_process, drop_remainder=True).map(features))

  def dataset_at(start: int) -> grain.IterDataset:
    return batches[start:].to_iter_dataset(_READ_OPTIONS)

  return iterators.TrainIterator(dataset_at, cfg.worker_count, by_index=True)


def _tfds_train(cfg: TextDataConfig, tok: tokenizers.Tokenizer, process_index: int,
                process_count: int, features: _Features) -> iterators.TrainIterator:
  per_process = iterators.per_process_batch(cfg, process_index, process_count)
  source = _tfds_source(cfg, cfg.tfds_train_split)
  if len(source) < process_count:
    raise ValueError(
        f"data.tfds_name={cfg.tfds_name!r}: split {cfg.tfds_train_split!r} has "
        f"{len(source)} records, fewer than the {process_count} processes.")
  records = grain.MapDataset.source(source)[process_index::process_count]
  docs = (records.shuffle(seed=cfg.seed).repeat()
          .map(_EncodeRecord(tok, cfg.text_field)).to_iter_dataset(_RECORD_READ_OPTIONS))
  rows = grain.experimental.ConcatThenSplitIterDataset(
      docs, length_struct={"tokens": cfg.seq_len + 1})
  batches = (rows.map(_packed_tokens)
             .batch(per_process, drop_remainder=True).map(features))
  # A stream: positions are restored from grain's state, not from a start index.
  return iterators.TrainIterator(lambda _: batches, cfg.worker_count, by_index=False)


def _features(tok: tokenizers.Tokenizer, compressed_vocab,
              hash_spec: hashing.HashSpec | None) -> _Features:
  return _Features(_check_compressed_vocab(compressed_vocab, tok), hash_spec)


def train_iterator(cfg: TextDataConfig, tokenizer: tokenizers.Tokenizer, *,
                   process_index: int = 0, process_count: int = 1,
                   compressed_vocab: np.ndarray | None = None,
                   hash_spec: hashing.HashSpec | None = None,
                   cache_dir: str | None = None) -> iterators.TrainIterator:
  """Infinite, reshuffled-per-epoch batches of this process's share of the train split.

  Each process reads only its own rows (local corpora) or records (tfds) and yields
  `batch_size // process_count` rows per batch. `compressed_vocab` adds
  `ngram_tokens`; `hash_spec` adds host-computed `hash_ids` (identity vocabulary when
  no compressed one is given).
  """
  validate(cfg)
  features = _features(tokenizer, compressed_vocab, hash_spec)
  if cfg.source == "tfds":
    return _tfds_train(cfg, tokenizer, process_index, process_count, features)
  return _local_train(cfg, tokenizer, process_index, process_count, features,
                      cache_dir)


def eval_batches(cfg: TextDataConfig, tokenizer: tokenizers.Tokenizer, *,
                 max_batches: int, process_index: int = 0, process_count: int = 1,
                 compressed_vocab: np.ndarray | None = None,
                 hash_spec: hashing.HashSpec | None = None,
                 cache_dir: str | None = None) -> iterators.EvalBatches:
  """The first `max_batches` global batches of the val split (fewer if it is short).

  Deterministic: no shuffling, the same batches on every call and every pass. Over
  tfds only the records needed are read and tokenized (`data.tfds_val_split`).
  """
  validate(cfg)
  if max_batches < 1:
    raise ValueError(f"max_batches={max_batches}: use a positive number of batches.")
  per_process = iterators.per_process_batch(cfg, process_index, process_count)
  features = _features(tokenizer, compressed_vocab, hash_spec)
  row_len = cfg.seq_len + 1
  if cfg.source == "tfds":
    tokens = _tfds_prefix(cfg, tokenizer, cfg.tfds_val_split,
                          max_batches * cfg.batch_size * row_len)
  else:
    tokens = token_stream(cfg, tokenizer, "val", cache_dir)
  rows = len(tokens) // row_len
  if rows < cfg.batch_size:
    raise _too_small(cfg, "val", rows, cfg.batch_size, "in all")
  num_batches = min(max_batches, rows // cfg.batch_size)

  def read(j, first_row, rows):
    del j  # text batches carry no per-batch randomness
    chunk = tokens[first_row * row_len:(first_row + rows) * row_len]
    return features(np.array(chunk, np.int32).reshape(rows, row_len))

  return iterators.EvalBatches(read, cfg.batch_size, per_process, process_index, num_batches)
