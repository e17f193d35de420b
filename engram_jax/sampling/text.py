"""Cached generation: prefill the prompt once, then one `lax.scan` of decode steps.

The KV cache and the Engram decode state (last N-1 compressed tokens; the short conv's
last (kernel-1)*N inputs) live in the model's `cache` collection; each decode step
hashes, looks up and convolves only the new position. Rows carry their own positions,
so prompts of different lengths share a batch.

Engram rows can come from outside the model (host-memory tables, engram_jax.sampling.offload):
`prefill`/`decode_step` take `hash_ids_BxTxLxH` with their looked-up `engram_rows`
(the `layers.engram.ROWS_COLLECTION` tree), and `generate(engram_rows_fn=...)` hashes
each new token itself and asks `engram_rows_fn(hash_ids)` for its rows, so the params
need no tables.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from engram_jax import hashing
from engram_jax.layers.engram import ROWS_COLLECTION, history_before
from engram_jax.models.lm import EngramLM, as_variables


def _variables(params, cache=None, engram_rows=None) -> dict:
  """`params` is a parameter tree or a variables dict (MoE `routing` biases beside it)."""
  variables = as_variables(params)
  if cache is not None:
    variables["cache"] = cache
  if engram_rows is not None:
    variables[ROWS_COLLECTION] = engram_rows
  return variables


def _ngram_tokens(tokens_BxT, vocab_map_V, masked_BxT):
  """What Engram hashes: compressed ids, masked positions marked dead."""
  ngram = None if vocab_map_V is None else vocab_map_V[tokens_BxT]
  if masked_BxT is not None:
    ngram = hashing.mark_dead(tokens_BxT if ngram is None else ngram, masked_BxT)
  return ngram


def prefill(model: EngramLM, params, tokens_BxT, lengths_B, vocab_map_V=None, *,
            hash_ids_BxTxLxH=None, engram_rows=None, masked_BxT=None):
  """Runs the (right-padded) prompts; returns logits `[B, T, V]` and the cache.

  `engram_rows` (rows of `hash_ids_BxTxLxH`, looked up elsewhere) replace the tables.
  `masked_BxT` marks non-text prompt positions (DeepSeek-V4.1): Engram adds nothing
  there and no n-gram reaches across them, in the prompt or after it.
  """
  ngram = _ngram_tokens(tokens_BxT, vocab_map_V, masked_BxT)
  logits, variables = model.apply(
      _variables(params, engram_rows=engram_rows), tokens_BxT, ngram_tokens_BxT=ngram,
      hash_ids_BxTxLxH=hash_ids_BxTxLxH, lengths_B=lengths_B, mode="prefill",
      mutable=["cache"], masked_BxT=masked_BxT)
  return logits, variables["cache"]


def decode_step(model: EngramLM, params, cache, token_B, position_B, vocab_map_V=None, *,
                hash_ids_BxTxLxH=None, engram_rows=None):
  """Feeds one token per row at its position; returns logits `[B, V]` and the cache.

  With `hash_ids_BxTxLxH` (`[B, 1, L, H]`) the caller hashes, and keeps the n-gram
  history; `engram_rows` are then their rows (see `prefill`).
  """
  tokens = token_B[:, None]
  ngram = None if vocab_map_V is None else vocab_map_V[tokens]
  logits, variables = model.apply(
      _variables(params, cache, engram_rows), tokens, positions_BxT=position_B[:, None],
      ngram_tokens_BxT=ngram, hash_ids_BxTxLxH=hash_ids_BxTxLxH, mode="decode",
      mutable=["cache"])
  return logits[:, 0], variables["cache"]


class _Hasher:
  """Hash ids outside the model: the prompt's, then one token's at a time with the
  last N-1 compressed tokens carried by the caller (as the model's cache does)."""

  def __init__(self, model: EngramLM, vocab_map_V):
    if not model.cfg.engram.layers:
      raise ValueError("engram_rows_fn is given but model.engram.layers is empty: a "
                       "model without Engram has no rows to look up")
    self.spec = model.cfg.engram.hash_spec()
    self.keep = self.spec.max_ngram - 1
    self.vocab_map_V = vocab_map_V

  def ngram(self, tokens_BxT):
    return tokens_BxT if self.vocab_map_V is None else self.vocab_map_V[tokens_BxT]

  def prompt(self, prompt_BxT, lengths_B, masked_BxT=None):
    """(hash ids `[B, T, L, H]`, history `[B, N-1]` before each row's end)."""
    ngram_BxT = _ngram_tokens(prompt_BxT, self.vocab_map_V, masked_BxT)
    ngram_BxT = prompt_BxT if ngram_BxT is None else ngram_BxT
    pad_BxP = jnp.full((prompt_BxT.shape[0], self.keep), hashing.PAD_ID, jnp.uint32)
    ext = jnp.concatenate([pad_BxP, ngram_BxT.astype(jnp.uint32)], axis=1)
    return (hashing.ngram_hash_ids(ngram_BxT, self.spec),
            history_before(ext, lengths_B, self.keep))

  def step(self, token_B, history_BxP):
    """(hash ids `[B, 1, L, H]` of the token, the history after it)."""
    ngram_Bx1 = self.ngram(token_B[:, None]).astype(jnp.uint32)
    ids = hashing.ngram_hash_ids(ngram_Bx1, self.spec, history_BxP)
    return ids, jnp.concatenate([history_BxP, ngram_Bx1], axis=1)[:, 1:]


def teacher_forced_logits(model: EngramLM, params, prompt_BxT, lengths_B, next_tokens_BxS,
                          vocab_map_V: Optional[jax.Array] = None, masked_BxT=None):
  """Logits of each forced next token, `[B, S, V]`: prefill + one scan of decode steps.

  Row b's step s feeds `next_tokens_BxS[b, s]` at position `lengths_B[b] + s`; used to
  check the cached path against a full forward and to score continuations.
  """
  _, cache = prefill(model, params, prompt_BxT, lengths_B, vocab_map_V,
                     masked_BxT=masked_BxT)

  def step(cache, inputs):
    token_B, s = inputs
    logits, cache = decode_step(model, params, cache, token_B, lengths_B + s, vocab_map_V)
    return cache, logits

  steps = jnp.arange(next_tokens_BxS.shape[1])
  _, logits_SxBxV = jax.lax.scan(step, cache, (next_tokens_BxS.T, steps))
  return jnp.swapaxes(logits_SxBxV, 0, 1)


# ----------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------
def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top-k and the top-p nucleus to -inf (0 / 1.0 = off)."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # keep a token while the mass before it is < top_p (the first one always stays)
    keep = (cumulative - jax.nn.softmax(sorted_BxV, axis=-1)) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff, neg_inf, logits_BxV)
  return logits_BxV


def sample(logits_BxV, rng, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """One token per row; `temperature == 0` is greedy. Each row has its own RNG stream."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BxV.astype(jnp.float32) / temperature, top_k, top_p)
  keys = jax.random.split(rng, logits_BxV.shape[0])
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def generate(model: EngramLM, params, prompt_BxT, lengths_B, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: Optional[int] = None, pad_id: int = 0,
             vocab_map_V: Optional[jax.Array] = None,
             engram_rows_fn: Optional[Callable] = None, prompt_engram_rows=None,
             prompt_masked_BxT=None):
  """New tokens `[B, max_new_tokens]`: prefill, then one `lax.scan` of decode steps.

  Rows that produced `eos_id` keep emitting `pad_id`. Jit with the sampling arguments
  static; it compiles once per (batch, prompt bucket, max_new_tokens).

  engram_rows_fn: `hash_ids_BxTxLxH -> engram_rows` (a `ROWS_COLLECTION` tree) looks
    up Engram rows outside the model, e.g. from host memory by a callback
    (`host_tables.HostTables.callback_rows`); each step asks it for the rows of the token
    just sampled. `prompt_engram_rows` are the prompt's rows when the caller gathered
    them already (default: `engram_rows_fn` of the prompt's ids).
  prompt_masked_BxT: non-text prompt positions (see `prefill`); generated tokens are text.
  """
  t = prompt_BxT.shape[1]
  if t + max_new_tokens > model.cfg.max_len:
    raise ValueError(f"prompt bucket {t} + max_new_tokens {max_new_tokens} exceeds "
                     f"model.max_len={model.cfg.max_len}; shorten the prompt or ask for fewer tokens")
  hasher = None if engram_rows_fn is None else _Hasher(model, vocab_map_V)
  history_BxP = None
  if hasher is None:
    logits_BxTxV, cache = prefill(model, params, prompt_BxT, lengths_B, vocab_map_V,
                                  masked_BxT=prompt_masked_BxT)
  else:
    ids, history_BxP = hasher.prompt(prompt_BxT, lengths_B, prompt_masked_BxT)
    rows = engram_rows_fn(ids) if prompt_engram_rows is None else prompt_engram_rows
    logits_BxTxV, cache = prefill(model, params, prompt_BxT, lengths_B, vocab_map_V,
                                  hash_ids_BxTxLxH=ids, engram_rows=rows,
                                  masked_BxT=prompt_masked_BxT)
  last_BxV = jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  rng, first_rng = jax.random.split(rng)
  first_B = sample(last_BxV, first_rng, temperature, top_k, top_p)
  done_B = jnp.zeros_like(first_B, bool) if eos_id is None else first_B == eos_id

  def step(carry, step_rng):
    cache, token_B, position_B, done_B, history_BxP = carry
    if hasher is None:
      logits_BxV, cache = decode_step(model, params, cache, token_B, position_B, vocab_map_V)
    else:
      ids, history_BxP = hasher.step(token_B, history_BxP)
      logits_BxV, cache = decode_step(model, params, cache, token_B, position_B, vocab_map_V,
                                      hash_ids_BxTxLxH=ids, engram_rows=engram_rows_fn(ids))
    new_B = sample(logits_BxV, step_rng, temperature, top_k, top_p)
    new_B = jnp.where(done_B, pad_id, new_B)
    if eos_id is not None:
      done_B = done_B | (new_B == eos_id)
    return (cache, new_B, position_B + 1, done_B, history_BxP), new_B

  carry = (cache, first_B, lengths_B, done_B, history_BxP)
  _, rest_SxB = jax.lax.scan(step, carry, jax.random.split(rng, max_new_tokens - 1))
  return jnp.concatenate([first_B[:, None], rest_SxB.T], axis=1)


# ----------------------------------------------------------------------------------
# Command line: python -m engram_jax.generate --workdir=DIR --prompt="def "
# ----------------------------------------------------------------------------------
def prompt_bucket(length: int, max_new_tokens: int, max_len: int) -> int:
  """Padded prompt length: the next power of two (>= 8), so few shapes compile."""
  bucket = max(8, 1 << max(length - 1, 0).bit_length())
  return min(bucket, max_len - max_new_tokens)


SAMPLING_RULES = {
    "temperature": (lambda v: v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1.0 = off)"),
    "cfg_scale": (lambda v: v >= 0, "a finite number >= 0 (0 or 1 = off)"),
}


def check_sampling(settings: dict) -> None:
  """A ValueError naming the first flag of `settings` outside its range (nan and inf
  included), e.g. `--top_p=0: use a number in (0, 1] (1.0 = off)`."""
  import math
  for name, value in settings.items():
    allowed, rule = SAMPLING_RULES[name]
    if not (math.isfinite(value) and allowed(value)):
      raise ValueError(f"--{name}={value}: use {rule}")

