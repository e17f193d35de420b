"""Parameter groups: one classifier of model parameters by their path.

Everything that treats parameters by kind reads `group(path)`, so a parameter added to
the model is counted, reported and decayed alike everywhere: the sparsity-allocation
counts (`allocation.tree_counts`, every group), the training overview and dry run
(`parameter_overview`), the image model's budget counts (`models.image`) and the
optimizer's weight-decay groups (`optimizer_group`). Callers that need coarser groups
map these with a view (`overview_view`, `engram_view`) rather than classify again.
Paths are read by their dict keys only (boxed params add a trailing `.value`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax

GROUPS = ("embeddings", "attention", "norms", "dense_mlp", "router", "routed_experts",
          "shared_experts", "engram_tables", "engram_dense", "hyper")
OVERVIEW = ("embeddings", "engram_tables", "backbone", "routed_experts", "shared_experts")


def names(path) -> list[str]:
  """The dict keys of a tree path, e.g. ["block_1", "engram", "table"]."""
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def group(path) -> str:
  """The `GROUPS` entry of a parameter of an LM or image model.

  routed_experts: the expert kernels of MoE layers (`moe/{gate,up,down}`); router: their
  router; shared_experts: `moe/shared/...`; engram_tables: the hashed tables;
  engram_dense: the rest of an Engram layer; hyper: hyper-connection parameters
  (`*_hc`); norms: whatever is left (the RMSNorm scales).
  """
  keys = names(path)
  if keys[:1] in (["embed"], ["unembed"]):
    return "embeddings"
  if "engram" in keys:
    return "engram_tables" if keys[-1] == "table" else "engram_dense"
  if any(k.endswith("_hc") for k in keys):
    return "hyper"
  if "attention" in keys:
    return "attention"
  if "moe" in keys:
    below = keys[keys.index("moe") + 1:]
    return {"router": "router", "shared": "shared_experts"}.get(below[0], "routed_experts")
  if "mlp" in keys:
    return "dense_mlp"
  return "norms"


def overview_view(name: str) -> str:
  """The training overview's groups: embeddings, Engram tables, MoE experts, the rest."""
  return name if name in OVERVIEW else "backbone"


def engram_view(name: str) -> str:
  """The image study's groups: Engram tables, Engram's dense part, the backbone."""
  return name if name in ("engram_tables", "engram_dense") else "backbone"


def optimizer_group(path) -> str:
  """'table' (Engram tables: their own learning rate, no weight decay), 'no_decay'
  (vectors: norm scales, biases, the Engram conv, hyper-connection coefficients, which
  start at 1 or the identity) or 'decay' (matrices: AdamW)."""
  kind, leaf = group(path), (names(path) or [""])[-1]
  if kind == "engram_tables":
    return "table"
  if leaf in ("scale", "bias", "conv") or (kind == "hyper" and leaf != "kernel"):
    return "no_decay"
  return "decay"


def counts(params, view: Callable[[str], str] = lambda name: name,
           first: Sequence[str] = GROUPS) -> dict[str, int]:
  """Parameters per (viewed) group of a possibly abstract, unboxed tree; the groups of
  `first` come first, at 0 when empty."""
  totals = dict.fromkeys(first, 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = view(group(path))
    totals[name] = totals.get(name, 0) + int(math.prod(leaf.shape))
  return totals


def parameter_overview(params) -> dict[str, int]:
  """Counts split into embeddings, Engram tables, MoE experts (when there are any) and
  the rest, with their total."""
  overview = counts(params, overview_view, ("embeddings", "engram_tables", "backbone"))
  return {**overview, "total": sum(overview.values())}
