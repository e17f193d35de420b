"""The budget-ratio sweep of arXiv 2605.13179: FID vs rho against the baseline.

`python -m engram_jax.studies.rho_sweep --family=digits --rhos=0.32,0.51,0.76 --workdir=ROOT`
trains `configs/image.py:{family}_baseline` (`ar_b` for the ar_b family) and every
`{family}_rho_R` into `ROOT/<variant>` (a point whose newest checkpoint already reached
`--steps` is not trained again; an interrupted one resumes), evaluates each on one split
(NLL in bits/token; FID and IS of class-balanced samples scored by one shared feature
network) and writes `ROOT/rho_sweep.{md,csv,png}`. rho is the backbone's share of the
fixed parameter budget (docs/vision.md).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from engram_jax import cli, config_files, run_config

def _image_configs():
  """configs/image.py, the shipped image configs (`engram_jax.configs.image`)."""
  from engram_jax.configs import image
  return image


def baseline_variant(family: str) -> str:
  return "ar_b" if family == "ar_b" else f"{family}_baseline"


def variants(family: str, rhos: Sequence[float]) -> list[tuple[str, float]]:
  """(variant, rho) of the sweep: the baseline (rho 1) first, then each point."""
  return [(baseline_variant(family), 1.0)] + [(f"{family}_rho_{r:g}", r) for r in rhos]


def train_point(variant: str, workdir: str, steps: int, overrides: Callable = None) -> None:
  """Trains one variant to `steps` (skipped when it was trained so with this config;
  one line when its workdir holds a run of another config: `run_results`)."""
  from engram_jax.studies import run_results
  config = _image_configs().get_config(variant)
  run_config.with_steps(config.train, steps)
  if overrides:
    overrides(config)
  if run_results.read(workdir, config) is not None:
    print(f"{variant}: trained to step {steps} already, skipped", flush=True)
    return
  if not run_results.train(workdir, config):
    raise ValueError(f"--workdir: {variant} stopped before step {steps} "
                     "(train.stop_after_steps); run the same command again to train on")
  run_results.write(workdir, {"variant": variant, "steps": steps}, config)


def evaluate_point(workdir: str, split: str, quality) -> dict[str, float]:
  """NLL (bits/token) on `split` and FID / IS by `quality` of a workdir's newest step."""
  import jax
  from engram_jax.studies import evaluate
  from engram_jax import workdir as workdir_lib
  from engram_jax.data import images
  trained = workdir_lib.load(workdir, kind="image")
  config, model, params, step = trained.config, trained.model, trained.params, trained.step
  data_cfg = run_config.image_data_config(config.data)
  row = {"step": step, "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
         "nll_bits_per_token": evaluate.nll_bits_per_token(
             model, params, images.eval_batches(data_cfg, split))}
  if quality is not None:
    row.update(quality(model, params))
  return row


def plot(rows: Sequence[dict]) -> Callable:
  def draw(fig):
    points = [r for r in rows if r["rho"] < 1.0]
    base = [r for r in rows if r["rho"] == 1.0][0]
    metrics = [m for m in ("fid", "nll_bits_per_token") if m in base]
    for i, metric in enumerate(metrics):
      ax = fig.add_subplot(1, len(metrics), i + 1)
      ax.plot([r["rho"] for r in points], [r[metric] for r in points], "o-", label="Engram")
      ax.axhline(base[metric], color="gray", linestyle="--", label="baseline")
      ax.set_xlabel("rho (backbone share of the budget)")
      ax.set_ylabel(metric)
      ax.legend()
    fig.subplots_adjust(wspace=0.35)
  return draw


def config_overrides(items: Sequence[str]) -> Callable:
  """`--set=FIELD=VALUE` (repeatable) -> a function applying them to a config."""
  return config_files.overrides(items)


def run(family: str, rhos: Sequence[float], root: str, *, steps: int, split: str,
        samples_per_class: int, seed: int = 0, overrides: Callable = None,
        feature_net_options: dict | None = None) -> list[str]:
  """Trains and evaluates the sweep; returns the report's paths.

  `overrides(config)` edits every point's config (data paths, batch size, mesh);
  `feature_net_options`: `evaluate.quality_from_config`'s network keywords.
  """
  from engram_jax import paths
  paths.local_output(root, "--workdir")  # the sweep's root: local reports and caches
  from engram_jax.studies import evaluate, reports
  points = variants(family, rhos)
  config = _image_configs().get_config(points[0][0])
  if overrides:
    overrides(config)  # a bad override fails here, before any training
  for variant, _ in points:
    train_point(variant, os.path.join(root, variant), steps, overrides)
  quality = None
  if samples_per_class:
    quality = evaluate.quality_from_config(config, split, samples_per_class=samples_per_class,
                                           seed=seed, cache_dir=root,
                                           **(feature_net_options or {}))
  rows = []
  for variant, rho in points:
    row = {"variant": variant, "rho": rho,
           **evaluate_point(os.path.join(root, variant), split, quality)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  header = (f"{steps} steps per point, split `{split}`, "
            + (f"FID/IS: {samples_per_class} samples per class, {quality.describe}"
               if quality else "NLL only"))
  return reports.write_report(root, "rho_sweep", [("points", rows)], plot(rows), header)


def main(argv=None) -> int:
  import argparse
  parser = cli.Parser(prog="python -m engram_jax.studies.rho_sweep", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="digits", choices=("digits", "ar_b"))
  parser.add_argument("--rhos", default="0.17,0.32,0.41,0.51,0.63,0.76,0.90")
  parser.add_argument("--workdir", required=True, help="root: one workdir per variant")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--split", default="test", choices=("val", "test"))
  parser.add_argument("--samples_per_class", type=int, default=20, help="0 = NLL only")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override for every point, repeatable, e.g. "
                           "--set=data.train_path=/codes/train.npz")
  from engram_jax.studies import feature_nets
  feature_nets.add_feature_net_flags(parser)
  args = parser.parse_args(argv)

  def body():
    rhos = cli.parse_list(args.rhos, "--rhos", float, example="0.32,0.51")
    if not all(0 < r < 1 for r in rhos):
      raise ValueError(f"--rhos={args.rhos!r}: give numbers in (0, 1), e.g. 0.32,0.51")
    if args.steps < 1 or args.samples_per_class < 0:
      raise ValueError("--steps must be >= 1 and --samples_per_class >= 0")
    options = feature_nets.feature_net_options(args)  # contradictions fail before training
    paths = run(args.family, rhos, args.workdir, steps=args.steps, split=args.split,
                samples_per_class=args.samples_per_class, seed=args.seed,
                overrides=config_overrides(args.set), feature_net_options=options)
    for path in paths:
      print(path, flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
