"""Cached image sampling: prefill the class token, then one `lax.scan` over the cells.

The KV cache, the Engram canvas (cells generated so far, which the 2D hash reads) and
the Engram conv history live in the model's `cache` collection, so each step runs the
model on one position. Classifier-free guidance doubles the batch: rows `[0, B)` carry
the class token, rows `[B, 2B)` the null class, and the sampled logits are
`uncond + cfg_scale * (cond - uncond)`; `cfg_scale` 0 or 1 means no guidance (plain
conditional sampling, batch not doubled).
"""
import jax
import jax.numpy as jnp

from engram_jax.generate import sample
from engram_jax.models.image import ImageARModel


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
  """Runs the class token (and any known first cells); logits `[B, T, C]`, cache."""
  logits, variables = model.apply({"params": params}, inputs_BxT, mode="prefill",
                                  mutable=["cache"])
  return logits, variables["cache"]


def decode_step(model: ImageARModel, params, cache, cell_B, position_B):
  """Feeds cell `position - 1` at `position`; logits `[B, C]` for cell `position`."""
  logits, variables = model.apply(
      {"params": params, "cache": cache}, cell_B[:, None], positions_BxT=position_B[:, None],
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
  first_BxPxC, cache = prefill(model, params, inputs_BxT[:, :prefill_len])

  def step(cache, inputs):
    cell_B, position = inputs
    logits_BxC, cache = decode_step(model, params, cache, cell_B,
                                    jnp.full((b,), position, jnp.int32))
    return cache, logits_BxC

  positions = jnp.arange(prefill_len, t, dtype=jnp.int32)
  _, rest_SxBxC = jax.lax.scan(step, cache, (inputs_BxT[:, prefill_len:].T, positions))
  logits_BxTxC = jnp.concatenate([first_BxPxC, jnp.swapaxes(rest_SxBxC, 0, 1)], axis=1)
  return guide(logits_BxTxC, cfg_scale) if guided else logits_BxTxC


def generate_images(model: ImageARModel, params, labels_B, rng, *, cfg_scale: float = 0.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Codes `[B, H, W]` sampled in raster order; label `num_classes` is unconditional.

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
  codes_BxHW = jnp.concatenate([first_B[:, None], rest_SxB.T], axis=1)
  return codes_BxHW.reshape(-1, g.height, g.width)
