"""Row-sparse training of Engram tables: the table gradient is the rows a batch read.

A dense table gradient is zero except on the rows a batch looked up, yet `jnp.take`'s
backward zero-fills a table-sized gradient and `optax.adam` rewrites every row's
param, m and v: step cost grows with the table. Here the train step gathers the rows
itself (the model's `lookup_rows`, any `engram.lookup`), hands them to the model in the
`engram_rows` collection, differentiates the loss w.r.t. those `[B, T, H, E]` rows,
sums the gradients of repeated ids (`dedup`: sort + segment-sum into at most B*T*H
unique ids, padded with a sentinel id that updates nothing), and updates only those
rows and their optimizer state (`apply_rows`): cost grows with tokens, not rows.

`train.table_optimizer` picks the tables' optimizer (docs/tables.md compares them):
  adam             optax's dense Adam (not this module): every row's m, v move every step
  lazy_adam        per-element m, v updated only on rows touched this step; bias
                   correction by the global step count
  rowwise_adagrad  one accumulator per row (1/E of the table): acc += mean(g^2),
                   w -= lr * g / (sqrt(acc) + eps)
  sgd              w -= lr * g, no state

On a mesh, tables and their state are row-sharded alike; `apply_rows_sharded` runs
under `shard_map` and each shard writes only the rows it owns.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import config as config_lib
from engram_jax import sharding
from engram_jax.layers.engram import lookup_rows
from engram_jax.models.lm import engram_row_ids

ROWS_KEY = "engram_rows_{}"  # a batch's host-gathered rows of Engram layer i
TABLE_OPTIMIZERS = ("adam", "lazy_adam", "rowwise_adagrad", "sgd")


def validate_optimizer(name: str) -> str:
  if name not in TABLE_OPTIMIZERS:
    raise ValueError(f"train.table_optimizer={name!r} is invalid: choose one of "
                     f"{TABLE_OPTIMIZERS}")
  return name


# ----------------------------------------------------------------------------------
# Row-sparse optimizers: pure (init, update) pairs over the rows touched
# ----------------------------------------------------------------------------------
class TableOptimizer(NamedTuple):
  """init(table_RxE) -> state: a dict of `[R, ...]` arrays (row r's state in row r).
  update(rows_UxE, state_rows, grads_UxE, count, lr) -> (rows_UxE, state_rows): one step
  of the rows touched; `count` is this step's number (1 for the first), `lr` > 0."""
  init: Callable[[jax.Array], dict]
  update: Callable[..., tuple[jax.Array, dict]]


def sgd() -> TableOptimizer:
  def update(rows_UxE, state, grads_UxE, count, lr):
    del count
    return rows_UxE - (lr * grads_UxE).astype(rows_UxE.dtype), state
  return TableOptimizer(lambda table_RxE: {}, update)


def lazy_adam(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> TableOptimizer:
  """Adam whose m and v change only on touched rows (optax.adam's arithmetic there).

  Dense Adam decays every row's m and v each step and keeps moving rows that were
  not read on their stale m; here an untouched row, its m and its v stay as they are.
  The bias correction uses the global step `count` (TF's LazyAdam does too), so a row
  first touched at step 1000 gets the step-1000 correction: its first update is
  (1 - b1) / sqrt(1 - b2) times smaller than dense Adam's first step would be.
  """
  def init(table_RxE):
    zeros = lambda: jnp.zeros(table_RxE.shape, jnp.float32)  # two buffers (donation)
    return {"mu": zeros(), "nu": zeros()}

  def update(rows_UxE, state, grads_UxE, count, lr):
    g = grads_UxE.astype(jnp.float32)
    mu = (1 - b1) * g + b1 * state["mu"]
    nu = (1 - b2) * jnp.square(g) + b2 * state["nu"]
    mu_hat = mu / (1 - b1 ** count).astype(jnp.float32)
    nu_hat = nu / (1 - b2 ** count).astype(jnp.float32)
    step = mu_hat / (jnp.sqrt(nu_hat) + eps)
    return rows_UxE - (lr * step).astype(rows_UxE.dtype), {"mu": mu, "nu": nu}
  return TableOptimizer(init, update)


def rowwise_adagrad(eps: float = 1e-8) -> TableOptimizer:
  """Adagrad with one accumulator per row, as TPU embeddings and FBGEMM do.

  acc_r += mean_e(g_re^2); w_r -= lr * g_r / (sqrt(acc_r) + eps). The state is one
  float per row (1/E of the table): what makes 100B-parameter tables trainable.
  """
  def init(table_RxE):
    return {"acc": jnp.zeros(table_RxE.shape[:1], jnp.float32)}

  def update(rows_UxE, state, grads_UxE, count, lr):
    del count
    g = grads_UxE.astype(jnp.float32)
    acc_U = state["acc"] + jnp.mean(jnp.square(g), axis=-1)
    step = g / (jnp.sqrt(acc_U)[:, None] + eps)
    return rows_UxE - (lr * step).astype(rows_UxE.dtype), {"acc": acc_U}
  return TableOptimizer(init, update)


def make_optimizer(name: str, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8) -> TableOptimizer:
  """The row-sparse optimizer `name` (not "adam": that one is optax's, dense)."""
  if validate_optimizer(name) == "adam":
    raise ValueError("train.table_optimizer='adam' is the dense optax path, not a "
                     "row-sparse optimizer")
  return {"lazy_adam": lambda: lazy_adam(b1, b2, eps),
          "rowwise_adagrad": lambda: rowwise_adagrad(eps), "sgd": sgd}[name]()


# ----------------------------------------------------------------------------------
# Gradients as rows
# ----------------------------------------------------------------------------------
def dedup(ids_J, grads_JxE, sentinel: int):
  """(ids_U, grads_UxE) with U = J: each distinct id once, ascending, with the sum of
  its gradients; the slots past the distinct ids hold `sentinel` and zeros.

  Static shapes (U = J is the bound when no id repeats) keep it jittable; a sentinel
  of at least the table's row count makes `apply_rows` skip the padding.
  """
  n = ids_J.shape[0]
  order_J = jnp.argsort(ids_J)
  sorted_J = ids_J[order_J]
  first_J = jnp.concatenate([jnp.ones((1,), bool), sorted_J[1:] != sorted_J[:-1]])
  segment_J = jnp.cumsum(first_J.astype(jnp.int32)) - 1
  ids_U = jnp.full((n,), sentinel, ids_J.dtype).at[segment_J].set(sorted_J)
  grads_UxE = jax.ops.segment_sum(grads_JxE[order_J], segment_J, num_segments=n,
                                  indices_are_sorted=True)
  return ids_U, grads_UxE


def apply_rows(table_RxE, state, ids_U, grads_UxE, optimizer: TableOptimizer, count, lr):
  """One `optimizer` step on rows `ids_U` (distinct; ids >= R update nothing) of a
  table and its state: a gather, the row-wise update and a scatter, O(U) work.

  Returns (table, state, nonfinite): the count of non-finite values written, so that
  the trainer checks the rows it changed instead of reading the whole table.
  """
  take = lambda x: jnp.take(x, ids_U, axis=0, mode="fill", fill_value=0)
  rows_UxE, state_rows = optimizer.update(take(table_RxE), jax.tree_util.tree_map(take, state),
                                          grads_UxE, count, lr)
  written_U = ids_U < table_RxE.shape[0]
  nonfinite = jnp.sum(~jnp.isfinite(rows_UxE) & written_U[:, None], dtype=jnp.int32)
  put = lambda x, new: x.at[ids_U].set(new.astype(x.dtype), mode="drop")
  return put(table_RxE, rows_UxE), jax.tree_util.tree_map(put, state, state_rows), nonfinite


def apply_rows_sharded(table_RxE, state, ids_U, grads_UxE, optimizer: TableOptimizer,
                       count, lr, mesh=None):
  """`apply_rows` on a row-sharded table (and state laid out alike) over the ambient
  mesh: every shard sees all `ids_U` and writes only the rows it owns."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = () if mesh.empty else sharding.table_shard_axes(mesh, table_RxE.shape[0])
  if not axes:
    return apply_rows(table_RxE, state, ids_U, grads_UxE, optimizer, count, lr)
  rows_per_shard = table_RxE.shape[0] // math.prod(mesh.shape[a] for a in axes)

  def body(table_local, state_local, ids_U, grads_UxE, count, lr):
    local_U = ids_U - jax.lax.axis_index(axes) * rows_per_shard
    owned_U = (local_U >= 0) & (local_U < rows_per_shard)
    table, state, nonfinite = apply_rows(
        table_local, state_local, jnp.where(owned_U, local_U, rows_per_shard), grads_UxE,
        optimizer, count, lr)
    return table, state, jax.lax.psum(nonfinite, axes)
  rows_spec = P(axes)
  state_specs = jax.tree_util.tree_map(lambda _: rows_spec, state)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(rows_spec, state_specs, P(), P(), P(), P()),
                       out_specs=(rows_spec, state_specs, P()))(
      table_RxE, state, ids_U, grads_UxE, jnp.asarray(count), jnp.asarray(lr, jnp.float32))


# ----------------------------------------------------------------------------------
# Tables in a parameter tree
# ----------------------------------------------------------------------------------
def table_paths(engram: config_lib.EngramConfig) -> list[tuple[str, ...]]:
  """Param paths of the tables, in `engram.layers` order (the hash ids' L axis)."""
  return [(f"block_{layer}", "engram", "table") for layer in engram.layers]


def _without(tree, path):
  if len(path) == 1:
    return {k: v for k, v in tree.items() if k != path[0]}
  return {**tree, path[0]: _without(tree[path[0]], path[1:])}


def _with(tree, path, leaf):
  if len(path) == 1:
    return {**tree, path[0]: leaf}
  return {**tree, path[0]: _with(tree.get(path[0], {}), path[1:], leaf)}


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def split_tables(params, paths):
  """(params without the tables, [table per path])."""
  rest = params
  for path in paths:
    rest = _without(rest, path)
  return rest, [_at(params, path) for path in paths]


def merge_tables(rest, paths, tables_L):
  for path, table in zip(paths, tables_L):
    rest = _with(rest, path, table)
  return rest


def rows_collection(paths, rows_L) -> dict:
  """The `engram_rows` tree: each layer's `[B, T, H, E]` rows under its path."""
  out: dict = {}
  for path, rows in zip(paths, rows_L):
    out = _with(out, path[:-1] + ("rows",), rows)
  return out


# ----------------------------------------------------------------------------------
# The optimizer of a run with row-sparse tables, and its step
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SparseTx:
  """What trains a model whose tables are row-sparse.

  dense: optax transformation of every other param, without clipping (`update` clips
    dense and row gradients by their joint norm); table: the tables' optimizer (None:
    frozen tables, no state and no update); table_lr: step -> the tables' learning rate
    (schedule times `train.table_lr_multiplier`); no weight decay on tables.
  """
  name: str
  engram: config_lib.EngramConfig
  dense: optax.GradientTransformation
  table: Optional[TableOptimizer]
  table_lr: Callable[[Any], Any]
  grad_clip: float = 0.0

  @property
  def paths(self):
    return table_paths(self.engram)

  def sentinels(self) -> list[int]:
    """Per layer, an id no row has (the stored rows, padding included): `dedup`'s
    padding, which `apply_rows` skips."""
    spec = self.engram.hash_spec()
    return [self.engram.padded_rows(spec.rows(i)) for i in range(len(self.paths))]

  def init(self, params) -> tuple[Any, dict]:
    """(dense optimizer state, table optimizer state) of `params` (tables included)."""
    dense, tables_L = split_tables(params, self.paths)
    return self.dense.init(dense), self.init_tables(tables_L)

  def init_tables(self, tables_L) -> dict:
    """{"block_L": state}, one per Engram layer with a non-empty state ({} for sgd)."""
    if self.table is None:
      return {}
    states = {path[0]: self.table.init(t) for path, t in zip(self.paths, tables_L)}
    return {k: v for k, v in states.items() if v}


def table_state_shardings(tx: SparseTx, table_state, param_shardings) -> dict:
  """Each table's state split by rows exactly like the table (`param_shardings`)."""
  _, table_shardings_L = split_tables(param_shardings, tx.paths)
  by_name = {path[0]: s for path, s in zip(tx.paths, table_shardings_L)}
  return {name: jax.tree_util.tree_map(
      lambda _, s=by_name[name]: NamedSharding(s.mesh, P(*s.spec[:1])), state)
          for name, state in table_state.items()}


def row_gradients(tx: SparseTx, loss_fn, dense, opt_state, rows_L, ids_L):
  """The row-sparse step's device half: loss, the dense update, and the table gradient
  as deduplicated rows, whichever memory the tables live in.

  loss_fn(dense_params, engram_rows) -> (loss, aux); rows_L: each Engram layer's
  `[B, T, H, E]` rows (gathered on device, or by the host for host tables); ids_L their
  flat-table ids. Returns (value, dense, opt_state, sparse_L, grad_norm, finite_dense)
  with sparse_L = [(ids_U, grads_UxE)] per layer ([] for frozen tables), clipped by the
  joint norm of the dense and row gradients (the norm of the whole dense gradient).
  """
  paths = tx.paths
  loss = lambda d, r: loss_fn(d, rows_collection(paths, r))
  if tx.table is None:  # frozen tables: no gradient, no update
    value, grads = jax.value_and_grad(loss, has_aux=True)(dense, rows_L)
    sparse_L = []
  else:
    value, (grads, row_grads_L) = jax.value_and_grad(loss, (0, 1), has_aux=True)(dense, rows_L)
    sparse_L = [dedup(ids.reshape(-1), g.reshape(-1, g.shape[-1]), sentinel)
                for ids, g, sentinel in zip(ids_L, row_grads_L, tx.sentinels())]
  squares = [jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(grads)]
  grad_norm = jnp.sqrt(sum(squares + [jnp.sum(jnp.square(g)) for _, g in sparse_L]))
  if tx.grad_clip and tx.grad_clip > 0:  # optax.clip_by_global_norm's rule, both parts
    clip = lambda g: jnp.where(grad_norm < tx.grad_clip, g,
                               (g / grad_norm.astype(g.dtype)) * tx.grad_clip)
    grads = jax.tree_util.tree_map(clip, grads)
    sparse_L = [(ids, clip(g)) for ids, g in sparse_L]
  updates, opt_state = tx.dense.update(grads, opt_state, dense)
  dense = optax.apply_updates(dense, updates)
  finite = jax.tree_util.tree_reduce(lambda ok, x: ok & jnp.all(jnp.isfinite(x)), dense,
                                     jnp.bool_(True))
  return value, dense, opt_state, sparse_L, grad_norm, finite


def layer_row_ids(tx: SparseTx, hash_ids_BxTxLxH) -> list:
  """Each Engram layer's flat-table row ids `[B, T, H]` (int32)."""
  return [engram_row_ids(tx.engram, hash_ids_BxTxLxH, i).astype(jnp.int32)
          for i in range(len(tx.paths))]


def update(tx: SparseTx, loss_fn, params, opt_state, table_state, step, hash_ids_BxTxLxH):
  """One train step's update with row-sparse tables in device memory.

  loss_fn(dense_params, engram_rows) -> (loss, aux). Returns ((loss, aux), params,
  opt_state, table_state, grad_norm, finite); grad_norm is the joint norm of the dense
  and the row gradients, which equals the norm of the whole dense gradient; finite:
  whether the new params are (the other params, and the table rows just written).
  """
  engram, paths = tx.engram, tx.paths
  dense, tables_L = split_tables(params, paths)
  ids_L = layer_row_ids(tx, hash_ids_BxTxLxH)
  rows_L = [lookup_rows(t, ids, engram.lookup) for t, ids in zip(tables_L, ids_L)]
  value, dense, opt_state, sparse_L, grad_norm, finite = row_gradients(
      tx, loss_fn, dense, opt_state, rows_L, ids_L)
  new_state, nonfinite = dict(table_state), jnp.int32(0)
  if tx.table is not None:
    lr = tx.table_lr(step)
    for i, (path, (ids_U, grads_UxE)) in enumerate(zip(paths, sparse_L)):
      tables_L[i], state, bad = apply_rows_sharded(
          tables_L[i], table_state.get(path[0], {}), ids_U, grads_UxE, tx.table, step + 1, lr)
      nonfinite = nonfinite + bad
      if state:
        new_state[path[0]] = state
  return (value, merge_tables(dense, paths, tables_L), opt_state, new_state, grad_norm,
          finite & (nonfinite == 0))
