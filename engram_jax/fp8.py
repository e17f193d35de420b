"""FP8 Engram rows as DeepSeek-V4.1 ships them: E4M3 values, one E8M0 scale per 32.

A table `[R, E]` is stored as `values_RxE` (float8_e4m3fn) and `scales_RxEb` (uint8,
Eb = E / 32): the biased exponent of a power-of-two scale, `2 ** (byte - 127)` (E8M0:
no sign, no mantissa; 255 is NaN and never written). Rows are dequantised only after
the gather, so a 384M-row table costs 1.03 bytes per value in memory and the dense
f32 table is never built. `dequantize` and `gather_rows` have one body for NumPy
(host tables, memory-mapped checkpoints) and jax (under jit).

Error (round to nearest E4M3, 3 mantissa bits): per value at most
`max(2**-4 * |x|, 2**-10 * scale)`, the second term covering E4M3 subnormals; the
scale is the smallest power of two with `amax / scale <= 448`.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

try:
  import jax
  import jax.numpy as jnp
except ImportError:  # pragma: no cover
  jax = jnp = None

BLOCK = 32
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_E4M3_MAX = 448.0
_E8M0_BIAS = 127


def _xp(x):
  return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def _check_width(width: int) -> None:
  if width % BLOCK:
    raise ValueError(f"FP8 rows need a row width divisible by {BLOCK} (one scale per "
                     f"{BLOCK} values); got {width}.")


def quantize(table_RxE, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """(values `[R, E]` E4M3, scales `[R, Eb]` uint8 E8M0, Eb = E / block) of an f32 table
  (host)."""
  x = np.asarray(table_RxE, np.float32)
  r, e = x.shape
  if e % block:
    raise ValueError(f"FP8 rows need a row width divisible by {block}; got {e}.")
  blocks = x.reshape(r, e // block, block)
  amax = np.abs(blocks).max(axis=-1)
  with np.errstate(divide="ignore"):
    exponent = np.ceil(np.log2(amax / _E4M3_MAX))
  exponent = np.clip(np.where(amax > 0, exponent, -_E8M0_BIAS), -_E8M0_BIAS, _E8M0_BIAS)
  scaled = blocks / np.exp2(exponent)[..., None]  # exact: a power-of-two division
  values = scaled.astype(E4M3).reshape(r, e)
  return values, (exponent + _E8M0_BIAS).astype(np.uint8)


def scale_of(scales_xEb):
  """2 ** (byte - 127) as f32, exactly: the byte is the f32 exponent field (byte 0,
  2**-127, is an f32 subnormal: its own bit pattern)."""
  xp = _xp(scales_xEb)
  bits = scales_xEb.astype(xp.uint32) << xp.uint32(23)
  bits = xp.where(scales_xEb == 0, xp.uint32(0x00400000), bits)
  bits = xp.where(scales_xEb == 255, xp.uint32(0x7FC00000), bits)  # E8M0's NaN, not inf
  if xp is np:
    return bits.view(np.float32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize(values_xE, scales_xEb):
  """f32 rows `[..., E]` of E4M3 values and their per-block E8M0 scales."""
  xp = _xp(values_xE)
  e = values_xE.shape[-1]
  block = e // scales_xEb.shape[-1]
  v = values_xE.astype(xp.float32).reshape(*values_xE.shape[:-1], e // block, block)
  return (v * scale_of(scales_xEb)[..., None]).reshape(values_xE.shape)


def dequantize_blocks(values, scales, block: int = BLOCK) -> np.ndarray:
  """f32 `[rows, cols]` of an FP8 matrix `values` with one scale per `block x block`
  tile, `scales` `[rows / block, cols / block]` rounded up (DeepSeek's
  `weight_block_size [32, 32]` for linear layers; host only). A scale is an E8M0 byte
  (uint8) or the multiplier itself (a float, as `weight_scale_inv` tensors often are);
  the dtype says which, since read the other way either is silently wrong."""
  o, i = values.shape
  want = (-(-o // block), -(-i // block))
  if tuple(scales.shape) != want:
    raise ValueError(f"FP8 block scales of shape {tuple(scales.shape)} do not fit a "
                     f"[{o}, {i}] matrix: need {list(want)} ({block}x{block} tiles).")
  scales = np.asarray(scales)
  if scales.dtype == np.uint8:
    scale = scale_of(scales)
  elif np.issubdtype(scales.dtype, np.floating) or scales.dtype == _BF16:
    scale = scales.astype(np.float32)
  else:
    raise ValueError(f"FP8 block scales of dtype {scales.dtype}: need E8M0 bytes (uint8) "
                     f"or float multipliers.")
  scale = scale.repeat(block, 0).repeat(block, 1)[:o, :i]
  return np.asarray(values).astype(np.float32) * scale


def gather_rows(values_RxE, scales_RxEb, row_ids):
  """Dequantised rows `[*ids, E]`: gather the FP8 rows and their scales, then scale."""
  xp = _xp(values_RxE)
  if xp is np:
    ids = np.asarray(row_ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= values_RxE.shape[0]):
      raise IndexError(f"FP8 row ids span [{ids.min()}, {ids.max()}], outside the "
                       f"table's {values_RxE.shape[0]} rows; hash them with this "
                       "table's layout (a negative id would wrap)")
    return dequantize(np.take(values_RxE, ids, axis=0), np.take(scales_RxEb, ids, axis=0))
  return dequantize(jnp.take(values_RxE, row_ids, axis=0, mode="clip"),
                    jnp.take(scales_RxEb, row_ids, axis=0, mode="clip"))


class Fp8Table:
  """A host FP8 table (arrays or memory maps) that `host_tables.HostTables` can gather
  from: `take(ids)` returns f32 rows, reading only the rows asked for."""

  def __init__(self, values_RxE, scales_RxEb):
    _check_width(values_RxE.shape[1])
    if values_RxE.dtype != E4M3 or scales_RxEb.dtype != np.uint8:
      raise ValueError(f"FP8 table of {values_RxE.dtype} values and {scales_RxEb.dtype} "
                       "scales: need float8_e4m3fn values and E8M0 scale bytes (uint8, as "
                       "`quantize` returns them, not `scale_of`'s multipliers; raw bytes: "
                       "`.view(fp8.E4M3)`, `.view(np.uint8)`)")
    if scales_RxEb.shape != (values_RxE.shape[0], values_RxE.shape[1] // BLOCK):
      raise ValueError(f"FP8 scales of shape {scales_RxEb.shape} do not fit values of "
                       f"shape {values_RxE.shape}: need [rows, width / {BLOCK}].")
    self.values_RxE, self.scales_RxEb = values_RxE, scales_RxEb

  @classmethod
  def from_float(cls, table_RxE) -> "Fp8Table":
    return cls(*quantize(table_RxE))

  shape = property(lambda self: self.values_RxE.shape)
  ndim = 2
  dtype = np.dtype(np.float32)  # of the rows `take` returns
  nbytes = property(lambda self: self.values_RxE.nbytes + self.scales_RxEb.nbytes)

  def take(self, row_ids) -> np.ndarray:
    return gather_rows(self.values_RxE, self.scales_RxEb, row_ids)
