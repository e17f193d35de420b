"""One image per ArrayRecord record: the byte layout, its reader and a writer.

A record is int32 little-endian `label, Hi, Wi`, then the `Hi*Wi` codes in raster
order: decoding is one `np.frombuffer`, so grain's reader threads can decode records
without a lock (data/images.py reads them as the "array_record" source).
"""
import os

import numpy as np

HEADER = 3  # int32 label, height, width before the codes


def encode_record(codes_HixWi, label: int) -> bytes:
  """One image as an ArrayRecord record: int32 little-endian label, Hi, Wi, then codes.

  A fixed binary layout rather than `.npz` bytes: decoding is `np.frombuffer`, which is
  thread-safe (grain reads with threads; `np.load` is not, see data/token_cache.py).
  """
  codes = np.asarray(codes_HixWi)
  if codes.ndim != 2:
    raise ValueError(f"codes_HixWi has shape {codes.shape}; give one image "
                     "[height, width].")
  header = np.array([label, *codes.shape], dtype="<i4")
  return header.tobytes() + codes.astype("<i4").tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """Inverse of `encode_record`: (codes `[Hi, Wi]` int32, label)."""
  values = np.frombuffer(record, dtype="<i4")
  if len(values) < HEADER or len(values) != (
      HEADER + int(values[1]) * int(values[2])):
    raise ValueError(f"a record of {len(record)} bytes is not an image record; write "
                     f"records with image_records.write_array_record (label, Hi, Wi, codes).")
  label, height, width = (int(v) for v in values[:HEADER])
  return values[HEADER:].reshape(height, width).astype(np.int32), label


def write_array_record(path: str, codes_IxHixWi, labels_I) -> None:
  """Writes images as ArrayRecord records (group size 1: fast random access)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  codes, labels = np.asarray(codes_IxHixWi), np.asarray(labels_I)
  if codes.ndim != 3 or labels.shape != codes.shape[:1]:
    raise ValueError(f"codes {codes.shape} and labels {labels.shape}: give codes "
                     f"[images, height, width] and labels [images].")
  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  try:
    for image, label in zip(codes, labels):
      writer.write(encode_record(image, int(label)))
  finally:
    writer.close()
