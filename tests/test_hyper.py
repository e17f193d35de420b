"""Hyper-connections: plain residual at M=1, the paper's init at M>1, its equations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.layers.hyper import HyperConnection, collapse_branches, expand_branches
from engram_jax.layers.mlp import SwiGLU
from engram_jax.layers.norms import RMSNorm

B, T, D = 2, 5, 16


class Stack(nn.Module):
  """`layers` pre-norm SwiGLU sublayers, each wrapped in a hyper-connection (or not)."""
  layers: int
  branches: int = 0  # 0 = plain residual stream, no hyper-connections
  dynamic: bool = True

  @nn.compact
  def __call__(self, h_BxTxD):
    h = h_BxTxD if self.branches == 0 else expand_branches(h_BxTxD, self.branches)
    for l in range(self.layers):
      ffn = SwiGLU(24, name=f"ffn_{l}")
      norm = RMSNorm(name=f"norm_{l}")
      sublayer = lambda x, ffn=ffn, norm=norm: ffn(norm(x))
      if self.branches == 0:
        h = h + sublayer(h)
      else:
        h = HyperConnection(self.branches, l, self.dynamic, name=f"hc_{l}")(h, sublayer)
    return h


def _h(seed=0, shape=(B, T, D)):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.fixture(scope="module")
def plain():
  model = Stack(4)
  params = nn.unbox(model.init(jax.random.key(1), _h()))["params"]
  return params, model.apply({"params": params}, _h())


def _with_backbone(hc_model, plain_params):
  """Hyper-connection params from init, sublayer params from the plain stack."""
  params = nn.unbox(hc_model.init(jax.random.key(2), _h()))["params"]
  params.update({k: v for k, v in plain_params.items() if not k.startswith("hc_")})
  assert set(params) == set(plain_params) | {f"hc_{l}" for l in range(hc_model.layers)}
  return params


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_branch_is_exactly_the_residual(plain, dynamic):
  params, want = plain
  model = Stack(4, branches=1, dynamic=dynamic)
  got = model.apply({"params": _with_backbone(model, params)}, _h())
  assert got.shape == (B, T, 1, D)
  np.testing.assert_array_equal(np.asarray(got[:, :, 0]), np.asarray(want))


def test_branches_at_init_carry_the_plain_residual(plain):
  """Paper init: every branch equals the plain stream; the collapsed, normed output too."""
  params, want = plain
  model = Stack(4, branches=3)
  got = model.apply({"params": _with_backbone(model, params)}, _h())
  for m in range(3):
    np.testing.assert_array_equal(np.asarray(got[:, :, m]), np.asarray(want))
  norm = RMSNorm()
  scale = {"params": {"scale": jnp.ones((D,))}}
  np.testing.assert_allclose(norm.apply(scale, collapse_branches(got)),
                             norm.apply(scale, want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer_index", [0, 1, 2, 4])
def test_init_reads_branch_l_mod_m(layer_index):
  h = _h(3, (B, T, 3, D))
  hc = HyperConnection(3, layer_index)
  params = nn.unbox(hc.init(jax.random.key(0), h, method=hc.width))
  x, state = hc.apply(params, h, method=hc.width)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(h[:, :, layer_index % 3]))
  np.testing.assert_array_equal(np.asarray(state.residual_BxTxMxD), np.asarray(h))


def _randomise(params, seed):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _reference(p, h, y_fn, eps=1e-6):
  """NumPy transcription of the paper's dynamic hyper-connection (RMSNorm for norm)."""
  p = jax.tree_util.tree_map(np.asarray, p)
  h = np.asarray(h, np.float64)
  m = h.shape[2]
  hn = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + eps) * p["norm"]["scale"]
  c = np.tanh(hn @ p["proj"]["kernel"])                              # [B, T, M, M + 2]
  a_m = p["width"] + p["alpha_scale"] * c[..., 0]                     # [B, T, M]
  a_r = p["residual"] + p["alpha_scale"] * c[..., 1:1 + m]            # [B, T, M, M]
  beta = p["depth"] + p["beta_scale"] * c[..., -1]                   # [B, T, M]
  x = np.einsum("btm,btmd->btd", a_m, h)                              # A_m^T H
  y = np.asarray(y_fn(x.astype(np.float32)), np.float64)
  return np.einsum("btmn,btmd->btnd", a_r, h) + beta[..., None] * y[:, :, None, :]


def test_dynamic_matches_paper_equations():
  h = _h(4, (B, T, 3, D))
  hc = HyperConnection(3, 1)
  sub = lambda x: jnp.sin(x) * 2.0
  params = _randomise(nn.unbox(hc.init(jax.random.key(0), h, sub))["params"], 5)
  got = hc.apply({"params": params}, h, sub)
  np.testing.assert_allclose(got, _reference(params, h, sub), rtol=1e-5, atol=1e-5)


def test_static_ignores_the_tokens():
  """dynamic=False: the same coefficients for every token (no norm or projection)."""
  h = _h(6, (B, T, 2, D))
  hc = HyperConnection(2, 0, dynamic=False)
  params = _randomise(nn.unbox(hc.init(jax.random.key(0), h, jnp.tanh))["params"], 7)
  assert set(params) == {"width", "residual", "depth"}
  got = hc.apply({"params": params}, h, jnp.tanh)
  x = np.einsum("m,btmd->btd", params["width"], h)
  want = (np.einsum("mn,btmd->btnd", params["residual"], h) +
          params["depth"][:, None] * np.tanh(x)[:, :, None, :])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_branch_and_parameter(plain):
  """At init the sublayer reads one branch, yet every branch and coefficient learns."""
  model = Stack(2, branches=3)
  params = _with_backbone(model, plain[0])
  h = _h(8)

  def loss(params, h):
    return jnp.sum(collapse_branches(model.apply({"params": params}, h)) ** 2)

  grads = jax.grad(loss)(params, h)
  for l in range(2):
    g = grads[f"hc_{l}"]
    for name in ("width", "residual", "depth"):
      assert np.all(np.abs(np.asarray(g[name])) > 0), (l, name)
    assert np.mean(np.abs(np.asarray(g["proj"]["kernel"])) > 0) > 0.9, l
  # A branch the first sublayer does not read still reaches the loss through the others.
  hc = HyperConnection(3, 0)
  hp = nn.unbox(hc.init(jax.random.key(0), _h(9, (B, T, 3, D)), jnp.tanh))
  dh = jax.grad(lambda h: jnp.sum(collapse_branches(hc.apply(hp, h, jnp.tanh)) ** 2))(
      _h(9, (B, T, 3, D)))
  for m in range(3):
    assert np.all(np.abs(np.asarray(dh[:, :, m])) > 0), m


def test_wrong_branch_count_names_the_field():
  hc = HyperConnection(2, 0)
  with pytest.raises(ValueError, match="HyperConnection.branches"):
    hc.init(jax.random.key(0), _h(0, (B, T, 3, D)), jnp.tanh)
