"""Variants x seeds: train each, report the final eval with its spread.

    python -m engram_jax.studies.seeds --config=configs/lm.py:tiny --seeds=0,1,2 \
        --workdir=workdirs/gates --variant=learned \
        --variant=gate_0.1:model.engram.gate=0.1 --variant=baseline:model.engram.layers=()

A variant is `NAME` or `NAME:FIELD=VALUE[;FIELD=VALUE...]` over the base config. Each
(variant, seed) trains in `WORKDIR/NAME/seed_{seed}` with `seed` and `data.seed` set to
that seed (init and data order), resuming or skipping finished runs; `summary.md` and
`summary.csv` give every seed's final eval metrics, mean +- std per variant, and each
variant's difference to the first one with a Welch t statistic: |t| > ~2.8 (3 seeds a
side) is a difference beyond the seed spread at about the 5% level.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from engram_jax import cli, config_files
from engram_jax.studies import reports, run_results


def parse_variant(text: str) -> tuple[str, list[str]]:
  name, _, rest = text.partition(":")
  if not name or "/" in name:
    raise ValueError(f"--variant={text!r}: use NAME or NAME:FIELD=VALUE[;FIELD=VALUE]")
  return name, [item for item in rest.split(";") if item.strip()]


def variant_overrides(name: str, sets: Sequence[str]):
  """`config_files.overrides` of a variant, its errors spelled `--variant=NAME:FIELD=..`."""
  return config_files.overrides(sets, flag=f"--variant={name}", joiner=":",
                                example="model.engram.gate=0.1")


def run_dir(workdir: str, variant: str, seed: int) -> str:
  return os.path.join(workdir, variant, f"seed_{seed}")


def train_one(config_spec: str, variant: str, sets: Sequence[str], seed: int,
              workdir: str) -> Optional[dict]:
  """Trains (or reads back) one (variant, seed) run; returns its final eval metrics,
  or None when it stopped before `train.steps` (`train.stop_after_steps`)."""
  directory = run_dir(workdir, variant, seed)
  config = config_files.load(config_spec)
  variant_overrides(variant, sets)(config)
  config.seed = seed
  config.data.seed = seed
  row = run_results.read(directory, config)
  if row is not None:
    return row
  print(f"seeds: {variant} seed {seed} -> {directory}", flush=True)
  if not run_results.train(directory, config):
    return None
  steps = int(config.train.steps)
  row = {"variant": variant, "seed": seed,
         **{k: float(v) for k, v in run_results.final_eval(directory, steps).items()}}
  run_results.write(directory, row, config)
  return row


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
  """Welch's t statistic of mean(b) - mean(a) (nan with fewer than 2 per side)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return float("nan")
  se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  return float((b.mean() - a.mean()) / se) if se > 0 else float("inf")


def summarize(rows: list[dict], metric: str = "eval_loss") -> str:
  """Markdown: per variant mean +- std (n) and the difference to the first variant."""
  by_variant: dict[str, list[float]] = {}
  for row in rows:
    by_variant.setdefault(row["variant"], []).append(row[metric])
  names = list(by_variant)
  first = by_variant[names[0]]
  lines = [f"| variant | {metric} mean +- std (n) | seeds | vs {names[0]} | Welch t |",
           "|---|---|---|---|---|"]
  for name in names:
    values = np.asarray(by_variant[name])
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    diff = values.mean() - np.mean(first)
    t = welch_t(first, values) if name != names[0] else float("nan")
    lines.append(f"| {name} | {values.mean():.4f} +- {std:.4f} ({len(values)}) | "
                 f"{', '.join(f'{v:.4f}' for v in values)} | "
                 f"{'' if name == names[0] else f'{diff:+.4f}'} | "
                 f"{'' if math.isnan(t) else f'{t:+.2f}'} |")
  return "\n".join(lines) + "\n"


def run(config_spec: str, variants: Sequence[tuple[str, list[str]]], seeds: Sequence[int],
        workdir: str, metric: str = "eval_loss") -> list[dict]:
  """Trains every (variant, seed) not finished yet; writes summary.md/csv; the rows."""
  from engram_jax import paths
  paths.local_output(workdir, "--workdir")  # the sweep's root: local summaries
  for name, sets in variants:  # every override valid before anything trains
    variant_overrides(name, sets)(config_files.load(config_spec))
  rows, unfinished = [], []
  total = len(variants) * len(seeds)
  for i, (name, sets) in enumerate(variants):
    for j, seed in enumerate(seeds):
      print(f"seeds: run {i * len(seeds) + j + 1}/{total}", flush=True)
      row = train_one(config_spec, name, sets, seed, workdir)
      (rows.append(row) if row is not None else unfinished.append(f"{name} seed {seed}"))
  if unfinished:  # summaries of some seeds would read as the whole study's
    raise ValueError(f"--workdir={workdir!r}: {len(unfinished)} of {total} runs stopped "
                     f"before train.steps ({', '.join(unfinished[:4])}"
                     f"{', ...' if len(unfinished) > 4 else ''}: train.stop_after_steps); "
                     "run the same command again to train them on, then to summarize")
  missing = sorted({metric} - {k for row in rows for k in row})
  if missing:
    raise ValueError(f"--metric={metric!r}: the runs logged no such eval metric "
                     f"(they have: {', '.join(sorted(rows[0]))})")
  from engram_jax import paths
  os.makedirs(workdir, exist_ok=True)
  paths.atomic_write_text(os.path.join(workdir, "summary.md"),
                          f"`{config_spec}`, seeds {list(seeds)}\n\n" +
                          summarize(rows, metric))
  keys = sorted({k for row in rows for k in row} - {"variant", "seed"})
  reports.write_csv(os.path.join(workdir, "summary.csv"), rows, ["variant", "seed", *keys])
  return rows


def main(argv=None) -> int:
  parser = cli.Parser(
      prog="python -m engram_jax.studies.seeds",
      description="Train config variants over several seeds; report mean +- std.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--config", required=True, help="PATH.py:VARIANT")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME or NAME:FIELD=VALUE[;FIELD=VALUE] (repeatable; the first "
                           "is the reference)")
  parser.add_argument("--metric", default="eval_loss")
  args = parser.parse_args(argv)

  def body():
    seeds = cli.parse_ints(args.seeds, "--seeds")
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    if len({name for name, _ in variants}) != len(variants):
      raise ValueError("--variant: two variants share a name")
    print(summarize(run(args.config, variants, seeds, args.workdir, args.metric),
                    args.metric))
  return cli.run(body)


if __name__ == "__main__":
  sys.exit(main())
