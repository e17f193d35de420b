"""MoE FFN: reduces to SwiGLU, dispatch paths agree, balancing works, EP = one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from engram_jax import config as config_lib
from engram_jax.layers import moe, moe_dispatch
from engram_jax.layers.mlp import SwiGLU

B, T, D, E, F, K = 2, 8, 16, 8, 8, 2
N = B * T
X = jax.random.normal(jax.random.key(0), (B, T, D))


def _moe(mesh=None, name=None, **overrides):
  fields = dict(num_experts=E, expert_dim=F, top_k=K, num_shared=1)
  fields.update(overrides)
  return moe.MoE(config_lib.MoEConfig(**fields), mesh=mesh, name=name)


@pytest.fixture(scope="module")
def variables():
  """One set of weights (bias balancing on, so a `routing` collection exists)."""
  return nn.unbox(_moe(balance="bias").init(jax.random.key(1), X))


def _params(variables):
  return {"params": variables["params"]}


def _run(model, variables, x=X):
  y, state = model.apply(variables, x, mutable=[moe.STATS])
  return y, jax.tree_util.tree_map(lambda v: v[0], dict(state[moe.STATS]),
                                   is_leaf=lambda v: isinstance(v, tuple))


def test_params_carry_logical_axes():
  boxed = _moe().init(jax.random.key(1), X)["params"]
  specs = nn.get_partition_spec(boxed)
  assert specs["router"] == jax.sharding.PartitionSpec("embed", "experts")
  for name in ("gate", "up", "down"):
    assert specs[name][0] == "experts", name
  assert specs["shared"]["gate"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_one_expert_top1_is_swiglu(score_fn, capacity_factor):
  model = moe.MoE(config_lib.MoEConfig(num_experts=1, expert_dim=F, top_k=1,
                                       score_fn=score_fn, capacity_factor=capacity_factor))
  params = nn.unbox(model.init(jax.random.key(2), X))["params"]
  dense = {name: {"kernel": params[name][0]} for name in ("gate", "up", "down")}
  want = SwiGLU(F).apply({"params": dense}, X)
  y, stats = _run(model, {"params": params})
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  assert float(stats["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("group_matmul", ["ragged_dot", "tiles"])
def test_sort_dispatch_equals_one_hot(variables, group_matmul):
  params = _params(variables)
  sort, one_hot = _moe(group_matmul=group_matmul, tile=4), _moe(dispatch="one_hot")
  np.testing.assert_allclose(sort.apply(params, X), one_hot.apply(params, X),
                             rtol=1e-5, atol=1e-5)
  loss = lambda model: lambda p: jnp.sum(model.apply(p, X) ** 2)
  g_sort, g_one_hot = jax.grad(loss(sort))(params), jax.grad(loss(one_hot))(params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_sort, g_one_hot)
  # With drops: the same assignments are dropped (lowest affinity first).
  y_sort, s_sort = _run(_moe(capacity_factor=0.5), params)
  y_ref, s_ref = _run(_moe(capacity_factor=0.5, dispatch="one_hot"), params)
  np.testing.assert_allclose(y_sort, y_ref, rtol=1e-5, atol=1e-5)
  assert float(s_sort["dropped_fraction"]) == float(s_ref["dropped_fraction"]) > 0


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_permutation_equivariant_over_tokens(variables, capacity_factor):
  """Routing and drops depend on each token alone (drops: by affinity, not position)."""
  model = _moe(capacity_factor=capacity_factor)
  perm = np.random.default_rng(0).permutation(N)
  x_perm = X.reshape(N, D)[perm].reshape(B, T, D)
  y, stats = _run(model, _params(variables))
  y_perm, stats_perm = _run(model, _params(variables), x_perm)
  np.testing.assert_allclose(y_perm.reshape(N, D), y.reshape(N, D)[perm],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(stats_perm["load"], stats["load"])
  np.testing.assert_array_equal(stats_perm["dropped_fraction"], stats["dropped_fraction"])


def _aux_reference(scores, experts):
  """f_e = E/(K T) * count_e per sequence, P_e = mean_t s_e / sum_j s_j; mean_b sum f P."""
  scores, experts = np.asarray(scores, np.float64), np.asarray(experts)
  b, t, e = scores.shape
  k = experts.shape[-1]
  out = 0.0
  for i in range(b):
    f = np.bincount(experts[i].ravel(), minlength=e) * e / (k * t)
    p = (scores[i] / scores[i].sum(-1, keepdims=True)).mean(0)
    out += (f * p).sum() / b
  return out


def test_aux_loss_is_minimal_for_uniform_routing():
  noise = jax.random.uniform(jax.random.key(3), (B, T, E), maxval=0.5)

  def routed(hot_BxTxK, bump):
    """Scores with `bump` on the chosen experts, and their top-k (a consistent router)."""
    scores = noise + bump * jax.nn.one_hot(hot_BxTxK, E).sum(-2)
    return scores, jax.lax.top_k(scores, K)[1]

  # Uniform: every expert gets exactly K T / E of each sequence's assignments.
  pairs = np.stack([(2 * np.arange(T)) % E, (2 * np.arange(T) + 1) % E], -1)
  scores, experts = routed(np.broadcast_to(pairs, (B, T, K)), 1.0)
  np.testing.assert_allclose(moe.aux_balance_loss(scores, experts), 1.0, rtol=1e-6)
  # Skewed: every token prefers experts 0 and 1; the loss grows with the skew.
  losses = []
  for bump in (1.0, 4.0, 1e4):
    scores, experts = routed(np.broadcast_to(np.array([0, 1]), (B, T, K)), bump)
    losses.append(float(moe.aux_balance_loss(scores, experts)))
    np.testing.assert_allclose(losses[-1], _aux_reference(scores, experts), rtol=1e-6)
  assert 1.0 < losses[0] < losses[1] < losses[2]
  np.testing.assert_allclose(losses[-1], E / K, rtol=1e-3)    # the collapsed maximum
  # Any routing matches the reference.
  rand = np.asarray(jax.random.randint(jax.random.key(4), (B, T, K), 0, E))
  np.testing.assert_allclose(moe.aux_balance_loss(noise + 0.1, rand),
                             _aux_reference(noise + 0.1, rand), rtol=1e-6)


def test_module_sows_scaled_aux_loss(variables):
  model = _moe(aux_loss_coef=0.01)
  _, stats = _run(model, _params(variables))
  logits = X.reshape(N, D) @ variables["params"]["router"]
  routing = moe.route(logits, K)
  want = 0.01 * _aux_reference(routing.scores_BTxX.reshape(B, T, E),
                               routing.experts_BTxXk.reshape(B, T, K))
  np.testing.assert_allclose(stats["aux_loss"], want, rtol=1e-5)
  np.testing.assert_array_equal(
      stats["load"], np.bincount(np.asarray(routing.experts_BTxXk).ravel(), minlength=E))
  assert float(moe.total_aux_loss({"a": {"aux_loss": (stats["aux_loss"],)},
                                   "b": {"aux_loss": (stats["aux_loss"],)}})) == pytest.approx(
                                       2 * float(stats["aux_loss"]))


def test_bias_steers_selection_but_not_weights():
  logits = jax.random.normal(jax.random.key(5), (N, E))
  bias = jnp.zeros((E,)).at[jnp.array([3, 6])].set(100.0)
  r = moe.route(logits, K, "sigmoid", bias_X=bias)
  assert np.all(np.sort(np.asarray(r.experts_BTxXk), -1) == np.array([3, 6]))
  s = jax.nn.sigmoid(logits)[:, jnp.array([3, 6])]
  np.testing.assert_allclose(np.sort(r.weights_BTxXk, -1),
                             np.sort(s / s.sum(-1, keepdims=True), -1), rtol=1e-6)


class _TwoLayers(nn.Module):
  """Two MoE layers, to check that trainer helpers follow module paths."""

  @nn.compact
  def __call__(self, x):
    x = x + _moe(balance="bias", name="first")(x)
    return x + _moe(balance="bias", name="second")(x)


def test_bias_balancing_moves_load_toward_uniform():
  x = X.at[..., 0].set(2.0)          # a shared direction the router can favour
  model = _TwoLayers()
  variables = nn.unbox(model.init(jax.random.key(6), x))
  for layer, hot in (("first", [0, 1]), ("second", [5])):
    variables["params"][layer]["router"] = variables["params"][layer]["router"].at[0, hot].set(3.0)

  @jax.jit
  def loads(routing):
    _, state = model.apply({"params": variables["params"], "routing": routing}, x,
                           mutable=[moe.STATS])
    return state[moe.STATS]

  routing = variables["routing"]
  violation = []
  for _ in range(30):
    stats = loads(routing)
    violation.append([float(stats[l]["max_violation"][0]) for l in ("first", "second")])
    routing = moe.update_routing_biases(routing, stats, rate=0.02)
  violation = np.array(violation)
  assert np.all(violation[0] >= 2.0), violation[0]       # skewed to start with
  assert np.all(violation[-5:].mean(0) < 0.5 * violation[0]), violation[-5:]
  with pytest.raises(KeyError, match="mutable"):
    moe.update_routing_biases(routing, {}, rate=0.02)


@pytest.mark.parametrize("sizes,tile", [
    ([5, 0, 9, 1], 4),        # empty group, groups shorter and longer than a tile
    ([3, 3, 3, 3], 128),      # tile clamped to the rows per group
    ([0, 7, 0, 2], 1),
])
def test_tiled_grouped_matmul_equals_ragged_dot(sizes, tile):
  """Rows sorted by group, plus 3 trailing rows past every group (EP's empty slots)."""
  rows = sum(sizes) + 3
  x = jax.random.normal(jax.random.key(9), (rows, D))
  kernels = tuple(jax.random.normal(jax.random.key(i), s) * 0.3 for i, s in
                  enumerate([(4, D, F), (4, D, F), (4, F, D)]))
  sizes = jnp.array(sizes, jnp.int32)
  tiled = lambda x, ws: moe_dispatch.swiglu_tiled(x, sizes, *ws, tile=tile)
  ragged = lambda x, ws: moe_dispatch.swiglu_ragged(x, sizes, *ws)
  want = ragged(x, kernels)
  np.testing.assert_allclose(tiled(x, kernels), want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(want[-3:]) == 0.0)
  loss = lambda f: jax.grad(lambda x, ws: jnp.sum(jnp.sin(f(x, ws))), argnums=(0, 1))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         loss(tiled)(x, kernels), loss(ragged)(x, kernels))


def test_capacity_drops_only_when_over_capacity(variables):
  params = _params(variables)
  dropless, _ = _run(_moe(), params)
  roomy, stats = _run(_moe(capacity_factor=E / K), params)   # capacity = N
  np.testing.assert_allclose(roomy, dropless, rtol=1e-5, atol=1e-6)
  assert float(stats["dropped_fraction"]) == 0.0
  for factor in (0.5, 1.0):
    _, stats = _run(_moe(capacity_factor=factor), params)
    cap = moe_dispatch.expert_capacity(N, K, E, factor)
    want = np.maximum(np.asarray(stats["load"]) - cap, 0).sum() / (N * K)
    assert float(stats["dropped_fraction"]) == pytest.approx(want)
  # All tokens forced onto experts 0 and 1: each keeps its `cap` most confident tokens.
  forced = {**variables, "routing": {"bias": jnp.zeros((E,)).at[:2].set(100.0)}}
  _, stats = _run(_moe(balance="bias", capacity_factor=1.0), forced)
  cap = moe_dispatch.expert_capacity(N, K, E, 1.0)
  assert float(stats["dropped_fraction"]) == pytest.approx(1 - cap / N)


def test_capacity_keeps_highest_affinity():
  x = jax.random.normal(jax.random.key(7), (N, D))
  kernels = tuple(jax.random.normal(jax.random.key(i), s) * 0.3 for i, s in
                  enumerate([(4, D, F), (4, D, F), (4, F, D)]))
  experts = jnp.zeros((N, 1), jnp.int32).at[::2].set(3)   # 8 tokens each on experts 0, 3
  priority = jax.random.uniform(jax.random.key(8), (N, 1))
  full = moe_dispatch.sorted_experts(x, experts, kernels)
  y, kept = moe_dispatch.capacity_experts(x, experts, priority, kernels, capacity=3)
  assert int(kept.sum()) == 6
  for e in (0, 3):
    mine = np.asarray(experts[:, 0]) == e
    top3 = np.argsort(-np.asarray(priority[:, 0]) * mine)[:3]
    assert set(np.flatnonzero(np.asarray(kept[:, 0]) & mine)) == set(top3)
  np.testing.assert_allclose(y[kept], full[kept], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y[~kept]) == 0.0)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _value_and_grads(model, variables):
  def loss(params):
    y, state = model.apply({"params": params}, X, mutable=[moe.STATS])
    return jnp.sum(y ** 2) + moe.total_aux_loss(state[moe.STATS]), (y, state[moe.STATS])
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("shape,names,capacity_factor,group_matmul,ambient", [
    ((8,), ("expert",), 0.0, "tiles", False),            # one expert per device
    ((2, 4), ("data", "expert"), 0.0, "tiles", True),    # two per device, tokens on both
    ((2, 4), ("data", "expert"), 0.0, "ragged_dot", False),
    ((2, 4), ("data", "expert"), E / K, "tiles", False),  # capacity buffers, no drops
])
def test_expert_parallel_equals_single_device(variables, shape, names, capacity_factor,
                                             group_matmul, ambient):
  mesh = _mesh(shape, names)
  (_, (want_y, want_stats)), want_g = _value_and_grads(_moe(), variables)
  fields = dict(capacity_factor=capacity_factor, group_matmul=group_matmul, tile=2)
  if ambient:   # the mesh set with jax.set_mesh, as sharding.use_mesh does
    with jax.set_mesh(mesh):
      (_, (y, stats)), g = _value_and_grads(_moe(**fields), variables)
  else:
    (_, (y, stats)), g = _value_and_grads(_moe(mesh=mesh, **fields), variables)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(stats["load"][0], want_stats["load"][0])
  assert float(stats["dropped_fraction"][0]) == 0.0
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, want_g)


def test_expert_parallel_capacity_is_per_source_shard(variables):
  """With drops, EP equals one-device capacity routing run on each token shard."""
  mesh = _mesh((8,), ("expert",))
  model = _moe(capacity_factor=0.5)
  y, stats = jax.jit(lambda v: _moe(mesh=mesh, capacity_factor=0.5).apply(
      v, X, mutable=[moe.STATS]))(_params(variables))
  shards = X.reshape(8, 1, N // 8, D)
  want = [_run(model, _params(variables), s) for s in shards]
  np.testing.assert_allclose(y.reshape(8, 1, N // 8, D), np.stack([w[0] for w in want]),
                             rtol=1e-5, atol=1e-6)
  dropped = np.mean([float(w[1]["dropped_fraction"]) for w in want])
  assert float(stats[moe.STATS]["dropped_fraction"][0]) == pytest.approx(dropped)
  assert dropped > 0


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="moe.top_k"):
    _moe(top_k=E + 1).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="moe.score_fn"):
    _moe(score_fn="relu").init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="moe.group_matmul"):
    _moe(group_matmul="megablox").init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="moe.num_experts"):
    _moe(num_experts=0).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="moe.num_experts"):
    _moe(num_experts=6, mesh=_mesh((8,), ("expert",))).init(jax.random.key(0), X)


@pytest.mark.parametrize("field, value", [
    ("capacity_factor", float("inf")),  # int(inf) in the capacity: a traceback
    ("capacity_factor", float("nan")), ("routed_scale", float("nan")),  # nan: accepted
    ("aux_loss_coef", -0.1), ("routed_scale", float("-inf"))])
def test_non_finite_or_negative_factors_name_the_field(field, value):
  from engram_jax import config as config_lib
  m = config_lib.MoEConfig(num_experts=4, top_k=2, expert_dim=8, **{field: value})
  with pytest.raises(ValueError, match=rf"moe.{field}={value} is invalid: must be a "
                                       r"finite number >= 0"):
    config_lib.validate_moe(m)


def test_numpy_factors_are_numbers():
  from engram_jax import config as config_lib
  m = config_lib.MoEConfig(num_experts=4, top_k=2, expert_dim=8,
                           routed_scale=np.float32(2.5), capacity_factor=np.float32(1.25))
  assert config_lib.validate_moe(m) is m
