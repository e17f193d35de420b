"""SwiGLU feed-forward block."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def dense_init(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    width = x_BxTxD.shape[-1]
    dense = lambda feats, axes, name: nn.Dense(
        feats, use_bias=False, kernel_init=dense_init(axes), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    gate_BxTxF = dense(self.hidden, ("embed", "mlp"), "gate")(x_BxTxD)
    up_BxTxF = dense(self.hidden, ("embed", "mlp"), "up")(x_BxTxD)
    return dense(width, ("mlp", "embed"), "down")(nn.silu(gate_BxTxF) * up_BxTxF)
