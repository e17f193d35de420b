"""Evaluate an image model: validation NLL in bits per token, and FID / IS of its samples.

`python -m engram_jax.studies.evaluate --workdir=W --split=test --samples_per_class=20`
(`evaluate_run`). The metrics live in `studies.fid`, the networks they run on (the
digits classifier, InceptionV3 behind a VQ decoder, plug-ins) in `studies.feature_nets`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import cli
from engram_jax import run_config
from engram_jax.models.image import ImageARModel
from engram_jax.progress import progress
from engram_jax.studies.feature_nets import (DigitsFeatureNet, add_feature_net_flags,
                                             feature_net_for, feature_net_options,
                                             load_reference_stats, split_images)
from engram_jax.studies.fid import (FeatureNet, features_of, frechet_distance, gaussian_fit,
                                    inception_score)


# ----------------------------------------------------------------------------------
# Sample quality and validation NLL of an image model
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sampler():
  from engram_jax.sampling import image as generate_image
  return jax.jit(generate_image.generate_images, static_argnums=0,
                 static_argnames=tuple(generate_image.SAMPLING_TYPES))


def generate_per_class(model: ImageARModel, params, samples_per_class: int, rng, *,
                       batch_size: int = 64, **sampling) -> tuple[np.ndarray, np.ndarray]:
  """Codes `[C * samples_per_class, H, W]` (class-major) and their labels.

  Runs fixed-size batches (the last one padded), so it compiles once.
  """
  labels = np.repeat(np.arange(model.cfg.num_classes, dtype=np.int32), samples_per_class)
  batch = min(batch_size, len(labels))
  codes = []
  starts = range(0, len(labels), batch)
  for i, start in progress(enumerate(starts), "sampling batches", len(starts)):
    chunk = labels[start:start + batch]
    padded = np.pad(chunk, (0, batch - len(chunk)))
    out = _sampler()(model, params, padded, jax.random.fold_in(rng, i), **sampling)
    codes.append(np.asarray(out)[:len(chunk)])
  return np.concatenate(codes), labels


def sample_quality(model: ImageARModel, params, net: FeatureNet, reference, *,
                   samples_per_class: int, rng, batch_size: int = 64,
                   **sampling) -> dict[str, float]:
  """FID against `reference` and IS of class-balanced samples.

  `reference`: features `[I, F]`, or a Gaussian fit `(mu [F], sigma [F, F])`.
  """
  codes, _ = generate_per_class(model, params, samples_per_class, rng,
                                batch_size=batch_size, **sampling)
  features, probs = features_of(net, codes)
  fit = reference if isinstance(reference, tuple) else gaussian_fit(reference)
  return {"fid": frechet_distance(*gaussian_fit(features), *fit),
          "inception_score": inception_score(probs), "samples": len(codes)}


@dataclasses.dataclass
class SampleQuality:
  """`quality(model, params)` -> FID / IS of class-balanced samples against a fixed
  reference (features `[I, F]` or `(mu, sigma)`); every call samples with the same key
  (common random numbers)."""
  net: FeatureNet
  reference: Any
  samples_per_class: int
  seed: int
  sampling: dict
  describe: str

  def __call__(self, model: ImageARModel, params) -> dict[str, float]:
    return sample_quality(model, params, self.net, self.reference,
                          samples_per_class=self.samples_per_class,
                          rng=jax.random.key(self.seed), **self.sampling)


def quality_from_config(config, split: str, *, samples_per_class: int, seed: int,
                        cache_dir: str, feature_net: str = "", inception_weights: str = "",
                        decoder: str = "", reference_stats: str = "") -> SampleQuality:
  """FID / IS for a workdir's config: its feature net (`feature_net_for`), the features
  of the `split` images as reference (or `reference_stats`' mu and sigma), the config's
  `sample` settings."""
  from engram_jax.sampling import image as generate_image
  net = feature_net_for(config, cache_dir, feature_net, inception_weights, decoder)
  if reference_stats:
    reference = load_reference_stats(reference_stats)
    against = f"reference stats {reference_stats}"
  else:
    data_cfg = run_config.image_data_config(config.data)
    reference = features_of(net, split_images(data_cfg, split)[0])[0]
    against = f"the `{split}` split"
  sampling = generate_image.sampling_settings(config)
  if isinstance(net, DigitsFeatureNet):
    what = f"digits classifier (test accuracy {net.accuracy:.3f})"
  elif inception_weights:
    what = f"FID InceptionV3 {inception_weights} after decoder {decoder}"
  else:
    what = f"feature net {feature_net}"
  describe = (f"{what}, against {against}, "
              + ", ".join(f"{k}={v}" for k, v in sampling.items()))
  return SampleQuality(net, reference, samples_per_class, seed, sampling, describe)


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model: ImageARModel, params, inputs_BxT, targets_BxT, hash_ids):
  from engram_jax.train_steps import cross_entropy
  logits = model.apply({"params": params}, inputs_BxT, hash_ids_BxTxLxH=hash_ids)
  return cross_entropy(logits, targets_BxT).sum(-1)  # per row: the host sums in float64


def nll_bits_per_token(model: ImageARModel, params, batches: Iterable[dict]) -> float:
  """Teacher-forced, class-conditioned NLL of every cell, in bits per token.

  Batches are `data.images` eval batches (`inputs` start with the class token); a
  batch's `hash_ids`, when present, replace in-graph hashing.
  """
  total, count = 0.0, 0
  for batch in progress(batches, "NLL batches"):
    total += float(np.sum(np.asarray(_nll_sum(
        model, params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
        batch.get("hash_ids")), np.float64)))
    count += int(np.size(batch["targets"]))
  if not count:
    raise ValueError("nll_bits_per_token: no batches; check --split and --max_batches")
  return total / count / math.log(2)


# ----------------------------------------------------------------------------------
# Command line: python -m engram_jax.studies.evaluate --workdir=DIR
# ----------------------------------------------------------------------------------
def evaluate_run(workdir: str, split: str = "val", *, max_batches: int = 0,
                 samples_per_class: int = 0, seed: int = 0, classifier_dir: str = "",
                 **feature_net) -> tuple[dict, str]:
  """(metrics, path of the json written) of an image run's newest checkpoint: NLL in bits
  per token on `split` (`max_batches` 0 = all) and, with `samples_per_class`, FID / IS of
  samples against the split (`feature_net`: `feature_net_options`' keywords). What
  `python -m engram_jax.studies.evaluate` runs."""
  import json
  from engram_jax import paths
  from engram_jax import workdir as workdir_lib
  from engram_jax.data import images
  trained = workdir_lib.load(workdir, kind="image")
  config, model, params, step = trained.config, trained.model, trained.params, trained.step
  data_cfg = run_config.image_data_config(config.data)
  batches = images.eval_batches(data_cfg, split, max_batches=max_batches or None)
  metrics = {"step": step, "split": split,
             "nll_bits_per_token": nll_bits_per_token(model, params, batches)}
  if samples_per_class:
    quality = quality_from_config(config, split, samples_per_class=samples_per_class,
                                  seed=seed, cache_dir=classifier_dir or workdir,
                                  **feature_net)
    metrics.update(quality(model, params), feature_net=quality.describe)
  path = paths.join(workdir, f"eval_{split}_step{step}.json")  # gs:// too
  paths.atomic_write_text(path, json.dumps(metrics, indent=1))
  return metrics, path


def build_parser() -> cli.Parser:
  """The evaluate command's flags (also the keywords of `jobs.evaluate`)."""
  parser = cli.Parser(
      prog="python -m engram_jax.studies.evaluate",
      description="NLL (bits/token) on a split, and FID / IS of samples against it, of "
                  "an image workdir's newest checkpoint; writes DIR/eval_<split>_step<N>.json.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--split", default="test", choices=("train", "val", "test"))
  parser.add_argument("--max_batches", type=int, default=0, help="0 = every full batch")
  parser.add_argument("--samples_per_class", type=int, default=20, help="0 = NLL only")
  parser.add_argument("--seed", type=int, default=0)
  add_feature_net_flags(parser)
  parser.add_argument("--classifier_dir", default="",
                      help="where the digits classifier is cached (default: the workdir)")
  return parser


def check_counts(args) -> None:
  """A ValueError naming the first negative count flag, before any work."""
  for name in ("max_batches", "samples_per_class"):
    if getattr(args, name) < 0:
      raise ValueError(f"--{name}={getattr(args, name)}: use 0 or a positive integer")


def main(argv=None) -> int:
  import json

  args = build_parser().parse_args(argv)

  def body():
    check_counts(args)
    options = feature_net_options(args)
    metrics, path = evaluate_run(args.workdir, args.split, max_batches=args.max_batches,
                                 samples_per_class=args.samples_per_class, seed=args.seed,
                                 classifier_dir=args.classifier_dir, **options)
    print(json.dumps(metrics), flush=True)
    print(path, flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
