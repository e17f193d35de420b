"""Hyper-connections (Zhu et al. 2024, arXiv 2409.19606): M residual branches per token.

The residual stream is widened to H = [h_1; ...; h_M] (`h_BxTxMxD`). Around a sublayer T
(attention, MLP) with layer index l:

  width:  x   = sum_m A_m[m] h_m                  layer input  (A_m: [M])
          h'_j = sum_i A_r[i, j] h_i               branches mixed  (A_r: [M, M])
  depth:  h_j <- h'_j + B[j] T(x)                  output written to every branch (B: [M])

Dynamic hyper-connections add token-dependent parts, with H~ = RMSNorm(h_m) per branch:
  [A_m[m], A_r[m, :]] += s_alpha * tanh(H~_m W_alpha)     W_alpha: [D, 1 + M]
  B[m]                 += s_beta  * tanh(H~_m W_beta)      W_beta:  [D, 1]
with W zero at init and s = 0.01. Paper init: A_m = e_{l mod M}, A_r = I, B = 1, so the
sublayer reads branch l mod M, every branch gets its output, and all branches of a stack
started from `expand_branches` stay equal to the plain residual stream; with M = 1 it is
exactly h + T(h). After the last layer `collapse_branches` sums the branches (before the
final norm, which removes the factor M).

A block uses either `__call__(h, sublayer)` or the two steps:
  x, state = hc.width(h); h = hc.depth(sublayer(x), state)
Number the sublayers consecutively (attention of block b = 2b, its MLP = 2b + 1) so
successive sublayers read successive branches.
"""
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.layers.norms import RMSNorm


def expand_branches(h_BxTxD, branches: int):
  """The embedding copied into every branch: `[B, T, D] -> [B, T, M, D]`."""
  return jnp.broadcast_to(h_BxTxD[:, :, None, :], h_BxTxD.shape[:2] + (branches,) +
                          h_BxTxD.shape[2:])


def collapse_branches(h_BxTxMxD):
  """Sum over branches (the paper's read-out), `[B, T, M, D] -> [B, T, D]`."""
  return jnp.sum(h_BxTxMxD, axis=2)


class HyperState(NamedTuple):
  """What the depth step needs from the width step."""
  residual_BxTxMxD: jax.Array  # h' = A_r^T H
  depth_BxTxM: jax.Array       # B (broadcastable: `[M]` when static)


def _width_init(layer_index: int):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jax.nn.one_hot(layer_index % shape[0], shape[0], dtype=dtype)
  return init


def _eye_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


class HyperConnection(nn.Module):
  """Width and depth connections of one sublayer over M branches.

  branches: M (1 = plain residual). layer_index: l, picks the branch the sublayer reads
  at init. dynamic: add the token-dependent (tanh) parts. dynamic_scale: init of
  s_alpha and s_beta.
  """
  branches: int
  layer_index: int
  dynamic: bool = True
  dynamic_scale: float = 0.01
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.branches < 1:
      raise ValueError(f"HyperConnection.branches={self.branches} is invalid: must be >= 1")
    m = self.branches
    param = lambda name, init, axes, shape: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    self.width_static = param("width", _width_init(self.layer_index), ("branch",), (m,))
    self.residual_static = param("residual", _eye_init, ("branch", None), (m, m))
    self.depth_static = param("depth", nn.initializers.ones, ("branch",), (m,))
    if self.dynamic:
      self.norm = RMSNorm(("embed",), self.norm_eps, jnp.float32, self.param_dtype)
      # Columns: A_m, A_r[m, 0..M-1], B; one projection for all three.
      self.proj = nn.Dense(
          m + 2, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)))
      scale = nn.initializers.constant(self.dynamic_scale)
      self.alpha_scale = param("alpha_scale", scale, (), ())
      self.beta_scale = param("beta_scale", scale, (), ())

  def width(self, h_BxTxMxD):
    """The sublayer input `[B, T, D]` and the state for `depth`."""
    if h_BxTxMxD.shape[2] != self.branches:
      raise ValueError(f"HyperConnection.branches={self.branches} but the input has "
                       f"{h_BxTxMxD.shape[2]} branches (axis 2 of [B, T, M, D])")
    h32 = h_BxTxMxD.astype(jnp.float32)
    width_M = self.width_static.astype(jnp.float32)
    residual_MxM = self.residual_static.astype(jnp.float32)
    depth = self.depth_static.astype(jnp.float32)
    if self.dynamic:
      coeffs = jnp.tanh(self.proj(self.norm(h32)))               # [B, T, M, M + 2]
      alpha = self.alpha_scale.astype(jnp.float32)
      width_M = width_M + alpha * coeffs[..., 0]
      residual_MxM = residual_MxM + alpha * coeffs[..., 1:-1]
      depth = depth + self.beta_scale.astype(jnp.float32) * coeffs[..., -1]
      x = jnp.einsum("btm,btmd->btd", width_M, h32)
      mixed = jnp.einsum("btmn,btmd->btnd", residual_MxM, h32)
    else:
      x = jnp.einsum("m,btmd->btd", width_M, h32)
      mixed = jnp.einsum("mn,btmd->btnd", residual_MxM, h32)
    return x.astype(self.dtype), HyperState(mixed.astype(h_BxTxMxD.dtype), depth)

  def depth(self, y_BxTxD, state: HyperState):
    """Writes the sublayer output into every branch: h_j = h'_j + B[j] y."""
    h = state.residual_BxTxMxD
    out = (h.astype(jnp.float32) +
           state.depth_BxTxM[..., None] * y_BxTxD.astype(jnp.float32)[:, :, None, :])
    return out.astype(h.dtype)

  def __call__(self, h_BxTxMxD, sublayer: Callable[[jax.Array], jax.Array]):
    """h -> depth(sublayer(width(h))). Build `sublayer`'s modules outside this call."""
    x_BxTxD, state = self.width(h_BxTxMxD)
    return self.depth(sublayer(x_BxTxD), state)
