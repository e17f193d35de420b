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


def digest(tree: Any) -> Digest:
  """{path: [sum, weighted sum, dtype]} of every array leaf of `tree`."""
  flat = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(x, "dtype") and hasattr(x, "shape")]
  sums = _host(_sums([jnp.asarray(x) for _, x in flat])).tolist()
  return {name: [int(s), int(w), str(x.dtype)] for (name, x), (s, w) in zip(flat, sums)}


def first_mismatch(tree: Any, saved: Digest) -> str | None:
  """The path of the first array of `tree` whose digest differs from `saved` (arrays
  `saved` lacks, or read in another dtype, are not compared); None when all agree."""
  for name, (s, w, dtype) in digest(tree).items():
    want = saved.get(name)
    if want is not None and want[2] == dtype and [int(want[0]), int(want[1])] != [s, w]:
      return name
  return None
