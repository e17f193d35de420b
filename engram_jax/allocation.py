"""Sparsity allocation (arXiv 2601.07372, Sec. 3): MoE experts vs Engram memory.

Arithmetic (core: jax / flax / numpy only):

* `param_counts(cfg)`: stored parameters, parameters activated per token and forward
  FLOPs per token of an LM config, split into groups (`GROUPS`), from the config alone.
  `tree_counts(params)` counts the same groups on an initialised (or `jax.eval_shape`d)
  tree; the tests hold the two equal.
* `allocate(cfg, rho)`: the config that gives the share `rho` of the sparse parameters
  to routed experts and the rest to Engram tables, at the total and activated
  parameters of the pure-MoE config (docs/allocation.md has the formulas).

The study (`python -m engram_jax.studies.allocation_sweep sweep ...`) trains one config per rho with
`train.train_and_evaluate` and writes a table, a CSV and a plot of validation loss vs
rho; its imports (train, matplotlib) load only when it runs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from engram_jax import config as config_lib
from engram_jax import param_groups
from engram_jax.param_groups import GROUPS

FAMILIES = ("iso_params", "iso_flops")


@dataclasses.dataclass(frozen=True)
class Counts:
  """Per-group parameter and FLOP counts of one config.

  total: stored parameters (Engram tables with their padding rows).
  activated: parameters a token touches: one embedding row, the top-k experts, the
    (N-1)*K table rows it reads per Engram layer, everything dense.
  flops: forward FLOPs per token (2 per multiply-add of matmuls, the attention scores
    over `context` keys, hyper-connection mixing; norms and activations left out).
  table_rows_used / table_rows_stored: Engram rows over all layers that hash ids
    address (sums of the prime head sizes) / that the params hold (padded to
    `engram.table_row_multiple`); table_params_used: the addressed rows' parameters.
  """
  total: dict[str, int]
  activated: dict[str, int]
  flops: dict[str, int]
  table_rows_used: int = 0
  table_rows_stored: int = 0
  table_params_used: int = 0

  @property
  def total_params(self) -> int:
    return sum(self.total.values())

  @property
  def activated_params(self) -> int:
    return sum(self.activated.values())

  @property
  def flops_per_token(self) -> int:
    return sum(self.flops.values())

  @property
  def sparse_moe(self) -> int:
    """Routed-expert parameters a token does not use."""
    return self.total["routed_experts"] - self.activated["routed_experts"]

  @property
  def sparse_engram(self) -> int:
    """Addressed Engram table parameters a token does not read (padding left out)."""
    return self.table_params_used - self.activated["engram_tables"]

  @property
  def rho(self) -> float:
    """Share of the sparse parameters held by routed experts (1 = pure MoE)."""
    sparse = self.sparse_moe + self.sparse_engram
    return self.sparse_moe / sparse if sparse else 1.0


def param_counts(cfg: config_lib.ModelConfig, context: Optional[int] = None) -> Counts:
  """Counts of every group for `cfg` (a validated ModelConfig), no tracing.

  context: keys each query attends to in the FLOP count (default `cfg.max_len`, the
  full window; a causal average is half of it). It only moves the attention FLOPs.
  """
  d, depth, v = cfg.width, cfg.depth, cfg.vocab_size
  heads, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  m, e = cfg.moe, cfg.engram
  context = cfg.max_len if context is None else context
  n_moe = sum(m.is_moe_layer(layer) for layer in range(depth))
  n_dense = depth - n_moe
  total = dict.fromkeys(GROUPS, 0)
  act = dict.fromkeys(GROUPS, 0)
  flops = dict.fromkeys(GROUPS, 0)

  unembed = 0 if cfg.tie_embeddings else d * v
  total["embeddings"] = v * d + unembed
  act["embeddings"] = d + d * v            # one input row; every logit reads the rest
  flops["embeddings"] = 2 * d * v
  attn = 2 * d * heads * hd + 2 * d * kv * hd
  total["attention"] = act["attention"] = depth * attn
  flops["attention"] = depth * (2 * attn + 4 * heads * hd * context)
  total["norms"] = act["norms"] = 2 * d * depth + d
  mlp = 3 * d * cfg.resolved_mlp_dim
  total["dense_mlp"] = act["dense_mlp"] = n_dense * mlp
  flops["dense_mlp"] = 2 * n_dense * mlp
  if m.enabled:
    expert = 3 * d * m.expert_dim
    shared = 3 * d * m.num_shared * m.resolved_shared_dim
    total["router"] = act["router"] = n_moe * d * m.num_experts
    total["routed_experts"] = n_moe * expert * m.num_experts
    act["routed_experts"] = n_moe * expert * m.top_k
    total["shared_experts"] = act["shared_experts"] = n_moe * shared
    for group in ("router", "routed_experts", "shared_experts"):
      flops[group] = 2 * act[group]

  used = stored = 0
  if e.layers:
    spec = e.hash_spec()
    for i in range(len(e.layers)):
      used += spec.rows(i)
      stored += e.padded_rows(spec.rows(i))
    n = len(e.layers)
    total["engram_tables"] = stored * e.head_dim
    act["engram_tables"] = n * e.features        # (N-1) * K rows of head_dim per layer
    params, weights = config_lib.engram_layer_weights(cfg)
    total["engram_dense"] = act["engram_dense"] = n * params
    flops["engram_dense"] = 2 * n * weights
  if cfg.hyper_connections:
    total["hyper"], flops["hyper"] = config_lib.hyper_connection_counts(cfg)
    act["hyper"] = total["hyper"]
  return Counts(total, act, flops, used, stored, used * e.head_dim)


def tree_counts(params) -> dict[str, int]:
  """Stored parameters per group of a (possibly abstract, unboxed) LM param tree."""
  return param_groups.counts(params)


# ----------------------------------------------------------------------------------
# The allocation: rho of the sparse parameters to routed experts, the rest to Engram
# ----------------------------------------------------------------------------------
def _replace(cfg: config_lib.ModelConfig, engram=None, moe=None) -> config_lib.ModelConfig:
  return config_lib.validate(dataclasses.replace(
      cfg, engram=dataclasses.replace(cfg.engram, **(engram or {})),
      moe=dataclasses.replace(cfg.moe, **(moe or {}))))


def pure_moe(cfg: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """The rho = 1 reference of a family: `cfg` without Engram."""
  return _replace(cfg, engram=dict(layers=()))


def largest_fitting(total: Callable[[int], int], budget: int, smallest: int) -> Optional[int]:
  """The largest size >= smallest with total(size) <= budget (total grows with size),
  or None: the table size that spends a parameter budget (also configs/image.py)."""
  if total(smallest) > budget:
    return None
  low, high = smallest, 2 * smallest
  while total(high) <= budget:
    low, high = high, 2 * high
  while high - low > 1:  # total(low) <= budget < total(high)
    mid = (low + high) // 2
    low, high = (mid, high) if total(mid) <= budget else (low, mid)
  return low


def allocate(cfg: config_lib.ModelConfig, rho: float, engram_layers: tuple[int, ...],
             family: str = "iso_params", expert_multiple: int = 1,
             context: Optional[int] = None) -> config_lib.ModelConfig:
  """The config of allocation ratio `rho` in the family of `cfg`.

  cfg: the pure-MoE reference (its `engram` section gives the Engram shape: orders,
    heads, widths; its layers and table_size are replaced). Its total parameters are
    the budget and its sparse parameters `(E_0 - k) * P_expert * L_moe` are split:
      num_experts E = k + (E_0 - k) * rho, rounded to a multiple of `expert_multiple`
      (expert parallelism) and at least k; top_k, expert_dim and shared experts fixed;
      Engram at `engram_layers` (none at rho = 1) with the largest `table_size` (rows
      per head) whose total fits the budget.
  family: "iso_params" keeps the activated experts, so activated parameters and FLOPs
    grow by Engram's dense part (W_V, W_K, conv; a few % at toy scale); "iso_flops"
    also narrows the shared experts by that many FLOPs per token, so FLOPs (and
    activated parameters) match the reference too. Needs `moe.num_shared > 0`.
  """
  if family not in FAMILIES:
    raise ValueError(f"allocation.family={family!r} is invalid: choose one of {FAMILIES}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"allocation rho={rho} is invalid: use 0 <= rho <= 1 (the share of "
                     "the sparse parameters given to routed experts)")
  if not cfg.moe.enabled:
    raise ValueError("allocation: model.moe.num_experts=0; the reference must be an MoE "
                     "config (rho = 1 is the pure-MoE model)")
  if family == "iso_flops" and not cfg.moe.num_shared:
    raise ValueError("allocation.family='iso_flops' narrows the shared experts to pay "
                     "for Engram's FLOPs: set model.moe.num_shared >= 1")
  reference = pure_moe(cfg)
  if rho == 1.0:
    return reference
  base = param_counts(reference, context)
  m = cfg.moe
  experts = m.top_k + (m.num_experts - m.top_k) * rho
  experts = max(m.top_k, int(round(experts / expert_multiple)) * expert_multiple)
  if experts == m.num_experts:
    raise ValueError(f"allocation rho={rho}: rounding keeps all {m.num_experts} experts "
                     f"(expert_multiple={expert_multiple}); use a smaller rho")
  layered = _replace(reference, moe=dict(num_experts=experts),
                     engram=dict(layers=tuple(engram_layers),
                                 table_size=(cfg.engram.heads,)))
  if family == "iso_flops":
    extra = param_counts(layered, context).flops_per_token - base.flops_per_token
    n_moe = sum(m.is_moe_layer(layer) for layer in range(cfg.depth))
    shared = m.num_shared * m.resolved_shared_dim
    cut = math.ceil(extra / (2 * 3 * cfg.width * n_moe * m.num_shared))
    if shared - cut * m.num_shared < m.num_shared:
      raise ValueError(f"allocation iso_flops: Engram's dense part costs {extra:,} FLOPs "
                       f"per token, more than the shared experts ({shared} wide) hold; "
                       "widen moe.shared_dim or use fewer/narrower Engram layers")
    layered = _replace(layered, moe=dict(shared_dim=m.resolved_shared_dim - cut))
  total = lambda size: param_counts(_replace(layered, engram=dict(table_size=(size,))),
                                    context).total_params
  size = largest_fitting(total, base.total_params, smallest=cfg.engram.heads)
  if size is None:
    raise ValueError(f"allocation rho={rho}: the smallest Engram tables at layers "
                     f"{tuple(engram_layers)} exceed the budget of {base.total_params:,} "
                     "parameters; use a larger rho or narrower Engram")
  return _replace(layered, engram=dict(table_size=(size,)))


def summary(cfg: config_lib.ModelConfig, reference: Optional[config_lib.ModelConfig] = None,
            context: Optional[int] = None) -> dict[str, Any]:
  """One row of the study: the allocation's numbers (and its gaps to the reference)."""
  c = param_counts(cfg, context)
  row = dict(rho_realized=round(c.rho, 4), num_experts=cfg.moe.num_experts,
             shared_dim=cfg.moe.resolved_shared_dim if cfg.moe.num_shared else 0,
             table_size=cfg.engram.table_size[0] if cfg.engram.layers else 0,
             table_rows_used=c.table_rows_used, table_rows_stored=c.table_rows_stored,
             total_params=c.total_params, activated_params=c.activated_params,
             flops_per_token=c.flops_per_token, sparse_moe=c.sparse_moe,
             sparse_engram=c.sparse_engram)
  if reference is not None:
    r = param_counts(reference, context)
    row.update(total_vs_ref=c.total_params / r.total_params - 1,
               activated_vs_ref=c.activated_params / r.activated_params - 1,
               flops_vs_ref=c.flops_per_token / r.flops_per_token - 1)
  return row


# ----------------------------------------------------------------------------------
# Family configs (configs/allocation.py): `c.allocation` names the family
# ----------------------------------------------------------------------------------
def reference_of(c) -> config_lib.ModelConfig:
  """The pure-MoE reference of family config `c` (any member), as a ModelConfig.

  `model.vocab_size = 0` (the tokenizer's size) counts `data.vocab_size` rows: the
  embeddings are the same at every rho, so the allocation does not depend on it.
  """
  a = c.allocation
  model = c.model.to_dict()
  model["moe"].update(num_experts=a.reference_experts, shared_dim=a.reference_shared_dim)
  model["engram"].update(layers=(), table_size=(model["engram"]["heads"],))
  if not model.get("vocab_size"):
    model["vocab_size"] = c.data.vocab_size
  return config_lib.from_dict(model)


def config_at(c, rho: float):
  """A copy of family config `c` at allocation ratio `rho` (experts, shared width and
  Engram layers / table size re-solved by `allocate`)."""
  import ml_collections
  a = c.allocation
  solved = allocate(reference_of(c), rho, tuple(a.engram_layers), a.family,
                    a.expert_multiple)
  out = ml_collections.ConfigDict(c.to_dict())
  out.model.moe.update(num_experts=solved.moe.num_experts, shared_dim=solved.moe.shared_dim)
  out.model.engram.update(layers=solved.engram.layers, table_size=solved.engram.table_size)
  out.allocation.rho = float(rho)
  return out


