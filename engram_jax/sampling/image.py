"""Cached image sampling: prefill the class token, then one `lax.scan` over the cells.

The KV cache, the Engram canvas (cells generated so far, which the 2D hash reads) and
the Engram conv history live in the model's `cache` collection, so each step runs the
model on one position. Classifier-free guidance doubles the batch: rows `[0, B)` carry
the class token, rows `[B, 2B)` the null class, and the sampled logits are
`uncond + cfg_scale * (cond - uncond)`; `cfg_scale` 0 or 1 means no guidance (plain
conditional sampling, batch not doubled).
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.sampling.text import check_sampling, sample
from engram_jax.models.image import ImageARModel
from engram_jax.models.lm import as_variables
from engram_jax import cli


def guidance_on(cfg_scale: float) -> bool:
  """Whether `cfg_scale` asks for guidance (0 and 1 both mean off)."""
  return float(cfg_scale) not in (0.0, 1.0)


def with_null_rows(inputs_BxT, null_class: int):
  """`[2B, T]`: the inputs, then the same rows with the null class token."""
  inputs_BxT = jnp.asarray(inputs_BxT)
  return jnp.concatenate([inputs_BxT, inputs_BxT.at[:, 0].set(null_class)], axis=0)


def guide(logits_2BxC, cfg_scale: float):
  """uncond + s * (cond - uncond) of a doubled batch (see `with_null_rows`)."""
  cond, uncond = jnp.split(logits_2BxC, 2, axis=0)
  return uncond + cfg_scale * (cond - uncond)


def prefill(model: ImageARModel, params, inputs_BxT):
  """Runs the class token (and any known first cells); logits `[B, T, C]`, cache.
  `params`: a parameter tree, or variables with MoE `routing` biases beside it."""
  logits, variables = model.apply(as_variables(params), inputs_BxT, mode="prefill",
                                  mutable=["cache"])
  return logits, variables["cache"]


def decode_step(model: ImageARModel, params, cache, cell_B, position_B):
  """Feeds cell `position - 1` at `position`; logits `[B, C]` for cell `position`."""
  logits, variables = model.apply(
      {**as_variables(params), "cache": cache}, cell_B[:, None],
      positions_BxT=position_B[:, None],
      mode="decode", mutable=["cache"])
  return logits[:, 0], variables["cache"]


def teacher_forced_logits(model: ImageARModel, params, inputs_BxT, *, prefill_len: int = 1,
                          cfg_scale: float = 0.0):
  """Logits `[B, T, C]` of every position through the cache (guided when asked).

  Prefills `inputs_BxT[:, :prefill_len]`, then feeds the remaining inputs one `lax.scan`
  step each: the cached path that `generate_images` runs, with the cells forced, to be
  compared with the full forward.
  """
  guided = guidance_on(cfg_scale)
  if guided:
    inputs_BxT = with_null_rows(inputs_BxT, model.cfg.null_class)
  b, t = inputs_BxT.shape
  first_BxTxC, cache = prefill(model, params, inputs_BxT[:, :prefill_len])

  def step(cache, inputs):
    cell_B, position = inputs
    logits_BxC, cache = decode_step(model, params, cache, cell_B,
                                    jnp.full((b,), position, jnp.int32))
    return cache, logits_BxC

  positions = jnp.arange(prefill_len, t, dtype=jnp.int32)
  _, rest_SxBxC = jax.lax.scan(step, cache, (inputs_BxT[:, prefill_len:].T, positions))
  logits_BxTxC = jnp.concatenate([first_BxTxC, jnp.swapaxes(rest_SxBxC, 0, 1)], axis=1)
  return guide(logits_BxTxC, cfg_scale) if guided else logits_BxTxC


def generate_images(model: ImageARModel, params, labels_B, rng, *, cfg_scale: float = 0.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Codes `[B, Hi, Wi]` sampled in raster order; label `num_classes` is unconditional.

  Cell 0 comes from the prefill logits of the class token; cells 1..H*W-1 from one
  `lax.scan` of decode steps. Step t's key is split across rows (`generate.sample`),
  so every row has its own stream. Jit with `model` and the sampling arguments
  static: one compile per (batch, sampling settings).
  """
  g = model.cfg
  guided = guidance_on(cfg_scale)
  class_B = g.class_tokens(labels_B)
  inputs = class_B[:, None]
  if guided:
    inputs = with_null_rows(inputs, g.null_class)
  logits_Bx1xC, cache = prefill(model, params, inputs)

  def pick(logits_BxC, key):
    """The sampled cells `[B]`, and what to feed back (both halves when guided)."""
    if guided:
      logits_BxC = guide(logits_BxC, cfg_scale)
    cell_B = sample(logits_BxC, key, temperature, top_k, top_p)
    return cell_B, (jnp.concatenate([cell_B, cell_B]) if guided else cell_B)

  keys = jax.random.split(rng, g.cells)
  first_B, feed_B = pick(logits_Bx1xC[:, 0], keys[0])

  def step(carry, inputs):
    cache, feed_B = carry
    key, position = inputs
    logits_BxC, cache = decode_step(model, params, cache, feed_B,
                                    jnp.full(feed_B.shape, position, jnp.int32))
    cell_B, feed_B = pick(logits_BxC, key)
    return (cache, feed_B), cell_B

  positions = jnp.arange(1, g.cells, dtype=jnp.int32)
  _, rest_SxB = jax.lax.scan(step, (cache, feed_B), (keys[1:], positions))
  codes_BxHiWi = jnp.concatenate([first_B[:, None], rest_SxB.T], axis=1)
  return codes_BxHiWi.reshape(-1, g.height, g.width)


# ----------------------------------------------------------------------------------
# Command line: python -m engram_jax.generate --workdir=DIR --classes=0,1,2
# ----------------------------------------------------------------------------------
def parse_classes(text: str, num_classes: int) -> list[int]:
  """`"0,1,2"` -> [0, 1, 2], each checked against `[0, num_classes)`."""
  classes = cli.parse_list(text, "--classes")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"--classes: class {bad[0]} is outside [0, data.num_classes="
                     f"{num_classes}); use ids 0..{num_classes - 1}")
  return classes


# What `sample_grid` writes carries this (the PNG's Software text, a key of the npz):
# a file without it at the output path is someone else's, and is not replaced.
SAMPLES_MARK = "engram_jax generate"


def save_grid_png(path: str, codes_CxIxHixWi, classes, vmax: int) -> None:
  """One row of samples per class, each cell a grey level (0 light, `vmax` dark)."""
  from matplotlib.figure import Figure

  codes = np.asarray(codes_CxIxHixWi, np.float64)
  rows, cols, h, w = codes.shape
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), vmax / 2)  # grey borders
  for r in range(rows):
    for c in range(cols):
      grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = codes[r, c]
  fig = Figure(figsize=(max(2.0, 0.5 * cols + 1.0), max(1.5, 0.5 * rows + 0.5)))
  ax = fig.add_subplot()
  ax.imshow(grid, cmap="gray_r", vmin=0, vmax=vmax, interpolation="nearest")
  ax.set_yticks([1 + r * (h + 1) + (h - 1) / 2 for r in range(rows)],
                [f"class {c}" for c in classes])
  ax.set_xticks([])
  from engram_jax import paths  # whole or not at all: a kill keeps the previous grid
  paths.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                   bbox_inches="tight",
                                                   metadata={"Software": SAMPLES_MARK}))


def _npz_keys(path: str) -> set:
  try:
    with np.load(path, allow_pickle=False) as npz:
      return set(npz.files)
  except Exception:  # noqa: BLE001  unreadable: nobody's samples
    return set()


def _png_head(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(4096)  # the text chunks follow the header
  except OSError:
    return b""


def _written_by_generate(png: str, npz: str, path: str) -> bool:
  """Whether `path` (`png` or `npz`) is a sample grid or codes `generate` wrote: marked,
  or an unmarked pair of an older version (a matplotlib PNG beside an npz of exactly
  codes and labels; a dataset of codes alone, with no such PNG, is not one)."""
  if path == npz and "sampled_by" in _npz_keys(npz):
    return True
  if path == png and SAMPLES_MARK.encode() in _png_head(png):
    return True
  return b"Matplotlib" in _png_head(png) and _npz_keys(npz) == {"codes", "labels"}


def check_out(out: str) -> str:
  """The npz path beside `out` (a `.png`) once both may be written: neither a
  directory, nor a file that `generate` did not write (a dataset of codes beside the
  grid, a run's config.json) — those would be replaced."""
  import os
  if not out.lower().endswith(".png"):
    raise ValueError(f"--out={out}: give a .png path (the codes are written beside it, "
                     "as .npz)")
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise ValueError(f"--out={out}: {parent} is not a directory; give another --out")
  npz = os.path.splitext(out)[0] + ".npz"
  for path in (out, npz):
    if os.path.isdir(path):
      raise ValueError(f"--out={out}: {path} is a directory; give a file path")
    if os.path.lexists(path) and not _written_by_generate(out, npz, path):
      raise ValueError(f"--out={out}: {path} exists and is not a sample `generate` wrote "
                       "(the samples would replace it); give another --out, or move it "
                       "away")
  return npz


SAMPLING_TYPES = dict(cfg_scale=float, temperature=float, top_k=int, top_p=float)


def sampling_settings(config, overrides=None) -> dict:
  """cfg_scale, temperature, top_k, top_p: `overrides` (attributes, None = unset), else
  the config's `sample` section, else no guidance and plain sampling."""
  settings = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
  settings.update({k: v for k, v in (config.get("sample") or {}).items() if k in settings})
  for k in settings:
    if getattr(overrides, k, None) is not None:
      settings[k] = getattr(overrides, k)
  return {k: SAMPLING_TYPES[k](v) for k, v in settings.items()}


@dataclasses.dataclass(frozen=True)
class Grid:
  """Samples of `sample_grid`: codes `[B, Hi, Wi]` (rows of the PNG are classes), their
  labels, the PNG and npz written, and the sampling settings used."""
  codes_BxHixWi: np.ndarray
  labels_B: np.ndarray
  png: str
  sampling: dict


def sample_grid(run, classes="", samples_per_class: int = 8, *, seed: int = 0,
                out: str = "", overrides=None) -> Grid:
  """Samples `samples_per_class` images of each class (`"0,3"` or a list; all by
  default) from a loaded image run (`workdir.load`), writes the PNG grid and the codes
  as npz beside it (default WORKDIR/samples_stepS_seedN.png): what
  `python -m engram_jax.generate` does for an image run. `overrides`: an object or dict
  with cfg_scale / temperature / top_k / top_p over the config's `sample` section."""
  import os
  if samples_per_class < 1:
    raise ValueError(f"--samples_per_class={samples_per_class}: use a positive integer")
  g = run.model.cfg
  if isinstance(classes, str):
    classes = parse_classes(classes, g.num_classes) if classes else list(range(g.num_classes))
  if isinstance(overrides, dict):
    overrides = types.SimpleNamespace(**overrides)
  sampling = sampling_settings(run.config, overrides)
  check_sampling(sampling)
  from engram_jax import paths
  out = paths.local_output(out or os.path.join(run.workdir, f"samples_step{run.step}_seed{seed}.png"),
                           "--out")
  npz = check_out(out)  # before the sampling
  labels_B = np.repeat(np.asarray(classes, np.int32), samples_per_class)
  sample = jax.jit(generate_images, static_argnums=0, static_argnames=tuple(sampling))
  codes = np.asarray(sample(run.model, run.variables, labels_B, jax.random.key(seed),
                            **sampling))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  save_grid_png(out, codes.reshape(len(classes), samples_per_class, g.height, g.width),
                classes, g.codebook_size - 1)
  save_codes_npz(npz, codes, labels_B)
  return Grid(codes, labels_B, out, sampling)


def save_codes_npz(path: str, codes_BxHixWi, labels_B) -> None:
  """The sampled codes and their labels as npz, whole or not at all (a kill keeps the
  previous file)."""
  from engram_jax import npz_files as npz
  npz.save_npz(path, dict(codes=codes_BxHixWi, labels=labels_B,
                          sampled_by=np.array(SAMPLES_MARK)))


def main(argv=None) -> int:
  import argparse

  parser = cli.Parser(
      prog="python -m engram_jax.generate",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description="Sample images per class from the newest checkpoint of an image workdir; "
                  "writes a PNG grid (rows = classes) and the codes as npz.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--classes", default=argparse.SUPPRESS,
                      help="comma-separated ids (default: all classes)")
  parser.add_argument("--samples_per_class", type=int, default=8,
                      help="samples in each row of the grid")
  parser.add_argument("--cfg_scale", type=float, default=argparse.SUPPRESS,
                      help="classifier-free guidance (default: config sample.cfg_scale; "
                           "0 or 1 = off)")
  parser.add_argument("--temperature", type=float, default=argparse.SUPPRESS,
                      help="0 = greedy (default: config sample.temperature, else 1.0)")
  parser.add_argument("--top_k", type=int, default=argparse.SUPPRESS,
                      help="0 = off (default: config sample.top_k, else 0)")
  parser.add_argument("--top_p", type=float, default=argparse.SUPPRESS,
                      help="1.0 = off (default: config sample.top_p, else 1.0)")
  parser.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
  parser.add_argument("--out", default=argparse.SUPPRESS,
                      help="PNG path (default: WORKDIR/samples_stepS_seedN.png)")
  args = parser.parse_args(argv)

  def body():
    if args.samples_per_class < 1:  # before a checkpoint is read
      raise ValueError(f"--samples_per_class={args.samples_per_class}: use a positive integer")
    from engram_jax import workdir
    trained = workdir.load(args.workdir, kind="image")
    grid = sample_grid(trained, args.classes if hasattr(args, "classes") else "",
                       args.samples_per_class, seed=args.seed,
                       out=getattr(args, "out", ""), overrides=args)
    print(f"# {args.workdir} step {trained.step}: {len(grid.labels_B)} samples, " +
          ", ".join(f"{k}={v}" for k, v in grid.sampling.items()), flush=True)
    print(grid.png, flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
