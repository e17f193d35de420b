"""Training loop: jit train step, periodic eval, orbax checkpoints, metrics (TensorBoard, jsonl).

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
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from engram_jax import config as config_lib
from engram_jax import workdir as workdir_lib
from engram_jax import (checkpoints, optim, param_groups, paths, quiet, run_config, tables,
                        tasks)
from engram_jax.data import fingerprint as fingerprint_lib
from engram_jax.layers import moe
from engram_jax.errors import TrainingError
from engram_jax.layers.engram import ROWS_COLLECTION
from engram_jax.tables import ROWS_KEY


@flax.struct.dataclass
class TrainState:
  """step, params, optimizer state and the MoE `routing` collection (loss-free
  balancing biases, updated by the step, not by the optimizer; `{}` without them).
  With row-sparse tables (`train.table_optimizer`, engram_jax.tables) `opt_state`
  covers the other params and `table_opt_state` the tables ({"block_L": state})."""
  step: jax.Array
  params: Any
  opt_state: Any
  routing: Any = flax.struct.field(default_factory=dict)
  table_opt_state: Any = flax.struct.field(default_factory=dict)


def init_train_state(tx, params, routing=None) -> TrainState:
  """The step-0 state of `params` for `tx` (optax, or `tables.SparseTx`)."""
  if isinstance(tx, tables.SparseTx):
    opt_state, table_opt_state = tx.init(params)
  else:
    opt_state, table_opt_state = tx.init(params), {}
  return TrainState(jnp.array(0, jnp.int32), params, opt_state, routing or {},
                    table_opt_state)


def state_variables(state: TrainState) -> dict:
  """The model variables of a train state: params, and routing biases if any."""
  return {"params": state.params, **({moe.BIAS: state.routing} if state.routing else {})}


def train_state_shardings(model: nn.Module, tx, seq_len: int, mesh):
  """`TrainState` of NamedShardings: params and optimizer moments by logical axes
  (row-sparse tables' state split by rows like its table)."""
  from engram_jax import sharding
  abstract = abstract_train_state(model, tx, seq_len)
  boxed = abstract.params
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = sharding.state_shardings(boxed, mesh)
  if isinstance(tx, tables.SparseTx):
    opt_state = sharding.opt_state_shardings(tx.dense, tables.split_tables(boxed, tx.paths)[0],
                                             mesh)
    table_opt_state = tables.table_state_shardings(tx, abstract.table_opt_state, params)
  else:
    opt_state, table_opt_state = sharding.opt_state_shardings(tx, boxed, mesh), {}
  return TrainState(replicated, params, opt_state,
                    jax.tree_util.tree_map(lambda _: replicated, abstract.routing),
                    table_opt_state)


def abstract_train_state(model: nn.Module, tx, seq_len: int):
  """`TrainState` of ShapeDtypeStructs, params still in their logical-axis boxes."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    state = init_train_state(tx, nn.unbox(variables["params"]),
                             nn.unbox(variables.get(moe.BIAS, {})))
    return state.replace(params=variables["params"])
  return jax.eval_shape(init, jax.random.key(0))


def _model_config(model: nn.Module):
  """The `ModelConfig` of an LM (or of an image model's backbone); None for others."""
  cfg = getattr(model, "cfg", None)
  return getattr(cfg, "model", cfg)


def _moe_config(model: nn.Module) -> config_lib.MoEConfig:
  """The MoE section of an LM's (or image model's) config; disabled for other models."""
  return getattr(_model_config(model), "moe", config_lib.MoEConfig())




def batch_rows(model: nn.Module, batch: dict):
  """The `engram_rows` collection of a batch whose rows the host gathered, else None."""
  if ROWS_KEY.format(0) not in batch:
    return None
  paths = tables.table_paths(_model_config(model).engram)
  return tables.rows_collection(paths, [batch[ROWS_KEY.format(i)] for i in range(len(paths))])


def routing_metrics(stats) -> dict[str, jax.Array]:
  """Routing statistics over every MoE layer of a sown `moe.STATS` collection.

  moe_max_violation: the worst layer's max(load) / mean(load) - 1; moe_mean_violation:
  its mean over layers; moe_dropped_fraction: mean over layers; moe_aux_loss: the sum
  (already times aux_loss_coef, 0 unless balance="aux_loss").
  """
  by_name = {}
  for path, value in traverse_util.flatten_dict(nn.unbox(stats)).items():
    values = value if isinstance(value, tuple) else (value,)
    by_name.setdefault(path[-1], []).extend(jnp.ravel(v) for v in values)
  if "max_violation" not in by_name:
    return {}
  violation = jnp.concatenate(by_name["max_violation"])
  return {"moe_max_violation": jnp.max(violation),
          "moe_mean_violation": jnp.mean(violation),
          "moe_dropped_fraction": jnp.mean(jnp.concatenate(by_name["dropped_fraction"])),
          "moe_aux_loss": moe.total_aux_loss(stats)}


def cross_entropy(logits_BxTxV, targets_BxT):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)


def model_inputs(batch: dict) -> dict:
  """Model keyword arguments from a data-pipeline batch (LM and image models alike)."""
  kwargs = {}
  if "ngram_tokens" in batch:
    kwargs["ngram_tokens_BxT"] = batch["ngram_tokens"]
  if "hash_ids" in batch:
    kwargs["hash_ids_BxTxLxH"] = batch["hash_ids"]
  return kwargs


def make_train_step(model: nn.Module, tx, state_shardings=None, host_tables: bool = False,
                    mesh=None):
  """The jitted, state-donating step; with `state_shardings` the state keeps its layout.

  The gradient is of cross-entropy plus the MoE aux losses sown by the model; `loss`
  in the metrics is the cross-entropy alone (comparable with dense models). With
  `moe.balance="bias"` the routing biases are updated from this step's expert loads.
  With `tx` a `tables.SparseTx` the tables' gradient is the rows the batch read
  (`tables.update`), else every param is differentiated and `tx` (optax) updates all.
  With `host_tables` the params hold no tables: the batch brings their rows
  (`ROWS_KEY`), and the metrics return the deduplicated row gradients as
  `table_rows` (replicated, for the host's update: engram_jax.host_tables).
  """
  moe_cfg = _moe_config(model)

  def train_step(state: TrainState, batch: dict):
    def loss_fn(params, engram_rows=None, **inputs):
      variables = {**state_variables(state), "params": params}
      if engram_rows is not None:
        variables[ROWS_COLLECTION] = engram_rows
      logits, sown = model.apply(variables, batch["inputs"], mutable=[moe.STATS], **inputs)
      stats = sown.get(moe.STATS, {})
      ce = cross_entropy(logits, batch["targets"]).mean()
      return ce + moe.total_aux_loss(stats), (ce, stats)
    extra = {}
    if host_tables:
      hash_ids = batch["hash_ids"]
      ids_L = tables.layer_row_ids(tx, hash_ids)
      rows_L = [batch[ROWS_KEY.format(i)] for i in range(len(ids_L))]
      ((total, (loss, stats)), params, opt_state, sparse_L, grad_norm,
       finite) = tables.row_gradients(
           tx, lambda p, rows: loss_fn(p, rows, hash_ids_BxTxLxH=hash_ids), state.params,
           state.opt_state, rows_L, ids_L)
      table_opt_state, extra = {}, {"table_rows": sparse_L}
    elif isinstance(tx, tables.SparseTx):
      hash_ids = model.apply({}, batch["inputs"], method="engram_hash_ids",
                             **model_inputs(batch))
      ((total, (loss, stats)), params, opt_state, table_opt_state, grad_norm,
       finite) = tables.update(
           tx, lambda p, rows: loss_fn(p, rows, hash_ids_BxTxLxH=hash_ids), state.params,
           state.opt_state, state.table_opt_state, state.step, hash_ids)
    else:
      (total, (loss, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, **model_inputs(batch))
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params, table_opt_state = optax.apply_updates(state.params, updates), {}
      grad_norm = optax.tree.norm(grads)
      finite = jax.tree_util.tree_reduce(lambda ok, x: ok & jnp.all(jnp.isfinite(x)),
                                         params, True)
    routing = state.routing
    if moe_cfg.enabled and moe_cfg.balance == "bias":
      routing = moe.update_routing_biases(routing, stats, moe_cfg.bias_rate)
    new = TrainState(state.step + 1, params, opt_state, routing, table_opt_state)
    return new, {"loss": loss, "grad_norm": grad_norm,
                 "finite": finite & jnp.isfinite(total), **routing_metrics(stats), **extra}
  if state_shardings is None:
    return jax.jit(train_step, donate_argnums=0)
  metrics_sharding = None
  if host_tables and mesh is not None:  # every process applies the same row updates
    metrics_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step, donate_argnums=0,
                 out_shardings=(state_shardings, metrics_sharding))


def make_eval_step(model: nn.Module):
  """Summed NLL, token and byte counts of a batch; `params` may be a variables dict
  (`state_variables`: params and MoE routing biases)."""
  from engram_jax.models.lm import as_variables

  @jax.jit
  def eval_step(params, batch, byte_lengths_V):
    variables = as_variables(params)
    rows = batch_rows(model, batch)
    if rows is not None:  # host tables: the batch brings its rows
      variables[ROWS_COLLECTION] = rows
    logits = model.apply(variables, batch["inputs"], **model_inputs(batch))
    nll = cross_entropy(logits, batch["targets"])
    nbytes = 0 if byte_lengths_V is None else byte_lengths_V[batch["targets"]].sum()
    return nll.sum(), nll.size, nbytes
  return eval_step


def evaluate(eval_step, params, batches, byte_lengths_V=None) -> dict[str, float]:
  """Loss (nats/token), perplexity, and bits per UTF-8 byte (text: `byte_lengths_V`
  given) or bits per token (image codes) over the validation batches."""
  nll, tokens, nbytes = 0.0, 0, 0
  for batch in batches:
    n, t, b = eval_step(params, batch, byte_lengths_V)
    nll, tokens, nbytes = nll + float(n), tokens + int(t), nbytes + int(b)
  loss = nll / tokens
  metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
  if byte_lengths_V is None:
    metrics["eval_bits_per_token"] = loss / math.log(2)
  else:
    metrics["eval_bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
  return metrics


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
  fingerprint = tasks.data_fingerprint(run)  # a source matching nothing fails here
  created = paths.is_local(workdir) and not os.path.exists(workdir)
  workdir_lib.ensure_writable(workdir)
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    if lock is not None:
      lock.acquire()
      if lock.stale_note():
        print(lock.stale_note(), flush=True)
    workdir_lib.check_resumable(run.train, workdir)
    task = _process_zero_first(lambda: tasks.build(run, workdir), "tokenizer and data")
    schedule, tx = optim.from_train_config(run.train, task.model_cfg.engram)
    mesh = sharding.mesh_from_config(run.mesh)
    with (sharding.use_mesh(mesh), checkpoints.run_log(workdir) as log,
          quiet.library_logs_to(log)):
      return _train_loop(config, run, workdir, task, tx, schedule, mesh, fingerprint,
                         accept_data_change)
  except BaseException:
    if created and lock is not None:
      lock.release()
      workdir_lib.remove_if_only_lock(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


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
  full_sh = train_state_shardings(model, tx, seq_len, mesh)
  state_sh = host_tables.drop_tables(full_sh, tx) if host else full_sh
  batch_sh = sharding.batch_sharding(mesh, batch_size=run.data.batch_size)

  def init_state(rng):
    variables = nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32)))
    return init_train_state(tx, variables["params"], variables.get(moe.BIAS, {}))

  rng = jax.random.key(run.seed)
  manager = checkpoints.manager(workdir, t.keep_checkpoints)
  full_abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_state, rng), full_sh)
  # The checkpoint's tables may live elsewhere than this run's (a switch of
  # engram.placement between device and host): restore its layout, then move them.
  saved_host = bool(engram.layers) and workdir_lib.saved_placement(workdir) == "host"
  restore_abstract = (host_tables.drop_tables(full_abstract, tx) if saved_host
                      else full_abstract)
  try:
    state, data_state, unreadable = workdir_lib.restore_or_explain(
        manager, restore_abstract, workdir, task.model_cfg)
    store = None
    if state is not None and (host or saved_host):
      state, store = host_tables.place_restored(
          state, manager, full_abstract, tx, task.model_cfg, saved_host, host, full_sh,
          state_sh)
  except BaseException:
    manager.close()
    raise
  if unreadable:
    manager.close()
    checkpoints.quarantine_steps(workdir, unreadable)
    manager = checkpoints.manager(workdir, t.keep_checkpoints)
  if state is None and host:  # init in host memory: the tables never reach a device
    with jax.default_device(jax.devices("cpu")[0]):
      full = jax.jit(init_state)(rng)
    _, store = host_tables.HostTableStore.from_params(task.model_cfg, full.params, tx.table,
                                                      full.table_opt_state)
    state = jax.device_put(host_tables.drop_tables(full, tx), state_sh)
    del full
  elif state is None:
    state = jax.jit(init_state, out_shardings=state_sh)(rng)
  else:
    own = dict(checkpoints.own_data_state(data_state))
    fingerprint_lib.check_resume(own.pop("fingerprint", None), fingerprint,
                                 accept_data_change, int(state.step))
    train_iter.set_state(own)
  start = int(state.step)
  # The restore succeeded (or there was nothing to restore): now the run's metadata
  # may describe this config, and the metrics log drops what the last run logged
  # after its last checkpoint (and a line torn by a kill).
  workdir_lib.write_run_metadata(workdir, config, task.model_cfg)
  metrics_path = paths.join(workdir, writers.METRICS_FILE)
  if pidx == 0:
    writers.repair_metrics(metrics_path, start)

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
  if start >= t.steps:
    say(f"run complete: the checkpoint is at step {start} and train.steps={t.steps}; "
        f"to train further, raise it (e.g. --config.train.steps={2 * t.steps})")
    manager.close()
    writer.close()
    train_iter.close()
    if store is not None:
      store.close()
    return {}
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
  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  train_step = make_train_step(model, tx, state_sh, host_tables=host, mesh=mesh)
  eval_step = make_eval_step(model)
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
    data = {**position, "fingerprint": fingerprint}
    if feed is not None:
      feed.wait()  # the saved tables include this step's update
    try:
      checkpoints.save(manager, step, state, checkpoints.gather_data_states(data),
                       host_tables=None if store is None else store.state_dict())
    except Exception as err:  # noqa: BLE001  the previous async save's failure
      raise checkpoints.save_failed(err, workdir, manager) from None

  metrics, eval_step_number, failed = {}, None, False
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
        break
  except BaseException:
    failed = True
    raise
  finally:
    try:
      checkpoints.finish_saves(manager, workdir)
    except TrainingError:
      if not failed:  # else the error already on its way is the one to report
        raise
    manager.close()
    try:
      writer.close()  # a remote workdir: the events and metrics.jsonl's last lines
      jsonl.close()
    except OSError:
      if not failed:
        raise
    if feed is not None:
      try:
        feed.close()
      except TrainingError:
        if not failed:
          raise
    train_iter.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
  if store is not None and store.nbytes <= 2**30:  # replicas agree (several processes)
    print(f"host tables of process {pidx}: sha256 {store.digest()}", flush=True)
  if metrics:
    label = (f"step {int(state.step)}" if eval_step_number == int(state.step) else
             f"step {int(state.step)} (last eval at step {eval_step_number})")
    print(f"final: {label} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
          flush=True)
  return metrics
