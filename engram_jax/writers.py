"""What a run writes for people: console progress lines and `metrics.jsonl`.

`metrics.jsonl` is append-only, one JSON object per line with `step`. A process killed
mid-write leaves a torn last line, and a run resumed from step S logs again the steps
after S that its predecessor logged after its last checkpoint: `repair_metrics` cuts
both before the resumed run appends, so every step appears once; `repair_events` does
the same for the TensorBoard event files.

In a remote workdir (gs://), where an object cannot be appended to, the writer keeps
the file's lines in memory and rewrites the whole object at most every
`REMOTE_FLUSH_SECONDS` (object stores throttle rewrites of one object) and on `close`:
a crash loses at most that many seconds of lines, and never leaves a torn one.

TensorBoard event files are written here too, without TensorFlow: clu's writers import
it (3 to 5 s at every start of a run, and its log lines on stderr); the records are
TFRecord frames of `Event` protos from the `tensorboard` package, which TensorBoard reads.
"""
from __future__ import annotations

import json
import os
import struct
import time

import jax

from engram_jax import paths
from engram_jax.errors import write_failure

METRICS_FILE = "metrics.jsonl"
# Where `repair_events` keeps the records it cuts: TFRecord frames of `Event`s, named so
# that TensorBoard does not read them (it reads files with "tfevents" in their name).
DROPPED_EVENTS_FILE = "events.dropped.tfrecord"
REMOTE_FLUSH_SECONDS = 10.0
RESUME = "run the same command to resume from the newest checkpoint"


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 60}m{seconds % 60:02d}s"


class ConsoleProgress:
  """One line per logged step on process 0: loss, steps/s and ETA since this run began."""

  def __init__(self, start_step: int, total_steps: int):
    self._start, self._total = start_step, total_steps
    self._began = time.perf_counter()

  def steps_per_second(self, step: int) -> float:
    return (step - self._start) / max(time.perf_counter() - self._began, 1e-9)

  def report(self, step: int, loss: float) -> None:
    if jax.process_index() != 0:
      return
    rate = self.steps_per_second(step)
    eta = (self._total - step) / max(rate, 1e-9)
    print(f"step {step}/{self._total} train_loss {loss:.4f} ({rate:.2f} steps/s, "
          f"ETA {_fmt_eta(eta)})", flush=True)


def format_eval(step: int, metrics: dict[str, float]) -> str:
  """The console line of an evaluation, e.g. `eval at step 100: eval_loss 2.31 ...`."""
  return f"eval at step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class _AppendOnlyFile:
  """Appends bytes to a file: locally as they come; on an object store, where nothing
  can be appended, the whole object at most every `flush_seconds` and on `flush`."""

  def __init__(self, path: str, flush_seconds: float):
    self._path = path
    self._remote = not paths.is_local(path)
    self._flush_seconds = flush_seconds
    self._content: bytes | None = None  # remote: the file as it should be
    self._dirty, self._flushed_at = False, None  # the first append goes out at once

  def append(self, data: bytes) -> None:
    if not self._remote:
      try:
        with open(self._path, "ab") as f:
          f.write(data)
      except OSError as err:  # a full disk: name the file and how the run goes on
        raise write_failure(self._path, err, RESUME) from err
      return
    if self._content is None:  # what earlier runs wrote
      self._content = paths.read_bytes(self._path) if paths.exists(self._path) else b""
    self._content += data
    self._dirty = True
    if self._flushed_at is None or time.monotonic() - self._flushed_at >= self._flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Remote: writes the bytes held so far (the whole object). Locally a no-op."""
    if self._remote and self._dirty:
      paths.atomic_write_bytes(self._path, self._content)
      self._dirty, self._flushed_at = False, time.monotonic()


class _MetricsFile:
  """A writer of one append-only file on process 0 (the others write nothing)."""

  def __init__(self, path: str, flush_seconds: float):
    self._file = _AppendOnlyFile(path, flush_seconds) if jax.process_index() == 0 else None

  def _append(self, data: bytes) -> None:
    if self._file is not None:
      self._file.append(data)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    self.flush()


class JsonlWriter(_MetricsFile):
  """Appends every scalar to DIR/metrics.jsonl, one object per line with `step`.

  Locally each line is appended as it comes. On a remote path the whole file is
  rewritten, at most every `flush_seconds` and on `close` (see the module docstring).
  """

  def __init__(self, path: str, flush_seconds: float = REMOTE_FLUSH_SECONDS):
    super().__init__(path, flush_seconds)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    self._append((line + "\n").encode("utf-8"))


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (the checksum of TFRecord frames); pure Python: event records
  are a few dozen bytes, written every `train.log_every` steps."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
  """One TFRecord frame: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


class TensorBoardWriter(_MetricsFile):
  """Scalars as a TensorBoard event file in `logdir` (process 0; others write none).

  Same interface as `JsonlWriter`. Each run (and each resume) opens its own
  `events.out.tfevents.<seconds>.engram_jax.<pid>.v2`; TensorBoard reads a directory's
  files as one run, so a resume first cuts from the older files what they logged after
  the resumed step (`repair_events`). Values are float32 `simple_value`s, as TensorBoard
  stores scalars.
  """

  def __init__(self, logdir: str, flush_seconds: float = REMOTE_FLUSH_SECONDS):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    name = f"events.out.tfevents.{int(time.time()):010d}.engram_jax.{os.getpid()}.v2"
    super().__init__(paths.join(logdir, name), flush_seconds)
    self._event(file_version="brain.Event:2")

  def _event(self, **fields) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), **fields)
    self._append(tfrecord(event.SerializeToString()))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._event(step=int(step), summary=self._summary_pb2.Summary(value=values))


def logged_eval(path: str, step: int) -> dict[str, float]:
  """The eval metrics `metrics.jsonl` at `path` holds for `step` (its last eval line
  there; {} when none, or no file)."""
  found = {}
  if not paths.exists(path):
    return found
  for line in paths.read_bytes(path).split(b"\n"):
    try:
      row = json.loads(line)
    except ValueError:  # blank, or torn by a kill
      continue
    if (isinstance(row, dict) and row.get("step") == step
        and any(k.startswith("eval_") for k in row)):
      found = {k: v for k, v in row.items() if k != "step"}
  return found


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
    _append_whole(dropped_path, b"".join(line + b"\n" for line in dropped))
  if dropped or not raw.endswith(b"\n") and raw:
    paths.atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
  return len(dropped)


def _frames(raw: bytes):
  """(frame, its Event bytes) of each whole TFRecord frame of `raw`, then (tail, None)
  for bytes that are not a whole frame (a write cut short by a kill)."""
  pos = 0
  while pos + 12 <= len(raw):
    (length,) = struct.unpack_from("<Q", raw, pos)
    end = pos + 12 + length + 4
    if end > len(raw) or raw[pos + 8:pos + 12] != _masked_crc(raw[pos:pos + 8]):
      break
    data = raw[pos + 12:end - 4]
    if end == len(raw) and raw[end - 4:end] != _masked_crc(data):
      break  # only the last frame can be torn: its data is checked, the rest are not
    yield raw[pos:end], data
    pos = end
  if pos < len(raw):
    yield raw[pos:], None


def repair_events(logdir: str, resume_step: int) -> int:
  """`repair_metrics` for the TensorBoard event files of `logdir`: cuts a torn last
  record and every summary logged after `resume_step` (TensorBoard would show those
  steps twice, going back at the resume); returns how many records were cut. Each file
  is rewritten atomically, only when needed; the cut records are appended to
  `DROPPED_EVENTS_FILE` beside them, never lost."""
  from google.protobuf.message import DecodeError
  from tensorboard.compat.proto import event_pb2
  cut = []
  for name in sorted(paths.listdir(logdir)):
    if "tfevents" not in name:
      continue
    path = paths.join(logdir, name)
    kept, dropped = [], []
    for frame, data in _frames(paths.read_bytes(path)):
      if data is None:
        dropped.append(frame)
        continue
      try:
        event = event_pb2.Event.FromString(data)
      except DecodeError:  # bytes damaged inside a whole frame: cut (kept), not fatal
        dropped.append(frame)
        continue
      (dropped if event.HasField("summary") and event.step > resume_step else kept
       ).append(frame)
    if dropped:
      cut += dropped
      paths.atomic_write_bytes(path, b"".join(kept))
  if cut:
    _append_whole(paths.join(logdir, DROPPED_EVENTS_FILE), b"".join(cut))
  return len(cut)


def _append_whole(path: str, data: bytes) -> None:
  """Appends `data` to `path` (on an object store: the whole object again)."""
  if paths.is_local(path):
    with open(path, "ab") as f:
      f.write(data)
  else:
    before = paths.read_bytes(path) if paths.exists(path) else b""
    paths.atomic_write_bytes(path, before + data)
