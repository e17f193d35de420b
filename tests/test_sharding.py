"""Meshes, rules and the row-sharded Engram lookup on 8 simulated CPU devices."""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import config as config_lib
from engram_jax import optim, sharding
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config, with_random_conv

CFG = tiny_model_config()  # Engram at layers 1 and 3
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
TABLE = ("block_1", "engram", "table")


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _with_lookup(cfg, lookup):
  return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, lookup=lookup))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  return sharding.make_mesh(sharding.MeshConfig())


@pytest.fixture(scope="module")
def boxed_params():
  return jax.eval_shape(EngramLM(CFG).init, jax.random.key(0), TOKENS)["params"]


# ----------------------------------------------------------------------------------
# Mesh and config
# ----------------------------------------------------------------------------------
def test_mesh_shapes():
  assert sharding.MeshConfig().shape(8) == (8, 1, 1, 1)
  assert sharding.MeshConfig(data=2, fsdp=-1).shape(8) == (2, 4, 1, 1)
  assert sharding.MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2, 1)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=-1), jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}
  assert mesh.devices.size == 4


@pytest.mark.parametrize("cfg, field", [
    (sharding.MeshConfig(data=3), "mesh.data=3"),          # 3 x 1 x 1 x 1 != 8
    (sharding.MeshConfig(data=3, fsdp=-1), "mesh.data=3 = 3 devices, which does not "
                                           "divide the 8 devices (mesh.fsdp=-1 takes"),
    (sharding.MeshConfig(data=-1, tensor=-1), "mesh.tensor=-1"),
    (sharding.MeshConfig(expert=0), "mesh.expert=0"),
])
def test_make_mesh_errors_name_the_field(cfg, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    sharding.make_mesh(cfg)


def test_table_is_padded_and_hash_spec_unchanged(boxed_params):
  spec = CFG.engram.hash_spec()
  for i, layer in enumerate(CFG.engram.layers):
    rows = _at(boxed_params, (f"block_{layer}", "engram", "table")).value.shape[0]
    assert rows % 512 == 0 and spec.rows(i) <= rows < spec.rows(i) + 512
  assert any(spec.rows(i) % 8 for i in range(2))  # sums of primes: 8 shards would not fit
  assert dataclasses.replace(CFG.engram, table_row_multiple=1).padded_rows(261) == 261


@pytest.mark.parametrize("field, value", [("lookup", "ring"), ("table_row_multiple", 0)])
def test_config_validates_sharding_fields(field, value):
  bad = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, **{field: value}))
  with pytest.raises(ValueError, match=f"engram.{field}"):
    config_lib.validate(bad)


def test_rules_cover_every_param_axis(boxed_params, mesh):
  leaves = jax.tree_util.tree_leaves(boxed_params, is_leaf=sharding._is_box)
  for name in {n for leaf in leaves for n in leaf.names}:
    sharding.mesh_axes(name, mesh)  # raises for a name with no rule
  with pytest.raises(ValueError, match="'rows_of_doom' has no sharding rule"):
    sharding.logical_to_spec(("rows_of_doom",), (8,), mesh)


# ----------------------------------------------------------------------------------
# The lookup
# ----------------------------------------------------------------------------------
ROWS, WIDTH = 512, 4


def _ids_with_shard_edges(batch, shards, seed):
  """Random ids plus the first and last row of every shard."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, ROWS, (batch, 5, 3))
  per = ROWS // shards
  edges = np.stack([np.arange(shards) * per, np.arange(shards) * per + per - 1], -1)
  ids.reshape(-1)[:edges.size] = edges.ravel()
  return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("strategy", sharding.STRATEGIES)
@pytest.mark.parametrize("mesh_cfg, batch", [
    (sharding.MeshConfig(), 8),                    # batch over all 8 table shards
    (sharding.MeshConfig(data=2, tensor=4), 6),    # tensor: table-only axis
    (sharding.MeshConfig(), 3),                    # batch does not divide: ids replicated
])
def test_lookup_equals_take_values_and_grads(strategy, mesh_cfg, batch):
  mesh = sharding.make_mesh(mesh_cfg)
  table = jax.random.normal(jax.random.key(0), (ROWS, WIDTH))
  ids = _ids_with_shard_edges(batch, 8, seed=batch)
  weights = jax.random.normal(jax.random.key(1), ids.shape + (WIDTH,))

  def loss(lookup, t):
    rows = lookup(t)
    return jnp.sum(rows * weights), rows

  take = lambda t: jnp.take(t, ids, axis=0)
  (_, want), want_grad = jax.value_and_grad(functools.partial(loss, take), has_aux=True)(table)
  table_sharded = jax.device_put(table, NamedSharding(mesh, P(sharding.MESH_AXES, None)))
  with sharding.use_mesh(mesh):
    sharded = lambda t: sharding.sharded_lookup(t, ids, strategy)
    (_, got), got_grad = jax.jit(jax.value_and_grad(
        functools.partial(loss, sharded), has_aux=True))(table_sharded)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(np.any(want_grad != 0, axis=1)) > 16  # many rows touched


def test_lookup_errors():
  table = jnp.zeros((61, WIDTH))
  ids = jnp.zeros((8, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match="engram.lookup='psum' needs a device mesh"):
    sharding.sharded_lookup(table, ids, "psum")
  with sharding.use_mesh(sharding.make_mesh(sharding.MeshConfig())):
    with pytest.raises(ValueError, match="engram.table_row_multiple"):
      sharding.sharded_lookup(table, ids, "all_to_all")


def test_model_with_sharded_lookup_and_no_mesh_names_the_field():
  with pytest.raises(ValueError, match="engram.lookup='all_to_all'"):
    jax.eval_shape(EngramLM(_with_lookup(CFG, "all_to_all")).init, jax.random.key(0), TOKENS)


# ----------------------------------------------------------------------------------
# Params, optimizer state, the whole model
# ----------------------------------------------------------------------------------
def test_each_device_holds_one_eighth_of_the_table(boxed_params, mesh):
  shardings = sharding.state_shardings(boxed_params, mesh)
  table_box = _at(boxed_params, TABLE)
  assert _at(shardings, TABLE).spec == P(sharding.MESH_AXES, None)
  rows, width = table_box.value.shape
  table = jax.device_put(np.arange(rows * width, dtype=np.float32).reshape(rows, width),
                         _at(shardings, TABLE))
  starts = []
  for shard in table.addressable_shards:
    assert shard.data.shape == (rows // 8, width)
    starts.append(shard.index[0].start)
    np.testing.assert_array_equal(shard.data, np.asarray(table)[shard.index])
  assert sorted(starts) == [i * rows // 8 for i in range(8)]
  assert len({shard.device for shard in table.addressable_shards}) == 8
  table_bytes = rows * width * 4
  per_device = sharding.bytes_per_device(boxed_params, shardings)
  replicated = sharding.bytes_per_device(
      boxed_params, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, P()), shardings))
  assert replicated - per_device >= 2 * table_bytes * 7 // 8  # both tables split 8 ways
  assert sharding.bytes_per_device({"t": table_box}, {"t": _at(shardings, TABLE)}) == \
      table_bytes // 8


def test_optimizer_state_gets_the_table_shardings(boxed_params, mesh):
  tx = optim.make_optimizer(1e-3)
  table_sharding = _at(sharding.state_shardings(boxed_params, mesh), TABLE)
  # MaxText style: the state of boxed params carries boxes, so it maps like params.
  boxed_state = sharding.state_shardings(jax.eval_shape(tx.init, boxed_params), mesh)
  table_like = [s for path, s in jax.tree_util.tree_flatten_with_path(boxed_state)[0]
                if "'table'" in jax.tree_util.keystr(path) and "block_1" in
                jax.tree_util.keystr(path)]
  assert len(table_like) == 2 and all(s == table_sharding for s in table_like)  # mu, nu
  # From unboxed params: the real state's structure, table moments still row-sharded.
  params = nn.unbox(boxed_params)
  opt_shardings = sharding.opt_state_shardings(tx, boxed_params, mesh)
  real = jax.eval_shape(tx.init, params)
  assert jax.tree_util.tree_structure(opt_shardings) == jax.tree_util.tree_structure(real)
  table_state = opt_shardings[1].inner_states["table"].inner_state[0]
  assert _at(table_state.mu, TABLE) == table_sharding
  assert _at(table_state.nu, TABLE) == table_sharding
  assert table_state.count.spec == P()
  param_shardings = sharding.state_shardings(boxed_params, mesh)
  zeros = jax.jit(lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                  out_shardings=param_shardings)(params)
  state = jax.jit(tx.init, out_shardings=opt_shardings)(zeros)
  mu = _at(state[1].inner_states["table"].inner_state[0].mu, TABLE)
  assert {s.data.shape[0] for s in mu.addressable_shards} == {mu.shape[0] // 8}


@pytest.fixture(scope="module")
def unsharded_run():
  """Logits and grads on one device, plain `jnp.take` lookup, no mesh."""
  params = nn.unbox(jax.jit(EngramLM(CFG).init)(jax.random.key(0), TOKENS))["params"]
  params = with_random_conv(params, CFG)
  cpu0 = jax.devices()[0]
  params, tokens = jax.device_put((params, TOKENS), cpu0)
  logits, grads = jax.jit(_logits_and_grads(CFG))(params, tokens)
  return params, np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)


def _logits_and_grads(cfg):
  model = EngramLM(cfg)

  def run(params, tokens):
    def loss(p):
      logits = model.apply({"params": p}, tokens)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
      return nll.mean(), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads
  return run


_COLLECTIVE = {"psum": "stablehlo.reduce_scatter", "all_to_all": "stablehlo.all_to_all"}


@pytest.mark.parametrize("lookup", config_lib.LOOKUPS)
def test_sharded_lm_matches_unsharded(lookup, unsharded_run, boxed_params, mesh):
  params, want_logits, want_grads = unsharded_run
  cfg = _with_lookup(CFG, lookup)
  param_shardings = sharding.state_shardings(boxed_params, mesh)
  params = jax.device_put(params, param_shardings)
  tokens = jax.device_put(TOKENS, sharding.batch_sharding(mesh))
  assert len(tokens.sharding.device_set) == 8
  with sharding.use_mesh(mesh):
    step = jax.jit(_logits_and_grads(cfg), out_shardings=(None, param_shardings))
    if lookup in _COLLECTIVE:  # the sharded path really runs
      assert _COLLECTIVE[lookup] in step.lower(params, tokens).as_text()
    logits, grads = step(params, tokens)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                               jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  table_grad = _at(grads, TABLE)
  assert np.count_nonzero(np.any(np.asarray(table_grad) != 0, axis=1)) > 50
  assert {s.data.shape[0] for s in table_grad.addressable_shards} == {table_grad.shape[0] // 8}
