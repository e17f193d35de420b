"""FP8 rows (E4M3 values, E8M0 scale per 32): round-trip error, gathers, host tables."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import fp8


def _table(rows=300, width=64, seed=0):
  rng = np.random.default_rng(seed)
  # Blocks of very different magnitudes, some zero, some with outliers.
  x = rng.standard_normal((rows, width)).astype(np.float32)
  x *= np.exp2(rng.integers(-20, 20, size=(rows, width // 32, 1))).repeat(32, -1).reshape(rows, width)
  x[0] = 0.0
  x[1, 5] = 1e4
  return x


def test_round_trip_error_bound():
  x = _table()
  values, scales = fp8.quantize(x)
  assert values.dtype == fp8.E4M3 and scales.dtype == np.uint8
  assert scales.shape == (300, 2) and (scales < 255).all()
  back = fp8.dequantize(values, scales)
  scale = fp8.scale_of(scales).repeat(32, axis=1)
  err = np.abs(back - x)
  assert (err <= np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * scale)).all()
  np.testing.assert_array_equal(back[0], 0.0)
  # The scale is the smallest power of two that fits the block max into E4M3.
  amax = np.abs(x.reshape(300, 2, 32)).max(-1)
  nz = amax > 0
  assert (amax[nz] / fp8.scale_of(scales)[nz] <= 448).all()
  assert (amax[nz] / fp8.scale_of(scales)[nz] > 224).all()
  # Measured: relative RMS error of a Gaussian table (documented in docs/v4.md).
  g = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
  rel = np.sqrt(np.mean((fp8.dequantize(*fp8.quantize(g)) - g) ** 2) / np.mean(g ** 2))
  assert 0.01 < rel < 0.04, rel


def test_gather_host_and_jit_equal_dequantised_table():
  x = _table(seed=2)
  values, scales = fp8.quantize(x)
  ids = np.random.default_rng(3).integers(0, 300, size=(2, 7, 3))
  want = fp8.dequantize(values, scales)[ids]
  np.testing.assert_array_equal(fp8.gather_rows(values, scales, ids), want)
  dev = jax.jit(fp8.gather_rows)(jnp.asarray(values), jnp.asarray(scales), jnp.asarray(ids))
  np.testing.assert_array_equal(np.asarray(dev), want)
  np.testing.assert_array_equal(fp8.Fp8Table.from_float(x).take(ids), want)


def test_bad_shapes_are_one_line_errors():
  with pytest.raises(ValueError, match="divisible by 32"):
    fp8.quantize(np.zeros((2, 48), np.float32))
  values, scales = fp8.quantize(np.zeros((2, 64), np.float32))
  with pytest.raises(ValueError, match="do not fit"):
    fp8.Fp8Table(values, scales[:, :1])


def test_scales_of_the_wrong_kind_nan_bytes_and_negative_ids_are_caught():
  """Float multipliers as scales read as all-zero rows, f32 values ~128x too small,
  a NaN scale byte (255) as +-inf rows, and a negative id wrapped to the last row."""
  values, scales = fp8.quantize(_table(rows=4, width=64, seed=5))
  for wrong in ((values, fp8.scale_of(scales)), (values.astype(np.float32), scales)):
    with pytest.raises(ValueError, match=r"need float8_e4m3fn values and E8M0 scale "
                                         r"bytes \(uint8"):
      fp8.Fp8Table(*wrong)
  nan_scales = scales.copy()
  nan_scales[1, 0] = 255
  rows = fp8.Fp8Table(values, nan_scales).take(np.array([0, 1]))
  assert np.isnan(rows[1, :fp8.BLOCK]).all() and np.isfinite(rows[0]).all()
  assert not np.isinf(rows).any()
  with pytest.raises(IndexError, match=r"row ids span \[-1, 2\], outside the table's 4"):
    fp8.Fp8Table(values, scales).take(np.array([2, -1]))


def test_host_tables_gather_fp8_rows():
  from engram_jax import host_tables
  from tests.conftest import tiny_model_config
  cfg = tiny_model_config(embed_per_ngram=64)  # head_dim 32: one scale per row
  spec = cfg.engram.hash_spec()
  floats = [_table(rows=spec.rows(i), width=32, seed=i) for i in range(2)]
  host = host_tables.HostTables(cfg, [fp8.Fp8Table.from_float(t) for t in floats])
  tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
  ids = host.hash_ids(tokens)
  for l, rows in enumerate(host.gather(ids)):
    want = fp8.dequantize(*fp8.quantize(floats[l]))[ids[:, :, l] + spec.offsets_LxH[l]]
    np.testing.assert_array_equal(rows, want)
