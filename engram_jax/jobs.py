"""The library's jobs as Python functions, for notebooks and scripts.

Each job is the code its command runs (`python -m engram_jax.main`, `... .generate`,
`... .studies.evaluate`, `... .studies.probes`), called in-process: it prints the same
progress lines while it runs (live in a notebook cell) and returns its results instead
of an exit status. Configs are a `configs/FILE.py:VARIANT` spec (the shipped configs
resolve from any directory) or a ConfigDict; `overrides` maps dotted fields to values,
as `--config.FIELD=VALUE` does on the command line.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional


def config(spec: str, overrides: Optional[Mapping[str, Any]] = None):
  """The ConfigDict of `spec` (`configs/lm.py:tiny`) with `overrides` applied; an unknown
  field is a ValueError naming it."""
  from engram_jax import config_files
  c = config_files.load(spec)
  return with_overrides(c, overrides)


def with_overrides(c, overrides: Optional[Mapping[str, Any]] = None):
  """`c` with each dotted field of `overrides` set (values as Python objects)."""
  from engram_jax import config_files
  items = [f"{key}={value!r}" for key, value in (overrides or {}).items()]
  return config_files.overrides(items, flag="overrides")(c)


def train(spec_or_config, workdir: str, overrides: Optional[Mapping[str, Any]] = None,
          accept_data_change: bool = False) -> dict[str, float]:
  """Trains (or resumes) a run in `workdir`, printing progress; returns the final eval
  metrics. The same call as `python -m engram_jax.main --config=... --workdir=...`."""
  from engram_jax import quiet, train as train_lib
  c = (config(spec_or_config, overrides) if isinstance(spec_or_config, str)
       else with_overrides(spec_or_config, overrides))
  with quiet.quiet_library_logs():
    return train_lib.train_and_evaluate(c, workdir, accept_data_change=accept_data_change)


def metrics(workdir: str) -> list[dict]:
  """Every row of the run's `metrics.jsonl` (train and eval lines), in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def curves(workdir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, e.g. `train_loss` or `eval_loss`."""
  rows = [r for r in metrics(workdir) if key in r]
  return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


