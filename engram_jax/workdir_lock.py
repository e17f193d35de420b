"""One trainer per workdir: an exclusive lock held for the whole run (and one writer
per directory for the other commands that need one: a table export's `--out`).

Two trainers on one workdir would overwrite each other's checkpoints and interleave
`metrics.jsonl`. The lock is `WORKDIR/.lock`, held with `fcntl.flock`, so the kernel
releases it when its process dies (kill -9 included): a lock file left behind by a
dead trainer is stale and is taken over, with a note naming the old holder. The file
holds the holder's host and pid for the error message of a second trainer. On a
filesystem shared by several hosts only process 0 takes it (`train.py`).

An object store (a `gs://` workdir) has no `flock`: there the lock is not taken, and
`acquire` says so in one line rather than pretending (`enforced` is False). Starting a
single trainer per such workdir is then up to the user.
"""
from __future__ import annotations

import json
import os
import socket
import time

from engram_jax import paths

LOCK_FILE = ".lock"
_ATTEMPTS = 5  # times to retake a lock file replaced while it was being taken


class WorkdirLocked(ValueError):
  """Another live process holds the workdir."""


def _holder(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(holder: dict) -> str:
  if not holder:
    return "an unknown process"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
  pid, host = holder.get("pid"), holder.get("host")
  who = (f"this process (another thread or notebook cell, pid {pid})"
         if pid == os.getpid() and host == socket.gethostname() else f"pid {pid}")
  return f"{who} on host {host!r} (since {since})"


class WorkdirLock:
  """`with WorkdirLock(workdir):` raises `WorkdirLocked` (one line) when held elsewhere.

  Any directory one process at a time may write takes the same lock under its own
  `flag` and file `name` (e.g. `--out` of a table export, `.export.lock`); `noun` names
  the holder's work in the message ("run", "export").
  """

  def __init__(self, workdir: str, flag: str = "--workdir", name: str = LOCK_FILE,
               noun: str = "run"):
    self.workdir, self.path = workdir, paths.join(workdir, name)
    self.flag, self.noun = flag, noun
    self.enforced = paths.is_local(workdir)  # flock exists only on a local filesystem
    self._fd = None
    self.stale = None  # the holder a dead process left in the file, if any

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "WorkdirLock":
    if not self.enforced:
      print(f"note: {self.flag}={self.workdir} is not a local directory: the "
            f"one-writer lock is not enforced there (object stores have no flock); make "
            f"sure no other {self.noun} uses it", flush=True)
      return self
    self._check_is_lock_file()
    for _ in range(_ATTEMPTS):
      fd = self._lock_current_file()
      if fd is not None:
        break
    else:
      raise WorkdirLocked(f"{self.flag}={self.workdir!r}: its lock file was replaced "
                          f"{_ATTEMPTS} times while this {self.noun} took it (others "
                          "starting and failing?); run the command again")
    previous = _holder(self.path)
    if previous and previous.get("pid") != os.getpid():
      self.stale = previous
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode("utf-8"), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def _check_is_lock_file(self) -> None:
    """One line when `.lock` is something this library never writes there (a
    directory, a link, a device): locking it would fail or lock something else."""
    if os.path.islink(self.path):
      what = "a symbolic link" + ("" if os.path.exists(self.path) else " to nothing")
    elif os.path.lexists(self.path) and not os.path.isfile(self.path):
      what = "a directory" if os.path.isdir(self.path) else "not a regular file"
    else:
      return
    raise ValueError(f"{self.flag}={self.workdir!r}: its lock file {self.path} is {what}, "
                     "not the file engram_jax keeps there; move it away and run the "
                     "command again")

  def _lock_current_file(self):
    """A descriptor of the lock file, locked; None when the file was removed or
    replaced between opening and locking it (a lock on a removed file would exclude
    no one: a later trainer creates and locks a new one). Raises `WorkdirLocked`."""
    import fcntl
    existed = os.path.lexists(self.path)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the workdir itself went (a run that made it failed)
      os.makedirs(self.workdir, exist_ok=True)
      return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = _holder(self.path)
      same_host = holder.get("host") == socket.gethostname()
      state = ("" if not same_host or _pid_alive(int(holder.get("pid", 0) or 0)) else
               " (that process is gone but its lock is still held: a child of it may "
               "be running)")
      raise WorkdirLocked(
          f"{self.flag}={os.path.dirname(self.path)!r} is in use by {_describe(holder)}"
          f"{state}; wait for that {self.noun} to finish, stop it, or use another "
          f"{self.flag} (lock: {self.path})") from None
    except OSError as err:  # no flock on this filesystem (NFS without lockd: ENOLCK)
      os.close(fd)
      if not existed:  # made by this call, and no one can hold it: not left behind
        paths.remove(self.path, missing_ok=True)
      raise ValueError(f"{self.flag}={self.workdir!r}: cannot lock {self.path} "
                       f"({err.strerror or err}): its filesystem offers no flock; use a "
                       f"{self.flag} on a local disk") from None
    try:
      current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      current = False
    if current:
      return fd
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None

  def release(self, remove_file: bool = False) -> None:
    """Empties the record and drops the lock. The file stays, unless `remove_file`
    (a workdir this run made and leaves empty): it is then removed while still
    locked, and a trainer that opened it meanwhile sees that and takes a new one."""
    if self._fd is None:
      return
    import fcntl
    try:  # an empty record marks a clean exit; failing that, it reads as stale later
      os.ftruncate(self._fd, 0)
      if remove_file:
        os.remove(self.path)
    except OSError:  # deliberate: the lock is still dropped; the record reads as stale
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def stale_note(self) -> str | None:
    if not self.stale:
      return None
    return (f"note: took over the workdir lock left by {_describe(self.stale)}, which "
            "ended without releasing it (killed?)")

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
