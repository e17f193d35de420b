"""Sparsity-allocation configs: `--config=configs/allocation.py:VARIANT`.

Each family is a pure-MoE reference (rho = 1) and the rule that trades its routed
experts for Engram tables at equal total parameters (`engram_jax.allocation.allocate`,
docs/allocation.md). `python -m engram_jax.studies.allocation_sweep sweep --config=...:FAMILY
--rhos=...` trains one member per rho.

Variants (R is any number in [0, 1], e.g. toy_rho_0.75):
  toy, toy_rho_R              CPU study: width 64, 4 layers (the first dense), 16
                              routed experts (top 2) + 1 shared, Engram at layer 1;
                              iso total params, activated experts fixed.
  toy_flops, toy_flops_rho_R  the same at iso FLOPs per token: the shared expert
                              narrows by Engram's dense FLOPs.
  micro, micro_rho_R          the tests' size (seconds per step).
  moe_27b, engram_27b         an Engram-27B-like pair (DeepSeek-V3-style MoE, 30
                              layers, width 2560; docs/allocation.md says where each
                              number comes from); sized with --dry_run, not trained here.
  engram_27b_rho_R            that family at another rho.

`c.allocation` records the family: `rho`, `family`, `engram_layers`,
`expert_multiple` and the reference's `num_experts` / `shared_dim`, so any member
re-solves to any rho (`engram_jax.allocation.config_at`).
"""
import os

import ml_collections

from engram_jax import config_files

# Its sibling, read by path (this file is loaded by path too, and installs as
# engram_jax.configs): no `sys.path` edit, wherever the configs sit.
lm = config_files.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm.py"))

_FAMILIES = {"toy": "iso_params", "toy_flops": "iso_flops", "micro": "iso_params",
             "engram_27b": "iso_params"}
ENGRAM_27B_RHO = 0.75  # 72 -> 56 routed experts (the paper's Engram-27B keeps 55)


def get_config(variant: str = "toy") -> ml_collections.ConfigDict:
  from engram_jax import allocation
  family, sep, rho = variant.partition("_rho_")
  if variant == "moe_27b":
    return _base("engram_27b")
  if family not in _FAMILIES:
    raise ValueError(f"configs/allocation.py: unknown variant {variant!r}; choose one of "
                     f"{sorted(_FAMILIES)} (optionally with _rho_R) or moe_27b")
  c = _base(family)
  if sep:
    try:
      rho = float(rho)
    except ValueError:
      raise ValueError(f"configs/allocation.py: variant {variant!r}: R in "
                       f"{family}_rho_R must be a number in [0, 1]") from None
  elif family == "engram_27b":
    rho = ENGRAM_27B_RHO
  else:
    return c
  return allocation.config_at(c, rho)


def _base(family: str) -> ml_collections.ConfigDict:
  """The family's pure-MoE reference (rho = 1) with its Engram shape."""
  c = lm.get_config("tiny")
  c.model.engram.update(layers=(), max_ngram=3, heads=4, embed_per_ngram=32,
                        table_size=(4,), table_row_multiple=1)
  c.model.moe = dict(num_experts=16, expert_dim=64, top_k=2, num_shared=1, shared_dim=64,
                     score_fn="sigmoid", normalize_weights=True, routed_scale=1.0,
                     balance="aux_loss", aux_loss_coef=1e-3, bias_rate=1e-3,
                     capacity_factor=0.0, first_dense_layers=1, dispatch="sort",
                     group_matmul="auto", tile=128)
  c.model.update(width=64, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=256, max_len=64)
  c.data.update(max_files=120, seq_len=64, batch_size=16, vocab_size=1024)
  c.train.update(steps=400, learning_rate=3e-3, warmup_steps=40, log_every=50,
                 eval_every=400, eval_batches=16, checkpoint_every=200)
  engram_layers = (1,)
  if family == "micro":
    c.model.update(width=32, depth=2, num_heads=2, num_kv_heads=2, mlp_dim=64, max_len=16)
    c.model.engram.update(heads=2, embed_per_ngram=16)
    c.model.moe.update(num_experts=8, expert_dim=32, shared_dim=16)
    c.data.update(max_files=12, seq_len=16, batch_size=4, vocab_size=300)
    c.train.update(steps=3, warmup_steps=1, log_every=1, eval_every=3, eval_batches=2,
                   checkpoint_every=100)
    c.mesh.update(num_devices=1)
  if family == "engram_27b":
    # 30 blocks of width 2560, the first dense (DeepSeek-V3 style); 72 routed experts
    # of width 1536, top-6, plus 2 shared; 4 residual branches; Engram at layers 1 and
    # 14 (0-based: the paper's layers 2 and 15), N = 3, 8 heads per order, 1280-wide
    # lookup. GQA stands in for MLA. See docs/allocation.md.
    c.model.update(vocab_size=129280, width=2560, depth=30, num_heads=20, num_kv_heads=4,
                   head_dim=128, mlp_dim=10240, max_len=4096, branches=4,
                   dtype="bfloat16", remat="full")
    c.model.engram.update(heads=8, embed_per_ngram=640, table_row_multiple=512)
    c.model.moe.update(num_experts=72, expert_dim=1536, top_k=6, num_shared=2,
                       shared_dim=1536, balance="bias", aux_loss_coef=1e-4)
    c.data.update(max_files=0, seq_len=4096, batch_size=512, vocab_size=129280)
    c.train.update(steps=50_000, learning_rate=4e-4, warmup_steps=2000, log_every=100,
                   eval_every=2000, checkpoint_every=1000,
                   # row-sparse: update cost grows with tokens, not table rows;
                   # lazy_adam keeps the paper's Adam moments, on the rows read only
                   table_optimizer="lazy_adam")
    engram_layers = (1, 14)
  c.model.engram.table_size = (c.model.engram.heads,)  # solved per rho by `allocate`
  c.allocation = dict(family=_FAMILIES[family], rho=1.0, engram_layers=engram_layers,
                      expert_multiple=8 if family == "engram_27b" else 1,
                      reference_experts=c.model.moe.num_experts,
                      reference_shared_dim=c.model.moe.shared_dim)
  return c
