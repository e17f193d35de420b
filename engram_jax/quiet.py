"""Keep library noise off the console while a handled failure runs its course.

Restoring a torn or foreign checkpoint makes orbax, asyncio and TensorStore log
tracebacks (dozens to hundreds) that the caller then handles with one line. Inside
`quiet_library_logs()` those go to a log file instead (default
`$TMPDIR/engram_jax-PID.log`, or `path`): Python logging records of the libraries, and
everything written to file descriptor 2 (TensorStore's C++ logs) while it is active.
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


@contextlib.contextmanager
def quiet_library_logs(path: str | None = None):
  """Routes library log records and fd-2 output to `path` for the duration."""
  path = path or default_log_path()
  try:
    log_file = open(path, "a", encoding="utf-8")
  except OSError:  # nowhere to keep the details: stay loud rather than lose them
    yield None
    return
  handler = logging.StreamHandler(log_file)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  saved = []
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    saved.append((logger, logger.handlers[:], logger.propagate))
    logger.handlers = [handler]
    logger.propagate = False
  sys.stderr.flush()
  stderr_fd = None
  try:
    stderr_fd = os.dup(2)
    os.dup2(log_file.fileno(), 2)
  except OSError:
    stderr_fd = None
  try:
    yield path
  finally:
    log_file.flush()
    sys.stderr.flush()
    if stderr_fd is not None:
      os.dup2(stderr_fd, 2)
      os.close(stderr_fd)
    for logger, handlers, propagate in saved:
      logger.handlers = handlers
      logger.propagate = propagate
    log_file.close()
