"""evaluate: FID (closed forms, symmetry, translation, self ~ 0, noise large), IS
(uniform one-hot = C, formula), the digits classifier (accuracy, cache), feature-net
contract, FID against saved reference statistics, NLL in bits per token, and the
evaluate CLI."""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.studies import evaluate
from engram_jax.studies import feature_nets
from engram_jax.studies import fid
from engram_jax.data import images
from engram_jax.models import image
from engram_jax.train_steps import cross_entropy

DIGITS = images.ImageDataConfig(batch_size=30)
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
  return feature_nets.digits_feature_net(str(tmp_path_factory.mktemp("classifier")), levels=8)


@pytest.fixture(scope="module")
def test_images():
  return feature_nets.split_images(DIGITS, "test")


# ----------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------
def _correlated(n, f, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) + rng.normal(size=f)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
  linalg = pytest.importorskip("scipy.linalg")
  x, y = _correlated(300, 6, 1), _correlated(200, 6, 2)
  (m1, s1), (m2, s2) = fid.gaussian_fit(x), fid.gaussian_fit(y)
  want = (np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
  np.testing.assert_allclose(fid.fid(x, y), want, rtol=1e-9)


def test_fid_is_symmetric_and_translation_invariant():
  x, y = _correlated(300, 8, 3), _correlated(250, 8, 4)
  d = fid.fid(x, y)
  assert d > 1.0
  np.testing.assert_allclose(fid.fid(y, x), d, rtol=1e-9)
  shift = RNG.normal(size=8) * 100
  np.testing.assert_allclose(fid.fid(x + shift, y + shift), d, rtol=1e-8)
  assert fid.fid(x + shift, y) > d + 100  # shifting one side only is seen


def test_fid_of_held_out_split_against_itself_is_zero_and_against_noise_large(
    digits_net, test_images):
  test, _ = fid.features_of(digits_net, test_images[0])
  val, _ = fid.features_of(digits_net, feature_nets.split_images(DIGITS, "val")[0])
  noise_codes = RNG.integers(0, DIGITS.levels, test_images[0].shape)
  noise, _ = fid.features_of(digits_net, noise_codes)
  scale = np.trace(fid.gaussian_fit(test)[1])
  assert fid.fid(test, test) < 1e-6 * scale
  real = fid.fid(val, test)
  assert fid.fid(test, noise) > 10 * real, (real, fid.fid(test, noise))


def test_fid_rejects_mismatched_features():
  with pytest.raises(ValueError, match="one feature network"):
    fid.fid(np.zeros((4, 3)), np.zeros((4, 2)))


# ----------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_inception_score_of_uniform_one_hot_predictions_is_the_class_count(classes):
  probs = np.eye(classes)[np.arange(3 * classes) % classes]
  np.testing.assert_allclose(fid.inception_score(probs), classes, rtol=1e-12)
  np.testing.assert_allclose(fid.inception_score(probs, splits=3), classes, rtol=1e-12)


def test_inception_score_formula_and_floor():
  p = np.array([[0.5, 0.5], [1.0, 0.0]])
  marginal = p.mean(0)
  kl = [0.5 * np.log(0.5 / marginal[0]) + 0.5 * np.log(0.5 / marginal[1]),
        np.log(1.0 / marginal[0])]
  np.testing.assert_allclose(fid.inception_score(p), np.exp(np.mean(kl)), rtol=1e-12)
  same = np.tile([[0.2, 0.3, 0.5]], (5, 1))
  np.testing.assert_allclose(fid.inception_score(same), 1.0, rtol=1e-12)


# ----------------------------------------------------------------------------------
# The digits feature network
# ----------------------------------------------------------------------------------
def test_digits_classifier_is_accurate_on_held_out_split(digits_net, test_images):
  assert digits_net.accuracy > 0.9
  features, probs = fid.features_of(digits_net, test_images[0])
  assert features.shape == (len(test_images[1]), 64) and probs.shape[1] == 10
  np.testing.assert_allclose(np.mean(probs.argmax(1) == test_images[1]), digits_net.accuracy)


def test_digits_classifier_loads_from_cache_identically(digits_net, test_images, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("retrained although the cache exists")
  monkeypatch.setattr(feature_nets, "train_digits_classifier", no_training)
  cached = feature_nets.digits_feature_net(digits_net.path.rsplit("/", 1)[0], levels=8)
  assert cached.path == digits_net.path and cached.accuracy == digits_net.accuracy
  jax.tree_util.tree_map(np.testing.assert_array_equal, cached.params, digits_net.params)
  for a, b in zip(cached(test_images[0]), digits_net(test_images[0])):
    np.testing.assert_array_equal(a, b)


def test_features_of_checks_the_contract():
  logits_net = lambda x: (np.zeros((len(x), 3)), np.ones((len(x), 4)))
  with pytest.raises(ValueError, match="sum to 1"):
    fid.features_of(logits_net, np.zeros((2, 8, 8)))
  short_net = lambda x: (np.zeros((1, 3)), np.full((len(x), 2), 0.5))
  with pytest.raises(ValueError, match=r"return \[I, F\]"):
    fid.features_of(short_net, np.zeros((2, 8, 8)))


def make_uniform_net():
  """A FeatureNet factory for `load_feature_net` (pixel features, uniform probs)."""
  return lambda x: (np.asarray(x, float).reshape(len(x), -1), np.full((len(x), 10), 0.1))


def test_load_feature_net_from_a_user_factory():
  net = feature_nets.load_feature_net("tests.test_evaluate:make_uniform_net")
  features, probs = fid.features_of(net, np.ones((3, 8, 8)))
  assert features.shape == (3, 64) and fid.inception_score(probs) == pytest.approx(1.0)
  for spec, match in (("no_colon", "pkg.module:factory"),
                      ("tests.test_evaluate:missing", "cannot load")):
    with pytest.raises(ValueError, match=match):
      feature_nets.load_feature_net(spec)


def test_reference_stats_give_the_fid_of_the_features_they_summarise(tmp_path, params):
  """FID against saved (mu, sigma) equals FID against the features they were fit to."""
  from configs import image as image_configs
  config = image_configs.get_config("digits")
  spec = "tests.test_evaluate:make_uniform_net"
  kwargs = dict(samples_per_class=1, seed=0, cache_dir=str(tmp_path), feature_net=spec)
  by_split = evaluate.quality_from_config(config, "test", **kwargs)
  mu, sigma = fid.gaussian_fit(by_split.reference)
  path = str(tmp_path / "stats.npz")
  np.savez(path, mu=mu, sigma=sigma)
  by_stats = evaluate.quality_from_config(config, "test", reference_stats=path, **kwargs)
  assert isinstance(by_stats.reference, tuple) and path in by_stats.describe
  np.testing.assert_array_equal(by_stats.reference[1], sigma)
  want, got = by_split(MODEL, params), by_stats(MODEL, params)
  assert want["fid"] > 0
  np.testing.assert_allclose(got["fid"], want["fid"], rtol=1e-9)


def test_reference_stats_errors_name_the_flag(tmp_path):
  path = str(tmp_path / "bad.npz")
  np.savez(path, mu=np.zeros(3))
  with pytest.raises(ValueError, match=r"--reference_stats=.*needs 'mu' \[F\] and 'sigma'"):
    feature_nets.load_reference_stats(path)
  np.savez(path, mu=np.zeros(3), sigma=np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"mu \(3,\) and sigma \(3, 2\)"):
    feature_nets.load_reference_stats(path)
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="cannot read it as an npz"):
    feature_nets.load_reference_stats(str(tmp_path / "text.npz"))
  with pytest.raises(ValueError, match="--reference_stats=.*no such file"):
    feature_nets.feature_net_options(argparse.Namespace(
        feature_net="", inception_weights="", decoder="",
        reference_stats=str(tmp_path / "none.npz")))


# ----------------------------------------------------------------------------------
# NLL
# ----------------------------------------------------------------------------------
CFG = image.make_image_config(
    dict(width=16, depth=2, num_heads=2, num_kv_heads=2,
         engram=dict(layers=(1,), max_ngram=3, heads=2, embed_per_ngram=8,
                     table_size=(31,), table_row_multiple=8)), DIGITS)
MODEL = image.ImageARModel(CFG)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(jax.jit(MODEL.init)(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))[
      "params"]


def test_nll_bits_per_token_matches_cross_entropy_and_uniform_logits(params):
  batches = list(images.eval_batches(DIGITS, "val", max_batches=2))
  logits = [MODEL.apply({"params": params}, b["inputs"]) for b in batches]
  want = np.mean([cross_entropy(l, b["targets"]) for l, b in zip(logits, batches)]) / np.log(2)
  np.testing.assert_allclose(evaluate.nll_bits_per_token(MODEL, params, batches), want,
                             rtol=1e-5)
  flat = {**params, "unembed": {"kernel": jnp.zeros_like(params["unembed"]["kernel"])}}
  np.testing.assert_allclose(evaluate.nll_bits_per_token(MODEL, flat, batches),
                             np.log2(CFG.codebook_size), rtol=1e-6)


def test_generate_per_class_is_class_major_with_fixed_batches(params):
  codes, labels = evaluate.generate_per_class(MODEL, params, 3, jax.random.key(0),
                                              batch_size=8, cfg_scale=0.0, temperature=1.0,
                                              top_k=0, top_p=1.0)
  assert codes.shape == (30, 8, 8) and codes.min() >= 0 and codes.max() < CFG.codebook_size
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
