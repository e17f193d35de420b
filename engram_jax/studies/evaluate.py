"""Image-model metrics: FID and Inception Score from a pluggable feature network, and
validation NLL in bits per token.

A `FeatureNet` maps code grids `[N, H, W]` to (features `[N, F]`, class probabilities
`[N, C]`). FID compares Gaussian fits of the features of generated and held-out images
(or precomputed `mu`/`sigma`, `--reference_stats`); IS scores how confident and how
varied the class predictions of generated images are.

* digits: `digits_feature_net` trains a small flax MLP on the digits train split
  (seeded, jit), caches it as an npz and reports its held-out (test split) accuracy;
  features are its penultimate layer.
* ImageNet (VQ codes): `--inception_weights=PATH --decoder=pkg.module:fn` runs your VQ
  decoder, then the FID InceptionV3 of `engram_jax.studies.inception` (pytorch-fid's network,
  weights converted from a file you downloaded yourself; nothing is downloaded here).
  Or `--feature_net=pkg.module:factory`: a factory you write that returns any
  FeatureNet. docs/probes.md says what each must return.

Everything here is NumPy float64 after the network: FID's matrix square root uses
`eigh` of symmetric PSD matrices (no scipy).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from typing import Any, Iterable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.models.image import ImageARModel
from engram_jax.studies import npz
from engram_jax.progress import progress


class FeatureNet(Protocol):
  """Code grids `[N, H, W]` -> (features `[N, F]`, class probabilities `[N, C]`)."""

  def __call__(self, images_NxHxW) -> tuple[np.ndarray, np.ndarray]:
    ...


def features_of(net: FeatureNet, images_NxHxW) -> tuple[np.ndarray, np.ndarray]:
  """Runs `net` and checks what it returns (float64 NumPy arrays)."""
  images_NxHxW = np.asarray(images_NxHxW)
  features, probs = net(images_NxHxW)
  features, probs = np.asarray(features, np.float64), np.asarray(probs, np.float64)
  n = len(images_NxHxW)
  if features.ndim != 2 or len(features) != n:
    raise ValueError(f"feature net: features have shape {features.shape}; return [N, F] "
                     f"for N={n} images")
  if probs.ndim != 2 or len(probs) != n:
    raise ValueError(f"feature net: class probabilities have shape {probs.shape}; return "
                     f"[N, C] for N={n} images")
  if n and (np.any(probs < -1e-6) or not np.allclose(probs.sum(-1), 1.0, atol=1e-4)):
    raise ValueError("feature net: class probabilities must be >= 0 and sum to 1 per "
                     "image (return softmax probabilities, not logits)")
  return features, probs


# ----------------------------------------------------------------------------------
# FID and Inception Score
# ----------------------------------------------------------------------------------
def gaussian_fit(features_NxF) -> tuple[np.ndarray, np.ndarray]:
  """(mean `[F]`, covariance `[F, F]`, unbiased) in float64."""
  x = np.asarray(features_NxF, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"features have shape {x.shape}; FID needs [N, F] with N >= 2")
  return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(sigma_FxF) -> np.ndarray:
  """Symmetric square root of a PSD matrix (negative rounding-noise eigenvalues -> 0)."""
  vals, vecs = np.linalg.eigh((sigma_FxF + sigma_FxF.T) / 2)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1_F, sigma1_FxF, mu2_F, sigma2_FxF) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

  tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the eigenvalues of S1 S2 are
  those of the symmetric PSD S1^{1/2} S2 S1^{1/2}, so `eigh` suffices (no scipy) and
  the result is symmetric in the two fits up to rounding.
  """
  mu1, mu2 = np.asarray(mu1_F, np.float64), np.asarray(mu2_F, np.float64)
  s1, s2 = np.asarray(sigma1_FxF, np.float64), np.asarray(sigma2_FxF, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"Gaussian fits disagree: means {mu1.shape} vs {mu2.shape}, "
                     f"covariances {s1.shape} vs {s2.shape}; use one feature network")
  root1 = _sqrt_psd(s1)
  middle = root1 @ s2 @ root1
  cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross, 0.0))


def fid(features_a_NxF, features_b_MxF) -> float:
  """Frechet distance between Gaussian fits of two feature sets."""
  return frechet_distance(*gaussian_fit(features_a_NxF), *gaussian_fit(features_b_MxF))


def inception_score(probs_NxC, splits: int = 1) -> float:
  """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction; averaged over `splits`.

  1 when every image gets the same prediction; C for confident, uniformly spread ones.
  """
  p = np.asarray(probs_NxC, np.float64)
  if p.ndim != 2 or not len(p):
    raise ValueError(f"class probabilities have shape {p.shape}; use [N, C] with N >= 1")
  if not 1 <= splits <= len(p):
    raise ValueError(f"splits={splits}: use 1..N (N={len(p)} images)")
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(0, keepdims=True)
    terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) -
                                       np.log(np.where(part > 0, marginal, 1.0))), 0.0)
    scores.append(math.exp(terms.sum(-1).mean()))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------------
# The digits feature network
# ----------------------------------------------------------------------------------
class DigitsMLP(nn.Module):
  """Codes `[N, H, W]` (scaled to [0, 1]) -> (penultimate ReLU features, logits)."""
  levels: int
  num_classes: int = 10
  hidden: int = 128
  features: int = 64

  @nn.compact
  def __call__(self, codes_NxHxW):
    x = codes_NxHxW.reshape(codes_NxHxW.shape[0], -1).astype(jnp.float32)
    x = x / (self.levels - 1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    f = nn.relu(nn.Dense(self.features, name="features")(x))
    return f, nn.Dense(self.num_classes, name="logits")(f)


@functools.lru_cache(maxsize=None)
def _mlp_apply(levels: int):
  return jax.jit(DigitsMLP(levels).apply)


@dataclasses.dataclass
class DigitsFeatureNet:
  """The trained digits classifier as a FeatureNet, with its held-out accuracy."""
  params: Any
  levels: int
  accuracy: float      # on the test split, which the classifier never trains on
  path: str            # the npz it was loaded from or saved to

  def __call__(self, images_NxHxW):
    features, logits = _mlp_apply(self.levels)({"params": self.params},
                                               jnp.asarray(images_NxHxW, jnp.int32))
    return np.asarray(features), np.asarray(jax.nn.softmax(logits, -1))


def split_images(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All codes `[N, H, W]` and labels `[N]` of a split, in stored order."""
  from engram_jax.data import images
  source = images.image_source(data_cfg, split)
  items = [source[i] for i in range(len(source))]
  return (np.stack([x["codes"] for x in items]).astype(np.int32),
          np.array([x["label"] for x in items], np.int32))


def train_digits_classifier(levels: int, split_seed: int = 0, seed: int = 0,
                            steps: int = 400, batch_size: int = 128,
                            learning_rate: float = 3e-3) -> tuple[Any, float]:
  """(params, test accuracy) of a DigitsMLP trained on the train split with AdamW."""
  import optax

  from engram_jax.data import images
  data_cfg = images.ImageDataConfig(source="digits", levels=levels, split_seed=split_seed)
  train_x, train_y = split_images(data_cfg, "train")
  test_x, test_y = split_images(data_cfg, "test")
  model = DigitsMLP(levels)
  params = model.init(jax.random.key(seed), train_x[:1])["params"]
  tx = optax.adamw(learning_rate, weight_decay=1e-4)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in progress(range(steps), "digits classifier training steps"):
    rows = rng.integers(0, len(train_x), batch_size)
    params, opt_state = step(params, opt_state, train_x[rows], train_y[rows])
  logits = _mlp_apply(levels)({"params": params}, test_x)[1]
  accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_y))
  return jax.device_get(params), accuracy


def digits_feature_net(cache_dir: str, levels: int, split_seed: int = 0, seed: int = 0,
                       steps: int = 400) -> DigitsFeatureNet:
  """The digits classifier of these settings: loaded from `cache_dir`, else trained there.

  The npz holds the flattened params (`params/<module>/<name>`) and the test accuracy.
  Training is seeded, so every workdir that trains one gets the same network.
  """
  from flax import traverse_util

  from engram_jax import paths
  paths.local_output(cache_dir, "--classifier_dir")
  path = os.path.join(cache_dir, f"digits_classifier_levels{levels}_split{split_seed}_"
                                 f"seed{seed}_steps{steps}.npz")
  if os.path.exists(path):
    stored = npz.read_npz(path, f"digits classifier cache {path!r}", "delete it to retrain")
    flat = {tuple(k.split("/")[1:]): v for k, v in stored.items() if k.startswith("params/")}
    return DigitsFeatureNet(traverse_util.unflatten_dict(flat), levels,
                            float(stored["accuracy"]), path)
  params, accuracy = train_digits_classifier(levels, split_seed, seed, steps)
  os.makedirs(cache_dir, exist_ok=True)
  flat = {"params/" + "/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(params).items()}
  npz.save_npz(path, {"accuracy": np.float64(accuracy), **flat})
  return DigitsFeatureNet(params, levels, accuracy, path)


def _import_attr(flag: str, spec: str, name: str, what: str):
  """`"pkg.module:name"` -> that module attribute; a ValueError naming `--flag` if not."""
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"--{flag}={spec!r}: use 'pkg.module:{name}', {what}")
  try:
    return getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as err:
    raise ValueError(f"--{flag}={spec!r}: cannot load it ({err}); put the module on "
                     "PYTHONPATH") from None


def load_feature_net(spec: str) -> FeatureNet:
  """`"pkg.module:factory"`: imports the module and returns `factory()`.

  The factory is yours (e.g. a VQ decoder followed by a network whose weights you keep
  on local disk); it must return a callable with the FeatureNet contract.
  """
  factory = _import_attr("feature_net", spec, "factory", "a function that returns a "
                         "FeatureNet (images [N, H, W] -> (features [N, F], probs [N, C]))")
  net = factory()
  if not callable(net):
    raise ValueError(f"--feature_net={spec!r}: {spec.partition(':')[2]}() returned "
                     f"{type(net).__name__}, not a callable FeatureNet")
  return net


def load_decoder(spec: str):
  """`"pkg.module:fn"`: your VQ decoder, codes `[N, H, W]` -> RGB `[N, h, w, 3]` in [0, 1]."""
  decode = _import_attr("decoder", spec, "fn", "a function mapping codes [N, H, W] to "
                        "RGB images [N, h, w, 3] in [0, 1]")
  if not callable(decode):
    raise ValueError(f"--decoder={spec!r} is a {type(decode).__name__}, not a function")
  return decode


def check_feature_net_choice(spec: str = "", inception_weights: str = "",
                             decoder: str = "") -> None:
  """Fails fast (before any checkpoint loads) on a contradictory choice of network."""
  if spec and (inception_weights or decoder):
    raise ValueError("--feature_net and --inception_weights/--decoder both choose the "
                     "feature network; pass one of them")
  if inception_weights and not decoder:
    raise ValueError(f"--inception_weights={inception_weights!r} needs "
                     "--decoder=pkg.module:fn, a function mapping codes [N, H, W] to RGB "
                     "images [N, h, w, 3] in [0, 1] (your VQ decoder)")
  if decoder and not inception_weights:
    raise ValueError(f"--decoder={decoder!r} needs --inception_weights=PATH, the npz "
                     "that `python -m engram_jax.studies.inception convert` writes (docs/probes.md)")


def feature_net_for(config, cache_dir: str, spec: str = "", inception_weights: str = "",
                    decoder: str = "") -> FeatureNet:
  """The network FID / IS use: `spec`'s factory; or `decoder` then the FID InceptionV3
  with weights from `inception_weights`; for digits data the cached classifier."""
  check_feature_net_choice(spec, inception_weights, decoder)
  if spec:
    return load_feature_net(spec)
  if inception_weights:
    from engram_jax.studies import inception as inception
    return inception.InceptionFeatureNet(inception_weights, load_decoder(decoder))
  data = config.data
  if data.source != "digits":
    raise ValueError(f"data.source={data.source!r} has no built-in feature network: pass "
                     "--inception_weights=PATH --decoder=pkg.module:fn or "
                     "--feature_net=pkg.module:factory (see docs/probes.md), or "
                     "--samples_per_class=0 to skip FID and IS")
  return digits_feature_net(cache_dir, data.levels, data.split_seed)


def load_reference_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu `[F]`, sigma `[F, F]`) from an npz with those keys (pytorch-fid `--save-stats`,
  ADM reference batches): FID against them instead of the split's features."""
  stored = npz.read_npz(path, f"--reference_stats={path!r}")
  if not {"mu", "sigma"} <= set(stored):
    raise ValueError(f"--reference_stats={path!r} has keys {sorted(stored)}; it needs 'mu' "
                     "[F] and 'sigma' [F, F]")
  mu, sigma = (np.asarray(stored[k], np.float64) for k in ("mu", "sigma"))
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f"--reference_stats={path!r}: mu {mu.shape} and sigma {sigma.shape}; "
                     "use mu [F] and sigma [F, F]")
  return mu, sigma


def add_feature_net_flags(parser) -> None:
  """The flags that choose the FID / IS network, shared by the evaluate and probes CLIs."""
  parser.add_argument("--feature_net", default="",
                      help="pkg.module:factory returning a FeatureNet (non-digits data)")
  parser.add_argument("--inception_weights", default="",
                      help="npz of the FID InceptionV3 (python -m engram_jax.studies.inception "
                           "convert); needs --decoder")
  parser.add_argument("--decoder", default="",
                      help="pkg.module:fn mapping codes [N, H, W] to RGB [N, h, w, 3] in "
                           "[0, 1], run before --inception_weights' network")
  parser.add_argument("--reference_stats", default="",
                      help="npz with mu [F], sigma [F, F]: FID against these instead of "
                           "the split's features")


def feature_net_options(args) -> dict[str, str]:
  """`quality_from_config` keywords from the parsed flags, checked before any work."""
  options = {k: getattr(args, k) for k in ("feature_net", "inception_weights", "decoder",
                                           "reference_stats")}
  check_feature_net_choice(args.feature_net, args.inception_weights, args.decoder)
  for flag in ("inception_weights", "reference_stats"):
    if options[flag] and not os.path.isfile(options[flag]):
      raise ValueError(f"--{flag}={options[flag]!r}: no such file (docs/probes.md says how "
                       "to make it; nothing is downloaded)")
  return options


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

  `reference`: features `[N, F]`, or a Gaussian fit `(mu [F], sigma [F, F])`.
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
  reference (features `[N, F]` or `(mu, sigma)`); every call samples with the same key
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
  from engram_jax.data import images
  net = feature_net_for(config, cache_dir, feature_net, inception_weights, decoder)
  if reference_stats:
    reference = load_reference_stats(reference_stats)
    against = f"reference stats {reference_stats}"
  else:
    data_cfg = images.ImageDataConfig(**config.data.to_dict())
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
  from engram_jax.train import cross_entropy
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
  data_cfg = images.ImageDataConfig(**config.data.to_dict())
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


def main(argv=None) -> int:
  import argparse
  import json

  parser = argparse.ArgumentParser(
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
  args = parser.parse_args(argv)
  def body():
    for name in ("max_batches", "samples_per_class"):
      if getattr(args, name) < 0:
        raise ValueError(f"--{name}={getattr(args, name)}: use 0 or a positive integer")
    options = feature_net_options(args)
    metrics, path = evaluate_run(args.workdir, args.split, max_batches=args.max_batches,
                                 samples_per_class=args.samples_per_class, seed=args.seed,
                                 classifier_dir=args.classifier_dir, **options)
    print(json.dumps(metrics), flush=True)
    print(path, flush=True)
  from engram_jax import cli
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
