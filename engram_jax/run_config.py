"""Validation of a run's `train` section (and what ties it to the model), up front.

Every bad value fails before a tokenizer is trained, a workdir is created or a step is
compiled, with one line naming the field and the fix (the model and data sections have
their own validators: `config.validate`, `data.text.validate`, `data.images.validate`).
"""
from __future__ import annotations

import math
from typing import Any

_POSITIVE_INTS = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints")
_NON_NEGATIVE_INTS = ("warmup_steps", "stop_after_steps")


def _fail(field: str, value: Any, fix: str) -> None:
  raise ValueError(f"train.{field}={value!r} is invalid: {fix}")


def _as_number(field: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(field, value, "give a number")
  if not math.isfinite(value):
    _fail(field, value, "give a finite number")
  return float(value)


def validate_train(t) -> None:
  """Checks `config.train` (a ConfigDict or mapping)."""
  get = t.get
  for name in _POSITIVE_INTS:
    value = get(name)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      extra = (" (0 would delete every checkpoint of the workdir; keep at least the "
               "latest)" if name == "keep_checkpoints" else "")
      _fail(name, value, f"use an integer >= 1{extra}")
  for name in _NON_NEGATIVE_INTS:
    value = get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(name, value, "use an integer >= 0")
  if get("warmup_steps", 0) > get("steps", 1):
    _fail("warmup_steps", get("warmup_steps"),
          f"must be <= train.steps={get('steps')} (the schedule warms up within the run)")
  if _as_number("learning_rate", get("learning_rate", 1e-3)) <= 0:
    _fail("learning_rate", get("learning_rate"), "must be > 0")
  if _as_number("weight_decay", get("weight_decay", 0.0)) < 0:
    _fail("weight_decay", get("weight_decay"), "must be >= 0")
  if _as_number("table_lr_multiplier", get("table_lr_multiplier", 1.0)) <= 0:
    _fail("table_lr_multiplier", get("table_lr_multiplier"),
          "must be > 0 (freeze a table with model.engram.table_trainable=False)")
  if get("host_tables_mode", "overlap") not in ("overlap", "exact"):
    _fail("host_tables_mode", get("host_tables_mode"), "choose 'overlap' or 'exact'")
  if _as_number("grad_clip", get("grad_clip", 0.0)) < 0:
    _fail("grad_clip", get("grad_clip"), "must be >= 0 (0 = no clipping)")


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
