"""The workdir's log of library details: where handled failures' tracebacks go.

Commands print one line per failure; orbax's and TensorStore's tracebacks behind it land
in `WORKDIR/engram_jax.log` (one file per process), which `quiet.quiet_library_logs`
appends to. A remote workdir (gs://) cannot be appended to: its log is a local file while
a run lasts, added to the workdir's at the end (`run_log`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from typing import Iterator

import jax

from engram_jax import paths

LOG_FILE = "engram_jax.log"  # library tracebacks of handled failures land here


def _log_name() -> str:
  index = jax.process_index()
  return LOG_FILE if index == 0 else LOG_FILE.replace(".log", f".p{index}.log")


def log_path(workdir: str) -> str:
  """The workdir's log of library details (one file per process): a local file, which
  is appended to while it is open (and fd 2 is pointed at it, `quiet`). For a remote
  workdir (gs://), where nothing can be appended to, a file of the same name in a local
  temp directory named after the workdir; `run_log` copies a run's lines up at its end.
  """
  if paths.is_local(workdir):
    return os.path.join(os.path.abspath(workdir), _log_name())
  url = paths.absolute(workdir)
  key = hashlib.blake2b(url.encode("utf-8"), digest_size=4).hexdigest()
  directory = os.path.join(tempfile.gettempdir(), "engram_jax_logs",
                           re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:] + "-" + key)
  os.makedirs(directory, exist_ok=True)
  return os.path.join(directory, _log_name())


@contextlib.contextmanager
def run_log(workdir: str) -> Iterator[str]:
  """`log_path(workdir)` for the duration of a run. On a remote workdir this says in
  one line where the log is, and at exit appends the lines this run wrote to
  `WORKDIR/engram_jax.log` (a whole-object rewrite: the remote log grows run by run)."""
  path = log_path(workdir)
  if paths.is_local(workdir):
    yield path
    return
  remote = paths.join(paths.absolute(workdir), _log_name())
  start = os.path.getsize(path) if os.path.exists(path) else 0
  if jax.process_index() == 0:
    print(f"note: --workdir={workdir} is not a local directory: library logs go to "
          f"{path} while the run lasts (an object store cannot be appended to), then are "
          f"added to {remote}", flush=True)
  try:
    yield path
  finally:
    try:
      with open(path, "rb") as f:
        f.seek(start)
        lines = f.read()
      if lines:
        before = paths.read_bytes(remote) if paths.exists(remote) else b""
        paths.atomic_write_bytes(remote, before + lines)
    except OSError as err:  # the run's own outcome matters more: say it, go on
      print(f"warning: could not copy the library log {path} to {remote} ({err})",
            flush=True)
