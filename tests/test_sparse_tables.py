"""Row-sparse table training (engram_jax.tables): each path against its dense twin."""
import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import config as config_lib
from engram_jax import optim, run_config, sharding, sizing, tables, train, train_steps
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config

ROWS, WIDTH = 512, 4
LR = 0.1


def _ids(seed, shape=(6, 5, 3), distinct=40):
  """Ids drawn from few rows, so most repeat many times within a batch."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, distinct, shape), jnp.int32)


def _loss(rows_JxE, seed):
  w = jax.random.normal(jax.random.key(seed), rows_JxE.shape)
  return jnp.sum(jnp.sin(rows_JxE) * w)


def _dense_grad(table, ids, seed):
  return jax.grad(lambda t: _loss(jnp.take(t, ids, axis=0), seed))(table)


def _sparse_grad(table, ids, seed):
  """(ids_U, grads_UxE) from the gradient w.r.t. the gathered rows."""
  rows = jnp.take(table, ids, axis=0)
  g = jax.grad(_loss)(rows, seed)
  return tables.dedup(ids.reshape(-1), g.reshape(-1, WIDTH), ROWS)


TABLE = jax.random.normal(jax.random.key(0), (ROWS, WIDTH))


def test_dedup_scattered_back_is_the_dense_gradient_and_has_its_norm():
  ids = _ids(0)
  ids_U, grads_UxE = jax.jit(_sparse_grad, static_argnums=2)(TABLE, ids, 0)
  distinct = np.unique(np.asarray(ids))
  assert ids.size > 2 * distinct.size  # ids repeat
  np.testing.assert_array_equal(ids_U[:distinct.size], distinct)
  assert np.all(np.asarray(ids_U[distinct.size:]) == ROWS)  # sentinel padding
  np.testing.assert_array_equal(grads_UxE[distinct.size:], 0)
  dense = _dense_grad(TABLE, ids, 0)
  back = jnp.zeros_like(TABLE).at[ids_U].add(grads_UxE, mode="drop")
  np.testing.assert_allclose(back, dense, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(grads_UxE), optax.tree.norm(dense), rtol=1e-6)


def _sparse_step(optimizer, table, state, ids, seed, count, lr=LR):
  ids_U, grads_UxE = _sparse_grad(table, ids, seed)
  return tables.apply_rows(table, state, ids_U, grads_UxE, optimizer, count, lr)[:2]


def test_sgd_equals_dense_sgd_over_steps():
  sgd = tables.sgd()
  step = jax.jit(functools.partial(_sparse_step, sgd), static_argnums=3)
  dense, sparse, state = TABLE, TABLE, sgd.init(TABLE)
  for seed in range(4):
    ids = _ids(seed)
    dense = dense - LR * _dense_grad(dense, ids, seed)
    sparse, state = step(sparse, state, ids, seed, seed + 1)
  np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-6)
  assert state == {}
  ids_U = jnp.array([3, 7, ROWS], jnp.int32)  # the sentinel's NaN is never written
  grads = jnp.array([[1.0] * WIDTH, [np.nan] * WIDTH, [np.nan] * WIDTH])
  assert int(tables.apply_rows(TABLE, {}, ids_U, grads, sgd, 1, LR)[2]) == WIDTH


def test_lazy_adam_is_adam_after_one_step_and_leaves_untouched_rows_alone():
  lazy = tables.lazy_adam(0.9, 0.95, 1e-8)
  adam = optax.adam(LR, 0.9, 0.95, 1e-8)
  ids = _ids(1)
  updates, _ = adam.update(_dense_grad(TABLE, ids, 1), adam.init(TABLE), TABLE)
  want = optax.apply_updates(TABLE, updates)
  got, state = jax.jit(functools.partial(_sparse_step, lazy), static_argnums=3)(
      TABLE, lazy.init(TABLE), ids, 1, 1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  untouched = np.setdiff1d(np.arange(ROWS), np.asarray(ids))
  np.testing.assert_array_equal(np.asarray(got)[untouched], np.asarray(TABLE)[untouched])
  # A second step on other rows: dense Adam would move step 1's rows on their stale
  # momentum; lazy Adam leaves them (and their m, v) exactly as they were.
  later = _ids(2) + 100
  got2, state2 = jax.jit(functools.partial(_sparse_step, lazy), static_argnums=3)(
      got, state, later, 2, 2)
  step1_only = np.setdiff1d(np.asarray(ids), np.asarray(later))
  np.testing.assert_array_equal(np.asarray(got2)[step1_only], np.asarray(got)[step1_only])
  np.testing.assert_array_equal(np.asarray(state2["mu"])[step1_only],
                                np.asarray(state["mu"])[step1_only])


def _numpy_rowwise_adagrad(table, acc, ids, grads, lr, eps=1e-8):
  """The rule, transcribed: per distinct id, acc += mean(g^2); w -= lr g/(sqrt(acc)+eps)."""
  table, acc = table.astype(np.float64).copy(), acc.astype(np.float64).copy()
  summed = {}
  for i, g in zip(ids.reshape(-1), grads.reshape(-1, grads.shape[-1])):
    summed[int(i)] = summed.get(int(i), 0.0) + g.astype(np.float64)
  for i, g in summed.items():
    acc[i] += np.mean(g * g)
    table[i] -= lr * g / (np.sqrt(acc[i]) + eps)
  return table, acc


def test_rowwise_adagrad_matches_its_numpy_transcription():
  ada = tables.rowwise_adagrad(1e-8)
  step = jax.jit(functools.partial(_sparse_step, ada), static_argnums=3)
  table, state = TABLE, ada.init(TABLE)
  want_table, want_acc = np.asarray(TABLE), np.zeros(ROWS)
  for seed in range(3):
    ids = _ids(seed)
    rows_grad = jax.grad(_loss)(jnp.take(table, ids, axis=0), seed)
    want_table, want_acc = _numpy_rowwise_adagrad(want_table, want_acc, np.asarray(ids),
                                                  np.asarray(rows_grad), LR)
    table, state = step(table, state, ids, seed, seed + 1)
  assert state["acc"].shape == (ROWS,)  # one scalar per row
  np.testing.assert_allclose(state["acc"], want_acc, rtol=1e-5)
  np.testing.assert_allclose(table, want_table, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lazy_adam", "rowwise_adagrad", "sgd"])
def test_sharded_row_update_equals_single_device(name):
  optimizer = tables.make_optimizer(name)
  ids = _ids(3, distinct=ROWS)  # every shard owns some
  ids_U, grads_UxE = _sparse_grad(TABLE, ids, 3)
  state = jax.tree_util.tree_map(lambda x: x + 0.5, optimizer.init(TABLE))
  want = jax.jit(functools.partial(tables.apply_rows, optimizer=optimizer))(
      TABLE, state, ids_U, grads_UxE, count=jnp.int32(3), lr=LR)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=4))
  rows = NamedSharding(mesh, P(sharding.MESH_AXES))
  table, state = jax.device_put((TABLE, state), rows)
  with sharding.use_mesh(mesh):
    got = jax.jit(functools.partial(tables.apply_rows_sharded, optimizer=optimizer),
                  out_shardings=(rows, rows, None))(
                      table, state, ids_U, grads_UxE, count=jnp.int32(3), lr=LR)
  assert int(got[2]) == int(want[2]) == 0  # non-finite values written
  for g, w in zip(jax.tree_util.tree_leaves(got[:2]), jax.tree_util.tree_leaves(want[:2])):
    np.testing.assert_array_equal(g, w)
    assert {s.data.shape[0] for s in g.addressable_shards} == {ROWS // 8}


# ----------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------
CFG = config_lib.validate(dataclasses.replace(tiny_model_config(layers=(0, 1)), depth=2))
# B*T*H = 8 * 12 * 4 = 384 (id, row) slots, so no array of the slots has the tables'
# 512 rows: a collective of a table-sized array is recognisable by its shape.
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 13)).astype(np.int32)
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}


def _tx(name, cfg=CFG, grad_clip=0.05):
  t = run_config.train_config(dict(
      steps=10, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1,
      table_lr_multiplier=5.0, grad_clip=grad_clip, table_optimizer=name))
  return optim.from_train_config(t, cfg.engram)[1]


@functools.lru_cache(maxsize=None)
def _params():
  params = nn.unbox(jax.jit(EngramLM(CFG).init)(jax.random.key(0), TOKENS[:, :-1]))
  return jax.tree_util.tree_map(np.asarray, params["params"])


def _train(name, cfg=CFG, mesh=None, steps=2):
  """(state, metrics, compiled HLO text or None) after `steps` steps on BATCH,
  optionally on `mesh`."""
  model, tx = EngramLM(cfg), _tx(name, cfg)
  state = train_steps.init_train_state(tx, jax.tree_util.tree_map(jnp.asarray, _params()))
  batch = jax.tree_util.tree_map(jnp.asarray, BATCH)
  with sharding.use_mesh(mesh) if mesh else contextlib.nullcontext():
    shardings = train_steps.train_state_shardings(model, tx, 16, mesh) if mesh else None
    if mesh:
      state = jax.device_put(state, shardings)
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step, text = train_steps.make_train_step(model, tx, shardings), None
    if mesh:
      step = step.lower(state, batch).compile()
      text = step.as_text()
    for _ in range(steps):
      state, metrics = step(state, batch)
  return (jax.tree_util.tree_map(np.asarray, state), jax.tree_util.tree_map(float, metrics),
          text)


@pytest.fixture(scope="module")
def lazy_single():
  return _train("lazy_adam")


def _assert_params_close(got, want, rtol=1e-5, atol=1e-6):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_lazy_adam_step_equals_dense_adam_step_with_clipping(lazy_single):
  """The same batch twice touches the same rows, where lazy and dense Adam agree; the
  clip (0.05, far below the norm) scales dense and row gradients by their joint norm,
  which equals the dense gradient's norm."""
  lazy, lazy_metrics, _ = lazy_single
  dense, dense_metrics, _ = _train("adam")
  assert lazy_metrics["grad_norm"] > 1.0
  assert lazy_metrics["grad_norm"] == pytest.approx(dense_metrics["grad_norm"], rel=1e-6)
  assert lazy_metrics["loss"] == pytest.approx(dense_metrics["loss"], rel=1e-6)
  _assert_params_close(lazy.params, dense.params)
  assert not np.array_equal(lazy.params["block_0"]["engram"]["table"],
                            _params()["block_0"]["engram"]["table"])
  assert dense.table_opt_state == {} and set(lazy.table_opt_state) == {"block_0", "block_1"}


@pytest.mark.parametrize("lookup", ["psum", "all_to_all"])
def test_sharded_train_step_equals_single_device(lookup, lazy_single):
  want, want_metrics, _ = lazy_single
  cfg = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, lookup=lookup))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  got, metrics, hlo = _train("lazy_adam", cfg, mesh)
  rows = want.params["block_0"]["engram"]["table"].shape[0]
  collectives = [line for line in hlo.splitlines() if any(
      op in line for op in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter",
                            "collective-permute"))]
  assert collectives and not [l for l in collectives if f"[{rows}," in l or f"[{rows}]" in l], \
      "no table-sized array (table, its state, a dense gradient) crosses devices"
  assert metrics["loss"] == pytest.approx(want_metrics["loss"], rel=1e-5)
  # Adam divides by sqrt(v): where a gradient is near zero its f32 rounding (another
  # summation order on 8 devices) shows in the update; 1e-4 is 1% of one step (lr 1e-2).
  _assert_params_close(got.params, want.params, rtol=1e-4, atol=1e-4)
  _assert_params_close(got.table_opt_state, want.table_opt_state, rtol=1e-4, atol=1e-7)


def test_frozen_table_has_no_state_and_no_update():
  cfg = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram,
                                                            table_trainable=False))
  tx = _tx("rowwise_adagrad", cfg)
  state = train_steps.init_train_state(tx, _params())
  assert state.table_opt_state == {}
  assert not any("table" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state))


def test_table_optimizer_is_validated():
  with pytest.raises(ValueError, match=r"^train\.table_optimizer='adagrad' is invalid"):
    _tx("adagrad")


# ----------------------------------------------------------------------------------
# Through the trainer: resume, a changed optimizer, sizing
# ----------------------------------------------------------------------------------
def _config(steps=4, **train_overrides):
  from tests import runs
  return runs.tiny_config(steps, **{"table_optimizer": "rowwise_adagrad", **train_overrides})


def _losses(workdir):
  from tests import runs
  return runs.train_losses(workdir)


def test_resume_is_exact_and_the_table_optimizer_cannot_change(tmp_path):
  pytest.importorskip("orbax.checkpoint")
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  train.train_and_evaluate(_config(), one)
  train.train_and_evaluate(_config(stop_after_steps=2), two)
  train.train_and_evaluate(_config(), two)
  assert _losses(one) == _losses(two) and len(_losses(one)) == 4
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(_config(steps=6, table_optimizer="lazy_adam"), two)
  message = str(err.value)
  assert "\n" not in message and "train.table_optimizer='lazy_adam'" in message
  assert "'rowwise_adagrad'" in message


def test_dry_run_reports_table_state_bytes():
  from configs import lm
  c = lm.get_config("paper_dense_v5p")
  assert c.train.table_optimizer == "lazy_adam"
  report = sizing.dry_run_report(c)
  # 5.63B table params over 64 chips: 0.328 GiB of rows, m and v twice that
  assert "(Engram tables 0.328 GiB), optimizer state" in report
  assert "(Engram tables 0.656 GiB)" in report, report
  c.train.table_optimizer = "rowwise_adagrad"  # one f32 per row of 80: 1/80 of the table
  assert "(Engram tables 0.004 GiB)" in sizing.dry_run_report(c)


def test_checkpoints_from_before_the_table_state_field_restore(tmp_path):
  """A dense-Adam run saved before `TrainState.table_opt_state` existed still resumes."""
  import flax
  from engram_jax import checkpoints
  pytest.importorskip("orbax.checkpoint")

  @flax.struct.dataclass
  class OldState:
    step: jax.Array
    params: dict
    opt_state: dict
    routing: dict = flax.struct.field(default_factory=dict)
  old = OldState(jnp.int32(7), {"w": jnp.arange(3.0)}, {"mu": jnp.ones(3)})
  manager = checkpoints.manager(str(tmp_path), async_saves=False)
  checkpoints.save(manager, 7, old, {"batches": 7})
  manager.wait_until_finished()
  abstract = jax.eval_shape(lambda: train_steps.TrainState(
      jnp.int32(0), {"w": jnp.zeros(3)}, {"mu": jnp.zeros(3)}))
  state, data, unreadable = checkpoints.restore_latest(manager, abstract)
  assert unreadable == [] and data == {"batches": 7} and state.table_opt_state == {}
  assert int(state.step) == 7 and np.array_equal(state.params["w"], [0.0, 1.0, 2.0])
