"""scikit-learn's bundled 8x8 digits as image tokens: quantised pixels, a fixed split.

1797 images of 10 classes with pixel values 0..16; every pixel becomes one of `levels`
tokens, and a stratified, seeded split gives 1439/179/179 train/val/test images.
The data ships with scikit-learn, so tests and notebooks need no download.
"""
import functools

import numpy as np

VALUES = 17            # pixels take the values 0..16
HOLDOUT = 0.1          # of each class, to val and again to test
SIZE, CLASSES = 8, 10  # 8 x 8 pixels, digits 0..9
SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=1)
def raw() -> tuple[np.ndarray, np.ndarray]:
  """Pixels `[1797, 8, 8]` (int, 0..16) and labels, read once from scikit-learn."""
  from sklearn.datasets import load_digits  # only digits runs pay for the import

  digits = load_digits()
  images, labels = digits.images.astype(np.int32), digits.target.astype(np.int32)
  for a in (images, labels):
    a.setflags(write=False)
  return images, labels


def quantize(pixels, levels: int) -> np.ndarray:
  """Pixel values 0..16 -> tokens 0..levels-1: `floor(v * levels / 17)`.

  Splits the 17 values into `levels` runs of (nearly) equal length, 0 to token 0 and 16
  to token levels-1; levels = 17 is the identity.
  """
  return (np.asarray(pixels, np.int32) * levels) // VALUES


def split_indices(split_seed: int) -> dict[str, np.ndarray]:
  """Sorted image indices of train/val/test: a stratified, seeded split.

  Of each class, round(10%) of the images (shuffled by `split_seed`) go to val and as
  many to test; the rest train. 1439 / 179 / 179 images for every seed.
  """
  _, labels = raw()
  rng = np.random.default_rng(split_seed)
  parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  for label in range(CLASSES):
    members = rng.permutation(np.flatnonzero(labels == label))
    hold = int(round(HOLDOUT * len(members)))
    parts["val"].append(members[:hold])
    parts["test"].append(members[hold:2 * hold])
    parts["train"].append(members[2 * hold:])
  return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}
