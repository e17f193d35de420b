"""Config files outside absl flags: `path.py:variant` loading and `FIELD=VALUE` overrides.

The training command reads configs through `ml_collections.config_flags`; study commands
(sweeps, seed runs) load several variants in one process, so they use these instead.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Callable, Sequence


def load_module(path: str):
  """A config file as a module (its `get_config`), without touching `sys.path`."""
  module_spec = importlib.util.spec_from_file_location(
      f"_engram_jax_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


SHIPPED_PREFIX = "configs/"


def resolve(path: str) -> str:
  """`path` if it is a file; else, for `configs/NAME.py`, the copy installed with the
  package (`engram_jax.configs`), so the shipped configs load from any directory."""
  if os.path.isfile(path) or not path.startswith(SHIPPED_PREFIX):
    return path
  spec = importlib.util.find_spec("engram_jax.configs")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    shipped = os.path.join(folder, path[len(SHIPPED_PREFIX):])
    if os.path.isfile(shipped):
      return shipped
  return path


def resolve_arg(config_arg: str) -> str:
  """`--config`'s value `path.py:variant` with its path `resolve`d."""
  path, sep, variant = config_arg.partition(":")
  return resolve(path) + sep + variant


def load(spec: str):
  """`path.py:variant` -> the file's `get_config(variant)` (as ml_collections does)."""
  path, _, variant = resolve_arg(spec).partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config={spec!r}: no file {path!r}; give PATH.py:VARIANT")
  module = load_module(path)
  return module.get_config(variant) if variant else module.get_config()


def overrides(items: Sequence[str], flag: str = "--set", joiner: str = "=",
              example: str = "data.train_path=/codes/train.npz") -> Callable:
  """`FIELD=VALUE` strings (e.g. `data.train_path=/codes/train.npz`) -> a function that
  applies them to a config; values are Python literals where they parse (`0.2`,
  `(1, 3)`), else strings. An unknown field is a ValueError naming it. Errors spell an
  item as the command line does: `{flag}{joiner}{item}` (`--set=` or
  `--variant=NAME:`), with `example` as one right."""
  pairs = []
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key or key.startswith(".") or key.endswith("."):
      raise ValueError(f"{flag}{joiner}{item}: use {flag}{joiner}section.field=value, "
                       f"e.g. {flag}{joiner}{example}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    pairs.append((key, value, text))

  def apply(config):
    for key, value, text in pairs:
      *path, leaf = key.split(".")
      node = config
      for depth, name in enumerate(path + [leaf]):
        if not hasattr(node, "keys") or name not in node.keys():
          raise ValueError(f"{flag}{joiner}{key}=...: the config has no field {key!r}")
        if depth < len(path):
          node = node[name]
      try:
        node[leaf] = value
      except TypeError as err:
        if not isinstance(node[leaf], str):  # e.g. engram.gate: "learned" or "0.1"
          raise ValueError(f"{flag}{joiner}{key}={value!r}: {err}") from None
        node[leaf] = text
    return config
  return apply
