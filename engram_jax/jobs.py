"""The library's jobs as Python functions, for notebooks and scripts.

Each job is the code its command runs (`python -m engram_jax.main`, `... .generate`,
`... .studies.evaluate`, `... .studies.probes`), called in-process: it prints the same
progress lines while it runs (live in a notebook cell) and returns its results instead
of an exit status. Configs are a `configs/FILE.py:VARIANT` spec (the shipped configs
resolve from any directory) or a ConfigDict; `overrides` maps dotted fields to values,
as `--config.FIELD=VALUE` does on the command line.
"""
from __future__ import annotations

import contextlib
import functools
import json
import numbers
import os
import re
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
  if overrides is not None and not isinstance(overrides, Mapping):
    raise ValueError(f"overrides={overrides!r}: give a dict of dotted field -> value, e.g. "
                     "{'train.steps': 20}")
  items = [f"{key}={tuple(value) if isinstance(value, list) else value!r}"
           for key, value in (overrides or {}).items()]
  return config_files.overrides(items, flag="overrides")(c)


@_quiet
def train(spec_or_config, workdir: str, overrides: Optional[Mapping[str, Any]] = None,
          accept_data_change: bool = False) -> dict[str, float]:
  """Trains (or resumes) a run in `workdir`, printing progress; returns the final eval
  metrics. The same call as `python -m engram_jax.main --config=... --workdir=...`."""
  import ml_collections

  from engram_jax import train as train_lib
  if not isinstance(spec_or_config, (str, ml_collections.ConfigDict)):
    raise ValueError(f"spec_or_config={spec_or_config!r}: give a config spec such as "
                     "'configs/lm.py:tiny', or a ConfigDict (jobs.config)")
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


_LM_SETTINGS = ("max_new_tokens", "num_samples", "temperature", "top_k", "top_p")
_IMAGE_SETTINGS = ("classes", "samples_per_class", "out", "cfg_scale", "temperature",
                   "top_k", "top_p")


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
  known = dict.fromkeys(_LM_SETTINGS + _IMAGE_SETTINGS + ("tables", "table_dir"))
  _check_names("generate", settings, known)  # before a checkpoint is read
  if not isinstance(prompt, str):
    raise ValueError(f"prompt={prompt!r}: give a str")
  types = dict(image.SAMPLING_TYPES, max_new_tokens=int, num_samples=int,
               samples_per_class=int)  # the numeric settings
  for key, value in list(settings.items()):
    kind = types.get(key)
    if kind is None:
      continue
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if kind is int else numbers.Real):  # NumPy's too
      raise ValueError(f"{key}={value!r}: give {'an int' if kind is int else 'a number'}")
    settings[key] = kind(value)
  run = workdir_lib.load(workdir, settings.pop("tables", "device"),
                         settings.pop("table_dir", None))
  _check_names("generate", settings, _IMAGE_SETTINGS if run.kind == "image" else
               _LM_SETTINGS, f"for a {run.kind} run")
  if run.kind == "image":
    grid_keys = ("classes", "samples_per_class", "out")
    return image.sample_grid(run, seed=seed, overrides={k: v for k, v in settings.items()
                                                         if k not in grid_keys},
                             **{k: v for k, v in settings.items() if k in grid_keys})
  with _as_keywords(_LM_SETTINGS + ("prompt", "seed")):
    return generate_lib.continue_prompt(run, prompt, seed=seed, **settings)




@_quiet
def evaluate(workdir: str, split: str = "val", **options) -> dict:
  """NLL and (with samples_per_class) FID / IS of an image run: the metrics that
  `python -m engram_jax.studies.evaluate` prints (also written as json in the workdir).
  `options`: the command's flags as keywords (max_batches, samples_per_class, seed,
  classifier_dir, feature_net, ...); a bad one is a ValueError naming it."""
  from engram_jax.studies import evaluate as evaluate_lib
  from engram_jax.studies import feature_nets
  parser = evaluate_lib.build_parser()
  args = _arguments(parser, "evaluate", dict(workdir=workdir, split=split, **options),
                    defaults=dict(samples_per_class=0))  # NLL only unless asked
  with _as_keywords(parser):
    evaluate_lib.check_counts(args)
    feature = feature_nets.feature_net_options(args)
  metrics, _ = evaluate_lib.evaluate_run(
      args.workdir, args.split, max_batches=args.max_batches,
      samples_per_class=args.samples_per_class, seed=args.seed,
      classifier_dir=args.classifier_dir, **feature)
  return metrics


@_quiet
def probes(workdir: str, probe: str = "all", **flags) -> dict[str, str]:
  """Runs the vision paper's probes on an image run (`probe`: gate_clamp, donor, table or
  all; `flags`: the command's, e.g. samples_per_class=10, max_batches=2) and returns each
  report's markdown table by name; the md/csv/png files are in WORKDIR/probes. A bad
  keyword is a ValueError naming it."""
  from engram_jax.studies import probes as probes_lib
  parser = probes_lib.build_parser()
  args = _arguments(parser, "probes", dict(workdir=workdir, probe=probe, **flags))
  with _as_keywords(parser):
    probes_lib.check_args(args)
  reports = {}
  for path in probes_lib.run(args):
    if path.endswith(".md"):
      with open(path, encoding="utf-8") as f:
        reports[os.path.splitext(os.path.basename(path))[0]] = f.read()
  return reports


# ----------------------------------------------------------------------------------
# A command's flags as a job's keywords: argparse would print usage and exit; a job
# raises a ValueError naming the keyword, and prints nothing.
# ----------------------------------------------------------------------------------
def _check_names(job: str, values: Mapping[str, Any], known, where: str = "") -> None:
  for key in values:
    if key not in known:
      raise ValueError(f"{key}: not an argument of jobs.{job}{' ' + where if where else ''}"
                       f" (its keywords: {', '.join(known)})")


def _arguments(parser, job: str, values: Mapping[str, Any],
               defaults: Optional[Mapping[str, Any]] = None):
  """The Namespace `parser.parse_args` would give for `values` (keyword -> value, as
  Python objects), with `parser`'s defaults (then `defaults`) for the rest."""
  import argparse
  actions = {a.dest: a for a in parser._actions if a.dest != "help"}
  _check_names(job, values, actions)
  args = argparse.Namespace(**{dest: a.default for dest, a in actions.items()})
  vars(args).update(defaults or {})
  for key, value in values.items():
    action = actions[key]
    kind = action.type or str
    if isinstance(value, str) and kind is not str:
      try:
        value = kind(value)
      except ValueError:
        raise ValueError(f"{key}={value!r}: give {'an' if kind is int else 'a'} "
                         f"{kind.__name__}") from None
    elif kind is str and isinstance(value, os.PathLike):
      value = os.fspath(value)
    elif kind is str and isinstance(value, (list, tuple)):
      value = ",".join(str(v) for v in value)  # gates=[0, 0.1, "learned"]
    if isinstance(value, bool) or not isinstance(value, int if kind is int else
                                                 (int, float) if kind is float else str):
      raise ValueError(f"{key}={value!r}: give {'an' if kind is int else 'a'} "
                       f"{kind.__name__}")
    if action.choices is not None and value not in action.choices:
      raise ValueError(f"{key}={value!r}: choose one of "
                       f"{', '.join(map(str, action.choices))}")
    setattr(args, key, value)
  missing = [a.dest for a in actions.values() if a.required and a.dest not in values]
  if missing:
    raise ValueError(f"jobs.{job} needs {missing[0]}=...")
  return args


@contextlib.contextmanager
def _as_keywords(parser_or_names):
  """The checks' `--flag` in a ValueError's message becomes the job's keyword `flag`
  (the flags of an argparse parser, or the names given)."""
  try:
    yield
  except ValueError as err:
    names = (parser_or_names if isinstance(parser_or_names, (tuple, list)) else
             [a.dest for a in parser_or_names._actions])
    dests = sorted(names, key=len, reverse=True)
    pattern = r"--(" + "|".join(map(re.escape, dests)) + r")\b"
    message = re.sub(pattern, r"\1", str(err))
    if message == str(err):
      raise
    raise ValueError(message) from None
