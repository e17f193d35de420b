"""progress(): rate-limited progress lines; quiet_library_logs(): library noise collected."""
import io
import logging
import sys

from engram_jax import quiet
from engram_jax.progress import format_progress, progress
from engram_jax.quiet import quiet_library_logs


def test_progress_prints_at_most_every_interval_and_at_the_end():
  ticks = iter([0.0, 0.5, 1.0, 2.5, 3.0, 5.0, 5.0])  # start, after items 1-5, the end
  out = io.StringIO()
  items = list(progress(range(5), "batches", stream=out, clock=lambda: next(ticks)))
  assert items == list(range(5))
  lines = out.getvalue().splitlines()
  assert lines == ["batches: 3/5 (1.20/s, ETA 0m02s)", "batches: 5/5 (1.00/s, 0m05s elapsed)"]


def test_progress_without_a_total_counts():
  assert format_progress("steps", 7, None, 2.0) == "steps: 7 (3.50/s, 0m02s elapsed)"


def test_quiet_library_logs_collects_instead_of_printing(capsys, monkeypatch):
  before = sys.unraisablehook
  monkeypatch.setattr(sys, "unraisablehook", before)  # restored after the test
  with quiet_library_logs() as logs:
    try:
      raise ValueError("OUT_OF_RANGE: torn") from None
    except ValueError as err:
      logging.getLogger("absl").error("restore failed", exc_info=err)
      sys.unraisablehook(type("U", (), {"exc_value": RuntimeError("Event loop is closed")}))
  assert capsys.readouterr().err == ""
  assert logs.first_error() == "OUT_OF_RANGE: torn"
  # (the collection at exit may add an earlier test's abandoned reads after these two)
  assert logs.messages[:2] == ["absl: restore failed",
                               "unraisable: RuntimeError('Event loop is closed')"]
  # restored, but for the read's leftovers, which keep going to the log from now on
  # (an earlier failure in this process may have routed them already)
  hook = sys.unraisablehook
  assert (hook is before or hook.previous is before) and isinstance(hook, quiet._LeftoverHook)
  assert logging.getLogger("absl").propagate


def test_quiet_library_logs_collects_garbage_only_after_a_failure(monkeypatch):
  """A failed read abandons coroutines, finalised by a full collection inside the quiet
  block; a quiet call that went well skips it (0.1 s and more per collection)."""
  import pytest
  collections = []
  monkeypatch.setattr(quiet.gc, "collect", lambda *a: collections.append(a))
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
  with quiet_library_logs():
    pass
  assert collections == []
  with quiet_library_logs():
    logging.getLogger("orbax").error("read failed", exc_info=ValueError("torn"))
  assert len(collections) == 1
  with pytest.raises(OSError), quiet_library_logs():
    raise OSError("disk")
  assert len(collections) == 2


def test_leftovers_of_a_failed_read_go_to_the_log_later(tmp_path, monkeypatch):
  """Orbax's abandoned read coroutines surface at a later collection: after a failed
  quiet call they go to its log; other unraisable exceptions still reach the hook."""
  import types

  import pytest
  reached = []
  monkeypatch.setattr(sys, "unraisablehook", reached.append)
  log = tmp_path / "engram_jax.log"
  with pytest.raises(OSError), quiet_library_logs(str(log)):
    raise OSError("OUT_OF_RANGE: torn")
  namespace = {}
  exec(compile("async def read():\n  pass\n", "/site-packages/orbax/checkpoint/x.py", "exec"),
       namespace)
  read = namespace["read"]()
  unraisable = lambda exc, obj: types.SimpleNamespace(exc_value=exc, object=obj)
  sys.unraisablehook(unraisable(ValueError("torn read"), read))
  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed"), None))
  mine = unraisable(KeyError("not a leftover"), None)
  sys.unraisablehook(mine)
  read.close()
  assert reached == [mine]
  text = log.read_text()
  assert "after a failed read: ValueError('torn read')" in text
  assert "after a failed read: RuntimeError('Event loop is closed')" in text


def test_never_retrieved_tasks_after_a_failure_go_to_the_log(tmp_path, monkeypatch):
  """asyncio reports a failed call's abandoned tasks when they are collected, after the
  call's one-line error: those records go to the call's log; others still print."""
  import pytest
  from engram_jax import quiet
  asyncio_logger = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_logger, "filters", [])
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  printed = []
  handler = logging.Handler()
  handler.emit = printed.append
  monkeypatch.setattr(asyncio_logger, "handlers", [handler])
  monkeypatch.setattr(asyncio_logger, "propagate", False)
  log = tmp_path / "engram_jax.log"
  with pytest.raises(ValueError), quiet.quiet_library_logs(str(log)):
    raise ValueError("Requested shape: (32,) is not compatible with the stored shape")
  asyncio_logger.error("Task exception was never retrieved\nfuture: <Task ...>")
  asyncio_logger.error("something else")
  assert [r.getMessage() for r in printed] == ["something else"]
  assert "after a failure: Task exception was never retrieved" in log.read_text()


def test_a_repeated_leftover_is_logged_at_1_10_100_occurrences(tmp_path, monkeypatch):
  """A refused resume left one `Event loop is closed` line per array in the log (45 to
  180 lines); a line is now written the 1st, 10th, 100th... time, with its count."""
  import types

  import pytest
  # a plain hook, not an earlier test's leftover routing (it would keep its own label)
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
  log = tmp_path / "engram_jax.log"
  with pytest.raises(OSError), quiet_library_logs(str(log)):
    for _ in range(12):
      sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                                               object=None))
    raise OSError("OUT_OF_RANGE: torn")
  for _ in range(120):  # later, at garbage collections, through the leftover hook
    sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"),
                                             object=None))
  assert log.read_text().splitlines() == [
      "unraisable: RuntimeError('Event loop is closed')",
      "unraisable: RuntimeError('Event loop is closed') (seen 10 times)",
      "after a failed read: RuntimeError('Event loop is closed')",
      "after a failed read: RuntimeError('Event loop is closed') (seen 10 times)",
      "after a failed read: RuntimeError('Event loop is closed') (seen 100 times)"]
