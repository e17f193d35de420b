"""Image sampling: cached `generate_images` vs recomputing the full forward for every
cell, and Engram vs the same backbone without it; all ratios from one process.

Builds a `configs/image.py` variant with Engram (default `digits`) and its baseline
(`engram.layers = ()`), random weights. Both paths sample greedily with the config's
classifier-free guidance, so they must emit the same codes (checked before timing).
"""
import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import image as image_configs  # noqa: E402
from engram_jax.sampling import image as generate_image  # noqa: E402
from engram_jax.models import image  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py


def build(config, engram: bool):
  c = config.copy_and_resolve_references()
  if not engram:
    c.model.engram.layers = ()
  cfg = image.make_image_config(c.model, c.data)
  model = image.ImageARModel(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0),
                                        jnp.zeros((1, cfg.cells), jnp.int32)))["params"]
  return model, params


def samplers(model, cfg_scale: float):
  """(cached, recompute): jitted `(params, labels) -> codes [B, H, W]`, greedy."""
  g = model.cfg
  guided = generate_image.guidance_on(cfg_scale)

  @jax.jit
  def cached(params, labels_B):
    return generate_image.generate_images(model, params, labels_B, jax.random.key(0),
                                          cfg_scale=cfg_scale, temperature=0.0)

  @jax.jit
  def recompute(params, labels_B):
    """Each cell runs the whole (fixed-size, causal) sequence through the model."""
    seq = jnp.zeros((len(labels_B), g.cells), jnp.int32).at[:, 0].set(g.class_tokens(labels_B))
    if guided:
      seq = generate_image.with_null_rows(seq, g.null_class)

    def step(seq, t):
      logits = jax.lax.dynamic_index_in_dim(model.apply({"params": params}, seq), t, 1, False)
      if guided:
        logits = generate_image.guide(logits, cfg_scale)
      cell = jnp.argmax(logits, -1).astype(jnp.int32)
      feed = jnp.concatenate([cell, cell]) if guided else cell
      seq = jax.lax.dynamic_update_index_in_dim(seq, feed, jnp.minimum(t + 1, g.cells - 1), 1)
      return seq, cell

    _, cells_TxB = jax.lax.scan(step, seq, jnp.arange(g.cells))
    return cells_TxB.T.reshape(-1, g.height, g.width)

  return cached, recompute


def one_decode_step(model, params, labels_B, cfg_scale: float):
  """A call of one jitted `decode_step` (the body of the cached scan) at cell 5."""
  inputs = model.cfg.class_tokens(labels_B)[:, None]
  if generate_image.guidance_on(cfg_scale):
    inputs = generate_image.with_null_rows(inputs, model.cfg.null_class)
  _, cache = jax.jit(functools.partial(generate_image.prefill, model))(params, inputs)
  step = jax.jit(functools.partial(generate_image.decode_step, model))
  cells = jnp.zeros((len(inputs),), jnp.int32)
  positions = jnp.full((len(inputs),), 5, jnp.int32)
  return lambda: step(params, cache, cells, positions)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="digits", help="configs/image.py variant")
  parser.add_argument("--batch", type=int, default=0, help="0 = sample.num_samples")
  parser.add_argument("--cfg_scale", type=float, default=None, help="default: the config's")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = image_configs.get_config(args.variant)
  if not config.model.engram.layers:
    raise SystemExit(f"--variant={args.variant} has no Engram; pick one with "
                     "model.engram.layers (e.g. digits)")
  batch = args.batch or config.sample.num_samples
  cfg_scale = config.sample.cfg_scale if args.cfg_scale is None else args.cfg_scale
  labels = jnp.asarray(np.arange(batch) % config.data.num_classes, jnp.int32)
  calls, same = {}, {}
  for name, engram in (("engram", True), ("baseline", False)):
    model, params = build(config, engram)
    cached, recompute = samplers(model, cfg_scale)
    same[name] = np.array_equal(np.asarray(cached(params, labels)),
                                np.asarray(recompute(params, labels)))
    calls[name, "cached"] = functools.partial(cached, params, labels)
    calls[name, "recompute"] = functools.partial(recompute, params, labels)
    calls[name, "one decode step"] = one_decode_step(model, params, labels, cfg_scale)
  # interleaved rounds: load drift on a shared machine hits every path alike
  times = {key: [] for key in calls}
  for _ in range(args.repeats):
    for key, call in calls.items():
      times[key].append(median_seconds(call, 1))
  seconds = {key: float(np.median(t)) for key, t in times.items()}
  c = config.model
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"{args.variant}: {config.data.height}x{config.data.width} codes, width {c.width}, "
        f"depth {c.depth}, Engram at {tuple(c.engram.layers)}; batch {batch}, greedy, "
        f"cfg_scale {cfg_scale}; same codes (cached vs recompute): {same}; median of "
        f"{args.repeats} interleaved rounds")
  for name in ("engram", "baseline"):
    t_cached, t_full = seconds[name, "cached"], seconds[name, "recompute"]
    print(f"{name:8s} cached vs recompute: {t_full / t_cached:.1f}x (cached "
          f"{batch / t_cached:.0f} img/s, recompute {batch / t_full:.0f} img/s)")
  for path in ("cached", "recompute", "one decode step"):
    print(f"Engram / baseline time, {path}: "
          f"{seconds['engram', path] / seconds['baseline', path]:.2f}x (engram "
          f"{1e3 * seconds['engram', path]:.2f} ms, baseline "
          f"{1e3 * seconds['baseline', path]:.2f} ms)")


if __name__ == "__main__":
  main()
