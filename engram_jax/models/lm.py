"""EngramLM: a decoder-only Transformer with Engram memory at chosen layers.

embed -> blocks -> RMSNorm -> logits. A block is pre-norm attention + SwiGLU (or, from
`moe.first_dense_layers` on, a DeepSeek-style MoE FFN); an Engram block first adds the
Engram output to its residual stream. All blocks are one `nn.scan` (`blocks_0_{L-1}`;
two at the dense/MoE boundary), Engram layers included, so compile time grows neither
with depth nor with the number of Engram layers: each Engram layer's params
(`block_{layer}/engram`) and the rows its tokens read are gathered before the scan and
stacked over the Engram layers, and a scanned layer with Engram picks its slot under a
`lax.cond` (`engram_step`). With `model.branches = M > 1` the residual stream is M
branches joined by hyper-connections (layers/hyper.py).

Checkpoints written before the one scan have the segmented layout (a scan per run of
plain blocks between Engram layers, Engram blocks whole as `block_{layer}`):
`models/layouts.py` converts them (`relayout_params(params, cfg, cfg)`), and inference
loads do it for themselves (engram_jax.checkpoints).

Hash ids of all Engram layers depend only on the tokens, so they are computed once up
front (or given by the data pipeline as `hash_ids`). Engram hashes the compressed
vocabulary: pass `ngram_tokens` (compressed ids) unless the map is the identity.
"""
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import config as config_lib
from engram_jax import hashing
from engram_jax.layers import moe
from engram_jax.layers.attention import Attention, Mode
from engram_jax.layers.engram import ROWS_COLLECTION, Engram, history_before
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

  The model scans blocks without `engram_index` (`ScanBlock` adds Engram itself, via
  `engram_step`); a block with it is one layer as `layouts.unstack_blocks` gives it, for
  analyses that run layers one at a time (same params, same result).
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


class Memory(NamedTuple):
  """A scanned run's Engram layers, stacked over them (L = the run's Engram layers):
  what each layer's `engram_step` reads. params: their Engram params without the
  tables; rows: the rows their tokens read, gathered before the scan."""
  params: Any
  rows_LxBxTxHxE: jax.Array
  lengths_B: Optional[jax.Array] = None
  masked_BxT: Optional[jax.Array] = None


def engram_step(cfg: config_lib.ModelConfig, mode: Mode, h, slot, memory: Memory,
                conv_history_LxBxPxMD=None):
  """(h + Engram's output, conv histories) for a scanned layer whose Engram is `slot`
  of `memory`; (h, histories) when `slot` < 0. A `lax.cond`: plain layers pay no
  Engram compute, and the scan body holds one Engram program whatever their number.
  The cond is rematerialised: the scan saves its inputs (`memory` once, as the
  loop invariant it is), not the branch's intermediates, which it would otherwise keep
  for every layer (zeros for plain ones) and with them a copy of `memory` per layer.
  So is the Engram branch inside it: recomputing the cond for the backward then needs
  only the branch's inputs, so the plain branch fills in zeros for a few small arrays
  rather than for every Engram intermediate (each a kernel: 318 -> 301 kernels in
  `tiny`'s train step, docs/benchmarks.md "Compile time").

  conv_history_LxBxPxMD ("prefill"/"decode" with a conv): each Engram layer's conv
  state; the layer reads (decode) and replaces its slot.
  """
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  layer = Engram(cfg.engram, 0, cfg.norm_eps, mode, dtype, pdtype, parent=None)  # unbound

  def with_engram(h, history):
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, slot, keepdims=False)
    variables = {"params": jax.tree_util.tree_map(pick, memory.params)}
    if mode == "decode" and history is not None:
      variables["cache"] = {"conv_history": pick(history)}
    h_BxTxMxD = h if cfg.hyper_connections else h[:, :, None, :]
    y, state = layer.apply(variables, h_BxTxMxD, None, memory.lengths_B, memory.masked_BxT,
                           rows_BxTxHxE=pick(memory.rows_LxBxTxHxE), mutable=["cache"])
    if history is not None:
      history = jax.lax.dynamic_update_index_in_dim(
          history, state["cache"]["conv_history"].astype(history.dtype), slot, 0)
    return (h + y.astype(h.dtype) if cfg.hyper_connections else h + y[:, :, 0, :]), history

  return jax.checkpoint(lambda h, history: jax.lax.cond(
      slot >= 0, jax.checkpoint(with_engram), lambda h, history: (h, history), h, history))(
          h, conv_history_LxBxPxMD)


class ScanBlock(Block):
  """Block with the (carry, x) -> (carry, y) signature `nn.scan` wants.

  carry: (h, the run's Engram conv histories or None); x: (layer offset, Engram slot
  of the layer in `memory` or -1); memory (broadcast): the run's Engram layers, None
  when it has none.
  """

  def __call__(self, carry, xs, positions_BxT,  # pytype: disable=signature-mismatch
               memory: Optional[Memory] = None, rope_positions_BxTxA=None):
    (h, history), (layer_offset, slot) = carry, xs
    if memory is not None:
      h, history = engram_step(self.cfg, self.mode, h, slot, memory, history)
    h = super().__call__(h, positions_BxT, rope_positions_BxTxA=rope_positions_BxTxA,
                         layer_offset=layer_offset)
    return (h, history), None


class EngramMemory(nn.Module):
  """Engram layer `index`'s params and the rows its tokens read, outside the scan.

  Named `block_{layer}`, so the params keep their paths (`block_{layer}/engram/table`,
  what tables, offload and probes address); the scanned blocks run the layer with
  them (`engram_step`). Its conv's decode state lives at `block_{layer}/engram` too.
  """
  cfg: config_lib.ModelConfig
  index: int

  def setup(self):
    cfg = self.cfg
    self.engram = Engram(cfg.engram, cfg.engram.hash_spec().rows(self.index), cfg.norm_eps,
                         None, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))

  def __call__(self, row_ids_BxTxH):
    """(params without the table, rows `[B, T, H, E]`: `ROWS_COLLECTION`'s or the table's)."""
    cfg = self.cfg
    if self.is_initializing():  # a one-token call creates the params
      self.engram(jnp.zeros((1, 1, cfg.branches, cfg.width), jnp.dtype(cfg.dtype)),
                  row_ids_BxTxH[:1, :1])
    params = dict(nn.unbox(self.engram.variables.get("params", {})))
    rows_BxTxHxE = self.engram.given_rows(row_ids_BxTxH)
    if rows_BxTxHxE is None:
      if "table" not in params:
        raise ValueError(f"{self.name}/engram has no table param and no {ROWS_COLLECTION} "
                         "rows were given: pass the table, or the rows it would read")
      rows_BxTxHxE = self.engram.lookup(params["table"], row_ids_BxTxH)
    return {k: v for k, v in params.items() if k != "table"}, rows_BxTxHxE

  def conv_history(self, default):
    return self.engram.get_variable("cache", "conv_history", default)

  def keep_conv_history(self, history_BxPxMD):
    self.engram.put_variable("cache", "conv_history", history_BxPxMD)


def segments(cfg: config_lib.ModelConfig) -> list[tuple[int, int]]:
  """The scanned runs, (first_layer, length): every block in one, split only at
  `moe.first_dense_layers` (a run holds dense or MoE blocks, never both)."""
  boundary = cfg.moe.first_dense_layers if cfg.moe.enabled else 0
  if 0 < boundary < cfg.depth:
    return [(0, boundary), (boundary, cfg.depth - boundary)]
  return [(0, cfg.depth)]


def run_name(first: int, length: int) -> str:
  return f"blocks_{first}_{first + length - 1}"


def _maybe_remat(module_cls, cfg, static_argnums=()):
  if cfg.remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False,
                  static_argnums=static_argnums)


def _run_memory(cfg, layers, hash_ids_BxTxLxH, lengths_B, masked_BxT, mode):
  """(the run's `Memory`, its stacked conv histories or None, its `EngramMemory`s) for
  the Engram `layers` of one run; gathers their rows (before the scan)."""
  e = cfg.engram
  memories = [EngramMemory(cfg, e.layers.index(l), name=f"block_{l}") for l in layers]
  params, rows = zip(*(m(engram_row_ids(e, hash_ids_BxTxLxH, m.index)) for m in memories))
  stack = lambda *xs: jnp.stack(xs)
  memory = Memory(jax.tree_util.tree_map(stack, *params), jnp.stack(rows), lengths_B,
                  masked_BxT)
  history = None
  if mode is not None and e.variant != "v4":  # the conv's decode state
    zeros = jnp.zeros((rows[0].shape[0], (e.kernel_size - 1) * e.max_ngram,
                       cfg.branches * cfg.width), jnp.dtype(cfg.dtype))
    history = jnp.stack([m.conv_history(zeros) if mode == "decode" else zeros
                         for m in memories])
  return memory, history, memories


def apply_blocks(cfg: config_lib.ModelConfig, h_BxTxD, positions_BxT, hash_ids_BxTxLxH,
                 lengths_B, mode: Mode, rope_positions_BxTxA=None, masked_BxT=None):
  """The runs of `segments(cfg)`, run inside the calling module's `nn.compact`.

  Shared by every decoder (EngramLM, the image model) so that they have the same
  parameter layout; `rope_positions_BxTxA` (e.g. 2D (row, column)) defaults to the
  sequence positions. With hyper-connections the embedding is copied into M branches
  first and the branches are summed at the end: `[B, T, D]` in and out. Engram leaves
  positions marked in `masked_BxT` untouched.
  """
  extra = () if rope_positions_BxTxA is None else (rope_positions_BxTxA,)
  h = expand_branches(h_BxTxD, cfg.branches) if cfg.hyper_connections else h_BxTxD
  for first, length in segments(cfg):
    layers = [l for l in range(first, first + length) if l in cfg.engram.layers]
    memory, history, memories = None, None, []
    if layers:
      memory, history, memories = _run_memory(cfg, layers, hash_ids_BxTxLxH, lengths_B,
                                              masked_BxT, mode)
    slots = np.array([layers.index(l) if l in layers else -1
                      for l in range(first, first + length)], np.int32)
    # Decoding carries the run's stacked cache through the layer loop (each layer
    # writes its slot in place) instead of scanning over it, which would rebuild the
    # whole [L, B, max_len, ...] stack at every step; same cache layout either way.
    carried = mode == "decode"
    axes = {"params": 0, moe.BIAS: 0, moe.STATS: 0, **({} if carried else {"cache": 0})}
    scanned = nn.scan(
        _maybe_remat(ScanBlock, cfg), variable_axes=axes,
        variable_carry="cache" if carried else False,
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast) + (nn.broadcast,) * len(extra),
        length=length, metadata_params={nn.PARTITION_NAME: "layers"})
    (h, history), _ = scanned(cfg, mode=mode, layer=first, carried_cache=carried,
                              name=run_name(first, length))(
        (h, history), (jnp.arange(length, dtype=jnp.int32), jnp.asarray(slots)),
        positions_BxT, memory, *extra)
    for s, m in enumerate(memories if history is not None else ()):
      m.keep_conv_history(history[s])
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
