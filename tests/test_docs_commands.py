"""Every command the README and docs/ show parses as written (in-process). A training
command's `--config` and `--config.*` overrides go through the real command line and the
config it builds passes the checks a run makes before any work; every other command's
flags parse with its own parser. (A copied example that stops at its first line, e.g.
`train.steps` below `train.warmup_steps` or a renamed flag, fails here.)
"""
import argparse
import glob
import importlib
import os
import re
import shlex

import pytest

pytest.importorskip("ml_collections")

from engram_jax import cli  # noqa: E402
from engram_jax import main as main_lib  # noqa: E402
from engram_jax import run_config, sizing, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LAUNCHERS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
_CONFIG_SPEC = re.compile(r"^configs/\w+\.py:[\w.]+$")


def _shell_blocks():
  """(where, text) of the docs' shell blocks and of the launch scripts' usage comments."""
  for doc in DOCS:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
      if lang in ("", "bash", "sh"):
        yield doc, block
  for script in LAUNCHERS:
    with open(script, encoding="utf-8") as f:
      comments = [line[1:] for line in f if line.startswith("#") and not line.startswith("#!")]
    yield os.path.relpath(script, ROOT), "".join(comments)


def _command_lines():
  """(where, command) of every shell line, continuation lines joined, without a prompt
  (`$ `) or a trailing comment; lines with shell variables (a loop over variants or
  seeds: their values are not in the text) are left out."""
  for doc, block in _shell_blocks():
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      command = line.strip().removeprefix("$ ").split(" # ")[0]
      if "$" not in command:
        yield f"{doc}: {line.strip()[:90]}", command


def _commands():
  """(where, config spec, overrides) of every `engram_jax.main` or launch-script line."""
  found = []
  for where, command in _command_lines():
    command = command.split("'--command=")[0]  # a remote shell's quoted command: its own
    if "engram_jax.main" not in command and "launch/" not in command:
      continue
    words = shlex.split(command)
    spec = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")),
                next((w for w in words if _CONFIG_SPEC.match(w)), None))
    if spec:
      found.append((where, spec, [w for w in words if w.startswith("--config.")]))
  return found


def _module_commands():
  """(where, module, argv) of every other `python -m engram_jax.MODULE ...` line; a
  synopsis with `[optional]` parts is left out."""
  found = []
  for where, command in _command_lines():
    match = re.match(r"(?:\w+=\S+\s+)*python -m (engram_jax\.[\w.]+)(.*)", command)
    if not match or match.group(1) == "engram_jax.main":
      continue
    argv = shlex.split(match.group(2))
    if argv and not any("[" in word for word in argv):
      found.append((where, match.group(1), argv))
  return found


COMMANDS = _commands()
MODULE_COMMANDS = _module_commands()


def test_the_docs_show_commands():
  assert len(COMMANDS) >= 20 and len(MODULE_COMMANDS) >= 25  # the extraction still works


@pytest.mark.parametrize("where, spec, overrides", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_parses_and_validates(where, spec, overrides, monkeypatch,
                                                    tmp_path, capsys):
  checked = []
  validate = lambda config, *args, **kwargs: checked.append(run_config.from_config(config))
  monkeypatch.setattr(train, "train_and_evaluate", validate)
  monkeypatch.setattr(sizing, "dry_run_report", lambda config: validate(config) or "")
  monkeypatch.chdir(ROOT)
  code = main_lib.run(["engram_jax.main", f"--config={spec}", *overrides,
                       f"--workdir={tmp_path}", "--distributed=off"])
  assert code == 0 and len(checked) == 1, (where, capsys.readouterr().err)


class _Parsed(Exception):
  """Raised in place of running the command once its flags parsed."""


@pytest.mark.parametrize("where, module, argv", MODULE_COMMANDS,
                         ids=[c[0] for c in MODULE_COMMANDS])
def test_a_documented_command_s_flags_parse(where, module, argv, monkeypatch, capsys):
  def parse_then_stop(self, args=None, namespace=None):
    raise _Parsed(argparse.ArgumentParser.parse_args(self, args, namespace))
  monkeypatch.setattr(cli.Parser, "parse_args", parse_then_stop)
  with pytest.raises(_Parsed):
    importlib.import_module(module).main(argv)
  assert not capsys.readouterr().err, where


# Pages whose Python blocks sketch an API around objects made elsewhere (`model`,
# `tx`, a config's fields) rather than running as written.
SKETCHES = ("docs/moe.md", "docs/sharding.md", "docs/v4.md")


def _python_examples():
  """(doc, its Python blocks joined) of every page whose examples run as written."""
  for doc in DOCS:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    if blocks and doc not in SKETCHES:
      yield doc, "\n".join(blocks)


@pytest.mark.parametrize("doc, source", list(_python_examples()),
                         ids=[doc for doc, _ in _python_examples()])
def test_a_documented_python_example_defines_what_it_uses(doc, source):
  """A pasted example used to stop at a NameError (`jax`, `compressed_vocab` and
  `workdir` in docs/data.md were never defined); names bound anywhere in a page's
  examples count, so a later block may use an earlier one's."""
  import ast
  import builtins
  tree = ast.parse(source, doc)
  bound, used = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      if isinstance(node.ctx, ast.Load):
        used.setdefault(node.id, node.lineno)
      else:
        bound.add(node.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      bound.add(node.name)
  undefined = {name: line for name, line in used.items()
               if name not in bound and not hasattr(builtins, name)}
  assert not undefined, f"{doc}: used before any definition (line of its blocks): {undefined}"
