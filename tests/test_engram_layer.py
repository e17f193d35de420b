"""The Engram layer against a NumPy transcription of the paper's equations."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import config as config_lib
from engram_jax.layers.engram import Engram

CFG = config_lib.EngramConfig(layers=(0,), max_ngram=3, heads=2, embed_per_ngram=8,
                              table_size=(11,), kernel_size=4)
ROWS, B, T, M, D = 50, 2, 13, 2, 16


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, T, M, D)).astype(np.float32)
  ids = rng.integers(0, ROWS, size=(B, T, CFG.orders * CFG.heads)).astype(np.int32)
  return h, ids


def _init(cfg, seed=0, randomise_conv=True):
  h, ids = _inputs()
  layer = Engram(cfg, ROWS)
  params = nn.unbox(layer.init(jax.random.key(seed), h, ids))["params"]
  if randomise_conv:  # zero at init; make the conv matter for the test
    params["conv"] = jax.random.normal(jax.random.key(9), params["conv"].shape) * 0.5
  return layer, params


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def reference_engram(params, h, ids, gate="learned", dilation=3):
  """Direct transcription of the equations (DESIGN.md section 3), loops and all."""
  p = jax.tree_util.tree_map(np.asarray, params)
  e = p["table"][ids].reshape(B, T, -1)                        # concat_{n,k} E[z]
  value = e @ p["value"]["kernel"]                             # W_V e, shared
  alpha = np.zeros((B, T, M, 1))
  for m in range(M):
    if gate == "learned":
      key = e @ p["key"][m]                                    # W_K^m e
      s = np.sum(_rms(h[:, :, m], p["hidden_norm"]["scale"][m]) *
                 _rms(key, p["key_norm"]["scale"][m]), -1) / np.sqrt(D)
      alpha[:, :, m, 0] = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(np.maximum(abs(s), 1e-6))))
    else:
      alpha[:, :, m, 0] = gate
  v = alpha * value[:, :, None, :]
  x = _rms(v, p["conv_norm"]["scale"])
  w = p["conv"]                                                # [taps, M, D]
  conv = np.zeros_like(x)
  for t in range(T):
    for j in range(w.shape[0]):
      src = t - (w.shape[0] - 1 - j) * dilation                # causal, dilation N
      if src >= 0:
        conv[:, t] += w[j] * x[:, src]
  return v + conv / (1 + np.exp(-conv))                        # v + SiLU(conv)


def test_matches_equations_with_branches():
  layer, params = _init(CFG)
  h, ids = _inputs()
  got = layer.apply({"params": params}, h, ids)
  assert got.shape == (B, T, M, D)
  np.testing.assert_allclose(got, reference_engram(params, h, ids), rtol=2e-5, atol=2e-5)


def test_constant_gate_and_off():
  h, ids = _inputs()
  const = dataclasses.replace(CFG, gate=0.25)
  layer, params = _init(const)
  np.testing.assert_allclose(layer.apply({"params": params}, h, ids),
                             reference_engram(params, h, ids, gate=0.25), rtol=2e-5, atol=2e-5)
  off = Engram(dataclasses.replace(CFG, gate="off"), ROWS)
  assert "key" not in params  # a fixed gate has no key projection
  out = off.apply({"params": params}, h, ids)
  assert np.all(np.asarray(out) == 0.0)  # exactly zero, not approximately


def test_conv_starts_at_zero_so_output_is_gated_value():
  layer, params = _init(CFG, randomise_conv=False)
  assert np.all(np.asarray(params["conv"]) == 0)
  h, ids = _inputs()
  out = np.asarray(layer.apply({"params": params}, h, ids))
  ref = reference_engram(params, h, ids)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_causal_in_time():
  layer, params = _init(CFG)
  h, ids = _inputs()
  base = np.asarray(layer.apply({"params": params}, h, ids))
  h2, ids2 = h.copy(), ids.copy()
  h2[:, 2] += 1.0
  ids2[:, 2] = (ids2[:, 2] + 1) % ROWS
  out = np.asarray(layer.apply({"params": params}, h2, ids2))
  changed = [not np.allclose(out[:, t], base[:, t]) for t in range(T)]
  # Position 2 reaches exactly t = 2 + j * dilation for the 4 taps, nothing earlier.
  assert [t for t in range(T) if changed[t]] == [2, 5, 8, 11]
  np.testing.assert_array_equal(out[:, :2], base[:, :2])


def test_frozen_table_gets_no_gradient():
  frozen = dataclasses.replace(CFG, table_trainable=False)
  layer, params = _init(frozen)
  h, ids = _inputs()
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, h, ids) ** 2))(params)
  assert np.all(np.asarray(grads["table"]) == 0)
  assert np.any(np.asarray(grads["value"]["kernel"]) != 0)
