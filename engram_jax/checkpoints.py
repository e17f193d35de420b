"""orbax checkpoints of a workdir: save layout, resume with fallback, inference loads.

A workdir's `checkpoints/STEP/` holds two items: `state` (the TrainState) and `data`
(the data iterator's JSON state), and with tables in host memory a third,
`host_tables` (their rows and optimizer state, saved in the same step). Resuming restores the newest readable step; a torn
or corrupt one is moved to `checkpoints_unreadable/` (never deleted) and the one
before it is used. Inference restores only `state.params`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from engram_jax import quiet

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
HOST_TABLES = "host_tables"
ITEMS = ("state", "data", HOST_TABLES)
LOG_FILE = "engram_jax.log"  # library tracebacks of handled failures land here


def log_path(workdir: str) -> str:
  """The workdir's log of library details (one file per process)."""
  index = jax.process_index()
  name = LOG_FILE if index == 0 else LOG_FILE.replace(".log", f".p{index}.log")
  return os.path.join(os.path.abspath(workdir), name)


def manager(workdir: str, keep: int = 3, async_saves: bool = True, create: bool = True):
  """The workdir's CheckpointManager (keep-last-`keep` rotation, async saves)."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_saves)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options, item_names=ITEMS)


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


def has_host_tables(mngr, step: int) -> bool:
  try:
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
  with quiet.quiet_library_logs(log_path(os.path.dirname(str(mngr.directory)))):
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        HOST_TABLES: ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                            partial_restore=partial)}))
  return restored[HOST_TABLES]


def newest_has_host_tables(workdir: str) -> bool:
  """Whether the newest checkpoint of `workdir` keeps its Engram tables in the
  `host_tables` item (a run trained with `engram.placement="host"`)."""
  steps = saved_steps(workdir)
  if not steps:
    return False
  mngr = manager(workdir, async_saves=False, create=False)
  try:
    return has_host_tables(mngr, steps[-1])
  finally:
    mngr.close()


def first_line(err: Exception) -> str:
  """The gist of a (TensorStore/orbax) error: first line, without the spec dump."""
  text = (str(err).splitlines() or [type(err).__name__])[0]
  return text.split(" [tensorstore_spec")[0].split(" [source locations")[0][:200]


def restore_latest(mngr, abstract_state) -> tuple[Any, Any, list[int]]:
  """The newest readable checkpoint as (state, data_state, unreadable_steps).

  Falls back to older steps with a warning; (None, None, []) when there is none. When
  checkpoints exist but none restores, that is not a torn write but a different state
  layout (other code or config): a ValueError, rather than a silent restart from step 0.
  """
  unreadable, errors = [], []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      with quiet.quiet_library_logs(log_path(os.path.dirname(str(mngr.directory)))):
        state, data = _restore(mngr, step, abstract_state)
    except Exception as err:  # orbax/tensorstore raise many types for a bad save
      unreadable.append(step)
      errors.append(first_line(err))
      continue
    # Only now, with an older step restored, are the newer ones known to be torn
    # (when none restores, the state layout differs: no fallback warnings then).
    for bad, error in zip(unreadable, errors):
      print(f"warning: checkpoint {bad} is unreadable ({error}); falling back to "
            f"checkpoint {step}", flush=True)
    return state, data, unreadable
  if unreadable:
    raise ValueError(
        f"--workdir: none of the checkpoints {sorted(unreadable)} in {mngr.directory} "
        f"restores ({errors[0]}); resume with the code and config that wrote them, "
        f"or use a new --workdir (details: {log_path(os.path.dirname(str(mngr.directory)))})")
  return None, None, unreadable


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
    root = os.path.join(os.path.abspath(workdir), UNREADABLE_DIR)
    os.makedirs(root, exist_ok=True)
    for step in steps:
      target, n = os.path.join(root, str(step)), 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{step}.{n}")
      os.replace(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step)), target)
      print(f"moved unreadable checkpoint {step} to {target}", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("engram_jax: unreadable checkpoints moved")


def saved_steps(workdir: str) -> list[int]:
  """The step numbers of `workdir/checkpoints/STEP` (orbax's temporary dirs excluded)."""
  import os

  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(name) for name in names if name.isdigit())


def _shapes(tree) -> dict[str, tuple]:
  """{"block_1/attention/key/kernel": shape} of an abstract tree or orbax metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in flat if hasattr(leaf, "shape")}


def _stored_tree(workdir: str, step: int):
  """The metadata tree of checkpoint `step`'s state (`{"params": ..., ...}`), or None
  when it is unreadable (a torn checkpoint: the restore's own error says more)."""
  import os

  import orbax.checkpoint as ocp

  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "state")
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception:  # noqa: BLE001
    return None
  return getattr(getattr(meta, "item_metadata", meta), "tree", meta)


def segmented_step(workdir: str, step: int) -> bool:
  """Whether checkpoint `step` has the segmented layer layout (engram_jax before the
  one scanned stack, `models.lm.segmented_layout`)."""
  from engram_jax.models import lm
  stored = _stored_tree(workdir, step)
  params = stored.get("params") if hasattr(stored, "get") else None
  return hasattr(params, "items") and lm.segmented_layout(params)


def _as_stored(abstract_items: dict, stored) -> tuple[dict, list[str]]:
  """(`abstract_items` laid out as the checkpoint holds them, the names relaid): a
  checkpoint of the segmented layout restores into the same leaves, stacked the old
  way, and `models.lm.relayout_like` turns it into this one's."""
  from engram_jax.models import lm
  out, relaid = dict(abstract_items), []
  for name, abstract in abstract_items.items():
    tree = stored.get(name) if hasattr(stored, "get") else None
    if not (hasattr(tree, "items") and lm.segmented_layout(tree)):
      continue
    try:
      out[name] = lm.relayout_like(abstract, tree)
    except (KeyError, ValueError):  # another config: `config_mismatch` names the field
      continue
    relaid.append(name)
  return out, relaid


def config_mismatch(workdir: str, step: int, abstract_items: dict,
                    config_file: str, skip: tuple = ()) -> Optional[str]:
  """The first array whose shape the workdir's config and checkpoint `step` disagree on
  (an edited width, depth or table size), as a one-line error; None when they agree
  or the checkpoint's metadata is unreadable."""
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
        return (f"--workdir={workdir!r}: {config_file} does not match checkpoint {step}: "
                f"{name}/{key} is {in_ckpt} in the checkpoint but {in_cfg} by "
                f"{config_file}; restore the config the run was trained with")
  return None


def _restore_step(workdir: str, step: int, abstract_items: dict) -> dict:
  """{name: tree} of the named TrainState fields at `step` (as
  the inference loaders read them, one step at a time)."""
  import orbax.checkpoint as ocp

  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or default,
                                     dtype=x.dtype), abstract_items)
  mngr = manager(workdir, async_saves=False, create=False)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_items, restore_args=restore_args, partial_restore=True)))
  finally:
    mngr.close()
  return {name: restored["state"][name] for name in abstract_items}


def root_cause_line(err: BaseException) -> str:
  """The first line of the root cause: the storage error (e.g. tensorstore's
  "OUT_OF_RANGE: Error reading ..."), not orbax's wrapper around it."""
  while err.__cause__ is not None:
    err = err.__cause__
  return (str(err).splitlines() or [type(err).__name__])[0][:200]


def restore_checkpoint(workdir: str, abstract_items: dict,
                       config_file: str = "model_config.json",
                       skip: tuple = ()) -> tuple[dict, int]:
  """({name: tree}, step) of the newest readable checkpoint, for inference.

  A config that does not fit the checkpoint is one ValueError line (checked on the
  metadata, before any array is read); skipping unreadable newer checkpoints is one
  warning line on stderr; the libraries' tracebacks of the failed attempts are kept
  off stderr (`quiet.quiet_library_logs`). A checkpoint of the segmented layer layout
  (engram_jax before the one scanned stack) is converted as it is read.
  """
  from engram_jax.models import lm

  import sys

  steps = sorted(saved_steps(workdir), reverse=True)
  if not steps:
    raise ValueError(f"--workdir={workdir!r} has no checkpoint "
                     f"({CHECKPOINT_DIR}/ is empty or missing); train first "
                     "with `python -m engram_jax.main`")
  unreadable = []
  with quiet.quiet_library_logs(log_path(workdir)):
    for step in steps:
      stored_items, relaid = _as_stored(abstract_items, _stored_tree(workdir, step))
      mismatch = config_mismatch(workdir, step, stored_items, config_file, skip)
      if mismatch:
        raise ValueError(mismatch)
      try:
        items = _restore_step(workdir, step, stored_items)
        items = {name: lm.relayout_like(tree, abstract_items[name]) if name in relaid
                 else tree for name, tree in items.items()}
        break
      except Exception as err:  # orbax/tensorstore raise many types for a torn save
        unreadable.append((step, root_cause_line(err)))
    else:
      raise ValueError(f"--workdir={workdir!r}: no readable checkpoint (" + "; ".join(
          f"step {s}: {why}" for s, why in unreadable) + ")")
  if unreadable:
    which = (f"checkpoint {unreadable[0][0]} is" if len(unreadable) == 1 else
             "checkpoints " + ", ".join(str(s) for s, _ in unreadable) + " are")
    print(f"warning: {which} unreadable ({unreadable[0][1]}); using checkpoint {step}",
          file=sys.stderr, flush=True)
  return items, step


def restore_params(workdir: str, abstract_params) -> tuple[Any, int]:
  """(params, step) of the newest readable checkpoint, for inference."""
  items, step = restore_checkpoint(workdir, {"params": abstract_params})
  return items["params"], step
