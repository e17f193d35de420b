"""npz files of the studies (feature-net weights, reference statistics, caches): read
with a one-line error naming the file's role, written so a torn write leaves nothing."""
import os
import zipfile
from typing import Any

import numpy as np


def read_npz(path: str, what: str, fix: str = "") -> dict[str, np.ndarray]:
  """Every array of an npz file; a ValueError naming `what` (a flag, a cache) if it is
  not one, with `fix` appended."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (OSError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as err:
    raise ValueError(f"{what}: cannot read it as an npz (not an npz archive: {err})"
                     + (f"; {fix}" if fix else "")) from None


def save_npz(path: str, arrays: dict[str, Any]) -> None:
  """Writes `arrays` as an npz through a temporary file: a torn write never leaves a
  readable file (or a cache hit) behind."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
