"""Cached generation: prefill the prompt once, then one `lax.scan` of decode steps.

The KV cache and the Engram decode state (last N-1 compressed tokens; the short conv's
last (kernel-1)*N inputs) live in the model's `cache` collection; each decode step
hashes, looks up and convolves only the new position. Rows carry their own positions,
so prompts of different lengths share a batch.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from engram_jax.models.lm import EngramLM


def prefill(model: EngramLM, params, tokens_BxT, lengths_B, vocab_map_V=None):
  """Runs the (right-padded) prompts; returns logits `[B, T, V]` and the cache."""
  ngram = None if vocab_map_V is None else vocab_map_V[tokens_BxT]
  logits, variables = model.apply(
      {"params": params}, tokens_BxT, ngram_tokens_BxT=ngram, lengths_B=lengths_B,
      mode="prefill", mutable=["cache"])
  return logits, variables["cache"]


def decode_step(model: EngramLM, params, cache, token_B, position_B, vocab_map_V=None):
  """Feeds one token per row at its position; returns logits `[B, V]` and the cache."""
  tokens = token_B[:, None]
  ngram = None if vocab_map_V is None else vocab_map_V[tokens]
  logits, variables = model.apply(
      {"params": params, "cache": cache}, tokens, positions_BxT=position_B[:, None],
      ngram_tokens_BxT=ngram, mode="decode", mutable=["cache"])
  return logits[:, 0], variables["cache"]


def teacher_forced_logits(model: EngramLM, params, prompt_BxT, lengths_B, next_tokens_BxS,
                          vocab_map_V: Optional[jax.Array] = None):
  """Logits of each forced next token, `[B, S, V]`: prefill + one scan of decode steps.

  Row b's step s feeds `next_tokens_BxS[b, s]` at position `lengths_B[b] + s`; used to
  check the cached path against a full forward and to score continuations.
  """
  _, cache = prefill(model, params, prompt_BxT, lengths_B, vocab_map_V)

  def step(cache, inputs):
    token_B, s = inputs
    logits, cache = decode_step(model, params, cache, token_B, lengths_B + s, vocab_map_V)
    return cache, logits

  steps = jnp.arange(next_tokens_BxS.shape[1])
  _, logits_SxBxV = jax.lax.scan(step, cache, (next_tokens_BxS.T, steps))
  return jnp.swapaxes(logits_SxBxV, 0, 1)
