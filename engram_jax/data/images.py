"""Class-conditional image token batches (grain): 8x8 digits or pre-tokenised VQ codes.

Sources (`ImageDataConfig.source`):
  "digits":       scikit-learn's bundled 8x8 digits (1797 images, 10 classes, pixel
                  values 0..16), each pixel quantised to `levels` tokens; a fixed
                  stratified train/val/test split of 1439/179/179 images (seeded
                  by `split_seed`).
  "npz":          a `.npz` per split holding `codes [I, Hi, Wi]` (any integer dtype) and
                  `labels [I]`: the output of any VQ tokenizer.
  "array_record": ArrayRecord files per split (a path or a glob), one image per record
                  in the layout of data/image_records.py (write them with
                  `image_records.write_array_record`): random access without loading
                  a split.

An image is its HiWi = Hi*Wi codes in raster order. Every batch is a dict of int32
NumPy arrays:
  inputs  [b, HiWi] the class token (codebook_size + label; the null class
                    codebook_size + num_classes when dropped for classifier-free
                    guidance), then cells 0..HiWi-2;
  targets [b, HiWi] cells 0..HiWi-1: position t predicts cell t;
  labels  [b]       the true class (also when the class token was dropped);
  hash_ids [b, HiWi, L, H] (optional) the 2D Engram row ids of every cell's context
                    (`spatial_hashing.spatial_hash_ids` of `targets`), computed on the host.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Sequence

import grain
import numpy as np

from engram_jax import errors, hashing, spatial_hashing
from engram_jax.data import digits
from engram_jax.data import fingerprint as fingerprint_lib
from engram_jax.data import iterators
from engram_jax.data.image_records import decode_record

_SOURCES = ("digits", "npz", "array_record")
_SPLITS = digits.SPLITS
_DROPOUT_STREAM = 0x1ABE1     # keeps label dropout draws apart from other seeded draws
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
  """Where image tokens come from and how they are batched (see module docstring)."""
  source: str = "digits"          # "digits" | "npz" | "array_record"
  levels: int = 8                 # digits: tokens per pixel, 2..17 (17 = raw values)
  split_seed: int = 0             # digits: which images are val and test
  train_path: str = ""            # npz: a file; array_record: a file or a glob
  val_path: str = ""
  test_path: str = ""
  height: int = 8                 # code grid (digits: 8 x 8)
  width: int = 8
  codebook_size: int = 0          # codes sources: VQ codebook size (digits: levels)
  num_classes: int = 10
  batch_size: int = 32            # global; per process: batch_size // process_count
  seed: int = 0                   # shuffling and label dropout
  label_dropout: float = 0.0      # probability of the null class token (CFG training)
  worker_count: int = 0


def validate(cfg: ImageDataConfig) -> ImageDataConfig:
  """Fails on the first bad field, naming it, before any file is read."""
  if cfg.source not in _SOURCES:
    raise ValueError(f"data.source={cfg.source!r}: use one of {list(_SOURCES)}.")
  if cfg.source == "digits":
    if not 2 <= cfg.levels <= digits.VALUES:
      raise ValueError(f"data.levels={cfg.levels}: use 2..{digits.VALUES} pixel levels "
                       f"({digits.VALUES} keeps the raw digits values).")
    if cfg.codebook_size not in (0, cfg.levels):
      raise ValueError(f"data.codebook_size={cfg.codebook_size}: digits tokens are the "
                       f"{cfg.levels} pixel levels; leave it 0 (or set data.levels).")
    for name, want in (("height", digits.SIZE), ("width", digits.SIZE),
                       ("num_classes", digits.CLASSES)):
      if getattr(cfg, name) != want:
        raise ValueError(f"data.{name}={getattr(cfg, name)}: digits images have "
                         f"height = width = 8 and 10 classes; set data.{name}={want}.")
  else:
    if not cfg.train_path:
      raise ValueError(f"data.train_path is empty: set it to the train split's "
                       f"{_format_hint(cfg.source)} when data.source={cfg.source!r}.")
    if cfg.codebook_size < 1:
      raise ValueError(f"data.codebook_size={cfg.codebook_size}: set it to the VQ "
                       f"tokenizer's codebook size when data.source={cfg.source!r}.")
  for name in ("height", "width", "num_classes", "batch_size"):
    if getattr(cfg, name) < 1:
      raise ValueError(f"data.{name}={getattr(cfg, name)}: use a positive integer.")
  if not 0.0 <= cfg.label_dropout <= 1.0:
    raise ValueError(f"data.label_dropout={cfg.label_dropout}: use a probability in "
                     f"[0, 1].")
  if cfg.worker_count < 0:
    raise ValueError(f"data.worker_count={cfg.worker_count}: use 0 or more.")
  return cfg


def fingerprint(cfg: ImageDataConfig) -> dict:
  """What decides the train stream (see `data.fingerprint`): the shaping fields, and the
  train files' names, sizes and mtimes for npz/ArrayRecord sources."""
  validate(cfg)
  fields = fingerprint_lib.config_fields(
      cfg, ("source", "height", "width", "batch_size", "seed", "label_dropout"))
  if cfg.source == "digits":
    return {**fields, **fingerprint_lib.config_fields(cfg, ("levels", "split_seed"))}
  files = (_record_files(cfg, "train") if cfg.source == "array_record"
           else [_split_path(cfg, "train")])
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise ValueError(f"data.train_path={cfg.train_path!r}: {missing[0]} is not a file")
  return {**fields, **fingerprint_lib.files_fingerprint(files)}


def _format_hint(source: str) -> str:
  return ("`.npz` with codes [images, height, width] and labels [images]"
          if source == "npz" else
          "ArrayRecord file or glob (see engram_jax.data.image_records.write_array_record)")


# ----------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageVocab:
  """Token ids: codes [0, C), class c at C + c, the null class at C + num_classes."""
  codebook_size: int
  num_classes: int

  @property
  def null_class(self) -> int:
    """The class token of an unconditional row (classifier-free guidance)."""
    return self.codebook_size + self.num_classes

  @property
  def size(self) -> int:
    """Embedding rows a model needs: codes, classes and the null class."""
    return self.codebook_size + self.num_classes + 1

  def class_token(self, labels):
    return np.asarray(labels, np.int32) + np.int32(self.codebook_size)


def image_vocab(cfg: ImageDataConfig) -> ImageVocab:
  validate(cfg)
  size = cfg.levels if cfg.source == "digits" else cfg.codebook_size
  return ImageVocab(size, cfg.num_classes)


# ----------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------
def _digits_arrays(cfg: ImageDataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = digits.raw()
  index = digits.split_indices(cfg.split_seed)[split]
  return digits.quantize(images[index], cfg.levels), labels[index]


# ----------------------------------------------------------------------------------
# Pre-tokenised codes: checks, npz, ArrayRecord
# ----------------------------------------------------------------------------------
def _split_field(split: str) -> str:
  return f"data.{split}_path"


def _split_path(cfg: ImageDataConfig, split: str) -> str:
  path = getattr(cfg, f"{split}_path")
  if not path:
    raise ValueError(f"{_split_field(split)} is empty: set it to the {split} split's "
                     f"{_format_hint(cfg.source)}.")
  return os.path.expanduser(path)


def _check_codes(cfg: ImageDataConfig, where: str, codes, labels) -> None:
  """Shapes and id ranges of codes `[I, Hi, Wi]` and labels `[I]`, naming the field."""
  if codes.ndim != 3 or codes.shape[1:] != (cfg.height, cfg.width):
    raise ValueError(
        f"{where}: codes have shape {codes.shape} but data.height x data.width is "
        f"{cfg.height} x {cfg.width}; store codes as [I, {cfg.height}, {cfg.width}] or "
        f"set data.height/data.width to the tokenizer's grid.")
  if labels.shape != codes.shape[:1]:
    raise ValueError(f"{where}: labels have shape {labels.shape}; need one label per "
                     f"image, shape ({codes.shape[0]},).")
  for name, array in (("codes", codes), ("labels", labels)):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{where}: {name} have dtype {array.dtype}; store integer ids.")
  if codes.size and (codes.min() < 0 or codes.max() >= cfg.codebook_size):
    raise ValueError(
        f"{where}: codes span [{codes.min()}, {codes.max()}], outside the vocabulary "
        f"[0, data.codebook_size={cfg.codebook_size}); set data.codebook_size to the "
        f"tokenizer's codebook size.")
  if labels.size and (labels.min() < 0 or labels.max() >= cfg.num_classes):
    raise ValueError(
        f"{where}: labels span [{labels.min()}, {labels.max()}], outside "
        f"[0, data.num_classes={cfg.num_classes}); set data.num_classes.")


def _npz_arrays(cfg: ImageDataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  path = _split_path(cfg, split)
  where = f"{_split_field(split)}={path!r}"
  if not os.path.isfile(path):
    raise ValueError(f"{where} does not exist; point it at a `.npz` with codes "
                     f"[images, height, width] and labels [images].")
  from engram_jax import npz_files as npz_lib
  arrays = npz_lib.read_npz(path, where, "save it with np.savez(path, codes=codes, "
                            "labels=labels): integer codes [images, height, width], "
                            "labels [images]", keys=("codes", "labels"))
  missing = sorted({"codes", "labels"} - set(arrays))
  if missing:
    with np.load(path, allow_pickle=False) as npz:  # it read: name what it has
      has = sorted(npz.files)
    raise ValueError(f"{where} lacks {missing} (it has {has}); save it "
                     f"with np.savez(path, codes=codes, labels=labels).")
  codes, labels = arrays["codes"], arrays["labels"]
  _check_codes(cfg, where, codes, labels)
  return codes.astype(np.int32), labels.astype(np.int32)


def _record_files(cfg: ImageDataConfig, split: str) -> list[str]:
  pattern = _split_path(cfg, split)
  files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f"{_split_field(split)}={pattern!r} matches no files; point it "
                     f"at ArrayRecord files (a path or a glob such as "
                     f"'/data/train-*.array_record').")
  return files


# ----------------------------------------------------------------------------------
# Random-access sources
# ----------------------------------------------------------------------------------
class _ArraySource:
  """Images held in memory (digits, npz): item i is {'codes': [Hi, Wi], 'label': ()}.

  Pickles as (config, split), so grain workers reload the file rather than receiving a
  copy of every array.
  """

  def __init__(self, cfg: ImageDataConfig, split: str):
    self._cfg, self._split = cfg, split
    load = _digits_arrays if cfg.source == "digits" else _npz_arrays
    self._codes, self._labels = load(cfg, split)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"codes": self._codes[index], "label": self._labels[index]}

  def __getstate__(self) -> dict[str, Any]:
    return {"cfg": self._cfg, "split": self._split}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["cfg"], state["split"])


class _RecordSource:
  """Images in ArrayRecord files, decoded and checked one record at a time."""

  def __init__(self, cfg: ImageDataConfig, split: str):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    self._cfg, self._split = cfg, split
    self._files = _record_files(cfg, split)
    try:
      self._records = ArrayRecordDataSource(self._files)
    except RuntimeError as err:  # the library's one error type for a bad file
      raise ValueError(f"{_split_field(split)}: {self._unreadable()} is not a readable "
                       f"ArrayRecord file ({errors.first_line(err, 160)}); write it again with "
                       "engram_jax.data.image_records.write_array_record") from None

  def _unreadable(self) -> str:
    """The first of the files that does not open on its own (all of them if each does)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    for path in self._files:
      try:
        ArrayRecordDataSource([path])
      except RuntimeError:
        return repr(path)
    return f"one of {self._files!r}"

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    where = f"{_split_field(self._split)} record {index}"
    try:
      record = self._records[index]
    except RuntimeError as err:  # a damaged chunk (hash mismatch, truncation)
      raise ValueError(f"{where} does not read back ({errors.first_line(err, 160)}): the file is "
                       "damaged; write it again with "
                       "engram_jax.data.image_records.write_array_record") from None
    codes, label = decode_record(record)
    _check_codes(self._cfg, where, codes[None], np.array([label]))
    return {"codes": codes, "label": np.int32(label)}

  def __getstate__(self) -> dict[str, Any]:
    return {"cfg": self._cfg, "split": self._split}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["cfg"], state["split"])


def _check_split(split: str) -> None:
  if split not in _SPLITS:
    raise ValueError(f"split={split!r}: use one of {list(_SPLITS)}.")


def image_source(cfg: ImageDataConfig, split: str):
  """A split as a random-access source of {'codes': [Hi, Wi] int32, 'label': int32}.

  Checks files, shapes and id ranges up front (the first record of ArrayRecord files;
  every later record is checked as it is read).
  """
  validate(cfg)
  _check_split(split)
  source = _RecordSource(cfg, split) if cfg.source == "array_record" else (
      _ArraySource(cfg, split))
  if not len(source):
    field = "data.split_seed" if cfg.source == "digits" else _split_field(split)
    raise ValueError(f"{field}: the {split} split has no images.")
  if cfg.source == "array_record":
    source[0]  # noqa: B018  decodes and checks the first record: fail before training
  return source


# ----------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------
class _Features:
  """Stacked examples -> the batch dict; label dropout keyed by (seed, process, step).

  Seeding each batch by its index (not by a running generator) makes the dropped rows
  a pure function of the batch, so resuming reproduces them exactly.
  """

  def __init__(self, cfg: ImageDataConfig, label_dropout: float, process_index: int,
               hash_spec: hashing.HashSpec | None, stencil):
    self._vocab = image_vocab(cfg)
    self._height, self._width = cfg.height, cfg.width
    self._seed, self._process = cfg.seed, process_index
    self._dropout = label_dropout
    self._spec = hash_spec
    self._stencil = None
    if hash_spec is not None:
      self._stencil = spatial_hashing.validate_stencil(stencil, hash_spec.max_ngram,
                                               cfg.height, cfg.width)

  def __call__(self, step: int,
               examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    labels_B = np.asarray(examples["label"], np.int32)
    cells_BxHiWi = np.asarray(examples["codes"], np.int32).reshape(len(labels_B), -1)
    class_B = self._vocab.class_token(labels_B)
    if self._dropout > 0:
      rng = np.random.default_rng((self._seed, _DROPOUT_STREAM, self._process, step))
      drop_B = rng.random(len(labels_B)) < self._dropout
      class_B = np.where(drop_B, np.int32(self._vocab.null_class), class_B)
    batch = {
        "inputs": np.concatenate([class_B[:, None], cells_BxHiWi[:, :-1]], axis=1),
        "targets": np.ascontiguousarray(cells_BxHiWi),
        "labels": labels_B,
    }
    if self._spec is not None:
      batch["hash_ids"] = spatial_hashing.spatial_hash_ids(
          cells_BxHiWi, self._spec, self._height, self._width, self._stencil)
    return batch


def train_iterator(cfg: ImageDataConfig, *, process_index: int = 0,
                   process_count: int = 1, hash_spec: hashing.HashSpec | None = None,
                   stencil: Sequence = spatial_hashing.DEFAULT_STENCIL) -> iterators.TrainIterator:
  """Infinite, reshuffled-per-epoch batches of this process's share of the train split.

  Process p reads images p, p + P, p + 2P, ... (disjoint, equal shards) and yields
  `batch_size // process_count` of them per batch. The state (`get_state`) is the batch
  count, so it survives a change of `worker_count`. `hash_spec` adds host-computed
  `hash_ids` with the given stencil.
  """
  validate(cfg)
  per_process = iterators.per_process_batch(cfg, process_index, process_count)
  images = grain.MapDataset.source(image_source(cfg, "train"))
  usable = len(images) // process_count * process_count
  images = images[:usable][process_index::process_count]
  if len(images) < per_process:
    raise ValueError(
        f"data.batch_size={cfg.batch_size}: the train split gives each of the "
        f"{process_count} processes {len(images)} images, fewer than one batch of "
        f"{per_process}; lower data.batch_size.")
  features = _Features(cfg, cfg.label_dropout, process_index, hash_spec, stencil)
  batches = (images.shuffle(seed=cfg.seed).repeat()
             .batch(per_process, drop_remainder=True).map_with_index(features))

  def dataset_at(start: int) -> grain.IterDataset:
    return batches[start:].to_iter_dataset(_READ_OPTIONS)

  return iterators.TrainIterator(dataset_at, cfg.worker_count, by_index=True)


def eval_batches(cfg: ImageDataConfig, split: str = "val", *,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1, hash_spec: hashing.HashSpec | None = None,
                 stencil: Sequence = spatial_hashing.DEFAULT_STENCIL) -> iterators.EvalBatches:
  """The first `max_batches` global batches of a split (all full batches when None)."""
  validate(cfg)
  _check_split(split)
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches={max_batches}: use a positive number or None (all).")
  per_process = iterators.per_process_batch(cfg, process_index, process_count)
  source = image_source(cfg, split)
  available = len(source) // cfg.batch_size
  if not available:
    raise ValueError(f"data.batch_size={cfg.batch_size}: the {split} split has only "
                     f"{len(source)} images, fewer than one batch; lower "
                     f"data.batch_size.")
  num_batches = available if max_batches is None else min(max_batches, available)
  features = _Features(cfg, 0.0, process_index, hash_spec, stencil)

  def read(j, first, count):
    """Images [first, first + count) in stored order, no label dropout."""
    items = [source[i] for i in range(first, first + count)]
    return features(j, {"codes": np.stack([x["codes"] for x in items]),
                        "label": np.array([x["label"] for x in items], np.int32)})

  return iterators.EvalBatches(read, cfg.batch_size, per_process, process_index, num_batches)
