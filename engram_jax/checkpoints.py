"""orbax checkpoints of a workdir: save layout, resume with fallback, inference loads.

A workdir's `checkpoints/STEP/` holds two items: `state` (the TrainState) and `data`
(the data iterator's JSON state), and with tables in host memory a third,
`host_tables` (their rows and optimizer state, saved in the same step). Resuming
restores the newest readable step; a torn or corrupt one is moved to
`checkpoints_unreadable/` (never deleted) and the one before it is used. The `data`
item also records a digest of the state's arrays (engram_jax/state_digest.py), checked
on every restore, so bytes changed in place are found, not trained on. Inference
restores only `state.params` (and checks those).

The workdir may be a URL (gs://): orbax writes it itself, and the listing and the
quarantine go through `engram_jax.paths`; the tracebacks behind a failure's one line go
to the workdir's log (engram_jax/library_log.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import jax

from engram_jax import paths, quiet
from engram_jax.errors import TrainingError, first_line, root_cause_line
from engram_jax.library_log import log_path

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
HOST_TABLES = "host_tables"
ITEMS = ("state", "data", HOST_TABLES)
# The `data` item's key for the state's digest (engram_jax.state_digest), checked when
# the state is read; checkpoints written before it have none and are not checked.
DIGEST_KEY = "state_digest"
HOST_DIGEST_KEY = "host_tables_digest"  # the same for the `host_tables` item


def manager(workdir: str, keep: int = 3, async_saves: bool = True, create: bool = True):
  """The workdir's CheckpointManager (keep-last-`keep` rotation, async saves).

  One that may write (`create`) saves the state through `_state_handler()`; readers
  (`create=False`, the inference loads) name the items and let orbax pick handlers.
  """
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_saves)
  directory = paths.join(paths.absolute(workdir), CHECKPOINT_DIR)
  if not create:
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state, data, tables = (_state_handler(), ocp.JsonCheckpointHandler(),
                         ocp.PyTreeCheckpointHandler())
  for item, handler, args in (("state", state, ocp.args.StandardSave),
                              ("state", state, ocp.args.StandardRestore),
                              ("data", data, ocp.args.JsonSave),
                              ("data", data, ocp.args.JsonRestore),
                              (HOST_TABLES, tables, ocp.args.PyTreeSave),
                              (HOST_TABLES, tables, ocp.args.PyTreeRestore)):
    registry.add(item, args, handler)
  return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


# orbax writes an array replicated over several devices "replica-parallel": each replica
# writes a slice of it, cut on the device by an eager `lax.slice` per (array, replica).
# Each of those is traced and compiled on a process's first save, which blocks the
# train loop: `tiny` on 8 CPU devices stalled 3.7 s at its first checkpoint (a state of
# 60 small arrays: 17 s). Slices under this size are not worth it: such an array is
# written whole by its first replica, as orbax does for unreplicated ones.
REPLICA_SLICE_MIN_BYTES = 1 << 20


def _state_handler():
  """orbax's StandardCheckpointHandler (the same files, the same handler name in the
  step's metadata) whose jax.Array writes split replicated arrays only into slices of
  at least REPLICA_SLICE_MIN_BYTES. Where orbax's internals differ from the version this
  was written against, the plain handler (same checkpoints, slower first save)."""
  import copy
  import numpy as np
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  handler = ocp.StandardCheckpointHandler()
  arrays = copy.copy(type_handlers.get_type_handler(jax.Array))
  if not (hasattr(handler, "_impl") and hasattr(arrays, "_min_slice_bytes_for_replica_parallel")):
    return handler
  arrays._min_slice_bytes_for_replica_parallel = REPLICA_SLICE_MIN_BYTES
  others = [(t, type_handlers.get_type_handler(t))
            for t in (np.ndarray, int, float, bytes, np.number, str)]
  handler._impl = ocp.PyTreeCheckpointHandler(
      use_ocdbt=True, save_concurrent_gb=96, restore_concurrent_gb=96,  # as the plain one
      type_handler_registry=type_handlers.create_type_handler_registry(
          (jax.Array, arrays), *others))
  return handler


def save(mngr, step: int, state, data_state: dict, host_tables: dict | None = None) -> None:
  """Saves (asynchronously) the train state and the data iterator's state at `step`;
  with `host_tables` (NumPy tables and their optimizer state, engram_jax.host_tables)
  those too, in the same step, and the save completes before this returns (the arrays
  are updated in place by the next step)."""
  import orbax.checkpoint as ocp
  items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
  if host_tables is not None:
    items[HOST_TABLES] = ocp.args.PyTreeSave(host_tables)  # restored by PyTreeRestore
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  if host_tables is not None:
    mngr.wait_until_finished()


def save_failed(err: Exception, workdir: str, manager=None) -> TrainingError:
  """A failed (async) save, e.g. a full disk: one line that says the older checkpoints
  are intact and how to go on."""
  if manager is not None:
    try:  # let saves still in flight commit before listing what is kept
      manager.wait_until_finished()
    except Exception:  # noqa: BLE001  the failure being reported: already in hand
      pass
  kept = saved_steps(workdir)
  return TrainingError(
      f"saving a checkpoint in {paths.join(workdir, CHECKPOINT_DIR)} "
      f"failed ({getattr(err, 'strerror', None) or first_line(err)}); the "
      f"checkpoints before it are kept ({kept or 'none'}): free space or fix the "
      "filesystem, then run the same command to resume")


def join_save_threads(timeout_s: float = 10.0) -> None:
  """Waits, at most `timeout_s` in all, for orbax's save threads still running after
  a failed save was reported and the manager closed: they end (and log their own
  failures) while the run's library logs still go to its log, not the console."""
  import threading
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    target = getattr(thread, "_target", None)
    module = type(thread).__module__ + " " + str(getattr(target, "__module__", ""))
    if thread is not threading.current_thread() and "orbax" in module:
      # threading's own join: orbax's re-raises the thread's error (reported already)
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


def finish_saves(mngr, workdir: str) -> None:
  """Waits for the async saves in flight; a failed one raises `save_failed`'s error."""
  try:
    mngr.wait_until_finished()
  except Exception as err:  # noqa: BLE001  orbax re-raises its save thread's error
    raise save_failed(err, workdir) from None


def gather_data_states(state: dict) -> dict:
  """The data iterator states of every process, for the `data` item.

  orbax writes a JSON item from process 0 only, but each process reads its own share
  of the data (its own grain state over tfds), so with several processes all states
  are gathered and saved as {"processes": [state_0, state_1, ...]}.
  """
  if jax.process_count() == 1:
    return state
  import numpy as np
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return {"processes": [json.loads(bytes(row[:int(n)]).decode("utf-8"))
                        for row, n in zip(gathered, lengths.reshape(-1))]}


def own_data_state(saved: dict) -> dict:
  """This process's state from `gather_data_states` (or a one-process checkpoint)."""
  if "processes" not in saved:
    return saved
  states, count = saved["processes"], jax.process_count()
  if len(states) == count:
    return states[jax.process_index()]
  if all(s == states[0] for s in states):  # local corpora: just the batch count
    return states[0]
  raise ValueError(f"the checkpoint's data state was saved by {len(states)} processes "
                   f"and this run has {count}: per-process tfds iterators cannot be "
                   f"split differently; resume with {len(states)} processes (or use a "
                   "new --workdir)")


def has_host_tables(mngr, step: int) -> bool:
  try:  # quiet: orbax warns of every item it has no handler for here
    with quiet.quiet_library_logs():
      return HOST_TABLES in mngr.item_metadata(step).keys()
  except Exception:  # noqa: BLE001  unreadable metadata: no
    return False


def restore_host_tables(mngr, step: int, abstract: dict, partial: bool = False) -> dict:
  """The `host_tables` item of `step` as NumPy arrays (never on an accelerator);
  `partial`: only the leaves `abstract` names (e.g. the tables, not their state)."""
  import numpy as np
  import orbax.checkpoint as ocp
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        abstract)
  try:
    with quiet.quiet_library_logs(log_path(_workdir_of(mngr))):
      restored = mngr.restore(step, args=ocp.args.Composite(**{
          HOST_TABLES: ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                              partial_restore=partial),
          "data": ocp.args.JsonRestore()}))
    if not isinstance(restored.get(HOST_TABLES), dict):  # orbax: None for a missing item
      raise FileNotFoundError(f"{HOST_TABLES}/ is missing")
  except Exception as err:  # orbax/tensorstore raise many types for a damaged item
    why = damage(_workdir_of(mngr), step, err, (HOST_TABLES, "data"))
    raise CorruptCheckpoint(f"checkpoint {step}, host tables: {why}") from err
  try:
    check_digest(restored[HOST_TABLES], restored["data"], HOST_DIGEST_KEY)
  except CorruptCheckpoint as err:
    raise CorruptCheckpoint(f"checkpoint {step}, host tables: {err}") from None
  return restored[HOST_TABLES]


def _workdir_of(mngr) -> str:
  """The workdir of a manager (`mngr.directory` is WORKDIR/checkpoints, an epath)."""
  return str(mngr.directory.parent)


def newest_has_host_tables(workdir: str) -> bool:
  """Whether the newest checkpoint of `workdir` keeps its Engram tables in the
  `host_tables` item (a run trained with `engram.placement="host"`)."""
  steps = saved_steps(workdir)
  if not steps:
    return False
  with quiet.quiet_library_logs():  # orbax warns of a step's missing metadata file
    mngr = manager(workdir, async_saves=False, create=False)
  try:
    return has_host_tables(mngr, steps[-1])
  finally:
    mngr.close()


def restore_latest(mngr, abstract_state, exclude=()) -> tuple[Any, Any, list[int]]:
  """The newest readable checkpoint as (state, data_state, unreadable_steps), steps in
  `exclude` (found unreadable otherwise) not tried.

  Falls back to older steps with a warning; (None, None, []) when there is none. When
  checkpoints exist but none restores, that is not a torn write but a different state
  layout (other code or config): a ValueError, rather than a silent restart from step 0.
  """
  workdir = _workdir_of(mngr)
  unreadable, errors, found = [], [], []  # found: the damage itself was seen
  for step in sorted(set(mngr.all_steps()) - set(exclude), reverse=True):
    try:
      with quiet.quiet_library_logs(log_path(workdir)):
        state, data = _restore(mngr, step, abstract_state)
    except Exception as err:  # orbax/tensorstore raise many types for a bad save
      unreadable.append(step)
      broken = damaged_files(workdir, step)
      errors.append(broken or root_cause_line(err))  # not orbax's wrapper
      found.append(bool(broken))
      continue
    try:  # only a digest that differs marks it unreadable; a failing check raises
      check_digest(state, data)
    except CorruptCheckpoint as err:
      unreadable.append(step)
      errors.append(str(err))
      found.append(True)
      continue
    # Only now, with an older step restored, are the newer ones known to be torn
    # (when none restores, the state layout differs: no fallback warnings then).
    for bad, error in zip(unreadable, errors):
      print(f"warning: checkpoint {bad} is unreadable ({error}); falling back to "
            f"checkpoint {step}", flush=True)
    return state, data, unreadable
  if unreadable:
    cause = ("damaged" if all(found) else
             "torn, or written by other code or config; resume with the code and config "
             "that wrote them")
    raise ValueError(
        f"--workdir: none of the checkpoints {sorted(unreadable)} in {mngr.directory} "
        f"restores ({errors[0]}): {cause}; move the checkpoints aside to start over, or "
        f"use a new --workdir (details: {log_path(workdir)})")
  return None, None, unreadable


class CorruptCheckpoint(ValueError):
  """A checkpoint whose arrays do not read back as saved: files that do not restore,
  or arrays whose digest differs from the one the save recorded."""


# The JSON files orbax keeps in a step and in each item, read before any array.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def damage(workdir: str, step: int, err: BaseException, items: tuple = ("state", "data")
           ) -> str:
  """One line on what is damaged in checkpoint `step`, whose restore of `items` raised
  `err`: `damaged_files`' finding, or else the storage error under orbax's wrappers."""
  return damaged_files(workdir, step, items) or root_cause_line(err)


def damaged_files(workdir: str, step: int, items: tuple = ("state", "data")
                  ) -> Optional[str]:
  """A missing item directory or manifest, or a metadata file that is not JSON, of
  checkpoint `step`, by its path in the workdir; None when these look whole. (Orbax
  reads a garbled `_METADATA` as arrays gone missing: a config error, it would seem.)"""
  step_dir = paths.join(paths.absolute(workdir), CHECKPOINT_DIR, str(step))
  for item in items:
    item_dir = paths.join(step_dir, item)
    if not paths.exists(item_dir):
      return f"{CHECKPOINT_DIR}/{step}/{item}/ is missing"
    try:
      ocdbt = any(n.startswith("ocdbt.process_") for n in paths.listdir(item_dir))
    except FileNotFoundError:  # deleted meanwhile (a trainer's rotation)
      return f"{CHECKPOINT_DIR}/{step}/{item}/ is missing"
    if ocdbt and not paths.exists(paths.join(item_dir, "manifest.ocdbt")):
      return f"{CHECKPOINT_DIR}/{step}/{item}/manifest.ocdbt is missing"
  for name in [*(f"{item}/{f}" for item in items for f in _JSON_FILES), _JSON_FILES[0]]:
    path = paths.join(step_dir, name)
    if not paths.exists(path):
      continue
    try:
      json.loads(paths.read_text(path))
    except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      return f"{CHECKPOINT_DIR}/{step}/{name} is not readable JSON (torn or overwritten)"
  return None


def check_digest(tree, data_state, key: str = DIGEST_KEY) -> None:
  """Raises `CorruptCheckpoint` when an array of `tree` (restored) differs from the
  digest the save recorded under `key` in its `data` item (`data_state`, as saved: one
  process's or `gather_data_states`', whose entries all hold the same digest); none
  recorded: nothing to check."""
  from engram_jax import state_digest
  if isinstance(data_state, dict) and data_state.get("processes"):
    data_state = data_state["processes"][0]
  saved = data_state.get(key) if isinstance(data_state, dict) else None
  if not saved:
    return
  bad = state_digest.first_mismatch(tree, saved)
  if bad is not None:
    raise CorruptCheckpoint(f"{bad} does not hold the values that were saved (its "
                            "digest differs: a damaged or overwritten data file)")


def _restore(mngr, step: int, abstract_state):
  """(state, data_state) of one step. A dataclass state whose empty (`{}`) fields the
  checkpoint lacks, because it was written before they existed (e.g. a dense-Adam run's
  `TrainState.table_opt_state`), restores the fields it has and keeps those empty."""
  import orbax.checkpoint as ocp
  args = lambda state: ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                          data=ocp.args.JsonRestore())
  if dataclasses.is_dataclass(abstract_state):
    fields = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state)}
    try:
      saved = set(mngr.item_metadata(step)["state"].keys())
    except Exception:  # unreadable metadata: the plain restore below reports it
      saved = set(fields)
    missing = set(fields) - saved
    if missing and all(isinstance(fields[k], dict) and not fields[k] for k in missing):
      restored = mngr.restore(step, args=args({k: v for k, v in fields.items()
                                               if k in saved}))
      return abstract_state.replace(**restored["state"]), restored["data"]
  restored = mngr.restore(step, args=args(abstract_state))
  return restored["state"], restored["data"]


def quarantine_steps(workdir: str, steps) -> None:
  """Moves unreadable checkpoints out of the manager's sight, never deleting them.

  The run then saves those step numbers again; the old bytes stay in
  `workdir/checkpoints_unreadable/STEP[.N]` for a human to inspect. Process 0 moves,
  every process waits for it.
  """
  if not steps:
    return
  if jax.process_index() == 0:
    workdir = paths.absolute(workdir)
    root = paths.join(workdir, UNREADABLE_DIR)
    paths.makedirs(root)
    for step in steps:
      target, n = paths.join(root, str(step)), 0
      while paths.exists(target):
        n += 1
        target = paths.join(root, f"{step}.{n}")
      paths.rename(paths.join(workdir, CHECKPOINT_DIR, str(step)), target)
      print(f"moved unreadable checkpoint {step} to {target}", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("engram_jax: unreadable checkpoints moved")


def saved_steps(workdir: str) -> list[int]:
  """The step numbers of `workdir/checkpoints/STEP` (orbax's temporary dirs excluded)."""
  names = paths.listdir(paths.join(paths.absolute(workdir), CHECKPOINT_DIR))
  return sorted(int(name) for name in names if name.isdigit())


def _shapes(tree) -> dict[str, tuple]:
  """{"block_1/attention/key/kernel": shape} of an abstract tree or orbax metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat if hasattr(leaf, "shape")}


def _stored_tree(workdir: str, step: int):
  """The metadata tree of checkpoint `step`'s state (`{"params": ..., ...}`), or None
  when it is unreadable (a torn checkpoint: the restore's own error says more)."""
  import orbax.checkpoint as ocp

  path = paths.join(paths.absolute(workdir), CHECKPOINT_DIR, str(step), "state")
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception:  # noqa: BLE001
    return None
  return getattr(getattr(meta, "item_metadata", meta), "tree", meta)


def segmented_step(workdir: str, step: int) -> bool:
  """Whether checkpoint `step` has the segmented layer layout (engram_jax before the
  one scanned stack, `models.layouts.segmented_layout`)."""
  from engram_jax.models import layouts
  stored = _stored_tree(workdir, step)
  params = stored.get("params") if hasattr(stored, "get") else None
  return hasattr(params, "items") and layouts.segmented_layout(params)


def _as_stored(abstract_items: dict, stored) -> tuple[dict, list[str]]:
  """(`abstract_items` laid out as the checkpoint holds them, the names relaid): a
  checkpoint of the segmented layout restores into the same leaves, stacked the old
  way, and `models.layouts.relayout_like` turns it into this one's."""
  from engram_jax.models import layouts
  out, relaid = dict(abstract_items), []
  for name, abstract in abstract_items.items():
    tree = stored.get(name) if hasattr(stored, "get") else None
    if not (hasattr(tree, "items") and layouts.segmented_layout(tree)):
      continue
    try:
      out[name] = layouts.relayout_like(abstract, tree)
    except (KeyError, ValueError):  # another config: `restore_checkpoint` names the field
      continue
    relaid.append(name)
  return out, relaid


def _first_difference(workdir: str, step: int, abstract_items: dict,
                      skip: tuple = ()) -> Optional[str]:
  """"NAME/KEY is X in the checkpoint but Y" for the first array whose shape differs
  between `abstract_items` and checkpoint `step`'s metadata; None when none does or
  the metadata is unreadable."""
  stored = _stored_tree(workdir, step)
  if stored is None:
    return None
  for name, abstract in abstract_items.items():
    want, have = _shapes(abstract), _shapes(stored.get(name, {}) if hasattr(stored, "get") else {})
    for key in sorted(want.keys() | have.keys()):
      if any(key.startswith(prefix) for prefix in skip):
        continue
      if want.get(key) != have.get(key):
        in_ckpt = "absent" if key not in have else f"shape {have[key]}"
        in_cfg = "absent" if key not in want else f"shape {want[key]}"
        return f"{name}/{key} is {in_ckpt} in the checkpoint but {in_cfg}"
  return None


def _restore_step(workdir: str, step: int, abstract_items: dict) -> tuple[dict, Any]:
  """({name: tree} of the named TrainState fields at `step`, its `data` item)
  (as the inference loaders read them, one step at a time)."""
  import orbax.checkpoint as ocp

  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or default,
                                     dtype=x.dtype), abstract_items)
  mngr = manager(workdir, async_saves=False, create=False)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_items, restore_args=restore_args,
                                     partial_restore=True),
        data=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  if not isinstance(restored.get("data"), dict):  # orbax: None for a missing item
    raise FileNotFoundError("its data item is missing")
  return {name: restored["state"][name] for name in abstract_items}, restored["data"]


# Inference reads of a workdir that a trainer is changing: how often to list its
# checkpoints again, and how long to let a deletion finish before listing.
READ_ATTEMPTS = 8
READ_SETTLE_SECONDS = 0.25


def restore_checkpoint(workdir: str, abstract_items: dict,
                       config_file: str = "config.json",
                       skip: tuple = (), host_tables: Optional[dict] = None
                       ) -> tuple[dict, int]:
  """({name: tree}, step) of the newest readable checkpoint, for inference; with
  `host_tables` (the leaves to read of that item: a run trained with tables in host
  memory) its NumPy arrays too, as `{..., HOST_TABLES: tree}`, and a step whose host
  tables do not read back is passed over like one whose state does not.

  A config that fits none of the checkpoints is one ValueError line (checked on each
  one's metadata, before any array is read). A newer checkpoint that is unreadable, or
  whose metadata alone disagrees with the config while an older one agrees (a torn
  `_METADATA` or manifest reads as arrays gone missing), is skipped with one warning
  line on stderr; the libraries' tracebacks of the failed attempts are kept off stderr
  (`quiet.quiet_library_logs`). A checkpoint deleted while it was read (a trainer
  keeping few checkpoints) sends the reader to the checkpoints there are then: failures
  count only once the listing holds still (`READ_ATTEMPTS`), and a deleted checkpoint
  is not reported as unreadable. A
  checkpoint of the segmented layer layout (engram_jax before the one scanned stack)
  is converted as it is read.
  """
  import sys

  for _ in range(READ_ATTEMPTS):
    steps = sorted(saved_steps(workdir), reverse=True)
    if not steps:
      raise ValueError(f"--workdir={workdir!r} has no checkpoint "
                       f"({CHECKPOINT_DIR}/ is empty or missing); train first "
                       "with `python -m engram_jax.main`")
    items, step, skipped = _newest_readable(workdir, steps, abstract_items, skip,
                                            config_file, host_tables)
    if items is not None:
      break
    # A trainer deletes old checkpoints as it saves new ones: a step read while it was
    # being deleted fails as if damaged. Only failures that stand still are reported.
    time.sleep(READ_SETTLE_SECONDS)
    changed = sorted(saved_steps(workdir), reverse=True) != steps
    if not changed:
      break
  else:
    raise ValueError(f"--workdir={workdir!r}: its checkpoints changed while they were "
                     f"read, {READ_ATTEMPTS} times (a trainer saving new ones and "
                     "deleting old ones, e.g. with train.keep_checkpoints=1); run the "
                     "command again, or once the trainer has stopped")
  if items is None:
    mismatched = [why for _, why, fits in skipped if not fits]
    if len(mismatched) == len(skipped):  # every checkpoint disagrees: the config does
      raise ValueError(f"--workdir={workdir!r}: {config_file} does not match checkpoint "
                       f"{skipped[0][0]}: {mismatched[0]}; restore the config the run "
                       "was trained with")
    raise ValueError(f"--workdir={workdir!r}: no readable checkpoint (" + "; ".join(
        f"step {s}: {why}" for s, why, _ in skipped) + "); restore the damaged files "
        "from a copy, or train anew in a new --workdir")
  still_there = set(saved_steps(workdir))
  skipped = [entry for entry in skipped if entry[0] in still_there]  # not deleted ones
  if skipped:
    which = (f"checkpoint {skipped[0][0]} is" if len(skipped) == 1 else
             "checkpoints " + ", ".join(str(s) for s, _, _ in skipped) + " are")
    _, why, fits = skipped[0]
    print(f"warning: {which} unreadable ({'' if fits else 'its metadata: '}{why}); using "
          f"checkpoint {step}", file=sys.stderr, flush=True)
  return items, step


def _newest_readable(workdir: str, steps: list[int], abstract_items: dict, skip: tuple,
                     config_file: str, host_tables: Optional[dict]):
  """(items, step, skipped) of the newest of `steps` that fits `abstract_items` (as
  `config_file` gives them) and restores; (None, None, skipped) when none does.
  skipped: (step, why, whether its metadata fitted) of each newer one passed over."""
  from engram_jax.models import layouts
  skipped = []
  with quiet.quiet_library_logs(log_path(workdir)) as logs:
    for step in steps:
      broken = damaged_files(workdir, step)
      if broken:
        skipped.append((step, broken, True))
        logs.add(f"checkpoint {step} skipped: {broken}")
        logs.keep = True
        continue
      stored_items, relaid = _as_stored(abstract_items, _stored_tree(workdir, step))
      differs = _first_difference(workdir, step, stored_items, skip)
      if differs:
        skipped.append((step, f"{differs} by {config_file}", False))
        continue
      try:
        items, data = _restore_step(workdir, step, stored_items)
      except Exception as err:  # orbax/tensorstore raise many types for a torn save
        why = damage(workdir, step, err)
      else:
        try:  # only a digest that differs skips it; a failing check raises
          check_digest(items, data)
          if host_tables is not None:
            items[HOST_TABLES] = _read_host_tables(workdir, step, host_tables)
          why = None
        except CorruptCheckpoint as err:
          why = str(err).removeprefix(f"checkpoint {step}, ")
      if why is not None:
        skipped.append((step, why, True))
        logs.add(f"checkpoint {step} skipped: {why}")
        logs.keep = True  # why a checkpoint was skipped belongs in the run's log
        continue
      for older, why, fits in skipped:  # the run's log says why each was passed over
        if not fits:
          logs.add(f"checkpoint {older} skipped, its metadata: {why}")
          logs.keep = True
      return ({name: layouts.relayout_like(tree, abstract_items[name]) if name in relaid
               else tree for name, tree in items.items()}, step, skipped)
  return None, None, skipped


def _read_host_tables(workdir: str, step: int, abstract: dict) -> dict:
  """`restore_host_tables` of the `abstract` leaves alone, with a manager of its own."""
  mngr = manager(workdir, async_saves=False, create=False)
  try:
    return restore_host_tables(mngr, step, abstract, partial=True)
  finally:
    mngr.close()


def restore_params(workdir: str, abstract_params) -> tuple[Any, int]:
  """(params, step) of the newest readable checkpoint, for inference."""
  items, step = restore_checkpoint(workdir, {"params": abstract_params})
  return items["params"], step
