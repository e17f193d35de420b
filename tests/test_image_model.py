"""ImageARModel: 2D RoPE, 2D causality, cached decode (CFG off/on) equals the full
forward, gate off equals no Engram, greedy sampling, parameter counts and rho configs."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import image as image_configs
from engram_jax import config as config_lib
from engram_jax import spatial_hashing
from engram_jax.sampling import image as generate_image
from engram_jax.data import images
from engram_jax.layers.attention import rope
from engram_jax.models import image
from engram_jax.models.layouts import relayout_params

from tests.conftest import with_random_conv

# 4 x 5: rows and columns differ, so a swapped (row, column) would show.
GRID = dict(height=4, width=5, codebook_size=11, num_classes=3)
CFG = image.make_image_config(
    dict(width=32, depth=4, num_heads=4, num_kv_heads=2,
         engram=dict(layers=(1, 3), max_ngram=3, heads=2, embed_per_ngram=16,
                     table_size=(61, 67), seed=3)), GRID)
HW = CFG.cells
RNG = np.random.default_rng(0)
CELLS = RNG.integers(0, CFG.codebook_size, (2, HW)).astype(np.int32)
LABELS = np.array([0, 2], np.int32)
INPUTS = np.concatenate([LABELS[:, None] + CFG.codebook_size, CELLS[:, :-1]], axis=1)
MODEL = image.ImageARModel(CFG)
SAMPLING = ("cfg_scale", "temperature", "top_k", "top_p")


@pytest.fixture(scope="module")
def params():
  p = nn.unbox(jax.jit(MODEL.init)(jax.random.key(0), INPUTS))["params"]
  return with_random_conv(p, CFG.model)


@pytest.fixture(scope="module")
def forward(params):
  return jax.jit(lambda x: MODEL.apply({"params": params}, x))


def _with_null(inputs):
  out = np.array(inputs)
  out[:, 0] = CFG.null_class
  return out


# ----------------------------------------------------------------------------------
# 2D RoPE
# ----------------------------------------------------------------------------------
def test_rope_2d_rotates_first_pairs_with_row_and_last_pairs_with_column():
  """Head dim 16: pairs (i, i+8); pairs 0..3 follow the row, pairs 4..7 the column."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
  pos = jnp.asarray(RNG.integers(0, 9, (2, 5, 2)), jnp.int32)
  out = rope(x, pos, 100.0)
  row_dims = np.r_[0:4, 8:12]   # the pairs (0..3, 8..11) as a head of 8 dims
  col_dims = np.r_[4:8, 12:16]
  np.testing.assert_allclose(out[..., row_dims], rope(x[..., row_dims], pos[..., 0], 100.0),
                             atol=1e-6)
  np.testing.assert_allclose(out[..., col_dims], rope(x[..., col_dims], pos[..., 1], 100.0),
                             atol=1e-6)
  # scores depend only on the 2D offset between query and key
  q, k = x[:, :1], x[:, 1:2]
  score = lambda pq, pk: jnp.sum(rope(q, pq, 100.0) * rope(k, pk, 100.0), axis=-1)
  p1, p2 = jnp.array([[[1, 2]]] * 2), jnp.array([[[3, 0]]] * 2)
  shift = jnp.array([2, 3])
  np.testing.assert_allclose(score(p1, p2), score(p1 + shift, p2 + shift), atol=1e-5)
  assert not np.allclose(score(p1, p2), score(p1, p2[..., ::-1]), atol=1e-3)


def test_rope_positions_are_the_held_cell_and_class_at_origin():
  pos = image.rope_positions_2d(jnp.arange(HW)[None], CFG.width)[0]
  np.testing.assert_array_equal(pos[0], [0, 0])              # class token
  np.testing.assert_array_equal(pos[1], [0, 0])              # holds cell 0
  np.testing.assert_array_equal(pos[6], [1, 0])              # holds cell 5 = row 1, col 0
  np.testing.assert_array_equal(pos[HW - 1], [3, 3])         # holds cell 18


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------
def test_causal_2d(forward):
  """Changing cell t changes no logit at positions <= t (those predict cells <= t)."""
  base = np.asarray(forward(INPUTS))
  for t in (0, CFG.width - 1, CFG.width, 2 * CFG.width + 1, HW - 2):
    changed = INPUTS.copy()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % CFG.codebook_size  # cell t
    out = np.asarray(forward(changed))
    np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
    assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_host_hash_ids_equal_in_graph_and_reach_the_logits(params, forward):
  spec = CFG.model.engram.hash_spec()
  ids = spatial_hashing.spatial_hash_ids(CELLS, spec, CFG.height, CFG.width, CFG.model.engram.stencil)
  apply = jax.jit(lambda i: MODEL.apply({"params": params}, INPUTS, hash_ids_BxTxLxH=i))
  # two programs (ids as input vs hashed in the graph): equal up to f32 rounding
  np.testing.assert_allclose(apply(ids), forward(INPUTS), rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply((ids + 1) % 60), forward(INPUTS), atol=1e-4)


@pytest.mark.parametrize("prefill_len, cfg_scale", [(1, 0.0), (7, 2.5)])
def test_cached_decode_equals_full_forward(params, forward, prefill_len, cfg_scale):
  """Prefill of the class token (or of 6 cells: across a row end), then scanned decode."""
  cached = jax.jit(generate_image.teacher_forced_logits, static_argnums=0,
                   static_argnames=("prefill_len", "cfg_scale"))(
      MODEL, params, INPUTS, prefill_len=prefill_len, cfg_scale=cfg_scale)
  want = np.asarray(forward(INPUTS))
  if cfg_scale:
    uncond = np.asarray(forward(_with_null(INPUTS)))
    want = uncond + cfg_scale * (want - uncond)
  np.testing.assert_allclose(cached, want, rtol=2e-4, atol=2e-4)


def test_gate_off_equals_model_without_engram(params):
  off = dataclasses.replace(CFG, model=dataclasses.replace(
      CFG.model, engram=dataclasses.replace(CFG.model.engram, gate="off")))
  baseline = dataclasses.replace(CFG, model=dataclasses.replace(
      CFG.model, engram=dataclasses.replace(CFG.model.engram, layers=())))
  base_params = relayout_params(params, CFG.model, baseline.model)
  assert "block_1" not in base_params and "blocks_0_3" in base_params
  logits = lambda cfg, p: jax.jit(image.ImageARModel(cfg).apply)({"params": p}, INPUTS)
  logits_base = logits(baseline, base_params)
  np.testing.assert_allclose(logits(off, params), logits_base, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits(CFG, params), logits_base, atol=1e-3)


# ----------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------
_generate = jax.jit(generate_image.generate_images, static_argnums=0,
                    static_argnames=SAMPLING)


@pytest.mark.parametrize("cfg_scale", [0.0, 3.0])
def test_greedy_equals_full_forward_argmax_loop(params, forward, cfg_scale):
  codes = np.asarray(_generate(MODEL, params, LABELS, jax.random.key(0),
                               cfg_scale=cfg_scale, temperature=0.0))
  assert codes.shape == (2, CFG.height, CFG.width)
  seq = np.zeros((2, HW), np.int32)  # fixed shape: one compile; the model is causal
  seq[:, 0] = LABELS + CFG.codebook_size
  for t in range(HW):
    logits = np.asarray(forward(seq))[:, t]
    if cfg_scale:
      uncond = np.asarray(forward(_with_null(seq)))[:, t]
      logits = uncond + cfg_scale * (logits - uncond)
    cell = np.argmax(logits, axis=-1)
    if t + 1 < HW:
      seq[:, t + 1] = cell
    np.testing.assert_array_equal(codes.reshape(2, HW)[:, t], cell)


def test_sampling_rows_have_their_own_streams(params):
  labels = np.array([1, 1, 1], np.int32)
  draw = lambda key: np.asarray(_generate(MODEL, params, labels, key, cfg_scale=1.5,
                                          temperature=1.0, top_k=4))
  codes = draw(jax.random.key(1))
  assert codes.min() >= 0 and codes.max() < CFG.codebook_size
  assert not np.array_equal(codes[0], codes[1])   # same class, different rows
  np.testing.assert_array_equal(codes, draw(jax.random.key(1)))
  assert not np.array_equal(codes, draw(jax.random.key(2)))


# ----------------------------------------------------------------------------------
# Configs, parameter counts, the budget ratio
# ----------------------------------------------------------------------------------
def _model_cfg(variant):
  c = image_configs.get_config(variant)
  return c, image.make_image_config(c.model, c.data)


def test_analytic_counts_equal_the_initialised_tree():
  """Also with hyper-connections (M = 2), V4.1's layer and a constant gate, which the
  counts once ignored (a wrong rho for such a config)."""
  def model(**changes):
    engram = changes.pop("engram", {})
    return dataclasses.replace(CFG, model=config_lib.validate(dataclasses.replace(
        CFG.model, engram=dataclasses.replace(CFG.model.engram, **engram), **changes)))
  for cfg in (CFG, _model_cfg("digits")[1], _model_cfg("digits_rho_0.41")[1],
              model(branches=2), model(branches=2, engram=dict(variant="v4")),
              model(engram=dict(gate=0.5))):
    assert image.param_counts(cfg) == image.tree_param_counts(image.abstract_params(cfg))


def test_ar_b_has_the_paper_shape():
  """24 layers, width 768, 16 heads, by eval_shape (nothing allocated)."""
  _, cfg = _model_cfg("ar_b")
  p = image.abstract_params(cfg)
  assert sorted(p) == ["blocks_0_23", "embed", "final_norm", "unembed"]
  attention = p["blocks_0_23"]["attention"]
  assert attention["query"]["kernel"].shape == (24, 768, 16, 48)
  assert attention["key"]["kernel"].shape == (24, 768, 16, 48)
  assert p["embed"]["embedding"].shape == (16384 + 1000 + 1, 768)
  assert p["unembed"]["kernel"].shape == (768, 16384)
  assert cfg.model.max_len == 256 and (cfg.height, cfg.width) == (16, 16)
  assert image.param_counts(cfg) == image.tree_param_counts(p)

  _, engram = _model_cfg("ar_b_engram")
  p = image.abstract_params(engram)
  assert sorted(p) == ["block_1", "block_12", "blocks_0_23", "embed", "final_norm", "unembed"]
  assert image.param_counts(engram) == image.tree_param_counts(p)
  counts = image.param_counts(engram)
  assert counts["backbone"] == image.param_counts(cfg)["total"]   # same backbone


@pytest.mark.parametrize("family, baseline, tolerance", [
    ("digits", "digits_baseline", 5e-3), ("ar_b", "ar_b", 5e-4)])
def test_rho_configs_hit_the_budget(family, baseline, tolerance):
  """Budget: the largest table that fits (one step more overshoots), so the gap is
  below one table_size step: L * head_dim * (table_row_multiple + O * K * prime gap)
  parameters, < 0.5% of digits' 264k and < 0.05% of ar_b's 196M. rho: the backbone's
  share is at most rho and misses it by less than one mlp_dim rounding step."""
  budget = image.param_counts(_model_cfg(baseline)[1])["total"]
  realized = []
  for rho in image_configs.PAPER_RHOS:
    c, cfg = _model_cfg(f"{family}_rho_{rho}")
    counts = image.param_counts(cfg)
    assert c.budget.rho == rho and c.budget.params == budget
    bigger = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engram=(
        dataclasses.replace(cfg.model.engram, table_size=(cfg.model.engram.table_size[0] + 1,)))))
    assert counts["total"] <= budget < image.param_counts(bigger)["total"]
    assert budget - counts["total"] < tolerance * budget
    mlp_step = (image.param_counts(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, mlp_dim=cfg.model.mlp_dim + 1)))["backbone"] - counts["backbone"])
    mlp_step *= image_configs._MLP_MULTIPLE[family]
    assert rho * budget - mlp_step < counts["backbone"] <= rho * budget
    assert set(cfg.model.engram.layers) == set(image_configs.engram_layers_for(cfg.model.depth))
    realized.append(image.budget_ratio(cfg, budget))
  assert realized == sorted(realized) and len(set(realized)) == len(realized)
  np.testing.assert_allclose(realized, image_configs.PAPER_RHOS, atol=3e-3)


def test_rho_variant_names_parse_as_numbers():
  assert (image_configs.get_config("digits_rho_0.90").model
          == image_configs.get_config("digits_rho_0.9").model)


def test_ar_b_rho_tree_matches_analytic_count():
  _, cfg = _model_cfg("ar_b_rho_0.17")
  assert image.param_counts(cfg) == image.tree_param_counts(image.abstract_params(cfg))


def test_digits_vocab_matches_the_data_pipeline():
  c, cfg = _model_cfg("digits")
  vocab = images.image_vocab(images.ImageDataConfig(**c.data))
  assert (cfg.vocab_size, cfg.null_class, cfg.codebook_size) == (
      vocab.size, vocab.null_class, vocab.codebook_size)
  assert cfg.model.max_len == 64 and cfg.model.engram.stencil == spatial_hashing.DEFAULT_STENCIL


@pytest.mark.parametrize("model, data, match", [
    (dict(width=24, num_heads=4), {}, r"model.head_dim=6 .*multiple of 4"),
    (dict(vocab_size=99), {}, r"model.vocab_size=99 .*11 codes \+ 3 classes \+ 1 null"),
    (dict(max_len=10), {}, r"model.max_len=10 .*4x5 grid needs 20"),
    (dict(engram=dict(layers=(1,), stencil="0,-1;0,1;-1,0")), {},
     r"engram.stencil offset \(0, 1\)"),
    (dict(engram=dict(layers=(1,), stencil="0,-1")), {}, r"engram.max_ngram=3 needs 3"),
    (dict(), dict(height=0), r"data.height=0"),
])
def test_validation_names_the_field(model, data, match):
  with pytest.raises(ValueError, match=match):
    image.make_image_config({**dict(width=32, depth=2, num_heads=4, num_kv_heads=2),
                             **model}, {**GRID, **data})


@pytest.mark.parametrize("variant, match", [
    ("ar_b_rho_1.5", r"rho=1.5: use 0 < rho < 1"),
    ("ar_b_rho_x", r"must be a number in \(0, 1\)"),
    ("digits_rho_0.01", r"rho=0.01: embeddings and one block"),
    ("vit_rho_0.5", r"unknown variant"),
    ("ar_c", r"unknown variant"),
])
def test_bad_variants(variant, match):
  with pytest.raises(ValueError, match=match):
    image_configs.get_config(variant)


def test_stencil_round_trips_through_the_model_dict():
  d = config_lib.to_dict(CFG.model)
  assert d["engram"]["stencil"][0] == [0, -1]
  assert config_lib.from_dict(d) == CFG.model
  d["engram"]["stencil"] = "0,-1; -1,0; -1,-1"
  assert config_lib.from_dict(d).engram.stencil == ((0, -1), (-1, 0), (-1, -1))


def test_frozen_table_variants_differ_only_in_the_table_switch():
  from configs import image as image_configs
  for base in ("digits", "ar_b_engram"):
    frozen = image_configs.get_config(base + "_frozen_table")
    plain = image_configs.get_config(base)
    assert frozen.model.engram.table_trainable is False
    assert frozen.model.engram.table_init_std == 1.0
    frozen.model.engram.table_trainable = True
    assert frozen.to_dict() == plain.to_dict()
