"""One training step as jitted programs: the train state, the train and eval steps, and
what a run jits (`run_programs`, cached per settings within a process).

Pure functions of (model, optimizer, mesh): `train.py` runs them over a workdir, the
benches time them, `sizing` and the export tests lower them without running anything.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from engram_jax import config as config_lib
from engram_jax import tables
from engram_jax.layers import moe
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


def train_state_shardings(model: nn.Module, tx, seq_len: int, mesh, abstract=None):
  """`TrainState` of NamedShardings: params and optimizer moments by logical axes
  (row-sparse tables' state split by rows like its table). `abstract`: the model's
  `abstract_train_state`, when the caller has it already."""
  from engram_jax import sharding
  if abstract is None:
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


class RunPrograms(NamedTuple):
  """What a run jits, built once per (model, tx, seq_len, mesh, host tables) in a process.

  full_shardings / full_abstract: the `TrainState` with its tables (NamedShardings /
  ShapeDtypeStructs carrying them); state_shardings: the state the devices hold (no
  tables with host tables); init: rng -> that state, laid out; init_unplaced: rng -> the
  full state, wherever the default device is (host tables: the host's memory)."""
  full_shardings: Any
  state_shardings: Any
  full_abstract: Any
  init: Callable
  init_unplaced: Callable
  train_step: Callable
  eval_step: Callable


@functools.lru_cache(maxsize=8)
def run_programs(model: nn.Module, tx, seq_len: int, mesh, host: bool) -> RunPrograms:
  """The jitted init, train and eval steps of a run. Cached: runs of equal settings in
  one process (seeds, a resume, a notebook run again; `optim.from_train_config` returns
  equal settings' tx itself) call the same jitted functions, so each program is traced,
  lowered and compiled once, not per run."""
  from engram_jax import host_tables

  def init_state(rng):
    variables = nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32)))
    return init_train_state(tx, variables["params"], variables.get(moe.BIAS, {}))

  abstract = abstract_train_state(model, tx, seq_len)  # one trace of the init for both
  full_sh = train_state_shardings(model, tx, seq_len, mesh, abstract)
  state_sh = host_tables.drop_tables(full_sh, tx) if host else full_sh
  full_abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(abstract), full_sh)
  return RunPrograms(full_sh, state_sh, full_abstract,
                     jax.jit(init_state, out_shardings=state_sh), jax.jit(init_state),
                     make_train_step(model, tx, state_sh, host_tables=host, mesh=mesh),
                     make_eval_step(model))
