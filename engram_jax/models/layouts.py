"""Block parameters between layouts: the one scanned stack of `models/lm.py`, other
Engram layer plans (baseline <-> Engram at other layers), and the segmented layout of
checkpoints written before the one scan (a scan per run of plain blocks between Engram
layers, Engram blocks whole as `block_{layer}`).

`relayout_params(params, src, dst)` moves a tree between plans (with `src = dst` it
converts a segmented tree); `relayout_like` works on abstract trees, so inference loads
restore either layout (engram_jax.checkpoints); `unstack_blocks` gives per-layer params.
"""
import re
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp

from engram_jax import config as config_lib
from engram_jax.models.lm import run_name, segments

_RUN_NAME = re.compile(r"blocks_(\d+)_(\d+)$")
_LAYER_NAME = re.compile(r"block_(\d+)$")


def _is_block(name: str) -> bool:
  return bool(_RUN_NAME.match(name) or _LAYER_NAME.match(name))


def _take(x, i: int):
  """Layer `i` of a stacked leaf (arrays, or abstract ones for restoring)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def _stack(*xs):
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
  return jnp.stack(xs)


def _layer_params(tree) -> dict[int, dict]:
  """{layer: its block params} of any block layout: `blocks_A_B` stacks are sliced,
  `block_L` entries (Engram params; whole blocks in the segmented layout) merged in."""
  layers: dict[int, dict] = {}
  for name, sub in tree.items():
    if (run := _RUN_NAME.match(name)):
      first, last = int(run[1]), int(run[2])
      for i in range(last - first + 1):
        layers.setdefault(first + i, {}).update(
            jax.tree_util.tree_map(lambda x, i=i: _take(x, i), dict(sub)))
    elif (one := _LAYER_NAME.match(name)):
      layers.setdefault(int(one[1]), {}).update(sub)
  return layers


def unstack_blocks(params, cfg: config_lib.ModelConfig, missing_ok: bool = False) -> list[dict]:
  """Per-layer block params in layer order (scanned runs split, each Engram layer's
  `engram` params merged into its block); reads the segmented layout too.

  `missing_ok`: a block the tree has no entry for is `{}` (the `routing` collection
  holds only the MoE blocks; dense ones, e.g. before `moe.first_dense_layers`, have none).
  """
  layers = _layer_params(params)
  missing = [l for l in range(cfg.depth) if not layers.get(l)]
  if (missing and not missing_ok) or any(l >= cfg.depth for l in layers):
    raise ValueError(f"unstack_blocks: the tree's blocks ({sorted(layers)}) are not the "
                     f"model.depth={cfg.depth} layers of this config")
  return [layers.get(l, {}) for l in range(cfg.depth)]


def stack_blocks(layers: list[dict], cfg: config_lib.ModelConfig) -> dict:
  """The block entries of `cfg`'s layout from per-layer params: one stack per run of
  `segments(cfg)` (a run none of whose layers has entries is left out: MoE `routing`
  has no dense blocks) and `block_{layer}: {"engram": ...}` where layers have one."""
  out = {}
  for first, length in segments(cfg):
    chunk = [{k: v for k, v in layers[l].items() if k != "engram"}
             for l in range(first, first + length)]
    if not any(chunk):
      continue
    if not all(chunk):
      raise ValueError(f"relayout_params: layers {first}..{first + length - 1} are one "
                       "scanned run in the target but only some of them have entries in "
                       "this collection; src and dst must share the MoE layer plan")
    out[run_name(first, length)] = jax.tree_util.tree_map(_stack, *chunk)
  for l in cfg.engram.layers:
    if "engram" in layers[l]:
      out[f"block_{l}"] = {"engram": layers[l]["engram"]}
  return out


def _relayout_collection(tree, src, dst, engram_params: Optional[dict], is_params: bool):
  """One collection of `relayout_params`: params need every block; other collections
  (MoE `routing`) keep the blocks they have."""
  layers = unstack_blocks(tree, src, missing_ok=not is_params)
  if len(layers) != dst.depth:
    raise ValueError(f"relayout_params: src has {src.depth} layers, dst {dst.depth}")
  layers = [{k: v for k, v in p.items() if k != "engram" or l in dst.engram.layers}
            for l, p in enumerate(layers)]
  for l in dst.engram.layers if is_params else ():
    source = engram_params.get(l, layers[l].get("engram"))
    if source is None:
      raise ValueError(f"relayout_params: no Engram params for layer {l}; pass "
                       "engram_params={layer: params} for layers the source lacks")
    layers[l] = {**layers[l], "engram": source}
  return {**{k: v for k, v in tree.items() if not _is_block(k)}, **stack_blocks(layers, dst)}


def relayout_params(params, src: config_lib.ModelConfig, dst: config_lib.ModelConfig,
                    engram_params: Optional[dict] = None):
  """The same backbone weights laid out for `dst`'s Engram layers.

  Engram sub-trees are dropped where `dst` has none; where `dst` has Engram at a layer,
  `engram_params[layer]` (or the source's Engram params at that layer) fill it.
  `params` may be a variables dict (`{"params": ..., "routing": ...}`): every
  collection is laid out for `dst`. With `src = dst` it converts a tree of the
  segmented layout (engram_jax before the one scanned stack) to this one.
  """
  engram_params = dict(engram_params or {})
  if isinstance(params, Mapping) and "params" in params:
    return {name: _relayout_collection(tree, src, dst, engram_params, name == "params")
            for name, tree in params.items()}
  return _relayout_collection(params, src, dst, engram_params, is_params=True)


def segmented_layout(tree) -> bool:
  """Whether a (params-like) tree has the segmented layout of engram_jax before the
  one scanned stack: whole Engram blocks as `block_L` beside shorter `blocks_A_B` runs."""
  return any(_LAYER_NAME.match(name) and set(sub) - {"engram"}
             for name, sub in tree.items() if hasattr(sub, "keys"))


def relayout_like(tree, like):
  """`tree`'s blocks (either layout) in the block layout of `like` (a tree of arrays,
  abstract arrays or checkpoint metadata: only its block names and their keys are
  read); works on abstract trees, so a checkpoint of the other layout restores."""
  layers = _layer_params(tree)
  out = {k: v for k, v in tree.items() if not _is_block(k)}
  for name, want in like.items():
    if (run := _RUN_NAME.match(name)):
      first, last = int(run[1]), int(run[2])
      out[name] = jax.tree_util.tree_map(
          _stack, *[{k: layers[l][k] for k in want} for l in range(first, last + 1)])
    elif (one := _LAYER_NAME.match(name)):
      out[name] = {k: layers[int(one[1])][k] for k in want}
  return out
