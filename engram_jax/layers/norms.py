"""RMSNorm with logically named scale, over the last axis."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)
