"""Image-generation configs: `--config=configs/image.py:VARIANT`, every field overridable.

Variants:
  digits            sklearn's 8x8 digits at 8 levels, a small decoder with 2D Engram at
                    layers 1 and 2: trains in minutes on a 2-core CPU.
  digits_baseline   the same backbone without Engram.
  ar_b              AR-B (arXiv 2605.13179): 24 layers, width 768, 16 heads, 2D RoPE, on
                    16x16 VQ codes (codebook 16384, 1000 classes), no Engram.
  ar_b_engram       ar_b plus Engram at layers 1 and 12.
  *_frozen_table    digits / ar_b_engram with the tables frozen at their N(0, 1) init
                    (the paper's frozen random table probe: no gradient, no update).
  ar_b_rho_R,       the budget-ratio family: the backbone holds the share R of the
  digits_rho_R      parameter budget (the count of ar_b / digits_baseline), Engram
                    tables the rest (`solve_budget`); the paper's sweep is `PAPER_RHOS`,
                    any 0 < R < 1 works, e.g. `ar_b_rho_0.41`.

The model section is `engram_jax.config.ModelConfig` (vocab_size and max_len 0 =
derived from the grid), the data section `engram_jax.data.images.ImageDataConfig`;
`engram_jax.models.image.make_image_config(c.model, c.data)` builds the model config.
The rho variants also carry `budget`: a record of rho and the budget in parameters (editing
it changes nothing); pick another rho by the variant name, since overriding model fields
afterwards does not re-solve the budget.
"""
import math

import ml_collections

from engram_jax import allocation, spatial_hashing
from engram_jax.models import image

PAPER_RHOS = (0.17, 0.32, 0.41, 0.51, 0.63, 0.76, 0.90)
_FAMILIES = ("digits", "ar_b")
_BASE_VARIANTS = ("digits", "digits_baseline", "digits_frozen_table", "ar_b", "ar_b_engram",
                  "ar_b_engram_frozen_table")
_MLP_MULTIPLE = {"digits": 1, "ar_b": 8}  # solved MLP widths round down to these


def get_config(variant: str = "digits") -> ml_collections.ConfigDict:
  family, sep, rho = variant.partition("_rho_")
  if sep:
    if family not in _FAMILIES:
      raise ValueError(f"configs/image.py: unknown variant {variant!r}; the rho family "
                       f"is {[f + '_rho_R' for f in _FAMILIES]}")
    try:
      rho = float(rho)
    except ValueError:
      raise ValueError(f"configs/image.py: variant {variant!r}: R in {family}_rho_R must "
                       f"be a number in (0, 1), e.g. {family}_rho_0.41") from None
    c = _base(family)
    solve_budget(c, rho, budget=image.param_counts(
        image.make_image_config(_base(_baseline_of(family)).model, c.data))["total"],
                 mlp_multiple=_MLP_MULTIPLE[family])
    return c
  if variant not in _BASE_VARIANTS:
    raise ValueError(f"configs/image.py: unknown variant {variant!r}; choose one of "
                     f"{_BASE_VARIANTS} or <family>_rho_R with family in {_FAMILIES}")
  return _base(variant)


def _baseline_of(family: str) -> str:
  return "digits_baseline" if family == "digits" else "ar_b"


def _base(variant: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "image"
  c.seed = 0
  c.model = dict(vocab_size=0, max_len=0,  # 0 = derived from the grid
                 width=64, depth=4, num_heads=4, num_kv_heads=4, mlp_dim=0,
                 rope_theta=10000.0, dtype="float32", remat="none", tie_embeddings=False,
                 engram=dict(layers=(1, 2), max_ngram=3, heads=4, embed_per_ngram=32,
                             table_size=(509,), gate="learned", table_trainable=True,
                             table_init_std=1.0, seed=0, table_row_multiple=8,
                             stencil=spatial_hashing.DEFAULT_STENCIL))
  c.data = dict(source="digits", levels=8, split_seed=0, train_path="", val_path="",
                test_path="", height=8, width=8, codebook_size=0, num_classes=10,
                batch_size=32, seed=0, label_dropout=0.1, worker_count=0)
  # 400 steps: the Engram model's best validation point (docs/results_digits.md); by
  # 1000 steps its validation NLL is back above step 100's (the tables memorise).
  c.train = dict(steps=400, learning_rate=3e-3, warmup_steps=100, weight_decay=0.05,
                 table_lr_multiplier=5.0, grad_clip=1.0, host_hashing=False,
                 table_optimizer="adam",  # or lazy_adam | rowwise_adagrad | sgd (docs/tables.md)
                 log_every=100, eval_every=100, eval_batches=4, checkpoint_every=200,
                 keep_checkpoints=3,
                 stop_after_steps=0)  # > 0: stop (and save) after this many steps of this run
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, num_devices=0)  # docs/sharding.md
  c.sample = dict(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0, num_samples=16)
  if variant.startswith("ar_b"):
    # mlp_dim 2048 = 8/3 * 768 rounded to 256: SwiGLU at the parameters of a 4x MLP.
    c.model.update(width=768, depth=24, num_heads=16, num_kv_heads=16, mlp_dim=2048,
                   dtype="bfloat16")
    c.model.engram.update(layers=(1, 12), heads=8, embed_per_ngram=512,
                          table_size=(32768,), table_row_multiple=512)
    c.data.update(source="array_record", height=16, width=16, codebook_size=16384,
                  num_classes=1000, batch_size=256, worker_count=8)
    c.train.update(steps=400_000, learning_rate=1e-4, warmup_steps=5000,
                   log_every=500, eval_every=10_000, eval_batches=16,
                   checkpoint_every=10_000)
    c.sample.update(cfg_scale=2.0, num_samples=64)
  if variant.endswith("_frozen_table"):  # the paper's probe: a frozen N(0, 1) table
    c.model.engram.update(table_trainable=False, table_init_std=1.0)
  if variant in ("digits_baseline", "ar_b"):
    c.model.engram.layers = ()
  return c


# ----------------------------------------------------------------------------------
# The budget ratio rho
# ----------------------------------------------------------------------------------
def engram_layers_for(depth: int) -> tuple[int, ...]:
  """Layer 1 and the middle layer `depth // 2` (one layer when they coincide)."""
  return tuple(sorted({min(1, depth - 1), depth // 2}))


def solve_budget(c: ml_collections.ConfigDict, rho: float, budget: int,
                 mlp_multiple: int = 1) -> ml_collections.ConfigDict:
  """Gives the backbone the share `rho` of `budget` parameters, Engram the rest.

  rho = P_backbone / P_budget, where P_backbone counts every parameter outside the
  Engram modules (`image.param_counts`) and the Engram modules (tables, W_V, W_K,
  norms, conv) take P_budget - P_backbone. Width and heads stay; depth is the whole
  number of blocks of the current shape nearest to the backbone share; mlp_dim is
  then the largest multiple of `mlp_multiple` whose backbone fits rho * budget;
  Engram sits at `engram_layers_for(depth)`; table_size is the largest one whose
  total fits the budget. Writes them into `c.model` and `c.budget`.
  """
  if not 0.0 < rho < 1.0:
    raise ValueError(f"budget rho={rho}: use 0 < rho < 1 (rho = 1 is the baseline)")
  count = lambda **model: image.param_counts(image.make_image_config(
      _with(c.model, **model), c.data))
  backbone = lambda depth, mlp: count(depth=depth, mlp_dim=mlp,
                                      engram=dict(layers=()))["backbone"]
  # P_backbone(depth, mlp) = fixed + depth * (per_block + per_mlp_unit * mlp), exactly
  per_mlp_unit = backbone(1, 2) - backbone(1, 1)
  per_block = backbone(2, 1) - backbone(1, 1) - per_mlp_unit
  fixed = backbone(1, 1) - per_block - per_mlp_unit
  reference_mlp = image.make_image_config(c.model, c.data).model.resolved_mlp_dim
  target = rho * budget
  depth = max(1, round((target - fixed) / (per_block + per_mlp_unit * reference_mlp)))
  mlp = math.floor((target - fixed - depth * per_block) / (depth * per_mlp_unit)
                   / mlp_multiple) * mlp_multiple
  if mlp < mlp_multiple:
    raise ValueError(f"budget rho={rho}: embeddings and one block already take "
                     f"{backbone(1, mlp_multiple) / budget:.3f} of the budget; use a "
                     f"larger rho")
  layers = engram_layers_for(depth)
  total = lambda size: count(depth=depth, mlp_dim=mlp, engram=dict(
      layers=layers, table_size=(size,)))["total"]
  size = allocation.largest_fitting(total, budget, smallest=c.model.engram.heads)
  if size is None:
    raise ValueError(f"budget rho={rho}: the smallest Engram tables at layers {layers} "
                     f"exceed the budget of {budget:,} parameters; use a smaller rho")
  c.model.update(depth=depth, mlp_dim=mlp)
  c.model.engram.update(layers=layers, table_size=(size,))
  # A record of what was solved (read by reports); editing it changes nothing.
  c.budget = ml_collections.ConfigDict(dict(rho=rho, params=budget))
  return c


def _with(model: ml_collections.ConfigDict, engram=None, **fields) -> dict:
  out = model.to_dict()
  out.update(fields)
  out["engram"] = {**out["engram"], **(engram or {})}
  return out
