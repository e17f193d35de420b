"""The library's jobs as Python functions, for notebooks and scripts.

Each job is the code its command runs (`python -m engram_jax.main`, `... .generate`,
`... .studies.evaluate`, `... .studies.probes`), called in-process: it prints the same
progress lines while it runs (live in a notebook cell) and returns its results instead
of an exit status. Configs are a `configs/FILE.py:VARIANT` spec (the shipped configs
resolve from any directory) or a ConfigDict; `overrides` maps dotted fields to values,
as `--config.FIELD=VALUE` does on the command line.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Optional


def _quiet(job):
  """Library log records (orbax's restore notes, absl warnings) stay out of the cell, as
  the commands keep them off the console."""
  @functools.wraps(job)
  def run(*args, **kwargs):
    from engram_jax import quiet
    with quiet.quiet_library_logs():
      return job(*args, **kwargs)
  return run


def config(spec: str, overrides: Optional[Mapping[str, Any]] = None):
  """The ConfigDict of `spec` (`configs/lm.py:tiny`) with `overrides` applied; an unknown
  field is a ValueError naming it."""
  from engram_jax import config_files
  c = config_files.load(spec)
  return with_overrides(c, overrides)


def with_overrides(c, overrides: Optional[Mapping[str, Any]] = None):
  """`c` with each dotted field of `overrides` set (values as Python objects; lists, as
  from json, become the tuples the configs hold)."""
  from engram_jax import config_files
  items = [f"{key}={tuple(value) if isinstance(value, list) else value!r}"
           for key, value in (overrides or {}).items()]
  return config_files.overrides(items, flag="overrides")(c)


@_quiet
def train(spec_or_config, workdir: str, overrides: Optional[Mapping[str, Any]] = None,
          accept_data_change: bool = False) -> dict[str, float]:
  """Trains (or resumes) a run in `workdir`, printing progress; returns the final eval
  metrics. The same call as `python -m engram_jax.main --config=... --workdir=...`."""
  from engram_jax import train as train_lib
  c = (config(spec_or_config, overrides) if isinstance(spec_or_config, str)
       else with_overrides(spec_or_config, overrides))
  return train_lib.train_and_evaluate(c, workdir, accept_data_change=accept_data_change)


def metrics(workdir: str) -> list[dict]:
  """Every row of the run's `metrics.jsonl` (train and eval lines), in order."""
  from engram_jax import paths
  text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def curves(workdir: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, e.g. `train_loss` or `eval_loss`."""
  rows = [r for r in metrics(workdir) if key in r]
  return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]




@_quiet
def load(workdir: str, tables: str = "device", table_dir: Optional[str] = None):
  """The trained run in `workdir` (`workdir.Run`: config, kind, model, variables,
  tokenizer, step), its newest readable checkpoint restored."""
  from engram_jax import workdir as workdir_lib
  return workdir_lib.load(workdir, tables, table_dir)


@_quiet
def generate(workdir: str, prompt: str = "", *, seed: int = 0, **settings):
  """Samples from a trained run, as `python -m engram_jax.generate` does. A language
  model returns its continuations of `prompt` (a list of strings; settings:
  max_new_tokens, num_samples, temperature, top_k, top_p, tables, table_dir); an image
  run returns a `sampling.image.Grid` (codes, labels, the PNG written; settings:
  classes, samples_per_class, out, cfg_scale, temperature, top_k, top_p)."""
  from engram_jax import generate as generate_lib
  from engram_jax import workdir as workdir_lib
  from engram_jax.sampling import image
  run = workdir_lib.load(workdir, settings.pop("tables", "device"),
                         settings.pop("table_dir", None))
  if run.kind == "image":
    grid_keys = ("classes", "samples_per_class", "out")
    return image.sample_grid(run, seed=seed, overrides={k: v for k, v in settings.items()
                                                         if k not in grid_keys},
                             **{k: v for k, v in settings.items() if k in grid_keys})
  return generate_lib.continue_prompt(run, prompt, seed=seed, **settings)


@_quiet
def evaluate(workdir: str, split: str = "val", **options) -> dict:
  """NLL and (with samples_per_class) FID / IS of an image run: the metrics that
  `python -m engram_jax.studies.evaluate` prints (also written as json in the workdir)."""
  from engram_jax.studies import evaluate as evaluate_lib
  metrics, _ = evaluate_lib.evaluate_run(workdir, split, **options)
  return metrics


@_quiet
def probes(workdir: str, probe: str = "all", **flags) -> dict[str, str]:
  """Runs the vision paper's probes on an image run (`probe`: gate_clamp, donor, table or
  all; `flags`: the command's, e.g. samples_per_class=10, max_batches=2) and returns each
  report's markdown table by name; the md/csv/png files are in WORKDIR/probes."""
  from engram_jax.studies import probes as probes_lib
  argv = [f"--workdir={workdir}", f"--probe={probe}",
          *(f"--{key}={value}" for key, value in flags.items())]
  reports = {}
  for path in probes_lib.run(probes_lib.parse_args(argv)):
    if path.endswith(".md"):
      with open(path, encoding="utf-8") as f:
        reports[os.path.splitext(os.path.basename(path))[0]] = f.read()
  return reports
