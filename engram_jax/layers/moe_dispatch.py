"""How a MoE layer's (token, expert) assignments reach their experts and come back.

- `sorted_experts`: dropless; assignments sorted by expert, each expert's contiguous run
  through a grouped matmul (`grouped_swiglu`: `jax.lax.ragged_dot`, block-sparse tiles,
  or one fixed buffer per expert).
- `capacity_experts`: a fixed `[X, Cap, D]` buffer per expert (`expert_capacity` slots);
  an over-full expert drops its lowest-priority assignments.
- `one_hot_experts`: every expert on every token, masked (tiny models, and the
  reference the others are tested against).
- `expert_parallel_experts`: experts sharded over an `expert` mesh axis; tokens travel
  to their experts' devices and back by `all_to_all` inside `shard_map`.

Shapes as in `layers/moe.py` (docs/architecture.md).
"""
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def expert_capacity(tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / X), at most `tokens`, at least 1."""
  return int(min(tokens, max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))))


# ----------------------------------------------------------------------------------
# Moving rows. Row moves are gathers: XLA:CPU scatters rows one element at a time, far
# slower than a gather, so only int32 index maps are scattered.
# ----------------------------------------------------------------------------------
def _unsort(rows_ZxD, order_Z):
  """Inverse of `rows = x[order]`."""
  a = order_Z.shape[0]
  inverse_Z = jnp.zeros((a,), jnp.int32).at[order_Z].set(
      jnp.arange(a, dtype=jnp.int32), unique_indices=True)
  return rows_ZxD[inverse_Z]


def _fill(x_BTxD, token_Z, slot_Z, slots: int):
  """Buffer of `slots` rows, row slot_Z[a] = x[token_Z[a]]; others (and drops) are 0."""
  source_Sl = jnp.full((slots,), x_BTxD.shape[0], jnp.int32).at[slot_Z].set(
      token_Z.astype(jnp.int32), mode="drop", unique_indices=True)
  return jnp.take(x_BTxD, source_Sl, axis=0, mode="fill", fill_value=0)


def _read(buf_SlxD, slot_Z):
  """Rows of the buffer per assignment; dropped assignments read zeros."""
  return jnp.take(buf_SlxD, slot_Z, axis=0, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------------
# Grouped expert FFNs: rows sorted by expert, each group through its own SwiGLU.
# ----------------------------------------------------------------------------------
def swiglu_batched(x_XxCapxD, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD):
  """Every expert (or tile) on its own fixed-size buffer of Cap rows."""
  gate = jnp.einsum("gcd,gdf->gcf", x_XxCapxD, w_gate_XxDxF)
  up = jnp.einsum("gcd,gdf->gcf", x_XxCapxD, w_up_XxDxF)
  return jnp.einsum("gcf,gfd->gcd", jax.nn.silu(gate) * up, w_down_XxFxD)


def swiglu_ragged(x_ZxD, group_sizes_X, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD):
  """Rows sorted by expert; expert g's rows go through its FFN. Rows past them give 0.

  `jax.lax.ragged_dot`: a grouped GEMM where the backend has one (TPU). XLA:CPU lowers
  it to a dense matmul against every expert's weights, masked (X times the FLOPs).
  """
  gate_ZxF = jax.lax.ragged_dot(x_ZxD, w_gate_XxDxF, group_sizes_X)
  up_ZxF = jax.lax.ragged_dot(x_ZxD, w_up_XxDxF, group_sizes_X)
  return jax.lax.ragged_dot(jax.nn.silu(gate_ZxF) * up_ZxF, w_down_XxFxD, group_sizes_X)


def tile_rows(rows: int, groups: int, tile: int) -> int:
  """Tile height: `tile`, or less when there are few rows per group (bounds the padding)."""
  return int(max(1, min(tile, math.ceil(rows / groups))))


def swiglu_tiled(x_ZxD, group_sizes_X, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD,
                 tile: int = 128):
  """Same contract as `swiglu_ragged`, as block-sparse batched matmuls (any backend).

  Each group's rows are padded to a multiple of the tile height, so every tile holds one
  group; tile j then multiplies the weights of its group, gathered per tile. FLOPs are
  those of the rows plus at most X tiles of padding; memory holds the gathered weights
  of ceil(Z / tile) + X tiles.
  """
  r, d = x_ZxD.shape
  g = group_sizes_X.shape[0]
  tile = tile_rows(r, g, tile)
  tiles = math.ceil(r / tile) + g
  ends_X = jnp.cumsum(group_sizes_X)
  padded_X = (group_sizes_X + tile - 1) // tile * tile
  padded_ends_X = jnp.cumsum(padded_X)
  index_Z = jnp.arange(r, dtype=ends_X.dtype)
  group_Z = jnp.searchsorted(ends_X, index_Z, side="right")       # X past the groups
  safe_Z = jnp.minimum(group_Z, g - 1)
  dest_Z = jnp.where(group_Z < g,
                     padded_ends_X[safe_Z] - padded_X[safe_Z] + index_Z -
                     (ends_X[safe_Z] - group_sizes_X[safe_Z]), tiles * tile)
  buf = _fill(x_ZxD, index_Z, dest_Z, tiles * tile)
  tile_group = jnp.minimum(jnp.searchsorted(
      padded_ends_X, jnp.arange(tiles, dtype=ends_X.dtype) * tile, side="right"), g - 1)
  out = swiglu_batched(buf.reshape(tiles, tile, d), w_gate_XxDxF[tile_group],
                       w_up_XxDxF[tile_group], w_down_XxFxD[tile_group])
  return _read(out.reshape(tiles * tile, d), dest_Z)


def grouped_swiglu(method: str, tile: int = 128):
  """The grouped expert FFN for `method`; "auto" = ragged_dot on TPU, tiles elsewhere."""
  if method == "auto":
    method = "ragged_dot" if jax.default_backend() == "tpu" else "tiles"
  if method == "ragged_dot":
    return swiglu_ragged
  return functools.partial(swiglu_tiled, tile=tile)


# ----------------------------------------------------------------------------------
# Dispatch: Xk experts per token, per-assignment outputs [BT, Xk, D].
# ----------------------------------------------------------------------------------
def _group_by_expert(experts_Z, priority_Z, num_experts: int):
  """Sorts assignments by expert, highest priority first within an expert.

  Returns the order, the sorted expert ids and each sorted assignment's rank in its
  expert (0 = highest affinity; ties keep token order).
  """
  a = experts_Z.shape[0]
  order_Z = jnp.argsort(-priority_Z, stable=True)
  order_Z = order_Z[jnp.argsort(experts_Z[order_Z], stable=True)]
  sorted_Z = experts_Z[order_Z]
  sizes_X = jnp.bincount(experts_Z, length=num_experts)
  starts_X = jnp.cumsum(sizes_X) - sizes_X
  rank_Z = jnp.arange(a, dtype=jnp.int32) - starts_X[sorted_Z].astype(jnp.int32)
  return order_Z, sorted_Z, rank_Z


def sorted_experts(x_BTxD, experts_BTxXk, kernels, grouped=None):
  """Dropless: sort assignments by expert, one grouped matmul per weight; [BT, Xk, D].

  grouped: a `grouped_swiglu(...)` function (default: the "auto" one).
  """
  grouped = grouped or grouped_swiglu("auto")
  n, k = experts_BTxXk.shape
  num_experts = kernels[0].shape[0]
  flat_Z = experts_BTxXk.reshape(-1)
  order_Z = jnp.argsort(flat_Z, stable=True)
  sizes_X = jnp.bincount(flat_Z, length=num_experts)
  out_ZxD = grouped(x_BTxD[order_Z // k], sizes_X, *kernels)
  return _unsort(out_ZxD, order_Z).reshape(n, k, -1)


def _capacity_slots(experts_BTxXk, priority_BTxXk, num_experts: int, capacity: int):
  """Buffer slot of every sorted assignment (X * Cap = dropped) and its token."""
  k = experts_BTxXk.shape[1]
  order_Z, sorted_Z, rank_Z = _group_by_expert(
      experts_BTxXk.reshape(-1), priority_BTxXk.reshape(-1), num_experts)
  kept_Z = rank_Z < capacity
  slot_Z = jnp.where(kept_Z, sorted_Z * capacity + rank_Z, num_experts * capacity)
  return order_Z, order_Z // k, slot_Z, kept_Z


def capacity_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, capacity: int):
  """Each expert takes its `capacity` highest-affinity assignments; [BT,Xk,D], kept [BT,Xk]."""
  n, k = experts_BTxXk.shape
  num_experts = kernels[0].shape[0]
  order_Z, token_Z, slot_Z, kept_Z = _capacity_slots(
      experts_BTxXk, priority_BTxXk, num_experts, capacity)
  buf = _fill(x_BTxD, token_Z, slot_Z, num_experts * capacity)
  out = swiglu_batched(buf.reshape(num_experts, capacity, -1), *kernels)
  rows_ZxD = _read(out.reshape(num_experts * capacity, -1), slot_Z)
  kept_BTxXk = jnp.zeros_like(kept_Z).at[order_Z].set(kept_Z).reshape(n, k)
  return _unsort(rows_ZxD, order_Z).reshape(n, k, -1), kept_BTxXk


def one_hot_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, capacity=None):
  """Reference for tests and benchmarks only: every expert runs on every token.

  O(BT X) expert compute; drop decisions by pairwise comparison, O(Z^2). Same
  outputs as `sorted_experts` / `capacity_experts`.
  """
  n, k = experts_BTxXk.shape
  y_BTxXxD = swiglu_batched(jnp.broadcast_to(x_BTxD, (kernels[0].shape[0],) + x_BTxD.shape),
                           *kernels).transpose(1, 0, 2)
  y_BTxXkxD = jnp.take_along_axis(y_BTxXxD, experts_BTxXk[..., None], axis=1)
  if capacity is None:
    return y_BTxXkxD, jnp.ones((n, k), bool)
  e_Z, p_Z = experts_BTxXk.reshape(-1), priority_BTxXk.reshape(-1)
  index_Z = jnp.arange(n * k)
  ahead_ZxZ = (e_Z[None, :] == e_Z[:, None]) & (
      (p_Z[None, :] > p_Z[:, None]) |
      ((p_Z[None, :] == p_Z[:, None]) & (index_Z[None, :] < index_Z[:, None])))
  kept_BTxXk = (jnp.sum(ahead_ZxZ, axis=1) < capacity).reshape(n, k)
  return y_BTxXkxD * kept_BTxXk[..., None].astype(y_BTxXkxD.dtype), kept_BTxXk


# ----------------------------------------------------------------------------------
# Expert parallelism: experts sharded over a mesh axis, tokens moved by all_to_all.
# ----------------------------------------------------------------------------------
def _ep_dropless(x_btxD, experts_btxXk, kernels, *, axis: str, num_experts: int, grouped):
  """One shard's tokens to their experts' shards and back, nothing dropped.

  XLA:CPU has no ragged all-to-all, so each destination gets a fixed block of
  bt * min(Xk, X_local) rows: a token picks distinct experts, so it sends at most
  min(Xk, X_local) rows to one shard and no row is ever lost. Empty rows carry the
  sentinel expert X_local and are skipped by the grouped matmuls.
  """
  n, k = experts_btxXk.shape
  shards = jax.lax.axis_size(axis)
  local = num_experts // shards
  block = n * min(k, local)
  flat_Z = experts_btxXk.reshape(-1)
  order_Z = jnp.argsort(flat_Z, stable=True)
  sorted_Z = flat_Z[order_Z]
  dest_Z = sorted_Z // local
  sizes_Sh = jnp.bincount(dest_Z, length=shards)
  starts_Sh = jnp.cumsum(sizes_Sh) - sizes_Sh
  slot_Z = dest_Z * block + jnp.arange(n * k) - starts_Sh[dest_Z]
  send_x = _fill(x_btxD, order_Z // k, slot_Z, shards * block)
  send_e = jnp.full((shards * block,), local, jnp.int32).at[slot_Z].set(sorted_Z % local)
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)
  local_order = jnp.argsort(recv_e, stable=True)
  out = grouped(recv_x[local_order], jnp.bincount(recv_e, length=local), *kernels)
  back = jax.lax.all_to_all(_unsort(out, local_order), axis, 0, 0, tiled=True)
  return _unsort(back[slot_Z], order_Z).reshape(n, k, -1), jnp.ones((n, k), bool)


def _ep_capacity(x_btxD, experts_btxXk, priority_btxXk, kernels, *, axis: str,
                 num_experts: int, capacity: int):
  """Capacity per (source shard, expert): `[X, Cap]` buffers go to the experts' shards."""
  n, k = experts_btxXk.shape
  shards = jax.lax.axis_size(axis)
  local = num_experts // shards
  order_Z, token_Z, slot_Z, kept_Z = _capacity_slots(
      experts_btxXk, priority_btxXk, num_experts, capacity)
  buf = _fill(x_btxD, token_Z, slot_Z, num_experts * capacity)
  recv = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)        # [Sh, X_local, Cap] rows
  recv_local = recv.reshape(shards, local, capacity, -1).transpose(1, 0, 2, 3).reshape(
      local, shards * capacity, -1)                              # [X_local, Sh * Cap, D]
  out = swiglu_batched(recv_local, *kernels)
  out = out.reshape(local, shards, capacity, -1).transpose(1, 0, 2, 3).reshape(
      num_experts * capacity, -1)
  rows_ZxD = _read(jax.lax.all_to_all(out, axis, 0, 0, tiled=True), slot_Z)
  kept_btxXk = jnp.zeros_like(kept_Z).at[order_Z].set(kept_Z).reshape(n, k)
  return _unsort(rows_ZxD, order_Z).reshape(n, k, -1), kept_btxXk


def expert_parallel_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, *, mesh,
                            expert_axis: str, token_axes: Sequence[str],
                            capacity_factor: Optional[float] = None, grouped=None):
  """Routed experts with X sharded over `expert_axis` and tokens over `token_axes`.

  Same outputs as `sorted_experts` (dropless) or, when no expert is over capacity,
  `capacity_experts`; with drops, capacity is per source shard (as GShard's groups).
  """
  num_experts = kernels[0].shape[0]
  grouped = grouped or grouped_swiglu("auto")
  tokens = P(tuple(token_axes))
  experts = P(expert_axis)
  if capacity_factor is None:
    def local(x, e, _, *ws):
      return _ep_dropless(x, e, ws, axis=expert_axis, num_experts=num_experts,
                          grouped=grouped)
  else:
    shards = int(np.prod([mesh.shape[a] for a in token_axes]))
    capacity = expert_capacity(x_BTxD.shape[0] // shards, experts_BTxXk.shape[1],
                               num_experts, capacity_factor)

    def local(x, e, p, *ws):
      return _ep_capacity(x, e, p, ws, axis=expert_axis, num_experts=num_experts,
                          capacity=capacity)
  args = (x_BTxD, experts_BTxXk, priority_BTxXk) + tuple(kernels)
  specs = (tokens,) * 3 + (experts,) * 3
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    args = tuple(jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, s))
                 for a, s in zip(args, specs))
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(tokens, tokens))(*args)
