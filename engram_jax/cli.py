"""What every command does the same way: parse its flags and integer lists, and turn bad
input into one line on stderr with exit status 2 (no traceback, no usage block)."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

from engram_jax.errors import RunStopped, first_line


class Parser(argparse.ArgumentParser):
  """argparse whose own errors (an unknown or missing flag, a bad choice or type) are one
  line and exit status 2 like every other bad input, pointing at `--help`."""

  def error(self, message: str):
    self.exit(2, f"error: {message}; `{self.prog} --help` lists the flags\n")


def parse_list(text: str, flag: str, kind=int, example: str = "0,1,2") -> list:
  """`"0,1,2"` -> [0, 1, 2] (`kind` per item); anything else, or nothing, is a
  ValueError naming `flag`."""
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag}={text!r}: give comma-separated values, e.g. {example}") from None
  if not values:
    raise ValueError(f"{flag} is empty: give comma-separated values, e.g. {example}")
  return values


def parse_ints(text: str, flag: str) -> list[int]:
  return parse_list(text, flag, int)


def run(body: Callable[[], int | None], also: tuple[type[BaseException], ...] = ()) -> int:
  """`body()`'s exit status (0 for None); a ValueError, OSError or RuntimeError (the
  trainer's TrainingError), or an exception of `also` (e.g. the ImportError of an
  optional dependency), is one `error:` line (the message's first) and status 2."""
  try:
    return body() or 0
  except RunStopped as stop:  # a signal stopped a run the command trains: it resumes
    print(f"{stop.args[0]} (a signal stopped the run); run the same command to resume",
          file=sys.stderr, flush=True)
    return 0 if stop.signum == signal.SIGTERM else 130
  except (ValueError, OSError, RuntimeError, *also) as err:
    print(f"error: {first_line(err, limit=2000)}", file=sys.stderr)
    return 2
