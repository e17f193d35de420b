"""TPU/GPU readiness without the hardware: `jax.export` lowers the hot programs for
`tpu` and `cuda` on this CPU-only machine (StableHLO lowering only, no compile).

A lowering failure here (an op with no TPU/GPU rule, a host callback, a sharding the
partitioner rejects) is what would otherwise first show up on a pod.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import sharding, train_steps
from engram_jax.sampling import text as generate
from engram_jax.sampling import image as generate_image
from engram_jax import host_tables as host_tables_lib
from engram_jax.models import image
from engram_jax.models.lm import EngramLM
from tests.conftest import tiny_model_config

PLATFORMS = ("tpu", "cuda")
B, T = 2, 8


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _lower(jitted, *abstract_args):
  """Exports for every platform in PLATFORMS; returns the Exported."""
  exported = export.export(jitted, platforms=PLATFORMS)(*abstract_args)
  assert tuple(exported.platforms) == PLATFORMS
  assert exported.mlir_module()  # serialisable StableHLO
  return exported


@pytest.fixture(scope="module")
def lm():
  model = EngramLM(tiny_model_config())
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, T), jnp.int32))
  return model, _abstract(nn.unbox(shapes)["params"])


def test_train_step_lowers(lm):
  model, params = lm
  tx = optax.adamw(1e-3)
  state = train_steps.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                           jax.eval_shape(tx.init, params))
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("inputs", "targets")}
  _lower(train_steps.make_train_step(model, tx), state, batch)


def test_cached_decode_scan_lowers(lm):
  model, params = lm

  @jax.jit
  def sample(p, prompt_BxT, lengths_B, seed):
    return generate.generate(model, p, prompt_BxT, lengths_B, jax.random.key(seed),
                             max_new_tokens=4, temperature=1.0, top_k=5)

  _lower(sample, params, jax.ShapeDtypeStruct((B, T), jnp.int32),
         jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32))


@pytest.mark.parametrize("strategy", ["psum", "all_to_all"])
def test_sharded_lookups_lower_on_eight_devices(strategy):
  mesh = sharding.make_mesh(sharding.MeshConfig())
  assert mesh.devices.size == 8
  table = jax.ShapeDtypeStruct((64, 4), jnp.float32,
                               sharding=NamedSharding(mesh, P(sharding.MESH_AXES, None)))
  ids = jax.ShapeDtypeStruct((8, 4, 2), jnp.int32,
                             sharding=NamedSharding(mesh, P(sharding.MESH_AXES)))
  with sharding.use_mesh(mesh):
    lookup = jax.jit(lambda t, i: sharding.sharded_lookup(t, i, strategy))
    grad = jax.jit(jax.grad(lambda t, i: jnp.sum(sharding.sharded_lookup(t, i, strategy))))
    for fn in (lookup, grad):
      exported = _lower(fn, table, ids)
      assert exported.nr_devices == 8


def test_image_sampler_lowers():
  cfg = image.make_image_config(
      dict(width=32, depth=2, num_heads=4, num_kv_heads=2,
           engram=dict(layers=(1,), max_ngram=3, heads=2, embed_per_ngram=16,
                       table_size=(61,), seed=3)),
      dict(height=3, width=4, codebook_size=11, num_classes=3))
  model = image.ImageARModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.cells), jnp.int32))
  params = _abstract(nn.unbox(shapes)["params"])

  @jax.jit
  def sample(p, labels_B, seed):
    return generate_image.generate_images(model, p, labels_B, jax.random.key(seed),
                                          cfg_scale=1.5, temperature=1.0)

  _lower(sample, params, jax.ShapeDtypeStruct((B,), jnp.int32),
         jax.ShapeDtypeStruct((), jnp.uint32))


@pytest.fixture(scope="module")
def host_tables(lm):
  model, params = lm
  tables = [np.zeros(params[path[0]][path[1]][host_tables_lib.TABLE].shape, np.float32)
            for path in host_tables_lib.engram_paths(model.cfg)]
  device_params = host_tables_lib.without(
      params, [p + (host_tables_lib.TABLE,) for p in host_tables_lib.engram_paths(model.cfg)])
  return device_params, host_tables_lib.HostTables(model.cfg, tables)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_offloaded_decode_scan_does_not_export(lm, host_tables, platform):
  """The per-step host callback (`HostTables.callback_rows`) has no serialisable
  lowering; docs/scale_out.md ("Lowering for TPU and GPU") names the replacement."""
  model, _ = lm
  device_params, tables = host_tables

  @jax.jit
  def sample(p, prompt_BxT, lengths_B, prompt_rows):
    return generate.generate(model, p, prompt_BxT, lengths_B, jax.random.key(0),
                             max_new_tokens=4, temperature=0.0,
                             engram_rows_fn=tables.callback_rows,
                             prompt_engram_rows=prompt_rows)

  ids = jax.ShapeDtypeStruct((B, T, len(model.cfg.engram.layers), model.cfg.engram.heads *
                              model.cfg.engram.orders), jnp.int32)
  rows = _abstract(jax.eval_shape(tables.callback_rows, ids))
  with pytest.raises((ValueError, NotImplementedError), match="callback|platform"):
    export.export(sample, platforms=[platform])(
        device_params, jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B,), jnp.int32), rows)


def test_decode_step_with_rows_as_inputs_lowers(lm, host_tables):
  """The replacement: rows gathered on the host (or prefetched) enter as arguments."""
  model, _ = lm
  device_params, tables = host_tables
  engram = model.cfg.engram
  ids = jax.ShapeDtypeStruct((B, 1, len(engram.layers), engram.heads * engram.orders),
                             jnp.int32)
  rows = _abstract(jax.eval_shape(tables.callback_rows, ids))
  cache = _abstract(jax.eval_shape(
      lambda p: generate.prefill(model, p, jnp.zeros((B, T), jnp.int32),
                                 jnp.full((B,), T, jnp.int32),
                                 hash_ids_BxTxLxH=jnp.zeros((B, T) + ids.shape[2:], jnp.int32),
                                 engram_rows=jax.tree_util.tree_map(
                                     lambda r: jnp.zeros((B, T) + r.shape[2:], r.dtype),
                                     rows))[1], device_params))
  step = jax.jit(lambda p, c, tok, pos, i, r: generate.decode_step(
      model, p, c, tok, pos, hash_ids_BxTxLxH=i, engram_rows=r))
  scalar_B = jax.ShapeDtypeStruct((B,), jnp.int32)
  _lower(step, device_params, cache, scalar_B, scalar_B, ids, rows)
