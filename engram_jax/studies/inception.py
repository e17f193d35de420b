"""InceptionV3 as the FID network of pytorch-fid / TTUR ("pt_inception-2015-12-05"), in
Flax, with weights read from a local file: nothing is ever downloaded.

FID and Inception Score on ImageNet are only comparable across papers when they use this
exact network, which differs from torchvision's `inception_v3` in four places: 1008
classes, no aux head, TF's average pooling (padding cells do not count,
`count_include_pad=False`) in Mixed_5b..7b, and a MAX pool in Mixed_7c's pool branch.

Parameters are named like pytorch-fid's state dict (`Mixed_5b/branch1x1/conv/kernel` is
`Mixed_5b.branch1x1.conv.weight`), so converting its weights is a rename and a
transpose. Once, on any machine with torch and the weights file:

    python -m engram_jax.studies.inception convert \
        --torch_weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

then copy the npz and pass it as `--inception_weights` (docs/probes.md).
`InceptionFeatureNet` wraps it as an `fid.FeatureNet` behind your VQ decoder.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from engram_jax import npz_files as npz
from engram_jax import cli

INPUT_SIZE = 299
FEATURES = 2048
NUM_CLASSES = 1008
TORCH_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = ("python -m engram_jax.studies.inception convert "
                   f"--torch_weights={TORCH_WEIGHTS} --out={{out}}")


# ----------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------
def avg_pool_3x3_exclude_pad(x_IxHpxWpx_):
  """3x3, stride 1, padding 1 average over the cells inside the image only.

  TF's `avg_pool(padding="SAME")`, which the FID weights were trained with; torch's
  default (`count_include_pad=True`) would shrink every border cell.
  """
  window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x_IxHpxWpx_, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1, *x_IxHpxWpx_.shape[1:3], 1), x_IxHpxWpx_.dtype)
  counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return sums / counts


def _max_pool_3x3(x, stride: int, pad: int):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: Conv (no bias) -> BatchNorm (eps 1e-3, stored
  statistics) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST  # FID features must not depend on TF32/bf16

  @nn.compact
  def __call__(self, x_IxHpxWpx_):
    (ph, pw), s = self.padding, self.stride
    x = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x_IxHpxWpx_)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _conv(features, kernel, stride=1, padding=(0, 0), *, name):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return ConvBN(features, kernel, stride, padding, name=name)


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b..5d): 64 + 64 + 96 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, 1, name="branch1x1")(x)
    b5 = _conv(48, 1, name="branch5x5_1")(x)
    b5 = _conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = _conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = _conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = _conv(self.pool_features, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 (Mixed_6a): 384 + 96 + the input's channels."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, stride=2, name="branch3x3")(x)
    bd = _conv(64, 1, name="branch3x3dbl_1")(x)
    bd = _conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = _conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], -1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e): 4 x 192 channels."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(192, 1, name="branch1x1")(x)
    b7 = _conv(c7, 1, name="branch7x7_1")(x)
    b7 = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = _conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _conv(192, 1, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 (Mixed_7a): 320 + 192 + the input's channels."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(192, 1, name="branch3x3_1")(x)
    b3 = _conv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = _conv(192, 1, name="branch7x7x3_1")(x)
    b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], -1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 outputs (Mixed_7b, 7c): 320 + 768 + 768 + 192.

  `max_pool`: Mixed_7c of the FID network max-pools in its pool branch (a quirk of the
  TF graph the weights come from; the paper and torchvision average).
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, 1, name="branch1x1")(x)
    b3 = _conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          _conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = _conv(448, 1, name="branch3x3dbl_1")(x)
    bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          _conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else avg_pool_3x3_exclude_pad(x)
    bp = _conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


def preprocess(images_IxHpxWpx3):
  """Images in [0, 1] -> the network's input: 299x299, in [-1, 1].

  As pytorch-fid: bilinear with half-pixel centres and no antialiasing (torch's
  `interpolate(mode="bilinear", align_corners=False)`), also when shrinking.
  """
  n, h, w, c = images_IxHpxWpx3.shape
  if c != 3:
    raise ValueError(f"InceptionV3: images have shape {images_IxHpxWpx3.shape}; use "
                     "[I, Hp, Wp, 3] RGB")
  x = images_IxHpxWpx3.astype(jnp.float32)
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """Images `[I, Hp, Wp, 3]` in [0, 1] -> (pool features `[I, F]`, logits `[I, C]`);
  F = 2048, C = 1008."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, images_IxHpxWpx3):
    x = preprocess(images_IxHpxWpx3)
    x = _conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)          # 149x149
    x = _conv(32, 3, name="Conv2d_2a_3x3")(x)                     # 147x147
    x = _conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)                                    # 73x73
    x = _conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = _conv(192, 3, name="Conv2d_4a_3x3")(x)                    # 71x71
    x = _max_pool_3x3(x, 2, 0)                                    # 35x35
    x = InceptionA(32, name="Mixed_5b")(x)                        # 256
    x = InceptionA(64, name="Mixed_5c")(x)                        # 288
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)                            # 17x17x768
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)                            # 8x8x1280
    x = InceptionE(name="Mixed_7b")(x)                            # 2048
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool_IxF = x.mean((1, 2))
    logits = nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST,
                      name="fc")(pool_IxF)
    return pool_IxF, logits


# ----------------------------------------------------------------------------------
# Weights: pytorch-fid state dict <-> our flat npz
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """`"params/Mixed_5b/branch1x1/conv/kernel"` -> shape, for every variable (traced, not
  run)."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(InceptionV3().init, jax.random.key(0), images)
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


# (collection, our leaf name) -> torch leaf name
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def torch_name(key: str) -> tuple[str, tuple[int, ...] | None]:
  """Our flat key -> (pytorch-fid state-dict name, axes that turn its array into ours).

  Torch stores conv weights `[out, in, kh, kw]` (ours HWIO) and linear weights `[out, in]`.
  """
  collection, *path, leaf = key.split("/")
  name = ".".join(path + [_TORCH_LEAF[collection, leaf]])
  if leaf != "kernel":
    return name, None
  return name, (2, 3, 1, 0) if path[-1] == "conv" else (1, 0)


def _listed(keys) -> str:
  keys = sorted(keys)
  return ", ".join(repr(k) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5
                                                  else "")


def convert_torch_state(state: dict[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid's state dict (torch names, arrays) -> our flat variables (npz keys).

  `num_batches_tracked` counters are dropped; any other missing or extra key, or a shape
  that is not the FID network's, is a ValueError naming the key.
  """
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  wanted = {}
  for key, shape in variable_shapes().items():
    name, axes = torch_name(key)
    torch_shape = shape if axes is None else tuple(shape[axes.index(i)]
                                                   for i in range(len(shape)))
    wanted[name] = (key, torch_shape, axes)
  extra, missing = set(state) - set(wanted), set(wanted) - set(state)
  if extra:
    raise ValueError(f"torch state dict: unexpected keys {_listed(extra)}; expected the "
                     f"state dict of pytorch-fid's FID InceptionV3 ({TORCH_WEIGHTS}), not "
                     "torchvision's inception_v3 (which has AuxLogits and 1000 classes)")
  if missing:
    raise ValueError(f"torch state dict: missing keys {_listed(missing)}; expected the "
                     f"complete state dict of {TORCH_WEIGHTS}")
  out = {}
  for name, (key, torch_shape, axes) in wanted.items():
    array = np.asarray(state[name], np.float32)
    if array.shape != torch_shape:
      raise ValueError(f"torch state dict: {name!r} has shape {array.shape}; the FID "
                       f"InceptionV3 has {torch_shape}")
    out[key] = np.ascontiguousarray(array if axes is None else array.transpose(axes))
  return out


def read_torch_state(path: str) -> dict[str, np.ndarray]:
  """A state dict from a `.pth` (needs torch) or an `.npz` keyed by torch names."""
  if path.endswith(".npz"):
    return npz.read_npz(path, f"--torch_weights={path!r}")
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path!r} needs torch: `pip install torch` on a machine that "
                      "has it, convert there once and copy the npz (or pass an .npz of the "
                      "state dict)") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}
  except Exception as err:  # torch raises many kinds for a file that is not a state dict
    raise ValueError(f"--torch_weights={path!r}: torch cannot read it as a state dict of "
                     f"tensors ({type(err).__name__}: {err})") from None


def load_inception(weights_path: str) -> tuple[InceptionV3, dict]:
  """(module, variables `{"params", "batch_stats"}`) from an npz that `convert` wrote."""
  fix = (f"make it once with `{CONVERT_COMMAND.format(out=weights_path)}` on a machine "
         "that has the pytorch-fid weights (nothing is downloaded; docs/probes.md)")
  if not os.path.isfile(weights_path):
    raise ValueError(f"inception weights {weights_path!r}: no such file; {fix}")
  flat = npz.read_npz(weights_path, f"inception weights {weights_path!r}", fix)
  shapes = variable_shapes()
  extra, missing = set(flat) - set(shapes), set(shapes) - set(flat)
  if extra or missing:
    torch_like = any("." in k for k in extra)
    raise ValueError(
        f"inception weights {weights_path!r}: "
        + (f"unexpected keys {_listed(extra)}; " if extra else "")
        + (f"missing keys {_listed(missing)}; " if missing else "")
        + ("this is a torch state dict, convert it: " if torch_like else "") + fix)
  for key, shape in shapes.items():
    if flat[key].shape != shape:
      raise ValueError(f"inception weights {weights_path!r}: {key!r} has shape "
                       f"{flat[key].shape}, expected {shape}; {fix}")
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return InceptionV3(), jax.device_put(tree)


# ----------------------------------------------------------------------------------
# FeatureNet: codes -> your decoder -> InceptionV3
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _forward(module: InceptionV3):
  return jax.jit(module.apply)


class InceptionFeatureNet:
  """An `fid.FeatureNet`: codes `[I, Hi, Wi]` -> `decode` -> images `[I, Hp, Wp, 3]` in
  [0, 1] -> (pool features `[I, F]`, F = 2048, softmax over the 1008 logits), float64.

  Runs in batches of `batch_size` (the last one padded, so one compile per image size)
  and decodes batch by batch, so memory does not grow with I.
  """

  def __init__(self, weights_path: str, decode: Callable, batch_size: int = 50):
    if batch_size < 1:
      raise ValueError(f"InceptionFeatureNet: batch_size={batch_size}; use >= 1")
    self.module, self.variables = load_inception(weights_path)
    self.path, self.decode, self.batch_size = weights_path, decode, batch_size

  def images(self, codes_IxHixWi) -> np.ndarray:
    """The decoder's images, checked: `[I, Hp, Wp, 3]` float32 in [0, 1]."""
    images = np.asarray(self.decode(codes_IxHixWi), np.float32)
    n = len(codes_IxHixWi)
    if images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
      raise ValueError(f"decoder: returned shape {images.shape} for {n} code grids; return "
                       "RGB images [I, Hp, Wp, 3]")
    if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
      raise ValueError(f"decoder: images span [{images.min():.3g}, {images.max():.3g}]; "
                       "return RGB in [0, 1] (not [-1, 1] or 0..255)")
    return images

  def __call__(self, codes_IxHixWi) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes_IxHixWi)
    n, batch = len(codes), self.batch_size
    features, logits = [np.zeros((0, FEATURES))], [np.zeros((0, NUM_CLASSES))]
    for start in range(0, n, batch):
      images = self.images(codes[start:start + batch])
      count = len(images)
      images = np.pad(images, ((0, batch - count), (0, 0), (0, 0), (0, 0)))
      f, l = _forward(self.module)(self.variables, images)
      features.append(np.asarray(f, np.float64)[:count])
      logits.append(np.asarray(l, np.float64)[:count])
    logits = np.concatenate(logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.concatenate(features), probs / probs.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------
# Command line: python -m engram_jax.studies.inception convert --torch_weights=... --out=...
# ----------------------------------------------------------------------------------
def main(argv=None) -> int:

  parser = cli.Parser(
      prog="python -m engram_jax.studies.inception",
      description="Convert pytorch-fid's FID InceptionV3 weights to the npz that "
                  "--inception_weights reads. Nothing is downloaded.")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser("convert", help="torch state dict -> our npz")
  convert.add_argument("--torch_weights", required=True,
                       help=f"{TORCH_WEIGHTS} (needs torch) or an .npz of its state dict")
  convert.add_argument("--out", required=True, help="the npz to write, e.g. inception_fid.npz")
  args = parser.parse_args(argv)

  def body():
    if not os.path.isfile(args.torch_weights):
      raise ValueError(f"--torch_weights={args.torch_weights!r}: no such file; download "
                       f"{TORCH_WEIGHTS} from the pytorch-fid GitHub releases yourself "
                       "(docs/probes.md)")
    flat = convert_torch_state(read_torch_state(args.torch_weights))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    npz.save_npz(args.out, flat)
    print(args.out, flush=True)
  return cli.run(body, also=(ImportError,))


if __name__ == "__main__":
  raise SystemExit(main())
