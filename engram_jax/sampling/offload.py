"""Engram tables in host memory for inference, their rows gathered on the host.

A table row is read only when an n-gram hashes to it, and the hash depends only on
tokens, so the rows a step needs are known as soon as its tokens are: the tables can
live in host RAM (NumPy) while the device holds the backbone. `host_tables.split_params`
moves a trained model's tables out of its params; `workdir.load(tables="host")`
restores a checkpoint's tables straight into host memory (a table larger than the
device never lands on it), `workdir.load(tables="disk")` memory-maps exported ones.

`device_params` below may be a variables dict (`workdir.Run.variables`: params and
MoE routing biases).

How rows reach the model: `layers.engram.ROWS_COLLECTION`, a variable collection of
`[B, T, H, E]` rows under each Engram layer's path, which the layer reads instead of
its (absent) table.

  known tokens (prompt, scoring, teacher forcing): hash and `np.take` on the host, then
    `jax.device_put`, which returns at once and copies while the device runs what is
    already queued; `RowPrefetcher` does it for the next batches in a thread.
  decoding: the next token is known only once sampled on the device, so its rows
    cannot be fetched ahead. `generate` keeps the one `lax.scan` of generate.py and
    asks the host for each new token's rows by `jax.pure_callback` inside the scan.
    Exact (same rows, same logits, same tokens as on-device tables); the gather and
    two small transfers sit on each step's path. Whether the device runs the layers
    before the first Engram layer meanwhile is up to the runtime (it does not on CPU,
    where the callback runs in line).

docs/scale_out.md has the design notes and bench/offload.py the measured overhead.
"""
from __future__ import annotations

import functools
import queue
import threading
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.sampling import text as generate_lib
from engram_jax.host_tables import HostTables
from engram_jax.layers.engram import ROWS_COLLECTION
from engram_jax.models.lm import as_variables


# ----------------------------------------------------------------------------------
# Inference with host tables
# ----------------------------------------------------------------------------------
def logits(model, device_params, tables: HostTables, tokens_BxT, vocab_map_V=None):
  """Full-forward logits `[B, T, V]`; the rows are gathered on the host up front."""
  ids = tables.hash_ids(tokens_BxT, vocab_map_V)
  return _apply(model, {**as_variables(device_params), ROWS_COLLECTION: tables.device_rows(ids)},
                jnp.asarray(tokens_BxT), jnp.asarray(ids))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, tokens_BxT, hash_ids_BxTxLxH):
  return model.apply(variables, tokens_BxT, hash_ids_BxTxLxH=hash_ids_BxTxLxH)


class RowPrefetcher:
  """Yields `(tokens_BxT, hash_ids_BxTxLxH, engram_rows)` for each batch of tokens,
  with the next `depth` batches hashed, gathered and sent to the device by a thread
  while the device computes the current one (the training-style prefetch)."""

  def __init__(self, tables: HostTables, batches: Iterable[np.ndarray], vocab_map_V=None,
               depth: int = 2, sharding=None):
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._finished: Optional[BaseException] = None  # raised again by every later next()
    self._thread = threading.Thread(
        target=self._fill, args=(tables, iter(batches), vocab_map_V, sharding), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Blocks until there is room or `close()`; False when closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, tables, batches, vocab_map_V, sharding):
    try:
      for tokens in batches:
        ids = tables.hash_ids(tokens, vocab_map_V)
        item = (jax.device_put(np.asarray(tokens), sharding), jax.device_put(ids, sharding),
                tables.device_rows(ids, sharding))
        if not self._put(item):
          return
      self._put(StopIteration())
    except BaseException as err:  # re-raised in the consumer's thread
      self._put(err)

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    if self._finished is not None:
      raise self._finished
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._finished = StopIteration() if isinstance(item, StopIteration) else item
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)


def _forced_ids(tables: HostTables, prompt_BxT, lengths_B, next_tokens_BxS, vocab_map_V):
  """Host hash ids of the forced tokens `[S, B, 1, L, H]`: row b's n-grams run over
  its prompt's first `lengths_B[b]` tokens then the forced ones."""
  prompt, forced = np.asarray(prompt_BxT), np.asarray(next_tokens_BxS)
  lengths, s = np.asarray(lengths_B), forced.shape[1]
  ids = []
  for b in range(prompt.shape[0]):
    seq = np.concatenate([prompt[b, :lengths[b]], forced[b]])[None]
    ids.append(tables.hash_ids(seq, vocab_map_V)[0, lengths[b]:lengths[b] + s])
  return np.stack(ids, axis=1)[:, :, None]


def teacher_forced_logits(model, device_params, tables: HostTables, prompt_BxT, lengths_B,
                          next_tokens_BxS, vocab_map_V=None):
  """`generate.teacher_forced_logits` with host tables: every token is known, so all
  rows (prompt and forced steps) are gathered on the host and sent before the scan."""
  prompt_ids = tables.hash_ids(prompt_BxT, vocab_map_V)
  step_ids = _forced_ids(tables, prompt_BxT, lengths_B, next_tokens_BxS, vocab_map_V)
  prompt_rows = tables.device_rows(prompt_ids)
  step_rows = tables.device_rows(step_ids.reshape(-1, *step_ids.shape[2:]))
  s, b = step_ids.shape[:2]
  step_rows = jax.tree_util.tree_map(lambda r: r.reshape(s, b, *r.shape[1:]), step_rows)
  vocab = None if vocab_map_V is None else jnp.asarray(vocab_map_V)
  return _teacher_forced(model, device_params, jnp.asarray(prompt_BxT), jnp.asarray(lengths_B),
                         jnp.asarray(next_tokens_BxS), jnp.asarray(prompt_ids), prompt_rows,
                         jnp.asarray(step_ids), step_rows, vocab)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(model, params, prompt_BxT, lengths_B, next_tokens_BxS, prompt_ids,
                    prompt_rows, step_ids_SxBx1xLxH, step_rows, vocab_map_V):
  _, cache = generate_lib.prefill(model, params, prompt_BxT, lengths_B, vocab_map_V,
                                  hash_ids_BxTxLxH=prompt_ids, engram_rows=prompt_rows)

  def step(cache, inputs):
    token_B, s, ids, rows = inputs
    logits_BxV, cache = generate_lib.decode_step(
        model, params, cache, token_B, lengths_B + s, vocab_map_V, hash_ids_BxTxLxH=ids,
        engram_rows=rows)
    return cache, logits_BxV

  steps = jnp.arange(next_tokens_BxS.shape[1])
  _, logits_SxBxV = jax.lax.scan(
      step, cache, (next_tokens_BxS.T, steps, step_ids_SxBx1xLxH, step_rows))
  return jnp.swapaxes(logits_SxBxV, 0, 1)


_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id",
             "engram_rows_fn")
_generate_jit = jax.jit(generate_lib.generate, static_argnums=0, static_argnames=_SAMPLING)


def generate(model, device_params, tables: HostTables, prompt_BxT, lengths_B, rng, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
             vocab_map_V=None):
  """`generate.generate` with host tables (jitted; compiles once per shape and tables).

  The prompt's rows are hashed and gathered on the host and sent before the call; each
  decode step's rows come from `tables.callback_rows` inside the scan. The compiled
  step holds the tables' callback: keep one HostTables per model (`jax.clear_caches()`
  lets go of it).
  """
  if prompt_BxT.shape[1] + max_new_tokens > model.cfg.max_len:
    raise ValueError(f"prompt bucket {prompt_BxT.shape[1]} + max_new_tokens "
                     f"{max_new_tokens} exceeds model.max_len={model.cfg.max_len}; shorten "
                     "the prompt or ask for fewer tokens")
  prompt_rows = tables.device_rows(tables.hash_ids(prompt_BxT, vocab_map_V))
  vocab = None if vocab_map_V is None else jnp.asarray(vocab_map_V)
  return _generate_jit(model, device_params, jnp.asarray(prompt_BxT), jnp.asarray(lengths_B),
                       rng, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id,
                       vocab_map_V=vocab, engram_rows_fn=tables.callback_rows,
                       prompt_engram_rows=prompt_rows)
