"""orbax checkpoints of a workdir: save layout, resume with fallback, inference loads.

A workdir's `checkpoints/STEP/` holds two items: `state` (the TrainState) and `data`
(the data iterator's JSON state). Resuming restores the newest readable step; a torn
or corrupt one is moved to `checkpoints_unreadable/` (never deleted) and the one
before it is used. Inference restores only `state.params`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
ITEMS = ("state", "data")


def manager(workdir: str, keep: int = 3, async_saves: bool = True, create: bool = True):
  """The workdir's CheckpointManager (keep-last-`keep` rotation, async saves)."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=async_saves)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options, item_names=ITEMS)


def save(mngr, step: int, state, data_state: dict) -> None:
  """Saves (asynchronously) the train state and the data iterator's state at `step`."""
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def _first_line(err: Exception) -> str:
  return (str(err).splitlines() or [type(err).__name__])[0][:200]


def restore_latest(mngr, abstract_state) -> tuple[Any, Any, list[int]]:
  """The newest readable checkpoint as (state, data_state, unreadable_steps).

  Falls back to older steps with a warning; (None, None, []) when there is none. When
  checkpoints exist but none restores, that is not a torn write but a different state
  layout (other code or config): a ValueError, rather than a silent restart from step 0.
  """
  unreadable, first_error = [], None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return (*_restore(mngr, step, abstract_state), unreadable)
    except Exception as err:  # orbax/tensorstore raise many types for a bad save
      logging.warning("checkpoint %d unreadable (%s)", step, _first_line(err))
      print(f"warning: checkpoint {step} is unreadable ({_first_line(err)}); falling back "
            "to an older one", flush=True)
      unreadable.append(step)
      first_error = first_error or _first_line(err)
  if unreadable:
    raise ValueError(
        f"--workdir: none of the checkpoints {sorted(unreadable)} in {mngr.directory} "
        f"restores ({first_error}); resume with the code and config that wrote them, "
        "or use a new --workdir")
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


def restore_params(workdir: str, abstract_params) -> tuple[Any, int]:
  """(params, step) of the newest readable checkpoint, for inference.

  `abstract_params` (ShapeDtypeStructs, optionally with shardings) says what to load;
  the optimizer state is not read. A workdir without a readable checkpoint is a
  ValueError naming `--workdir`.
  """
  variables, step = restore_state_items(workdir, {"params": abstract_params})
  return variables["params"], step


def restore_state_items(workdir: str, abstract_items: dict) -> tuple[dict, int]:
  """({name: tree}, step): the named TrainState fields (e.g. "params", "routing") of
  the newest readable checkpoint; nothing else is read."""
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  steps = []
  if os.path.isdir(directory):
    mngr = manager(workdir, async_saves=False, create=False)
    steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise ValueError(f"--workdir={workdir!r} has no checkpoint ({directory} is empty or "
                     "missing); train first with `python -m engram_jax.main`")
  item = dict(abstract_items)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None) or default,
                                     dtype=x.dtype), item)
  errors = []
  for step in steps:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                       partial_restore=True)))
      return {name: restored["state"][name] for name in item}, step
    except Exception as err:  # see restore_latest
      errors.append(f"step {step}: {_first_line(err)}")
  raise ValueError(f"--workdir={workdir!r}: no readable checkpoint ({'; '.join(errors)})")
