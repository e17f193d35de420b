"""DeepSeek-style mixture-of-experts FFN: shared experts + fine-grained routed experts.

For a token x (width D), with router W_r [D, E] and expert FFNs FFN_e (SwiGLU, hidden F):

  s     = sigmoid(x W_r)  or  softmax(x W_r)                affinities, float32 [E]
  top   = TopK(s + b, k)                                    b: balancing bias ("bias"), else 0
  g_e   = s_e / sum_{j in top} s_j  (e in top)              normalised (optional) * scale
  y     = sum_{i < num_shared} FFN_shared_i(x) + sum_{e in top} g_e FFN_e(x)

Routed experts run only on the tokens that chose them: assignments (token, expert) are
sorted by expert, and each expert multiplies either its contiguous run (dropless: a
grouped matmul, `jax.lax.ragged_dot` or block-sparse tiles) or a fixed `[E, C, D]`
buffer (`capacity_factor`: an over-full expert drops its lowest-affinity assignments).
With an `expert` mesh axis the experts are sharded and tokens travel to their experts'
devices by `all_to_all` inside `shard_map`.

Statistics go to the `intermediates` collection (`STATS`): `load` [E] (assignments per
expert), `dropped_fraction`, `max_violation` and, with `balance="aux_loss"`,
`aux_loss` (already times `aux_loss_coef`). Read them with
`model.apply(..., mutable=[STATS])`; `total_aux_loss` sums the losses of all layers and
`update_routing_biases` applies DeepSeek-V3's loss-free bias update. See docs/moe.md.
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
  """The router's decision for N tokens choosing K experts each."""
  experts_NxK: jax.Array     # int32 expert ids, distinct per token
  weights_NxK: jax.Array     # float32 gate weights g (normalised, scaled)
  priority_NxK: jax.Array    # float32 unbiased affinities s of the chosen experts
  scores_NxE: jax.Array      # float32 affinities of all experts (for the aux loss)


def route(logits_NxE, top_k: int, score_fn: str = "sigmoid", normalize: bool = True,
          scale: float = 1.0, bias_E: Optional[jax.Array] = None) -> Routing:
  """Top-k routing; the bias only steers selection, the weights use the plain scores."""
  logits_NxE = logits_NxE.astype(jnp.float32)
  if score_fn == "sigmoid":
    scores_NxE = jax.nn.sigmoid(logits_NxE)
  else:
    scores_NxE = jax.nn.softmax(logits_NxE, axis=-1)
  select_NxE = scores_NxE if bias_E is None else scores_NxE + bias_E.astype(jnp.float32)
  _, experts_NxK = jax.lax.top_k(select_NxE, top_k)
  chosen_NxK = jnp.take_along_axis(scores_NxE, experts_NxK, axis=-1)
  weights_NxK = chosen_NxK
  if normalize:
    weights_NxK = chosen_NxK / jnp.sum(chosen_NxK, axis=-1, keepdims=True)
  return Routing(experts_NxK.astype(jnp.int32), weights_NxK * scale, chosen_NxK, scores_NxE)


def expert_capacity(tokens: int, top_k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ceil(factor * tokens * k / E), at most `tokens`, at least 1."""
  return int(min(tokens, max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))))


def aux_balance_loss(scores_BxTxE, experts_BxTxK) -> jax.Array:
  """Sequence-wise balance loss (DeepSeek-V3), without its coefficient.

  f_e = E / (K T) * #{t: e in top_t}, P_e = mean_t s'_{t,e} with s' = s / sum_j s_j;
  loss = mean over sequences of sum_e f_e P_e. It is 1 whenever every expert gets its
  share K T / E of each sequence, and up to E / K when all tokens pick the same experts.
  Only P carries gradient (the counts are piecewise constant).
  """
  _, t, e = scores_BxTxE.shape
  k = experts_BxTxK.shape[-1]
  probs = scores_BxTxE / jnp.sum(scores_BxTxE, axis=-1, keepdims=True)
  p_BxE = jnp.mean(probs, axis=1)
  counts_BxE = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), length=e))(experts_BxTxK)
  f_BxE = counts_BxE.astype(jnp.float32) * (e / (k * t))
  return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


# ----------------------------------------------------------------------------------
# Moving rows. Row moves are gathers: XLA:CPU scatters rows one element at a time, far
# slower than a gather, so only int32 index maps are scattered.
# ----------------------------------------------------------------------------------
def _unsort(rows_AxD, order_A):
  """Inverse of `rows = x[order]`."""
  a = order_A.shape[0]
  inverse_A = jnp.zeros((a,), jnp.int32).at[order_A].set(
      jnp.arange(a, dtype=jnp.int32), unique_indices=True)
  return rows_AxD[inverse_A]


def _fill(x_NxD, token_A, slot_A, slots: int):
  """Buffer of `slots` rows, row slot_A[a] = x[token_A[a]]; others (and drops) are 0."""
  source_S = jnp.full((slots,), x_NxD.shape[0], jnp.int32).at[slot_A].set(
      token_A.astype(jnp.int32), mode="drop", unique_indices=True)
  return jnp.take(x_NxD, source_S, axis=0, mode="fill", fill_value=0)


def _read(buf_SxD, slot_A):
  """Rows of the buffer per assignment; dropped assignments read zeros."""
  return jnp.take(buf_SxD, slot_A, axis=0, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------------
# Grouped expert FFNs: rows sorted by expert, each group through its own SwiGLU.
# ----------------------------------------------------------------------------------
def swiglu_batched(x_GxCxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD):
  """Every expert g on its own fixed-size buffer of C rows."""
  gate = jnp.einsum("gcd,gdf->gcf", x_GxCxD, w_gate_GxDxF)
  up = jnp.einsum("gcd,gdf->gcf", x_GxCxD, w_up_GxDxF)
  return jnp.einsum("gcf,gfd->gcd", nn.silu(gate) * up, w_down_GxFxD)


def swiglu_ragged(x_RxD, group_sizes_G, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD):
  """Rows sorted by group; group g's rows go through expert g. Rows past the groups give 0.

  `jax.lax.ragged_dot`: a grouped GEMM where the backend has one (TPU). XLA:CPU lowers
  it to a dense matmul against every group's weights, masked (G times the FLOPs).
  """
  gate_RxF = jax.lax.ragged_dot(x_RxD, w_gate_GxDxF, group_sizes_G)
  up_RxF = jax.lax.ragged_dot(x_RxD, w_up_GxDxF, group_sizes_G)
  return jax.lax.ragged_dot(nn.silu(gate_RxF) * up_RxF, w_down_GxFxD, group_sizes_G)


def tile_rows(rows: int, groups: int, tile: int) -> int:
  """Tile height: `tile`, or less when there are few rows per group (bounds the padding)."""
  return int(max(1, min(tile, math.ceil(rows / groups))))


def swiglu_tiled(x_RxD, group_sizes_G, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD,
                 tile: int = 128):
  """Same contract as `swiglu_ragged`, as block-sparse batched matmuls (any backend).

  Each group's rows are padded to a multiple of the tile height, so every tile holds one
  group; tile j then multiplies the weights of its group, gathered per tile. FLOPs are
  those of the rows plus at most G tiles of padding; memory holds the gathered weights
  of ceil(R / tile) + G tiles.
  """
  r, d = x_RxD.shape
  g = group_sizes_G.shape[0]
  tile = tile_rows(r, g, tile)
  tiles = math.ceil(r / tile) + g
  ends_G = jnp.cumsum(group_sizes_G)
  padded_G = (group_sizes_G + tile - 1) // tile * tile
  padded_ends_G = jnp.cumsum(padded_G)
  index_R = jnp.arange(r, dtype=ends_G.dtype)
  group_R = jnp.searchsorted(ends_G, index_R, side="right")       # G past the groups
  safe_R = jnp.minimum(group_R, g - 1)
  dest_R = jnp.where(group_R < g,
                     padded_ends_G[safe_R] - padded_G[safe_R] + index_R -
                     (ends_G[safe_R] - group_sizes_G[safe_R]), tiles * tile)
  buf = _fill(x_RxD, index_R, dest_R, tiles * tile)
  tile_group = jnp.minimum(jnp.searchsorted(
      padded_ends_G, jnp.arange(tiles, dtype=ends_G.dtype) * tile, side="right"), g - 1)
  out = swiglu_batched(buf.reshape(tiles, tile, d), w_gate_GxDxF[tile_group],
                       w_up_GxDxF[tile_group], w_down_GxFxD[tile_group])
  return _read(out.reshape(tiles * tile, d), dest_R)


def grouped_swiglu(method: str, tile: int = 128):
  """The grouped expert FFN for `method`; "auto" = ragged_dot on TPU, tiles elsewhere."""
  if method == "auto":
    method = "ragged_dot" if jax.default_backend() == "tpu" else "tiles"
  if method == "ragged_dot":
    return swiglu_ragged
  return functools.partial(swiglu_tiled, tile=tile)


# ----------------------------------------------------------------------------------
# Dispatch: K experts per token, per-assignment outputs [N, K, D].
# ----------------------------------------------------------------------------------
def _group_by_expert(experts_A, priority_A, num_experts: int):
  """Sorts assignments by expert, highest priority first within an expert.

  Returns the order, the sorted expert ids and each sorted assignment's rank in its
  expert (0 = highest affinity; ties keep token order).
  """
  a = experts_A.shape[0]
  order_A = jnp.argsort(-priority_A, stable=True)
  order_A = order_A[jnp.argsort(experts_A[order_A], stable=True)]
  sorted_A = experts_A[order_A]
  sizes_E = jnp.bincount(experts_A, length=num_experts)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  rank_A = jnp.arange(a, dtype=jnp.int32) - starts_E[sorted_A].astype(jnp.int32)
  return order_A, sorted_A, rank_A


def sorted_experts(x_NxD, experts_NxK, kernels, grouped=None):
  """Dropless: sort assignments by expert, one grouped matmul per weight; [N, K, D].

  grouped: a `grouped_swiglu(...)` function (default: the "auto" one).
  """
  grouped = grouped or grouped_swiglu("auto")
  n, k = experts_NxK.shape
  num_experts = kernels[0].shape[0]
  flat_A = experts_NxK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sizes_E = jnp.bincount(flat_A, length=num_experts)
  out_AxD = grouped(x_NxD[order_A // k], sizes_E, *kernels)
  return _unsort(out_AxD, order_A).reshape(n, k, -1)


def _capacity_slots(experts_NxK, priority_NxK, num_experts: int, capacity: int):
  """Buffer slot of every sorted assignment (E * C = dropped) and its token."""
  k = experts_NxK.shape[1]
  order_A, sorted_A, rank_A = _group_by_expert(
      experts_NxK.reshape(-1), priority_NxK.reshape(-1), num_experts)
  kept_A = rank_A < capacity
  slot_A = jnp.where(kept_A, sorted_A * capacity + rank_A, num_experts * capacity)
  return order_A, order_A // k, slot_A, kept_A


def capacity_experts(x_NxD, experts_NxK, priority_NxK, kernels, capacity: int):
  """Each expert takes its `capacity` highest-affinity assignments; [N,K,D], kept [N,K]."""
  n, k = experts_NxK.shape
  num_experts = kernels[0].shape[0]
  order_A, token_A, slot_A, kept_A = _capacity_slots(
      experts_NxK, priority_NxK, num_experts, capacity)
  buf = _fill(x_NxD, token_A, slot_A, num_experts * capacity)
  out = swiglu_batched(buf.reshape(num_experts, capacity, -1), *kernels)
  rows_AxD = _read(out.reshape(num_experts * capacity, -1), slot_A)
  kept_NxK = jnp.zeros_like(kept_A).at[order_A].set(kept_A).reshape(n, k)
  return _unsort(rows_AxD, order_A).reshape(n, k, -1), kept_NxK


def one_hot_experts(x_NxD, experts_NxK, priority_NxK, kernels, capacity=None):
  """Reference for tests and benchmarks only: every expert runs on every token.

  O(N E) expert compute; drop decisions by pairwise comparison, O((N K)^2). Same
  outputs as `sorted_experts` / `capacity_experts`.
  """
  n, k = experts_NxK.shape
  y_NxExD = swiglu_batched(jnp.broadcast_to(x_NxD, (kernels[0].shape[0],) + x_NxD.shape),
                           *kernels).transpose(1, 0, 2)
  y_NxKxD = jnp.take_along_axis(y_NxExD, experts_NxK[..., None], axis=1)
  if capacity is None:
    return y_NxKxD, jnp.ones((n, k), bool)
  e_A, p_A = experts_NxK.reshape(-1), priority_NxK.reshape(-1)
  index_A = jnp.arange(n * k)
  ahead_AxA = (e_A[None, :] == e_A[:, None]) & (
      (p_A[None, :] > p_A[:, None]) |
      ((p_A[None, :] == p_A[:, None]) & (index_A[None, :] < index_A[:, None])))
  kept_NxK = (jnp.sum(ahead_AxA, axis=1) < capacity).reshape(n, k)
  return y_NxKxD * kept_NxK[..., None].astype(y_NxKxD.dtype), kept_NxK


# ----------------------------------------------------------------------------------
# Expert parallelism: experts sharded over a mesh axis, tokens moved by all_to_all.
# ----------------------------------------------------------------------------------
def _ep_dropless(x_nxD, experts_nxK, kernels, *, axis: str, num_experts: int, grouped):
  """One shard's tokens to their experts' shards and back, nothing dropped.

  XLA:CPU has no ragged all-to-all, so each destination gets a fixed block of
  S = n * min(K, E_local) rows: a token picks distinct experts, so it sends at most
  min(K, E_local) rows to one shard and no row is ever lost. Empty rows carry the
  sentinel expert E_local and are skipped by the grouped matmuls.
  """
  n, k = experts_nxK.shape
  shards = jax.lax.axis_size(axis)
  local = num_experts // shards
  block = n * min(k, local)
  flat_A = experts_nxK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sorted_A = flat_A[order_A]
  dest_A = sorted_A // local
  sizes_P = jnp.bincount(dest_A, length=shards)
  starts_P = jnp.cumsum(sizes_P) - sizes_P
  slot_A = dest_A * block + jnp.arange(n * k) - starts_P[dest_A]
  send_x = _fill(x_nxD, order_A // k, slot_A, shards * block)
  send_e = jnp.full((shards * block,), local, jnp.int32).at[slot_A].set(sorted_A % local)
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)
  local_order = jnp.argsort(recv_e, stable=True)
  out = grouped(recv_x[local_order], jnp.bincount(recv_e, length=local), *kernels)
  back = jax.lax.all_to_all(_unsort(out, local_order), axis, 0, 0, tiled=True)
  return _unsort(back[slot_A], order_A).reshape(n, k, -1), jnp.ones((n, k), bool)


def _ep_capacity(x_nxD, experts_nxK, priority_nxK, kernels, *, axis: str,
                 num_experts: int, capacity: int):
  """Capacity per (source shard, expert): `[E, C]` buffers go to the experts' shards."""
  n, k = experts_nxK.shape
  shards = jax.lax.axis_size(axis)
  local = num_experts // shards
  order_A, token_A, slot_A, kept_A = _capacity_slots(
      experts_nxK, priority_nxK, num_experts, capacity)
  buf = _fill(x_nxD, token_A, slot_A, num_experts * capacity)
  recv = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)           # [src, E_l, C] rows
  recv_ExCxD = recv.reshape(shards, local, capacity, -1).transpose(1, 0, 2, 3).reshape(
      local, shards * capacity, -1)
  out = swiglu_batched(recv_ExCxD, *kernels)
  out = out.reshape(local, shards, capacity, -1).transpose(1, 0, 2, 3).reshape(
      num_experts * capacity, -1)
  rows_AxD = _read(jax.lax.all_to_all(out, axis, 0, 0, tiled=True), slot_A)
  kept_nxK = jnp.zeros_like(kept_A).at[order_A].set(kept_A).reshape(n, k)
  return _unsort(rows_AxD, order_A).reshape(n, k, -1), kept_nxK


def expert_parallel_experts(x_NxD, experts_NxK, priority_NxK, kernels, *, mesh,
                            expert_axis: str, token_axes: Sequence[str],
                            capacity_factor: Optional[float] = None, grouped=None):
  """Routed experts with E sharded over `expert_axis` and tokens over `token_axes`.

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
    capacity = expert_capacity(x_NxD.shape[0] // shards, experts_NxK.shape[1],
                               num_experts, capacity_factor)

    def local(x, e, p, *ws):
      return _ep_capacity(x, e, p, ws, axis=expert_axis, num_experts=num_experts,
                          capacity=capacity)
  args = (x_NxD, experts_NxK, priority_NxK) + tuple(kernels)
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
    expert_capacity(N, K, E, factor) rows per expert, lowest-affinity overflow dropped.
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
    x_NxD = x_BxTxD.reshape(b * t, d)

    router_DxE = self.param(
        "router", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("embed", "experts")),
        (d, e), self.param_dtype)
    bias_E = None
    if cfg.balance == "bias":
      bias_E = self.variable(BIAS, "bias", jnp.zeros, (e,), jnp.float32).value
    routing = route(x_NxD.astype(jnp.float32) @ router_DxE.astype(jnp.float32), k,
                    cfg.score_fn, cfg.normalize_weights, cfg.routed_scale, bias_E)

    kernels = tuple(self.param(name, init, shape, self.param_dtype).astype(self.dtype)
                    for name, init, shape in (
                        ("gate", _expert_init(1, 2, ("experts", "embed", "mlp")), (e, d, f)),
                        ("up", _expert_init(1, 2, ("experts", "embed", "mlp")), (e, d, f)),
                        ("down", _expert_init(1, 2, ("experts", "mlp", "embed")), (e, f, d))))
    y_NxKxD, kept_NxK = self._experts(x_NxD.astype(self.dtype), routing, kernels)
    y_NxD = jnp.einsum("nk,nkd->nd", routing.weights_NxK.astype(self.dtype), y_NxKxD)

    load_E = jnp.bincount(routing.experts_NxK.reshape(-1), length=e).astype(jnp.float32)
    self.sow(STATS, "load", load_E)
    self.sow(STATS, "dropped_fraction", 1.0 - jnp.mean(kept_NxK.astype(jnp.float32)))
    self.sow(STATS, "max_violation", jnp.max(load_E) / jnp.mean(load_E) - 1.0)
    if cfg.balance == "aux_loss":
      self.sow(STATS, "aux_loss", cfg.aux_loss_coef * aux_balance_loss(
          routing.scores_NxE.reshape(b, t, e), routing.experts_NxK.reshape(b, t, k)))

    if cfg.num_shared:
      y_NxD = y_NxD + SwiGLU(cfg.num_shared * cfg.resolved_shared_dim, self.dtype,
                             self.param_dtype, name="shared")(x_NxD)
    return y_NxD.reshape(b, t, d).astype(self.dtype)

  def _experts(self, x_NxD, routing: Routing, kernels):
    """Per-assignment expert outputs `[N, K, D]` and which assignments were kept."""
    experts_NxK, priority_NxK = routing.experts_NxK, routing.priority_NxK
    cfg, capacity = self.cfg, None
    capacity_factor = cfg.capacity_factor or None     # 0 = dropless
    if capacity_factor is not None:
      capacity = expert_capacity(x_NxD.shape[0], cfg.top_k, cfg.num_experts,
                                 capacity_factor)
    if cfg.dispatch == "one_hot":
      return one_hot_experts(x_NxD, experts_NxK, priority_NxK, kernels, capacity)
    grouped = grouped_swiglu(cfg.group_matmul, cfg.tile)
    mesh = self._ep_mesh()
    if mesh is not None:
      token_axes = tuple(a for a in self.batch_axes
                         if a in mesh.axis_names and a != self.expert_axis)
      token_axes += (self.expert_axis,)
      shards = int(np.prod([mesh.shape[a] for a in token_axes]))
      if x_NxD.shape[0] % shards:
        raise ValueError(
            f"MoE: batch * length = {x_NxD.shape[0]} tokens must be a multiple of the "
            f"{shards} shards of mesh axes {token_axes} (MoE.batch_axes + "
            "MoE.expert_axis); change the batch or sequence length")
      return expert_parallel_experts(x_NxD, experts_NxK, priority_NxK, kernels, mesh=mesh,
                                     expert_axis=self.expert_axis, token_axes=token_axes,
                                     capacity_factor=capacity_factor, grouped=grouped)
    if capacity is None:
      return (sorted_experts(x_NxD, experts_NxK, kernels, grouped),
              jnp.ones(experts_NxK.shape, bool))
    return capacity_experts(x_NxD, experts_NxK, priority_NxK, kernels, capacity)


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


def update_routing_bias(bias_xE, load_xE, rate: float):
  """DeepSeek-V3 loss-free balancing: b_e += rate * sign(mean load - load_e).

  Under-loaded experts become more likely to be picked, over-loaded ones less. Works on
  any leading axes (e.g. scanned layers `[L, E]`).
  """
  mean = jnp.mean(load_xE, axis=-1, keepdims=True)
  return bias_xE + rate * jnp.sign(mean - load_xE).astype(bias_xE.dtype)


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
