"""Keep library noise off the console while a handled failure runs its course.

One unreadable checkpoint, or an async save hitting a full disk, makes orbax, asyncio
and TensorStore print dozens to hundreds of tracebacks that the caller then reports in
one line of its own: orbax and absl log through Python `logging`, asyncio logs "Task
exception was never retrieved" through its exception handler, TensorStore's worker
threads finalise abandoned read coroutines through `sys.unraisablehook`, and its C++
side writes to file descriptor 2.

- `quiet_library_logs(path=None)`: for a short call (a restore): collects all of these
  into the yielded `LibraryLogs`; when `path` is given they are staged in a temporary
  file (with fd 2) and appended to `path` only if the call failed or the caller marks
  them worth keeping (`logs.keep = True`, e.g. a checkpoint skipped as unreadable): a
  restore that went well, as every read-only command does, leaves a run's log as it was;
- `library_logs_to(path)`: for a whole run, the libraries' Python logging records and
  their leftover unraisable exceptions go to `path` (the workdir's `engram_jax.log`)
  instead of the console.
After a failed read the abandoned coroutines keep surfacing at later garbage
collections, long after the quiet call: from then on those (and only those) go to the
failed call's log too, not to stderr.
A log file that cannot be written (a full disk) drops records rather than printing
logging's own tracebacks.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
import warnings
from typing import Iterator, Optional

LIBRARY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore", "etils",
                   "jax.experimental.array_serialization")
_FORMAT = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")


class _Repeats:
  """Which occurrences of a log line to write: the 1st, 10th, 100th, ... (with the
  count), not every one: a failed restore's leftovers repeat one line per array, tens
  to hundreds of `RuntimeError('Event loop is closed')`."""

  def __init__(self):
    self.counts: dict[str, int] = {}

  def line(self, text: str) -> Optional[str]:
    count = self.counts[text] = self.counts.get(text, 0) + 1
    if count == 1:
      return text
    return f"{text} (seen {count} times)" if str(count).rstrip("0") == "1" else None


class LibraryLogs:
  """What the libraries reported while quiet: messages and the exceptions behind them."""

  def __init__(self, log_file=None):
    self.messages: list[str] = []
    self.exceptions: list[BaseException] = []
    self.keep = False  # append the staged records to the log even without an exception
    self._file = log_file
    self._repeats = _Repeats()

  def add(self, message: str, exc: Optional[BaseException] = None) -> None:
    self.messages.append(message)
    if exc is not None:
      self.exceptions.append(exc)
    line = self._repeats.line(message) if self._file is not None else None
    if line is not None:
      try:
        self._file.write(line + "\n")
      except (OSError, ValueError):  # a full disk: the message stays in `messages`
        pass

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


class _FileHandler(logging.StreamHandler):
  def handleError(self, record):  # noqa: N802  a full disk: drop, do not print
    del record


@contextlib.contextmanager
def _library_handler(handler: logging.Handler):
  """The libraries' loggers write to `handler` only, for the duration."""
  saved = []
  for name in LIBRARY_LOGGERS:
    logger = logging.getLogger(name)
    saved.append((logger, logger.handlers[:], logger.propagate))
    logger.handlers = [handler]
    logger.propagate = False
  try:
    yield
  finally:
    for logger, handlers, propagate in saved:
      logger.handlers = handlers
      logger.propagate = propagate


def _close(log_file) -> None:
  try:
    log_file.close()
  except OSError:  # a full disk fails the final flush: nothing is left to report it to
    pass


def _open(path: Optional[str]):
  if not path:
    return None
  try:
    return open(path, "a", encoding="utf-8")
  except OSError:
    return None


@contextlib.contextmanager
def library_logs_to(path: str) -> Iterator[Optional[str]]:
  """Routes the libraries' Python logging records to `path` for the duration (they
  stay on the console when `path` cannot be opened)."""
  log_file = _open(path)
  if log_file is None:
    yield None
    return
  handler = _FileHandler(log_file)
  handler.setFormatter(_FORMAT)
  # An async save failing (a full disk) leaves TensorStore completing writes into
  # orbax's closed event loop: dozens of unraisable tracebacks, during the run and
  # after it. They go to the log too; anything else to the hook there was.
  saved_hook = sys.unraisablehook
  sys.unraisablehook = _LeftoverHook(saved_hook, path, "during the run")
  failed = False
  try:
    with _library_handler(handler):
      try:
        yield path
      except BaseException:
        failed = True
        raise
  finally:
    run_hook, sys.unraisablehook = sys.unraisablehook, saved_hook
    if failed or getattr(run_hook, "kept", False):  # a failure's leftovers come later
      _route_leftovers(getattr(run_hook, "path", path),
                       "after the run failed" if failed else "after a failed read")
    _close(log_file)


@contextlib.contextmanager
def _stderr_to(log_file):
  """File descriptor 2 into `log_file` (TensorStore's C++ logs), then back."""
  saved_fd = None
  if log_file is not None:
    sys.stderr.flush()
    try:
      saved_fd = os.dup(2)
      os.dup2(log_file.fileno(), 2)
    except OSError:
      saved_fd = None
  try:
    yield
  finally:
    if saved_fd is not None:
      sys.stderr.flush()
      os.dup2(saved_fd, 2)
      os.close(saved_fd)


def _staging_file():
  try:
    return tempfile.TemporaryFile("w+", encoding="utf-8")
  except OSError:  # no temp space: the records stay in `LibraryLogs.messages`
    return None


def _append_staged(staged, path: str) -> None:
  """Appends what was staged to `path` (nothing when it cannot be written)."""
  try:
    staged.flush()
    staged.seek(0)
    text = staged.read()
  except (OSError, ValueError):
    return
  log_file = _open(path) if text else None
  if log_file is not None:
    try:
      log_file.write(text)
    except OSError:  # a full disk: the failure is reported by the caller already
      pass
    _close(log_file)


@contextlib.contextmanager
def quiet_library_logs(path: Optional[str] = None) -> Iterator[LibraryLogs]:
  """Collects the libraries' log records, unraisable and thread exceptions into the
  yielded `LibraryLogs` instead of printing them; with `path`, they (and fd 2) are
  appended there when the call raised or set `logs.keep`. Everything is restored on
  exit, except that after a failure the read's leftovers, which surface later, keep
  going to `path` (`_LeftoverHook`)."""
  staged = _staging_file() if path else None
  logs = LibraryLogs(staged)
  saved_hooks = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: logs.add(f"unraisable: {u.exc_value!r}", u.exc_value)
  threading.excepthook = lambda a: logs.add(f"thread: {a.exc_value!r}", a.exc_value)
  failed = False
  try:
    with _library_handler(_Collect(logs)), _stderr_to(staged):
      try:
        yield logs
      except BaseException:
        failed = True
        raise
      finally:
        if failed or logs.keep or logs.exceptions:
          # A failed read abandons coroutines: finalise (and collect) them here. Only
          # then: a full collection takes 0.1 s and more, growing with the objects a
          # process holds (jax's caches): a fifth of the sampling tests' time.
          gc.collect()
  finally:
    sys.unraisablehook, threading.excepthook = saved_hooks
    if failed or logs.keep or logs.exceptions:
      _route_leftovers(path)
    if staged is not None:
      if failed or logs.keep:
        _append_staged(staged, path)
      _close(staged)


def _is_leftover(unraisable) -> bool:
  """An abandoned orbax/TensorStore read coroutine, or TensorStore completing a read
  into the event loop orbax already closed."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and any(lib in code.co_filename for lib in ("orbax", "tensorstore"))


class _LeftoverHook:
  """sys.unraisablehook during a run, and after a failed read or run: the libraries'
  leftovers surface then, at some garbage collection or at exit, one traceback each
  (a torn checkpoint gave 1,300-2,000 lines on stderr after its one-line warning; a
  full disk during an async save, dozens). They go to the log of the call that failed
  (dropped without one), labelled `when`; anything else to the previous hook."""

  def __init__(self, previous, path: Optional[str], when: str = "after a failed read"):
    self.previous, self.path, self.when = previous, path, when
    self.kept = False  # stays installed after the run that installed it (a failure)
    self.repeats = _Repeats()

  def __call__(self, unraisable) -> None:
    if not _is_leftover(unraisable):
      self.previous(unraisable)
      return
    line = self.repeats.line(f"{self.when}: {unraisable.exc_value!r}")
    log_file = _open(self.path) if line is not None else None
    if log_file is not None:
      try:
        log_file.write(line + "\n")
      except OSError:  # a full disk: the failure was reported when it happened
        pass
      _close(log_file)


class _LeftoverTasks(logging.Filter):
  """On asyncio's logger after a failure: "Task/Future exception was never retrieved"
  for the failed call's abandoned orbax tasks, logged when they are collected (a
  model-config mismatch gave one traceback per array after its one-line error), go to
  the log of the call that failed instead of the console."""

  def __init__(self, path: Optional[str]):
    super().__init__()
    self.path = path

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message:
      return True
    log_file = _open(self.path)
    if log_file is not None:
      try:
        log_file.write(f"after a failure: {message.splitlines()[0]}\n")
      except OSError:  # a full disk: the failure was reported when it happened
        pass
      _close(log_file)
    return False


def _route_leftovers(path: Optional[str], when: str = "after a failed read") -> None:
  """Installs `_LeftoverHook` and `_LeftoverTasks` (once; a later failure's log
  replaces the earlier one) and silences the never-awaited warnings of the same
  coroutines (of any coroutine, from then on in this process)."""
  hook = sys.unraisablehook
  if isinstance(hook, _LeftoverHook):  # a new failure: its log gets each line afresh
    hook.path, hook.kept, hook.repeats = path or hook.path, True, _Repeats()
  else:
    sys.unraisablehook = _LeftoverHook(hook, path, when)
  asyncio_logger = logging.getLogger("asyncio")
  tasks = [f for f in asyncio_logger.filters if isinstance(f, _LeftoverTasks)]
  if tasks:
    tasks[0].path = path or tasks[0].path
  else:
    asyncio_logger.addFilter(_LeftoverTasks(path))
  # Raised wherever the collection happens to run, so not filtered by module.
  warnings.filterwarnings("ignore", message=r"coroutine '[\w.<>]+' was never awaited",
                          category=RuntimeWarning)
