"""quiet_library_logs(): keep orbax/tensorstore/asyncio tracebacks of a failed restore
off stderr, so the caller can report the failure in one line of its own.

One unreadable checkpoint makes these libraries print dozens of tracebacks: orbax and
absl log through python `logging`, asyncio logs "Task exception was never retrieved"
through its exception handler, and tensorstore's worker threads finalise the
abandoned read coroutines through `sys.unraisablehook`. While the context is active
all of these are collected instead of printed.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
from typing import Iterator, Optional

LIBRARY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore",
                   "jax.experimental.array_serialization")


class LibraryLogs:
  """What the libraries reported while quiet: messages and the exceptions behind them."""

  def __init__(self):
    self.messages: list[str] = []
    self.exceptions: list[BaseException] = []

  def add(self, message: str, exc: Optional[BaseException] = None) -> None:
    self.messages.append(message)
    if exc is not None:
      self.exceptions.append(exc)

  def first_error(self) -> Optional[str]:
    """The first line of the root cause of the first exception (the storage error,
    e.g. tensorstore's "OUT_OF_RANGE: Error reading ...", not orbax's wrapper)."""
    if not self.exceptions:
      return None
    err = self.exceptions[0]
    while err.__cause__ is not None:
      err = err.__cause__
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


class _Collect(logging.Handler):

  def __init__(self, logs: LibraryLogs):
    super().__init__(logging.DEBUG)
    self.logs = logs

  def emit(self, record: logging.LogRecord) -> None:
    exc = record.exc_info[1] if record.exc_info else None
    self.logs.add(f"{record.name}: {record.getMessage()}", exc)


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[LibraryLogs]:
  """Collects the libraries' log records, unraisable and thread exceptions into the
  yielded `LibraryLogs` instead of printing them; everything is restored on exit."""
  logs = LibraryLogs()
  handler = _Collect(logs)
  saved_loggers = []
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    saved_loggers.append((logger, logger.handlers[:], logger.propagate))
    logger.handlers = [handler]
    logger.propagate = False
  saved_hooks = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: logs.add(f"unraisable: {u.exc_value!r}", u.exc_value)
  threading.excepthook = lambda a: logs.add(f"thread: {a.exc_value!r}", a.exc_value)
  try:
    yield logs
  finally:
    gc.collect()  # abandoned read coroutines are finalised (and reported) here, not later
    sys.unraisablehook, threading.excepthook = saved_hooks
    for logger, handlers, propagate in saved_loggers:
      logger.handlers = handlers
      logger.propagate = propagate
