"""import_engram on synthetic V4.1-layout checkpoints: rows read == rows written; errors."""
import json
import struct

import numpy as np

from engram_jax import fp8
from engram_jax import compressed_vocab, hashing
from engram_jax import import_engram

LAYERS, N, HEADS, HEAD_DIM, VOCAB = (1, 3), 3, 2, 64, 53


def _text_config(**overrides):
  layout = hashing.published_layout(LAYERS, N, HEADS, VOCAB)
  text = dict(engram_layer_ids=list(LAYERS), engram_max_ngram_size=N, engram_n_heads=HEADS,
              engram_head_dim=HEAD_DIM, engram_vocab_size=VOCAB,
              engram_compressed_vocab_size=300, engram_pad_token_id=2,
              engram_num_embeddings=[layout[l]["rows"] for l in LAYERS])
  text.update(overrides)
  return text, layout


def write_safetensors(path, tensors):
  """tensors: name -> (safetensors dtype, array); the format, written by hand."""
  header, blobs, offset = {}, [], 0
  for name, (dtype, array) in tensors.items():
    data = np.ascontiguousarray(array).tobytes()
    header[name] = dict(dtype=dtype, shape=list(array.shape),
                        data_offsets=[offset, offset + len(data)])
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _checkpoint(tmp_path, nested=False, skip=(), reshape=None, **overrides):
  text, layout = _text_config(**overrides)
  cfg_path = tmp_path / "config.json"
  cfg_path.write_text(json.dumps({"text_config": text} if nested else text))
  rng = np.random.default_rng(0)
  floats, tensors = {}, {}
  for layer in LAYERS:
    floats[layer] = rng.standard_normal((layout[layer]["rows"], HEAD_DIM)).astype(np.float32)
    values, scales = fp8.quantize(floats[layer])
    tensors[f"model.layers.{layer}.engram.embed.weight"] = ("F8_E4M3", values)
    tensors[f"model.layers.{layer}.engram.embed.scale"] = ("F8_E8M0", scales)
  for name in skip:
    tensors.pop(name)
  if reshape:
    name, shape = reshape
    dtype, array = tensors[name]
    tensors[name] = (dtype, array.reshape(-1)[:int(np.prod(shape))].reshape(shape))
  names = sorted(tensors)
  (tmp_path / "st").mkdir()
  write_safetensors(tmp_path / "st" / "a.safetensors", {n: tensors[n] for n in names[:2]})
  write_safetensors(tmp_path / "st" / "b.safetensors", {n: tensors[n] for n in names[2:]})
  return cfg_path, tmp_path / "st", floats


def test_rows_read_equal_rows_written(tmp_path, capsys):
  cfg_path, st, floats = _checkpoint(tmp_path, nested=True)
  assert import_engram.main([f"--config={cfg_path}", f"--safetensors={st}"]) == 0
  out = capsys.readouterr().out
  assert "layer 1:" in out and "declared" in out and "tables mapped" in out
  v = import_engram.load(str(cfg_path), safetensors_dir=str(st))
  assert all(isinstance(t.values_RxE, np.memmap) for t in v.tables_L)  # not read whole
  assert v.engram.hash == "published" and v.engram.variant == "v4"
  tokens = np.random.default_rng(1).integers(0, 300, (2, 9))
  ids = v.hash_ids(tokens)
  for l, (layer, rows) in enumerate(zip(LAYERS, v.rows(ids))):
    want = fp8.dequantize(*fp8.quantize(floats[layer]))[
        ids[:, :, l] + v.layout[layer]["offsets_H"]]
    np.testing.assert_array_equal(rows, want)
    assert rows.shape == (2, 9, (N - 1) * HEADS, HEAD_DIM)


def _error(capsys, argv):
  assert import_engram.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  return err


def test_declared_rows_must_match_the_layout(tmp_path, capsys):
  cfg_path, _, _ = _checkpoint(tmp_path, engram_num_embeddings=[100, 200])
  assert "engram_num_embeddings=[100, 200]" in _error(capsys, [f"--config={cfg_path}"])


def test_missing_tensor_wrong_shape_and_size_mismatch(tmp_path, capsys):
  for i, (kwargs, expect) in enumerate((
      (dict(skip=("model.layers.3.engram.embed.scale",)), "missing tensor layers.3"),
      (dict(reshape=("model.layers.1.engram.embed.weight", (10, HEAD_DIM))), "shape [10, 64]"),
  )):
    root = tmp_path / str(i)
    root.mkdir()
    cfg_path, st, _ = _checkpoint(root, **kwargs)
    assert expect in _error(capsys, [f"--config={cfg_path}", f"--safetensors={st}"])
  # A header whose byte range disagrees with its shape.
  path = tmp_path / "0" / "st" / "a.safetensors"
  (length,) = struct.unpack("<Q", path.read_bytes()[:8])
  header = json.loads(path.read_bytes()[8:8 + length])
  name = sorted(header)[0]
  header[name]["data_offsets"][1] -= 1
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + path.read_bytes()[8 + length:])
  root = tmp_path / "0"
  err = _error(capsys, [f"--config={root / 'config.json'}", f"--safetensors={root / 'st'}"])
  assert "bytes but shape" in err


def test_compressed_vocab_size_is_checked(tmp_path, capsys):
  from engram_jax import tokenizer as tok_lib
  corpus = tmp_path / "c.txt"
  corpus.write_text("Hello hello HÉLLO naïve NAÏVE\n" * 10, encoding="utf-8")
  tok_lib.train_bpe([str(corpus)], 280, str(tmp_path / "tokenizer.json"))
  cfg_path, _, _ = _checkpoint(tmp_path)
  err = _error(capsys, [f"--config={cfg_path}", f"--tokenizer={tmp_path}"])
  assert "but 300 were declared" in err
  tok = tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
  size = int(compressed_vocab.published_compressed_vocab(tok).max()) + 1
  text, _ = _text_config(engram_compressed_vocab_size=size)
  cfg_path.write_text(json.dumps(text))
  assert import_engram.main([f"--config={cfg_path}", f"--tokenizer={tmp_path}"]) == 0
  out = capsys.readouterr().out
  assert f"-> {size} ids" in out and "(token 2)" in out
  # Without engram_pad_token_id: V4.1's default pad token (2), not pad_token_id
  del text["engram_pad_token_id"]
  cfg_path.write_text(json.dumps(dict(text, pad_token_id=0)))
  v = import_engram.load(str(cfg_path), str(tmp_path))
  assert v.engram.pad_id == v.vocab_map_V[import_engram.DEFAULT_PAD_TOKEN]
  assert v.vocab_map_V[import_engram.DEFAULT_PAD_TOKEN] != v.vocab_map_V[0]
  assert import_engram.main([f"--config={cfg_path}", f"--tokenizer={tmp_path}"]) == 0
  assert "(token 2, the default)" in capsys.readouterr().out


def test_not_a_v41_config(tmp_path, capsys):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"hidden_size": 8}))
  assert "no engram_layer_ids" in _error(capsys, [f"--config={path}"])


def test_v41_config_layout_verifies(tmp_path, capsys):
  text = dict(engram_layer_ids=[1, 14], engram_max_ngram_size=4, engram_n_heads=8,
              engram_head_dim=256, engram_vocab_size=16_000_000,
              engram_compressed_vocab_size=99092, engram_pad_token_id=2,
              engram_num_embeddings=[384_006_168, 384_016_682])
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"text_config": text}))
  assert import_engram.main([f"--config={path}"]) == 0
  out = capsys.readouterr().out
  assert "layer 1: 384006168 rows (declared 384006168: ok)" in out
  assert "layer 14: 384016682 rows" in out


def _layer_weights(branches, width, scale_name="wkv.scale", scale_dtype="F8_E8M0"):
  """(tensors, wkv FP8 values, tile scale bytes): every layer's wkv (one scale per 32x32
  tile, written under `scale_name` as E8M0 bytes or, for a float dtype, as the
  multipliers they stand for), q_weight and k_weight; the same draws for any scale form."""
  import ml_dtypes
  features = (N - 1) * HEADS * HEAD_DIM
  rng = np.random.default_rng(7)
  w = rng.standard_normal(((branches + 1) * width, features)).astype(np.float32) * 0.05
  w_values, _ = fp8.quantize(w)  # values only; tile scales drawn below
  tile_bytes = rng.integers(120, 130, size=(2, features // 32)).astype(np.uint8)
  floats = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "I32": np.int32}
  tiles = (tile_bytes if scale_dtype not in floats else
           fp8.scale_of(tile_bytes).astype(floats[scale_dtype]))
  tensors = {}
  for layer in LAYERS:
    tensors[f"model.layers.{layer}.engram.wkv.weight"] = ("F8_E4M3", w_values)
    tensors[f"model.layers.{layer}.engram.{scale_name}"] = (scale_dtype, tiles)
    for name in ("q_weight", "k_weight"):
      tensors[f"model.layers.{layer}.engram.{name}"] = (
          "BF16", rng.uniform(0.5, 1.5, (branches, width)).astype(ml_dtypes.bfloat16))
  return tensors, w_values, tile_bytes


def test_layer_weights_load_into_our_v4_layer(tmp_path, capsys):
  """wkv (FP8, 32x32 tile scales), q_weight, k_weight -> our v4 params; the layer fed
  with rows from the mapped FP8 table equals the NumPy transcription of V4.1's layer."""
  from engram_jax.layers.engram import ROWS_COLLECTION, Engram
  from tests.test_engram_v4 import numpy_v4
  branches, width = 2, 16
  cfg_path, st, floats = _checkpoint(tmp_path)
  features = (N - 1) * HEADS * HEAD_DIM
  rng = np.random.default_rng(8)
  extra, w_values, tile_scales = _layer_weights(branches, width)
  write_safetensors(st / "c.safetensors", extra)
  assert import_engram.main([f"--config={cfg_path}", f"--safetensors={st}"]) == 0
  assert "2 branches" in capsys.readouterr().out
  v = import_engram.load(str(cfg_path), safetensors_dir=str(st))
  params = v.params_L[0]
  assert params["key_value"].shape == (features, branches + 1, width)
  w_deq = fp8.dequantize_blocks(w_values, tile_scales)
  np.testing.assert_array_equal(params["key_value"][:, branches], w_deq[branches * width:].T)

  tokens = rng.integers(0, 300, (2, 6))
  ids = v.hash_ids(tokens)
  rows = v.rows(ids)[0]
  h = rng.standard_normal((2, 6, branches, width)).astype(np.float32)
  masked = np.zeros((2, 6), bool)
  masked[1, 2] = True
  layer = Engram(v.engram, v.layout[LAYERS[0]]["rows"])
  got = layer.apply({"params": params, ROWS_COLLECTION: {"rows": rows}}, h, ids[:, :, 0],
                    None, masked)
  table = fp8.dequantize(*fp8.quantize(floats[LAYERS[0]]))
  want = numpy_v4(dict(params, table=table), h,
                  ids[:, :, 0] + v.layout[LAYERS[0]]["offsets_H"], masked)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_tile_scales_as_multipliers_or_bytes_give_the_same_weights(tmp_path, capsys):
  """`weight_scale_inv` in a float dtype holds the multipliers themselves: read as E8M0
  bytes, a 1.0 would become 2**-126 silently. Any other dtype is one line, exit 2."""
  loaded = {}
  for scale_name, dtype in (("wkv.scale", "F8_E8M0"), ("wkv.weight_scale_inv", "F32"),
                            ("wkv.weight_scale_inv", "BF16")):
    (tmp_path / dtype).mkdir()
    cfg_path, st, _ = _checkpoint(tmp_path / dtype)
    write_safetensors(st / "c.safetensors", _layer_weights(2, 16, scale_name, dtype)[0])
    loaded[dtype] = import_engram.load(str(cfg_path), safetensors_dir=str(st)).params_L[0]
  for dtype in ("F32", "BF16"):
    np.testing.assert_array_equal(loaded[dtype]["key_value"], loaded["F8_E8M0"]["key_value"])
  (tmp_path / "I32").mkdir()
  cfg_path, st, _ = _checkpoint(tmp_path / "I32")
  write_safetensors(st / "c.safetensors",
                    _layer_weights(2, 16, "wkv.weight_scale_inv", "I32")[0])
  err = _error(capsys, [f"--config={cfg_path}", f"--safetensors={st}"])
  assert "wkv.weight_scale_inv: FP8 block scales of dtype int32" in err


def test_layer_weights_with_a_wrong_shape(tmp_path, capsys):
  cfg_path, st, _ = _checkpoint(tmp_path)
  extra = {}
  for layer in LAYERS:
    extra[f"layers.{layer}.engram.wkv.weight"] = ("F8_E4M3", np.zeros((40, 256), fp8.E4M3))
    extra[f"layers.{layer}.engram.wkv.scale"] = ("F8_E8M0", np.zeros((2, 8), np.uint8))
    for name in ("q_weight", "k_weight"):
      extra[f"layers.{layer}.engram.{name}"] = ("F32", np.ones((2, 16), np.float32))
  write_safetensors(st / "c.safetensors", extra)
  err = _error(capsys, [f"--config={cfg_path}", f"--safetensors={st}"])
  assert "wkv.weight: shape [40, 256], expected [48, 256]" in err


def test_malformed_fields_are_one_line_naming_them(tmp_path, capsys):
  """Each was a TypeError traceback, a message naming no field, or accepted: a layout
  of nonsense (negative vocab sizes, a layer twice, too many vocab sizes)."""
  import pytest
  for i, (overrides, says) in enumerate((
      (dict(engram_layer_ids=1), "engram_layer_ids=1 is invalid: use a list of distinct"),
      (dict(engram_layer_ids=None), "engram_layer_ids=null is invalid"),
      (dict(engram_layer_ids=[1, 1]), "engram_layer_ids=[1, 1] is invalid"),
      (dict(engram_vocab_size=[53, 53, 53]), "engram_vocab_size=[53, 53, 53] is invalid: "
       "use an integer >= 2, or a list of 2"),
      (dict(engram_vocab_size=-5), "engram_vocab_size=-5 is invalid"),
      (dict(engram_n_heads="two"), 'engram_n_heads="two" is invalid: use an integer >= 1'),
      (dict(engram_max_ngram_size=1), "engram_max_ngram_size=1 is invalid: use an integer >= 2"),
      (dict(engram_compressed_vocab_size=0), "engram_compressed_vocab_size=0 is invalid"),
      (dict(engram_num_embeddings=[5]), "engram_num_embeddings=[5] is invalid: use a list "
       "of 2 row counts"))):
    text, _ = _text_config(**overrides)
    path = tmp_path / f"config_{i}.json"
    path.write_text(json.dumps(text))
    assert says in _error(capsys, [f"--config={path}"]), says
  path = tmp_path / "nested.json"
  path.write_text(json.dumps({"text_config": 5}))
  assert "not a JSON object (text_config)" in _error(capsys, [f"--config={path}"])
  with pytest.raises(import_engram.CheckpointError, match="engram_vocab_size"):
    import_engram.read_config(str(tmp_path / "config_4.json"))


def test_malformed_safetensors_headers_are_one_line(tmp_path, capsys):
  cfg_path, st, _ = _checkpoint(tmp_path)
  path = st / "a.safetensors"
  data = path.read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  header, blobs = json.loads(data[8:8 + length]), data[8 + length:]
  name = sorted(header)[0]

  def write(new_header):
    blob = json.dumps(new_header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + blobs)
  argv = [f"--config={cfg_path}", f"--safetensors={st}"]
  for broken, says in (([1, 2], "its safetensors header is not a JSON object"),
                       ({**header, name: "x"}, f"header entry {name!r} needs a dtype"),
                       ({**header, name: {**header[name], "shape": None}}, "needs a dtype"),
                       ({**header, name: {k: v for k, v in header[name].items()
                                          if k != "dtype"}}, "needs a dtype"),
                       ({**header, name: {**header[name], "data_offsets": [-100, 0]}},
                        "0 <= begin <= end")):
    write(broken)
    assert says in _error(capsys, argv), says
  write(header)
  (st / "dir.safetensors").mkdir()
  assert "dir.safetensors is not a file; move it out" in _error(capsys, argv)

