"""Errors a command prints as one `error:` line with exit status 2 (no traceback)."""


class TrainingError(RuntimeError):
  """A run that must stop (non-finite loss or parameters, a failed save); the message
  names the step and what to do."""


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
