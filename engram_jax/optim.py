"""Optimizer with the paper's parameter groups, from a run's `train` section.

Engram tables train with their own learning-rate multiplier and no weight decay (a
frozen table gets no update at all); norms and other vectors get no weight decay;
matrices get AdamW. Gradients are clipped by global norm first. With a row-sparse
`train.table_optimizer` the tables leave the optax chain for `tables.SparseTx`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Union

import jax
import optax

from engram_jax import config as config_lib
from engram_jax import param_groups as param_groups_lib
from engram_jax import run_config, tables

Schedule = Union[float, Callable[[Any], Any]]


def param_groups(params):
  """The optimizer group of every param: 'table', 'no_decay' or 'decay'
  (`param_groups.optimizer_group`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_groups_lib.optimizer_group(path), params)


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up to `peak_lr`, then cosine decay to `final_fraction * peak_lr`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, peak_lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
      end_value=peak_lr * final_fraction)


def make_optimizer(learning_rate: Schedule, *, weight_decay: float = 0.1,
                   table_lr_multiplier: float = 1.0, table_trainable: bool = True,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  table_lr = lambda step: lr(step) * table_lr_multiplier
  groups = {
      "decay": optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay),
      "no_decay": optax.adam(lr, b1, b2, eps),
      "table": optax.adam(table_lr, b1, b2, eps) if table_trainable else optax.set_to_zero(),
  }
  chain = [optax.multi_transform(groups, param_groups)]
  if grad_clip and grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*chain)


def from_train_config(t: run_config.TrainConfig, engram: config_lib.EngramConfig):
  """(schedule, tx) of a run: AdamW + warmup-cosine with the table group.

  tx is optax's (tables in Adam's table group) for `train.table_optimizer="adam"` or
  a model without Engram, else a `tables.SparseTx` (row-sparse tables). Equal settings
  give the same objects, so a process training several runs (seeds, a resume)
  reuses the programs jitted for them (`train_steps.run_programs`) instead of tracing anew.
  """
  return _schedule_and_tx(t.learning_rate, t.warmup_steps, t.steps, t.weight_decay,
                          t.table_lr_multiplier, t.grad_clip, t.table_optimizer, engram)


@functools.lru_cache(maxsize=16)
def _schedule_and_tx(learning_rate, warmup_steps, steps, weight_decay, table_lr_multiplier,
                     grad_clip, table_optimizer, engram):
  schedule = warmup_cosine(learning_rate, warmup_steps, steps)
  sparse = table_optimizer != "adam" and bool(engram.layers)
  tx = make_optimizer(schedule, weight_decay=weight_decay,
                      table_lr_multiplier=table_lr_multiplier,
                      table_trainable=engram.table_trainable and not sparse,
                      grad_clip=0.0 if sparse else grad_clip)
  if sparse:
    table_opt = tables.make_optimizer(table_optimizer) if engram.table_trainable else None
    tx = tables.SparseTx(table_optimizer, engram, tx, table_opt,
                         lambda step: schedule(step) * table_lr_multiplier, grad_clip)
  return schedule, tx
