"""A run's config, typed and validated once, at the entry: `from_config(config)`.

`configs/*.py` build `ml_collections.ConfigDict`s for the command line. The entry points
(`train.train_and_evaluate`, `sizing.dry_run_report`) turn one into a `RunConfig` before
any work and only its typed sections travel down: the model config to the model, `data`
to the data pipeline, `train` to the optimizer and the loop, `mesh` to the mesh. So
every bad value fails here, before a tokenizer is trained, a workdir is created or a
step is compiled, with one line naming the field and the fix. The sections' own
validators run here (`config.from_dict`, `data.text.validate`, `data.images.validate`,
`models.image.make_image_config`); this module adds the `train` section's and the
checks that tie sections together.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

KINDS = ("lm", "image")
_POSITIVE_INTS = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints")
_NON_NEGATIVE_INTS = ("warmup_steps", "stop_after_steps")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a run trains: the `train` section (defaults: configs/lm.py's "tiny")."""
  steps: int = 300
  learning_rate: float = 3e-3          # peak of the warm-up + cosine schedule
  warmup_steps: int = 30
  weight_decay: float = 0.1
  table_lr_multiplier: float = 5.0     # Engram tables' learning rate / learning_rate
  grad_clip: float = 1.0               # global-norm clip; 0 = none
  # "adam" (dense, the paper's) | "lazy_adam" | "rowwise_adagrad" | "sgd" (row-sparse)
  table_optimizer: str = "adam"
  host_hashing: bool = False           # the input pipeline computes the hash ids
  host_tables_mode: str = "overlap"    # engram.placement="host": "overlap" | "exact"
  log_every: int = 25
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  stop_after_steps: int = 0            # > 0: stop (and save) after this many steps


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every section of a run, typed and validated (`from_config`).

  model: a `config.ModelConfig` (kind "lm") or a `models.image.ImageModelConfig`
    ("image"); `backbone` is the decoder's ModelConfig either way.
  data: a `data.text.TextDataConfig` or a `data.images.ImageDataConfig`.
  vocab_from_tokenizer: an LM whose `model.vocab_size` is 0 is sized by
    `data.vocab_size` until its tokenizer is known (`with_tokenizer_vocab`).
  """
  kind: str
  seed: int
  model: Any
  data: Any
  train: TrainConfig
  mesh: Any  # sharding.MeshConfig
  vocab_from_tokenizer: bool = False

  @property
  def backbone(self):
    """The decoder's `config.ModelConfig` (an image model's is `model.model`)."""
    return self.model if self.kind == "lm" else self.model.model

  def with_tokenizer_vocab(self, size: int) -> "RunConfig":
    """The LM run sized by a tokenizer of `size` tokens (`model.vocab_size = 0`)."""
    model = self.model
    if self.vocab_from_tokenizer:
      model = dataclasses.replace(model, vocab_size=size)
    validate_vocab(model.vocab_size, size)
    return dataclasses.replace(self, model=model)


def from_config(config, dry_run: bool = False) -> RunConfig:
  """The validated `RunConfig` of an `ml_collections.ConfigDict` (or a mapping).

  `dry_run=True` sizes a config without training it: the image data section's paths
  and values go unchecked (a dry run reads no data) and so does `validate_placement`.
  """
  kind = kind_of(config)
  train = train_config(config.train)
  mesh = mesh_config(config.get("mesh", {}))
  vocab_from_tokenizer = False
  if kind == "lm":
    from engram_jax import config as config_lib
    data = text_data_config(config.data)
    model_dict = _as_dict(config.model)
    vocab_from_tokenizer = not model_dict.get("vocab_size")
    if vocab_from_tokenizer:
      model_dict["vocab_size"] = data.vocab_size
    model = config_lib.from_dict(model_dict)
    validate_lm_lengths(data.seq_len, model.max_len)
    if not data.tokenizer_path:  # a tokenizer trained here has data.vocab_size tokens
      validate_vocab(model.vocab_size, data.vocab_size)
  else:
    from engram_jax.models import image
    data = image_data_config(config.data, check=not dry_run)
    model = image.make_image_config(config.model, data)
  run = RunConfig(kind, int(config.get("seed", 0)), model, data, train, mesh,
                  vocab_from_tokenizer)
  if not dry_run:
    validate_placement(run.backbone.engram, train.table_optimizer)
  return run


def kind_of(config) -> str:
  """`config.task`: what the run trains ("lm" when the config predates the field)."""
  kind = config.get("task", "lm")
  if kind not in KINDS:
    raise ValueError(f"task={kind!r} is invalid: choose one of {KINDS}")
  return kind


def _as_dict(section) -> dict:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _typed(cls, section, name: str):
  """`cls(**section)`, an unknown field failing as one line that names it."""
  values = _as_dict(section)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{name}.{unknown[0]} is not a known field; known: {sorted(known)}")
  return cls(**values)


def text_data_config(data):
  """The validated `data.text.TextDataConfig` of an LM's `data` section;
  `data.files_glob` alone means `data.source="files"` (a glob given with the default
  "stdlib" source would otherwise be ignored)."""
  from engram_jax.data import text
  values = _as_dict(data)
  if values.get("files_glob") and values.get("source", "stdlib") == "stdlib":
    values["source"] = "files"
  return text.validate(_typed(text.TextDataConfig, values, "data"))


def image_data_config(data, check: bool = True):
  """The `data.images.ImageDataConfig` of an image run's `data` section, validated
  unless `check=False`."""
  from engram_jax.data import images
  cfg = _typed(images.ImageDataConfig, data, "data")
  return images.validate(cfg) if check else cfg


def mesh_config(mesh):
  """The `sharding.MeshConfig` of the `mesh` section (its sizes are checked against the
  devices when the mesh is made: `sharding.mesh_from_config`)."""
  from engram_jax import sharding
  return _typed(sharding.MeshConfig, mesh, "mesh")


def train_config(train) -> TrainConfig:
  """The validated `TrainConfig` of a `train` section (a ConfigDict or mapping)."""
  return validate_train(_typed(TrainConfig, train, "train"))


def _fail(field: str, value: Any, fix: str) -> None:
  raise ValueError(f"train.{field}={value!r} is invalid: {fix}")


def _as_number(field: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(field, value, "give a number")
  if not math.isfinite(value):
    _fail(field, value, "give a finite number")
  return float(value)


def validate_train(t: TrainConfig) -> TrainConfig:
  """Raises ValueError naming the first invalid field of `t` and the fix."""
  from engram_jax import tables
  for name in _POSITIVE_INTS:
    value = getattr(t, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      extra = (" (0 would delete every checkpoint of the workdir; keep at least the "
               "latest)" if name == "keep_checkpoints" else "")
      _fail(name, value, f"use an integer >= 1{extra}")
  for name in _NON_NEGATIVE_INTS:
    value = getattr(t, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(name, value, "use an integer >= 0")
  if t.warmup_steps > t.steps:
    _fail("warmup_steps", t.warmup_steps,
          f"must be <= train.steps={t.steps} (the schedule warms up within the run)")
  if _as_number("learning_rate", t.learning_rate) <= 0:
    _fail("learning_rate", t.learning_rate, "must be > 0")
  if _as_number("weight_decay", t.weight_decay) < 0:
    _fail("weight_decay", t.weight_decay, "must be >= 0")
  if _as_number("table_lr_multiplier", t.table_lr_multiplier) <= 0:
    _fail("table_lr_multiplier", t.table_lr_multiplier,
          "must be > 0 (freeze a table with model.engram.table_trainable=False)")
  if t.host_tables_mode not in ("overlap", "exact"):
    _fail("host_tables_mode", t.host_tables_mode, "choose 'overlap' or 'exact'")
  if _as_number("grad_clip", t.grad_clip) < 0:
    _fail("grad_clip", t.grad_clip, "must be >= 0 (0 = no clipping)")
  tables.validate_optimizer(t.table_optimizer)
  return t


def with_steps(train, steps: int) -> None:
  """Shortens (or lengthens) a `train` section to `steps` in place, keeping it valid:
  warm-up within the run, an eval and a checkpoint at the end (study commands)."""
  train.update(steps=steps, warmup_steps=min(train.warmup_steps, max(1, steps // 10)),
               eval_every=steps, log_every=min(train.log_every, steps),
               checkpoint_every=min(train.checkpoint_every, steps))


def validate_lm_lengths(seq_len: int, max_len: int) -> None:
  """An LM's training windows must fit its positions (RoPE and the KV cache)."""
  if seq_len > max_len:
    raise ValueError(f"data.seq_len={seq_len} is longer than model.max_len={max_len}: "
                     "lower data.seq_len or raise model.max_len")


def validate_vocab(model_vocab: int, tokenizer_vocab: int) -> None:
  """A model vocabulary smaller than the tokenizer's reads past its embedding."""
  if model_vocab < tokenizer_vocab:
    raise ValueError(f"model.vocab_size={model_vocab} is smaller than the tokenizer's "
                     f"{tokenizer_vocab} tokens: set model.vocab_size=0 (the tokenizer's "
                     f"size) or >= {tokenizer_vocab}")


def validate_placement(engram, table_optimizer: str) -> None:
  """Host tables train only with a row-sparse optimizer; disk tables do not train."""
  if not engram.layers or engram.placement == "device":
    return
  if engram.placement == "disk":
    raise ValueError("engram.placement='disk' is for generation (a table file read on "
                     "demand); train with engram.placement='host' and export the tables "
                     "(docs/scale_out.md)")
  if table_optimizer == "adam":
    raise ValueError("engram.placement='host' needs a row-sparse table optimizer: set "
                     "train.table_optimizer to lazy_adam, rowwise_adagrad or sgd (dense "
                     "Adam would read and write every row of the table each step)")
