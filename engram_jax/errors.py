"""Errors a command prints as one `error:` line with exit status 2 (no traceback)."""


class TrainingError(RuntimeError):
  """A run that must stop (non-finite loss or parameters, a failed save); the message
  names the step and what to do."""
