"""Engram tables trained in host memory (`engram.placement="host"`).

Row ids depend only on tokens, so the rows a step reads are known before it runs: the
tables and their row-sparse optimizer state live in host RAM (NumPy), the input side
gathers each batch's rows (`np.take` over several threads) and ships them to the
device as `engram_rows`, the step returns the table gradient as deduplicated rows
(`tables.row_gradients`), and the host applies the row-sparse update to the rows
touched. The accelerator never holds a table: a table the size of host RAM trains.

The update runs the same `TableOptimizer.update` as device tables (jitted on the CPU,
over a static number of rows), so `exact` host training equals device training.
`docs/scale_out.md` ("Tables in host memory") has the modes and the memory they cost.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from engram_jax import config as config_lib
from engram_jax import checkpoints, fp8, hashing, tables
from engram_jax.errors import TrainingError

TABLE = "table"
HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def engram_paths(cfg: config_lib.ModelConfig) -> list[tuple[str, ...]]:
  """Param paths of the Engram layers, in `engram.layers` order (the hash ids' L axis)."""
  return [(f"block_{layer}", "engram") for layer in cfg.engram.layers]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _nest(paths, leaves) -> dict:
  """A nested dict with `leaves[i]` at `paths[i]`."""
  out: dict = {}
  for path, leaf in zip(paths, leaves):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


class HostTables:
  """The Engram tables of one model in host memory, and lookups of their rows.

  tables_L: one `[rows, head_dim]` array per Engram layer (in `engram.layers` order),
    as stored in the params (padded rows included; they are never addressed), or an
    `fp8.Fp8Table` (e.g. a memory-mapped V4.1 checkpoint), dequantised per row read.
  """

  def __init__(self, cfg: config_lib.ModelConfig, tables_L: Sequence[np.ndarray]):
    e = cfg.engram
    if len(tables_L) != len(e.layers):
      raise ValueError(f"{len(tables_L)} tables for engram.layers={e.layers}: give one per "
                       "Engram layer")
    self.cfg, self.spec = cfg, e.hash_spec()
    self.paths = engram_paths(cfg)
    self.tables_L = [t if isinstance(t, fp8.Fp8Table) else np.ascontiguousarray(t)
                     for t in tables_L]
    for i, (path, table) in enumerate(zip(self.paths, self.tables_L)):
      if table.ndim != 2 or table.shape[1] != e.head_dim or table.shape[0] < self.spec.rows(i):
        raise ValueError(f"table of {'/'.join(path)} has shape {table.shape}; this model "
                         f"needs [>= {self.spec.rows(i)}, engram head_dim={e.head_dim}]")
    self.offsets_LxH = self.spec.offsets_LxH.astype(np.int64)

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tables_L)

  def hash_ids(self, tokens_BxT: np.ndarray, vocab_map_V=None) -> np.ndarray:
    """Host-side hash ids `[B, T, L, H]` (bit-identical to the model's in-graph hash)."""
    tokens = np.asarray(tokens_BxT)
    ngram = tokens if vocab_map_V is None else np.asarray(vocab_map_V)[tokens]
    return hashing.ngram_hash_ids(ngram, self.spec)

  def row_ids(self, hash_ids_BxTxLxH) -> list[np.ndarray]:
    """Each layer's flat-table row ids `[B, T, H]` (int64): hash ids + head offsets."""
    ids = np.asarray(hash_ids_BxTxLxH).astype(np.int64)
    return [ids[:, :, l] + self.offsets_LxH[l] for l in range(len(self.tables_L))]

  def gather(self, hash_ids_BxTxLxH) -> list[np.ndarray]:
    """Rows `[B, T, H, E]` per layer; `np.take`, the fast NumPy row copy."""
    return [table.take(ids) if isinstance(table, fp8.Fp8Table)
            else np.take(table, ids, axis=0)
            for table, ids in zip(self.tables_L, self.row_ids(hash_ids_BxTxLxH))]

  def rows(self, hash_ids_BxTxLxH) -> dict:
    """The `ROWS_COLLECTION` tree of the ids' rows, as host arrays."""
    return _nest([p + ("rows",) for p in self.paths], self.gather(hash_ids_BxTxLxH))

  def device_rows(self, hash_ids_BxTxLxH, sharding=None) -> dict:
    """`rows` put on the device; returns before the copy ends (jax transfers async)."""
    return jax.device_put(self.rows(hash_ids_BxTxLxH), sharding)

  def callback_rows(self, hash_ids_BxTxLxH) -> dict:
    """`rows` from inside `jit`: a host callback gathers them when the ids are ready.

    `pure_callback`, not `io_callback`: the lookup has no side effects, so XLA may
    schedule it freely (or drop it if unused).
    """
    b, t, _, h = hash_ids_BxTxLxH.shape
    dtypes = [t_.dtype for t_ in self.tables_L]
    shapes = [jax.ShapeDtypeStruct((b, t, h, self.cfg.engram.head_dim), d) for d in dtypes]
    rows_L = jax.pure_callback(lambda ids: self.gather(ids), shapes, hash_ids_BxTxLxH)
    return _nest([p + ("rows",) for p in self.paths], list(rows_L))


# ----------------------------------------------------------------------------------
# Moving tables to the host
# ----------------------------------------------------------------------------------
def without(tree, paths) -> Any:
  """Copy of the nested dict `tree` without the leaves at `paths`."""
  drop = {tuple(p) for p in paths}

  def walk(node, prefix):
    if not hasattr(node, "items"):
      return node
    return {k: walk(v, prefix + (k,)) for k, v in node.items() if prefix + (k,) not in drop}
  return walk(tree, ())


def split_params(params, cfg: config_lib.ModelConfig):
  """(device_params, HostTables): the Engram tables copied to host memory and left out
  of the params. Drop other references to `params` to free the device copies.

  A table sharded over several hosts is not addressable from one; load such a model
  with `workdir.load(tables="host")`, which reads the tables from the checkpoint instead.
  """
  tables = []
  for path in engram_paths(cfg):
    try:
      table = _get(params, path + (TABLE,))
    except (KeyError, TypeError):
      raise ValueError(f"params have no Engram table at {'/'.join(path + (TABLE,))}; pass "
                       "the params of a model with engram.layers="
                       f"{cfg.engram.layers}") from None
    if isinstance(table, jax.Array) and not table.is_fully_addressable:
      raise ValueError(f"the table at {'/'.join(path)} spans several processes; use "
                       "workdir.load(tables='host') to read it from the checkpoint")
    tables.append(np.asarray(jax.device_get(table)))
  device = without(params, [p + (TABLE,) for p in engram_paths(cfg)])
  return device, HostTables(cfg, tables)


def whole_on_host(x) -> np.ndarray:
  """A writable NumPy copy of the whole array, also when its rows are sharded over
  several processes' devices (a multi-host run moving its tables to host memory: every
  process gathers all rows, since each keeps a full replica)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.array(multihost_utils.process_allgather(x, tiled=True))
  return np.array(jax.device_get(x))


def host_memory_sharding(device=None):
  """A sharding in host memory of `device` (pinned if it has it), else its default
  memory: restores into it never touch accelerator memory."""
  device = device or jax.devices()[0]
  kinds = {m.kind for m in device.addressable_memories()}
  for kind in HOST_MEMORY_KINDS:
    if kind in kinds:
      return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
  return jax.sharding.SingleDeviceSharding(device)


MODES = ("overlap", "exact")


@functools.partial(jax.jit, static_argnums=0)
def _rows_update(optimizer: tables.TableOptimizer, rows_UxE, state_rows, grads_UxE, count,
                 lr):
  return optimizer.update(rows_UxE, state_rows, grads_UxE, count, lr)


class HostTableStore(HostTables):
  """`HostTables` (the tables in host RAM, their row offsets) that also train:
  each layer's row-sparse optimizer state, threaded gathers and the host update.

  tables_L: one per layer in `engram.layers` order, padded rows included (the exact
  shape the params would hold, so checkpoints move between placements);
  states_L: one dict of `[R, ...]` arrays per layer (`{}` for sgd or frozen tables).
  """

  def __init__(self, cfg: config_lib.ModelConfig, tables_L: Sequence[np.ndarray],
               optimizer: Optional[tables.TableOptimizer], states_L=None,
               threads: int = 0):
    super().__init__(cfg, tables_L)
    e, spec = cfg.engram, self.spec
    self.optimizer = optimizer
    self.names = [path[0] for path in self.paths]
    for i, table in enumerate(self.tables_L):
      want = (e.padded_rows(spec.rows(i)), e.head_dim)
      if table.shape != want:
        raise ValueError(f"host table of {self.names[i]} has shape {table.shape}; this "
                         f"model needs {want}")
    self.states_L = [dict(s) for s in (states_L or [{} for _ in self.tables_L])]
    self._threads = threads or min(8, os.cpu_count() or 1)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        self._threads, thread_name_prefix="engram-host-tables")

  @classmethod
  def from_params(cls, cfg: config_lib.ModelConfig, params, optimizer, table_opt_state=None):
    """(params without tables, store): the tables (and their state, if any) copied from
    a full parameter tree into host memory."""
    paths = tables.table_paths(cfg.engram)
    dense, tables_L = tables.split_tables(params, paths)
    state = table_opt_state or {}
    host = lambda tree: jax.tree_util.tree_map(whole_on_host, tree)
    tables_L = [whole_on_host(t) for t in tables_L]
    states_L = [host(state.get(p[0], {})) for p in paths]
    if optimizer is not None and not any(states_L):
      states_L = [host(optimizer.init(t)) for t in tables_L]
    return dense, cls(cfg, tables_L, optimizer, states_L)

  @property
  def nbytes(self) -> int:
    """The tables and their optimizer state."""
    return super().nbytes + sum(v.nbytes for s in self.states_L for v in s.values())

  def gather(self, hash_ids_BxTxLxH) -> list[np.ndarray]:
    """`HostTables.gather`, its `np.take` split in chunks over the thread pool."""
    out = []
    for table, ids in zip(self.tables_L, self.row_ids(hash_ids_BxTxLxH)):
      rows = np.empty(ids.shape + table.shape[1:], table.dtype)
      flat_ids, flat_rows = ids.reshape(-1), rows.reshape(-1, table.shape[1])
      bounds = np.linspace(0, flat_ids.size, self._threads + 1).astype(int)
      list(self._pool.map(  # slices are views: each thread fills its part of `rows`
          lambda a, b: np.take(table, flat_ids[a:b], axis=0, out=flat_rows[a:b]),
          bounds[:-1], bounds[1:]))
      out.append(rows)
    return out

  def apply(self, sparse_L, count: int, lr: float) -> int:
    """One row-sparse step: `sparse_L` = [(ids_U, grads_UxE)] per layer, as
    `tables.row_gradients` returns them (ids >= rows are padding). Returns the number
    of non-finite values written."""
    if self.optimizer is None:
      return 0
    nonfinite = 0
    for i, (ids_U, grads_UxE) in enumerate(sparse_L):
      table, state = self.tables_L[i], self.states_L[i]
      ids_U = np.asarray(ids_U).astype(np.int64)
      valid_U = ids_U < table.shape[0]
      safe_U = np.where(valid_U, ids_U, 0)
      new_rows, new_state = _rows_update(
          self.optimizer, table[safe_U], {k: v[safe_U] for k, v in state.items()},
          np.asarray(grads_UxE), np.int32(count), np.float32(lr))
      written = ids_U[valid_U]
      new_rows = np.asarray(new_rows)[valid_U]
      nonfinite += int(np.sum(~np.isfinite(new_rows)))
      table[written] = new_rows
      for k, v in new_state.items():
        state[k][written] = np.asarray(v)[valid_U]
    return nonfinite

  def digest(self) -> str:
    """sha256 of every table and state array: equal on replicas that applied the same
    updates (several processes), printed at the end of a run."""
    import hashlib
    h = hashlib.sha256()
    for table, state in zip(self.tables_L, self.states_L):
      h.update(np.ascontiguousarray(table).tobytes())
      for key in sorted(state):
        h.update(np.ascontiguousarray(state[key]).tobytes())
    return h.hexdigest()[:16]

  def state_dict(self) -> dict:
    """{"block_L": {"table": [R, E], **optimizer state}}: what a checkpoint holds."""
    return {name: {"table": t, **s}
            for name, t, s in zip(self.names, self.tables_L, self.states_L)}

  def load_state_dict(self, saved: dict) -> None:
    for i, name in enumerate(self.names):
      entry = dict(saved[name])
      table = entry.pop("table")
      if table.shape != self.tables_L[i].shape:
        raise ValueError(f"checkpoint host table {name} has shape {table.shape}, this "
                         f"model {self.tables_L[i].shape}")
      self.tables_L[i] = np.ascontiguousarray(table)
      self.states_L[i] = {k: np.ascontiguousarray(v) for k, v in entry.items()}

  def close(self) -> None:
    self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------
# The trainer's side: batches with their rows, and the host half of each step
# ----------------------------------------------------------------------------------
def drop_tables(state, tx: tables.SparseTx):
  """A TrainState (of arrays, shardings or shapes) without the tables and their state:
  what the device holds when the host holds the tables."""
  return state.replace(params=tables.split_tables(state.params, tx.paths)[0],
                       table_opt_state={})


def store_layout(full_state, tx: tables.SparseTx) -> dict:
  """{"block_L": {"table": x, **state}} of a full TrainState: the checkpoint item."""
  _, tables_L = tables.split_tables(full_state.params, tx.paths)
  return {path[0]: {"table": table, **full_state.table_opt_state.get(path[0], {})}
          for path, table in zip(tx.paths, tables_L)}


def store_from_layout(cfg, saved: dict, optimizer) -> HostTableStore:
  names = [p[0] for p in tables.table_paths(cfg.engram)]
  entries = [dict(saved[name]) for name in names]
  return HostTableStore(cfg, [e.pop("table") for e in entries], optimizer, entries)


def place_restored(state, mngr, full_abstract, tx: tables.SparseTx, cfg, saved_host: bool,
                   host: bool, full_sh, state_sh):
  """(state, HostTableStore or None) of a restored checkpoint for this run's placement.

  host -> host: the tables come from the `host_tables` item; device -> host: they move
  out of the restored params; host -> device: they move into them (with their state).
  """
  step = int(state.step)
  layout = (checkpoints.restore_host_tables(mngr, step, store_layout(full_abstract, tx))
            if saved_host else None)
  if host and saved_host:
    return state, store_from_layout(cfg, layout, tx.table)
  if host:  # device -> host
    _, store = HostTableStore.from_params(cfg, state.params, tx.table, state.table_opt_state)
    print(f"moved the tables of checkpoint {step} from device to host memory", flush=True)
    return jax.device_put(drop_tables(state, tx), state_sh), store
  names = [p[0] for p in tx.paths]  # host -> device
  params = tables.merge_tables(state.params, tx.paths, [layout[n]["table"] for n in names])
  table_state = {n: {k: v for k, v in layout[n].items() if k != "table"} for n in names}
  table_state = {n: v for n, v in table_state.items() if v}
  print(f"moved the tables of checkpoint {step} from host to device memory", flush=True)
  return jax.device_put(state.replace(params=params, table_opt_state=table_state),
                        full_sh), None


class HostFeed:
  """Train batches with their rows gathered from a `HostTableStore`, and the updates.

  exact:   gather the rows of batch t after update t-1 landed: the same rows as device
           tables would read (the same losses).
  overlap: gather the rows of batch t+1 while step t runs, after update t-1 landed but
           before update t: a row touched by steps t and t+1 is one step stale there;
           update t runs on a host thread while the device runs step t+1.
  `iterator_state()` is the data position of the batches already trained on (not of
  the batch gathered ahead), so checkpoints resume where training stopped.
  """

  def __init__(self, store: HostTableStore, train_iter, mode: str, table_lr):
    if mode not in MODES:
      raise ValueError(f"train.host_tables_mode={mode!r}: choose one of {MODES}")
    self.store, self.mode, self._iter, self._table_lr = store, mode, train_iter, table_lr
    self._updater = concurrent.futures.ThreadPoolExecutor(1, "engram-host-update")
    self._pending = None
    self._ahead = None
    self._state_before_ahead = None

  def with_rows(self, batch: dict) -> dict:
    """`batch` (NumPy, with `hash_ids`) plus its rows from the tables as they are now."""
    rows = self.store.gather(batch["hash_ids"])
    return {**batch, **{tables.ROWS_KEY.format(i): r for i, r in enumerate(rows)}}

  def next_batch(self) -> dict:
    """The next train batch (NumPy) with `engram_rows_i` from the host tables."""
    if self._ahead is not None:
      batch, self._ahead = self._ahead, None
      return batch
    self.wait()
    return self.with_rows(next(self._iter))

  def gather_ahead(self) -> None:
    """overlap: fetch the next batch and gather its rows now (the device is busy)."""
    if self.mode != "overlap":
      return
    self._state_before_ahead = self._iter.get_state()
    batch = next(self._iter)
    self.wait()
    self._ahead = self.with_rows(batch)

  def apply(self, table_rows, step: int) -> None:
    """Update `step`'s rows (the step just run; `count` = step, lr at step - 1)."""
    sparse_L = [(np.asarray(ids), np.asarray(grads)) for ids, grads in table_rows]
    lr = float(self._table_lr(step - 1))
    if self.mode == "exact":
      self._check(self.store.apply(sparse_L, step, lr), step)
      return
    self.wait()
    self._pending = (step, self._updater.submit(self.store.apply, sparse_L, step, lr))

  def wait(self) -> None:
    """Blocks until the update in flight has landed."""
    if self._pending is not None:
      step, future = self._pending
      self._pending = None
      self._check(future.result(), step)

  @staticmethod
  def _check(nonfinite: int, step: int) -> None:
    if nonfinite:
      raise TrainingError(
          f"non-finite values in the host table rows updated at step {step}; this "
          "state is not saved and the last good checkpoint is kept (lower "
          "train.learning_rate or train.table_lr_multiplier?)")

  def iterator_state(self) -> dict:
    return self._state_before_ahead if self._ahead is not None else self._iter.get_state()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._updater.shutdown(wait=True)
      self.store.close()
