"""inception: the FID InceptionV3 (torchvision's counts and shapes, pytorch-fid's pooling
and resize), the torch state-dict converter (round trip, errors, missing torch), the
FeatureNet contract and batching, and the evaluate/probes flags that select it.

Random weights everywhere (nothing can be downloaded); every test that runs the network
uses images of one shape, so the forward compiles once per batch size.
"""
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from engram_jax.studies import evaluate
from engram_jax.studies import feature_nets
from engram_jax.studies import fid
from engram_jax.studies import inception
from engram_jax.studies import probes

RNG = np.random.default_rng(0)


def random_variables(seed: int = 0) -> dict[str, np.ndarray]:
  """Flat variables, all random (BN statistics too), so a swapped or mis-transposed
  tensor changes the outputs; He-scaled kernels keep activations finite."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in inception.variable_shapes().items():
    leaf = key.rsplit("/", 1)[1]
    if leaf == "kernel":
      value = rng.normal(0, math.sqrt(2 / math.prod(shape[:-1])), shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0, 0.1, shape)
    flat[key] = value.astype(np.float32)
  return flat


def to_torch_state(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What pytorch-fid's `state_dict()` holds for these variables, written independently
  of the converter: OIHW conv weights, `[out, in]` linear weights, BN running stats."""
  torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
  state = {}
  for key, value in flat.items():
    _, *path, leaf = key.split("/")
    prefix = ".".join(path)
    if leaf == "kernel":
      state[prefix + ".weight"] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    else:
      state[f"{prefix}.{torch_leaf[leaf]}"] = value
    if leaf == "mean":
      state[prefix + ".num_batches_tracked"] = np.array(0, np.int64)
  return state


def decode(codes_NxHxW):
  """A stand-in VQ decoder: codes in [0, 255] -> RGB `[I, Hp, Wp, 3]` in [0, 1]."""
  x = np.asarray(codes_NxHxW, np.float32) / 255.0
  return np.stack([x, x * x, 1.0 - x], -1)


@pytest.fixture(scope="module")
def flat():
  return random_variables()


@pytest.fixture(scope="module")
def codes():
  return RNG.integers(0, 256, (4, 32, 32))


@pytest.fixture(scope="module")
def converted(flat, tmp_path_factory):
  """The converter CLI run on an npz of the fake torch state dict: the npz it wrote."""
  root = tmp_path_factory.mktemp("inception")
  torch_npz, out = str(root / "torch_state.npz"), str(root / "sub" / "inception_fid.npz")
  np.savez(torch_npz, **to_torch_state(flat))
  assert inception.main(["convert", f"--torch_weights={torch_npz}", f"--out={out}"]) == 0
  return out


@pytest.fixture(scope="module")
def want(flat, codes):
  """(features, logits) of the original variables on the first two decoded grids."""
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  f, l = inception._forward(inception.InceptionV3())(tree, decode(codes[:2]))
  return np.asarray(f), np.asarray(l)


# ----------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------
def test_parameter_count_and_layers_match_torchvision_fid_inception():
  shapes = inception.variable_shapes()
  count = lambda prefix: sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))
  # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, aux head);
  # the FID network drops the aux head and has 8 more classes.
  aux = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)
  assert count("params/") == 27_161_264 - aux + 8 * (2048 + 1) == 23_850_960
  assert count("batch_stats/") == 34_432  # running mean + var of 17,216 BN channels
  assert count("") == 23_885_392
  assert sum(k.endswith("/conv/kernel") for k in shapes) == 94
  assert sum(k.endswith("/bn/scale") for k in shapes) == 94
  assert sum(k.endswith("/bn/mean") for k in shapes) == 94
  assert not any(k.endswith("/conv/bias") for k in shapes)


@pytest.mark.parametrize("name, torch_shape", [
    ("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)),
    ("Conv2d_4a_3x3.conv.weight", (192, 80, 3, 3)),
    ("Mixed_5b.branch_pool.conv.weight", (32, 192, 1, 1)),
    ("Mixed_5d.branch5x5_2.conv.weight", (64, 48, 5, 5)),
    ("Mixed_6a.branch3x3.conv.weight", (384, 288, 3, 3)),
    ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
    ("Mixed_6e.branch7x7dbl_4.conv.weight", (192, 192, 7, 1)),
    ("Mixed_7a.branch3x3_2.conv.weight", (320, 192, 3, 3)),
    ("Mixed_7b.branch3x3dbl_1.conv.weight", (448, 1280, 1, 1)),
    ("Mixed_7c.branch3x3_2b.conv.weight", (384, 384, 3, 1)),
    ("Mixed_7c.branch_pool.bn.running_var", (192,)),
    ("Mixed_6c.branch1x1.bn.weight", (192,)),
    ("fc.weight", (1008, 2048)),
    ("fc.bias", (1008,)),
])
def test_variables_have_torchvision_shapes_after_conversion(flat, name, torch_shape):
  state = to_torch_state(flat)
  assert state[name].shape == torch_shape
  assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 94 * 5 + 2


def _pool_reference(x_HxWxC, reduce):
  """3x3, stride 1 window over in-image cells only, with plain NumPy loops."""
  h, w, _ = x_HxWxC.shape
  out = np.zeros_like(x_HxWxC)
  for i in range(h):
    for j in range(w):
      window = x_HxWxC[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      out[i, j] = reduce(window.reshape(-1, window.shape[-1]), axis=0)
  return out


def test_average_pool_excludes_padding_cells():
  x = RNG.normal(size=(2, 5, 6, 3)).astype(np.float32)
  got = np.asarray(inception.avg_pool_3x3_exclude_pad(jnp.asarray(x)))
  for n in range(2):
    np.testing.assert_allclose(got[n], _pool_reference(x[n], np.mean), rtol=1e-5, atol=1e-6)
  corner = x[0, :2, :2].mean((0, 1))  # 4 cells inside the image, not 9
  np.testing.assert_allclose(got[0, 0, 0], corner, rtol=1e-5)
  assert not np.allclose(got[0, 0, 0], x[0, :2, :2].sum((0, 1)) / 9)


@pytest.mark.parametrize("block, name, pool", [
    (inception.InceptionA(32), "Mixed_5b", np.mean),
    (inception.InceptionE(max_pool=True), "Mixed_7c", np.max),
])
def test_pool_branch_is_last_and_pools_as_the_fid_network(flat, block, name, pool):
  """The pool branch (avg without padding cells in 5b, MAX in 7c) feeds a 1x1 ConvBN
  whose output is the block's last channels."""
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  variables = {c: tree[c][name] for c in ("params", "batch_stats")}
  x = RNG.normal(size=(1, 5, 5, variables["params"]["branch_pool"]["conv"]["kernel"].shape[2]))
  out = np.asarray(jax.jit(block.apply)(variables, jnp.asarray(x, jnp.float32)))
  kernel = variables["params"]["branch_pool"]["conv"]["kernel"][0, 0]
  bn = {**variables["params"]["branch_pool"]["bn"], **variables["batch_stats"]["branch_pool"]["bn"]}
  y = _pool_reference(x[0], pool) @ kernel
  y = (y - bn["mean"]) / np.sqrt(bn["var"] + 1e-3) * bn["scale"] + bn["bias"]
  np.testing.assert_allclose(out[0, ..., -kernel.shape[1]:], np.maximum(y, 0),
                             rtol=1e-4, atol=1e-4)


def _bilinear_reference(x_IxHpxWpx_, size):
  """torch `interpolate(mode="bilinear", align_corners=False)`: half-pixel centres,
  source index clamped to the image, no antialiasing."""
  def axis(n_in):
    src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo
  (r0, r1, wr), (c0, c1, wc) = axis(x_IxHpxWpx_.shape[1]), axis(x_IxHpxWpx_.shape[2])
  rows = x_IxHpxWpx_[:, r0] * (1 - wr)[:, None, None] + x_IxHpxWpx_[:, r1] * wr[:, None, None]
  return rows[:, :, c0] * (1 - wc)[:, None] + rows[:, :, c1] * wc[:, None]


@pytest.mark.parametrize("shape", [(1, 32, 24, 3), (1, 400, 333, 3)])
def test_preprocess_resizes_like_torch_bilinear_and_scales_to_minus_one_one(shape):
  x = RNG.uniform(size=shape).astype(np.float32)
  got = np.asarray(inception.preprocess(jnp.asarray(x)))
  assert got.shape == (1, 299, 299, 3)
  # float32 source coordinates near 400 round at ~3e-5 of a pixel
  np.testing.assert_allclose(got, 2 * _bilinear_reference(x, 299) - 1, atol=1e-4)
  same = RNG.uniform(size=(1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(inception.preprocess(jnp.asarray(same))), 2 * same - 1)


# ----------------------------------------------------------------------------------
# Conversion and loading
# ----------------------------------------------------------------------------------
def test_converted_weights_load_and_give_the_original_outputs(converted, flat, codes, want):
  module, variables = inception.load_inception(converted)
  for key, value in flat.items():
    got = variables
    for part in key.split("/"):
      got = got[part]
    np.testing.assert_array_equal(np.asarray(got), value, err_msg=key)
  features, logits = inception._forward(module)(variables, decode(codes[:2]))
  np.testing.assert_array_equal(np.asarray(features), want[0])
  np.testing.assert_array_equal(np.asarray(logits), want[1])
  assert want[0].shape == (2, 2048) and want[1].shape == (2, 1008)
  assert np.all(np.isfinite(want[1])) and np.std(want[0]) > 0
  assert [n for n in os.listdir(os.path.dirname(converted)) if ".tmp" in n] == []


def test_converter_rejects_unexpected_missing_and_misshapen_keys(flat):
  state = to_torch_state(flat)
  with pytest.raises(ValueError, match=r"unexpected keys 'AuxLogits\.fc\.weight'"):
    inception.convert_torch_state({**state, "AuxLogits.fc.weight": np.zeros((1000, 768))})
  partial = {k: v for k, v in state.items() if k != "Mixed_6e.branch7x7dbl_3.bn.running_var"}
  with pytest.raises(ValueError, match=r"missing keys 'Mixed_6e\.branch7x7dbl_3\.bn\.running_var'"):
    inception.convert_torch_state(partial)
  with pytest.raises(ValueError, match=re.escape("'fc.weight' has shape (1000, 2048); the FID "
                                                 "InceptionV3 has (1008, 2048)")):
    inception.convert_torch_state({**state, "fc.weight": np.zeros((1000, 2048))})
  hwio = state["Conv2d_2a_3x3.conv.weight"].transpose(2, 3, 1, 0)  # already in flax layout
  with pytest.raises(ValueError, match=re.escape("'Conv2d_2a_3x3.conv.weight' has shape "
                                                 "(3, 3, 32, 32)")):
    inception.convert_torch_state({**state, "Conv2d_2a_3x3.conv.weight": hwio})


def test_convert_cli_errors_exit_2_naming_the_key_or_torch(flat, tmp_path, capsys, monkeypatch):
  state = to_torch_state(flat)
  del state["fc.bias"]
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, **state)
  out = str(tmp_path / "out.npz")
  assert inception.main(["convert", f"--torch_weights={bad}", f"--out={out}"]) == 2
  assert "missing keys 'fc.bias'" in capsys.readouterr().err and not os.path.exists(out)

  pth = tmp_path / inception.TORCH_WEIGHTS
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as when absent
  assert inception.main(["convert", f"--torch_weights={pth}", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "needs torch" in err and "pip install torch" in err

  assert inception.main(["convert", f"--torch_weights={tmp_path / 'none.pth'}",
                         f"--out={out}"]) == 2
  assert "no such file" in capsys.readouterr().err


def test_load_inception_errors_name_the_path_and_the_fix(flat, converted, tmp_path):
  missing = str(tmp_path / "absent.npz")
  with pytest.raises(ValueError, match=r"absent\.npz'.*no such file.*inception convert"):
    inception.load_inception(missing)
  torch_like = str(tmp_path / "torch_like.npz")
  np.savez(torch_like, **{"fc.bias": np.zeros(1008, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys 'fc\.bias'.*missing keys.*this is a "
                                       r"torch state dict, convert it.*nothing is downloaded"):
    inception.load_inception(torch_like)
  with np.load(converted) as npz:
    variables = {k: npz[k] for k in npz.files}
  variables["params/Mixed_5c/branch1x1/bn/scale"] = np.ones(65, np.float32)
  misshapen = str(tmp_path / "misshapen.npz")
  np.savez(misshapen, **variables)
  with pytest.raises(ValueError, match=r"misshapen\.npz'.*'params/Mixed_5c/branch1x1/bn/"
                                       r"scale' has shape \(65,\), expected \(64,\)"):
    inception.load_inception(misshapen)
  not_npz = tmp_path / "garbage.npz"
  not_npz.write_bytes(b"garbage")
  np.save(tmp_path / "array.npy", np.zeros(3))
  for path in (not_npz, tmp_path / "array.npy"):
    with pytest.raises(ValueError, match="not an npz"):
      inception.load_inception(str(path))


# ----------------------------------------------------------------------------------
# FeatureNet
# ----------------------------------------------------------------------------------
def test_feature_net_contract_and_fid_of_a_set_against_itself(converted, codes, want):
  net = inception.InceptionFeatureNet(converted, decode, batch_size=2)
  features, probs = fid.features_of(net, codes)  # checks [I, F], [I, C], sum to 1
  assert features.shape == (4, 2048) and probs.shape == (4, 1008)
  assert features.dtype == probs.dtype == np.float64
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(features[:2], want[0], rtol=1e-6)
  np.testing.assert_allclose(probs[:2], np.asarray(jax.nn.softmax(want[1].astype(np.float64))),
                             rtol=1e-5, atol=1e-12)
  trace = np.trace(fid.gaussian_fit(features)[1])
  assert fid.fid(features, features) < 1e-6 * trace
  other, _ = net(255 - codes)
  assert fid.fid(features, other) > 1e-2 * trace


def test_batching_does_not_change_the_features(converted, codes):
  by_two = inception.InceptionFeatureNet(converted, decode, batch_size=2)
  odd, odd_probs = by_two(codes[:3])  # a full batch, then one padded to 2
  full, full_probs = by_two(codes)
  np.testing.assert_allclose(odd, full[:3], rtol=1e-6)
  np.testing.assert_allclose(odd_probs, full_probs[:3], rtol=1e-6, atol=1e-12)
  one, _ = inception.InceptionFeatureNet(converted, decode, batch_size=1)(codes[:3])
  np.testing.assert_allclose(one, full[:3], rtol=1e-4, atol=1e-5)
  empty, empty_probs = by_two(codes[:0])
  assert empty.shape == (0, 2048) and empty_probs.shape == (0, 1008)


def test_feature_net_rejects_a_decoder_with_the_wrong_output(converted, codes):
  net = inception.InceptionFeatureNet(converted, lambda c: decode(c)[..., 0], batch_size=2)
  with pytest.raises(ValueError, match=r"decoder: returned shape \(2, 32, 32\).*\[I, Hp, Wp, 3\]"):
    net(codes[:2])
  net = inception.InceptionFeatureNet(converted, lambda c: 255 * decode(c), batch_size=2)
  with pytest.raises(ValueError, match=r"return RGB in \[0, 1\]"):
    net(codes[:2])


# ----------------------------------------------------------------------------------
# evaluate / probes flags
# ----------------------------------------------------------------------------------
def test_feature_net_for_picks_the_inception_net(converted):
  from configs import image as image_configs
  config = image_configs.get_config("digits")  # without the flags: the digits classifier
  net = feature_nets.feature_net_for(config, "/nonexistent", inception_weights=converted,
                                 decoder="tests.test_inception:decode")
  assert isinstance(net, inception.InceptionFeatureNet) and net.decode is decode
  assert net.path == converted
  with pytest.raises(ValueError, match=r"--decoder='tests.test_inception:nope': cannot load"):
    feature_nets.feature_net_for(config, "", inception_weights=converted,
                             decoder="tests.test_inception:nope")


@pytest.mark.parametrize("main", [evaluate.main, lambda argv: probes.main(
    argv + ["--probe=gate_clamp"])])
@pytest.mark.parametrize("flags, match", [
    (["--inception_weights=w.npz"], "--inception_weights='w.npz' needs --decoder=pkg.module:fn"),
    (["--decoder=m:f"], "--decoder='m:f' needs --inception_weights=PATH"),
    (["--feature_net=m:f", "--inception_weights=w.npz", "--decoder=m:f"],
     "--feature_net and --inception_weights/--decoder both choose"),
    (["--inception_weights=/nonexistent/w.npz", "--decoder=m:f"], "no such file"),
])
def test_cli_flag_errors_come_before_any_work(main, flags, match, tmp_path, capsys):
  assert main([f"--workdir={tmp_path / 'never_read'}", *flags]) == 2
  assert match in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# Against pytorch-fid itself, where torch and pytorch-fid are installed
# ----------------------------------------------------------------------------------
def test_matches_pytorch_fid_on_random_weights(flat, codes, tmp_path):
  """pytorch-fid's network (its FID blocks on torchvision's Inception3) with the same
  random weights, via a real `.pth` through the converter CLI."""
  torch = pytest.importorskip("torch")
  fid_net = pytest.importorskip("pytorch_fid.inception")
  net = fid_net._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for name, block in (("Mixed_5b", fid_net.FIDInceptionA(192, pool_features=32)),
                      ("Mixed_5c", fid_net.FIDInceptionA(256, pool_features=64)),
                      ("Mixed_5d", fid_net.FIDInceptionA(288, pool_features=64)),
                      ("Mixed_6b", fid_net.FIDInceptionC(768, channels_7x7=128)),
                      ("Mixed_6c", fid_net.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6d", fid_net.FIDInceptionC(768, channels_7x7=160)),
                      ("Mixed_6e", fid_net.FIDInceptionC(768, channels_7x7=192)),
                      ("Mixed_7b", fid_net.FIDInceptionE_1(1280)),
                      ("Mixed_7c", fid_net.FIDInceptionE_2(2048))):
    setattr(net, name, block)
  net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                       for k, v in to_torch_state(flat).items()}, strict=True)
  pth, out = str(tmp_path / inception.TORCH_WEIGHTS), str(tmp_path / "fid.npz")
  torch.save(net.state_dict(), pth)
  assert inception.main(["convert", f"--torch_weights={pth}", f"--out={out}"]) == 0

  more_codes = np.concatenate([codes, RNG.integers(0, 256, (2, 32, 32))])
  images = decode(more_codes)
  pooled = []
  net.fc.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                        align_corners=False)
    logits = net.eval()(2 * x - 1).numpy()
  features, probs = inception.InceptionFeatureNet(out, decode, batch_size=2)(more_codes)
  scale = np.abs(pooled[0].numpy()).max()
  np.testing.assert_allclose(features, pooled[0].numpy(), atol=1e-5 * scale)
  np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(logits.astype(np.float64))),
                             atol=1e-4)
  large = RNG.uniform(size=(1, 3, 400, 333)).astype(np.float32)  # shrinking: no antialias
  resized = torch.nn.functional.interpolate(torch.from_numpy(large), size=(299, 299),
                                            mode="bilinear", align_corners=False).numpy()
  np.testing.assert_allclose(inception.preprocess(jnp.asarray(large.transpose(0, 2, 3, 1))),
                             2 * resized.transpose(0, 2, 3, 1) - 1, atol=1e-4)
