"""What a run writes for people: console progress lines and `metrics.jsonl`.

`metrics.jsonl` is append-only, one JSON object per line with `step`. A process killed
mid-write leaves a torn last line, and a run resumed from step S logs again the steps
after S that its predecessor logged after its last checkpoint: `repair_metrics` cuts
both before the resumed run appends, so every step appears once.

In a remote workdir (gs://), where an object cannot be appended to, the writer keeps
the file's lines in memory and rewrites the whole object at most every
`REMOTE_FLUSH_SECONDS` (object stores throttle rewrites of one object) and on `close`:
a crash loses at most that many seconds of lines, and never leaves a torn one.
"""
from __future__ import annotations

import json
import time

import jax

from engram_jax import paths

METRICS_FILE = "metrics.jsonl"
REMOTE_FLUSH_SECONDS = 10.0


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s"


class ConsoleProgress:
  """One line per logged step on process 0: loss, steps/s and ETA since this run began."""

  def __init__(self, start_step: int, total_steps: int):
    self._start, self._total = start_step, total_steps
    self._began = time.perf_counter()

  def report(self, step: int, loss: float) -> None:
    if jax.process_index() != 0:
      return
    rate = (step - self._start) / max(time.perf_counter() - self._began, 1e-9)
    eta = (self._total - step) / max(rate, 1e-9)
    print(f"step {step}/{self._total} train_loss {loss:.4f} ({rate:.2f} steps/s, "
          f"ETA {_fmt_eta(eta)})", flush=True)


def format_eval(step: int, metrics: dict[str, float]) -> str:
  """The console line of an evaluation, e.g. `eval at step 100: eval_loss 2.31 ...`."""
  return f"eval at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class JsonlWriter:
  """Appends every scalar to DIR/metrics.jsonl, one object per line with `step`.

  Locally each line is appended as it comes. On a remote path the whole file is
  rewritten, at most every `flush_seconds` and on `close` (see the module docstring).
  """

  def __init__(self, path: str, flush_seconds: float = REMOTE_FLUSH_SECONDS):
    self._path = path
    self._remote = not paths.is_local(path)
    self._flush_seconds = flush_seconds
    self._content: bytes | None = None  # remote: the file as it should be
    self._dirty, self._flushed_at = False, 0.0

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if jax.process_index() != 0:
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    if not self._remote:
      with open(self._path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
      return
    if self._content is None:  # what earlier runs wrote (repaired: whole lines)
      self._content = paths.read_bytes(self._path) if paths.exists(self._path) else b""
    self._content += (line + "\n").encode("utf-8")
    self._dirty = True
    if time.monotonic() - self._flushed_at >= self._flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Remote: writes the lines held so far (the whole object). Locally a no-op."""
    if self._remote and self._dirty:
      paths.atomic_write_bytes(self._path, self._content)
      self._dirty, self._flushed_at = False, time.monotonic()

  def close(self) -> None:
    self.flush()


def repair_metrics(path: str, resume_step: int) -> int:
  """Drops a torn last line and every line logged after `resume_step`; returns how many
  lines were dropped. Rewrites atomically (temp file + rename, or one object write),
  only when needed; the dropped lines are appended to `metrics.dropped.jsonl` beside
  it, never lost."""
  if not paths.exists(path):
    return 0
  raw = paths.read_bytes(path)
  lines = raw.split(b"\n")
  kept, dropped = [], []
  for line in lines:
    if not line.strip():
      continue
    try:  # a torn line (kill -9 mid-write) does not parse
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      dropped.append(line)
      continue
    if step > resume_step:
      dropped.append(line)
      continue
    kept.append(line)
  if dropped:
    dropped_path = path.replace(".jsonl", "") + ".dropped.jsonl"
    lines = b"".join(line + b"\n" for line in dropped)
    if paths.is_local(dropped_path):
      with open(dropped_path, "ab") as f:
        f.write(lines)
    else:  # no appends on an object store: the whole file again
      before = paths.read_bytes(dropped_path) if paths.exists(dropped_path) else b""
      paths.atomic_write_bytes(dropped_path, before + lines)
  if dropped or not raw.endswith(b"\n") and raw:
    paths.atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
  return len(dropped)
