"""Errors a command prints as one `error:` line with exit status 2 (no traceback)."""


class TrainingError(RuntimeError):
  """A run that must stop (non-finite loss or parameters, a failed save); the message
  names the step and what to do."""


class RunStopped(KeyboardInterrupt):
  """A run that a signal (SIGTERM, SIGINT) stopped before `train.steps`, its checkpoint
  saved: not finished. A KeyboardInterrupt, so that whatever loops over runs (a study,
  a notebook cell) stops with it instead of counting it as done; the same command
  resumes it."""

  def __init__(self, step: int, signum: int):
    super().__init__(f"stopped at step {step}; checkpoint saved")
    self.step, self.signum = step, signum


def first_line(err: BaseException, limit: int = 300) -> str:
  """The gist of an error for a one-line message: its first line, without the spec
  and source-location dumps TensorStore appends (orbax and epath pass them on)."""
  text = (str(err).splitlines() or [type(err).__name__])[0].strip()
  return text.split(" [tensorstore_spec")[0].split(" [source locations")[0][:limit]


def root_cause_line(err: BaseException) -> str:
  """`first_line` of the root cause: the storage error (e.g. TensorStore's
  "OUT_OF_RANGE: Error reading ..."), not a library's wrapper around it."""
  while err.__cause__ is not None:
    err = err.__cause__
  return first_line(err)


def write_failure(path: str, err: BaseException, then: str = "run the command again"
                  ) -> OSError:
  """A failed write of `path` as one line naming the file and the fix: a full disk
  reads as one from any library (an errno, Rust's "os error 28", or NumPy's "N
  requested and M written", a short write), else the system's reason."""
  import errno as errno_lib
  text = getattr(err, "strerror", None) or first_line(err)
  full = (getattr(err, "errno", None) == errno_lib.ENOSPC or "os error 28" in str(err)
          or "No space left" in str(err) or " requested and " in str(err))
  fix = ("free space on its disk" if full else
         "check that its directory is writable and its disk has space")
  reason = "No space left on device" if full else text
  failure = WriteFailed(f"could not write {path} ({reason}); {fix}, then {then}")
  failure.errno = errno_lib.ENOSPC if full else getattr(err, "errno", None)
  failure.strerror = reason  # for callers that word their own line
  return failure


class WriteFailed(OSError):
  """`write_failure`'s error: its message is the one line (an OSError with `errno` and
  `strerror` set would print as `[Errno N] strerror`)."""

  def __str__(self) -> str:
    return str(self.args[0])
