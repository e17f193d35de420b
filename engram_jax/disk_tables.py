"""Engram tables as files: `.npy` per layer plus a `tables.json` manifest, memory-mapped.

`write_tables` writes them (`python -m engram_jax.workdir export_tables --workdir=W
--out=DIR` exports a run's newest checkpoint, owning DIR through `exporting_to`);
`disk_tables(cfg, DIR)` opens them as `HostTables` whose rows are read from disk only
when a lookup asks for them (`engram.placement="disk"`, `python -m engram_jax.generate
--tables=disk --table_dir=DIR`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Iterator, Optional

import numpy as np

from engram_jax import config as config_lib
from engram_jax import errors, paths
from engram_jax.host_tables import HostTables

TABLES_MANIFEST = "tables.json"
EXPORT_LOCK = ".export.lock"  # held (flock) by the export writing the directory


def require_local(directory: str, flag: str) -> None:
  """Disk tables are memory-mapped: a remote (gs://) directory is a one-line error."""
  if not paths.is_local(directory):
    raise ValueError(f"{flag}={directory!r}: disk tables are memory-mapped .npy files and "
                     "need a local directory (copy them to a bucket afterwards if you "
                     "want them kept there)")


@contextlib.contextmanager
def exporting_to(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Owns `--out` for one export, checked before any work: local, writable (created
  if missing), written by no other export (two would interleave their files: the
  workdir lock's `flock`, on OUT/.export.lock, held until the block ends and its file
  removed then) and, checked under that lock, not holding an export already (its
  `tables.json`) unless `overwrite`. A failure leaves no directory this call created."""
  from engram_jax.workdir_lock import WorkdirLock
  require_local(out_dir, "--out")
  with paths.no_empty_dir_left(out_dir):
    try:
      paths.make_writable_dir(out_dir)
    except OSError as err:
      raise ValueError(f"--out={out_dir!r} is not a writable directory "
                       f"({err.strerror or err}); choose another --out") from None
    lock = WorkdirLock(out_dir, flag="--out", name=EXPORT_LOCK, noun="export").acquire()
    try:
      manifest = os.path.join(out_dir, TABLES_MANIFEST)
      if os.path.exists(manifest) and not overwrite:
        raise ValueError(f"--out={out_dir!r} holds an export already ({manifest}); choose "
                         "another --out, or pass --overwrite to replace it")
      yield out_dir
    finally:
      lock.release(remove_file=True)


def write_tables(tables: HostTables, out_dir: str, **source) -> str:
  """Writes `tables` as `.npy` files (one per layer) and a `tables.json` manifest
  (with `source`, e.g. the workdir and step) into `out_dir`: the on-disk form
  `disk_tables` memory-maps. Each file is written to a temporary name and renamed, so
  a reader never sees half a table. The caller owns `out_dir` (`exporting_to`).
  Returns `out_dir`."""
  require_local(out_dir, "--out")
  os.makedirs(out_dir, exist_ok=True)
  # Replacing an export (`--overwrite`, checked by `exporting_to`): its manifest goes
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


def _read_manifest(table_dir: str) -> tuple[dict, list[tuple[str, tuple, Optional[str]]]]:
  """(the manifest, its (file, shape, dtype) entries); anything else than what
  `write_tables` writes is a one-line ValueError (a hand edit or another file)."""
  manifest_path = os.path.join(table_dir, TABLES_MANIFEST)
  fix = "export the tables again (`python -m engram_jax.workdir export_tables`)"
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as err:
    raise ValueError(f"--table_dir={table_dir!r}: no readable {TABLES_MANIFEST} "
                     f"({getattr(err, 'strerror', None) or err}); write one with "
                     "`python -m engram_jax.workdir export_tables`") from None
  entries = manifest.get("tables") if isinstance(manifest, dict) else None
  if not isinstance(entries, list):
    raise ValueError(f"--table_dir={table_dir!r}: {manifest_path} is not an export "
                     'manifest (a JSON object with a "tables" list); ' + fix)
  out = []
  for i, entry in enumerate(entries):
    name = entry.get("file") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if (not isinstance(name, str) or not name or os.path.basename(name) != name
        or not isinstance(shape, list) or not all(type(n) is int for n in shape)):
      raise ValueError(f"--table_dir={table_dir!r}: entry {i} of {manifest_path} needs a "
                       '"file" name in the directory and an integer "shape" (it holds '
                       f"{json.dumps(entry)[:100]}); " + fix)
    dtype = entry.get("dtype")  # recorded since the first export format
    out.append((name, tuple(shape), dtype if isinstance(dtype, str) else None))
  return manifest, out


def _check_source(table_dir: str, manifest: dict, workdir: str, step) -> None:
  """One warning line when the tables were exported from another workdir or step
  than the run being sampled (directories move, so it is not refused)."""
  saved_dir, saved_step = manifest.get("workdir"), manifest.get("step")
  real = lambda d: os.path.realpath(d) if paths.is_local(d) else paths.absolute(d)
  other_dir = isinstance(saved_dir, str) and real(saved_dir) != real(workdir)
  other_step = saved_step is not None and step is not None and saved_step != step
  if other_dir or other_step:
    print(f"warning: --table_dir={table_dir!r} holds tables exported from "
          f"{saved_dir} at step {saved_step}; sampling {workdir} at step {step} (export "
          "this run's tables if that is not meant)", file=sys.stderr, flush=True)


def _as_recorded(table: np.ndarray, dtype: str) -> np.ndarray:
  """`table` read as `dtype` (ml_dtypes' bfloat16, float8_*) when it names one of its
  size; unchanged otherwise (then reported as another dtype)."""
  import jax.numpy as jnp
  try:
    recorded = np.dtype(jnp.dtype(dtype))
  except TypeError:
    return table
  return table.view(recorded) if recorded.itemsize == table.dtype.itemsize else table


def disk_tables(cfg: config_lib.ModelConfig, table_dir: str,
                workdir: Optional[str] = None, step: Optional[int] = None) -> HostTables:
  """`HostTables` over `np.memmap`s of `write_tables`' files: only the rows a lookup
  asks for are read from disk. A malformed manifest, or a missing, truncated or
  misshapen file, is a one-line ValueError naming it (never a silent garbage read).
  `workdir` and `step` (the run being sampled) are compared with those the manifest
  records: one warning line when they differ."""
  require_local(table_dir, "--table_dir")
  manifest, entries = _read_manifest(table_dir)
  if workdir is not None:
    _check_source(table_dir, manifest, workdir, step)
  spec, e = cfg.engram.hash_spec(), cfg.engram
  if len(entries) != len(e.layers):
    raise ValueError(f"--table_dir={table_dir!r} holds {len(entries)} tables; this model "
                     f"has engram.layers={e.layers}")
  tables_L = []
  for i, (name, recorded, dtype) in enumerate(entries):
    path = os.path.join(table_dir, name)
    want = (e.padded_rows(spec.rows(i)), e.head_dim)
    try:
      table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # a truncated file does not map
      reason = errors.first_line(err, 160) if str(err).strip() else "empty"
      raise ValueError(f"--table_dir: {path} is unreadable or truncated ({reason}); "
                       "export the tables again") from None
    if isinstance(table, np.ndarray) and table.dtype.kind == "V" and dtype:
      table = _as_recorded(table, dtype)  # .npy keeps bfloat16 and fp8 as raw bytes
    if not isinstance(table, np.ndarray) or (dtype and str(table.dtype) != dtype):
      found = getattr(table, "dtype", type(table).__name__)
      raise ValueError(f"--table_dir: {path} holds {found} but {TABLES_MANIFEST} records "
                       f"{dtype} (a file replaced by hand); export the tables again")
    if table.shape != recorded:
      fits = "" if table.shape == want else f", and this model needs {want}"
      raise ValueError(f"--table_dir: {path} has shape {table.shape} but {TABLES_MANIFEST} "
                       f"records {recorded}{fits} (a file replaced or a manifest edited "
                       "by hand); export the tables again")
    if table.shape != want:
      raise ValueError(f"--table_dir: {path} has shape {table.shape}; this model needs "
                       f"{want} (engram.table_size, heads or head width differ): export "
                       "this run's tables")
    tables_L.append(table)
  return HostTables(cfg, tables_L)
