"""Cached decoding equals the full forward (Engram at two layers, ragged prompts)."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np

from engram_jax import generate
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config

CFG = tiny_model_config()


def test_prefill_plus_cached_decode_equals_full_forward():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, CFG.vocab_size, (3, 30)).astype(np.int32)
  lengths = np.array([4, 11, 7], np.int32)
  model = EngramLM(CFG)
  params = nn.unbox(model.init(jax.random.key(0), seq))["params"]
  for layer in CFG.engram.layers:  # conv starts at zero: make it count
    conv = params[f"block_{layer}"]["engram"]["conv"]
    params[f"block_{layer}"]["engram"]["conv"] = jax.random.normal(jax.random.key(layer),
                                                                   conv.shape)
  full = np.asarray(model.apply({"params": params}, seq))
  prompt = np.where(np.arange(11)[None] < lengths[:, None], seq[:, :11], 0)
  steps = 30 - int(lengths.max())
  forced = np.stack([seq[b, lengths[b]:lengths[b] + steps] for b in range(3)])
  cached = jax.jit(generate.teacher_forced_logits, static_argnums=0)(
      model, params, prompt, lengths, forced)
  for b in range(3):
    # the logits after feeding token at position p predict p+1: compare position by position
    want = full[b, lengths[b]:lengths[b] + steps]
    np.testing.assert_allclose(cached[b], want, rtol=2e-4, atol=2e-4)
