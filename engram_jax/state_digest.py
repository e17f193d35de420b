"""A digest of a checkpoint's arrays, saved with them and checked when they are read.

orbax stores arrays without checksums: a flipped or overwritten byte in a checkpoint's
data files (a failing disk, a bad copy) restores silently as different values, and a
resumed run then trains on them. So every save records, per array, two uint32 sums of
its bits (the plain sum, and the sum weighted by each element's 1-based position: a
changed word changes the first, moved words the second), and a restore compares them.

The sums are computed on the device in one jitted program over the (possibly sharded)
arrays, so a save reads each array once more on the accelerator, not over the host
link; they do not depend on the sharding, so a checkpoint saved on one mesh is checked
on another. Keys are the arrays' paths ("params/block_1/engram/table"), so a reader
that restores only the params checks only those; each entry keeps its dtype, and an
array read back in another dtype is not compared.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Digest = dict[str, list]  # path -> [sum, position-weighted sum, dtype name]


def path_name(path) -> str:
  """"params/block_1/engram/table" of a pytree key path (attribute or dict keys)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _words(x):
  """The bits of `x` as uint32 values (1- and 2-byte types widened, 8-byte split)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape):
  """1-based row-major positions (mod 2**32) of an array of `shape`, without a reshape
  (which could regroup a sharded array)."""
  index, stride = jnp.ones(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride = (stride * shape[axis]) % 2**32
  return index


@jax.jit
def _sums(leaves):
  out = [jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                    jnp.sum(w * _positions(w.shape), dtype=jnp.uint32)])
         for w in map(_words, leaves)]
  return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def _host(x) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _numpy_sums(x: np.ndarray, chunk: int = 1 << 20) -> tuple[int, int]:
  """`_sums` of one host array, the same numbers, in chunks (no full-size temporary),
  in uint32 arithmetic that wraps as the device's does."""
  words = (x.astype(np.uint32) if x.dtype == np.bool_ else
           np.ascontiguousarray(x).view(_UNSIGNED[x.dtype.itemsize])).reshape(-1)
  steps = np.arange(chunk, dtype=np.uint32)
  total = weighted = np.uint32(0)
  with np.errstate(over="ignore"):
    for start in range(0, words.size, chunk):
      w = words[start:start + chunk].astype(np.uint32, copy=False)
      positions = steps[:w.size] + np.uint32((start + 1) % (1 << 32))
      total = total + w.sum(dtype=np.uint32)
      weighted = weighted + (w * positions).sum(dtype=np.uint32)
  return int(total), int(weighted)


def _on_host(x) -> bool:
  """A NumPy array, or a jax array in host memory (`pinned_host`: the reader's host
  tables), which the device program must not read."""
  kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
  return isinstance(x, np.ndarray) or (kind is not None and "host" in kind)


def digest(tree: Any) -> Digest:
  """{path: [sum, weighted sum, dtype]} of every array leaf of `tree`: device arrays in
  one jitted program, host arrays with NumPy."""
  flat = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and hasattr(x, "shape")]
  device = [(name, x) for name, x in flat if not _on_host(x)]
  sums = dict(zip([name for name, _ in device],
                  _host(_sums([jnp.asarray(x) for _, x in device])).tolist()))
  for name, x in flat:
    if name not in sums:
      sums[name] = _numpy_sums(np.asarray(x))
  return {name: [int(sums[name][0]), int(sums[name][1]), str(x.dtype)] for name, x in flat}


def first_mismatch(tree: Any, saved: Digest) -> str | None:
  """The path of the first array of `tree` whose digest differs from `saved` (arrays
  `saved` lacks, or read in another dtype, are not compared); None when all agree."""
  for name, (s, w, dtype) in digest(tree).items():
    want = saved.get(name)
    if want is not None and want[2] == dtype and [int(want[0]), int(want[1])] != [s, w]:
      return name
  return None
