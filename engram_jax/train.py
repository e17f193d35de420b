"""Training loop: the jitted steps (`train_steps.py`) over a workdir, periodic eval, orbax
checkpoints, metrics (TensorBoard, jsonl).

`train_and_evaluate(config, workdir)` trains the config's task (`engram_jax.tasks`: the
LM on text, or the class-conditional image model on codes) on the config's mesh and
resumes from the latest good checkpoint in `workdir` (params, optimizer state, step and
the data iterator's state), so N steps, a stop and N more equal 2N steps in one run.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading

import jax
import jax.numpy as jnp

from engram_jax import workdir as workdir_lib
from engram_jax import (checkpoints, library_log, optim, param_groups, paths, quiet,
                        run_config, state_digest, tasks)
from engram_jax.data import fingerprint as fingerprint_lib
from engram_jax.errors import RunStopped, TrainingError
from engram_jax.train_steps import evaluate, run_programs, state_variables


def train_and_evaluate(config, workdir: str, accept_data_change: bool = False
                       ) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final eval metrics.

  `config` (an `ml_collections.ConfigDict`) becomes a validated `run_config.RunConfig`
  first, before any work; only its sections travel down (the ConfigDict itself is
  written to the workdir's config.json). Holds the workdir's lock for the whole run
  (one trainer per workdir). `accept_data_change` resumes even when the data source
  changed since the checkpoint (the batches then differ from an uninterrupted run's).
  """
  from engram_jax import sharding, workdir_lock
  run = run_config.from_config(config)  # validate every field before any work
  mesh = sharding.mesh_from_config(run.mesh)  # sizes checked against the devices here
  fingerprint = tasks.data_fingerprint(run)  # a source matching nothing fails here
  created = paths.is_local(workdir) and not os.path.exists(workdir)
  workdir_lib.ensure_writable(workdir)
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    if lock is not None:
      lock.acquire()
      if lock.stale_note():
        print(lock.stale_note(), flush=True)
    workdir_lib.check_resumable(run, workdir)
    task = _process_zero_first(lambda: tasks.build(run, workdir), "tokenizer and data")
    schedule, tx = optim.from_train_config(run.train, task.model_cfg.engram)
    with (sharding.use_mesh(mesh), library_log.run_log(workdir) as log,
          quiet.library_logs_to(log)):
      return _train_loop(config, run, workdir, task, tx, schedule, mesh, fingerprint,
                         accept_data_change)
  except BaseException:
    if created and lock is not None:  # only if this run holds the lock (it may not)
      workdir_lib.remove_if_only_lock(workdir, lock)
    raise
  finally:
    if lock is not None:
      lock.release()


def _close_run(failed: bool, workdir: str, manager, writers_, feed, train_iter,
               signal_handlers: dict) -> None:
  """Ends a run's loop: waits for the saves in flight, closes the checkpoint manager,
  the metric writers, the host-table feed and the data iterator, and puts the signal
  handlers back, every step whatever the others raise. The first error is raised at
  the end unless the run `failed` already (its error is the one to report); a failed
  save (the final one too: it fails after the loop) is `save_failed`'s one line."""
  first: list[BaseException] = []

  def attempt(close, convert=None):
    try:
      close()
    except Exception as err:  # noqa: BLE001  kept, raised after every step has run
      first.append(convert(err) if convert else err)
  attempt(lambda: checkpoints.finish_saves(manager, workdir))
  saves_failed = failed or bool(first)
  attempt(manager.close, lambda err: checkpoints.save_failed(err, workdir))
  if saves_failed:  # orbax's threads end, and log, while the run's log still gets it
    checkpoints.join_save_threads()
  for writer in writers_:  # a remote workdir: the events and metrics.jsonl's last lines
    attempt(writer.close)
  if feed is not None:
    attempt(feed.close)
  attempt(train_iter.close)
  for s, handler in signal_handlers.items():
    signal.signal(s, handler)
  if first and not failed:
    raise first[0]


def _process_zero_first(fn, what: str):
  """`fn()` on process 0, then on the others: they load what process 0 wrote to the
  (shared) workdir, e.g. a tokenizer it trained, instead of racing to make their own."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"engram_jax: {what} ready")
  return fn() if result is None else result


def _global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows as one global array per key, laid out over the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in batch.items()}


def _restore_newest(manager, abstract, workdir, model_cfg, place):
  """(state, data_state, HostTableStore or None, unreadable steps) of the newest
  checkpoint whose state and, through `place` (None: none kept), host tables read
  back; (None, None, None, []) for a new run. A step whose host tables do not read
  back is passed over like a torn state, and nothing is moved aside until an older
  step has restored: with none, one ValueError line."""
  unreadable, passed_over = [], []
  while True:
    state, data_state, torn = workdir_lib.restore_or_explain(manager, abstract, workdir,
                                                             model_cfg, exclude=unreadable)
    unreadable += torn
    if state is None and passed_over:
      raise ValueError(f"--workdir={workdir!r}: {passed_over[0][1]}, and no older "
                       "checkpoint restores; move the checkpoints aside to start over, "
                       "or use a new --workdir")
    if state is None or place is None:
      return state, data_state, None, unreadable
    step = int(state.step)
    try:
      state, store = place(state)
    except ValueError as err:  # host tables that do not read back, or do not fit
      differing = workdir_lib.model_config_differences(workdir, model_cfg)
      if differing:  # another table shape, not damage: nothing is passed over
        raise ValueError(f"--workdir={workdir!r} was trained with another model config "
                         f"({'; '.join(differing)}): {err}; resume with the workdir's "
                         "config (see its config.json) or use a new --workdir") from None
      if not isinstance(err, checkpoints.CorruptCheckpoint):
        raise
      unreadable.append(step)
      passed_over.append((step, str(err)))
      continue
    for _, why in passed_over:
      print(f"warning: {why}; falling back to checkpoint {step}", flush=True)
    return state, data_state, store, unreadable


def _train_loop(config, run: run_config.RunConfig, workdir, task: tasks.Task, tx, schedule,
                mesh, fingerprint, accept_data_change):
  """The run of `train_and_evaluate`; `config` (the ConfigDict) is only written to the
  workdir's config.json, `run` says everything else."""
  from clu import parameter_overview

  from engram_jax import host_tables, sharding, writers
  t = run.train
  model, seq_len, train_iter = task.model, task.seq_len, task.train_iter
  byte_lengths = None if task.byte_lengths_V is None else jnp.asarray(task.byte_lengths_V)
  pidx = jax.process_index()
  engram = task.model_cfg.engram
  host = engram.placement == "host" and bool(engram.layers)
  programs = run_programs(model, tx, seq_len, mesh, host)
  full_sh, state_sh, full_abstract = (programs.full_shardings, programs.state_shardings,
                                      programs.full_abstract)
  batch_sh = sharding.batch_sharding(mesh, batch_size=run.data.batch_size)
  rng = jax.random.key(run.seed)
  manager = checkpoints.manager(workdir, t.keep_checkpoints)
  # The checkpoint's tables may live elsewhere than this run's (a switch of
  # engram.placement between device and host): restore its layout, then move them.
  saved_host = bool(engram.layers) and workdir_lib.host_trained(workdir)
  restore_abstract = (host_tables.drop_tables(full_abstract, tx) if saved_host
                      else full_abstract)
  place = None
  if host or saved_host:
    place = lambda state: host_tables.place_restored(
        state, manager, full_abstract, tx, task.model_cfg, saved_host, host, full_sh,
        state_sh)
  try:
    state, data_state, store, unreadable = _restore_newest(
        manager, restore_abstract, workdir, task.model_cfg, place)
  except BaseException:
    manager.close()
    raise
  if unreadable:
    manager.close()
    checkpoints.quarantine_steps(workdir, unreadable)
    manager = checkpoints.manager(workdir, t.keep_checkpoints)
  if state is None and host:  # init in host memory: the tables never reach a device
    with jax.default_device(jax.devices("cpu")[0]):
      full = programs.init_unplaced(rng)
    _, store = host_tables.HostTableStore.from_params(task.model_cfg, full.params, tx.table,
                                                      full.table_opt_state)
    state = jax.device_put(host_tables.drop_tables(full, tx), state_sh)
    del full
  elif state is None:
    state = programs.init(rng)
  else:
    own = dict(checkpoints.own_data_state(data_state))
    for key in (checkpoints.DIGEST_KEY, checkpoints.HOST_DIGEST_KEY):
      own.pop(key, None)  # checked by the restore
    fingerprint_lib.check_resume(own.pop("fingerprint", None), fingerprint,
                                 accept_data_change, int(state.step))
    train_iter.set_state(own)
  start = int(state.step)
  if start >= t.steps:  # nothing to do: the workdir is left as it was
    if pidx == 0:
      print(f"run complete: the checkpoint is at step {start} and train.steps={t.steps}; "
            f"to train further, raise it (e.g. --config.train.steps={2 * start})",
            flush=True)
    if not paths.exists(paths.join(workdir, workdir_lib.CONFIG_FILE)):  # moved aside
      workdir_lib.write_run_metadata(workdir, config, task.model_cfg)
      if pidx == 0:
        print(f"{workdir_lib.CONFIG_FILE} was missing: written from this command's "
              "config (its model restored the checkpoint; its other fields are this "
              "command's, not necessarily those the run trained with)", flush=True)
    manager.close()
    train_iter.close()
    if store is not None:
      store.close()
    return writers.logged_eval(paths.join(workdir, writers.METRICS_FILE), start)
  # The restore succeeded (or there was nothing to restore): now the run's metadata
  # may describe this config, and the metrics log and TensorBoard files drop what the
  # last run logged after its last checkpoint (and a record torn by a kill).
  workdir_lib.write_run_metadata(workdir, config, task.model_cfg)
  metrics_path = paths.join(workdir, writers.METRICS_FILE)
  if pidx == 0:
    writers.repair_metrics(metrics_path, start)
    writers.repair_events(workdir, start)

  writer = writers.TensorBoardWriter(workdir)
  jsonl = writers.JsonlWriter(metrics_path)
  def write(step, scalars, tensorboard_only=None):
    logging.info("step %d: %s", step, scalars)
    writer.write(step, {**scalars, **(tensorboard_only or {})})
    jsonl.write(step, scalars)

  overview = param_groups.parameter_overview(state.params)
  if store is not None:
    overview["engram_tables"] = sum(t.size for t in store.tables_L)
    overview["total"] += overview["engram_tables"]
  logging.info("parameters: %s", overview)
  logging.info("parameter shapes:\n%s",  # clu's table; its writers would load TensorFlow
               parameter_overview.get_parameter_overview(state.params, include_stats=False))
  say = (lambda text: print(text, flush=True)) if pidx == 0 else (lambda text: None)
  say("parameters: " + ", ".join(f"{k} {v:,}" for k, v in overview.items()))
  table_arrays = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
                  if param_groups.group(path) == "engram_tables"]
  if table_arrays:  # on the devices; host tables are in the overview
    say(sharding.describe_table_placement(table_arrays))
  feed = None
  if store is not None:
    say(f"Engram tables in host memory: {store.nbytes / 2**20:,.1f} MiB with their "
        f"optimizer state ({t.host_tables_mode} updates)")
    feed = host_tables.HostFeed(store, train_iter, t.host_tables_mode, tx.table_lr)
  if start:  # every process: each keeps its own log (launch/multiprocess_cpu.sh)
    print(f"resumed from step {start}", flush=True)

  stop_requested = []
  def on_signal(signum, _frame):
    stop_requested.append(signum)
  previous = {}  # Python delivers signals to the main thread only: a run trained in
  if threading.current_thread() is threading.main_thread():  # another has no handler
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  train_step, eval_step = programs.train_step, programs.eval_step
  eval_batches = [_global_batch(b, batch_sh) for b in task.eval_batches] if not host else []

  def eval_now():
    batches = eval_batches
    if host:  # rows from the tables as they are now
      feed.wait()
      batches = [_global_batch(feed.with_rows(b), batch_sh) for b in task.eval_batches]
    return evaluate(eval_step, state_variables(state), batches, byte_lengths)
  console = writers.ConsoleProgress(start, t.steps)

  def save(step):
    position = feed.iterator_state() if feed is not None else train_iter.get_state()
    data = {**position, "fingerprint": fingerprint,
            checkpoints.DIGEST_KEY: state_digest.digest(state)}
    if feed is not None:
      feed.wait()  # the saved tables include this step's update
      data[checkpoints.HOST_DIGEST_KEY] = state_digest.digest(store.state_dict())
    try:
      checkpoints.save(manager, step, state, checkpoints.gather_data_states(data),
                       host_tables=None if store is None else store.state_dict())
    except Exception as err:  # noqa: BLE001  the previous async save's failure
      raise checkpoints.save_failed(err, workdir, manager) from None

  metrics, eval_step_number, failed, stopped_by = {}, None, False, None
  try:
    for step in range(start + 1, t.steps + 1):
      batch = _global_batch(feed.next_batch() if feed else next(train_iter), batch_sh)
      new_state, step_metrics = train_step(state, batch)
      if feed is not None:
        feed.gather_ahead()  # overlap: the next batch's rows while the device computes
        feed.apply(step_metrics.pop("table_rows"), step)
      loss = float(step_metrics["loss"])
      if not bool(step_metrics["finite"]):
        what = f"loss {loss}" if not math.isfinite(loss) else "parameters after the update"
        raise TrainingError(f"non-finite {what} at step {step}; this state is not saved and "
                            "the last good checkpoint is kept (lower train.learning_rate?)")
      state = new_state
      if step % t.log_every == 0 or step == t.steps:
        write(step, {"train_loss": loss, "grad_norm": float(step_metrics["grad_norm"]),
                     "learning_rate": float(schedule(step)),
                     **{k: float(v) for k, v in step_metrics.items()
                        if k.startswith("moe_")}},
              tensorboard_only={"steps_per_sec": console.steps_per_second(step)})
        console.report(step, loss)
      if step % t.eval_every == 0 or step == t.steps:
        metrics, eval_step_number = eval_now(), step
        write(step, metrics)
        say(writers.format_eval(step, metrics))
      # One read of the signal flag per step, so that the save and the stop agree
      # (a signal arriving later is seen at the next step).
      stop = bool(stop_requested)
      budget_spent = bool(t.stop_after_steps) and step - start >= t.stop_after_steps
      if step % t.checkpoint_every == 0 or step == t.steps or stop or budget_spent:
        save(step)
      if (stop or budget_spent) and step < t.steps:
        checkpoints.finish_saves(manager, workdir)
        print(f"stopped at step {step}; checkpoint saved", flush=True)
        stopped_by = stop_requested[0] if stop else None
        break
  except BaseException:
    failed = True
    raise
  finally:
    _close_run(failed, workdir, manager, (writer, jsonl), feed, train_iter, previous)
  if stopped_by is not None:  # not finished: callers must not take it for done
    raise RunStopped(int(state.step), stopped_by)
  if store is not None and store.nbytes <= 2**30:  # replicas agree (several processes)
    print(f"host tables of process {pidx}: sha256 {store.digest()}", flush=True)
  if metrics:
    label = (f"step {int(state.step)}" if eval_step_number == int(state.step) else
             f"step {int(state.step)} (last eval at step {eval_step_number})")
    print(f"final: {label} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
          flush=True)
  return metrics
