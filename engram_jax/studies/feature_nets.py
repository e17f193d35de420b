"""The feature networks FID / IS run on: the built-in digits classifier, plug-ins.

* digits: `digits_feature_net` trains a small flax MLP on the digits train split
  (seeded, jit), caches it as an npz and reports its held-out (test split) accuracy;
  features are its penultimate layer.
* ImageNet (VQ codes): `--inception_weights=PATH --decoder=pkg.module:fn` runs your VQ
  decoder, then the FID InceptionV3 of `engram_jax.studies.inception` (pytorch-fid's
  network, weights converted from a file you downloaded yourself; nothing is downloaded
  here). Or `--feature_net=pkg.module:factory`: a factory you write that returns any
  FeatureNet. docs/probes.md says what each must return.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.progress import progress
from engram_jax import npz_files as npz
from engram_jax.studies.fid import FeatureNet

# ----------------------------------------------------------------------------------
# The digits feature network
# ----------------------------------------------------------------------------------
class DigitsMLP(nn.Module):
  """Codes `[I, Hi, Wi]` (scaled to [0, 1]) -> (penultimate ReLU features, logits)."""
  levels: int
  num_classes: int = 10
  hidden: int = 128
  features: int = 64

  @nn.compact
  def __call__(self, codes_IxHixWi):
    x = codes_IxHixWi.reshape(codes_IxHixWi.shape[0], -1).astype(jnp.float32)
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

  def __call__(self, images_IxHixWi):
    features, logits = _mlp_apply(self.levels)({"params": self.params},
                                               jnp.asarray(images_IxHixWi, jnp.int32))
    return np.asarray(features), np.asarray(jax.nn.softmax(logits, -1))


def split_images(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All codes `[I, Hi, Wi]` and labels `[I]` of a split, in stored order."""
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
                         "FeatureNet (images [I, Hi, Wi] -> (features [I, F], probs [I, C]))")
  net = factory()
  if not callable(net):
    raise ValueError(f"--feature_net={spec!r}: {spec.partition(':')[2]}() returned "
                     f"{type(net).__name__}, not a callable FeatureNet")
  return net


def load_decoder(spec: str):
  """`"pkg.module:fn"`: your VQ decoder, codes `[I, Hi, Wi]` -> RGB `[I, Hp, Wp, 3]` in
  [0, 1]."""
  decode = _import_attr("decoder", spec, "fn", "a function mapping codes [I, Hi, Wi] to "
                        "RGB images [I, Hp, Wp, 3] in [0, 1]")
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
                     "--decoder=pkg.module:fn, a function mapping codes [I, Hi, Wi] to RGB "
                     "images [I, Hp, Wp, 3] in [0, 1] (your VQ decoder)")
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
    from engram_jax.studies import inception
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
                      help="pkg.module:fn mapping codes [I, Hi, Wi] to RGB [I, Hp, Wp, 3] in "
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
