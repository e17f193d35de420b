"""Shared timing for bench/ scripts: median wall time of a jitted call, device-synced."""
import time

import jax
import numpy as np


def median_seconds(fn, repeats: int) -> float:
  """Median seconds of `fn()` over `repeats` calls; each waits for its results."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))
