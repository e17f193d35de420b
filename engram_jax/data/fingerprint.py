"""A data source's fingerprint, saved with each checkpoint.

Exact resume replays the saved batch count over the same stream: over a changed corpus
that count lands somewhere else, silently. The fingerprint (the data fields that shape
the stream, and the files' names, sizes and modification times) lets a resume refuse a
changed source with one line naming what changed.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Mapping, Sequence


def files_fingerprint(paths: Sequence[str], root: str = "") -> dict[str, Any]:
  """{"files": count, "files_digest": sha256 of (relative path, size, mtime) of each}."""
  digest = hashlib.sha256()
  for path in paths:
    stat = os.stat(path)
    name = os.path.relpath(path, root) if root else path
    digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
  return {"files": len(paths), "files_digest": digest.hexdigest()[:16]}


def config_fields(cfg: Any, names: Iterable[str]) -> dict[str, Any]:
  """`data.NAME` -> value for the fields that decide which batches a run sees."""
  return {f"data.{name}": getattr(cfg, name) for name in names}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Human-readable `key: saved -> current` for every key that differs."""
  out = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
  return out


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], accept: bool,
                 step: int) -> None:
  """Refuses to resume checkpoint `step` on a changed data source unless `accept`."""
  if saved is None or saved == current:
    return  # older checkpoints carry no fingerprint
  changed = differences(saved, current)
  if accept:
    print(f"warning: resuming on changed data ({'; '.join(changed)}); the batches after "
          f"step {step} differ from an uninterrupted run's", flush=True)
    return
  raise ValueError(
      f"the data source changed since checkpoint {step} ({'; '.join(changed)}): exact "
      "resume would replay its batch count over other data; restore the data, pass "
      "--accept_data_change to resume on the new data knowingly, or use a new --workdir")
