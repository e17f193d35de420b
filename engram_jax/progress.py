"""progress(): `desc: i/n (rate/s, ETA 1m05s)` lines on stderr for the loops that run
for minutes (evaluation batches, sampling batches, probe chunks, sweep points), so a
silent command is not mistaken for a hung one.

At most one line every `every_s` seconds, and one at the end; stderr keeps stdout
for results (JSON lines, paths). `BytesProgress` does the same for work measured in
bytes (tokenizing a corpus), silent when the work ends before its first line is due.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
  """`1m05s`, or `1h02m` from an hour on."""
  seconds = max(0, int(round(seconds)))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def format_progress(desc: str, done: int, total: Optional[int], elapsed_s: float) -> str:
  """One progress line: count, rate and ETA (elapsed time once finished or when the
  total is unknown)."""
  rate = done / elapsed_s if elapsed_s > 0 else 0.0
  count = f"{done}/{total}" if total is not None else f"{done}"
  if total is not None and done < total and rate > 0:
    when = f"ETA {format_duration((total - done) / rate)}"
  else:
    when = f"{format_duration(elapsed_s)} elapsed"
  return f"{desc}: {count} ({rate:.2f}/s, {when})"


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, *,
             every_s: float = 2.0, stream=None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
  """Yields the items of `iterable`, printing `format_progress` lines to `stream`
  (default stderr) at most every `every_s` seconds and once at the end.

  `total` defaults to `len(iterable)` when it has one.
  """
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  stream = stream or sys.stderr
  start = last = clock()
  done = 0
  for item in iterable:
    yield item
    done += 1
    now = clock()
    if now - last >= every_s and (total is None or done < total):
      print(format_progress(desc, done, total, now - start), file=stream, flush=True)
      last = now
  print(format_progress(desc, done, total, clock() - start), file=stream, flush=True)


def format_bytes_progress(desc: str, done: int, total: int, nbytes: int,
                          total_bytes: int, elapsed_s: float, noun: str = "files") -> str:
  """One progress line of work measured in bytes: count, MB, byte rate and ETA."""
  rate = nbytes / elapsed_s if elapsed_s > 0 else 0.0
  if nbytes < total_bytes and rate > 0:
    when = f"ETA {format_duration((total_bytes - nbytes) / rate)}"
  else:
    when = f"{format_duration(elapsed_s)} elapsed"
  return (f"{desc}: {done}/{total} {noun}, {nbytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB "
          f"({rate / 1e6:.1f} MB/s, {when})")


class BytesProgress:
  """`format_bytes_progress` lines on stderr for work over files of known sizes
  (tokenizing a corpus), at most every `every_s` seconds and once at the end.

  Work finished before the first line is due prints nothing: small corpora, as in
  tests, stay silent; only the runs long enough to be mistaken for a hang report.
  """

  def __init__(self, desc: str, total: int, total_bytes: int, *, noun: str = "files",
               every_s: float = 5.0, stream=None,
               clock: Callable[[], float] = time.monotonic):
    self._desc, self._noun, self._every_s = desc, noun, every_s
    self._total, self._total_bytes = total, total_bytes
    self._stream, self._clock = stream, clock
    self._start = self._last = clock()
    self._done = self._bytes = 0
    self._printed = False

  def _print(self, now: float) -> None:
    print(format_bytes_progress(self._desc, self._done, self._total, self._bytes,
                                self._total_bytes, now - self._start, self._noun),
          file=self._stream or sys.stderr, flush=True)
    self._last, self._printed = now, True

  def add(self, done: int, nbytes: int) -> None:
    """Counts `done` more items of `nbytes` bytes."""
    self._done += done
    self._bytes += nbytes
    now = self._clock()
    if now - self._last >= self._every_s and self._done < self._total:
      self._print(now)

  def finish(self) -> None:
    """The closing line, when the work took long enough for one to be due."""
    now = self._clock()
    if self._printed or now - self._start >= self._every_s:
      self._print(now)
