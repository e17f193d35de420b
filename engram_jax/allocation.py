"""Sparsity allocation (arXiv 2601.07372, Sec. 3): MoE experts vs Engram memory.

Arithmetic (core: jax / flax / numpy only):

* `param_counts(cfg)`: stored parameters, parameters activated per token and forward
  FLOPs per token of an LM config, split into groups (`GROUPS`), from the config alone.
  `tree_counts(params)` counts the same groups on an initialised (or `jax.eval_shape`d)
  tree; the tests hold the two equal.
* `allocate(cfg, rho)`: the config that gives the share `rho` of the sparse parameters
  to routed experts and the rest to Engram tables, at the total and activated
  parameters of the pure-MoE config (docs/allocation.md has the formulas).

The study (`python -m engram_jax.allocation sweep ...`) trains one config per rho with
`train.train_and_evaluate` and writes a table, a CSV and a plot of validation loss vs
rho; its imports (train, matplotlib) load only when it runs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax

from engram_jax import config as config_lib

GROUPS = ("embeddings", "attention", "norms", "dense_mlp", "router", "routed_experts",
          "shared_experts", "engram_tables", "engram_dense", "hyper")
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


def _branches(cfg: config_lib.ModelConfig) -> int:
  return cfg.branches if cfg.hyper_connections else 1


def param_counts(cfg: config_lib.ModelConfig, context: Optional[int] = None) -> Counts:
  """Counts of every group for `cfg` (a validated ModelConfig), no tracing.

  context: keys each query attends to in the FLOP count (default `cfg.max_len`, the
  full window; a causal average is half of it). It only moves the attention FLOPs.
  """
  d, depth, v = cfg.width, cfg.depth, cfg.vocab_size
  heads, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  m, e = cfg.moe, cfg.engram
  branches = _branches(cfg)
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
    learned = config_lib.gate_constant(e.gate) is None
    matmul = e.features * d * (1 + (branches if learned else 0))   # W_V, W_K per branch
    norms = branches * d * (3 if learned else 1)                   # hidden, key, conv
    conv = e.kernel_size * branches * d
    if e.variant == "v4":  # one projection to M keys + the value; no conv or its norm
      matmul, norms, conv = e.features * d * (branches + 1), branches * d * 2 * learned, 0
    total["engram_dense"] = act["engram_dense"] = n * (matmul + norms + conv)
    flops["engram_dense"] = 2 * n * (matmul + conv)
  if cfg.hyper_connections:
    per_hc = 2 * branches + branches * branches
    hc_flops = 2 * (2 * branches * d + branches * branches * d)
    if cfg.hyper != "static":
      per_hc += d * (branches + 2) + d + 2
      hc_flops += 2 * branches * d * (branches + 2)
    total["hyper"] = act["hyper"] = 2 * depth * per_hc
    flops["hyper"] = 2 * depth * hc_flops
  return Counts(total, act, flops, used, stored, used * e.head_dim)


def tree_group(path) -> str:
  """The `GROUPS` entry of an LM parameter, from its path."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  if names[0] in ("embed", "unembed"):
    return "embeddings"
  if "engram" in names:
    return "engram_tables" if names[-1] == "table" else "engram_dense"
  if any(n.endswith("_hc") for n in names):
    return "hyper"
  if "attention" in names:
    return "attention"
  if "moe" in names:
    below = names[names.index("moe") + 1:]
    return {"router": "router", "shared": "shared_experts"}.get(below[0], "routed_experts")
  if "mlp" in names:
    return "dense_mlp"
  return "norms"


def tree_counts(params) -> dict[str, int]:
  """Stored parameters per group of a (possibly abstract, unboxed) LM param tree."""
  counts = dict.fromkeys(GROUPS, 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    counts[tree_group(path)] += int(math.prod(leaf.shape))
  return counts


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


# ----------------------------------------------------------------------------------
# The study: python -m engram_jax.allocation sweep --config=... --rhos=... --workdir=...
# ----------------------------------------------------------------------------------
RESULT = "result.json"
CSV_FIELDS = ("rho", "rho_realized", "seed", "num_experts", "shared_dim", "table_size",
              "table_rows_used", "table_rows_stored", "total_params", "activated_params",
              "flops_per_token", "total_vs_ref", "activated_vs_ref", "flops_vs_ref",
              "steps", "eval_loss", "eval_bits_per_byte")


def load_config(spec: str):
  """`path.py:variant` -> the file's `get_config(variant)`."""
  from engram_jax import config_files
  return config_files.load(spec)


def point_config(c, rho: float, seed: int, steps: Optional[int] = None):
  """The family config `c` at `rho`, with `seed` (init and data order) and `steps`."""
  out = config_at(c, rho)
  out.seed = seed
  out.data.seed = seed
  if steps is not None:
    from engram_jax import run_config
    run_config.with_steps(out.train, steps)
  return out


def point_dir(workdir: str, rho: float, seed: int) -> str:
  import os
  return os.path.join(workdir, f"rho_{rho:g}_seed_{seed}")


def _shared_tokenizer(c, workdir: str) -> str:
  """Trains (once) the tokenizer every point uses, so they see the same tokens."""
  import os
  from engram_jax.data import text
  if c.data.get("tokenizer_path"):
    return c.data.tokenizer_path
  text.build_tokenizer(text.TextDataConfig(**dict(c.data)), workdir)
  from engram_jax import tokenizer as tokenizer_lib
  return os.path.join(workdir, tokenizer_lib.WORKDIR_TOKENIZER)


def run_point(c, rho: float, seed: int, workdir: str, steps: Optional[int] = None) -> dict:
  """Trains one point (resuming its workdir) and returns its row; a point with a
  `result.json` is finished and only read back."""
  import json
  import os
  from engram_jax import generate, train
  directory = point_dir(workdir, rho, seed)
  result = os.path.join(directory, RESULT)
  if os.path.exists(result):
    with open(result, encoding="utf-8") as f:
      row = json.load(f)
    print(f"rho {rho:g} seed {seed}: finished earlier (eval_loss "
          f"{row['eval_loss']:.4f}), skipped", flush=True)
    return row
  config = point_config(c, rho, seed, steps)
  print(f"rho {rho:g} seed {seed}: {config.model.moe.num_experts} experts, Engram layers "
        f"{tuple(config.model.engram.layers)} table_size "
        f"{tuple(config.model.engram.table_size)} -> {directory}", flush=True)
  metrics = train.train_and_evaluate(config, directory)
  trained = generate.read_model_config(directory)
  reference = dataclasses.replace(reference_of(config), vocab_size=trained.vocab_size)
  row = dict(rho=rho, seed=seed, steps=int(config.train.steps), **summary(trained, reference),
             eval_loss=metrics.get("eval_loss"),
             eval_bits_per_byte=metrics.get("eval_bits_per_byte"))
  with open(result + ".tmp", "w", encoding="utf-8") as f:
    json.dump(row, f, indent=1)
  os.replace(result + ".tmp", result)
  return row


def sweep(c, rhos, workdir: str, steps: Optional[int] = None, seeds=(0,)) -> list[dict]:
  """Trains every (rho, seed) point of family `c` not finished yet, then reports every
  finished point in `workdir` (`write_report`)."""
  from engram_jax import train
  train.ensure_writable_workdir(workdir)
  for rho in rhos:
    config_at(c, rho)  # every rho solvable before anything trains
  c = config_at(c, c.allocation.rho)
  c.data.tokenizer_path = _shared_tokenizer(c, workdir)
  for rho in rhos:
    for seed in seeds:
      run_point(c, rho, seed, workdir, steps)
  rows = finished_points(workdir)
  write_report(workdir, rows, c)
  return rows


def finished_points(workdir: str) -> list[dict]:
  """The rows of every finished point in `workdir` (this and earlier invocations)."""
  import glob
  import json
  import os
  rows = []
  for path in glob.glob(os.path.join(workdir, "rho_*_seed_*", RESULT)):
    with open(path, encoding="utf-8") as f:
      rows.append(json.load(f))
  return sorted(rows, key=lambda r: (r["rho"], r["seed"]))


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else float("nan")


def write_report(workdir: str, rows: list[dict], c) -> None:
  """DIR/allocation.csv (one row per point), .md (per rho, mean over seeds), .png."""
  import csv
  import os
  with open(os.path.join(workdir, "allocation.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  by_rho = {}
  for row in rows:
    by_rho.setdefault(row["rho"], []).append(row)
  best = min(by_rho, key=lambda r: _mean(x["eval_loss"] for x in by_rho[r]))
  lines = [f"# Sparsity allocation: {c.allocation.family}, {len(rows)} runs", "",
           f"Validation loss (nats/token) vs rho, the share of the sparse parameters held "
           f"by routed experts (1 = pure MoE). Steps: "
           f"{sorted({r['steps'] for r in rows})}; seeds per rho: "
           f"{sorted({len(v) for v in by_rho.values()})}.", "",
           "| rho | realized | experts | Engram rows | total params | activated | "
           "FLOPs/token | val loss | per seed | bits/byte |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for rho in sorted(by_rho):
    group, first = by_rho[rho], by_rho[rho][0]
    losses = [r["eval_loss"] for r in group]
    lines.append(
        f"| {rho:g}{' (best)' if rho == best else ''} | {first['rho_realized']:.3f} | "
        f"{first['num_experts']} | {first['table_rows_used']:,} | "
        f"{first['total_params']:,} ({first['total_vs_ref']:+.2%}) | "
        f"{first['activated_params']:,} ({first['activated_vs_ref']:+.2%}) | "
        f"{first['flops_per_token']:,} ({first['flops_vs_ref']:+.2%}) | "
        f"{_mean(losses):.4f} | {', '.join(f'{x:.4f}' for x in losses)} | "
        f"{_mean(r.get('eval_bits_per_byte') for r in group):.4f} |")
  lines += ["", "Percentages: against the pure-MoE reference (rho = 1) of the family."]
  with open(os.path.join(workdir, "allocation.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  _plot(os.path.join(workdir, "allocation.png"), by_rho, c.allocation.family)


def _plot(path: str, by_rho: dict, family: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rhos = sorted(by_rho)
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
  for rho in rhos:
    losses = [r["eval_loss"] for r in by_rho[rho]]
    ax.scatter([rho] * len(losses), losses, s=12, color="tab:gray", alpha=0.7)
  ax.plot(rhos, [_mean(r["eval_loss"] for r in by_rho[rho]) for rho in rhos], "o-",
          color="tab:blue", label="mean over seeds")
  ax.set_xlabel("rho (share of sparse params in routed experts)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"Sparsity allocation ({family})", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plan(c, rhos) -> str:
  """The allocation of every rho as a markdown table, without training."""
  reference = reference_of(c)
  lines = ["| rho | realized | experts | shared width | table_size | Engram rows (stored) | "
           "total params | activated | FLOPs/token |", "|---|---|---|---|---|---|---|---|---|"]
  for rho in rhos:
    solved = allocate(reference, rho, tuple(c.allocation.engram_layers),
                      c.allocation.family, c.allocation.expert_multiple)
    s = summary(solved, reference)
    lines.append(f"| {rho:g} | {s['rho_realized']:.3f} | {s['num_experts']} | "
                 f"{s['shared_dim']} | {s['table_size']:,} | {s['table_rows_used']:,} "
                 f"({s['table_rows_stored']:,}) | {s['total_params']:,} "
                 f"({s['total_vs_ref']:+.2%}) | {s['activated_params']:,} "
                 f"({s['activated_vs_ref']:+.2%}) | {s['flops_per_token']:,} "
                 f"({s['flops_vs_ref']:+.2%}) |")
  return "\n".join(lines)


def _floats(text: str, flag: str) -> list[float]:
  from engram_jax import cli
  return cli.parse_list(text, flag, float, example="0,0.5,1")


def main(argv=None) -> int:
  import argparse
  import os
  import sys
  parser = argparse.ArgumentParser(
      prog="python -m engram_jax.allocation",
      description="Sparsity allocation between MoE experts and Engram tables.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, text in (("sweep", "train one point per rho and seed, then write "
                      "allocation.md/.csv/.png in --workdir"),
                     ("plan", "print the allocation of each rho (no training)")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=True, help="configs/allocation.py:toy")
    p.add_argument("--rhos", default="0,0.25,0.5,0.75,1")
    if name == "sweep":
      p.add_argument("--workdir", required=True)
      p.add_argument("--steps", type=int, default=None, help="override train.steps")
      p.add_argument("--seeds", default="0")
      p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a config field (repeatable), e.g. "
                          "--set=data.source=site_packages --set=data.max_files=1500")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    c = load_config(args.config)
    if "allocation" not in c:
      raise ValueError(f"--config={args.config!r} has no `allocation` section; use a "
                       "family of configs/allocation.py (e.g. configs/allocation.py:toy)")
    rhos = _floats(args.rhos, "--rhos")
    if args.command == "plan":
      print(plan(c, rhos))
      return 0
    if args.steps is not None and args.steps < 1:
      raise ValueError(f"--steps={args.steps}: use a positive integer")
    seeds = [int(s) for s in _floats(args.seeds, "--seeds")]
    from engram_jax import config_files
    config_files.overrides(args.set)(c)
    sweep(c, rhos, args.workdir, args.steps, seeds)
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"wrote {os.path.join(args.workdir, 'allocation.md')}, allocation.csv, "
        "allocation.png", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
