"""progress(): rate-limited progress lines; quiet_library_logs(): library noise collected."""
import io
import logging
import sys

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


def test_quiet_library_logs_collects_instead_of_printing(capsys):
  before = sys.unraisablehook
  with quiet_library_logs() as logs:
    try:
      raise ValueError("OUT_OF_RANGE: torn") from None
    except ValueError as err:
      logging.getLogger("absl").error("restore failed", exc_info=err)
      sys.unraisablehook(type("U", (), {"exc_value": RuntimeError("Event loop is closed")}))
  assert capsys.readouterr().err == ""
  assert logs.first_error() == "OUT_OF_RANGE: torn" and len(logs.messages) == 2
  assert sys.unraisablehook is before and logging.getLogger("absl").propagate


def test_quiet_library_logs_collects_garbage_only_after_a_failure(monkeypatch):
  """A failed read abandons coroutines, finalised by a full collection inside the quiet
  block; a quiet call that went well skips it (0.1 s and more per collection)."""
  import pytest

  from engram_jax import quiet
  collections = []
  monkeypatch.setattr(quiet.gc, "collect", lambda *a: collections.append(a))
  with quiet_library_logs():
    pass
  assert collections == []
  with quiet_library_logs():
    logging.getLogger("orbax").error("read failed", exc_info=ValueError("torn"))
  assert len(collections) == 1
  with pytest.raises(OSError), quiet_library_logs():
    raise OSError("disk")
  assert len(collections) == 2
