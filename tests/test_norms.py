"""Hand-written backwards (RMSNorm, the Engram conv) against autodiff of the plain
expressions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from engram_jax.layers.norms import RMSNorm, rms_norm


def reference_rms_norm(x, scale, eps, out_dtype):
  """The pre-custom_vjp expression (autodiff reference)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(out_dtype)


def _inputs(dtype, scale_shape):
  kx, ks = jax.random.split(jax.random.key(0))
  x = (3.0 * jax.random.normal(kx, (2, 5, *scale_shape))).astype(dtype)
  scale = (1.0 + 0.3 * jax.random.normal(ks, scale_shape)).astype(jnp.float32)
  return x, scale


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("scale_shape", [(8,), (3, 8)])
def test_values_and_grads_match_autodiff(dtype, out_dtype, scale_shape):
  x, scale = _inputs(dtype, scale_shape)
  cot = jax.random.normal(jax.random.key(1), x.shape).astype(out_dtype)
  ours = lambda x, s: rms_norm(x, s, 1e-6, jnp.dtype(out_dtype))
  ref = lambda x, s: reference_rms_norm(x, s, 1e-6, out_dtype)
  y, vjp = jax.vjp(ours, x, scale)
  y_ref, vjp_ref = jax.vjp(ref, x, scale)
  assert y.dtype == y_ref.dtype == out_dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  tol = 1e-5 if dtype == jnp.float32 and out_dtype == jnp.float32 else 2e-2
  for ours_g, ref_g, like in zip(vjp(cot), vjp_ref(cot), (x, scale)):
    assert ours_g.dtype == ref_g.dtype == like.dtype and ours_g.shape == like.shape
    np.testing.assert_allclose(np.asarray(ours_g, np.float32), np.asarray(ref_g, np.float32),
                               rtol=tol, atol=tol)


def test_check_grads_f32():
  """Numerical (finite-difference) check of the custom VJP, reverse mode."""
  x, scale = _inputs(jnp.float32, (3, 8))
  check_grads(lambda x, s: rms_norm(x, s, 1e-6, jnp.dtype(jnp.float32)), (x, scale),
              order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_module_grads_match_reference_under_jit():
  x, _ = _inputs(jnp.float32, (8,))
  norm = RMSNorm(("embed",))
  params = nn.unbox(norm.init(jax.random.key(0), x))
  loss = lambda p, x: jnp.sum(jnp.sin(norm.apply(p, x)))
  ref_loss = lambda p, x: jnp.sum(jnp.sin(reference_rms_norm(
      x, p["params"]["scale"], 1e-6, jnp.float32)))
  g = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  g_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# The Engram conv's custom VJP (layers/engram.py) against autodiff of the plain taps
# ----------------------------------------------------------------------------------
def reference_conv(x_BxTxMD, kernel_KxMD, dilation, history_BxPxMD):
  ext = jnp.concatenate([history_BxPxMD.astype(x_BxTxMD.dtype), x_BxTxMD], axis=1)
  taps, t = kernel_KxMD.shape[0], x_BxTxMD.shape[1]
  return sum(kernel_KxMD[j].astype(x_BxTxMD.dtype) * ext[:, j * dilation:j * dilation + t]
             for j in range(taps))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_values_and_grads_match_autodiff(dtype):
  from engram_jax.layers.engram import causal_dilated_conv
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (2, 7, 5)).astype(dtype)
  kernel = jax.random.normal(keys[1], (4, 5))
  history = jax.random.normal(keys[2], (2, 9, 5)).astype(dtype)
  cot = jax.random.normal(keys[3], (2, 7, 5)).astype(dtype)
  ours = lambda x, k, h: causal_dilated_conv(x, k, 3, h)
  ref = lambda x, k, h: reference_conv(x, k, 3, h)
  y, vjp = jax.vjp(ours, x, kernel, history)
  y_ref, vjp_ref = jax.vjp(ref, x, kernel, history)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  for a, b in zip(vjp(cot), vjp_ref(cot)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)
  if dtype == jnp.float32:
    check_grads(ours, (x, kernel, history), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
