"""Typed model configuration and its validation.

`configs/*.py` build `ml_collections.ConfigDict`s for the command line; `from_dict`
turns their `model` part into these frozen dataclasses, which are hashable (so they can
be static under `jit`) and validated before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Union

from engram_jax import hashing, spatial_hashing

GateMode = Union[str, float]
_GATE_NAMES = ("learned", "off")
_REMAT = ("none", "full", "dots")
_DTYPES = ("float32", "bfloat16", "float16")
LOOKUPS = ("gather", "psum", "all_to_all")
PLACEMENTS = ("device", "host", "disk")
VARIANTS = ("paper", "v4")
HYPER = ("auto", "dynamic", "static", "none")
# MoEConfig's allowed values (validate_moe checks them; layers/moe.py reads the config)
SCORE_FNS = ("sigmoid", "softmax")
BALANCE = ("aux_loss", "bias", "none")
DISPATCH = ("sort", "one_hot")
GROUP_MATMULS = ("auto", "ragged_dot", "tiles")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Where Engram sits and how its memory is hashed, stored and fused."""
  layers: tuple[int, ...] = ()         # block indices with Engram; () = baseline
  max_ngram: int = 3                   # N: orders 2..N are hashed
  heads: int = 4                       # K hash heads per order
  embed_per_ngram: int = 64            # width of one order's lookup (K * head_dim)
  table_size: tuple[int, ...] = (10007,)  # min rows per head table, per order (or one for all)
  kernel_size: int = 4                 # short causal conv taps (dilation = max_ngram)
  gate: GateMode = "learned"           # "learned" | "off" | constant in [0, 1]
  table_trainable: bool = True
  table_init_std: float = 1.0
  seed: int = 0
  lookup: str = "gather"               # "gather" | "psum" | "all_to_all" (docs/sharding.md)
  table_row_multiple: int = 512        # pad each layer's table rows to a multiple (sharding)
  placement: str = "device"            # "device" | "host" (host RAM, training too) | "disk"
  # Images only: causal (dy, dx) neighbours; order n hashes the first n (docs/vision.md).
  stencil: tuple[tuple[int, int], ...] = spatial_hashing.DEFAULT_STENCIL
  # "engram_jax" (uint32, per-head multipliers) | "published" (the reference's int64
  # hash, bit for bit; needs the two fields below). docs/hashing.md, docs/v4.md.
  hash: str = "engram_jax"
  # "paper": W_V shared, W_K per branch, short conv | "v4": DeepSeek-V4.1's layer, one
  # projection to M keys + one value, no conv (layers/engram.py, docs/v4.md).
  variant: str = "paper"
  compressed_vocab_size: int = 0       # published: size of the compressed vocabulary
  pad_id: int = 0                      # published: compressed id that pads windows

  @property
  def head_dim(self) -> int:
    return self.embed_per_ngram // self.heads

  @property
  def orders(self) -> int:
    return self.max_ngram - 1

  @property
  def features(self) -> int:
    """Width of the concatenated lookup e_t: (N-1) * K * head_dim."""
    return self.orders * self.embed_per_ngram

  def min_rows_per_order(self) -> tuple[int, ...]:
    sizes = tuple(self.table_size)
    return sizes * self.orders if len(sizes) == 1 else sizes

  def padded_rows(self, rows: int) -> int:
    """Rows of the stored table: `rows` rounded up so that any mesh dividing
    `table_row_multiple` (every power of two up to it, by default) splits it evenly.
    Rows past `rows` are never addressed by a hash id."""
    return -(-rows // self.table_row_multiple) * self.table_row_multiple

  def hash_spec(self) -> hashing.HashSpec:
    return hashing.make_hash_spec(tuple(self.layers), self.max_ngram, self.heads,
                                  self.min_rows_per_order(), self.seed, self.hash,
                                  self.compressed_vocab_size, self.pad_id)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeek-style MoE FFN (layers/moe.py, docs/moe.md); num_experts 0 = dense."""
  num_experts: int = 0                 # routed experts E; 0 = SwiGLU in every block
  expert_dim: int = 0                  # hidden width F of one routed expert
  top_k: int = 2                       # routed experts per token
  num_shared: int = 0                  # always-on experts
  shared_dim: int = 0                  # hidden width of one shared expert; 0 = expert_dim
  score_fn: str = "sigmoid"            # "sigmoid" (DeepSeek-V3) | "softmax" (V2)
  normalize_weights: bool = True
  routed_scale: float = 1.0
  balance: str = "aux_loss"            # "aux_loss" | "bias" (loss-free) | "none"
  aux_loss_coef: float = 1e-3
  bias_rate: float = 1e-3              # balance="bias": per-step bias update
  capacity_factor: float = 0.0         # 0 = dropless; > 0 = [E, C] buffers, overflow dropped
  first_dense_layers: int = 0          # the first k blocks keep the dense SwiGLU (DeepSeek)
  dispatch: str = "sort"               # "sort" | "one_hot" (dense reference, tests only)
  group_matmul: str = "auto"           # dropless grouped matmul: "auto" | "ragged_dot" | "tiles"
  tile: int = 128

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0

  @property
  def resolved_shared_dim(self) -> int:
    return self.shared_dim or self.expert_dim

  def is_moe_layer(self, layer: int) -> bool:
    return self.enabled and layer >= self.first_dense_layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only backbone; `engram.layers = ()` gives the plain baseline."""
  vocab_size: int = 256
  width: int = 64                      # d_model
  depth: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0                    # 0 = width // num_heads
  mlp_dim: int = 0                     # 0 = 4 * width (SwiGLU hidden)
  max_len: int = 256                   # longest sequence (KV cache size)
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"               # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"                  # "none" | "full" | "dots"
  branches: int = 1                    # M residual streams (hyper-connections)
  hyper: str = "auto"                  # "auto": dynamic HC when branches > 1, plain at 1;
                                       # "dynamic" | "static": HC at any M; "none": plain
  engram: EngramConfig = EngramConfig()
  moe: MoEConfig = MoEConfig()

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  @property
  def resolved_mlp_dim(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def hyper_connections(self) -> bool:
    """Whether blocks wrap their sublayers in hyper-connections (layers/hyper.py)."""
    return self.hyper in ("dynamic", "static") or (self.hyper == "auto" and self.branches > 1)


def residual_branches(cfg: ModelConfig) -> int:
  """M: the residual streams the blocks (and Engram) see."""
  return cfg.branches if cfg.hyper_connections else 1


def engram_layer_weights(cfg: ModelConfig) -> tuple[int, int]:
  """(parameters, weights a token multiplies by) of one Engram layer besides its table,
  from the config alone: W_V, W_K per branch, the hidden/key/conv norms and the conv
  (v4: one projection to M keys and the value, two norms, no conv). Parameter counts
  (engram_jax.allocation, the image model's) and FLOP counts share it."""
  e, d, branches = cfg.engram, cfg.width, residual_branches(cfg)
  learned = gate_constant(e.gate) is None
  if e.variant == "v4":
    matmul, norms, conv = e.features * d * (branches + 1), branches * d * 2 * learned, 0
  else:
    matmul = e.features * d * (1 + (branches if learned else 0))
    norms, conv = branches * d * (3 if learned else 1), e.kernel_size * branches * d
  return matmul + norms + conv, matmul + conv


def hyper_connection_counts(cfg: ModelConfig) -> tuple[int, int]:
  """(parameters, FLOPs per token) of every block's two hyper-connections; (0, 0)
  without them."""
  if not cfg.hyper_connections:
    return 0, 0
  d, branches = cfg.width, cfg.branches
  params = 2 * branches + branches * branches
  flops = 2 * (2 * branches * d + branches * branches * d)
  if cfg.hyper != "static":
    params += d * (branches + 2) + d + 2
    flops += 2 * branches * d * (branches + 2)
  return 2 * cfg.depth * params, 2 * cfg.depth * flops


def _fail(field: str, got: Any, allowed: str) -> None:
  raise ValueError(f"{field}={got!r} is invalid: {allowed}")


def validate_gate(gate: GateMode) -> None:
  if isinstance(gate, str):
    if gate not in _GATE_NAMES:
      try:
        float(gate)
      except ValueError:
        _fail("engram.gate", gate, "use 'learned', 'off' or a constant in [0, 1]")
      else:
        validate_gate(float(gate))
    return
  if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 <= gate <= 1.0:
    _fail("engram.gate", gate, "use 'learned', 'off' or a constant in [0, 1]")


def gate_constant(gate: GateMode) -> float | None:
  """The fixed gate value, or None for a learned gate."""
  if gate == "learned":
    return None
  if gate == "off":
    return 0.0
  return float(gate)


def validate(cfg: ModelConfig) -> ModelConfig:
  """Raises ValueError naming the first invalid field and what it accepts."""
  for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "max_len",
               "branches"):
    if getattr(cfg, name) < 1:
      _fail(f"model.{name}", getattr(cfg, name), "must be >= 1")
  if cfg.head_dim == 0 and cfg.width % cfg.num_heads:
    _fail("model.num_heads", cfg.num_heads,
          f"must divide model.width={cfg.width} (or set model.head_dim)")
  if cfg.num_heads % cfg.num_kv_heads:
    _fail("model.num_kv_heads", cfg.num_kv_heads,
          f"must divide model.num_heads={cfg.num_heads} (grouped-query attention)")
  if cfg.resolved_head_dim % 2:
    _fail("model.head_dim", cfg.resolved_head_dim, "must be even (RoPE rotates pairs)")
  if cfg.hyper not in HYPER:
    _fail("model.hyper", cfg.hyper, f"choose one of {HYPER}")
  if cfg.hyper == "none" and cfg.branches != 1:
    _fail("model.hyper", cfg.hyper,
          f"model.branches={cfg.branches} needs hyper-connections; use 'auto', 'dynamic' "
          "or 'static', or set model.branches=1")
  if cfg.remat not in _REMAT:
    _fail("model.remat", cfg.remat, f"choose one of {_REMAT}")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in _DTYPES:
      _fail(f"model.{name}", getattr(cfg, name), f"choose one of {_DTYPES}")
  validate_moe(cfg.moe, cfg.depth)

  e = cfg.engram
  if e.max_ngram < 2:
    _fail("engram.max_ngram", e.max_ngram, "must be >= 2 (orders 2..max_ngram are hashed)")
  if e.heads < 1:
    _fail("engram.heads", e.heads, "must be >= 1")
  if e.embed_per_ngram < 1 or e.embed_per_ngram % e.heads:
    _fail("engram.embed_per_ngram", e.embed_per_ngram,
          f"must be a positive multiple of engram.heads={e.heads}")
  if e.kernel_size < 1:
    _fail("engram.kernel_size", e.kernel_size, "must be >= 1")
  if len(set(e.layers)) != len(e.layers):
    _fail("engram.layers", e.layers, "must not repeat a layer")
  for layer in e.layers:
    if not 0 <= layer < cfg.depth:
      _fail("engram.layers", e.layers,
            f"every index must be in [0, model.depth={cfg.depth})")
  sizes = tuple(e.table_size)
  if len(sizes) not in (1, e.orders):
    _fail("engram.table_size", sizes,
          f"give one size or one per order ({e.orders} for max_ngram={e.max_ngram})")
  for size in sizes:
    if size < e.heads:
      _fail("engram.table_size", sizes,
            f"every size must be >= engram.heads={e.heads} rows")
  validate_gate(e.gate)
  if e.layers:
    hashing.check_layer_rows(e.hash_spec())
  if e.table_init_std <= 0:
    _fail("engram.table_init_std", e.table_init_std, "must be > 0")
  if e.placement not in PLACEMENTS:
    _fail("engram.placement", e.placement, f"choose one of {PLACEMENTS}")
  if e.lookup not in LOOKUPS:
    _fail("engram.lookup", e.lookup, f"choose one of {LOOKUPS}")
  if e.variant not in VARIANTS:
    _fail("engram.variant", e.variant, f"choose one of {VARIANTS}")
  if e.hash not in hashing.HASH_MODES:
    _fail("engram.hash", e.hash, f"choose one of {hashing.HASH_MODES}")
  if e.hash == "published":
    if e.compressed_vocab_size < 1:
      _fail("engram.compressed_vocab_size", e.compressed_vocab_size,
            "engram.hash='published' needs the compressed vocabulary's size (>= 1)")
    if not 0 <= e.pad_id < e.compressed_vocab_size:
      _fail("engram.pad_id", e.pad_id,
            f"must be a compressed id in [0, engram.compressed_vocab_size="
            f"{e.compressed_vocab_size})")
  if isinstance(e.table_row_multiple, bool) or e.table_row_multiple < 1:
    _fail("engram.table_row_multiple", e.table_row_multiple,
          "must be >= 1 (a multiple of the number of table shards; 1 = no padding)")
  return cfg


def _finite_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def validate_moe(m: MoEConfig, depth: int | None = None) -> MoEConfig:
  """The `moe` section; with num_experts 0 only the sign of the fields is checked.

  depth: the model's depth, to check `first_dense_layers` (None: not checked).
  """
  for name in ("num_experts", "expert_dim", "num_shared", "shared_dim", "first_dense_layers"):
    value = getattr(m, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      _fail(f"moe.{name}", value, "must be an integer >= 0")
  for name in ("aux_loss_coef", "bias_rate", "capacity_factor", "routed_scale"):
    value = getattr(m, name)
    if not _finite_number(value) or value < 0:
      _fail(f"moe.{name}", value, "must be a finite number >= 0")
  if not m.enabled:
    return m
  if m.expert_dim < 1:
    _fail("moe.expert_dim", m.expert_dim,
          "must be >= 1 when moe.num_experts > 0 (the hidden width of one routed expert)")
  if not 1 <= m.top_k <= m.num_experts:
    _fail("moe.top_k", m.top_k, f"must be in [1, moe.num_experts={m.num_experts}]")
  if depth is not None and m.first_dense_layers >= depth:
    _fail("moe.first_dense_layers", m.first_dense_layers,
          f"must be < model.depth={depth} (or set moe.num_experts=0 for a dense model)")
  for name, allowed in (("score_fn", SCORE_FNS), ("balance", BALANCE),
                        ("dispatch", DISPATCH), ("group_matmul", GROUP_MATMULS)):
    if getattr(m, name) not in allowed:
      _fail(f"moe.{name}", getattr(m, name), f"choose one of {allowed}")
  if m.tile < 1:
    _fail("moe.tile", m.tile, "must be >= 1 (rows per block of the tiled grouped matmul)")
  return m


def _as_tuple(value: Any, field: str = "value") -> tuple:
  """Integers from a tuple/list or a "1,3" string (command-line overrides)."""
  try:
    if isinstance(value, str):
      return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):
      return (int(value),)
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{field}={value!r} is invalid: give integers, e.g. '1,3'") from None


def _as_pairs(value: Any) -> tuple[tuple[int, int], ...]:
  """(dy, dx) pairs from pairs or a "dy,dx;dy,dx" string (command-line overrides)."""
  if isinstance(value, str):
    value = [pair.split(",") for pair in value.split(";") if pair.strip()]
  try:
    return tuple((int(dy), int(dx)) for dy, dx in value)
  except (TypeError, ValueError) as err:
    raise ValueError(f"engram.stencil={value!r} is invalid: give (dy, dx) integer pairs "
                     f"or a string such as '0,-1;-1,0;-1,-1'") from err


def from_dict(model: Mapping[str, Any]) -> ModelConfig:
  """Builds and validates a ModelConfig from a (ConfigDict-like) mapping.

  Unknown fields are errors; list fields accept "1,3" strings (command-line overrides).
  """
  model = dict(model)
  engram = dict(model.pop("engram", {}) or {})
  moe = dict(model.pop("moe", {}) or {})
  for name, fields, value in (("model", ModelConfig, model), ("engram", EngramConfig, engram),
                              ("moe", MoEConfig, moe)):
    known = {f.name for f in dataclasses.fields(fields)}
    unknown = sorted(set(value) - known)
    if unknown:
      raise ValueError(f"{name}.{unknown[0]} is not a known field; known: {sorted(known)}")
  for key in ("layers", "table_size"):
    if key in engram:
      engram[key] = _as_tuple(engram[key], f"engram.{key}")
  if "stencil" in engram:
    engram["stencil"] = _as_pairs(engram["stencil"])
  if "gate" in engram and isinstance(engram["gate"], str) and engram["gate"] not in _GATE_NAMES:
    validate_gate(engram["gate"])
    engram["gate"] = float(engram["gate"])
  return validate(ModelConfig(**model, engram=EngramConfig(**engram), moe=MoEConfig(**moe)))


def to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """Inverse of `from_dict` (JSON-friendly), stored beside checkpoints."""
  out = dataclasses.asdict(cfg)
  out["engram"]["layers"] = list(cfg.engram.layers)
  out["engram"]["table_size"] = list(cfg.engram.table_size)
  out["engram"]["stencil"] = [list(pair) for pair in cfg.engram.stencil]
  return out

