"""Decoding carries the scanned stack's KV cache (models/lm.py): Engram layers inside
the scan (their conv state carried by it too), remat, and the cache layout."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.sampling import text as generate
from engram_jax.models.lm import EngramLM, segments

from tests.equivalence import assert_cached_equals_full
from tests.conftest import tiny_model_config, with_random_conv

# Engram at layer 1 only: one stack blocks_0_3, Engram's params and state at block_1.
CFG = tiny_model_config(layers=(1,))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_cached_decode_equals_full_forward_over_a_run_of_layers(remat):
  cfg = dataclasses.replace(CFG, remat=remat)
  assert segments(cfg) == [(0, 4)]
  rng = np.random.default_rng(0)
  seq = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
  lengths = np.array([3, 6], np.int32)
  model = EngramLM(cfg)
  params = with_random_conv(nn.unbox(model.init(jax.random.key(0), seq))["params"], cfg)
  full = model.apply({"params": params}, seq)
  assert_cached_equals_full(model, params, seq, lengths, full, 6, 16 - int(lengths.max()))


def test_decode_keeps_the_prefill_cache_layout():
  """[L, B, K, S, H] for the scanned stack, the conv state `[B, P, C]` per Engram
  layer, before and after."""
  model = EngramLM(CFG)
  prompt = jnp.zeros((2, 4), jnp.int32)
  lengths = jnp.array([4, 2], jnp.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), prompt))["params"]
  _, cache = jax.eval_shape(lambda p, x, n: generate.prefill(model, p, x, n),
                            params, prompt, lengths)
  _, after = jax.eval_shape(lambda p, c, n: generate.decode_step(model, p, c, n, n),
                            params, cache, lengths)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(after) == shapes(cache)
  kv, s, h = CFG.num_kv_heads, CFG.max_len, CFG.resolved_head_dim
  assert cache["blocks_0_3"]["attention"]["k"].shape == (4, 2, kv, s, h)
  span = (CFG.engram.kernel_size - 1) * CFG.engram.max_ngram
  assert cache["block_1"]["engram"]["conv_history"].shape == (2, span, CFG.width)


@pytest.mark.parametrize("stacked", [False, True])
def test_chunked_decode_attention_equals_dense_attention(stacked):
  """Several chunks, rows at different positions (one on a chunk boundary)."""
  from engram_jax.layers.attention import chunked_decode_attention, gqa_attention
  keys = jax.random.split(jax.random.key(3), 3)
  b, kv, s, h, n = 3, 2, 32, 8, 4
  q = jax.random.normal(keys[0], (b, 1, n, h))
  k = jax.random.normal(keys[1], (2, b, kv, s, h))
  v = jax.random.normal(keys[2], (2, b, kv, s, h))
  position_B = jnp.array([5, 8, 21])
  visible = (jnp.arange(s)[None, None, :] <= position_B[:, None, None])
  want = gqa_attention(q, k[1], v[1], visible)
  got = (chunked_decode_attention(q, k, v, position_B, jnp.int32(1), chunk=8) if stacked
         else chunked_decode_attention(q, k[1], v[1], position_B, chunk=8))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # keys past every row's position are never read: garbage there changes nothing
  k_junk = k.at[:, :, :, 24:].set(jnp.nan)
  got_junk = chunked_decode_attention(q, k_junk[1], v[1], position_B, chunk=8)
  np.testing.assert_allclose(np.asarray(got_junk), np.asarray(want), rtol=1e-5, atol=1e-5)
