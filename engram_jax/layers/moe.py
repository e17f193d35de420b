"""DeepSeek-style mixture-of-experts FFN: shared experts + fine-grained routed experts.

For a token x (width D), with router W_r [D, X] and expert FFNs FFN_e (SwiGLU, hidden F):

  s     = sigmoid(x W_r)  or  softmax(x W_r)                affinities, float32 [X]
  top   = TopK(s + b, k)                                    b: balancing bias ("bias"), else 0
  g_e   = s_e / sum_{j in top} s_j  (e in top)              normalised (optional) * scale
  y     = sum_{i < num_shared} FFN_shared_i(x) + sum_{e in top} g_e FFN_e(x)

Routed experts run only on the tokens that chose them: assignments (token, expert) are
sorted by expert, and each expert multiplies either its contiguous run (dropless: a
grouped matmul, `jax.lax.ragged_dot` or block-sparse tiles) or a fixed `[X, Cap, D]`
buffer (`capacity_factor`: an over-full expert drops its lowest-affinity assignments).
With an `expert` mesh axis the experts are sharded and tokens travel to their experts'
devices by `all_to_all` inside `shard_map`.

Statistics go to the `intermediates` collection (`STATS`): `load` [X] (assignments per
expert), `dropped_fraction`, `max_violation` and, with `balance="aux_loss"`,
`aux_loss` (already times `aux_loss_coef`). Read them with
`model.apply(..., mutable=[STATS])`; `total_aux_loss` sums the losses of all layers and
`update_routing_biases` applies DeepSeek-V3's loss-free bias update. See docs/moe.md.

Shapes (docs/architecture.md): X routed experts, Xk experts per token (top-k), F expert
hidden width, BT = B*T tokens (bt: one shard's tokens), Z (token, expert) assignments
(BT*Xk) or the rows holding them, Cap slots per expert (capacity), Sl slots of a buffer,
Sh shards of a mesh axis.
"""
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from engram_jax import config as config_lib
from engram_jax.layers.mlp import SwiGLU

STATS = "intermediates"       # collection the routing statistics are sown into
BIAS = "routing"              # collection holding the loss-free balancing bias


class Routing(NamedTuple):
  """The router's decision for BT tokens choosing Xk experts each."""
  experts_BTxXk: jax.Array    # int32 expert ids, distinct per token
  weights_BTxXk: jax.Array    # float32 gate weights g (normalised, scaled)
  priority_BTxXk: jax.Array   # float32 unbiased affinities s of the chosen experts
  scores_BTxX: jax.Array      # float32 affinities of all experts (for the aux loss)


def route(logits_BTxX, top_k: int, score_fn: str = "sigmoid", normalize: bool = True,
          scale: float = 1.0, bias_X: Optional[jax.Array] = None) -> Routing:
  """Top-k routing; the bias only steers selection, the weights use the plain scores."""
  logits_BTxX = logits_BTxX.astype(jnp.float32)
  if score_fn == "sigmoid":
    scores_BTxX = jax.nn.sigmoid(logits_BTxX)
  else:
    scores_BTxX = jax.nn.softmax(logits_BTxX, axis=-1)
  select_BTxX = scores_BTxX if bias_X is None else scores_BTxX + bias_X.astype(jnp.float32)
  _, experts_BTxXk = jax.lax.top_k(select_BTxX, top_k)
  chosen_BTxXk = jnp.take_along_axis(scores_BTxX, experts_BTxXk, axis=-1)
  weights_BTxXk = chosen_BTxXk
  if normalize:
    weights_BTxXk = chosen_BTxXk / jnp.sum(chosen_BTxXk, axis=-1, keepdims=True)
  return Routing(experts_BTxXk.astype(jnp.int32), weights_BTxXk * scale, chosen_BTxXk,
                 scores_BTxX)


def expert_capacity(tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / X), at most `tokens`, at least 1."""
  return int(min(tokens, max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))))


def aux_balance_loss(scores_BxTxX, experts_BxTxXk) -> jax.Array:
  """Sequence-wise balance loss (DeepSeek-V3), without its coefficient.

  f_e = X / (Xk T) * #{t: e in top_t}, P_e = mean_t s'_{t,e} with s' = s / sum_j s_j;
  loss = mean over sequences of sum_e f_e P_e. It is 1 whenever every expert gets its
  share Xk T / X of each sequence, and up to X / Xk when all tokens pick the same experts.
  Only P carries gradient (the counts are piecewise constant).
  """
  _, t, e = scores_BxTxX.shape
  k = experts_BxTxXk.shape[-1]
  probs = scores_BxTxX / jnp.sum(scores_BxTxX, axis=-1, keepdims=True)
  p_BxX = jnp.mean(probs, axis=1)
  counts_BxX = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), length=e))(experts_BxTxXk)
  f_BxX = counts_BxX.astype(jnp.float32) * (e / (k * t))
  return jnp.mean(jnp.sum(f_BxX * p_BxX, axis=-1))


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
  return jnp.einsum("gcf,gfd->gcd", nn.silu(gate) * up, w_down_XxFxD)


def swiglu_ragged(x_ZxD, group_sizes_X, w_gate_XxDxF, w_up_XxDxF, w_down_XxFxD):
  """Rows sorted by expert; expert g's rows go through its FFN. Rows past them give 0.

  `jax.lax.ragged_dot`: a grouped GEMM where the backend has one (TPU). XLA:CPU lowers
  it to a dense matmul against every expert's weights, masked (X times the FLOPs).
  """
  gate_ZxF = jax.lax.ragged_dot(x_ZxD, w_gate_XxDxF, group_sizes_X)
  up_ZxF = jax.lax.ragged_dot(x_ZxD, w_up_XxDxF, group_sizes_X)
  return jax.lax.ragged_dot(nn.silu(gate_ZxF) * up_ZxF, w_down_XxFxD, group_sizes_X)


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


# ----------------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------------
def _expert_init(in_axis: int, out_axis: int, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(
      nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis, batch_axis=(0,)),
      axes)


class MoE(nn.Module):
  """Shared + routed SwiGLU experts: `[B, T, D] -> [B, T, D]`, as `cfg` (a MoEConfig) says.

  cfg.num_experts / expert_dim / top_k: routed experts, their hidden size, experts per
    token. cfg.num_shared / shared_dim: always-on experts (one SwiGLU of hidden
    num_shared * shared_dim, which equals their sum); shared_dim 0 = expert_dim.
  cfg.score_fn: "sigmoid" (DeepSeek-V3) or "softmax" (V2); normalize_weights: divide the
    chosen scores by their sum; routed_scale: multiplies the routed weights.
  cfg.balance: "aux_loss" (sown loss times aux_loss_coef, add it to the training loss),
    "bias" (loss-free: a per-expert bias in the `routing` collection steers top-k;
    the trainer updates it with `update_routing_biases`), or "none".
  cfg.capacity_factor: 0 = dropless (grouped matmuls); > 0 = fixed buffers of
    expert_capacity(BT, Xk, X, factor) rows per expert, lowest-affinity overflow dropped.
  cfg.group_matmul: the dropless grouped matmul: "ragged_dot", "tiles" (block-sparse
    batched matmuls of `tile` rows) or "auto" (ragged_dot on TPU, tiles elsewhere).
  cfg.dispatch: "sort" (the layer) or "one_hot" (dense reference for tests/benchmarks).
  expert_axis: mesh axis the experts are sharded over; used when the mesh (`mesh`, or
    the one set with `jax.set_mesh`) has it with size > 1. Tokens are split over it and
    over the `batch_axes` present in the mesh.
  `config.validate_moe` checks `cfg` when the layer is first traced; an invalid field
  raises ValueError naming it (`moe.<field>`).
  """
  cfg: config_lib.MoEConfig
  expert_axis: Optional[str] = "expert"
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  mesh: Optional[jax.sharding.Mesh] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _ep_mesh(self):
    """The mesh to shard experts over, or None for the single-device path."""
    mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
    if (self.expert_axis is None or self.cfg.dispatch != "sort" or
        self.expert_axis not in mesh.axis_names or mesh.shape[self.expert_axis] == 1):
      return None
    if self.cfg.num_experts % mesh.shape[self.expert_axis]:
      raise ValueError(
          f"moe.num_experts={self.cfg.num_experts} must be a multiple of the "
          f"'{self.expert_axis}' mesh axis size {mesh.shape[self.expert_axis]}; change "
          "num_experts or the mesh (or set expert_axis=None to replicate experts)")
    return mesh

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    if not cfg.enabled:
      raise ValueError(f"moe.num_experts={cfg.num_experts!r} is invalid: an MoE layer "
                       "needs >= 1 routed expert")
    config_lib.validate_moe(cfg)
    b, t, d = x_BxTxD.shape
    e, k, f = cfg.num_experts, cfg.top_k, cfg.expert_dim
    x_BTxD = x_BxTxD.reshape(b * t, d)

    router_DxX = self.param(
        "router", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("embed", "experts")),
        (d, e), self.param_dtype)
    bias_X = None
    if cfg.balance == "bias":
      bias_X = self.variable(BIAS, "bias", jnp.zeros, (e,), jnp.float32).value
    routing = route(x_BTxD.astype(jnp.float32) @ router_DxX.astype(jnp.float32), k,
                    cfg.score_fn, cfg.normalize_weights, cfg.routed_scale, bias_X)

    kernels = tuple(self.param(name, init, shape, self.param_dtype).astype(self.dtype)
                    for name, init, shape in (
                        ("gate", _expert_init(1, 2, ("experts", "embed", "mlp")), (e, d, f)),
                        ("up", _expert_init(1, 2, ("experts", "embed", "mlp")), (e, d, f)),
                        ("down", _expert_init(1, 2, ("experts", "mlp", "embed")), (e, f, d))))
    y_BTxXkxD, kept_BTxXk = self._experts(x_BTxD.astype(self.dtype), routing, kernels)
    y_BTxD = jnp.einsum("nk,nkd->nd", routing.weights_BTxXk.astype(self.dtype), y_BTxXkxD)

    load_X = jnp.bincount(routing.experts_BTxXk.reshape(-1), length=e).astype(jnp.float32)
    self.sow(STATS, "load", load_X)
    self.sow(STATS, "dropped_fraction", 1.0 - jnp.mean(kept_BTxXk.astype(jnp.float32)))
    self.sow(STATS, "max_violation", jnp.max(load_X) / jnp.mean(load_X) - 1.0)
    if cfg.balance == "aux_loss":
      self.sow(STATS, "aux_loss", cfg.aux_loss_coef * aux_balance_loss(
          routing.scores_BTxX.reshape(b, t, e), routing.experts_BTxXk.reshape(b, t, k)))

    if cfg.num_shared:
      y_BTxD = y_BTxD + SwiGLU(cfg.num_shared * cfg.resolved_shared_dim, self.dtype,
                             self.param_dtype, name="shared")(x_BTxD)
    return y_BTxD.reshape(b, t, d).astype(self.dtype)

  def _experts(self, x_BTxD, routing: Routing, kernels):
    """Per-assignment expert outputs `[BT, Xk, D]` and which assignments were kept."""
    experts_BTxXk, priority_BTxXk = routing.experts_BTxXk, routing.priority_BTxXk
    cfg, capacity = self.cfg, None
    capacity_factor = cfg.capacity_factor or None     # 0 = dropless
    if capacity_factor is not None:
      capacity = expert_capacity(x_BTxD.shape[0], cfg.top_k, cfg.num_experts,
                                 capacity_factor)
    if cfg.dispatch == "one_hot":
      return one_hot_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, capacity)
    grouped = grouped_swiglu(cfg.group_matmul, cfg.tile)
    mesh = self._ep_mesh()
    if mesh is not None:
      token_axes = tuple(a for a in self.batch_axes
                         if a in mesh.axis_names and a != self.expert_axis)
      token_axes += (self.expert_axis,)
      shards = int(np.prod([mesh.shape[a] for a in token_axes]))
      if x_BTxD.shape[0] % shards:
        raise ValueError(
            f"MoE: batch * length = {x_BTxD.shape[0]} tokens must be a multiple of the "
            f"{shards} shards of mesh axes {token_axes} (MoE.batch_axes + "
            "MoE.expert_axis); change the batch or sequence length")
      return expert_parallel_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, mesh=mesh,
                                     expert_axis=self.expert_axis, token_axes=token_axes,
                                     capacity_factor=capacity_factor, grouped=grouped)
    if capacity is None:
      return (sorted_experts(x_BTxD, experts_BTxXk, kernels, grouped),
              jnp.ones(experts_BTxXk.shape, bool))
    return capacity_experts(x_BTxD, experts_BTxXk, priority_BTxXk, kernels, capacity)


# ----------------------------------------------------------------------------------
# For the trainer.
# ----------------------------------------------------------------------------------
def _stat_leaves(stats, name: str):
  """(path prefix, value) of every sown `name`; repeated sows of one module are summed."""
  flat = traverse_util.flatten_dict(nn.unbox(stats), keep_empty_nodes=False)
  out = {}
  for path, value in flat.items():
    if path[-1] == name:
      out[path[:-1]] = sum(value) if isinstance(value, tuple) else value
  return out


def total_aux_loss(stats) -> jax.Array:
  """Sum of every MoE layer's (scaled) aux loss in a `STATS` collection; 0 if none."""
  return sum((jnp.sum(v) for v in _stat_leaves(stats, "aux_loss").values()),
             jnp.zeros((), jnp.float32))


def update_routing_bias(bias_X, load_X, rate: float):
  """DeepSeek-V3 loss-free balancing: b_e += rate * sign(mean load - load_e).

  Under-loaded experts become more likely to be picked, over-loaded ones less. `[..., X]`:
  works on any leading axes (e.g. the layers of a scanned run, `[Ls, X]`).
  """
  mean = jnp.mean(load_X, axis=-1, keepdims=True)
  return bias_X + rate * jnp.sign(mean - load_X).astype(bias_X.dtype)


def update_routing_biases(routing, stats, rate: float):
  """Applies `update_routing_bias` to every bias in a `routing` collection.

  Each bias at `path/bias` uses the load sown at `path/load` in `stats`.
  """
  loads = _stat_leaves(stats, "load")
  flat = traverse_util.flatten_dict(nn.unbox(routing))
  updated = {}
  for path, bias in flat.items():
    if path[:-1] not in loads:
      raise KeyError(f"update_routing_biases: no sown 'load' for {'/'.join(path)}; apply "
                     f"the model with mutable=['{STATS}'] and pass that collection")
    updated[path] = update_routing_bias(bias, loads[path[:-1]], rate)
  return traverse_util.unflatten_dict(updated)
