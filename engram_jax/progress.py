"""progress(): `desc: i/n (rate/s, ETA 1m05s)` lines on stderr for the loops that run
for minutes (evaluation batches, sampling batches, probe chunks, sweep points), so a
silent command is not mistaken for a hung one.

At most one line every `every_s` seconds, and one at the end; stderr keeps stdout
for results (JSON lines, paths).
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
