"""TensorBoard event files written without TensorFlow (engram_jax/writers.py), read back
by TensorBoard's own loader and compared with the run's metrics.jsonl."""
import glob
import os
import struct

import numpy as np
import pytest

from engram_jax import writers

from tests import runs


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} as TensorBoard loads the directory."""
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_crc32c_and_record_framing_match_the_published_values():
  assert writers.crc32c(b"") == 0
  assert writers.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert writers.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
  record = writers.tfrecord(b"abc")
  assert struct.unpack("<Q", record[:8])[0] == 3 and record[12:15] == b"abc"
  assert len(record) == 8 + 4 + 3 + 4


def test_a_run_s_events_hold_what_its_metrics_jsonl_holds(trained_workdir):
  events = glob.glob(os.path.join(trained_workdir, "events.out.tfevents.*"))
  assert len(events) == 1
  from_tb = _scalars(trained_workdir)
  rows = runs.metric_rows(trained_workdir)
  from_jsonl = {}
  for row in rows:
    for key, value in row.items():
      if key != "step":
        from_jsonl.setdefault(key, []).append((row["step"], np.float32(value)))
  assert {"train_loss", "eval_loss", "grad_norm"} <= set(from_jsonl)
  assert {k: v for k, v in from_tb.items() if k != "steps_per_sec"} == from_jsonl
  steps = [step for step, _ in from_tb["steps_per_sec"]]
  assert steps == [step for step, _ in from_jsonl["train_loss"]]
  assert all(rate > 0 for _, rate in from_tb["steps_per_sec"])


def test_a_remote_event_file_is_rewritten_whole_and_reads_back(tmp_path, monkeypatch):
  """On an object store the writer holds its records and rewrites the object whole."""
  monkeypatch.setattr(writers.paths, "is_local", lambda p: False)
  writer = writers.TensorBoardWriter(str(tmp_path), flush_seconds=3600)
  (event_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))  # its header, at once
  size = os.path.getsize(event_file)
  writer.write(1, {"loss": 2.5})  # held: object stores throttle rewrites of one object
  writer.write(2, {"loss": 1.5})
  assert os.path.getsize(event_file) == size
  writer.close()
  assert _scalars(str(tmp_path)) == {"loss": [(1, 2.5), (2, 1.5)]}


def test_repair_events_cuts_what_was_logged_after_the_resume_step(tmp_path):
  """A killed run's file holds steps past its last checkpoint and maybe a torn record:
  both are cut (kept in the dropped file), the rest reads back as it was."""
  writer = writers.TensorBoardWriter(str(tmp_path))
  for step in range(1, 7):
    writer.write(step, {"loss": float(step)})
  (event_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  whole = open(event_file, "rb").read()
  with open(event_file, "ab") as f:
    f.write(writers.tfrecord(b"\x08\x07")[:9])  # a record cut short by a kill
  assert writers.repair_events(str(tmp_path), 3) == 4
  assert _scalars(str(tmp_path)) == {"loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}
  dropped = open(tmp_path / writers.DROPPED_EVENTS_FILE, "rb").read()
  assert open(event_file, "rb").read() + dropped[:-9] == whole  # nothing lost
  assert writers.repair_events(str(tmp_path), 3) == 0  # nothing more to cut


def test_a_resume_after_a_kill_logs_every_step_once(tmp_path):
  """A run killed after logging steps its last checkpoint does not hold is resumed from
  that checkpoint: TensorBoard then shows each step once, as metrics.jsonl has them
  (it once showed steps 1..4 and then 3.. again, going back)."""
  import shutil

  from engram_jax import train
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(runs.tiny_config(steps=4, checkpoint_every=2), workdir)
  shutil.move(os.path.join(workdir, "checkpoints", "4"), str(tmp_path / "lost"))  # the kill
  train.train_and_evaluate(runs.tiny_config(steps=6, checkpoint_every=2), workdir)
  steps = [step for step, _ in _scalars(workdir)["train_loss"]]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert _scalars(workdir)["train_loss"] == [
      (step, np.float32(loss)) for step, loss in runs.train_losses(workdir).items()]


def test_a_record_damaged_inside_is_cut_not_fatal(tmp_path):
  """Bytes changed inside a whole record (its length intact) made every resume fail
  decoding it; the record is cut and kept like a torn one, the others stay."""
  writer = writers.TensorBoardWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"loss": float(step)})
  (event_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  raw = bytearray(open(event_file, "rb").read())
  frames, pos = [], 0
  while pos < len(raw):
    (length,) = struct.unpack_from("<Q", raw, pos)
    frames.append((pos, length))
    pos += 16 + length
  start, length = frames[2]  # step 2's record: its data made undecodable
  raw[start + 12:start + 12 + length] = b"\xff" * length
  open(event_file, "wb").write(bytes(raw))
  assert writers.repair_events(str(tmp_path), 3) == 1
  assert _scalars(str(tmp_path)) == {"loss": [(1, 1.0), (3, 3.0)]}
