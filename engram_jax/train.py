"""Training loop: jit train step, periodic eval, orbax checkpoints, clu metrics.

`train_and_evaluate(config, workdir)` trains the config's task (`engram_jax.tasks`: the
LM on text, or the class-conditional image model on codes) on the config's mesh and
resumes from the latest good checkpoint in `workdir` (params, optimizer state, step and
the data iterator's state), so N steps, a stop and N more equal 2N steps in one run.
"""
from __future__ import annotations

import json
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
from engram_jax import checkpoints, optim, quiet, run_config, tables, tasks
from engram_jax.layers import moe
from engram_jax.layers.engram import ROWS_COLLECTION


class TrainingError(RuntimeError):
  """A run that must stop (non-finite loss or parameters); the message names the step."""


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


def _model_config(model: nn.Module):
  """The `ModelConfig` of an LM (or of an image model's backbone); None for others."""
  cfg = getattr(model, "cfg", None)
  return getattr(cfg, "model", cfg)


def _moe_config(model: nn.Module) -> config_lib.MoEConfig:
  """The MoE section of an LM's (or image model's) config; disabled for other models."""
  return getattr(_model_config(model), "moe", config_lib.MoEConfig())


ROWS_KEY = "engram_rows_{}"  # a batch's host-gathered rows of Engram layer i


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


def overview_group(path, leaf) -> str:
  """embeddings | engram_tables | routed_experts | shared_experts | backbone.

  routed_experts: the expert kernels of MoE layers (`moe/{gate,up,down}`; the router
  is backbone); shared_experts: `moe/shared/...`; backbone: everything else.
  """
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  if optim.param_group(path, leaf) == "table":
    return "engram_tables"
  if names[0] in ("embed", "unembed"):
    return "embeddings"
  if "moe" in names:
    below = names[names.index("moe") + 1:]
    if below[:1] == ["shared"]:
      return "shared_experts"
    if below in (["gate"], ["up"], ["down"]):
      return "routed_experts"
  return "backbone"


def parameter_overview(params) -> dict[str, int]:
  """Counts split into embeddings, Engram tables, MoE experts and the rest."""
  counts = {"embeddings": 0, "engram_tables": 0, "backbone": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    group = overview_group(path, leaf)
    counts[group] = counts.get(group, 0) + leaf.size
  counts["total"] = sum(counts.values())
  return counts


def table_optimizer(config) -> str:
  """`train.table_optimizer`, validated ("adam" for configs that predate it)."""
  return tables.validate_optimizer(config.train.get("table_optimizer", "adam"))


def optimizer_from_config(config, model_cfg: config_lib.ModelConfig):
  """(schedule, tx) of `config.train`: AdamW + warmup-cosine with the table group.

  tx is optax's (tables in Adam's table group) for `train.table_optimizer="adam"` or
  a model without Engram, else a `tables.SparseTx` (row-sparse tables).
  """
  t = config.train
  schedule = optim.warmup_cosine(t.learning_rate, t.warmup_steps, t.steps)
  name, engram = table_optimizer(config), model_cfg.engram
  sparse = name != "adam" and bool(engram.layers)
  tx = optim.make_optimizer(schedule, weight_decay=t.weight_decay,
                            table_lr_multiplier=t.table_lr_multiplier,
                            table_trainable=engram.table_trainable and not sparse,
                            grad_clip=0.0 if sparse else t.grad_clip)
  if sparse:
    tx = tables.SparseTx(
        name, engram, tx, tables.make_optimizer(name) if engram.table_trainable else None,
        lambda step: schedule(step) * t.table_lr_multiplier, t.grad_clip)
  return schedule, tx


def mesh_from_config(config, abstract: bool = False):
  """The device mesh of `config.mesh` (all devices, or the first `num_devices`).

  `abstract=True` gives a device-free `AbstractMesh` of `num_devices` devices, so a
  dry run can size a pod-scale mesh on a laptop.
  """
  from engram_jax import sharding
  m = dict(config.get("mesh", {}))
  count = int(m.pop("num_devices", 0) or 0)
  mesh_cfg = sharding.MeshConfig(**m)
  if abstract:
    count = count or jax.device_count()
    return jax.sharding.AbstractMesh(
        mesh_cfg.shape(count), sharding.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
  if count > jax.device_count():
    raise ValueError(f"mesh.num_devices={count} but only {jax.device_count()} devices "
                     "are visible; lower it (0 = all devices)")
  return sharding.make_mesh(mesh_cfg, jax.devices()[:count] if count else None)


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


def _tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def dry_run_report(config) -> str:
  """Parameter counts by group and bytes of the train state, from shapes alone."""
  from engram_jax import sharding
  task = tasks.abstract(config, check_data=False)
  model, model_cfg, seq_len = task.model, task.model_cfg, task.seq_len
  _, tx = optimizer_from_config(config, model_cfg)
  mesh = mesh_from_config(config, abstract=True)
  with jax.sharding.use_abstract_mesh(mesh):  # psum/all_to_all lookups trace on a mesh
    state = abstract_train_state(model, tx, seq_len)
    shardings = train_state_shardings(model, tx, seq_len, mesh)
  params = nn.unbox(state.params)
  counts = parameter_overview(params)
  by_group = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves(shardings.params)):
    by_group.setdefault(overview_group(path, leaf), []).append((leaf, sh))
  group_bytes = lambda group: sharding.bytes_per_device(
      [t for t, _ in by_group.get(group, [])], [s for _, s in by_group.get(group, [])])
  gib = lambda n: f"{n / 2**30:.3f} GiB"
  mesh_text = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  m = model_cfg.moe
  lines = [f"{task.kind} model: width {model_cfg.width}, depth {model_cfg.depth}, vocab "
           f"{model_cfg.vocab_size}, Engram layers {list(model_cfg.engram.layers)}, "
           f"lookup {model_cfg.engram.lookup!r}"]
  if m.enabled:
    lines.append(f"  MoE: {m.num_experts} routed experts (top {m.top_k}, width "
                 f"{m.expert_dim}) + {m.num_shared} shared (width {m.resolved_shared_dim}) "
                 f"from layer {m.first_dense_layers}; branches {model_cfg.branches}")
  lines += [f"  {k:<14} {v:>18,} params" for k, v in counts.items()]
  opt_trees = (state.opt_state, state.table_opt_state)
  opt_shardings = (shardings.opt_state, shardings.table_opt_state)
  lines.append(f"  total bytes: params {gib(_tree_bytes(params))}, optimizer state "
               f"{gib(_tree_bytes(opt_trees))} (train.table_optimizer "
               f"{table_optimizer(config)!r})")
  lines.append(f"mesh {mesh_text} ({mesh.size} devices), bytes per device:")
  parts = [f"Engram tables {gib(group_bytes('engram_tables'))}"]
  if m.enabled:
    parts.append(f"routed experts {gib(group_bytes('routed_experts'))}")
  table_state = sharding.bytes_per_device(
      (_table_leaves(state.opt_state), state.table_opt_state),
      (_table_leaves(shardings.opt_state), shardings.table_opt_state))
  lines.append(f"  params {gib(sharding.bytes_per_device(params, shardings.params))} "
               f"({', '.join(parts)}), optimizer state "
               f"{gib(sharding.bytes_per_device(opt_trees, opt_shardings))} (Engram "
               f"tables {gib(table_state)})")
  if model_cfg.engram.placement == "host" and model_cfg.engram.layers:
    host_bytes = _tree_bytes([leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        params) if overview_group(path, leaf) == "engram_tables"]) + _tree_bytes(
            state.table_opt_state)
    lines.append(f"engram.placement='host': the Engram tables and their optimizer state "
                 f"live in host RAM instead, {gib(host_bytes)} on every host (a full "
                 "replica per process); subtract them from the per-device figures above")
  return "\n".join(lines)


def _table_leaves(opt_state) -> list:
  """The leaves of a dense optimizer state that belong to Engram tables (Adam's m, v)."""
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if optim.param_group(path, leaf) == "table"]


def ensure_writable_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable before any work that would be lost."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as err:
    raise ValueError(f"--workdir={workdir!r} is not a writable directory "
                     f"({err.strerror or type(err).__name__}); choose another "
                     "--workdir") from None
  for name in (checkpoints.CHECKPOINT_DIR, checkpoints.UNREADABLE_DIR):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"--workdir={workdir!r}: {path} is a file, where the run keeps its "
                       "checkpoints; move it away or choose another --workdir")


def _atomic_write_text(path: str, text: str) -> None:
  from engram_jax import tokenizer
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  tokenizer.atomic_write(path, write)


def config_json(config) -> str:
  return (config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort")
          else json.dumps(dict(config), indent=1))


def write_run_metadata(workdir: str, config, model_cfg: config_lib.ModelConfig) -> None:
  """`config.json` and `model_config.json`, atomically; called only once the run's
  checkpoint restored (or there was none), so a failed resume never rewrites them."""
  if jax.process_index() != 0:
    return
  _atomic_write_text(os.path.join(workdir, "config.json"), config_json(config))
  _atomic_write_text(os.path.join(workdir, "model_config.json"),
                     json.dumps(config_lib.to_dict(model_cfg), indent=1))


def saved_model_config(workdir: str) -> dict:
  """The workdir's `model_config.json` as a dict ({} when it has none or it is torn)."""
  try:
    with open(os.path.join(workdir, "model_config.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def model_config_differences(workdir: str, model_cfg: config_lib.ModelConfig) -> list[str]:
  """`model.FIELD: saved -> now` for each field that differs from the workdir's
  `model_config.json` (none when the workdir has none)."""
  from engram_jax.data import fingerprint
  saved = saved_model_config(workdir)
  if not saved:
    return []
  now = json.loads(json.dumps(config_lib.to_dict(model_cfg)))  # tuples -> lists
  flat = lambda tree: {f"model.{k}": v for k, v in
                       traverse_util.flatten_dict(tree, sep=".").items()}
  return fingerprint.differences(flat(saved), flat(now))


def train_and_evaluate(config, workdir: str, accept_data_change: bool = False
                       ) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final eval metrics.

  Holds the workdir's lock for the whole run (one trainer per workdir).
  `accept_data_change` resumes even when the data source changed since the checkpoint
  (the batches then differ from an uninterrupted run's).
  """
  from engram_jax import sharding, workdir_lock
  checked = tasks.abstract(config)  # validate every field before any work
  run_config.validate_placement(checked.model_cfg.engram, table_optimizer(config))
  fingerprint = tasks.data_fingerprint(config)  # a source matching nothing fails here
  created = not os.path.exists(workdir)
  ensure_writable_workdir(workdir)
  lock = workdir_lock.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    if lock is not None:
      lock.acquire()
      if lock.stale_note():
        print(lock.stale_note(), flush=True)
    check_resumable(config, workdir)
    task = _process_zero_first(lambda: tasks.build(config, workdir), "tokenizer and data")
    schedule, tx = optimizer_from_config(config, task.model_cfg)
    mesh = mesh_from_config(config)
    with sharding.use_mesh(mesh), quiet.library_logs_to(checkpoints.log_path(workdir)):
      return _train_loop(config, workdir, task, tx, schedule, mesh, fingerprint,
                         accept_data_change)
  except BaseException:
    if created and lock is not None:
      lock.release()
      _remove_if_only_lock(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


def _remove_if_only_lock(workdir: str) -> None:
  """A workdir this run created (the caller checks) and left holding nothing but its
  own lock file goes; anything else in it stays (`rmdir` refuses a non-empty one)."""
  from engram_jax import workdir_lock
  try:
    if os.listdir(workdir) == [workdir_lock.LOCK_FILE]:
      os.remove(os.path.join(workdir, workdir_lock.LOCK_FILE))
    os.rmdir(workdir)
  except OSError:  # not empty, or already gone: leave it as it is
    pass


def check_resumable(config, workdir: str) -> None:
  """A workdir with checkpoints resumes only with the table optimizer that wrote them
  (their state layouts differ); read from its config.json before it is rewritten."""
  saved, ckpts = (os.path.join(workdir, name) for name in ("config.json",
                                                          checkpoints.CHECKPOINT_DIR))
  if not (os.path.exists(saved) and os.path.isdir(ckpts)
          and any(name.isdigit() for name in os.listdir(ckpts))):
    return
  with open(saved, encoding="utf-8") as f:
    before = json.load(f).get("train", {}).get("table_optimizer", "adam")
  now = table_optimizer(config)
  if before != now:
    raise ValueError(f"train.table_optimizer={now!r} but the checkpoints in --workdir="
                     f"{workdir!r} were trained with {before!r}; resume with "
                     f"--config.train.table_optimizer={before} or use a new --workdir")


def _process_zero_first(fn, what: str):
  """`fn()` on process 0, then on the others: they load what process 0 wrote to the
  (shared) workdir, e.g. a tokenizer it trained, instead of racing to make their own."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"engram_jax: {what} ready")
  return fn() if result is None else result


def _all_data_states(state: dict) -> dict:
  """The data iterator states of every process, for a checkpoint.

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


def _own_data_state(saved: dict) -> dict:
  """This process's state from `_all_data_states` (or a one-process checkpoint)."""
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


def _global_batch(batch: dict, batch_sharding) -> dict:
  """This process's rows as one global array per key, laid out over the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in batch.items()}


def _restore_or_explain(manager, abstract, workdir, model_cfg):
  """`checkpoints.restore_latest`, with a failed restore naming the model fields that
  differ from the workdir's saved config (the usual cause), or the older layer layout."""
  try:
    return checkpoints.restore_latest(manager, abstract)
  except ValueError as err:
    steps = checkpoints.saved_steps(workdir)
    if steps and checkpoints.segmented_step(workdir, steps[-1]):
      raise ValueError(
          f"--workdir={workdir!r}: checkpoint {steps[-1]} has the segmented layer layout "
          "(engram_jax before the one scanned stack: Engram blocks outside the scan), "
          "which training does not resume; generation and evaluation convert it when "
          "loading; resume with the engram_jax that wrote it, or use a new --workdir"
      ) from None
    differing = model_config_differences(workdir, model_cfg)
    if not differing:
      raise
    raise ValueError(
        f"--workdir={workdir!r} was trained with another model config "
        f"({'; '.join(differing)}): its checkpoints do not restore; resume with the "
        "workdir's config (see its config.json) or use a new --workdir") from None


def _check_data_source(saved: dict | None, current: dict, accept: bool, step: int) -> None:
  """Refuses to resume on a changed data source unless `accept`."""
  from engram_jax.data import fingerprint
  if saved is None or saved == current:
    return  # older checkpoints carry no fingerprint
  changed = fingerprint.differences(saved, current)
  if accept:
    print(f"warning: resuming on changed data ({'; '.join(changed)}); the batches after "
          f"step {step} differ from an uninterrupted run's", flush=True)
    return
  raise ValueError(
      f"the data source changed since checkpoint {step} ({'; '.join(changed)}): exact "
      "resume would replay its batch count over other data; restore the data, pass "
      "--accept_data_change to resume on the new data knowingly, or use a new --workdir")


def _save_failed(err: Exception, workdir: str, manager=None) -> TrainingError:
  """A failed (async) save, e.g. a full disk: one line that says the older checkpoints
  are intact and how to go on."""
  if manager is not None:
    try:  # let saves still in flight commit before listing what is kept
      manager.wait_until_finished()
    except Exception:  # noqa: BLE001  the failure being reported: already in hand
      pass
  kept = checkpoints.saved_steps(workdir)
  return TrainingError(
      f"saving a checkpoint in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)} "
      f"failed ({getattr(err, 'strerror', None) or checkpoints.first_line(err)}); the "
      f"checkpoints before it are kept ({kept or 'none'}): free space or fix the "
      "filesystem, then run the same command to resume")


def _finish_saves(manager, workdir: str) -> None:
  """Waits for the async saves in flight."""
  try:
    manager.wait_until_finished()
  except Exception as err:  # noqa: BLE001  orbax re-raises its save thread's error
    raise _save_failed(err, workdir) from None


def _saved_placement(workdir: str) -> str:
  """`engram.placement` of the run that wrote the workdir's checkpoints ("device" for
  runs that predate it or have no model_config.json)."""
  return saved_model_config(workdir).get("engram", {}).get("placement", "device")


def _place_tables(state, manager, full_abstract, tx, model_cfg, saved_host: bool,
                  host: bool, full_sh, state_sh):
  """(state, HostTableStore or None) of a restored checkpoint for this run's placement.

  host -> host: the tables come from the `host_tables` item; device -> host: they move
  out of the restored params; host -> device: they move into them (with their state).
  """
  from engram_jax import host_tables
  step = int(state.step)
  layout = (checkpoints.restore_host_tables(
      manager, step, host_tables.store_layout(full_abstract, tx)) if saved_host else None)
  if host and saved_host:
    return state, host_tables.store_from_layout(model_cfg, layout, tx.table)
  if host:  # device -> host
    _, store = host_tables.HostTableStore.from_params(model_cfg, state.params, tx.table,
                                                      state.table_opt_state)
    print(f"moved the tables of checkpoint {step} from device to host memory", flush=True)
    return jax.device_put(host_tables.drop_tables(state, tx), state_sh), store
  names = [p[0] for p in tx.paths]  # host -> device
  params = tables.merge_tables(state.params, tx.paths, [layout[n]["table"] for n in names])
  table_state = {n: {k: v for k, v in layout[n].items() if k != "table"} for n in names}
  table_state = {n: v for n, v in table_state.items() if v}
  print(f"moved the tables of checkpoint {step} from host to device memory", flush=True)
  return jax.device_put(state.replace(params=params, table_opt_state=table_state),
                        full_sh), None


def _train_loop(config, workdir, task: tasks.Task, tx, schedule, mesh, fingerprint,
                accept_data_change):
  from clu import metric_writers, periodic_actions
  from engram_jax import host_tables, sharding, writers
  t = config.train
  model, seq_len, train_iter = task.model, task.seq_len, task.train_iter
  byte_lengths = None if task.byte_lengths_V is None else jnp.asarray(task.byte_lengths_V)
  pidx = jax.process_index()
  engram = task.model_cfg.engram
  host = engram.placement == "host" and bool(engram.layers)
  full_sh = train_state_shardings(model, tx, seq_len, mesh)
  state_sh = host_tables.drop_tables(full_sh, tx) if host else full_sh
  batch_sh = sharding.batch_sharding(mesh, batch_size=config.data.batch_size)

  def init_state(rng):
    variables = nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32)))
    return init_train_state(tx, variables["params"], variables.get(moe.BIAS, {}))

  rng = jax.random.key(config.seed)
  manager = checkpoints.manager(workdir, t.keep_checkpoints)
  full_abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_state, rng), full_sh)
  # The checkpoint's tables may live elsewhere than this run's (a switch of
  # engram.placement between device and host): restore its layout, then move them.
  saved_host = bool(engram.layers) and _saved_placement(workdir) == "host"
  restore_abstract = (host_tables.drop_tables(full_abstract, tx) if saved_host
                      else full_abstract)
  try:
    state, data_state, unreadable = _restore_or_explain(manager, restore_abstract, workdir,
                                                        task.model_cfg)
    store = None
    if state is not None and (host or saved_host):
      state, store = _place_tables(state, manager, full_abstract, tx, task.model_cfg,
                                   saved_host, host, full_sh, state_sh)
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
    own = dict(_own_data_state(data_state))
    _check_data_source(own.pop("fingerprint", None), fingerprint, accept_data_change,
                       int(state.step))
    train_iter.set_state(own)
  start = int(state.step)
  # The restore succeeded (or there was nothing to restore): now the run's metadata
  # may describe this config, and the metrics log drops what the last run logged
  # after its last checkpoint (and a line torn by a kill).
  write_run_metadata(workdir, config, task.model_cfg)
  metrics_path = os.path.join(workdir, writers.METRICS_FILE)
  if pidx == 0:
    writers.repair_metrics(metrics_path, start)

  writer = metric_writers.create_default_writer(workdir, just_logging=pidx > 0)
  jsonl = writers.JsonlWriter(metrics_path)
  def write(step, scalars):
    writer.write_scalars(step, scalars)
    jsonl.write(step, scalars)

  overview = parameter_overview(state.params)
  if store is not None:
    overview["engram_tables"] = sum(t.size for t in store.tables_L)
    overview["total"] += overview["engram_tables"]
  logging.info("parameters: %s", overview)
  say = (lambda text: print(text, flush=True)) if pidx == 0 else (lambda text: None)
  say("parameters: " + ", ".join(f"{k} {v:,}" for k, v in overview.items()))
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
        f"optimizer state ({t.get('host_tables_mode', 'overlap')} updates)")
    feed = host_tables.HostFeed(store, train_iter, t.get("host_tables_mode", "overlap"),
                                tx.table_lr)
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
  progress = periodic_actions.ReportProgress(num_train_steps=t.steps, writer=writer)
  console = writers.ConsoleProgress(start, t.steps)

  def save(step):
    position = feed.iterator_state() if feed is not None else train_iter.get_state()
    data = {**position, "fingerprint": fingerprint}
    if feed is not None:
      feed.wait()  # the saved tables include this step's update
    try:
      checkpoints.save(manager, step, state, _all_data_states(data),
                       host_tables=None if store is None else store.state_dict())
    except Exception as err:  # noqa: BLE001  the previous async save's failure
      raise _save_failed(err, workdir, manager) from None

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
      progress(step)
      if step % t.log_every == 0 or step == t.steps:
        write(step, {"train_loss": loss, "grad_norm": float(step_metrics["grad_norm"]),
                     "learning_rate": float(schedule(step)),
                     **{k: float(v) for k, v in step_metrics.items()
                        if k.startswith("moe_")}})
        console.report(step, loss)
      if step % t.eval_every == 0 or step == t.steps:
        metrics, eval_step_number = eval_now(), step
        write(step, metrics)
        say(writers.format_eval(step, metrics))
      # One read of the signal flag per step, so that the save and the stop agree
      # (a signal arriving later is seen at the next step).
      stop = bool(stop_requested)
      budget_spent = bool(t.get("stop_after_steps", 0)) and step - start >= t.stop_after_steps
      if step % t.checkpoint_every == 0 or step == t.steps or stop or budget_spent:
        save(step)
      if (stop or budget_spent) and step < t.steps:
        _finish_saves(manager, workdir)
        print(f"stopped at step {step}; checkpoint saved", flush=True)
        break
  except BaseException:
    failed = True
    raise
  finally:
    try:
      _finish_saves(manager, workdir)
    except TrainingError:
      if not failed:  # else the error already on its way is the one to report
        raise
    manager.close()
    writer.flush()
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
