"""The package's import graph, read from the source (every import, lazy ones included):
no cycles, and imports point downwards only (docs/architecture.md has the layers)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "engram_jax"

# Lowest first. A module may import its own layer or a lower one. A name ending in "."
# covers a subpackage.
LAYERS = (
    ("base", ("compressed_vocab", "hashing", "spatial_hashing", "config", "fp8", "errors",
              "quiet", "progress", "cli", "paths", "library_log", "config_files",
              "workdir_lock", "rendezvous", "sharding", "param_groups", "state_digest",
              "data.fingerprint", "npz_files")),
    ("layers", ("layers.", "tokenizer")),
    ("models", ("models.",)),
    ("tables and data", ("tables", "host_tables", "disk_tables", "allocation",
                         "import_engram", "checkpoints", "writers", "data.")),
    ("runs", ("run_config", "optim", "workdir", "tasks", "train_steps", "sizing", "train",
              "sampling.")),
    ("studies", ("studies.",)),
    ("entry points", ("main", "generate", "jobs")),
)
# Wings that must not reach into each other (sampling needs no training machinery).
SEPARATE = (("sampling.", ("train", "train_steps", "tasks", "data.", "writers", "optim")),
            ("train", ("sampling.",)), ("train_steps", ("sampling.",)), ("tasks", ("sampling.",)),
            ("data.", ("sampling.",)))


def _name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _matches(module: str, pattern: str) -> bool:
  return module.startswith(pattern) if pattern.endswith(".") else module == pattern


def _layer(module: str) -> int:
  for rank, (_, patterns) in enumerate(LAYERS):
    if any(_matches(module, p) for p in patterns):
      return rank
  raise AssertionError(f"engram_jax.{module} is in no layer of LAYERS: place it there")


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (relative names, `engram_jax.` dropped)."""
  modules = {_name(p): p for p in PACKAGE.rglob("*.py")}

  def resolve(dotted: str) -> str:
    name = dotted.removeprefix("engram_jax").lstrip(".")
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for module, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engram_jax"):
        deps.update(resolve(f"{node.module}.{a.name}") for a in node.names)
      elif isinstance(node, ast.Import):
        deps.update(resolve(a.name) for a in node.names if a.name.startswith("engram_jax"))
    graph[module] = {d for d in deps if d and d != module and not _is_package(d, modules)}
  return graph


def _is_package(name: str, modules) -> bool:
  return (PACKAGE / name.replace(".", "/") / "__init__.py").exists() and name in modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


GRAPH = import_graph()


def test_the_checker_sees_cycles_and_lazy_imports():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert "sampling.offload" in GRAPH["generate"]  # imported inside a function


def test_no_import_cycles():
  assert cycles(GRAPH) == []


def test_imports_point_downwards():
  upward = [f"{m} ({LAYERS[_layer(m)][0]}) -> {d} ({LAYERS[_layer(d)][0]})"
            for m in sorted(GRAPH) for d in sorted(GRAPH[m]) if _layer(d) > _layer(m)]
  assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_wings_stay_apart():
  for wing, forbidden in SEPARATE:
    for module in (m for m in GRAPH if _matches(m, wing)):
      bad = sorted(d for d in GRAPH[module] for f in forbidden if _matches(d, f))
      assert not bad, f"engram_jax.{module} imports {bad}"


# TensorFlow costs 3 to 5 s at import: only tensorflow-datasets sources may load it
# (clu's metric writers and periodic actions import it; parameter_overview does not).
TENSORFLOW_IMPORTERS = ("tensorflow", "clu.metric_writers", "clu.periodic_actions")
MAY_LOAD_TENSORFLOW = {"data.text": "tensorflow_datasets"}


def _imported_names(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return []


def test_only_tfds_sources_load_tensorflow():
  loads_tf = lambda name: any(name == t or name.startswith(t + ".") for t in TENSORFLOW_IMPORTERS)
  assert loads_tf("clu.metric_writers") and not loads_tf("clu.parameter_overview")
  found = []
  for path in PACKAGE.rglob("*.py"):
    module = _name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      found += [f"engram_jax.{module} imports {name}" for name in _imported_names(node)
                if (loads_tf(name) or name.startswith("tensorflow"))
                and MAY_LOAD_TENSORFLOW.get(module) != name]
  assert not found, found
