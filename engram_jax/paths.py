"""Workdir and cache paths: a local directory, or an object-store URL (`gs://bucket/run`).

A run's workdir may live in a bucket, as in big_vision and MaxText: orbax and
TensorBoard write there themselves, and engram_jax's own small files (config.json,
tokenizer.json, metrics.jsonl, the compressed vocabulary) go through these helpers,
which hand URLs to `etils.epath` and keep plain `os` calls for local paths, so a local
workdir behaves exactly as it always has. `is_local` decides what needs a local disk:
`flock` (workdir_lock), appending (metrics, logs) and memory maps (token cache, disk
tables) exist only there.

Atomic writes: locally a temp file beside the target, then `os.replace`, so a reader
sees no file or a whole one; an object store gives the same for free (an object becomes
visible only once its upload completes), so a remote file is simply written whole.
A remote backend's errors (TensorFlow's gfile raises its own `OpError` types) become an
`OSError` naming the path, which the commands print as one line.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Callable, Iterator, Union

from engram_jax.errors import first_line, write_failure

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """Whether `path` is on a local filesystem (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def as_path(path: PathLike):
  """`path` as an `etils.epath.Path` (gs://, s3://, ... or local)."""
  from etils import epath
  return epath.Path(path)


def join(path: PathLike, *parts: str) -> str:
  """`os.path.join` for local paths; `/`-joined, the URL kept, for remote ones."""
  path = os.fspath(path)
  return os.path.join(path, *parts) if is_local(path) else posixpath.join(path, *parts)


def absolute(path: PathLike) -> str:
  """`os.path.abspath` of a local path; a URL unchanged (abspath would mangle it)."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path.rstrip("/")


def local_output(path: PathLike, flag: str) -> str:
  """`path` when it is local; a ValueError naming `flag` when it is a URL. For outputs
  written by libraries that want a local file (matplotlib PNGs, npz, CSV reports, the
  study sweeps' directories): a gs:// workdir needs them pointed at a local directory."""
  path = os.fspath(path)
  if not is_local(path):
    raise ValueError(f"{flag}={path!r}: this output is written to a local directory; "
                     f"pass {flag}=LOCAL_PATH (the run itself may stay on {path.split('://')[0]}://)")
  return path


@contextlib.contextmanager
def remote_errors(path: PathLike, what: str) -> Iterator[None]:
  """Turns a remote backend's error into one line, `cannot WHAT PATH: reason`: an
  OSError of the same type (e.g. FileNotFoundError) for the OSErrors epath makes of
  TensorFlow's errors, a plain OSError for the others (tf.errors.OpError, ...)."""
  message = lambda err: f"cannot {what} {os.fspath(path)}: {first_line(err)}"
  try:
    yield
  except OSError as err:
    if err.errno is not None:  # the operating system's own error: as it is
      raise
    raise type(err)(message(err)) from err
  except Exception as err:  # noqa: BLE001  tf.errors.OpError, gcsfs/aiohttp errors, ...
    raise OSError(message(err)) from err


def exists(path: PathLike) -> bool:
  if is_local(path):
    return os.path.exists(path)
  with remote_errors(path, "read"):
    return as_path(path).exists()


def is_dir(path: PathLike) -> bool:
  if is_local(path):
    return os.path.isdir(path)
  with remote_errors(path, "read"):
    return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """The names in directory `path`; [] when it is not a directory."""
  if not is_dir(path):
    return []
  if is_local(path):
    return os.listdir(path)
  with remote_errors(path, "list"):
    return [p.name for p in as_path(path).iterdir()]


def makedirs(path: PathLike) -> None:
  if is_local(path):
    os.makedirs(path, exist_ok=True)
    return
  with remote_errors(path, "create"):
    as_path(path).mkdir(parents=True, exist_ok=True)


def make_writable_dir(path: PathLike, probe_name: str = ".write-probe") -> None:
  """Creates directory `path` and proves it writable by writing and removing one small
  file named `probe_name` there (a remote one: no credentials or no network fail
  here); raises OSError otherwise."""
  makedirs(path)
  probe = join(path, probe_name)
  atomic_write_text(probe, "ok")
  remove(probe)


@contextlib.contextmanager
def no_empty_dir_left(path: PathLike) -> Iterator[None]:
  """For a block that creates the local directory `path` (and missing parents): when
  it raises, the directories it created that are still empty go again, so a failed
  command leaves no empty directory behind. Anything that holds a file stays."""
  created = []
  if is_local(path):
    missing = os.path.abspath(os.fspath(path))
    while not os.path.lexists(missing) and os.path.dirname(missing) != missing:
      created.append(missing)
      missing = os.path.dirname(missing)
  try:
    yield
  except BaseException:
    for directory in created:  # the deepest first
      try:
        os.rmdir(directory)
      except FileNotFoundError:  # never made
        continue
      except OSError:  # not empty: it and its parents stay
        break
    raise


def remove(path: PathLike, missing_ok: bool = False) -> None:
  try:
    if is_local(path):
      os.remove(path)
    else:
      with remote_errors(path, "remove"):
        as_path(path).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory. Locally `os.replace` (atomic); on an object store a
  directory moves object by object (copy, then delete): not atomic."""
  if is_local(src) and is_local(dst):
    os.replace(src, dst)
    return
  with remote_errors(src, "move"):
    as_path(src).rename(as_path(dst))


def read_bytes(path: PathLike) -> bytes:
  if is_local(path):
    with open(path, "rb") as f:
      return f.read()
  with remote_errors(path, "read"):
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  """A whole file as UTF-8 text (a decoding error is a ValueError, as from `open`)."""
  return read_bytes(path).decode("utf-8")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
  """Runs `write(tmp_path)` on a local temp file, then puts it at `path` whole.

  Readers (other processes sharing a cache or workdir) see either no file or a whole
  one, never a partial write: locally the temp file sits beside `path` and is renamed
  over it; for a URL it is uploaded in one object write (visible only when complete).
  """
  path = os.fspath(path)
  if is_local(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
  else:
    directory = None  # the system's temp directory
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  except OSError as err:
    raise write_failure(path, err) from err
  os.close(fd)
  try:
    try:
      write(tmp)
    except OSError as err:  # a full disk: one line naming the file and the fix
      raise write_failure(path, err) from err
    except Exception as err:  # Rust bindings (tokenizers) raise bare Exceptions
      if type(err) is not Exception:
        raise
      raise write_failure(path, err) from err
    if is_local(path):
      os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
      os.replace(tmp, path)
    else:
      with remote_errors(path, "write"):
        target = as_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "rb") as src, target.open("wb") as dst:
          shutil.copyfileobj(src, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """`data` at `path`, whole or not at all (see `atomic_write`)."""
  if is_local(path):
    def write(tmp: str) -> None:
      with open(tmp, "wb") as f:
        f.write(data)
    atomic_write(path, write)
    return
  with remote_errors(path, "write"):
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))
