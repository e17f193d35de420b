"""The iterators every data source hands the trainer: resumable and per process.

`TrainIterator` wraps a grain dataset of batches: infinite, with a small JSON state
(`get_state` / `set_state`) saved with each checkpoint, so a resumed run continues
with exactly the batches that followed. `EvalBatches` is a fixed, finite sequence: the
same validation batches on every pass. Each process reads only its share of a global
batch (`per_process_batch`); data/text.py and data/images.py build both for their
sources.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grain
import numpy as np


def per_process_batch(cfg, process_index: int, process_count: int) -> int:
  """Rows each process contributes to a global batch of `cfg.batch_size` (any data
  config)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
  if cfg.batch_size % process_count:
    raise ValueError(
        f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} "
        f"processes; use a multiple of {process_count}.")
  return cfg.batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags, unparsed outside absl.app (tests, REPL)."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Infinite iterator of batches whose position can be saved and restored.

  `get_state()` returns a small JSON-serialisable dict; `set_state(state)` on an
  iterator built from the same config and tokenizer continues with exactly the batches
  that followed. Over a local corpus the state is just the batch count (batches are
  random access), so it survives a change of `worker_count`; over tfds it is grain's
  iterator state, which is tied to `worker_count`.
  """

  def __init__(self, dataset_at: Callable[[int], grain.IterDataset], worker_count: int,
               by_index: bool):
    self._dataset_at = dataset_at  # first batch -> dataset of the batches from there
    self._worker_count = worker_count
    self._by_index = by_index
    self._batches = 0
    self._it = None
    self._pending = None  # tfds: grain state to restore when (re)opening

  def _open(self, start: int) -> Iterator[dict[str, np.ndarray]]:
    dataset = self._dataset_at(start)
    if self._worker_count:
      _ensure_absl_flags_parsed()
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._worker_count))
    return iter(dataset)

  def _current(self):
    if self._it is None:
      self._it = self._open(self._batches if self._by_index else 0)
      if self._pending is not None:
        self._it.set_state(self._pending)
        self._pending = None
    return self._it

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._current())
    self._batches += 1
    if self._worker_count:  # own the memory: grain's shared-memory arrays that
      batch = {k: np.array(v) for k, v in batch.items()}  # outlive it warn at exit
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._by_index:
      return {"batches": self._batches}
    return {"batches": self._batches, "worker_count": self._worker_count,
            "grain": self._current().get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._batches = int(state["batches"])
    if self._by_index:
      return
    if state.get("worker_count") != self._worker_count:
      raise ValueError(
          f"data.worker_count={self._worker_count}, but this tfds data state was saved "
          f"with worker_count={state.get('worker_count')}; resume with that value.")
    self._pending = state["grain"]

  def close(self) -> None:
    """Stops grain's worker processes, if any; iterating again resumes in place."""
    if self._it is None:
      return
    if not self._by_index:
      self._pending = self._it.get_state()
    if hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class EvalBatches:
  """A fixed, finite sequence of batches: the same ones on every pass.

  Global batch j is rows [j*B, (j+1)*B) of a split (packed token rows, or images in
  stored order); each process yields its contiguous `B // process_count` of them, so
  every process yields the same number of batches. `read(j, first_row, rows)` builds
  one process's batch j from `rows` rows starting at `first_row`.
  """

  def __init__(self, read: Callable[[int, int, int], dict[str, np.ndarray]],
               global_batch: int, per_process: int, process_index: int, num_batches: int):
    self._read = read
    self._global_batch, self._per_process = global_batch, per_process
    self._process_index, self._num_batches = process_index, num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for j in range(self._num_batches):
      first_row = j * self._global_batch + self._process_index * self._per_process
      yield self._read(j, first_row, self._per_process)
