"""Local text corpora: which files a source holds, and which of them are held out.

A local source ("stdlib", "site_packages", "files": data/text.py) is a root and its
sorted, non-empty files. They split into train and val by a stable hash of each path
relative to the root, so a file's split never depends on which other files exist
(adding files moves no old one), and `data.max_files` takes files spread evenly over
the sorted list rather than its head.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from typing import NamedTuple, Sequence

import numpy as np

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class LocalCorpus(NamedTuple):
  """A local source's files: every match, its train/val split, and what is used."""
  root: str
  files: list[str]
  train_all: list[str]
  val_all: list[str]

  def used(self, split: str, max_files: int) -> list[str]:
    return _spread(self.train_all if split == "train" else self.val_all, max_files)


def local_corpus(source: str, files_glob: str, val_fraction: float) -> LocalCorpus:
  """The files of a local source ("stdlib", "site_packages" or "files") and their
  train/val split."""
  root, files = _local_files(source, files_glob)
  return LocalCorpus(root, files, *split_files(files, root, val_fraction))


def _local_files(source: str, files_glob: str) -> tuple[str, list[str]]:
  """Root and files of a local source."""
  if source == "stdlib":
    return _stdlib_files()
  if source == "site_packages":
    return _site_packages_files()
  return _glob_files(files_glob)


def _stdlib_files() -> tuple[str, list[str]]:
  """Root and sorted non-empty `*.py` files of this interpreter's standard library."""
  return _python_files(sysconfig.get_paths()["stdlib"])


def _site_packages_files() -> tuple[str, list[str]]:
  """Root and sorted non-empty `*.py` files of the installed packages (`purelib`):
  hundreds of MB of real code on any machine that installed this project."""
  return _python_files(sysconfig.get_paths()["purelib"], skip_site_packages=False)


def _python_files(root: str, skip_site_packages: bool = True) -> tuple[str, list[str]]:
  skip = _STDLIB_SKIP_DIRS if skip_site_packages else (
      _STDLIB_SKIP_DIRS - {"site-packages", "dist-packages"})
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in skip)
    found += [os.path.join(directory, n) for n in names if n.endswith(".py")]
  return root, sorted(f for f in found if os.path.getsize(f) > 0)


def _glob_root(pattern: str) -> str:
  """The directory before the first wildcard: split hashes are relative to it."""
  head = os.path.dirname(pattern)
  while glob.has_magic(head):
    head = os.path.dirname(head)
  return head or "."


def _glob_files(pattern: str) -> tuple[str, list[str]]:
  """Root and sorted non-empty files matching a glob; no match is an error."""
  pattern = os.path.expanduser(pattern)
  files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f"data.files_glob={pattern!r} matches no files; check the path "
                     f"(use '**' to recurse into directories).")
  nonempty = [f for f in files if os.path.getsize(f) > 0]
  if not nonempty:
    raise ValueError(f"data.files_glob={pattern!r} matches only empty files "
                     f"({len(files)}); point it at files with text.")
  return _glob_root(pattern), nonempty


def _unit_hash(key: str) -> float:
  """A stable hash in [0, 1): the same on every machine and Python run."""
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def split_files(files: Sequence[str], root: str,
                val_fraction: float) -> tuple[list[str], list[str]]:
  """Train and val files, by a stable hash of each path relative to `root`.

  A file's split never depends on which other files exist, so adding files does not
  move old ones. Train is never empty (a lone file trains), and with val_fraction > 0
  and at least two files neither is val: the file with the smallest hash goes there
  if none landed, the one with the largest stays in train if all did.
  """
  keys = {f: _unit_hash(os.path.relpath(f, root).replace(os.sep, "/")) for f in files}
  val = [f for f in files if keys[f] < val_fraction]
  if val_fraction > 0 and not val and len(files) >= 2:
    val = [min(files, key=keys.__getitem__)]
  if files and len(val) == len(files):
    val.remove(max(files, key=keys.__getitem__))
  val_set = set(val)
  return [f for f in files if f not in val_set], val


def _spread(files: list[str], max_files: int) -> list[str]:
  """At most `max_files` files spread evenly over the sorted list (not just its head)."""
  if max_files <= 0 or len(files) <= max_files:
    return files
  picks = np.linspace(0, len(files) - 1, max_files).round().astype(int)
  return [files[i] for i in picks]
