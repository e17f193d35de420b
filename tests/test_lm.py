"""EngramLM: causality, gate-off equals the baseline, tables under the real optimizer."""
import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engram_jax import hashing, optim
from engram_jax.models.layouts import (relayout_like, relayout_params, segmented_layout,
                                       unstack_blocks)
from engram_jax.models.lm import EngramLM, segments

from tests.conftest import tiny_model_config, with_random_conv

CFG = tiny_model_config()
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(jax.jit(EngramLM(CFG).init)(jax.random.key(0), TOKENS))["params"]


def _with_random_conv(params):
  return with_random_conv(params, CFG)


def _primitives(jaxpr) -> list[str]:
  """Names of the primitives of a jaxpr, nested ones (scan bodies, cond branches) too."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names.extend(_primitives(inner))
  return names


def test_every_block_is_in_one_scan_whatever_the_engram_layers(params):
  """One scanned stack: Engram layers add no copy of the block program (compile time
  does not grow with their number); their params sit beside it, one tree per layer."""
  assert segments(CFG) == [(0, 4)]
  assert sorted(params) == ["block_1", "block_3", "blocks_0_3", "embed", "final_norm",
                            "unembed"]
  assert set(params["block_1"]) == {"engram"} and "table" in params["block_3"]["engram"]
  counts = {}
  for layers in ((1, 3), (0, 1, 2, 3)):
    cfg = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, layers=layers))
    p = nn.unbox(jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), TOKENS))["params"]
    names = _primitives(jax.make_jaxpr(EngramLM(cfg).apply)({"params": p}, TOKENS).jaxpr)
    assert names.count("scan") == 1 and names.count("cond") == 1
    counts[layers] = {n: names.count(n) for n in ("dot_general", "custom_vjp_call")}
  assert counts[(1, 3)] == counts[(0, 1, 2, 3)]


def _scan_residuals(cfg, params):
  """Shapes the forward's scan stacks per layer for the backward pass."""
  loss = lambda p: EngramLM(cfg).apply({"params": p}, TOKENS).mean()
  jaxpr = jax.make_jaxpr(lambda p: jax.vjp(loss, p)[1])(params).jaxpr
  scan, = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  return collections.Counter(tuple(v.aval.shape) for v in scan.outvars
                             if v.aval.shape[:1] == (scan.params["length"],))


def test_the_scan_keeps_one_stream_per_layer_for_engram(params):
  """Memory: next to the baseline's residuals the scan keeps the stream before Engram
  (the cond is rematerialised), no Engram intermediates, no per-layer copy of the
  Engram params or rows (they are loop invariants)."""
  baseline = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, layers=()))
  base = nn.unbox(jax.eval_shape(EngramLM(baseline).init, jax.random.key(0), TOKENS))
  extra = _scan_residuals(CFG, params) - _scan_residuals(baseline, base["params"])
  assert extra == {(CFG.depth, *TOKENS.shape, CFG.width): 1}


def test_causal(params):
  """Changing token t leaves every output before t unchanged (Engram at two layers)."""
  p = _with_random_conv(params)
  apply = jax.jit(EngramLM(CFG).apply)
  base = np.asarray(apply({"params": p}, TOKENS))
  for t in (0, 5, 17):
    changed = TOKENS.copy()
    changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
    out = np.asarray(apply({"params": p}, changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t], base[:, t])


def test_engram_memory_reaches_the_logits(params):
  """The hashed n-grams matter: other hash ids (same tokens) change the logits."""
  p = _with_random_conv(params)
  model = EngramLM(CFG)
  spec = CFG.engram.hash_spec()
  ids = hashing.ngram_hash_ids(TOKENS, spec)
  base = model.apply({"params": p}, TOKENS, hash_ids_BxTxLxH=ids)
  np.testing.assert_allclose(base, model.apply({"params": p}, TOKENS), atol=1e-6)
  other = model.apply({"params": p}, TOKENS, hash_ids_BxTxLxH=(ids + 1) % 60)
  assert not np.allclose(base, other)


def test_gate_off_equals_model_without_engram(params):
  off = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, gate="off"))
  baseline = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, layers=()))
  p = _with_random_conv(params)
  logits_off = EngramLM(off).apply({"params": p}, TOKENS)
  base_params = relayout_params(p, CFG, baseline)
  assert "block_1" not in base_params and "blocks_0_3" in base_params
  logits_base = EngramLM(baseline).apply({"params": base_params}, TOKENS)
  np.testing.assert_allclose(logits_off, logits_base, rtol=1e-5, atol=1e-5)
  # and the learned gate does change them
  assert not np.allclose(EngramLM(CFG).apply({"params": p}, TOKENS), logits_base, atol=1e-3)


def _segmented(params, cfg):
  """The tree engram_jax wrote before the one scanned stack: a scan per run of plain
  blocks between Engram layers (`blocks_A_B`), each Engram block whole (`block_L`)."""
  layers, run = unstack_blocks(params, cfg), []
  out = {k: v for k, v in params.items() if not k.startswith("block")}

  def close_run():
    if run:
      out[f"blocks_{run[0]}_{run[-1]}"] = jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs), *[layers[l] for l in run])
      run.clear()
  for layer in range(cfg.depth):
    if layer in cfg.engram.layers:
      close_run()
      out[f"block_{layer}"] = layers[layer]
    else:
      run.append(layer)
  close_run()
  return out


def test_segmented_params_of_older_checkpoints_convert(params):
  old = _segmented(params, CFG)
  assert sorted(old) == ["block_1", "block_3", "blocks_0_0", "blocks_2_2", "embed",
                         "final_norm", "unembed"]
  assert segmented_layout(old) and not segmented_layout(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, relayout_params(old, CFG, CFG),
                         params)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(relayout_like(abstract, old)) == shapes(old)
  jax.tree_util.tree_map(np.testing.assert_array_equal, relayout_like(old, params), params)


def test_inference_restores_a_segmented_checkpoint_and_training_says_why_not(
    params, tmp_path):
  from engram_jax import checkpoints
  from engram_jax import workdir as workdir_lib
  workdir = str(tmp_path)
  mngr = checkpoints.manager(workdir, async_saves=False)
  checkpoints.save(mngr, 3, {"params": _segmented(params, CFG)}, {"batches": 3})
  mngr.close()
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  items, step = checkpoints.restore_checkpoint(workdir, {"params": abstract})
  assert step == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, items["params"], params)
  mngr = checkpoints.manager(workdir, async_saves=False, create=False)
  try:
    with pytest.raises(ValueError, match=r"checkpoint 3 has the segmented layer layout "
                       r"\(engram_jax before the one scanned stack"):
      workdir_lib.restore_or_explain(mngr, {"params": abstract}, workdir, CFG)
  finally:
    mngr.close()


def _train(cfg, params, steps=3):
  model = EngramLM(cfg)
  tx = optim.make_optimizer(1e-2, weight_decay=0.1, table_trainable=cfg.engram.table_trainable)
  opt_state = tx.init(params)
  batches = np.random.default_rng(1).integers(0, cfg.vocab_size, (steps, 2, 17)).astype(np.int32)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
  return params, batches


def test_frozen_table_bit_identical_after_training(params):
  frozen = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, table_trainable=False))
  trained, _ = _train(frozen, params)
  for layer in frozen.engram.layers:
    before = params[f"block_{layer}"]["engram"]["table"]
    after = trained[f"block_{layer}"]["engram"]["table"]
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  assert not np.array_equal(trained["embed"]["embedding"], params["embed"]["embedding"])


def test_trainable_table_changes_only_looked_up_rows(params):
  trained, batches = _train(CFG, params)
  spec = CFG.engram.hash_spec()
  ids = hashing.ngram_hash_ids(batches[:, :, :-1].reshape(-1, 16), spec)  # [B,T,L,H]
  for i, layer in enumerate(CFG.engram.layers):
    rows = np.unique((ids[:, :, i, :] + spec.offsets_LxH[i]).ravel())
    before = np.asarray(params[f"block_{layer}"]["engram"]["table"])
    after = np.asarray(trained[f"block_{layer}"]["engram"]["table"])
    moved = np.flatnonzero(np.any(before != after, axis=1))
    assert set(moved) <= set(rows) and len(moved) > 0.5 * len(rows)
    untouched = np.setdiff1d(np.arange(before.shape[0]), rows)
    assert len(untouched) > 0  # the check is not vacuous
    np.testing.assert_array_equal(after[untouched], before[untouched])


def test_optimizer_groups():
  groups = optim.param_groups({"block_1": {"engram": {"table": 0, "conv": 0,
                                                      "value": {"kernel": 0}}},
                               "final_norm": {"scale": 0}, "embed": {"embedding": 0}})
  assert groups["block_1"]["engram"]["table"] == "table"
  assert groups["block_1"]["engram"]["conv"] == "no_decay"
  assert groups["block_1"]["engram"]["value"]["kernel"] == "decay"
  assert groups["final_norm"]["scale"] == "no_decay"


def test_every_param_has_logical_axis_names():
  boxed = jax.eval_shape(EngramLM(CFG).init, jax.random.key(0), TOKENS)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  names = {n for leaf in leaves for n in leaf.names}
  assert {"table_rows", "table_dim", "embed", "vocab", "layers", "kv_heads"} <= names


def test_bf16_compute_keeps_f32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16", remat="full")
  variables = jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), TOKENS)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(variables))}
  assert dtypes == {jnp.dtype("float32")}
