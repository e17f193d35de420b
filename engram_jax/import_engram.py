"""DeepSeek-V4.1's Engram: its layout from `config.json`, its tables from safetensors.

  python -m engram_jax.import_engram --config=CONFIG.json [--tokenizer=DIR]
      [--safetensors=DIR]

Reads the V4.1 config (flat, or nested under `text_config`), derives the published
layout (`hashing.published_layout`: distinct primes, per-head offsets, rows per layer)
and checks it against the declared `engram_num_embeddings`. With `--tokenizer` it
builds the published compressed vocabulary and checks its size against
`engram_compressed_vocab_size` (every multiplier depends on it). With `--safetensors`
it maps each Engram layer's FP8 table, `layers.{L}.engram.embed.weight` (F8_E4M3,
`[rows, head_dim]`) and `.scale` (F8_E8M0, `[rows, head_dim / 32]`), from the files'
headers, read with NumPy memory maps: rows are read when looked up, never the whole
file; when the files also hold `engram.wkv` / `q_weight` / `k_weight`, it loads them
as our v4 layer's params. Any inconsistency is a one-line error (exit status 2).

`load(...)` is the Python entry: an `EngramConfig` (published hash, v4 variant) and
`fp8.Fp8Table`s that `V41Engram.rows` (or `host_tables.HostTables`) gather from.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
import sys
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np

from engram_jax import cli
from engram_jax import config as config_lib
from engram_jax import fp8
from engram_jax import compressed_vocab, hashing

_SAFETENSORS_DTYPES = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(np.uint8),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64), "F64": np.dtype(np.float64)}
_REQUIRED = ("engram_layer_ids", "engram_max_ngram_size", "engram_n_heads",
             "engram_head_dim", "engram_vocab_size", "engram_compressed_vocab_size")


class CheckpointError(ValueError):
  """A one-line reason the checkpoint cannot be used as declared."""


# ----------------------------------------------------------------------------------
# config.json -> layout
# ----------------------------------------------------------------------------------
def read_config(path: str) -> dict[str, Any]:
  """The Engram fields of a V4.1 config.json (flat or under `text_config`)."""
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as err:
    raise CheckpointError(f"--config={path}: cannot read JSON ({err})") from None
  text = raw.get("text_config", raw) if isinstance(raw, dict) else None
  if not isinstance(text, dict):
    raise CheckpointError(f"--config={path}: not a JSON object"
                          f"{' (text_config)' if isinstance(raw, dict) else ''}; give a "
                          "DeepSeek-V4.1 config.json")
  missing = [k for k in _REQUIRED if k not in text]
  if missing:
    raise CheckpointError(f"--config={path}: no {missing[0]} (not a DeepSeek-V4.1 config "
                       f"with Engram?)")
  _check_fields(text, path)
  return text


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(text: dict[str, Any], path: str) -> None:
  """The Engram fields' types and ranges, each a one-line error naming the field (they
  were a TypeError deep in the layout, or silently a layout of nonsense)."""
  def bad(key: str, want: str):
    raise CheckpointError(f"--config={path}: {key}={json.dumps(text[key])[:60]} is "
                          f"invalid: {want}")
  for key, low in (("engram_max_ngram_size", 2), ("engram_n_heads", 1),
                   ("engram_head_dim", 1), ("engram_compressed_vocab_size", 1),
                   ("engram_seed", 0), ("engram_pad_token_id", 0)):
    if key in text and not (_is_int(text[key]) and text[key] >= low):
      bad(key, f"use an integer >= {low}")
  layers = text["engram_layer_ids"]
  if not (isinstance(layers, list) and layers and all(_is_int(l) and l >= 0 for l in layers)
          and len(set(layers)) == len(layers)):
    bad("engram_layer_ids", "use a list of distinct layer indices >= 0")
  orders = text["engram_max_ngram_size"] - 1
  vocab = text["engram_vocab_size"]
  sizes = vocab if isinstance(vocab, list) else [vocab]
  if not (all(_is_int(v) and v >= 2 for v in sizes) and len(sizes) in (1, orders)):
    bad("engram_vocab_size", f"use an integer >= 2, or a list of {orders} (one per "
        f"n-gram order 2..{orders + 1})")
  declared = text.get("engram_num_embeddings")
  if declared is not None:
    rows = declared if isinstance(declared, list) else [declared]
    if not (all(_is_int(r) and r >= 1 for r in rows) and len(rows) == len(layers)):
      bad("engram_num_embeddings", f"use a list of {len(layers)} row counts, one per "
          "Engram layer")


# The pad token when a config has no `engram_pad_token_id`: the default of V4.1's model
# arguments in the public ports (V4.1-Flash's config sets the same).
DEFAULT_PAD_TOKEN = 2


def engram_config(text: dict[str, Any], pad_id: int = 0) -> config_lib.EngramConfig:
  """Our EngramConfig of a V4.1 config: published hash, v4 layer, V4.1 geometry.

  pad_id: the compressed id of `engram_pad_token_id` (needs the tokenizer; 0 without).
  """
  vocab = text["engram_vocab_size"]
  sizes = tuple(int(v) for v in vocab) if isinstance(vocab, (list, tuple)) else (int(vocab),)
  heads, head_dim = int(text["engram_n_heads"]), int(text["engram_head_dim"])
  return config_lib.EngramConfig(
      layers=tuple(int(l) for l in text["engram_layer_ids"]),
      max_ngram=int(text["engram_max_ngram_size"]), heads=heads,
      embed_per_ngram=heads * head_dim, table_size=sizes, seed=int(text.get("engram_seed", 0)),
      hash="published", compressed_vocab_size=int(text["engram_compressed_vocab_size"]),
      pad_id=int(pad_id), variant="v4", table_row_multiple=1)


def check_layout(text: dict[str, Any]) -> dict[int, dict]:
  """The derived layout; an error if it differs from `engram_num_embeddings`."""
  e = engram_config(text)
  layout = hashing.published_layout(e.layers, e.max_ngram, e.heads, e.min_rows_per_order())
  declared = text.get("engram_num_embeddings")
  if declared is not None:
    declared = list(declared) if isinstance(declared, (list, tuple)) else [declared]
    derived = [layout[l]["rows"] for l in e.layers]
    if [int(d) for d in declared] != derived:
      raise CheckpointError(f"engram_num_embeddings={declared} but the published layout gives "
                         f"{derived} rows (layers {list(e.layers)})")
  return layout


# ----------------------------------------------------------------------------------
# safetensors, memory-mapped
# ----------------------------------------------------------------------------------
def read_header(path: str) -> tuple[dict[str, Any], int]:
  """(tensor entries, byte offset of the data) of one safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", head)
    if 8 + length > size:
      raise CheckpointError(f"{path}: header of {length} bytes runs past the end of the file")
    try:
      header = json.loads(f.read(length))
    except ValueError as err:
      raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: its safetensors header is not a JSON object; the "
                          "file is damaged: copy or download it again")
  header.pop("__metadata__", None)
  for name, entry in header.items():
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f"{path}: header entry {name!r} needs a dtype, a shape of "
                            "sizes >= 0 and data_offsets [begin, end] with 0 <= begin <= "
                            f"end (it holds {json.dumps(entry)[:80]}); the file is "
                            "damaged: copy or download it again")
  return header, 8 + length


def map_tensor(path: str, name: str, entry: dict[str, Any], data_start: int) -> np.ndarray:
  """A read-only memory map of one tensor, checked against its header entry."""
  dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
  if dtype is None:
    raise CheckpointError(f"{path}: {name} has dtype {entry.get('dtype')!r}, not one of "
                       f"{sorted(_SAFETENSORS_DTYPES)}")
  shape = tuple(int(d) for d in entry["shape"])
  begin, end = (int(o) for o in entry["data_offsets"])
  want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if end - begin != want:
    raise CheckpointError(f"{path}: {name} holds {end - begin} bytes but shape {list(shape)} "
                       f"of {entry['dtype']} needs {want}")
  if data_start + end > os.path.getsize(path):
    raise CheckpointError(f"{path}: {name} ends past the end of the file (truncated?)")
  if want == 0:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def index_tensors(directory: str) -> dict[str, tuple[str, dict, int]]:
  """name -> (file, header entry, data offset) over every *.safetensors in a folder."""
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise CheckpointError(f"--safetensors={directory}: no *.safetensors files there")
  for path in files:
    if not os.path.isfile(path):
      raise CheckpointError(f"--safetensors={directory}: {path} is not a file; move it "
                            "out of that folder")
  out = {}
  for path in files:
    header, start = read_header(path)
    for name, entry in header.items():
      out[name] = (path, entry, start)
  return out


def _find(index, layer: int, suffix: str) -> Optional[str]:
  """The tensor `layers.{layer}.engram.{suffix}`, with any prefix ("model.")."""
  tail = f"layers.{layer}.engram.{suffix}"
  hits = [n for n in index if n == tail or n.endswith("." + tail)]
  return hits[0] if hits else None


def map_tables(directory: str, e: config_lib.EngramConfig,
               layout: dict[int, dict]) -> list[fp8.Fp8Table]:
  """The FP8 table of every Engram layer, memory-mapped and shape-checked."""
  index = index_tensors(directory)
  tables = []
  for layer in e.layers:
    rows = layout[layer]["rows"]
    arrays = []
    for suffix, width, dtypes in (("weight", e.head_dim, ("F8_E4M3",)),
                                  ("scale", e.head_dim // fp8.BLOCK, ("F8_E8M0", "U8"))):
      name = _find(index, layer, f"embed.{suffix}")
      if name is None:
        raise CheckpointError(f"--safetensors={directory}: missing tensor "
                           f"layers.{layer}.engram.embed.{suffix}")
      path, entry, start = index[name]
      if entry.get("dtype") not in dtypes:
        raise CheckpointError(f"{name}: dtype {entry.get('dtype')}, expected {dtypes[0]}")
      if [int(d) for d in entry["shape"]] != [rows, width]:
        raise CheckpointError(f"{name}: shape {entry['shape']}, expected {[rows, width]} "
                           f"(layout rows x {'head_dim' if suffix == 'weight' else 'head_dim/32'})")
      arrays.append(map_tensor(path, name, entry, start))
    tables.append(fp8.Fp8Table(*arrays))
  return tables


def _tensor(index, layer: int, suffixes: Sequence[str]):
  """(name, array) of the first `layers.{layer}.engram.{suffix}` present, else None."""
  for suffix in suffixes:
    name = _find(index, layer, suffix)
    if name is not None:
      path, entry, start = index[name]
      return name, map_tensor(path, name, entry, start)
  return None


def map_layer_params(directory: str, e: config_lib.EngramConfig) -> Optional[list[dict]]:
  """Params of our v4 layer from each layer's `engram.wkv` (FP8, 32x32 tile scales),
  `engram.q_weight` and `engram.k_weight`, or None when the files hold no `wkv`.

  wkv `[(M+1)*D, F]` computes M keys then the value (`key_value` `[F, M+1, D]`);
  q_weight and k_weight `[M, D]` are the per-branch RMSNorm scales of the hidden state
  and the key. Names as in public V4.1 ports.
  """
  index = index_tensors(directory)
  out = []
  for layer in e.layers:
    wkv = _tensor(index, layer, ("wkv.weight",))
    if wkv is None:
      if out:
        raise CheckpointError(f"--safetensors={directory}: missing tensor "
                              f"layers.{layer}.engram.wkv.weight")
      return None
    found = {s: _tensor(index, layer, names) for s, names in (
        ("scale", ("wkv.scale", "wkv.weight_scale_inv")), ("q", ("q_weight",)),
        ("k", ("k_weight",)))}
    for what, hit in found.items():
      if hit is None:
        name = {"scale": "wkv.scale", "q": "q_weight", "k": "k_weight"}[what]
        raise CheckpointError(f"--safetensors={directory}: missing tensor "
                              f"layers.{layer}.engram.{name}")
    q, k = (np.asarray(found[s][1], np.float32) for s in ("q", "k"))
    if q.ndim != 2 or k.shape != q.shape:
      raise CheckpointError(f"{found['q'][0]} and {found['k'][0]}: shapes {list(q.shape)} "
                            f"and {list(k.shape)}, expected both [hc_mult, hidden]")
    branches, width = q.shape
    if list(wkv[1].shape) != [(branches + 1) * width, e.features]:
      raise CheckpointError(f"{wkv[0]}: shape {list(wkv[1].shape)}, expected "
                            f"{[(branches + 1) * width, e.features]} ((hc_mult+1)*hidden "
                            f"x engram features)")
    try:
      w = fp8.dequantize_blocks(wkv[1], found["scale"][1])
    except ValueError as err:
      raise CheckpointError(f"{found['scale'][0]}: {err}") from None
    out.append({"key_value": w.reshape(branches + 1, width, e.features).transpose(2, 0, 1),
                "hidden_norm": {"scale": q}, "key_norm": {"scale": k}})
  return out


# ----------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class V41Engram:
  """A V4.1 checkpoint's Engram: config, layout, compressed vocabulary, tables."""
  engram: config_lib.EngramConfig
  layout: dict[int, dict]
  vocab_map_V: Optional[np.ndarray] = None
  tables_L: Optional[list[fp8.Fp8Table]] = None
  params_L: Optional[list[dict]] = None  # our v4 layer's params, when the files have them

  def hash_ids(self, tokens_BxT) -> np.ndarray:
    """Published row ids `[B, T, L, H]` (within each head) of token ids."""
    tokens = np.asarray(tokens_BxT)
    ngram = tokens if self.vocab_map_V is None else self.vocab_map_V[tokens]
    return hashing.ngram_hash_ids(ngram.astype(np.uint32), self.engram.hash_spec())

  def rows(self, hash_ids_BxTxLxH) -> list[np.ndarray]:
    """f32 rows `[B, T, H, head_dim]` per layer, read from the mapped tables."""
    if self.tables_L is None:
      raise CheckpointError("no tables: pass --safetensors (safetensors_dir)")
    ids = np.asarray(hash_ids_BxTxLxH, np.int64)
    return [table.take(ids[:, :, l] + self.layout[layer]["offsets_H"])
            for l, (layer, table) in enumerate(zip(self.engram.layers, self.tables_L))]


def _load_tokenizer(path: str):
  from engram_jax import tokenizer as tok_lib
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise CheckpointError(f"--tokenizer: no tokenizer.json at {path}")
  return tok_lib.load_tokenizer(path, "--tokenizer", "give the checkpoint's tokenizer.json")


def load(config_path: str, tokenizer_path: Optional[str] = None,
         safetensors_dir: Optional[str] = None) -> V41Engram:
  """Reads and checks a V4.1 checkpoint's Engram (see the module docstring)."""
  text = read_config(config_path)
  layout = check_layout(text)
  vocab_map, pad = None, 0
  if tokenizer_path is not None:
    vocab_map = compressed_vocab.published_compressed_vocab(
        _load_tokenizer(tokenizer_path), int(text["engram_compressed_vocab_size"]))
    pad_token = int(text.get("engram_pad_token_id", DEFAULT_PAD_TOKEN))
    if not 0 <= pad_token < len(vocab_map):
      raise CheckpointError(f"engram_pad_token_id={pad_token} is not a token id of the "
                         f"tokenizer ({len(vocab_map)} tokens)")
    pad = int(vocab_map[pad_token])
  e = engram_config(text, pad)
  tables = params = None
  if safetensors_dir is not None:
    tables = map_tables(safetensors_dir, e, layout)
    params = map_layer_params(safetensors_dir, e)
  return V41Engram(e, layout, vocab_map, tables, params)


def describe(v: V41Engram, text: dict[str, Any]) -> list[str]:
  e = v.engram
  lines = [f"Engram layers {list(e.layers)}: orders 2..{e.max_ngram}, {e.heads} heads "
           f"per order, head_dim {e.head_dim}, compressed vocab {e.compressed_vocab_size}"]
  declared = text.get("engram_num_embeddings")
  for i, layer in enumerate(e.layers):
    lay = v.layout[layer]
    primes = lay["primes_OxG"]
    want = "" if declared is None else f" (declared {int(list(np.ravel(declared))[i])}: ok)"
    lines.append(f"  layer {layer}: {lay['rows']} rows{want}; primes {int(primes.min())}.."
                 f"{int(primes.max())}")
  if v.vocab_map_V is not None:
    lines.append(f"  compressed vocabulary: {len(v.vocab_map_V)} tokens -> "
                 f"{int(v.vocab_map_V.max()) + 1} ids (declared: ok); pad id {e.pad_id} "
                 f"(token {text.get('engram_pad_token_id', DEFAULT_PAD_TOKEN)}"
                 f"{'' if 'engram_pad_token_id' in text else ', the default'})")
  if v.tables_L is not None:
    size = sum(t.nbytes for t in v.tables_L)
    lines.append(f"  tables mapped: {size / 2**30:.2f} GiB of FP8 rows + scales")
  if v.params_L is not None:
    m = v.params_L[0]["hidden_norm"]["scale"].shape[0]
    lines.append(f"  layer weights loaded (wkv, q_weight, k_weight): {m} branches")
  return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.Parser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="V4.1 config.json")
  p.add_argument("--tokenizer", help="folder (or file) with tokenizer.json")
  p.add_argument("--safetensors", help="folder with the checkpoint's *.safetensors")
  args = p.parse_args(argv)

  def body():  # CheckpointError, config and tokenizer errors: one line, exit 2
    v = load(args.config, args.tokenizer, args.safetensors)
    for line in describe(v, read_config(args.config)):
      print(line)
  return cli.run(body)


if __name__ == "__main__":
  sys.exit(main())
