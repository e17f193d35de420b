"""FID and Inception Score from a pluggable feature network (NumPy float64 after it).

A `FeatureNet` maps code grids `[I, Hi, Wi]` to (features `[I, F]`, class probabilities
`[I, C]`). FID compares Gaussian fits of the features of generated and held-out images
(or precomputed `mu`/`sigma`); IS scores how confident and how varied the class
predictions of generated images are. FID's matrix square root uses `eigh` of symmetric
PSD matrices (no scipy).
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class FeatureNet(Protocol):
  """Code grids `[I, Hi, Wi]` -> (features `[I, F]`, class probabilities `[I, C]`)."""

  def __call__(self, images_IxHixWi) -> tuple[np.ndarray, np.ndarray]:
    ...


def features_of(net: FeatureNet, images_IxHixWi) -> tuple[np.ndarray, np.ndarray]:
  """Runs `net` and checks what it returns (float64 NumPy arrays)."""
  images_IxHixWi = np.asarray(images_IxHixWi)
  features, probs = net(images_IxHixWi)
  features, probs = np.asarray(features, np.float64), np.asarray(probs, np.float64)
  n = len(images_IxHixWi)
  if features.ndim != 2 or len(features) != n:
    raise ValueError(f"feature net: features have shape {features.shape}; return [I, F] "
                     f"for I={n} images")
  if probs.ndim != 2 or len(probs) != n:
    raise ValueError(f"feature net: class probabilities have shape {probs.shape}; return "
                     f"[I, C] for I={n} images")
  if n and (np.any(probs < -1e-6) or not np.allclose(probs.sum(-1), 1.0, atol=1e-4)):
    raise ValueError("feature net: class probabilities must be >= 0 and sum to 1 per "
                     "image (return softmax probabilities, not logits)")
  return features, probs


# ----------------------------------------------------------------------------------
# FID and Inception Score
# ----------------------------------------------------------------------------------
def gaussian_fit(features_IxF) -> tuple[np.ndarray, np.ndarray]:
  """(mean `[F]`, covariance `[F, F]`, unbiased) in float64."""
  x = np.asarray(features_IxF, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"features have shape {x.shape}; FID needs [I, F] with I >= 2")
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


def fid(features_a_IxF, features_b_IxF) -> float:
  """Frechet distance between Gaussian fits of two feature sets."""
  return frechet_distance(*gaussian_fit(features_a_IxF), *gaussian_fit(features_b_IxF))


def inception_score(probs_IxC, splits: int = 1) -> float:
  """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction; averaged over `splits`.

  1 when every image gets the same prediction; C for confident, uniformly spread ones.
  """
  p = np.asarray(probs_IxC, np.float64)
  if p.ndim != 2 or not len(p):
    raise ValueError(f"class probabilities have shape {p.shape}; use [I, C] with I >= 1")
  if not 1 <= splits <= len(p):
    raise ValueError(f"splits={splits}: use 1..I (I={len(p)} images)")
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(0, keepdims=True)
    terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) -
                                       np.log(np.where(part > 0, marginal, 1.0))), 0.0)
    scores.append(math.exp(terms.sum(-1).mean()))
  return float(np.mean(scores))
