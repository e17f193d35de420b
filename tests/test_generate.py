"""Cached decoding equals the full forward (Engram at two layers, ragged prompts)."""
import flax.linen as nn
import jax
import numpy as np

from engram_jax import generate
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config, with_random_conv

CFG = tiny_model_config()


def test_prefill_plus_cached_decode_equals_full_forward():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, CFG.vocab_size, (3, 30)).astype(np.int32)
  lengths = np.array([4, 11, 7], np.int32)
  model = EngramLM(CFG)
  params = with_random_conv(nn.unbox(model.init(jax.random.key(0), seq))["params"], CFG)
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


def _params_with_conv(model, seq):
  return with_random_conv(nn.unbox(model.init(jax.random.key(0), seq))["params"], CFG)


def test_greedy_equals_full_forward_argmax_loop():
  model = EngramLM(CFG)
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  lengths = np.array([5, 9], np.int32)
  params = _params_with_conv(model, prompt)
  new = 12
  got = jax.jit(generate.generate, static_argnums=0,
                static_argnames=("max_new_tokens", "temperature"))(
      model, params, prompt, lengths, jax.random.key(0), max_new_tokens=new, temperature=0.0)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  for b in range(2):
    seq = np.zeros((1, CFG.max_len), np.int32)  # fixed buffer: one compile; causal model
    seq[0, :lengths[b]] = prompt[b, :lengths[b]]
    for i in range(new):
      pos = lengths[b] + i
      seq[0, pos] = int(np.argmax(forward(seq)[0, pos - 1]))
    np.testing.assert_array_equal(np.asarray(got[b]), seq[0, lengths[b]:lengths[b] + new])


def test_top_k_top_p_stay_in_the_allowed_set():
  logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2, np.float32))
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_k=2)))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws)) == {0, 1}
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_p=0.85)))(
      jax.random.split(jax.random.key(1), 400))
  assert set(np.unique(draws)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 needs the third
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_p=0.45)))(
      jax.random.split(jax.random.key(2), 200))
  assert set(np.unique(draws)) == {0}
  # rows are independent streams: two identical rows do not always draw the same token
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0)))(
      jax.random.split(jax.random.key(3), 200))
  assert np.any(draws[:, 0] != draws[:, 1])


def test_eos_rows_pad_and_length_check():
  model = EngramLM(CFG)
  prompt = np.ones((2, 4), np.int32)
  params = _params_with_conv(model, prompt)
  lengths = np.array([4, 4], np.int32)
  greedy = generate.generate(model, params, prompt, lengths, jax.random.key(0),
                             max_new_tokens=6, temperature=0.0)
  eos = int(greedy[0, 1])
  out = np.asarray(generate.generate(model, params, prompt, lengths, jax.random.key(0),
                                     max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=-1))
  first = int(np.argmax(out[0] == eos))
  assert (out[0, first + 1:] == -1).all() and (out[0, :first + 1] == greedy[0, :first + 1]).all()
  import pytest
  with pytest.raises(ValueError, match="model.max_len=48"):
    generate.generate(model, params, prompt, lengths, jax.random.key(0), max_new_tokens=45)
