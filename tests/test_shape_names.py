"""Every shape in the package is written in the shape legend of docs/architecture.md.

The legend's tokens are read from the table in that page, so the page and the code
cannot drift apart. Checked, in every engram_jax module:

- names (variables, parameters, attributes, functions, keywords): a name's shape
  suffix is what follows one of its `_`s and splits on `x` into axes, each a run of
  letters and digits or `_` (the first may be empty: `values_xE` is `[..., E]`). It is
  a shape when it holds a capital letter; all-lowercase suffixes are words or sizes
  (`engram_jax_logs`, `_axis`, `avg_pool_3x3`). Names without a lowercase letter are
  constants (`_E8M0_BIAS`) and dunders are Python's.
- shapes in brackets in strings (docstrings, messages): `[B, T, H, E]`, when every
  entry is one axis (letters and digits, `_` or `...`) and one holds a capital.

An axis is `_`, a number (its size), a token and `1` (one more: `M1`), or a product of
tokens after an optional literal factor (`2B`); an all-lowercase axis is one shard's
part of its tokens (`bt`).
"""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "engram_jax"
LEGEND = ROOT / "docs" / "architecture.md"

_AXIS = re.compile(r"[A-Za-z0-9]+|_")
_BRACKETS = re.compile(r"\[([^\[\]]+)\]")
_ENTRY = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-9]+|_|\.\.\.")


def legend_tokens(text: str) -> set[str]:
  """The tokens of the legend's table: the backticked words of each row's first cell."""
  section = text.split("## 1. Shape legend", 1)[1].split("\n## ", 1)[0]
  tokens = set()
  for line in section.splitlines():
    cells = line.split("|")
    if line.startswith("|") and len(cells) > 2:
      tokens.update(re.findall(r"`([^`]+)`", cells[1]))
  return tokens


def axis_pattern(tokens: set[str]) -> re.Pattern:
  """An axis: `_`, a size, or [a literal factor and] a product of tokens, all of them
  upper- or lower-case (one shard's part)."""
  def product(toks):
    return "(?:" + "|".join(sorted(map(re.escape, toks), key=len, reverse=True)) + ")+"
  lower = {t.lower() for t in tokens}
  one_more = "(?:" + "|".join(map(re.escape, tokens)) + ")1"  # M1 = M + 1
  return re.compile(
      rf"_|[0-9]+|{one_more}|[0-9]*{product(tokens)}|[0-9]*{product(lower)}")


def shape_suffix(name: str) -> list[str] | None:
  """The axes of `name`'s shape suffix, or None when it has none (see the docstring)."""
  if name.startswith("__") and name.endswith("__") or not re.search("[a-z]", name):
    return None
  for i, char in enumerate(name):
    if char != "_" or not name[:i].strip("_"):
      continue
    axes = name[i + 1:].split("x")
    if axes[0] == "" and len(axes) > 1:  # `values_xE`: leading axes of any shape
      axes = axes[1:]
    if all(_AXIS.fullmatch(a) for a in axes):
      return axes if re.search("[A-Z]", name[i + 1:]) else None
  return None


def bracket_shapes(text: str):
  """The bracketed shapes of a string: lists of entries, e.g. ['B', 'T', 'H', 'E']."""
  for match in _BRACKETS.finditer(text):
    entries = [e.strip() for e in match.group(1).split(",")]
    if all(_ENTRY.fullmatch(e) for e in entries) and re.search("[A-Z]", match.group(1)):
      yield [e for e in entries if e != "..."]


def _names(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      yield node.lineno, node.id
    elif isinstance(node, ast.arg):
      yield node.lineno, node.arg
    elif isinstance(node, ast.Attribute):
      yield node.lineno, node.attr
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      yield node.lineno, node.name
    elif isinstance(node, ast.keyword) and node.arg:
      yield node.lineno, node.arg
    elif isinstance(node, ast.alias):
      yield node.lineno, node.asname or node.name.rpartition(".")[2]


def violations(source: str, axis: re.Pattern) -> list[str]:
  """'line N: what' for each shape in `source` with an axis outside the legend."""
  tree = ast.parse(source)
  found = set()
  for lineno, name in _names(tree):
    bad = [a for a in shape_suffix(name) or () if not axis.fullmatch(a)]
    if bad:
      found.add((lineno, f"name {name}: axis {', '.join(bad)}"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      for entries in bracket_shapes(node.value):
        bad = [a for a in entries if not axis.fullmatch(a)]
        if bad:
          found.add((node.lineno, f"shape [{', '.join(entries)}]: axis {', '.join(bad)}"))
  return [f"line {n}: {what}" for n, what in sorted(found)]


TOKENS = legend_tokens(LEGEND.read_text(encoding="utf-8"))
AXIS = axis_pattern(TOKENS)
MODULES = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def test_legend_table_is_read():
  assert {"B", "T", "G", "K", "Hi", "Wi", "Sh"} <= TOKENS, sorted(TOKENS)


@pytest.mark.parametrize("module", MODULES)
def test_shapes_use_the_legend(module):
  bad = violations((PACKAGE / module).read_text(encoding="utf-8"), AXIS)
  assert not bad, (
      f"engram_jax/{module} writes shapes with axes that are not tokens of the shape "
      f"legend (docs/architecture.md, section 1): rename them, or add the token to the "
      f"legend's table:\n  " + "\n  ".join(bad))


@pytest.mark.parametrize("name, axes", [
    ("hash_ids_BxTxLxH", ["B", "T", "L", "H"]), ("x_BxTx_xDh", ["B", "T", "_", "Dh"]),
    ("update_BxTx_", ["B", "T", "_"]), ("values_xE", ["E"]), ("ids_J", ["J"]),
    ("engram_jax_logs", None), ("avg_pool_3x3_exclude_pad", None), ("_axis", None),
    ("_E8M0_BIAS", None), ("__init__", None), ("_experts", None), ("channels_7x7", None),
])
def test_shape_suffix(name, axes):
  assert shape_suffix(name) == axes


@pytest.mark.parametrize("good", ["BT", "HiWi", "bt", "2B", "1", "3", "_", "KV", "MD", "M1"])
def test_legend_axes(good):
  assert AXIS.fullmatch(good)


def test_unknown_axes_fail():
  """Axes that are no legend token fail, in names and in bracketed shapes; a token of
  the legend used in another meaning (K for hash heads) is beyond a spelling check."""
  old = "\n".join([
      "def f(x_NxHxWxC, pool_Ix2048, values_OxWo):",
      "  'Rows `[B, T, W]`; fine: `[B, T, H, E]`, `[0, 1]`, `[I, Hp, Wp, 3]`.'",
      "  first_NxQk = avg_pool_3x3(values_xE)"])
  assert violations(old, AXIS) == [
      "line 1: name values_OxWo: axis Wo", "line 1: name x_NxHxWxC: axis W",
      "line 2: shape [B, T, W]: axis W", "line 3: name first_NxQk: axis Qk"]
