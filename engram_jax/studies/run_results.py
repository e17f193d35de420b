"""A study's finished runs: `result.json` in each run's workdir, valid for one config.

A study (seeds, the allocation sweep) trains many runs and reads a finished one back
instead of training it again. A result is written only once its run reached
`train.steps` (a run a signal stopped raises `errors.RunStopped` and is not finished)
and records the run's whole config: a later request that only trains longer (more
`train.steps`, with the warm-up `--steps` derives from them, other eval or checkpoint
intervals) trains on from the checkpoint; one with any other field changed is one line
naming the fields, rather than the old result reported as the answer to the new
request. Fields that only one code version has are not compared, nor the spelling of a
file's path (`FILE_FIELDS`).

Before a study first trains in a directory it writes `study_run.json` there (`claim`),
with the config: an interrupted run is then checked the same way before it resumes,
and a directory holding a run the study did not start (the user's own run under the
study's root) is refused rather than trained on under the study's schedule.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

RESULT = "result.json"
STARTED = "study_run.json"  # the config a study started (or extended) this run with
CONFIG = "config"  # the key of the run's config (the ConfigDict as a dict) in a result
# Fields a finished run may be extended over (the trainer resumes to the new length).
EXTENDABLE = ("train.steps", "train.eval_every", "train.log_every",
              "train.checkpoint_every", "train.keep_checkpoints", "train.stop_after_steps")


def _flat(config_dict: dict) -> dict:
  from flax import traverse_util
  as_json = json.loads(json.dumps(config_dict, default=repr))  # tuples -> lists
  return traverse_util.flatten_dict(as_json, sep=".")


def read(directory: str, config, flag: str = "--workdir") -> Optional[dict]:
  """The result of the run in `directory` when it was made with `config`; None when
  there is none, or its run may train (on) to `config` (a longer run, an interrupted
  one, or a result from before configs were recorded: the trainer then says it is
  complete). A run of another config, or one no study started, is a ValueError."""
  from engram_jax import paths
  path = os.path.join(directory, RESULT)
  if not os.path.exists(path):
    if not _has_checkpoint(directory):  # nothing to resume: the trainer starts afresh
      return None
    started = _saved_config(os.path.join(directory, STARTED), flag)
    if started is None:
      raise ValueError(f"{flag}: {directory} holds a run this study did not start (no "
                       f"{STARTED}): training it would take it over; give the study its "
                       f"own {flag} root, or move that run away")
    _only_extendable_differ(started, config, directory, flag, "an unfinished run")
    return None
  try:
    row = json.loads(paths.read_text(path))
  except ValueError:  # written atomically: only a hand edit tears it; train again
    return None
  saved = row.pop(CONFIG, None) if isinstance(row, dict) else None
  if saved is None:
    return None
  return None if _only_extendable_differ(saved, config, directory, flag, "a finished run") else row


@contextlib.contextmanager
def claimed(directory: str, config, flag: str = "--workdir"):
  """Trains the run in `directory` (the `with` body) as this study's, to `config`
  (enter after `read` passed): `STARTED` records it first. A body that fails with no
  checkpoint written takes the record (and the directories made here) with it, so the
  next request starts afresh; one refused because another trainer holds the directory
  puts back the record that was there (that trainer's study's)."""
  from engram_jax import paths
  from engram_jax import workdir_lock
  marker = os.path.join(directory, STARTED)
  made = not os.path.isdir(directory)
  with paths.no_empty_dir_left(directory):
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as err:  # a file, or a dangling link, by that name
      raise ValueError(f"{flag}: {directory} cannot be a run's directory "
                       f"({err.strerror}); move what is there away") from None
    try:
      with open(marker, "rb") as f:
        previous = f.read()
    except FileNotFoundError:
      previous = None
    paths.atomic_write_text(marker, json.dumps({CONFIG: config.to_dict()}, indent=1,
                                               default=repr))
    try:
      yield
    except workdir_lock.WorkdirLocked:
      if previous is None:
        paths.remove(marker, missing_ok=True)
      else:
        paths.atomic_write_bytes(marker, previous)
      raise
    except BaseException:
      _unclaim(directory, made)
      raise


def train(directory: str, config) -> bool:
  """Trains the run in `directory` to `config` as this study's (`claimed`); whether it
  reached `train.steps` (one `train.stop_after_steps` stopped has not; a signal's
  stop raises `errors.RunStopped`)."""
  from engram_jax import train as train_lib
  with claimed(directory, config):
    train_lib.train_and_evaluate(config, directory)
  return finished(directory, int(config.train.steps))


def _unclaim(directory: str, made: bool) -> None:
  """The record of a claim whose training wrote no checkpoint (and the lock file, when
  the directory was made for it and holds nothing else), under the workdir's lock:
  one held by another trainer leaves everything as it is."""
  from engram_jax import paths
  from engram_jax import workdir as workdir_lib
  from engram_jax import workdir_lock
  lock = workdir_lock.WorkdirLock(directory)
  try:
    lock.acquire()
  except (ValueError, OSError):
    return
  try:
    if _has_checkpoint(directory):
      return
    paths.remove(os.path.join(directory, STARTED), missing_ok=True)
    if made:
      workdir_lib.remove_if_only_lock(directory, lock)
  finally:
    lock.release()


def _saved_config(path: str, flag: str) -> Optional[dict]:
  """The config in a `STARTED` record; None without one, a ValueError for a damaged one."""
  from engram_jax import paths
  try:
    saved = json.loads(paths.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as err:
    saved = err
  if not (isinstance(saved, dict) and isinstance(saved.get(CONFIG), dict)):
    raise ValueError(f"{flag}: {path} is damaged (it is written whole: an edit?), so "
                     "whether this request may resume that run is unknown; restore it, "
                     "or move the run away")
  return saved[CONFIG]


def _has_checkpoint(directory: str) -> bool:
  from engram_jax import checkpoints
  return bool(checkpoints.saved_steps(directory))  # [] without a checkpoint directory


def _only_extendable_differ(saved: dict, config, directory: str, flag: str, what: str) -> bool:
  """Whether `config` differs from the `saved` one only in fields a run may train on
  over (`EXTENDABLE`; False when none differ); any other difference is a ValueError
  naming the fields."""
  from engram_jax.data import fingerprint
  saved, now = _flat(saved), _flat(config.to_dict())
  both = saved.keys() & now.keys()  # fields added or removed since: another code version
  differing = [d for d in fingerprint.differences({k: saved[k] for k in both},
                                                  {k: now[k] for k in both})
               if not _same_file_field(d.split(":")[0], saved, now)]
  if not differing:
    return False
  fields = {d.split(":")[0] for d in differing}
  # `run_config.with_steps` (the studies' --steps) derives the warm-up from the steps
  extendable = set(EXTENDABLE) | ({"train.warmup_steps"} if "train.steps" in fields else set())
  if fields <= extendable:
    return True
  raise ValueError(f"{flag}: {directory} holds {what} of another config "
                   f"({'; '.join(differing)}); use a new {flag} for this request, or "
                   "move that run away to train it again")


# Fields that locate a file rather than define the run: the same file spelled another
# way (a relative --workdir) or moved with the study is the same run.
FILE_FIELDS = ("data.tokenizer_path",)


def _same_file_field(key: str, saved: dict, now: dict) -> bool:
  """Whether `key` is a `FILE_FIELDS` path naming the same file in both configs: one
  path, or equal bytes (or the saved one gone: a study moved as a whole)."""
  if key not in FILE_FIELDS or not isinstance(now.get(key), str):
    return False
  old, new = saved.get(key), now[key]
  if not isinstance(old, str) or not os.path.exists(new):
    return False
  if not os.path.exists(old):
    return True
  if os.path.realpath(old) == os.path.realpath(new):
    return True
  with open(old, "rb") as a, open(new, "rb") as b:
    return a.read() == b.read()


def finished(directory: str, steps: int) -> bool:
  """Whether the run in `directory` has its checkpoint at `steps` (one stopped by
  `train.stop_after_steps` has not). One trained past `steps` (for an earlier, longer
  request) is a ValueError: its schedule was another run's, not this request's."""
  from engram_jax import checkpoints
  if not os.path.isdir(os.path.join(directory, checkpoints.CHECKPOINT_DIR)):
    return False
  newest = max(checkpoints.saved_steps(directory), default=0)
  if newest > steps:
    raise ValueError(f"--workdir: the run in {directory} trained to step {newest}, past "
                     f"this request's train.steps={steps}; use a new --workdir for it")
  return newest == steps


def final_eval(directory: str, steps: int) -> dict:
  """The eval metrics the run in `directory` logged at step `steps` (its last eval,
  as the trainer always evaluates at `train.steps`)."""
  from engram_jax import writers
  found = writers.logged_eval(os.path.join(directory, writers.METRICS_FILE), steps)
  if not found:
    raise ValueError(f"--workdir: the run in {directory} logged no eval at step {steps}; "
                     "use a new --workdir")
  return found


def write(directory: str, row: dict, config) -> None:
  """`row` as the run's result, with `config`, atomically."""
  from engram_jax import paths
  paths.atomic_write_text(os.path.join(directory, RESULT),
                          json.dumps({**row, CONFIG: config.to_dict()}, indent=1,
                                     default=repr))
