"""Image pipeline: digits, npz/ArrayRecord codes, ids, resume, shards, CFG dropout."""
import dataclasses
import json
import pickle

import numpy as np
import pytest

from engram_jax import hashing, spatial_hashing
from engram_jax.data import digits, image_records, images

from tests.conftest import same_batches, take

pytest.importorskip("sklearn")

SPEC = hashing.make_hash_spec((0, 2), 3, 2, (53, 59), 4)
STENCIL = ((0, -1), (-1, 0), (-1, 1))
H, W, CODEBOOK, CLASSES = 3, 5, 50, 4




def _keys(batch):
  """One bytes key per image of a batch (its cells)."""
  return [r.tobytes() for r in batch["targets"]]


DIGITS = images.ImageDataConfig(levels=4, batch_size=8)


# ----------------------------------------------------------------------------------
# Fixtures: one small set of codes, stored as npz and as ArrayRecord
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codes(tmp_path_factory):
  """42 train and 12 val images of distinct random codes, written in both formats."""
  root = tmp_path_factory.mktemp("codes")
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", 42), ("val", 12)):
    codes_IxHixWi = rng.integers(0, CODEBOOK, size=(n, H, W)).astype(np.int16)
    labels_I = rng.integers(0, CLASSES, size=n)
    np.savez(root / f"{split}.npz", codes=codes_IxHixWi, labels=labels_I)
    half = n // 2  # two ArrayRecord shards, read through one glob
    for shard, part in enumerate((slice(0, half), slice(half, n))):
      image_records.write_array_record(str(root / f"{split}-{shard}.array_record"),
                                codes_IxHixWi[part], labels_I[part])
    paths[split] = (codes_IxHixWi, labels_I)
  assert len({c.tobytes() for c in paths["train"][0]}) == 42
  common = dict(height=H, width=W, codebook_size=CODEBOOK, num_classes=CLASSES,
                batch_size=4)
  npz = images.ImageDataConfig(source="npz", train_path=str(root / "train.npz"),
                               val_path=str(root / "val.npz"), **common)
  record = images.ImageDataConfig(
      source="array_record", train_path=str(root / "train-*.array_record"),
      val_path=str(root / "val-*.array_record"), **common)
  return dict(root=root, npz=npz, array_record=record, arrays=paths)


# ----------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------
def test_digits_splits_are_stratified_disjoint_and_seeded():
  split = digits.split_indices(0)
  sizes = {s: len(i) for s, i in split.items()}
  assert sizes == {"train": 1439, "val": 179, "test": 179}
  everything = np.concatenate(list(split.values()))
  np.testing.assert_array_equal(np.sort(everything), np.arange(1797))
  _, labels = digits.raw()
  for s in ("val", "test"):
    counts = np.bincount(labels[split[s]], minlength=10)
    assert counts.min() >= 17 and counts.max() <= 18  # 10% of every class
  again = digits.split_indices(0)
  assert all(np.array_equal(split[s], again[s]) for s in split)
  other = digits.split_indices(1)
  assert not np.array_equal(split["val"], other["val"])
  assert len(other["val"]) == 179


def test_digits_quantisation():
  values = np.arange(17)
  np.testing.assert_array_equal(digits.quantize(values, 17), values)
  np.testing.assert_array_equal(digits.quantize(values, 4),
                                [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4)
  np.testing.assert_array_equal(digits.quantize(values, 2), [0] * 9 + [1] * 8)
  for levels in (2, 4, 8, 17):
    assert len(np.unique(digits.quantize(values, levels))) == levels


def test_digits_batches_hold_shifted_cells_and_class_tokens():
  vocab = images.image_vocab(DIGITS)
  assert (vocab.codebook_size, vocab.num_classes, vocab.null_class, vocab.size) == \
      (4, 10, 14, 15)
  pixels, labels = digits.raw()
  train = digits.split_indices(0)["train"]
  known = {digits.quantize(p, 4).reshape(-1).tobytes(): int(l)
           for p, l in zip(pixels[train], labels[train])}
  for batch in take(images.train_iterator(DIGITS), 3):
    assert set(batch) == {"inputs", "targets", "labels"}
    assert batch["inputs"].shape == batch["targets"].shape == (8, 64)
    assert batch["labels"].shape == (8,)
    assert all(v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["inputs"][:, 0], 4 + batch["labels"])
    assert batch["targets"].min() >= 0 and batch["targets"].max() < 4
    for key, label in zip(_keys(batch), batch["labels"]):  # real train images
      assert known[key] == label


def test_digits_eval_is_fixed_and_split_between_processes():
  ev = images.eval_batches(DIGITS, "test")
  first = list(ev)
  assert len(ev) == len(first) == 179 // 8
  assert same_batches(first, list(images.eval_batches(DIGITS, "test")))
  pixels, labels = digits.raw()
  test = digits.split_indices(0)["test"]
  np.testing.assert_array_equal(first[0]["labels"], labels[test[:8]])
  np.testing.assert_array_equal(first[1]["targets"],
                                digits.quantize(pixels[test[8:16]], 4)
                                .reshape(8, 64))
  halves = [list(images.eval_batches(DIGITS, "test", max_batches=3, process_index=p,
                                     process_count=2)) for p in range(2)]
  assert len(halves[0]) == 3
  for j in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][j]["targets"], halves[1][j]["targets"]]),
        first[j]["targets"])


# ----------------------------------------------------------------------------------
# Pre-tokenised codes: npz and ArrayRecord through the same pipeline
# ----------------------------------------------------------------------------------
def test_npz_and_array_record_give_the_same_batches(codes):
  kw = dict(hash_spec=SPEC, stencil=STENCIL)
  npz = take(images.train_iterator(codes["npz"], **kw), 12)  # > one epoch
  rec = take(images.train_iterator(codes["array_record"], **kw), 12)
  assert same_batches(npz, rec)
  assert same_batches(list(images.eval_batches(codes["npz"], **kw)),
               list(images.eval_batches(codes["array_record"], **kw)))
  codes_IxHixWi, labels_I = codes["arrays"]["train"]
  known = {c.reshape(-1).astype(np.int32).tobytes(): int(l)
           for c, l in zip(codes_IxHixWi, labels_I)}
  for batch in npz:
    assert batch["inputs"].shape == (4, H * W)
    np.testing.assert_array_equal(batch["inputs"][:, 0], CODEBOOK + batch["labels"])
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert [known[k] for k in _keys(batch)] == batch["labels"].tolist()
    ids = batch["hash_ids"]
    assert ids.dtype == np.int32 and ids.shape == (4, H * W, 2, 4)
    np.testing.assert_array_equal(
        ids, spatial_hashing.spatial_hash_ids(batch["targets"], SPEC, H, W, STENCIL))


def test_records_round_trip():
  image = np.arange(12).reshape(3, 4)
  decoded, label = image_records.decode_record(image_records.encode_record(image, 7))
  np.testing.assert_array_equal(decoded, image)
  assert label == 7 and decoded.dtype == np.int32
  with pytest.raises(ValueError, match="not an image record.*write_array_record"):
    image_records.decode_record(b"\x01\x02\x03\x04" * 5)


def test_sources_pickle_for_worker_processes(codes):
  for cfg in (codes["npz"], codes["array_record"], DIGITS):
    source = images.image_source(cfg, "train")
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == len(source)
    for i in (0, len(source) - 1):
      np.testing.assert_array_equal(clone[i]["codes"], source[i]["codes"])
      assert clone[i]["label"] == source[i]["label"]


# ----------------------------------------------------------------------------------
# Errors name the field
# ----------------------------------------------------------------------------------
def _raises(cfg, match, split="train"):
  with pytest.raises(ValueError, match=match):
    images.eval_batches(cfg, split)


def test_config_errors():
  _raises(dataclasses.replace(DIGITS, source="png"), "data.source='png'")
  _raises(dataclasses.replace(DIGITS, levels=18), "data.levels=18")
  _raises(dataclasses.replace(DIGITS, levels=1), "data.levels=1")
  _raises(dataclasses.replace(DIGITS, codebook_size=16), "data.codebook_size=16")
  _raises(dataclasses.replace(DIGITS, height=16), "data.height=16")
  _raises(dataclasses.replace(DIGITS, num_classes=1000), "data.num_classes=1000")
  _raises(dataclasses.replace(DIGITS, label_dropout=1.5), "data.label_dropout=1.5")
  _raises(dataclasses.replace(DIGITS, batch_size=0), "data.batch_size=0")
  _raises(dataclasses.replace(DIGITS, batch_size=200), "data.batch_size=200.*179",
          "val")
  _raises(DIGITS, "split='dev'", "dev")
  codes_cfg = images.ImageDataConfig(source="npz", codebook_size=8)
  _raises(codes_cfg, "data.train_path is empty")
  _raises(dataclasses.replace(codes_cfg, train_path="x.npz", codebook_size=0),
          "data.codebook_size=0")
  with pytest.raises(ValueError, match="data.batch_size=9 is not divisible"):
    images.train_iterator(dataclasses.replace(DIGITS, batch_size=9), process_count=2)
  with pytest.raises(ValueError, match="engram.stencil has 2 offsets"):
    images.train_iterator(DIGITS, hash_spec=SPEC, stencil=STENCIL[:2])


def test_file_errors(codes):
  root, npz, rec = codes["root"], codes["npz"], codes["array_record"]
  _raises(dataclasses.replace(npz, train_path=str(root / "nope.npz")),
          "data.train_path=.*nope.npz' does not exist")
  _raises(dataclasses.replace(rec, train_path=str(root / "nope-*")),
          "data.train_path=.*nope-\\*' matches no files")
  _raises(dataclasses.replace(npz, test_path=""), "data.test_path is empty", "test")
  codes_IxHixWi, labels_I = codes["arrays"]["train"]

  def npz_with(name, **arrays):
    np.savez(root / name, **arrays)
    return dataclasses.replace(npz, train_path=str(root / name))

  _raises(npz_with("keys.npz", codes=codes_IxHixWi), "lacks \\['labels'\\]")
  # other arrays beside codes and labels are not read (object arrays included)
  extra = npz_with("extra.npz", codes=codes_IxHixWi, labels=labels_I,
                   meta=np.array([{"source": "mine"}], dtype=object))
  assert len(list(images.eval_batches(extra, "train"))) > 0
  _raises(npz_with("shape.npz", codes=codes_IxHixWi[:, :, :4], labels=labels_I),
          "shape \\(42, 3, 4\\).*data.height x data.width is 3 x 5")
  _raises(npz_with("flat.npz", codes=codes_IxHixWi.reshape(42, -1), labels=labels_I),
          "data.height x data.width")
  _raises(npz_with("nlabels.npz", codes=codes_IxHixWi, labels=labels_I[:5]),
          "labels have shape \\(5,\\)")
  _raises(npz_with("float.npz", codes=codes_IxHixWi * 0.5, labels=labels_I),
          "codes have dtype float64")
  big = codes_IxHixWi.copy()
  big[3, 1, 2] = CODEBOOK
  _raises(npz_with("vocab.npz", codes=big, labels=labels_I),
          "codes span \\[0, 50\\].*data.codebook_size=50")
  _raises(npz_with("neg.npz", codes=-1 - codes_IxHixWi, labels=labels_I),
          "outside the vocabulary")
  _raises(npz_with("class.npz", codes=codes_IxHixWi, labels=labels_I + CLASSES),
          "labels span.*data.num_classes=4")
  # ArrayRecord: the first record is checked up front, the others as they are read.
  image_records.write_array_record(str(root / "bad-first.array_record"), big[3:], labels_I[3:])
  _raises(dataclasses.replace(rec, train_path=str(root / "bad-first.array_record")),
          "data.train_path record 0: codes span .*data.codebook_size=50")
  image_records.write_array_record(str(root / "bad-later.array_record"), big, labels_I)
  source = images.image_source(
      dataclasses.replace(rec, train_path=str(root / "bad-later.array_record")),
      "train")
  with pytest.raises(ValueError, match="record 3: codes span.*data.codebook_size"):
    source[3]  # noqa: B018
  image_records.write_array_record(str(root / "wide.array_record"),
                            np.zeros((2, 3, 6), np.int32), labels_I[:2])
  _raises(dataclasses.replace(rec, train_path=str(root / "wide.array_record")),
          "record 0: codes have shape \\(1, 3, 6\\)")


def test_damaged_files_are_one_line_naming_the_field(codes):
  """Truncated, empty, corrupted or pickled npz files and damaged ArrayRecord files were
  tracebacks (BadZipFile, EOFError, zlib.error, RuntimeError) or numpy's hint to load
  pickles unsafely."""
  root, npz, rec = codes["root"], codes["npz"], codes["array_record"]
  good = (root / "train.npz").read_bytes()
  codes_IxHixWi, labels_I = codes["arrays"]["train"]
  np.savez_compressed(root / "compressed.npz", codes=codes_IxHixWi, labels=labels_I)
  squeezed = bytearray((root / "compressed.npz").read_bytes())
  squeezed[len(squeezed) // 3] ^= 0xFF
  flipped = bytearray(good)
  flipped[len(flipped) // 2] ^= 0xFF
  np.savez(root / "objects.npz", codes=np.array([{"a": 1}], dtype=object), labels=labels_I)
  for name, content in (("half.npz", good[:len(good) // 2]), ("empty.npz", b""),
                        ("flipped.npz", bytes(flipped)), ("squeezed.npz", bytes(squeezed)),
                        ("noise.npz", bytes(range(256)) * 4), ("objects.npz", None)):
    if content is not None:
      (root / name).write_bytes(content)
    with pytest.raises(ValueError) as err:
      images.eval_batches(dataclasses.replace(npz, train_path=str(root / name)), "train")
    message = str(err.value)
    assert message.startswith(f"data.train_path={str(root / name)!r}: cannot read it as an "
                              "npz (") and "np.savez(path, codes=codes" in message, message
    assert "allow_pickle=" not in message and "\n" not in message
  shard = (root / "train-0.array_record").read_bytes()
  for name, content in (("cut.array_record", shard[:len(shard) // 2]),
                        ("empty.array_record", b"")):
    (root / name).write_bytes(content)
    _raises(dataclasses.replace(rec, train_path=str(root / name)),
            rf"data.train_path: '{root / name}' is not a readable ArrayRecord file "
            r"\(.*\); write it again")
  damaged = bytearray(shard)
  damaged[400] ^= 0xFF  # inside a chunk: found when its records are read
  (root / "damaged.array_record").write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=r"data.train_path record \d+ does not read back "
                                       r"\(Corrupted .*\): the file is damaged; write it"):
    cfg = dataclasses.replace(rec, train_path=str(root / "damaged.array_record"))
    list(images.eval_batches(cfg, "train"))


# ----------------------------------------------------------------------------------
# Resume, seeds, process shards
# ----------------------------------------------------------------------------------
def test_resume_gives_the_same_following_batches(codes):
  cfg = dataclasses.replace(codes["array_record"], label_dropout=0.5)
  it = images.train_iterator(cfg, hash_spec=SPEC, stencil=STENCIL)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  following = take(it, 9)  # crosses an epoch boundary (42 images, 4 a batch)
  fresh = images.train_iterator(cfg, hash_spec=SPEC, stencil=STENCIL)
  fresh.set_state(state)
  assert same_batches(take(fresh, 9), following)
  it.set_state(state)
  assert same_batches(take(it, 9), following)


def test_seed_decides_the_order_and_epochs_reshuffle(codes):
  def first(seed, n=21):  # two epochs of 42 images, 4 per batch
    return take(images.train_iterator(dataclasses.replace(codes["npz"], seed=seed)), n)
  a = first(0)
  assert same_batches(a, first(0)) and not same_batches(a, first(1))
  stream = [k for b in a for k in _keys(b)]  # epochs run on across batches
  epoch0, epoch1 = stream[:42], stream[42:]
  assert len(set(epoch0)) == 42 and set(epoch0) == set(epoch1)
  assert epoch0 != epoch1


def test_processes_read_disjoint_shards(codes):
  cfg = codes["npz"]
  shards = []
  for p in range(2):
    it = images.train_iterator(cfg, process_index=p, process_count=2)
    batches = take(it, 10)  # 21 images per process, 2 per batch: one epoch
    assert batches[0]["inputs"].shape == (2, H * W)
    shards.append({k for b in batches for k in _keys(b)})
  assert len(shards[0]) == len(shards[1]) == 20
  assert not shards[0] & shards[1]
  train_codes = codes["arrays"]["train"][0]
  every = {c.reshape(-1).astype(np.int32).tobytes() for c in train_codes}
  assert shards[0] | shards[1] <= every


# ----------------------------------------------------------------------------------
# Label dropout (classifier-free guidance)
# ----------------------------------------------------------------------------------
def _dropped(batches, vocab):
  rows = []
  for b in batches:
    dropped = b["inputs"][:, 0] == vocab.null_class
    kept = ~dropped
    np.testing.assert_array_equal(b["inputs"][kept, 0],
                                  vocab.class_token(b["labels"][kept]))
    assert (b["labels"] < vocab.num_classes).all()  # true labels stay in `labels`
    rows.append(dropped)
  return np.concatenate(rows)


def test_label_dropout_rate_uses_null_class_and_is_deterministic():
  cfg = dataclasses.replace(DIGITS, batch_size=32, label_dropout=0.25)
  vocab = images.image_vocab(cfg)
  mask = _dropped(take(images.train_iterator(cfg), 50), vocab)
  assert len(mask) == 1600 and abs(mask.mean() - 0.25) < 0.04  # ~3.6 sigma
  again = _dropped(take(images.train_iterator(cfg), 50), vocab)
  np.testing.assert_array_equal(mask, again)
  other = _dropped(take(images.train_iterator(dataclasses.replace(cfg, seed=1)), 50),
                   vocab)
  assert not np.array_equal(mask, other)
  procs = [_dropped(take(images.train_iterator(cfg, process_index=p, process_count=2),
                          20), vocab) for p in range(2)]
  assert not np.array_equal(procs[0], procs[1])  # processes draw independently
  always = dataclasses.replace(cfg, label_dropout=1.0)
  assert _dropped(take(images.train_iterator(always), 2), vocab).all()
  assert not _dropped(take(images.train_iterator(DIGITS), 5), vocab).any()
  # Eval batches never drop the class token.
  assert not _dropped(list(images.eval_batches(always)), vocab).any()
