"""Device meshes, logical-axis rules, and the row-sharded Engram table lookup.

Parameters carry logical axis names (`nn.with_logical_partitioning`); a rules table
maps each name to mesh axes (`data, fsdp, tensor, expert`), and `state_shardings`
turns an abstract (boxed) tree into `NamedSharding`s for `jax.jit`. Engram tables are
the largest params and are only ever read a few rows at a time, so their rows are
split over every device (`table_rows` -> all mesh axes); the lookup then runs under
`shard_map` with one of two exact strategies (docs/sharding.md has the costs):

  psum:       gather every id of the table group, each shard reads the rows it owns
              (zeros elsewhere), and a reduce-scatter (psum) sums them back.
  all_to_all: bucket this device's ids by owning shard, exchange the buckets, read
              locally, send the rows back and un-permute (the paper's training path).
"""
import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
STRATEGIES = ("psum", "all_to_all")

# (logical name, mesh axes). Tables use every mesh axis: a lookup's traffic depends on
# the ids, not on the table, so the finest split costs nothing extra and leaves each
# device 1/devices of it. Activations are batch-sharded over all axes but `tensor`.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("experts", "expert"),
    ("table_rows", ("data", "fsdp", "tensor", "expert")),
    ("table_dim", None),
    ("engram_features", None),
    ("branch", None),
    ("conv_taps", None),
)


# ----------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices per mesh axis; one axis may be -1 (the devices the others leave).
  `num_devices`: the devices a run's mesh spans (`mesh_from_config`; 0 = all)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  num_devices: int = 0

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """Axis sizes for `num_devices` devices, in MESH_AXES order."""
    sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
    for axis, size in sizes.items():
      if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"mesh.{axis}={size!r} is invalid: use a device count >= 1, "
                         "or -1 for the devices the other axes leave")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
      raise ValueError(f"mesh.{free[1]}=-1 is invalid: mesh.{free[0]} is -1 already; "
                       "give every axis but one an explicit size")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
      if num_devices % fixed:
        given = " x ".join(f"mesh.{axis}={size}" for axis, size in sizes.items()
                           if size not in (1, -1))
        raise ValueError(f"{given} = {fixed} devices, which does not divide the "
                         f"{num_devices} devices (mesh.{free[0]}=-1 takes the rest): "
                         f"make that product divide {num_devices}")
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      given = " x ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
      raise ValueError(f"{given} = {fixed} devices, but there are {num_devices}: make "
                       f"the product {num_devices} or set one axis (e.g. mesh.data) to -1")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[Any]] = None
              ) -> Mesh:
  """A mesh over `devices` (default: all) with `Auto` axes, so `jit` in/out shardings
  and GSPMD propagation place the rest (the pjit model; jax 0.10 defaults to Explicit)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(cfg.shape(len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(cfg: MeshConfig, abstract: bool = False):
  """The mesh of a run's `mesh` section: over all devices, or the first `num_devices`.

  `abstract=True` gives a device-free `AbstractMesh` of `num_devices` devices, so a
  dry run can size a pod-scale mesh on a laptop.
  """
  count = cfg.num_devices or 0
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"mesh.num_devices={count!r} is invalid: use a device count >= 1, or "
                     "0 for all devices")
  if abstract:
    count = count or jax.device_count()
    return jax.sharding.AbstractMesh(cfg.shape(count), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(MESH_AXES))
  if count > jax.device_count():
    raise ValueError(f"mesh.num_devices={count} but only {jax.device_count()} devices "
                     "are visible; lower it (0 = all devices)")
  return make_mesh(cfg, jax.devices()[:count] if count else None)


_RULES = contextvars.ContextVar("engram_sharding_rules", default=())


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Makes `mesh` and `rules` ambient; the psum/all_to_all lookups read both while
  tracing, so `init`, `apply` and `jit` calls of such models run inside this.

  The rules are kept here, not in `nn.logical_axis_rules`: with flax's rules and a
  mesh both set, `nn.DenseGeneral` constrains its flat kernel with the rank of the
  unflattened one and fails (flax 0.12), and params get their layout from `jit`.
  """
  token = _RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _RULES.reset(token)


def current_rules():
  """Rules of the enclosing `use_mesh`, else flax's `nn.logical_axis_rules`, else
  DEFAULT_RULES."""
  return _RULES.get() or nn.get_logical_axis_rules() or DEFAULT_RULES


def _axis_size(mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[axis] for axis in axes)


# ----------------------------------------------------------------------------------
# Logical axes -> shardings
# ----------------------------------------------------------------------------------
def _rule(name: str, rules) -> tuple[str, ...]:
  for logical, axes in rules:
    if logical == name:
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  raise ValueError(f"logical axis {name!r} has no sharding rule: add ({name!r}, "
                   "<mesh axes or None>) to the rules (see sharding.DEFAULT_RULES)")


def mesh_axes(name: str, mesh, rules=DEFAULT_RULES, dim: Optional[int] = None,
              used: Sequence[str] = ()) -> tuple[str, ...]:
  """Mesh axes that shard logical axis `name`.

  Rule axes missing from the mesh or already used by another dimension are skipped;
  with `dim`, trailing axes are dropped until the rest divide it (that dimension is
  then replicated over them rather than failing, e.g. an odd vocabulary).
  """
  axes = [axis for axis in _rule(name, rules) if axis in mesh.shape and axis not in used]
  while dim is not None and axes and dim % _axis_size(mesh, axes):
    axes.pop()
  return tuple(axes)


def _spec_part(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec of an array whose dimensions have logical `names`."""
  used, parts = set(), []
  for name, dim in zip(names, shape):
    axes = () if name is None else mesh_axes(name, mesh, rules, dim, tuple(used))
    used.update(axes)
    parts.append(_spec_part(axes))
  return P(*parts)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _leaf_sharding(leaf, mesh, rules):
  if not _is_box(leaf):
    return NamedSharding(mesh, P())
  if not hasattr(leaf.value, "shape"):  # e.g. optax's MaskedNode under a box
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), leaf.value)
  if isinstance(leaf, nn.LogicallyPartitioned):
    return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
  mesh_rules = tuple((n, n) for n in leaf.names if n is not None)  # names are mesh axes
  return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, mesh_rules))


def state_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree holding `nn.Partitioned` boxes (e.g. `jax.eval_shape`
  of `model.init`, or of `tx.init` on boxed params). The result has the structure of
  `nn.unbox(abstract_tree)`; unboxed leaves (step counts) are replicated."""
  return jax.tree_util.tree_map(lambda leaf: _leaf_sharding(leaf, mesh, rules),
                                abstract_tree, is_leaf=_is_box)


def opt_state_shardings(tx, abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings of `tx.init(params)`: every state leaf that sits under a param's path
  with that param's shape (moments, ...) takes the param's sharding.

  Unlike `state_shardings(jax.eval_shape(tx.init, boxed))` this builds the state from
  unboxed params, so optimizers whose labels read param paths see the real paths.
  """
  params = nn.unbox(abstract_boxed_params)
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree_util.tree_leaves(state_shardings(abstract_boxed_params, mesh, rules))):
    by_path[tuple(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      shape, sharding = by_path.get(path[start:], (None, None))
      if sharding is not None and shape == leaf.shape:
        return sharding
    return NamedSharding(mesh, P())

  state = jax.eval_shape(tx.init, params)
  return jax.tree_util.tree_map_with_path(pick, state)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, batch_size: Optional[int] = None
                   ) -> NamedSharding:
  """Sharding of `[B, ...]` inputs: the batch over the `batch` rule's mesh axes (those
  that divide `batch_size`, when given), the other dimensions replicated."""
  return NamedSharding(mesh, P(_spec_part(mesh_axes("batch", mesh, rules, batch_size))))


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of `abstract_tree` (boxed or not) laid out by `shardings`."""
  def nbytes(leaf, sharding):
    return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return int(sum(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(nbytes, nn.unbox(abstract_tree), shardings))))


def held_bytes(arrays) -> dict[int, int]:
  """Bytes each device (by id) holds of the placed `arrays`, from their shards: what
  the layout really put where (replicas count on every device that holds one)."""
  held: dict[int, int] = {}
  for array in arrays:
    for shard in array.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held


def describe_table_placement(tables) -> str:
  """One line on where the Engram tables of a training state live, e.g. `engram tables:
  2 layers, 4.0 MiB, row-sharded over 8 devices: 0.5 MiB per device`."""
  held = held_bytes(tables)  # this process's devices; the shards are alike elsewhere
  devices = len(set().union(*(t.sharding.device_set for t in tables)))
  total = sum(int(t.nbytes) for t in tables)
  mib = lambda n: f"{n / 2**20:.2f} MiB"
  layers = f"{len(tables)} layer{'s' if len(tables) != 1 else ''}"
  if devices == 1:
    return f"engram tables: {layers}, {mib(total)}, on one device"
  if max(held.values()) >= total:
    return f"engram tables: {layers}, {mib(total)}, replicated on {devices} devices"
  return (f"engram tables: {layers}, {mib(total)}, row-sharded over {devices} "
          f"devices: {mib(max(held.values()))} per device")


# ----------------------------------------------------------------------------------
# Row-sharded table lookup
# ----------------------------------------------------------------------------------
def lookup_comm_bytes(strategy: str, ids_per_device: int, width: int, itemsize: int,
                      shards: int) -> int:
  """Bytes each device sends for one forward lookup, ids batch-sharded over all
  `shards` table shards (ring collectives). The backward sends the row part again
  (the transposed reduce-scatter or all-to-all); ids carry no gradient.

  psum: all-gather of the int32 ids, then a reduce-scatter of `[shards * n, E]` rows.
  all_to_all: dense buckets `[shards, n]` (exact with static shapes: one shard may own
  every id), so ids and rows each cross the wire `shards - 1` times n.
  Both come to (shards - 1) * n * (4 + E * itemsize); a ragged all-to-all would send
  only the (shards - 1) / shards * n ids other shards own (not on XLA:CPU).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"engram.lookup={strategy!r}: choose one of {STRATEGIES}")
  return (shards - 1) * ids_per_device * (4 + width * itemsize)


def _owned_rows(table_local_RxE, row_ids, rows_per_shard, table_axes):
  """Rows this shard owns, zeros for ids owned elsewhere."""
  local = row_ids - jax.lax.axis_index(table_axes) * rows_per_shard
  owned = (local >= 0) & (local < rows_per_shard)
  rows = jnp.take(table_local_RxE, jnp.where(owned, local, 0), axis=0)
  return jnp.where(owned[..., None], rows, jnp.zeros((), rows.dtype))


def _psum_lookup(table_local_RxE, row_ids_BxTxH, *, rows_per_shard, table_axes,
                 batch_axes):
  """Ids gathered over the table axes that shard the batch; summed back by
  reduce-scatter over those and by psum over the table axes that do not."""
  gather_axes = tuple(axis for axis in batch_axes if axis in table_axes)
  sum_axes = tuple(axis for axis in table_axes if axis not in gather_axes)
  ids = row_ids_BxTxH
  if gather_axes:
    ids = jax.lax.all_gather(ids, gather_axes, axis=0, tiled=True)
  rows_BxTxHxE = _owned_rows(table_local_RxE, ids, rows_per_shard, table_axes)
  if gather_axes:
    rows_BxTxHxE = jax.lax.psum_scatter(rows_BxTxHxE, gather_axes, scatter_dimension=0,
                                        tiled=True)
  if sum_axes:
    rows_BxTxHxE = jax.lax.psum(rows_BxTxHxE, sum_axes)
  return rows_BxTxHxE


def _exchange(table_local_RxE, ids_J, rows_per_shard, table_axes, shards):
  """all_to_all lookup of flat ids: bucket by owner, exchange, gather, return."""
  n = ids_J.shape[0]
  owner_J = jnp.clip(ids_J // rows_per_shard, 0, shards - 1)
  order_J = jnp.argsort(owner_J, stable=True)
  counts_Sh = jnp.zeros((shards,), jnp.int32).at[owner_J].add(1)
  starts_Sh = jnp.cumsum(counts_Sh) - counts_Sh
  slot_sorted_J = jnp.arange(n, dtype=jnp.int32) - starts_Sh[owner_J[order_J]]
  slot_J = jnp.zeros((n,), jnp.int32).at[order_J].set(slot_sorted_J)
  # Bucket s holds the local row ids this device wants from shard s; unused slots
  # read row 0 and are never returned (their rows get zero gradient).
  send_ShxJ = jnp.zeros((shards, n), jnp.int32).at[owner_J, slot_J].set(
      ids_J - owner_J * rows_per_shard)
  recv_ShxJ = jax.lax.all_to_all(send_ShxJ, table_axes, 0, 0, tiled=True)
  rows_ShxJxE = jnp.take(table_local_RxE, recv_ShxJ, axis=0)
  back_ShxJxE = jax.lax.all_to_all(rows_ShxJxE, table_axes, 0, 0, tiled=True)
  return back_ShxJxE[owner_J, slot_J]


def _all_to_all_lookup(table_local_RxE, row_ids_BxTxH, *, rows_per_shard, table_axes,
                       batch_axes, mesh):
  """Each device looks up its own ids; table axes that do not shard the batch (ids
  replicated there) split the ids between them and all-gather the rows after."""
  shards = _axis_size(mesh, table_axes)
  split_axes = tuple(axis for axis in table_axes if axis not in batch_axes)
  ids_J = row_ids_BxTxH.reshape(-1)
  n = ids_J.shape[0]
  if split_axes:
    parts = _axis_size(mesh, split_axes)
    chunk = -(-n // parts)
    ids_J = jax.lax.dynamic_slice_in_dim(jnp.pad(ids_J, (0, chunk * parts - n)),
                                         jax.lax.axis_index(split_axes) * chunk, chunk)
  rows_JxE = _exchange(table_local_RxE, ids_J, rows_per_shard, table_axes, shards)
  if split_axes:
    rows_JxE = jax.lax.all_gather(rows_JxE, split_axes, axis=0, tiled=True,
                                  to="invarying")[:n]
  return rows_JxE.reshape(*row_ids_BxTxH.shape, table_local_RxE.shape[-1])


def table_shard_axes(mesh, rows: int, rules=None) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split a `rows`-row table as `state_shardings`
  lays it out (`table_rows` rule, axes that do not divide `rows` dropped)."""
  axes = mesh_axes("table_rows", mesh, rules or current_rules(), dim=rows)
  return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def sharded_lookup(table_RxE, row_ids_BxTxH, strategy: str, mesh=None, rules=None):
  """`jnp.take(table, ids, axis=0)` with the table's rows split over the mesh.

  The mesh and rules default to the ambient ones (`use_mesh`); the table is laid out
  by the `table_rows` rule and ids by the `batch` rule (replicated when the batch does
  not divide), matching `state_shardings`, so nothing is resharded on entry.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"engram.lookup={strategy!r} is not a sharded lookup: choose one "
                     f"of {STRATEGIES}")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    raise ValueError(f"engram.lookup={strategy!r} needs a device mesh and none is set: "
                     "run init/apply under `sharding.use_mesh(mesh)` (or jax.set_mesh), "
                     "or set engram.lookup='gather'")
  rules = rules or current_rules()
  rows, _ = table_RxE.shape
  nontrivial = lambda axes: tuple(axis for axis in axes if mesh.shape[axis] > 1)
  table_axes = nontrivial(mesh_axes("table_rows", mesh, rules))  # no 1-device collectives
  if not table_axes:
    return jnp.take(table_RxE, row_ids_BxTxH, axis=0, mode="clip")
  shards = _axis_size(mesh, table_axes)
  if rows % shards:
    raise ValueError(f"engram.table_row_multiple: the table's {rows} rows do not split "
                     f"over the {shards} devices of mesh axes {table_axes}; set "
                     f"engram.table_row_multiple to a multiple of {shards}")
  batch_axes = nontrivial(mesh_axes("batch", mesh, rules, dim=row_ids_BxTxH.shape[0]))
  if strategy == "psum":
    body = functools.partial(_psum_lookup, table_axes=table_axes, batch_axes=batch_axes,
                             rows_per_shard=rows // shards)
  else:
    body = functools.partial(_all_to_all_lookup, table_axes=table_axes,
                             batch_axes=batch_axes, rows_per_shard=rows // shards,
                             mesh=mesh)
  ids_spec = P(_spec_part(batch_axes))
  return jax.shard_map(body, mesh=mesh, in_specs=(P(_spec_part(table_axes), None), ids_spec),
                       out_specs=ids_spec)(table_RxE, row_ids_BxTxH.astype(jnp.int32))
