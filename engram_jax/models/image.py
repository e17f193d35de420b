"""ImageARModel: a class-conditional autoregressive image decoder with 2D Engram.

A sequence of an `Hi x Wi` code grid has `Hi*Wi` positions (docs/vision.md): position 0
holds the class token, position `t >= 1` holds cell `t-1`, and position `t` predicts
cell `t`. The model is EngramLM's decoder (`lm.apply_blocks`: the same `Block`s, runs
of plain blocks scanned, Engram at `engram.layers`) with three changes:

* RoPE is 2D (`rope_positions_2d`): position `t >= 1` rotates with the (row, column) of
  the cell it holds, the class token with (0, 0); the causal mask and KV-cache slots
  still use the sequence position.
* Engram hashes 2D spatial n-grams (`spatial_hashing.spatial_hash_ids`): position `t` looks up
  the stencil of cells `< t` around cell `t`, all of which are inputs at positions
  `<= t`. When caching, the decode state is the canvas of cells generated so far.
* Logits cover the codebook only (`[B, T, codebook_size]`): class tokens are never
  predicted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import config as config_lib
from engram_jax import param_groups, spatial_hashing
from engram_jax.layers.attention import Mode, write_at
from engram_jax.layers.norms import RMSNorm
from engram_jax.models.lm import apply_blocks


@dataclasses.dataclass(frozen=True)
class ImageModelConfig:
  """The decoder (`model`, a validated `ModelConfig`) and the code grid it generates.

  Token ids (as `data.images.ImageVocab`): codes `[0, C)`, class `c` at `C + c`, the
  null class (unconditional rows, classifier-free guidance) at `C + num_classes`.
  """
  model: config_lib.ModelConfig
  height: int
  width: int
  codebook_size: int
  num_classes: int

  @property
  def cells(self) -> int:
    return self.height * self.width

  @property
  def null_class(self) -> int:
    return self.codebook_size + self.num_classes

  @property
  def vocab_size(self) -> int:
    """Embedding rows: codes, classes and the null class."""
    return self.codebook_size + self.num_classes + 1

  def class_tokens(self, labels_B):
    """Class token ids; label `num_classes` gives the null class (unconditional)."""
    return jnp.asarray(labels_B, jnp.int32) + self.codebook_size


def _as_dict(value: Any) -> dict:
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    return value.to_dict()
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  return dict(value)


def make_image_config(model: Any, data: Any) -> ImageModelConfig:
  """Builds and validates an ImageModelConfig from the `model` and `data` sections.

  model: a `ModelConfig` or a mapping for `config.from_dict`; `vocab_size = 0` and
    `max_len = 0` are derived (the image vocabulary; `Hi*Wi` positions).
  data: a mapping (or `data.images.ImageDataConfig`) with `height`, `width`,
    `num_classes` and the codebook: `codebook_size`, or `levels` when `source` is
    "digits".
  """
  model = (config_lib.to_dict(model) if isinstance(model, config_lib.ModelConfig)
           else _as_dict(model))
  data = _as_dict(data)
  codebook = data.get("codebook_size", 0)
  if data.get("source") == "digits" and not codebook:
    codebook = data["levels"]
  grid = dict(height=data["height"], width=data["width"], codebook_size=codebook,
              num_classes=data["num_classes"])
  for name, value in grid.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"data.{name}={value!r} is invalid: use a positive integer")
  if not model.get("vocab_size"):
    model["vocab_size"] = grid["codebook_size"] + grid["num_classes"] + 1
  if not model.get("max_len"):
    model["max_len"] = grid["height"] * grid["width"]
  return _check_grid(ImageModelConfig(config_lib.from_dict(model), **grid))


def validate(cfg: ImageModelConfig) -> ImageModelConfig:
  """Raises ValueError naming the first invalid field of the decoder, or the first
  that does not fit the grid."""
  config_lib.validate(cfg.model)
  return _check_grid(cfg)


def _check_grid(cfg: ImageModelConfig) -> ImageModelConfig:
  """The checks of `validate` that tie a (validated) decoder config to the grid."""
  m = cfg.model
  if m.vocab_size != cfg.vocab_size:
    raise ValueError(
        f"model.vocab_size={m.vocab_size} is invalid: the image vocabulary has "
        f"{cfg.codebook_size} codes + {cfg.num_classes} classes + 1 null class = "
        f"{cfg.vocab_size} ids; set it to 0 (derived) or {cfg.vocab_size}")
  if m.max_len < cfg.cells:
    raise ValueError(
        f"model.max_len={m.max_len} is invalid: a {cfg.height}x{cfg.width} grid needs "
        f"{cfg.cells} positions; set it to 0 (derived) or >= {cfg.cells}")
  if m.resolved_head_dim % 4:
    raise ValueError(
        f"model.head_dim={m.resolved_head_dim} is invalid: 2D RoPE rotates head_dim/4 "
        f"pairs with the row and as many with the column; use a multiple of 4")
  if m.engram.layers:
    spatial_hashing.validate_stencil(m.engram.stencil, m.engram.max_ngram, cfg.height, cfg.width)
  return cfg


def rope_positions_2d(positions_BxT, width: int):
  """(row, column) `[B, T, 2]` that RoPE rotates with at each sequence position.

  Position t >= 1 holds cell t-1: its row and column. The class token (position 0) gets
  (0, 0): the identity rotation (the same coordinates as cell 0).
  """
  cell_BxT = jnp.maximum(positions_BxT - 1, 0)
  return jnp.stack([cell_BxT // width, cell_BxT % width], axis=-1).astype(jnp.int32)


def _cells_of(inputs_BxT):
  """Cells `[B, T]`: inputs shifted left by one; the last (not yet known) cell is 0.

  Row t of the 2D hash reads only cells < t, so the placeholder is never read.
  """
  return jnp.concatenate([inputs_BxT[:, 1:], jnp.zeros_like(inputs_BxT[:, :1])], axis=1)


class ImageARModel(nn.Module):
  """Logits `[B, T, codebook_size]` (float32) for inputs `[B, T]` (class, cells...).

  positions_BxT: sequence positions; "decode" only (None and "prefill" start at 0).
  hash_ids_BxTxLxH: host-computed row ids (`spatial_hash_ids` of the targets; full
    forward and prefill); skips in-graph hashing.
  mode: None (full forward), "prefill" (the class token, optionally followed by
    cells, fills the KV cache, the canvas and the conv state) or "decode" (the cells at
    `positions_BxT`; each row writes them to its canvas at `position - 1`).
  """
  cfg: ImageModelConfig

  @nn.compact
  def __call__(self, inputs_BxT, *, positions_BxT=None, hash_ids_BxTxLxH=None,
               mode: Mode = None):
    g, cfg = self.cfg, self.cfg.model
    b, t = inputs_BxT.shape
    if t > g.cells:
      raise ValueError(f"inputs_BxT has {t} positions; a {g.height}x{g.width} grid "
                       f"has {g.cells}")
    if (positions_BxT is None) != (mode != "decode"):
      raise ValueError("pass positions_BxT in mode='decode' only: the full forward and "
                       "prefill start at the class token (position 0)")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cfg.engram.layers:
      hash_ids_BxTxLxH = self._hash(inputs_BxT, positions_BxT, hash_ids_BxTxLxH, mode)

    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ("vocab", "embed")), name="embed")
    h_BxTxD = apply_blocks(cfg, embed(inputs_BxT), positions_BxT, hash_ids_BxTxLxH, None,
                           mode, rope_positions_2d(positions_BxT, g.width))
    h_BxTxD = RMSNorm(("embed",), cfg.norm_eps, dtype, pdtype, name="final_norm")(h_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxC = embed.attend(h_BxTxD)[..., :g.codebook_size]
    else:
      logits_BxTxC = nn.Dense(
          g.codebook_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "vocab")),
          name="unembed")(h_BxTxD)
    return logits_BxTxC.astype(jnp.float32)

  def engram_hash_ids(self, inputs_BxT, *, hash_ids_BxTxLxH=None):
    """The hash ids `[B, T, L, H]` a full forward looks up (given ones pass through);
    `model.apply({}, inputs, method="engram_hash_ids")` computes them outside it."""
    return self._hash(inputs_BxT, None, hash_ids_BxTxLxH, None)

  def _hash(self, inputs_BxT, positions_BxT, hash_ids_BxTxLxH, mode):
    """2D row ids; when caching, keeps the canvas of known cells as decode state."""
    g = self.cfg
    spec, stencil = g.model.engram.hash_spec(), g.model.engram.stencil
    full_ids = lambda cells_BxT: (
        spatial_hashing.spatial_hash_ids(cells_BxT, spec, g.height, g.width, stencil)
        if hash_ids_BxTxLxH is None else hash_ids_BxTxLxH)
    if mode is None:
      return full_ids(_cells_of(inputs_BxT))
    b = inputs_BxT.shape[0]
    canvas = self.variable("cache", "canvas", jnp.zeros, (b, g.cells), jnp.int32)
    if mode == "prefill":
      cells_BxT = _cells_of(inputs_BxT)
      canvas.value = write_at(jnp.zeros_like(canvas.value), cells_BxT,
                              jnp.zeros((b,), jnp.int32))
      return full_ids(cells_BxT)
    start_B = positions_BxT[:, 0]
    canvas.value = write_at(canvas.value, inputs_BxT, start_B - 1)
    length = inputs_BxT.shape[1]
    row_ids = lambda canvas_HiWi, start: spatial_hashing.spatial_hash_ids_at(
        canvas_HiWi[None], start, spec, g.height, g.width, stencil, length)[0]
    return jax.vmap(row_ids)(canvas.value, start_B)


# ----------------------------------------------------------------------------------
# Parameter counts (analytic; tests check them against the initialised tree)
# ----------------------------------------------------------------------------------
def param_counts(cfg: ImageModelConfig) -> dict[str, int]:
  """Parameters by group, from the config alone (no tracing).

  backbone: everything outside the Engram modules (embedding, blocks' attention, MLP
  and norms, hyper-connections, final norm, unembedding); engram_tables: the hashed
  tables (padded rows included); engram_dense: the rest of the Engram modules (W_V,
  W_K, norms, conv).
  """
  m, d = cfg.model, cfg.model.width
  heads, kv, hd = m.num_heads, m.num_kv_heads, m.resolved_head_dim
  block = 2 * d * heads * hd + 2 * d * kv * hd + 3 * d * m.resolved_mlp_dim + 2 * d
  unembed = 0 if m.tie_embeddings else d * cfg.codebook_size
  backbone = (cfg.vocab_size * d + m.depth * block + d + unembed
              + config_lib.hyper_connection_counts(m)[0])
  e = m.engram
  tables = sum(e.padded_rows(e.hash_spec().rows(i)) * e.head_dim
               for i in range(len(e.layers)))
  dense = len(e.layers) * config_lib.engram_layer_weights(m)[0]
  return {"backbone": backbone, "engram_tables": tables, "engram_dense": dense,
          "total": backbone + tables + dense}


def tree_param_counts(params) -> dict[str, int]:
  """The same groups counted on a (possibly abstract) parameter tree."""
  counts = param_groups.counts(params, param_groups.engram_view,
                               ("backbone", "engram_tables", "engram_dense"))
  return {**counts, "total": sum(counts.values())}


def budget_ratio(cfg: ImageModelConfig, budget: int) -> float:
  """rho: the share of a total parameter budget that the backbone holds."""
  return param_counts(cfg)["backbone"] / budget


def abstract_params(cfg: ImageModelConfig, batch: int = 1) -> Any:
  """Parameter ShapeDtypeStructs (unboxed) by `jax.eval_shape`: nothing allocated."""
  model = ImageARModel(cfg)
  inputs = jnp.zeros((batch, cfg.cells), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), inputs)
  return nn.unbox(boxed)["params"]

