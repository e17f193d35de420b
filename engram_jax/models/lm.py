"""EngramLM: a decoder-only Transformer with Engram memory at chosen layers.

embed -> blocks -> RMSNorm -> logits. A block is pre-norm attention + SwiGLU (or, from
`moe.first_dense_layers` on, a DeepSeek-style MoE FFN); an Engram block first adds the
Engram output to its residual stream. Runs of plain blocks between Engram layers (and
the dense/MoE boundary) are one `nn.scan` each, so compile time does not grow with
depth. With `model.branches = M > 1` the residual stream is M branches joined by
hyper-connections (layers/hyper.py).

Hash ids of all Engram layers depend only on the tokens, so they are computed once up
front (or given by the data pipeline as `hash_ids`). Engram hashes the compressed
vocabulary: pass `ngram_tokens` (compressed ids) unless the map is the identity.
"""
from collections.abc import Mapping
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import config as config_lib
from engram_jax import hashing
from engram_jax.layers import moe
from engram_jax.layers.attention import Attention, Mode
from engram_jax.layers.engram import Engram, history_before
from engram_jax.layers.hyper import HyperConnection, collapse_branches, expand_branches
from engram_jax.layers.mlp import SwiGLU
from engram_jax.layers.norms import RMSNorm

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def moe_layer(cfg: config_lib.ModelConfig, name: str = "moe") -> moe.MoE:
  """The MoE FFN of `cfg.moe` (experts over the `expert` mesh axis when it has one)."""
  return moe.MoE(cfg.moe, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                 name=name)


def engram_row_ids(engram: config_lib.EngramConfig, hash_ids_BxTxLxH, index: int):
  """Flat-table row ids `[B, T, H]` of Engram layer `index`: hash ids + head offsets.

  The one place ids become rows: the model's lookup and the row-sparse train step
  (engram_jax.tables) both read them from here. Tokens alone decide them.
  """
  offsets_H = jnp.asarray(engram.hash_spec().offsets_LxH[index].astype(np.int32))
  return hash_ids_BxTxLxH[:, :, index, :] + offsets_H


class Block(nn.Module):
  """Pre-norm block; with `engram_index` set, Engram first adds to the residual.

  layer: the (first) block index, static: it picks SwiGLU or MoE (`moe.is_moe_layer`).
  With hyper-connections (`cfg.hyper_connections`) `h` is `[B, T, M, D]`: attention
  and the FFN are sublayers 2l and 2l+1 wrapped in `HyperConnection`s, while Engram
  reads every branch and adds its per-branch output to that branch (docs/moe.md, "In
  the LM", says why). `layer_offset` (a scanned int, 0 outside `nn.scan`) makes l = layer +
  layer_offset, so scanned blocks get the paper's init (sublayer l reads branch l mod M).
  """
  cfg: config_lib.ModelConfig
  engram_index: Optional[int] = None
  mode: Mode = None
  layer: int = 0
  carried_cache: bool = False  # decode in a scanned run: the cache stacks the run's layers

  @nn.compact
  def __call__(self, h, positions_BxT, hash_ids_BxTxLxH=None, lengths_B=None,
               rope_positions_BxTxA=None, layer_offset=0, masked_BxT=None):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = lambda name: RMSNorm(("embed",), cfg.norm_eps, dtype, pdtype, name=name)
    hyper = cfg.hyper_connections
    if self.engram_index is not None:
      i = self.engram_index
      row_ids_BxTxH = engram_row_ids(cfg.engram, hash_ids_BxTxLxH, i)
      engram = Engram(cfg.engram, cfg.engram.hash_spec().rows(i), cfg.norm_eps, self.mode,
                      dtype, pdtype, name="engram")
      if hyper:
        h = h + engram(h, row_ids_BxTxH, lengths_B, masked_BxT).astype(h.dtype)
      else:
        h = h + engram(h[:, :, None, :], row_ids_BxTxH, lengths_B, masked_BxT)[:, :, 0, :]
    attention = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                          cfg.max_len, cfg.rope_theta, self.mode, dtype, pdtype,
                          name="attention")
    attention_norm = norm("attention_norm")
    if cfg.moe.is_moe_layer(self.layer):
      ffn = moe_layer(cfg)
    else:
      ffn = SwiGLU(cfg.resolved_mlp_dim, dtype, pdtype, name="mlp")
    ffn_norm = norm("mlp_norm")
    sublayers = (
        ("attention", lambda x: attention(
            attention_norm(x), positions_BxT, rope_positions_BxTxA,
            cache_layer=layer_offset if self.carried_cache else None)),
        ("mlp", lambda x: ffn(ffn_norm(x))))
    for j, (name, sublayer) in enumerate(sublayers):
      if hyper:
        index = 2 * (self.layer + layer_offset) + j
        h = HyperConnection(cfg.branches, index, cfg.hyper != "static",
                            norm_eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype,
                            name=f"{name}_hc")(h, sublayer)
      else:
        h = h + sublayer(h)
    return h


class ScanBlock(Block):
  """Block with the (carry, x) -> (carry, y) signature `nn.scan` wants; x = layer offset."""

  def __call__(self, h, layer_offset, positions_BxT,  # pytype: disable=signature-mismatch
               rope_positions_BxTxA=None):
    return super().__call__(h, positions_BxT, rope_positions_BxTxA=rope_positions_BxTxA,
                            layer_offset=layer_offset), None


def segments(cfg: config_lib.ModelConfig) -> list[tuple[str, int, int]]:
  """The layer plan: ("engram", layer, 1) or ("scan", first_layer, run_length).

  Scanned runs stop at Engram layers and at `moe.first_dense_layers` (a run holds
  dense or MoE blocks, never both).
  """
  engram_layers = set(cfg.engram.layers)
  boundaries = {cfg.moe.first_dense_layers} if cfg.moe.enabled else set()
  plan, run_start = [], 0
  for layer in range(cfg.depth + 1):
    if layer == cfg.depth or layer in engram_layers or layer in boundaries:
      if layer > run_start:
        plan.append(("scan", run_start, layer - run_start))
      if layer in engram_layers:
        plan.append(("engram", layer, 1))
        run_start = layer + 1
      else:
        run_start = layer
  return plan


def _maybe_remat(module_cls, cfg, static_argnums=()):
  if cfg.remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False,
                  static_argnums=static_argnums)


def apply_blocks(cfg: config_lib.ModelConfig, h_BxTxD, positions_BxT, hash_ids_BxTxLxH,
                 lengths_B, mode: Mode, rope_positions_BxTxA=None, masked_BxT=None):
  """The layer plan of `segments(cfg)`, run inside the calling module's `nn.compact`.

  Shared by every decoder (EngramLM, the image model) so that they have the same
  parameter layout; `rope_positions_BxTxA` (e.g. 2D (row, column)) defaults to the
  sequence positions. With hyper-connections the embedding is copied into M branches
  first and the branches are summed at the end: `[B, T, D]` in and out. Engram leaves
  positions marked in `masked_BxT` untouched.
  """
  extra = () if rope_positions_BxTxA is None else (rope_positions_BxTxA,)
  h = expand_branches(h_BxTxD, cfg.branches) if cfg.hyper_connections else h_BxTxD
  for kind, first, length in segments(cfg):
    if kind == "engram":
      block = _maybe_remat(Block, cfg)(cfg, engram_index=cfg.engram.layers.index(first),
                                       mode=mode, layer=first, name=f"block_{first}")
      h = block(h, positions_BxT, hash_ids_BxTxLxH, lengths_B, *extra,
                masked_BxT=masked_BxT)
    else:
      # Decoding carries the run's stacked cache through the layer loop (each layer
      # writes its slot in place) instead of scanning over it, which would rebuild the
      # whole [L, B, max_len, ...] stack at every step; same cache layout either way.
      carried = mode == "decode"
      axes = {"params": 0, moe.BIAS: 0, moe.STATS: 0, **({} if carried else {"cache": 0})}
      scanned = nn.scan(
          _maybe_remat(ScanBlock, cfg), variable_axes=axes,
          variable_carry="cache" if carried else False,
          split_rngs={"params": True}, in_axes=(0, nn.broadcast) + (nn.broadcast,) * len(extra),
          length=length, metadata_params={nn.PARTITION_NAME: "layers"})
      h, _ = scanned(cfg, mode=mode, layer=first, carried_cache=carried,
                     name=f"blocks_{first}_{first + length - 1}")(
          h, jnp.arange(length, dtype=jnp.int32), positions_BxT, *extra)
  return collapse_branches(h) if cfg.hyper_connections else h


def as_variables(params_or_variables) -> dict:
  """`{"params": p}` for a parameter tree; a variables dict (has "params") as it is.

  A model with MoE loss-free balancing (`moe.balance="bias"`) also needs its `routing`
  collection wherever it runs, so callers may pass `{"params": p, "routing": r}`.
  """
  if isinstance(params_or_variables, Mapping) and "params" in params_or_variables:
    return dict(params_or_variables)
  return {"params": params_or_variables}


class EngramLM(nn.Module):
  """Logits `[B, T, V]` (float32) for tokens `[B, T]`.

  positions_BxT: absolute positions (default 0..T-1), used by RoPE and the cache.
  ngram_tokens_BxT: compressed-vocabulary ids Engram hashes (default: the tokens).
  hash_ids_BxTxLxH: precomputed row ids (host-side hashing); skips in-graph hashing.
  lengths_B: prompt lengths, "prefill" mode only (where each row's decode state is).
  masked_BxT: non-text positions (DeepSeek-V4.1): Engram adds nothing there; mark them
    in the n-gram tokens too (`hashing.mark_dead`) so no window reaches across them.
  mode: None (full forward), "prefill" or "decode" (see layers/attention.py).
  """
  cfg: config_lib.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, *, positions_BxT=None, ngram_tokens_BxT=None,
               hash_ids_BxTxLxH=None, lengths_B=None, mode: Mode = None, masked_BxT=None):
    cfg = self.cfg
    b, t = tokens_BxT.shape
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cfg.engram.layers and hash_ids_BxTxLxH is None:
      hash_ids_BxTxLxH = self._hash(
          tokens_BxT if ngram_tokens_BxT is None else ngram_tokens_BxT, lengths_B, mode)

    embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ("vocab", "embed")), name="embed")
    h_BxTxD = apply_blocks(cfg, embed(tokens_BxT), positions_BxT, hash_ids_BxTxLxH,
                           lengths_B, mode, masked_BxT=masked_BxT)
    h_BxTxD = RMSNorm(("embed",), cfg.norm_eps, dtype, pdtype, name="final_norm")(h_BxTxD)
    if cfg.tie_embeddings:
      logits = embed.attend(h_BxTxD)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("embed", "vocab")),
                        name="unembed")(h_BxTxD)
    return logits.astype(jnp.float32)

  def engram_hash_ids(self, tokens_BxT, *, ngram_tokens_BxT=None, hash_ids_BxTxLxH=None):
    """The hash ids `[B, T, L, H]` a full forward looks up (given ones pass through);
    `model.apply({}, tokens, method="engram_hash_ids")` computes them outside it."""
    if hash_ids_BxTxLxH is not None:
      return hash_ids_BxTxLxH
    return self._hash(tokens_BxT if ngram_tokens_BxT is None else ngram_tokens_BxT,
                      None, None)

  def _hash(self, ngram_tokens_BxT, lengths_B, mode):
    """In-graph hashing; when caching, keeps the last N-1 tokens as decode state."""
    spec = self.cfg.engram.hash_spec()
    if mode is None:
      return hashing.ngram_hash_ids(ngram_tokens_BxT, spec)
    b = ngram_tokens_BxT.shape[0]
    keep = spec.max_ngram - 1
    pad = jnp.full((b, keep), hashing.PAD_ID, jnp.uint32)
    state = self.variable("cache", "ngram_history", lambda: pad)
    history = pad if mode == "prefill" else state.value
    ids = hashing.ngram_hash_ids(ngram_tokens_BxT, spec, history)
    ext = jnp.concatenate([history, ngram_tokens_BxT.astype(jnp.uint32)], axis=1)
    state.value = history_before(ext, lengths_B, keep)
    return ids


# ----------------------------------------------------------------------------------
# Moving parameters between layer plans (baseline <-> Engram at other layers)
# ----------------------------------------------------------------------------------
def unstack_blocks(params, cfg: config_lib.ModelConfig, missing_ok: bool = False) -> list[dict]:
  """Per-layer block params (scanned runs split), in layer order.

  `missing_ok`: a block the tree has no entry for is `{}` (the `routing` collection
  holds only the MoE blocks; dense ones, e.g. before `moe.first_dense_layers`, have none).
  """
  layers = []
  for kind, first, length in segments(cfg):
    name = f"block_{first}" if kind == "engram" else f"blocks_{first}_{first + length - 1}"
    if missing_ok and name not in params:
      layers.extend({} for _ in range(length))
    elif kind == "engram":
      layers.append(params[name])
    else:
      layers.extend(jax.tree_util.tree_map(lambda x, i=i: x[i], params[name])
                    for i in range(length))
  return layers


def _relayout_collection(tree, src, dst, engram_params: Optional[dict], is_params: bool):
  """One collection of `relayout_params`: params need every block; other collections
  (MoE `routing`) keep the blocks they have and drop the ones that come out empty."""
  layers = unstack_blocks(tree, src, missing_ok=not is_params)
  out = {k: v for k, v in tree.items() if not k.startswith("block")}
  for kind, first, length in segments(dst):
    chunk = [{k: v for k, v in layers[l].items() if k != "engram"}
             for l in range(first, first + length)]
    if kind == "engram" and is_params:
      source = engram_params.get(first, layers[first].get("engram"))
      if source is None:
        raise ValueError(f"relayout_params: no Engram params for layer {first}; pass "
                         "engram_params={layer: params} for layers the source lacks")
      out[f"block_{first}"] = {**chunk[0], "engram": source}
    elif not any(chunk):
      continue  # e.g. no routing biases in dense blocks
    elif kind == "engram":
      out[f"block_{first}"] = chunk[0]
    elif all(chunk):
      out[f"blocks_{first}_{first + length - 1}"] = jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs), *chunk)
    else:
      raise ValueError(f"relayout_params: layers {first}..{first + length - 1} are one "
                       "scanned run in the target but only some of them have entries in "
                       "this collection; src and dst must share the MoE layer plan")
  return out


def relayout_params(params, src: config_lib.ModelConfig, dst: config_lib.ModelConfig,
                    engram_params: Optional[dict] = None):
  """The same backbone weights laid out for `dst`'s Engram layers.

  Engram sub-trees are dropped where `dst` has none; where `dst` has Engram at a layer,
  `engram_params[layer]` (or the source's Engram params at that layer) fill it.
  `params` may be a variables dict (`{"params": ..., "routing": ...}`): every
  collection is laid out for `dst`.
  """
  engram_params = dict(engram_params or {})
  if isinstance(params, Mapping) and "params" in params:
    return {name: _relayout_collection(tree, src, dst, engram_params, name == "params")
            for name, tree in params.items()}
  return _relayout_collection(params, src, dst, engram_params, is_params=True)
