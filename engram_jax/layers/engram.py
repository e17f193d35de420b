"""The Engram layer: hashed n-gram memory fused through a context-aware gate.

For a position t with hidden state h_t (one per residual branch m) and row ids z_t of
its n-grams (from `engram_jax.hashing`, one per order and head):

  e_t   = concat_{n,g} table[offset_{n,g} + z_{t,n,g}]     lookup, width HE = (N-1)*G*E
  key   = W_K^m e_t,  value = W_V e_t                      W_V shared, W_K per branch
  s     = <RMSNorm(h_t^m), RMSNorm(key)> / sqrt(D)
  alpha = sigmoid(sign(s) * sqrt(|s|))                     (or a constant, or 0)
  v     = alpha * value
  y     = v + SiLU(CausalDepthwiseConv(RMSNorm(v)))         kernel 4, dilation N, zero init

and the block adds y to its residual stream. `engram.variant = "v4"` is DeepSeek-V4.1's
form: one projection of e_t to M keys and one shared value, no conv,

  [key^1..key^M, value] = e_t W                           W: [HE, M1, D], M1 = M+1
  alpha^m = gate(RMSNorm_m(h_t^m), RMSNorm_m(key^m)),  y^m = alpha^m * value

and, in both variants, positions marked in `masked_BxT` (non-text spans) get y = 0,
leaving the residual stream untouched. Row ids depend only on tokens, so the
lookup can run anywhere (host-side hashing, sharded or offloaded tables): rows given
in the `engram_rows` collection replace the table (see engram_jax.sampling.offload).
"""
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import config as config_lib
from engram_jax import sharding
from engram_jax.layers.attention import Mode
from engram_jax.layers.mlp import dense_init
from engram_jax.layers.norms import RMSNorm

_GATE_EPS = 1e-6
# Variable collection of rows looked up outside the model, `[B, T, H, E]` under each
# Engram layer's path as "rows": `apply({"params": p, ROWS_COLLECTION: rows}, ...)`.
ROWS_COLLECTION = "engram_rows"
# A constant gate's value as a param, when present (a traced scalar, not the config's
# static constant): the gate-clamp probe runs every constant through one compiled
# program (studies/probes.py). Absent from trained params.
GATE_VALUE = "gate_value"


def lookup_rows(table_RxE, row_ids_BxTxH, strategy: str = "gather"):
  """Gathers `[B, T, H, E]` rows of a flat table.

  "gather" is a plain `jnp.take` (XLA decides how to gather a sharded table); "psum"
  and "all_to_all" run under `shard_map` on the ambient mesh (see engram_jax.sharding).
  """
  if strategy == "gather":
    return jnp.take(table_RxE, row_ids_BxTxH, axis=0, mode="clip")
  return sharding.sharded_lookup(table_RxE, row_ids_BxTxH, strategy)


def context_gate(h_norm_BxTxMxD, key_norm_BxTxMxD):
  """alpha = sigmoid(sign(s) * sqrt(|s|)), s = <h, key> / sqrt(D); `[B, T, M, 1]`."""
  width = h_norm_BxTxMxD.shape[-1]
  s = jnp.sum(h_norm_BxTxMxD.astype(jnp.float32) * key_norm_BxTxMxD.astype(jnp.float32),
              axis=-1, keepdims=True) / np.sqrt(width)
  return jax.nn.sigmoid(jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), _GATE_EPS)))


def causal_dilated_conv(x_BxTxMD, kernel_KxMD, dilation: int, history_BxPxMD):
  """Depthwise causal conv: y_t = sum_j kernel[j] * x[t - (K-1-j) * dilation].

  history_BxPxMD holds the P = (K-1)*dilation inputs before position 0 (zeros at the
  start of a sequence, the decode state when generating).
  """
  ext = jnp.concatenate([history_BxPxMD.astype(x_BxTxMD.dtype), x_BxTxMD], axis=1)
  return _taps(ext, kernel_KxMD.astype(x_BxTxMD.dtype), dilation)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _taps(ext_BxTpxMD, kernel_KxMD, dilation: int):
  """y_t = sum_j kernel[j] * ext[t + j * dilation], t < Tp - (K-1) * dilation.

  ext holds Tp = P + T inputs: the P before position 0, then the T new ones.
  A custom VJP: autodiff turns each tap's slice into a pad of the whole `[B, Tp, MD]`
  input (K full-size buffers, then their sum); the backward below is one padded copy
  of the cotangent, one fused multiply-add over its K shifted views, and K reductions.
  """
  taps = kernel_KxMD.shape[0]
  t = ext_BxTpxMD.shape[1] - (taps - 1) * dilation
  y = jnp.zeros(ext_BxTpxMD.shape[:1] + (t,) + ext_BxTpxMD.shape[2:], ext_BxTpxMD.dtype)
  for j in range(taps):
    y = y + kernel_KxMD[j] * ext_BxTpxMD[:, j * dilation:j * dilation + t]
  return y


def _taps_fwd(ext_BxTpxMD, kernel_KxMD, dilation):
  return _taps(ext_BxTpxMD, kernel_KxMD, dilation), (ext_BxTpxMD, kernel_KxMD)


def _taps_bwd(dilation, res, g_BxTxMD):
  ext_BxTpxMD, kernel_KxMD = res
  taps = kernel_KxMD.shape[0]
  span = (taps - 1) * dilation
  u = ext_BxTpxMD.shape[1]
  t = g_BxTxMD.shape[1]
  g32 = g_BxTxMD.astype(jnp.float32)
  k32 = kernel_KxMD.astype(jnp.float32)
  # d ext[p] = sum_j kernel[j] * g[p - j * dilation] (where that is in range)
  g_pad = jnp.pad(g32, ((0, 0), (span, span), (0, 0)))
  d_ext = sum(k32[j] * g_pad[:, span - j * dilation:span - j * dilation + u]
              for j in range(taps))
  ext32 = ext_BxTpxMD.astype(jnp.float32)
  d_kernel = jnp.stack([jnp.sum(g32 * ext32[:, j * dilation:j * dilation + t], axis=(0, 1))
                        for j in range(taps)])
  return d_ext.astype(ext_BxTpxMD.dtype), d_kernel.astype(kernel_KxMD.dtype)


_taps.defvjp(_taps_fwd, _taps_bwd)


def history_before(ext_BxTpx_, ends_B: Optional[jax.Array], span: int):
  """Decode state: the `span` inputs before each row's end.

  ext holds `span` history entries then the new inputs, so position p is ext[p + span];
  `ends_B` (prompt lengths) defaults to the end of the new inputs.
  """
  if ends_B is None:
    return ext_BxTpx_[:, ext_BxTpx_.shape[1] - span:]
  return jax.vmap(lambda row, end: jax.lax.dynamic_slice_in_dim(row, end, span, axis=0))(
      ext_BxTpx_, ends_B)


class Engram(nn.Module):
  """One Engram layer over M residual branches: `[B,T,M,D] x [B,T,H] -> [B,T,M,D]`.

  table_rows: rows of this layer's flat table (sum of its heads' prime sizes); the
    param is padded to `engram.padded_rows(table_rows)` so that meshes divide it.
  In "prefill" mode `lengths_B` says where each row's prompt ends, so the conv state
  for decoding is taken at the right place for prompts of different lengths.
  With a `ROWS_COLLECTION` variable "rows" (the rows of `row_ids_BxTxH`, gathered
  elsewhere, e.g. from a host-memory table) the layer reads those and has no table.
  """
  engram: config_lib.EngramConfig
  table_rows: int
  norm_eps: float = 1e-6
  mode: Mode = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _branch_norm(self, name):
    return RMSNorm(("branch", "embed"), self.norm_eps, self.dtype, self.param_dtype,
                   name=name)

  @nn.compact
  def __call__(self, h_BxTxMxD, row_ids_BxTxH, lengths_B: Optional[jax.Array] = None,
               masked_BxT: Optional[jax.Array] = None, rows_BxTxHxE: Optional[jax.Array] = None):
    """rows_BxTxHxE: the rows of `row_ids_BxTxH` looked up by the caller (the scanned
    stack of models/lm.py gathers them before its scan); the layer has no table then."""
    if rows_BxTxHxE is None:
      rows_BxTxHxE = self.given_rows(row_ids_BxTxH)
    if rows_BxTxHxE is None:
      table = self.param(
          "table", nn.with_logical_partitioning(
              nn.initializers.normal(self.engram.table_init_std), ("table_rows", "table_dim")),
          (self.engram.padded_rows(self.table_rows), self.engram.head_dim), self.param_dtype)
      rows_BxTxHxE = self.lookup(table, row_ids_BxTxH)
    y_BxTxMxD = self._forward(h_BxTxMxD, rows_BxTxHxE, lengths_B)
    if masked_BxT is None:
      return y_BxTxMxD
    return jnp.where(masked_BxT[:, :, None, None], jnp.zeros((), y_BxTxMxD.dtype), y_BxTxMxD)

  def given_rows(self, row_ids_BxTxH) -> Optional[jax.Array]:
    """The `ROWS_COLLECTION` rows of this call's ids (checked), or None."""
    if not self.has_variable(ROWS_COLLECTION, "rows"):
      return None
    rows_BxTxHxE = self.get_variable(ROWS_COLLECTION, "rows")
    want = (*row_ids_BxTxH.shape, self.engram.head_dim)
    if rows_BxTxHxE.shape != want:
      raise ValueError(f"{ROWS_COLLECTION} rows of {self.name}: shape {rows_BxTxHxE.shape}, "
                       f"expected {want} ([B, T, heads, head_dim] for this call's tokens)")
    return rows_BxTxHxE

  def lookup(self, table_RxE, row_ids_BxTxH):
    """Rows `[B, T, H, E]` of the table (no gradient to a frozen one)."""
    if not self.engram.table_trainable:
      table_RxE = jax.lax.stop_gradient(table_RxE)
    return lookup_rows(table_RxE, row_ids_BxTxH, self.engram.lookup)

  def _forward(self, h_BxTxMxD, rows_BxTxHxE, lengths_B):
    cfg = self.engram
    b, t, branches, width = h_BxTxMxD.shape
    e_BxTxHE = rows_BxTxHxE.reshape(b, t, cfg.features).astype(self.dtype)
    if cfg.variant == "v4":
      return self._v4(h_BxTxMxD, e_BxTxHE)

    value_BxTxD = nn.Dense(
        width, use_bias=False, kernel_init=dense_init(("engram_features", "embed")),
        dtype=self.dtype, param_dtype=self.param_dtype, name="value")(e_BxTxHE)

    constant = config_lib.gate_constant(cfg.gate)
    if constant is None:
      w_key_MxHExD = self.param(
          "key", nn.with_logical_partitioning(
              nn.initializers.lecun_normal(in_axis=1, out_axis=2),
              ("branch", "engram_features", "embed")),
          (branches, cfg.features, width), self.param_dtype)
      key_BxTxMxD = jnp.einsum("btf,mfd->btmd", e_BxTxHE, w_key_MxHExD.astype(self.dtype))
      alpha_BxTxMx1 = context_gate(self._branch_norm("hidden_norm")(h_BxTxMxD),
                                   self._branch_norm("key_norm")(key_BxTxMxD))
    else:
      alpha_BxTxMx1 = self._constant_gate((b, t, branches, 1), constant)
    v_BxTxMxD = (alpha_BxTxMx1 * value_BxTxD[:, :, None, :]).astype(self.dtype)

    conv_in = self._branch_norm("conv_norm")(v_BxTxMxD).reshape(b, t, branches * width)
    kernel = self.param(
        "conv", nn.with_logical_partitioning(nn.initializers.zeros,
                                             ("conv_taps", "branch", "embed")),
        (cfg.kernel_size, branches, width), self.param_dtype)
    conv_out = self._conv(conv_in, kernel.reshape(cfg.kernel_size, -1), lengths_B)
    return v_BxTxMxD + nn.silu(conv_out).reshape(b, t, branches, width)

  def _constant_gate(self, shape, constant):
    """`constant` as a gate of `shape`, or the `GATE_VALUE` param when it is given."""
    if self.has_variable("params", GATE_VALUE):
      value = self.get_variable("params", GATE_VALUE)
      return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape)
    return jnp.full(shape, constant, jnp.float32)

  def _gate(self, h_BxTxMxD, key_BxTxMxD):
    constant = config_lib.gate_constant(self.engram.gate)
    if constant is not None:
      return self._constant_gate(key_BxTxMxD.shape[:3] + (1,), constant)
    return context_gate(self._branch_norm("hidden_norm")(h_BxTxMxD),
                        self._branch_norm("key_norm")(key_BxTxMxD))

  def _v4(self, h_BxTxMxD, e_BxTxHE):
    """DeepSeek-V4.1's fusion: y^m = alpha^m * value, keys and value from one matmul."""
    branches, width = h_BxTxMxD.shape[2:]
    w_HExM1xD = self.param(
        "key_value", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
            ("engram_features", "branch", "embed")),
        (self.engram.features, branches + 1, width), self.param_dtype)
    kv_BxTxM1xD = jnp.einsum("btf,fmd->btmd", e_BxTxHE, w_HExM1xD.astype(self.dtype))
    key_BxTxMxD, value_BxTxD = kv_BxTxM1xD[:, :, :branches], kv_BxTxM1xD[:, :, branches]
    alpha_BxTxMx1 = self._gate(h_BxTxMxD, key_BxTxMxD)
    return (alpha_BxTxMx1 * value_BxTxD[:, :, None, :]).astype(self.dtype)

  def _conv(self, x_BxTxMD, kernel_KxMD, lengths_B):
    """Runs the short conv, reading and writing the decode state when caching."""
    dilation = self.engram.max_ngram
    span = (self.engram.kernel_size - 1) * dilation
    b, t, c = x_BxTxMD.shape
    zeros = jnp.zeros((b, span, c), x_BxTxMD.dtype)
    if self.mode is None:
      return causal_dilated_conv(x_BxTxMD, kernel_KxMD, dilation, zeros)
    state = self.variable("cache", "conv_history", lambda: zeros)
    history = zeros if self.mode == "prefill" else state.value
    y = causal_dilated_conv(x_BxTxMD, kernel_KxMD, dilation, history)
    state.value = history_before(jnp.concatenate([history, x_BxTxMD], axis=1), lengths_B, span)
    return y
