"""Grouped-query causal self-attention with RoPE (1D or 2D) and a fixed-size KV cache.

Modes (static): None = full forward (training, scoring); "prefill" = full forward
that also writes the prompt's keys/values into the cache; "decode" = the new
positions attend to everything cached so far. Every row carries its own positions,
so prompts of different lengths share one batch without left padding: a key slot s
is visible to a query at position p iff s <= p.

Shapes (docs/architecture.md): Q query heads, KV kv heads, Qg = Q / KV query heads per
kv head, Dh head dim, Tk key positions (the cache's max_len slots, or T without a cache),
A RoPE position axes, Ls layers of a scanned run.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.layers.mlp import dense_init

Mode = Optional[str]  # None | "prefill" | "decode"
MODES = (None, "prefill", "decode")


def rope(x_BxTx_xDh, positions_BxT, theta: float):
  """Rotary embedding over the last axis (any heads); pair i is (x[i], x[i + Dh/2]).

  positions_BxT: `[B, T]` (1D), or `[B, T, A]` for A position axes (2D RoPE: A = 2,
  (row, column)). Axis a rotates the contiguous pairs [a*p, (a+1)*p), p = Dh/(2A), each
  axis with the full frequency ladder theta^(-j/p), j < p; A = 1 is the usual RoPE.
  """
  b, t, _, head_dim = x_BxTx_xDh.shape
  half = head_dim // 2
  positions_BxTxA = positions_BxT if positions_BxT.ndim == 3 else positions_BxT[..., None]
  axes = positions_BxTxA.shape[-1]
  if half % axes:
    raise ValueError(f"model.head_dim={head_dim}: {axes}-axis RoPE needs a multiple of "
                     f"{2 * axes} (each axis rotates head_dim / {2 * axes} pairs)")
  per_axis = half // axes
  inv_freq = theta ** (-jnp.arange(per_axis, dtype=jnp.float32) / per_axis)
  angles = (positions_BxTxA.astype(jnp.float32)[..., None] * inv_freq).reshape(b, t, half)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTx_xDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTx_xDh.dtype)


def write_at(buffer_Bx_, update_BxTx_, start_B):
  """Writes each row's update `[B, T, ...]` into its buffer `[B, length, ...]` at its
  own start index."""
  def one(buf, upd, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, upd.astype(buf.dtype), start, axis=0)
  return jax.vmap(one)(buffer_Bx_, update_BxTx_, start_B)


def write_kv(cache_BxKVxTkxDh, update_BxTxKVxDh, start_B, layer=None):
  """Writes each row's new keys (or values) at its own positions; a scatter of B*T
  slices `[KV, Dh]`, done in place on a loop-carried cache.

  The cache is kv-head major, `[B, KV, Tk, Dh]` (or `[Ls, B, KV, Tk, Dh]` with `layer`:
  the stacked cache of a scanned run, models/lm.py), the layout `gqa_attention` reads
  without a transpose.
  """
  b, t = update_BxTxKVxDh.shape[:2]
  positions_BxT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)
  rows_Bx1 = jnp.arange(b)[:, None]
  update = update_BxTxKVxDh.astype(cache_BxKVxTkxDh.dtype)
  if layer is None:
    return cache_BxKVxTkxDh.at[rows_Bx1, :, positions_BxT].set(update, mode="drop")
  return cache_BxKVxTkxDh.at[layer, rows_Bx1, :, positions_BxT].set(update, mode="drop")


def gqa_attention(q_BxTxQxDh, k_BxKVxTkxDh, v_BxKVxTkxDh, visible_BxTxTk):
  """Softmax attention where each of KV kv heads serves Qg = Q/KV query heads."""
  b, t, n, h = q_BxTxQxDh.shape
  kv = k_BxKVxTkxDh.shape[1]
  q_BxTxKVxQgxDh = q_BxTxQxDh.reshape(b, t, kv, n // kv, h)
  scores = jnp.einsum("btkgh,bksh->bkgts", q_BxTxKVxQgxDh, k_BxKVxTkxDh,
                      preferred_element_type=jnp.float32) / jnp.sqrt(h).astype(jnp.float32)
  scores = jnp.where(visible_BxTxTk[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKVxTkxDh.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v_BxKVxTkxDh)
  return out.reshape(b, t, n, h)


def decode_chunk(max_len: int, target: int = 128) -> int:
  """Keys per chunk of `chunked_decode_attention`: the largest divisor of `max_len` up
  to `target` (chunks must tile the cache), or `max_len` when that is small."""
  best = max(d for d in range(1, min(target, max_len) + 1) if max_len % d == 0)
  return best if best >= min(32, max_len) else max_len


def chunked_decode_attention(q_Bx1xQxDh, cache_k, cache_v, position_B, layer=None,
                             chunk: int = 128):
  """One new query per row against the filled part of the cache only.

  Loops over key chunks up to the furthest row's position (online softmax), reading
  each chunk straight from the cache (`[B, KV, Tk, Dh]`, or slot `layer` of a stacked
  `[Ls, B, KV, Tk, Dh]`): a step's cost follows the sequence so far, not `max_len`, and no
  whole layer of the cache is copied out.
  """
  b, _, n, h = q_Bx1xQxDh.shape
  kv = cache_k.shape[-3]
  lead = () if layer is None else (layer,)
  size = (1,) * len(lead) + (b, kv, chunk, h)
  q_Bx1xKVxQgxDh = q_Bx1xQxDh.reshape(b, 1, kv, n // kv, h)
  scale = 1.0 / np.sqrt(h).astype(np.float32)
  neg = jnp.finfo(jnp.float32).min

  def read(cache, c):
    start = lead + (0, 0, c * chunk, 0)
    return jax.lax.dynamic_slice(cache, start, size).reshape(b, kv, chunk, h)

  def body(c, carry):
    m_BxKVxQgx1, l_BxKVxQgx1, acc_BxKVxQgx1xDh = carry
    k_c = read(cache_k, c)
    scores = jnp.einsum("btkgh,bksh->bkgts", q_Bx1xKVxQgxDh, k_c,
                        preferred_element_type=jnp.float32) * scale
    key_pos_Tk = c * chunk + jnp.arange(chunk)
    visible_BxTk = key_pos_Tk[None, :] <= position_B[:, None]
    scores = jnp.where(visible_BxTk[:, None, None, None], scores, neg)
    m_new = jnp.maximum(m_BxKVxQgx1, scores.max(axis=-1))
    p = jnp.exp(scores - m_new[..., None])
    correction = jnp.exp(m_BxKVxQgx1 - m_new)
    v_c = read(cache_v, c)
    pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v_c.dtype), v_c,
                    preferred_element_type=jnp.float32)
    return (m_new, l_BxKVxQgx1 * correction + p.sum(axis=-1),
            acc_BxKVxQgx1xDh * correction[..., None] + pv)

  g = n // kv
  init = (jnp.full((b, kv, g, 1), neg, jnp.float32), jnp.zeros((b, kv, g, 1), jnp.float32),
          jnp.zeros((b, kv, g, 1, h), jnp.float32))
  chunks = jnp.max(position_B) // chunk + 1
  _, l_BxKVxQgx1, acc = jax.lax.fori_loop(0, chunks, body, init)
  out_BxKVxQgx1xDh = acc / l_BxKVxQgx1[..., None]
  return jnp.moveaxis(out_BxKVxQgx1xDh, 3, 1).reshape(b, 1, n, h).astype(cache_v.dtype)


class Attention(nn.Module):
  """Causal GQA with RoPE; keys/values live in the `cache` collection when decoding."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_len: int
  rope_theta: float = 10000.0
  mode: Mode = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, rope_positions_BxTxA=None, cache_layer=None):
    """positions_BxT: sequence positions (causal mask and KV-cache slots);
    rope_positions_BxTxA: what RoPE rotates with (`rope`), default `positions_BxT`;
    cache_layer: when set ("decode" inside a scanned run of layers whose cache is
    carried, models/lm.py), the cache holds every layer of the run, `[Ls, B, KV, Tk, Dh]`,
    and this call reads and writes slot `cache_layer`."""
    proj = lambda heads, axes, name: nn.DenseGeneral(
        (heads, self.head_dim), use_bias=False, kernel_init=dense_init(axes),
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = proj(self.num_heads, ("embed", "heads", "head_dim"), "query")(x_BxTxD)
    k = proj(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "key")(x_BxTxD)
    v = proj(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "value")(x_BxTxD)
    if rope_positions_BxTxA is None:
      rope_positions_BxTxA = positions_BxT
    q = rope(q, rope_positions_BxTxA, self.rope_theta)
    k = rope(k, rope_positions_BxTxA, self.rope_theta)

    if self.mode is None:
      key_positions_BxTk = positions_BxT
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, Dh]
    else:
      b = x_BxTxD.shape[0]
      shape = (b, self.num_kv_heads, self.max_len, self.head_dim)
      cached_k = self.variable("cache", "k", jnp.zeros, shape, self.dtype)
      cached_v = self.variable("cache", "v", jnp.zeros, shape, self.dtype)
      start_B = positions_BxT[:, 0]
      cached_k.value = write_kv(cached_k.value, k, start_B, cache_layer)
      cached_v.value = write_kv(cached_v.value, v, start_B, cache_layer)
      if self.mode == "decode" and x_BxTxD.shape[1] == 1:
        out_Bx1xQxDh = chunked_decode_attention(
            q, cached_k.value, cached_v.value, start_B, cache_layer,
            decode_chunk(self.max_len))
        return self._out(out_Bx1xQxDh, x_BxTxD.shape[-1])
      if cache_layer is None:
        k, v = cached_k.value, cached_v.value
      else:
        k = jax.lax.dynamic_index_in_dim(cached_k.value, cache_layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(cached_v.value, cache_layer, 0, keepdims=False)
      key_positions_BxTk = jnp.broadcast_to(jnp.arange(self.max_len), (b, self.max_len))
    visible_BxTxTk = key_positions_BxTk[:, None, :] <= positions_BxT[:, :, None]
    out_BxTxQxDh = gqa_attention(q, k, v, visible_BxTxTk)
    return self._out(out_BxTxQxDh, x_BxTxD.shape[-1])

  def _out(self, out_BxTxQxDh, width: int):
    return nn.DenseGeneral(
        width, axis=(-2, -1), use_bias=False,
        kernel_init=dense_init(("heads", "head_dim", "embed")), dtype=self.dtype,
        param_dtype=self.param_dtype, name="out")(out_BxTxQxDh)
