"""RMSNorm with logically named scale, over the last axis, with a hand-written backward.

Autodiff of `x * rsqrt(mean(x^2) + eps) * scale` keeps several full-size f32
intermediates and differentiates the mean, the rsqrt and the broadcasts one by one (on
a 2-core CPU its fwd+bwd cost 5x to 11x its forward at 8k+ rows; docs/benchmarks.md,
"Backward cost"). `rms_norm` is a `jax.custom_vjp` whose backward is the closed form,
from saved `x` and the per-row `1/rms` only (about half the time, fewer full-size
buffers):

  xhat = x * r,  r = rsqrt(mean(x^2) + eps),  y = xhat * scale
  dscale = sum_rows(g * x * r)     (a dot with r, see _scale_grad)
  dx     = r * (g*scale - xhat * mean(g*scale * xhat))
"""
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _inv_rms(x32, eps: float):
  """`1/rms` over the last axis, f32, keepdims: the only statistic the backward needs."""
  return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, scale, eps: float = 1e-6, out_dtype=jnp.float32):
  """`x / rms(x) * scale` over the last axis, statistics in f32, result in `out_dtype`.

  `scale` spans the trailing `scale.ndim` axes of `x`. Gradients come back in the dtypes
  of `x` and `scale` (like autodiff of the f32-upcast expression).
  """
  return _forward(x, scale, eps, out_dtype)[0]


def _forward(x, scale, eps, out_dtype):
  x32 = x.astype(jnp.float32)
  r = _inv_rms(x32, eps)
  y = (x32 * r * scale.astype(jnp.float32)).astype(out_dtype)
  return y, (x, scale, r)


def _backward(eps, out_dtype, res, g):
  del eps, out_dtype
  x, scale, r = res
  x32 = x.astype(jnp.float32)
  g32 = g.astype(jnp.float32)
  gs = g32 * scale.astype(jnp.float32)
  # The per-row statistic is materialised (a barrier): XLA:CPU otherwise fused the row
  # reduction into the elementwise `dx` loop and recomputed it per element.
  c = jax.lax.optimization_barrier(jnp.mean(gs * x32, axis=-1, keepdims=True) * r)
  dx = r * (gs - x32 * r * c)
  return dx.astype(x.dtype), _scale_grad(g32 * x32, r, scale.shape).astype(scale.dtype)


def _scale_grad(gx, r_x1, scale_shape):
  """sum over rows of g * x * r, as a contraction with r: `gx` has the shape of x (its
  trailing axes are the scale's), `r_x1` the shape of x with a last axis of 1.

  A dot, not a column reduction: XLA:CPU ran `sum(g * xhat, rows)` fused with `dx`
  ~2x slower than the whole backward with a dot. With one scale row (the usual norm)
  it is `r^T @ gx`, `[1, n] x [n, width]` (n: x's axes before the scale's, flattened),
  which needs no transposed copy of `gx`.
  """
  rows = int(np.prod(scale_shape[:-1], dtype=np.int64))
  width = scale_shape[-1]
  # HIGHEST: a TPU would otherwise run these f32 dots in one bf16 pass.
  highest = jax.lax.Precision.HIGHEST
  if rows == 1:
    return jnp.matmul(r_x1.reshape(1, -1), gx.reshape(-1, width),
                      precision=highest).reshape(scale_shape)
  # p: the scale's axes before its last (e.g. the branches of a per-branch norm).
  return jnp.einsum("npd,np->pd", gx.reshape(-1, rows, width), r_x1.reshape(-1, rows),
                    precision=highest).reshape(scale_shape)


rms_norm.defvjp(_forward, _backward)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; `axes` names the trailing dims the scale spans.

  `axes=("embed",)` is the usual norm; `axes=("branch", "embed")` gives every residual
  branch its own scale (Engram's per-branch norms).
  """
  axes: tuple[str, ...] = ("embed",)
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = x.shape[-len(self.axes):]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                       shape, self.param_dtype)
    return rms_norm(x, scale, self.eps, jnp.dtype(self.dtype))
