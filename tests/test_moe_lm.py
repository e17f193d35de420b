"""MoE and hyper-connections inside EngramLM: layer plan, equivalences, causality,
cached decode, the train step (aux loss, routing biases, statistics) and resume."""
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import config as config_lib
from engram_jax import param_groups, train, train_steps
from engram_jax.sampling import text as generate
from engram_jax.layers import moe
from engram_jax.models.layouts import relayout_params, stack_blocks, unstack_blocks
from engram_jax.models.lm import EngramLM, segments

from tests.equivalence import assert_cached_equals_full
from tests.conftest import tiny_model_config, with_random_conv

BASE = tiny_model_config()                      # Engram at 1 and 3, depth 4, width 32
MOE = config_lib.MoEConfig(num_experts=4, expert_dim=16, top_k=2, num_shared=1,
                           shared_dim=8, first_dense_layers=1, balance="bias")
TOKENS = np.random.default_rng(0).integers(0, BASE.vocab_size, (2, 20)).astype(np.int32)


def _cfg(**fields):
  return config_lib.validate(dataclasses.replace(BASE, **fields))


@functools.lru_cache(maxsize=None)
def _init_cached(cfg, shape):
  return nn.unbox(jax.jit(EngramLM(cfg).init)(jax.random.key(0), np.zeros(shape, np.int32)))


def _init(cfg, tokens=TOKENS):
  """Variables of `cfg` (initialised once per config and shape: init is token-free)."""
  return _init_cached(cfg, tokens.shape)


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  """The jitted forward of `cfg` (one compile per config, not op-by-op dispatch)."""
  return jax.jit(EngramLM(cfg).apply)


def _randomised(variables, cfg, seed=1):
  """Random Engram convs, hyper-connection coefficients and routing biases, so the
  paths that are zero or identity at init are exercised."""
  params = with_random_conv(variables["params"], cfg)
  keys = iter(jax.random.split(jax.random.key(seed), 1000))

  def perturb(path, x):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if any(n.endswith("_hc") for n in names):
      return x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
    return x
  out = {"params": jax.tree_util.tree_map_with_path(perturb, params)}
  if moe.BIAS in variables:
    out[moe.BIAS] = jax.tree_util.tree_map(
        lambda b: 0.05 * jax.random.normal(next(keys), b.shape, b.dtype), variables[moe.BIAS])
  return out


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------
def _moe(**kw):
  return dataclasses.replace(BASE, moe=dataclasses.replace(MOE, **kw))


@pytest.mark.parametrize("cfg, match", [
    (lambda: _moe(expert_dim=0), r"moe.expert_dim=0 is invalid: must be >= 1 when"),
    (lambda: _moe(top_k=5), r"moe.top_k=5 .*\[1, moe.num_experts=4\]"),
    (lambda: _moe(first_dense_layers=4), r"moe.first_dense_layers=4 .*< model.depth=4"),
    (lambda: _moe(score_fn="relu"), r"moe.score_fn='relu' .*\('sigmoid', 'softmax'\)"),
    (lambda: _moe(balance="loss"), r"moe.balance='loss'"),
    (lambda: _moe(capacity_factor=-1.0), r"moe.capacity_factor=-1.0 .*>= 0"),
    (lambda: _moe(num_experts=-2), r"moe.num_experts=-2 .*>= 0"),
    (lambda: dataclasses.replace(BASE, hyper="mhc"), r"model.hyper='mhc' .*'auto'"),
    (lambda: dataclasses.replace(BASE, hyper="none", branches=2),
     r"model.hyper='none' .*model.branches=2 needs hyper-connections"),
    (lambda: dataclasses.replace(BASE, branches=0), r"model.branches=0 .*>= 1"),
])
def test_validation_names_the_field(cfg, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg())


def test_from_dict_round_trip_with_moe_and_branches():
  cfg = _cfg(moe=MOE, branches=2, hyper="static")
  assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
  with pytest.raises(ValueError, match=r"moe.experts is not a known field"):
    config_lib.from_dict({"moe": {"experts": 4}})


# ----------------------------------------------------------------------------------
# Layer plan and MoE equivalence
# ----------------------------------------------------------------------------------
def test_runs_split_at_first_dense_layers_and_blocks_pick_their_ffn():
  cfg = _cfg(depth=6, moe=dataclasses.replace(MOE, first_dense_layers=2),
             engram=dataclasses.replace(BASE.engram, layers=(1, 4)))
  assert segments(cfg) == [(0, 2), (2, 4)]  # Engram layers stay inside the runs
  no_engram = _cfg(depth=6, moe=dataclasses.replace(MOE, first_dense_layers=3),
                   engram=dataclasses.replace(BASE.engram, layers=()))
  assert segments(no_engram) == [(0, 3), (3, 3)]
  params = jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), TOKENS)["params"]
  ffn = {name: "moe" if "moe" in block else "mlp" for name, block in params.items()
         if name.startswith("blocks")}
  assert ffn == {"blocks_0_1": "mlp", "blocks_2_5": "moe"}
  assert set(params["block_1"]) == set(params["block_4"]) == {"engram"}


def test_relayout_variables_with_a_dense_engram_block():
  """The `routing` collection has no entry for dense blocks (layers 0, 1 here):
  relayout to the baseline plan and back keeps every routing bias where its layer goes."""
  cfg = _cfg(moe=dataclasses.replace(MOE, first_dense_layers=2))  # Engram at 1 (dense), 3
  baseline = _cfg(moe=cfg.moe, engram=dataclasses.replace(BASE.engram, layers=()))
  variables = _randomised(_init(cfg), cfg)
  assert set(variables[moe.BIAS]) == {"blocks_2_3"}
  base = relayout_params(variables, cfg, baseline)
  want = nn.unbox(jax.eval_shape(EngramLM(baseline).init, jax.random.key(0), TOKENS))
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
  assert shapes(base) == shapes({k: want[k] for k in ("params", moe.BIAS)})
  bias = base[moe.BIAS]["blocks_2_3"]["moe"]["bias"]
  np.testing.assert_array_equal(bias, variables[moe.BIAS]["blocks_2_3"]["moe"]["bias"])
  back = relayout_params(base, baseline, cfg, engram_params={
      layer: variables["params"][f"block_{layer}"]["engram"] for layer in (1, 3)})
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_one_expert_top_one_equals_the_dense_model():
  """MoE(E=1, k=1, no shared) with the MLP's weights is the MLP: the wiring is exact."""
  one = config_lib.MoEConfig(num_experts=1, expert_dim=BASE.resolved_mlp_dim, top_k=1,
                             first_dense_layers=1, balance="none")
  cfg = _cfg(moe=one)
  dense = _init(BASE)["params"]
  layers = []
  for block, fresh in zip(unstack_blocks(dense, BASE), unstack_blocks(_init(cfg)["params"], cfg)):
    if "moe" in fresh:
      block = {**{k: v for k, v in block.items() if k != "mlp"}, "moe": {
          "router": fresh["moe"]["router"],
          **{w: block["mlp"][w]["kernel"][None] for w in ("gate", "up", "down")}}}
    layers.append(block)
  params = {**{k: v for k, v in dense.items() if not k.startswith("block")},
            **stack_blocks(layers, cfg)}
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      _init(cfg)["params"])
  want = _apply(BASE)({"params": with_random_conv(dense, BASE)}, TOKENS)
  got = _apply(cfg)({"params": with_random_conv(params, cfg)}, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# Hyper-connections
# ----------------------------------------------------------------------------------
def _plain_into_hyper(plain_params, hyper_params):
  """Hyper-connection params from `hyper_params`, everything else from the plain model."""
  def merge(plain, hyper):
    out = dict(hyper)
    for key, value in plain.items():
      out[key] = merge(value, hyper[key]) if isinstance(value, dict) else value
    return out
  merged = merge(plain_params, hyper_params)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(hyper_params)
  return merged


@pytest.mark.parametrize("hyper", ["dynamic", "static"])
def test_one_branch_equals_the_plain_residual_model(hyper):
  """M = 1 hyper-connections (forced by `model.hyper`) with the plain model's weights."""
  plain_cfg = _cfg(moe=MOE)
  hyper_cfg = _cfg(moe=MOE, hyper=hyper)
  plain = _randomised(_init(plain_cfg), plain_cfg)
  hyper_params = _init(hyper_cfg)["params"]
  assert any(k.endswith("_hc") for k in hyper_params["blocks_1_3"])
  variables = {**plain, "params": _plain_into_hyper(plain["params"], hyper_params)}
  want = _apply(plain_cfg)(plain, TOKENS)
  got = _apply(hyper_cfg)(variables, TOKENS)
  # Equal up to float rounding: XLA fuses the scanned blocks of the two graphs
  # differently (about 1e-6 on logits of order 1; M = 1 changes no value).
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0.98 if "depth" in jax.tree_util.keystr(path) else x,
      variables["params"])
  off = _apply(hyper_cfg)({**variables, "params": scaled}, TOKENS)
  assert np.abs(np.asarray(off) - np.asarray(want)).max() > 1e-3


def test_branches_at_init_equal_the_plain_model_without_engram():
  """M = 3 at the paper's init: branches carry the plain stream; the final norm
  removes the factor M of the summed read-out."""
  no_engram = dataclasses.replace(BASE.engram, layers=())
  plain_cfg = _cfg(moe=MOE, engram=no_engram)
  hyper_cfg = _cfg(moe=MOE, engram=no_engram, branches=3)
  plain = _init(plain_cfg)
  variables = {**plain, "params": _plain_into_hyper(plain["params"],
                                                    _init(hyper_cfg)["params"])}
  np.testing.assert_allclose(_apply(hyper_cfg)(variables, TOKENS),
                             _apply(plain_cfg)(plain, TOKENS), rtol=1e-4, atol=1e-4)


def test_scanned_sublayers_read_branch_l_mod_m_at_init():
  cfg = _cfg(branches=3)  # Engram at 1 and 3, inside the scan
  params = _init(cfg)["params"]["blocks_0_3"]
  for layer in range(4):
    for j, name in enumerate(("attention_hc", "mlp_hc")):
      want = np.eye(3)[(2 * layer + j) % 3]
      np.testing.assert_array_equal(params[name]["width"][layer], want)


HC_MOE = _cfg(moe=MOE, branches=2)


@pytest.fixture(scope="module")
def hc_moe_variables():
  return _randomised(_init(HC_MOE), HC_MOE)


def test_causal_with_two_branches_and_moe(hc_moe_variables):
  apply = _apply(HC_MOE)
  base = np.asarray(apply(hc_moe_variables, TOKENS))
  for t in (0, 7, 15):
    changed = TOKENS.copy()
    changed[:, t] = (changed[:, t] + 1) % BASE.vocab_size
    out = np.asarray(apply(hc_moe_variables, changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert not np.allclose(out[:, t], base[:, t])


def test_cached_decode_equals_full_forward_with_branches_and_moe(hc_moe_variables):
  """Dropless routing is per token, so prefill + decode steps give the full forward."""
  rng = np.random.default_rng(3)
  seq = rng.integers(0, BASE.vocab_size, (3, 28)).astype(np.int32)
  lengths = np.array([3, 10, 6], np.int32)
  model = EngramLM(HC_MOE)
  full = _apply(HC_MOE)(hc_moe_variables, seq)
  assert_cached_equals_full(model, hc_moe_variables, seq, lengths, full, 10,
                            28 - int(lengths.max()))


def test_remat_bf16_moe_branches_trace_and_differentiate():
  cfg = _cfg(moe=MOE, branches=2, remat="full", dtype="bfloat16")
  variables = jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), TOKENS)
  routing = variables[moe.BIAS]

  def loss(params):
    logits, stats = EngramLM(cfg).apply({"params": params, moe.BIAS: routing}, TOKENS,
                                        mutable=[moe.STATS])
    return logits.mean() + moe.total_aux_loss(stats[moe.STATS])
  grads = jax.eval_shape(jax.grad(loss), nn.unbox(variables["params"]))
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(grads)}
  assert dtypes == {jnp.dtype("float32")}
  assert routing["blocks_1_3"]["moe"]["bias"].shape == (3, MOE.num_experts)


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------
def _state(cfg, tx):
  variables = jax.tree_util.tree_map(jnp.array, _init(cfg))  # a copy: the step donates it
  return train_steps.TrainState(jnp.array(0, jnp.int32), variables["params"],
                          tx.init(variables["params"]), variables.get(moe.BIAS, {}))


def _batch():
  seq = np.random.default_rng(5).integers(0, BASE.vocab_size, (2, 17)).astype(np.int32)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}


def test_train_step_adds_aux_loss_and_reports_routing():
  import optax
  cfg = _cfg(moe=dataclasses.replace(MOE, balance="aux_loss", aux_loss_coef=0.5))
  model, tx = EngramLM(cfg), optax.sgd(0.1)
  state, batch = _state(cfg, tx), _batch()

  def losses(p):
    logits, sown = model.apply({"params": p}, batch["inputs"], mutable=[moe.STATS])
    return (train_steps.cross_entropy(logits, batch["targets"]).mean(),
            moe.total_aux_loss(sown[moe.STATS]))

  @jax.jit
  def reference(p):
    (ce, aux), (d_ce, d_aux) = losses(p), jax.jacrev(losses)(p)
    return ce, aux, jax.tree_util.tree_map(jnp.add, d_ce, d_aux), d_ce
  ce, aux, with_aux, ce_only = reference(state.params)
  router = lambda tree: np.asarray(tree["blocks_1_3"]["moe"]["router"])
  start = router(state.params)
  new, metrics = train_steps.make_train_step(model, tx)(_state(cfg, tx), batch)  # donates
  assert float(aux) >= 0.5 * 3 - 1e-6   # coef * (>= 1 per layer) * 3 MoE layers
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["moe_aux_loss"], aux, rtol=1e-6)
  # the update follows the gradient of CE + aux, not of CE alone
  np.testing.assert_allclose(router(new.params), start - 0.1 * router(with_aux), atol=1e-6)
  assert np.abs(router(with_aux) - router(ce_only)).max() > 1e-4
  for name in ("moe_max_violation", "moe_mean_violation", "moe_dropped_fraction"):
    assert name in metrics and np.isfinite(metrics[name])
  assert float(metrics["moe_max_violation"]) >= float(metrics["moe_mean_violation"]) >= 0


def test_train_step_updates_routing_biases_by_the_rate():
  """b += rate * sign(mean load - load) with this step's loads (before the update)."""
  import optax
  cfg = _cfg(moe=dataclasses.replace(MOE, bias_rate=0.01))
  model, tx = EngramLM(cfg), optax.sgd(1e-2)
  state, batch = _state(cfg, tx), _batch()
  state = state.replace(routing=_randomised(_init(cfg), cfg)[moe.BIAS])
  _, sown = jax.jit(functools.partial(model.apply, mutable=[moe.STATS]))(
      train_steps.state_variables(state), batch["inputs"])
  want = moe.update_routing_biases(state.routing, sown[moe.STATS], 0.01)
  before = jax.tree_util.tree_map(np.array, state.routing)
  new, _ = train_steps.make_train_step(model, tx)(state, batch)
  for got, expected, old in zip(*(jax.tree_util.tree_leaves(t)
                                  for t in (new.routing, want, before))):
    np.testing.assert_allclose(got, expected, atol=1e-7)
    delta = np.abs(np.asarray(got) - old)
    assert np.all(np.isclose(delta, 0.01) | (delta == 0)) and np.any(delta > 0)
  assert int(new.step) == 1


def test_parameter_overview_has_expert_groups():
  cfg = _cfg(moe=MOE)
  params = _init(cfg)["params"]
  counts = param_groups.parameter_overview(params)
  d, layers = BASE.width, 3
  assert counts["routed_experts"] == layers * 3 * d * MOE.expert_dim * MOE.num_experts
  assert counts["shared_experts"] == layers * 3 * d * MOE.shared_dim
  assert counts["total"] == sum(x.size for x in jax.tree_util.tree_leaves(params))


def _moe_config(steps, **train_overrides):
  from tests import lm_test_config
  c = lm_test_config.get_config("tiny")
  c.model.moe = dict(num_experts=4, expert_dim=16, top_k=2, num_shared=1, shared_dim=8,
                     first_dense_layers=1, balance="bias", bias_rate=0.01)
  c.model.branches = 2
  c.train.update(steps=steps, eval_every=steps)
  c.train.update(train_overrides)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["train_loss"] for r in _metrics(workdir) if "train_loss" in r}


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
  """4 steps of the tiny MoE + 2-branch LM on one device (shared by the tests below)."""
  workdir = str(tmp_path_factory.mktemp("moe_run"))
  train.train_and_evaluate(_moe_config(4), workdir)
  return workdir


def test_moe_training_resumes_with_its_routing_biases(moe_run, tmp_path):
  """The routing collection is part of the checkpoint: 2 + 2 steps equal 4 steps."""
  one, two = moe_run, str(tmp_path / "two")
  train.train_and_evaluate(_moe_config(4, stop_after_steps=2), two)
  train.train_and_evaluate(_moe_config(4), two)
  assert _losses(one) == _losses(two) and len(_losses(one)) == 4
  assert all("moe_max_violation" in r and "moe_dropped_fraction" in r
             for r in _metrics(one) if "train_loss" in r)
  # generation loads params and the trained biases
  from engram_jax import workdir
  run = workdir.load(one)
  model, variables, vocab_map, step = run.model, run.variables, run.vocab_map, run.step
  assert step == 4 and set(variables) == {"params", moe.BIAS}
  biases = np.concatenate([np.ravel(b) for b in jax.tree_util.tree_leaves(variables[moe.BIAS])])
  assert np.any(biases != 0)
  prompt = np.array([[1, 2, 3]], np.int32)
  out = generate.generate(model, variables, prompt, np.array([3], np.int32),
                          jax.random.key(0), max_new_tokens=4, temperature=0.0,
                          vocab_map_V=vocab_map)
  assert out.shape == (1, 4)


def test_expert_parallel_training_matches_single_device(moe_run, tmp_path):
  """8 simulated devices (data 2 x expert 4): experts sharded, tokens by all_to_all."""
  sharded = str(tmp_path / "sharded")
  config = _moe_config(4)
  config.mesh.update(num_devices=8, data=2, expert=4)
  train.train_and_evaluate(config, sharded)
  single = _losses(moe_run)
  assert single.keys() == _losses(sharded).keys() and len(single) == 4
  for step, loss in single.items():
    assert _losses(sharded)[step] == pytest.approx(loss, rel=2e-5), step
