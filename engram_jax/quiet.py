"""Keep library noise off the console while a handled failure runs its course.

Restoring a torn or foreign checkpoint, or an async save hitting a full disk, makes
orbax, asyncio and TensorStore log tracebacks (dozens to hundreds) that the caller then
handles with one line. Their records go to a log file instead (the workdir's
`engram_jax.log`, or `$TMPDIR/engram_jax-PID.log`):

- `library_logs_to(path)`: for a whole run, Python logging records of the libraries;
- `quiet_library_logs(path)`: for a short call, also everything written to file
  descriptor 2 (TensorStore's C++ logs) while it is active.
A log file that cannot be written (a full disk) drops records rather than printing
logging's own tracebacks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

LIBRARY_LOGGERS = ("absl", "asyncio", "orbax", "jax", "tensorstore", "etils")


def default_log_path() -> str:
  return os.path.join(tempfile.gettempdir(), f"engram_jax-{os.getpid()}.log")


class _FileHandler(logging.StreamHandler):
  def handleError(self, record):  # noqa: N802  a full disk: drop, do not print
    del record


def _open_log(path: str | None):
  for candidate in (path, default_log_path()):
    if candidate:
      try:
        return open(candidate, "a", encoding="utf-8")
      except OSError:
        continue
  return None


@contextlib.contextmanager
def library_logs_to(path: str | None = None):
  """Routes the libraries' Python logging records to `path` for the duration."""
  log_file = _open_log(path)
  if log_file is None:
    yield None
    return
  handler = _FileHandler(log_file)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  saved = []
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    saved.append((logger, logger.handlers[:], logger.propagate))
    logger.handlers = [handler]
    logger.propagate = False
  try:
    yield log_file.name
  finally:
    for logger, handlers, propagate in saved:
      logger.handlers = handlers
      logger.propagate = propagate
    try:
      log_file.close()
    except OSError:
      pass


@contextlib.contextmanager
def quiet_library_logs(path: str | None = None):
  """`library_logs_to(path)`, and file descriptor 2 into the same file."""
  with library_logs_to(path) as name:
    stderr_fd = None
    if name is not None:
      sys.stderr.flush()
      try:
        stderr_fd = os.dup(2)
        target = os.open(name, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, 2)
        os.close(target)
      except OSError:
        stderr_fd = None
    try:
      yield name
    finally:
      if stderr_fd is not None:
        sys.stderr.flush()
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
