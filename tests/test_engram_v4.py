"""engram.variant = "v4" (DeepSeek-V4.1's Engram layer) == a NumPy transcription."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax.layers.engram import Engram

CFG = config_lib.EngramConfig(layers=(0,), max_ngram=3, heads=2, embed_per_ngram=16,
                              table_size=(31,), variant="v4")


def numpy_v4(params, h_BxTxMxD, ids_BxTxH, masked_BxT, eps=1e-6):
  """V4.1's equations, plainly."""
  b, t, m, d = h_BxTxMxD.shape
  e = params["table"][ids_BxTxH].reshape(b, t, -1).astype(np.float64)
  kv = np.einsum("btf,fmd->btmd", e, params["key_value"])
  keys, value = kv[:, :, :m], kv[:, :, m]

  def rms(x, scale_MxD):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale_MxD

  s = np.sum(rms(h_BxTxMxD, params["hidden_norm"]["scale"]) *
             rms(keys, params["key_norm"]["scale"]), axis=-1, keepdims=True) / np.sqrt(d)
  alpha = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(np.maximum(np.abs(s), 1e-6))))
  y = alpha * value[:, :, None, :]
  return np.where(masked_BxT[:, :, None, None], 0.0, y)


def test_v4_layer_equals_numpy_transcription():
  rng = np.random.default_rng(0)
  b, t, m, d, rows = 2, 5, 3, 8, 97
  h = rng.standard_normal((b, t, m, d)).astype(np.float32)
  ids = rng.integers(0, rows, (b, t, CFG.orders * CFG.heads)).astype(np.int32)
  masked = rng.random((b, t)) < 0.3
  layer = Engram(CFG, rows)
  params = nn.unbox(layer.init(jax.random.key(0), h, ids))["params"]
  assert sorted(params) == ["hidden_norm", "key_norm", "key_value", "table"]  # no conv
  assert params["key_value"].shape == (CFG.features, m + 1, d)
  params = jax.tree_util.tree_map(
      lambda x: np.asarray(x) * rng.uniform(0.5, 1.5, x.shape).astype(np.float32), params)
  got = jax.jit(lambda p, *a: layer.apply({"params": p}, *a))(params, h, ids, None, masked)
  want = numpy_v4(jax.tree_util.tree_map(np.asarray, params), h, ids, masked)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  assert (np.asarray(got)[masked] == 0).all() and (np.abs(want[~masked]) > 0).any()


def test_variant_is_validated():
  with pytest.raises(ValueError, match="engram.variant"):
    config_lib.validate(config_lib.ModelConfig(
        depth=2, engram=config_lib.EngramConfig(layers=(1,), variant="v5")))


def test_v4_lm_with_branches_leaves_masked_positions_to_the_backbone():
  """In EngramLM (M = 2 hyper-connection branches), masking every position equals a
  model whose Engram adds nothing: the v4 layer's gate forced to 0."""
  import dataclasses
  from engram_jax.models.lm import EngramLM
  from tests.conftest import tiny_model_config
  cfg = dataclasses.replace(tiny_model_config(variant="v4"), branches=2)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  model = EngramLM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
  assert "conv" not in params["block_1"]["engram"]
  all_masked = np.ones((2, 12), bool)
  off = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, gate="off"))
  masked = jax.jit(lambda p, x, m: model.apply({"params": p}, x, masked_BxT=m))
  plain = jax.jit(lambda p, x: EngramLM(off).apply({"params": p}, x))
  np.testing.assert_allclose(np.asarray(masked(params, tokens, all_masked)),
                             np.asarray(plain(params, tokens)), rtol=1e-6, atol=1e-6)
