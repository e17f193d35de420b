"""Engram tables as files: `.npy` per layer plus a `tables.json` manifest, memory-mapped.

`write_tables` writes them (`python -m engram_jax.workdir export_tables --workdir=W
--out=DIR` exports a run's newest checkpoint); `disk_tables(cfg, DIR)` opens them as
`HostTables` whose rows are read from disk only when a lookup asks for them
(`engram.placement="disk"`, `python -m engram_jax.generate --tables=disk --table_dir=DIR`).
"""
from __future__ import annotations

import json

import numpy as np

from engram_jax import config as config_lib
from engram_jax import paths
from engram_jax.host_tables import HostTables

TABLES_MANIFEST = "tables.json"


def require_local(directory: str, flag: str) -> None:
  """Disk tables are memory-mapped: a remote (gs://) directory is a one-line error."""
  if not paths.is_local(directory):
    raise ValueError(f"{flag}={directory!r}: disk tables are memory-mapped .npy files and "
                     "need a local directory (copy them to a bucket afterwards if you "
                     "want them kept there)")


def prepare_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """Checks `--out` before any work: local, writable (created if missing), and not
  holding an export already (its `tables.json`) unless `overwrite`."""
  require_local(out_dir, "--out")
  manifest = paths.join(out_dir, TABLES_MANIFEST)
  if paths.exists(manifest) and not overwrite:
    raise ValueError(f"--out={out_dir!r} holds an export already ({manifest}); choose "
                     "another --out, or pass --overwrite to replace it")
  try:
    paths.make_writable_dir(out_dir)
  except OSError as err:
    raise ValueError(f"--out={out_dir!r} is not a writable directory "
                     f"({err.strerror or err}); choose another --out") from None


def write_tables(tables: HostTables, out_dir: str, **source) -> str:
  """Writes `tables` as `.npy` files (one per layer) and a `tables.json` manifest
  (with `source`, e.g. the workdir and step) into `out_dir`: the on-disk form
  `disk_tables` memory-maps. Each file is written to a temporary name and renamed, so
  a reader never sees half a table. Returns `out_dir`."""
  import os

  require_local(out_dir, "--out")
  os.makedirs(out_dir, exist_ok=True)
  # Replacing an export (`--overwrite`, checked by `prepare_out_dir`): its manifest goes
  # first, so that one stopped half way is no export rather than old and new mixed.
  paths.remove(os.path.join(out_dir, TABLES_MANIFEST), missing_ok=True)
  names = []
  for path, table in zip(tables.paths, tables.tables_L):
    name = f"{path[0]}.npy"
    paths.atomic_write(os.path.join(out_dir, name),
                       lambda tmp, t=table: _save_npy(tmp, t))
    names.append({"file": name, "shape": list(table.shape), "dtype": str(table.dtype)})
  manifest = {**source, "tables": names}
  paths.atomic_write(os.path.join(out_dir, TABLES_MANIFEST),
                     lambda tmp: _save_json(tmp, manifest))
  return out_dir


def _save_npy(path: str, array) -> None:
  with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
    np.save(f, np.asarray(array))


def _save_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)


def disk_tables(cfg: config_lib.ModelConfig, table_dir: str) -> HostTables:
  """`HostTables` over `np.memmap`s of `write_tables`' files: only the rows a lookup
  asks for are read from disk. A missing, truncated or misshapen file is a one-line
  ValueError naming it (never a silent garbage read)."""
  import os
  require_local(table_dir, "--table_dir")
  manifest_path = os.path.join(table_dir, TABLES_MANIFEST)
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(f"--table_dir={table_dir!r}: no readable {TABLES_MANIFEST} "
                     f"({getattr(err, 'strerror', None) or err}); write one with "
                     "`python -m engram_jax.workdir export_tables`") from None
  spec, e = cfg.engram.hash_spec(), cfg.engram
  entries = manifest.get("tables", [])
  if len(entries) != len(e.layers):
    raise ValueError(f"--table_dir={table_dir!r} holds {len(entries)} tables; this model "
                     f"has engram.layers={e.layers}")
  tables_L = []
  for i, entry in enumerate(entries):
    path = os.path.join(table_dir, entry["file"])
    want = (e.padded_rows(spec.rows(i)), e.head_dim)
    try:
      table = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:  # a truncated file does not map
      raise ValueError(f"--table_dir: {path} is unreadable or truncated ({err}); "
                       "export the tables again") from None
    if table.shape != want or tuple(entry["shape"]) != want:
      raise ValueError(f"--table_dir: {path} has shape {table.shape}; this model needs "
                       f"{want} (engram.table_size, heads or head width differ)")
    tables_L.append(table)
  return HostTables(cfg, tables_L)
