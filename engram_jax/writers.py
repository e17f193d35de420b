"""What a run writes for people: console progress lines and `metrics.jsonl`.

`metrics.jsonl` is append-only, one JSON object per line with `step`. A process killed
mid-write leaves a torn last line, and a run resumed from step S logs again the steps
after S that its predecessor logged after its last checkpoint: `repair_metrics` cuts
both before the resumed run appends, so every step appears once.
"""
from __future__ import annotations

import json
import os
import time

import jax

METRICS_FILE = "metrics.jsonl"


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
  """Appends every scalar to DIR/metrics.jsonl, one object per line with `step`."""

  def __init__(self, path: str):
    self._path = path

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if jax.process_index() != 0:
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def repair_metrics(path: str, resume_step: int) -> int:
  """Drops a torn last line and every line logged after `resume_step`; returns how many
  lines were dropped. Rewrites atomically (temp file + rename), only when needed; the
  dropped lines are appended to `metrics.dropped.jsonl` beside it, never lost."""
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    raw = f.read()
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
    with open(path.replace(".jsonl", "") + ".dropped.jsonl", "ab") as f:
      f.write(b"".join(line + b"\n" for line in dropped))
  if dropped or not raw.endswith(b"\n") and raw:
    from engram_jax import tokenizer
    def write(tmp):
      with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
    tokenizer.atomic_write(path, write)
  return len(dropped)
