"""orbax checkpoints of a workdir: save layout, resume with fallback, inference loads.

A workdir's `checkpoints/STEP/` holds two items: `state` (the TrainState) and `data`
(the data iterator's JSON state). Resuming restores the newest readable step; a torn
or corrupt one is moved to `checkpoints_unreadable/` (never deleted) and the one
before it is used. Inference restores only `state.params`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax

from engram_jax import quiet

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
ITEMS = ("state", "data")
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


def save(mngr, step: int, state, data_state: dict) -> None:
  """Saves (asynchronously) the train state and the data iterator's state at `step`."""
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


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
  import orbax.checkpoint as ocp
  unreadable, errors = [], []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      with quiet.quiet_library_logs(log_path(os.path.dirname(str(mngr.directory)))):
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as err:  # orbax/tensorstore raise many types for a bad save
      unreadable.append(step)
      errors.append(first_line(err))
      continue
    # Only now, with an older step restored, are the newer ones known to be torn
    # (when none restores, the state layout differs: no fallback warnings then).
    for bad, error in zip(unreadable, errors):
      print(f"warning: checkpoint {bad} is unreadable ({error}); falling back to "
            f"checkpoint {step}", flush=True)
    return restored["state"], restored["data"], unreadable
  if unreadable:
    raise ValueError(
        f"--workdir: none of the checkpoints {sorted(unreadable)} in {mngr.directory} "
        f"restores ({errors[0]}); resume with the code and config that wrote them, "
        f"or use a new --workdir (details: {log_path(os.path.dirname(str(mngr.directory)))})")
  return None, None, unreadable


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
      errors.append(f"step {step}: {first_line(err)}")
  raise ValueError(f"--workdir={workdir!r}: no readable checkpoint ({'; '.join(errors)})")
