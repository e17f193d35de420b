"""npz files (image codes, feature-net weights, reference statistics, caches, samples): read
with a one-line error naming the file's role, written so a torn write leaves nothing."""
import zipfile
import zlib
from typing import Any, Optional, Sequence

import numpy as np


def read_npz(path: str, what: str, fix: str = "",
             keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
  """The arrays of an npz file (only those of `keys` it has, when given: others are
  not read); a ValueError naming `what` (a flag, a cache) if it is not one (empty,
  truncated, damaged, or those arrays pickled objects), with `fix` appended."""
  try:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
      raise ValueError("a single .npy array, not an npz archive")
    with loaded as npz:
      return {k: npz[k] for k in npz.files if keys is None or k in keys}
  except (OSError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
          zlib.error) as err:
    raise ValueError(f"{what}: cannot read it as an npz ({_why(err)})"
                     + (f"; {fix}" if fix else "")) from None


def _why(err: BaseException) -> str:
  """numpy's reason in a few words: its own text suggests unpickling untrusted bytes."""
  text = (str(err).splitlines() or [""])[0]
  if "pickle" in text:
    return ("not an npz archive, or one holding object arrays, which are not read "
            "(unpickling could run code)")
  if isinstance(err, EOFError) or not text:
    return "empty or truncated"
  return f"damaged or not an npz: {text[:120]}"


def save_npz(path: str, arrays: dict[str, Any]) -> None:
  """Writes `arrays` as an npz through a temporary file: a torn write never leaves a
  readable file (or a cache hit) behind."""
  from engram_jax import paths

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the name
      np.savez(f, **arrays)
  paths.atomic_write(path, write)  # its own temp name: two writers do not collide
