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
devices by `all_to_all` inside `shard_map`. These ways are in `layers/moe_dispatch.py`;
this module routes, holds the layer's params and keeps the balance.

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
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from engram_jax import config as config_lib
from engram_jax.layers.mlp import SwiGLU
from engram_jax.layers.moe_dispatch import (capacity_experts, expert_capacity,
                                          expert_parallel_experts, grouped_swiglu,
                                          one_hot_experts, sorted_experts)

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
