"""One trained run: its config, kind, model, variables, tokenizer and step (`load`).

A training workdir is described by one file, `config.json`: the run's config (what
`--print_config` prints) plus a `resolved_model` section, `{"kind": "lm" | "image",
"model": ModelConfig}`, the model as training resolved it (e.g. `vocab_size` from the
tokenizer). Training writes it (`write_run_metadata`) only once its resume restored.
Workdirs written before that section existed keep the resolved model in
`model_config.json`; they load and resume the same; their next run writes the section
into `config.json`, which is read first from then on, and leaves the old file alone.

Every reader of a trained run (sampling, studies, the table export) goes through
`load`, which restores the newest readable checkpoint with the Engram tables where
the caller wants them: in the params (`"device"`), or as `host_tables.HostTables` in
host RAM (`"host"`) or memory-mapped from an export (`"disk"`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import cli
from engram_jax import config as config_lib
from engram_jax import paths
from engram_jax.host_tables import HostTables
from engram_jax.layers import moe

CONFIG_FILE = "config.json"
LEGACY_MODEL_CONFIG = "model_config.json"  # the resolved model, in older workdirs
RESOLVED = "resolved_model"
KINDS = ("lm", "image")
PLACEMENTS = ("device", "host", "disk")
SAVED_COLLECTIONS = ("params", moe.BIAS)  # the model variables a checkpoint holds
_IMAGE_GRID = ("height", "width", "num_classes")


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run at its newest readable checkpoint.

  config: the run's `ml_collections.ConfigDict` (without the resolved section).
  model_cfg: `model.cfg`: a `ModelConfig` (lm) or `models.image.ImageModelConfig`.
  variables: `{"params": ...}`, plus the MoE `routing` biases where the model has them
    (`sampling.text` and `sampling.offload` take it whole; `params` is the tree alone).
  tables: the Engram tables as `HostTables` when loaded with `tables="host"|"disk"`
    (the params then hold none); None when they are in the params.
  tokenizer, vocab_map: lm runs (vocab_map: the compressed vocabulary, with Engram).
  """
  workdir: str
  config: Any
  kind: str
  model_cfg: Any
  model: nn.Module
  variables: dict
  step: int
  tokenizer: Any = None
  vocab_map: Optional[jax.Array] = None
  tables: Optional[HostTables] = None

  @property
  def params(self):
    return self.variables["params"]


# ----------------------------------------------------------------------------------
# Reading the run's description
# ----------------------------------------------------------------------------------
def kind_of(config) -> str:
  """"lm" or "image": `config.task`, else (runs older than it) "image" when the data
  section has a grid and classes."""
  kind = config.get("task")
  if kind is None:
    data = config.get("data") or {}
    kind = "image" if all(k in data for k in _IMAGE_GRID) else "lm"
  if kind not in KINDS:
    raise ValueError(f"task={kind!r} is invalid: choose one of {KINDS}")
  return kind


_RESTORE_CONFIG = "restore it from the run's launch command (`--print_config`)"


def _read_saved(workdir: str, fix: str = _RESTORE_CONFIG) -> dict:
  """The workdir's config.json as a dict; an unreadable one is one line ending `fix`."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    raise ValueError(f"--workdir={workdir!r} has no {CONFIG_FILE}; point it at a "
                     "directory written by `python -m engram_jax.main`")
  try:
    saved = json.loads(paths.read_text(path))
  except ValueError as err:
    raise ValueError(f"--workdir={workdir!r}: {CONFIG_FILE} is not readable JSON ({err}); "
                     f"{fix}") from None
  if not isinstance(saved, dict):
    raise ValueError(f"--workdir={workdir!r}: {CONFIG_FILE} holds no config object "
                     f"(a JSON {type(saved).__name__}); {fix}")
  return saved


def read_config(workdir: str):
  """(config, kind) of the run in `workdir`: its `config.json` as a ConfigDict, the
  resolved section left out. Reads no checkpoint."""
  import ml_collections
  saved = _read_saved(workdir)
  resolved = saved.pop(RESOLVED, None) or {}
  config = ml_collections.ConfigDict(saved)
  return config, resolved.get("kind") or kind_of(config)


def _resolved_model(workdir: str) -> tuple[dict, str]:
  """(the resolved model config as a dict, the file it is in); ({}, "") when the
  workdir has none or it is torn."""
  for name in (CONFIG_FILE, LEGACY_MODEL_CONFIG):
    try:
      saved = json.loads(paths.read_text(paths.join(workdir, name)))
      found = saved.get(RESOLVED, {}).get("model") if name == CONFIG_FILE else saved
    except (OSError, ValueError, AttributeError):
      continue
    if found:
      return found, name
  return {}, ""


def _model_config(workdir: str, config, kind: str):
  """(model_cfg, the file that describes it): `ModelConfig` or `ImageModelConfig`."""
  resolved, source = _resolved_model(workdir)
  if kind == "image":
    from engram_jax.models import image
    data = config.get("data") or {}
    if "model" not in config or not all(k in data for k in _IMAGE_GRID):
      raise ValueError(f"--workdir={workdir!r}: its {CONFIG_FILE} is not an image run (no "
                       "data.height/width/num_classes)")
    return image.make_image_config(resolved or config.model, data), source or CONFIG_FILE
  if not resolved:
    raise ValueError(f"--workdir={workdir!r}: its {CONFIG_FILE} has no {RESOLVED} section "
                     f"(and there is no {LEGACY_MODEL_CONFIG}); point it at a directory "
                     "written by `python -m engram_jax.main`")
  return config_lib.from_dict(resolved), source


def _without_mesh(model_cfg):
  """The run's model as a loaded run applies it: in this process, without a device mesh.
  A run trained with a sharded table lookup (`engram.lookup` psum or all_to_all, which
  need a mesh) reads the same rows with a gather here; the params are the same."""
  backbone = getattr(model_cfg, "model", None)  # an image model's; None for an LM
  cfg = backbone or model_cfg
  if cfg.engram.lookup == "gather":
    return model_cfg
  cfg = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, lookup="gather"))
  return cfg if backbone is None else dataclasses.replace(model_cfg, model=cfg)


def model_config(workdir: str):
  """The run's model config as training resolved it (`ModelConfig` for lm runs,
  `ImageModelConfig` for image runs); reads no checkpoint."""
  config, kind = read_config(workdir)
  return _model_config(workdir, config, kind)[0]


# ----------------------------------------------------------------------------------
# Loading the run
# ----------------------------------------------------------------------------------
def abstract_variables(model: nn.Module) -> dict:
  """ShapeDtypeStructs of the variables a checkpoint holds (params; MoE routing biases
  where the model has them), from shapes alone: nothing is allocated.

  Tracing the model's init is most of a small load's time, so the shapes are kept per
  model: loading the same run again (a notebook, a sampling loop over seeds) skips it.
  Each call returns its own containers, so a caller may edit the tree it gets.
  """
  return jax.tree_util.tree_map(lambda leaf: leaf, _abstract_variables(model))


@functools.lru_cache(maxsize=8)
def _abstract_variables(model: nn.Module) -> dict:
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return {k: v for k, v in nn.unbox(boxed).items() if k in SAVED_COLLECTIONS and v}


def _on_host(params, paths):
  """`params` with the leaves at `paths` restored into host memory (never on an
  accelerator: a table larger than the device never lands on it)."""
  from engram_jax import host_tables
  host, wanted = host_tables.host_memory_sharding(), set(paths)

  def place(path, leaf):
    if tuple(getattr(k, "key", k) for k in path) not in wanted:
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=host)
  return jax.tree_util.tree_map_with_path(place, params)


def _restore(workdir: str, model: nn.Module, cfg: config_lib.ModelConfig, placement: str,
             table_dir: Optional[str], config_file: str):
  """(variables, HostTables or None, step) of the newest readable checkpoint.

  A host-trained run's checkpoint keeps its tables in the `host_tables` item, not in
  the params; with `placement="disk"` the checkpoint's tables are never read.
  """
  from engram_jax import checkpoints, host_tables
  from engram_jax import tables as tables_lib
  abstract = abstract_variables(model)
  paths = tables_lib.table_paths(cfg.engram) if cfg.engram.layers else []
  host_item = bool(paths) and host_trained(workdir)
  items = dict(abstract)
  if placement == "host":
    items["params"] = _on_host(items["params"], paths)
  tables_abstract = []
  if placement == "disk" or host_item:
    items["params"], tables_abstract = tables_lib.split_tables(items["params"], paths)
  skip = tuple("/".join(p) for p in paths) if placement == "disk" else ()
  # a host-trained run's tables: only the tables are read, not their optimizer state
  host_abstract = ({p[0]: {"table": t} for p, t in zip(paths, tables_abstract)}
                   if host_item and placement != "disk" else None)
  restored, step = checkpoints.restore_checkpoint(workdir, items, config_file, skip,
                                                  host_abstract)
  saved_host = restored.pop(checkpoints.HOST_TABLES, None)
  params, tables = restored["params"], None
  if placement == "disk":
    from engram_jax.disk_tables import disk_tables
    tables = disk_tables(cfg, table_dir, workdir=workdir, step=step)
  elif host_item:
    tables_L = [saved_host[p[0]]["table"] for p in paths]
    if placement == "host":
      tables = HostTables(cfg, tables_L)
    else:
      params = tables_lib.merge_tables(params, paths, [jnp.asarray(t) for t in tables_L])
  elif placement == "host":
    params, tables = host_tables.split_params(params, cfg)
  return {**restored, "params": params}, tables, step


def load(workdir: str, tables: str = "device", table_dir: Optional[str] = None,
         kind: Optional[str] = None) -> Run:
  """The run in `workdir` at its newest readable checkpoint.

  tables: where an lm run's Engram tables go: "device" (in the params), "host"
    (restored into host RAM as `HostTables`) or "disk" (memory-mapped from `table_dir`,
    written by `export_tables`; the checkpoint's tables are not read).
  kind: "lm" or "image" for a caller that reads only that kind (a one-line error
    otherwise, before any checkpoint is read).

  Errors are one-line ValueErrors naming what to fix: no config, no checkpoint, a
  config that does not fit the checkpoint. An unreadable newer checkpoint is one
  warning line, and the one before it loads.
  """
  if tables not in PLACEMENTS:
    raise ValueError(f"--tables={tables!r} is invalid: choose one of {PLACEMENTS}")
  if (tables == "disk") != bool(table_dir):
    raise ValueError("--tables=disk and --table_dir go together: give both (the "
                     "directory written by `python -m engram_jax.workdir export_tables`)")
  config, run_kind = read_config(workdir)
  if kind is not None and run_kind != kind:
    raise ValueError(f"--workdir={workdir!r} holds a {run_kind!r} run (its {CONFIG_FILE}); "
                     f"this command reads {kind!r} runs, and `python -m engram_jax.generate` "
                     "samples from either")
  model_cfg, source = _model_config(workdir, config, run_kind)
  model_cfg = _without_mesh(model_cfg)
  cfg = getattr(model_cfg, "model", model_cfg)  # an image model's backbone
  tok = vocab_map = None
  if run_kind == "image":
    from engram_jax.models.image import ImageARModel
    if tables != "device":
      raise ValueError(f"--tables={tables}: image runs sample with their tables on the "
                       "device; offloaded tables are for language models")
    model = ImageARModel(model_cfg)
  else:
    from engram_jax import tokenizer as tokenizer_lib
    from engram_jax.models.lm import EngramLM
    if tables != "device" and not cfg.engram.layers:
      raise ValueError(f"--workdir={workdir!r} holds a model without Engram "
                       "(model.engram.layers is empty): there are no tables to offload")
    tok = tokenizer_lib.workdir_tokenizer(workdir)
    model = EngramLM(model_cfg)
  variables, host, step = _restore(workdir, model, cfg, tables, table_dir, source)
  if tok is not None and cfg.engram.layers:
    from engram_jax import tokenizer as tokenizer_lib
    vocab_map = jnp.asarray(tokenizer_lib.workdir_compressed_vocab(
        workdir, tok, cfg.engram.hash, cfg.engram.compressed_vocab_size))
  return Run(workdir, config, run_kind, model_cfg, model, variables, step, tok, vocab_map,
             host)


# ----------------------------------------------------------------------------------
# Writing the run's description (training)
# ----------------------------------------------------------------------------------
def config_json(config) -> str:
  return (config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort")
          else json.dumps(dict(config), indent=1))


def write_run_metadata(workdir: str, config, model_cfg: config_lib.ModelConfig) -> None:
  """`config.json` with its resolved section (kind, `model_cfg`), atomically; called
  only once the run's checkpoint restored (or there was none), so a failed resume
  never rewrites it. An older run's `model_config.json` is left as it is (nothing the
  user did not ask for is deleted); the resolved section here takes precedence."""
  if jax.process_index() != 0:
    return
  saved = json.loads(config_json(config))
  saved[RESOLVED] = {"kind": kind_of(config), "model": config_lib.to_dict(model_cfg)}
  paths.atomic_write_text(paths.join(workdir, CONFIG_FILE), json.dumps(saved, indent=1))


def saved_model_config(workdir: str) -> dict:
  """The workdir's resolved model config as a dict ({} when it has none or it is torn)."""
  return _resolved_model(workdir)[0]


def model_config_differences(workdir: str, model_cfg: config_lib.ModelConfig) -> list[str]:
  """`model.FIELD: saved -> now` for each field that differs from the workdir's saved
  model config (none when the workdir has none)."""
  from flax import traverse_util

  from engram_jax.data import fingerprint
  saved = saved_model_config(workdir)
  if not saved:
    return []
  now = json.loads(json.dumps(config_lib.to_dict(model_cfg)))  # tuples -> lists
  flat = lambda tree: {f"model.{k}": v for k, v in
                       traverse_util.flatten_dict(tree, sep=".").items()}
  return fingerprint.differences(flat(saved), flat(now))

# ----------------------------------------------------------------------------------
# Before a run writes: a writable workdir that it may resume
# ----------------------------------------------------------------------------------
def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and proves it writable before any work that would be lost (a
  remote one, gs://, with one small object: no credentials or no network fail here)."""
  try:
    # host and pid: every process of a multi-host run probes a shared workdir
    paths.make_writable_dir(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    from engram_jax import checkpoints
    for name in (checkpoints.CHECKPOINT_DIR, checkpoints.UNREADABLE_DIR):
      path = paths.join(workdir, name)
      if paths.exists(path) and not paths.is_dir(path):
        raise ValueError(f"--workdir={workdir!r}: {path} is a file, where the run keeps "
                         "its checkpoints; move it away or choose another --workdir")
  except OSError as err:
    raise ValueError(f"--workdir={workdir!r} is not a writable directory "
                     f"({err.strerror or str(err) or type(err).__name__}); choose another "
                     "--workdir") from None


def remove_if_only_lock(workdir: str, lock) -> None:
  """A workdir this run created (the caller checks) and left holding nothing but the
  lock file that `lock` (a held `WorkdirLock`) holds goes; anything else in it stays
  (`rmdir` refuses a non-empty one). Only the lock's holder may do this: a run that
  failed to take the lock would remove the lock of the run that holds it."""
  from engram_jax import workdir_lock
  if not lock.held:
    return
  try:
    if os.listdir(workdir) == [workdir_lock.LOCK_FILE]:
      lock.release(remove_file=True)
      os.rmdir(workdir)
  except OSError:  # not empty, or already gone: leave it as it is
    pass


def check_resumable(run, workdir: str) -> None:
  """A workdir with checkpoints resumes only with the table optimizer that wrote them
  (their state layouts differ) and, for text, with the `data.vocab_size` its own
  tokenizer was trained with (the workdir's tokenizer is reused whatever the config
  says, so another value would be recorded but not used); `run` is the `RunConfig`,
  the workdir's config.json is read before it is rewritten."""
  from engram_jax import checkpoints
  saved, ckpts = (paths.join(workdir, name) for name in ("config.json",
                                                          checkpoints.CHECKPOINT_DIR))
  if not paths.exists(saved):
    return
  if not any(name.isdigit() for name in paths.listdir(ckpts)):
    _check_config_is_a_run(workdir)  # a new run rewrites it
    return
  saved_config = _read_saved(workdir, f"{_RESTORE_CONFIG}, or move it aside to resume "
                                     "with this command's config (it must then give the "
                                     "same model, engram.placement and "
                                     "train.table_optimizer)")

  def section(name: str) -> dict:
    value = saved_config.get(name)
    return value if isinstance(value, dict) else {}
  before = section("train").get("table_optimizer", "adam")
  now = run.train.table_optimizer
  if before != now:
    raise ValueError(f"train.table_optimizer={now!r} but the checkpoints in --workdir="
                     f"{workdir!r} were trained with {before!r}; resume with "
                     f"--config.train.table_optimizer={before} or use a new --workdir")
  data, saved_data = run.data, section("data")
  trained_here = not (getattr(data, "tokenizer_path", "") or saved_data.get("tokenizer_path"))
  before = saved_data.get("vocab_size")
  if not (trained_here and hasattr(data, "vocab_size") and before is not None
          and before != data.vocab_size):
    return
  from engram_jax import tokenizer as tokenizer_lib
  if not paths.exists(paths.join(workdir, tokenizer_lib.WORKDIR_TOKENIZER)):
    return
  # config.json may hold a value an older resume recorded but did not use: the
  # tokenizer itself has the requested size, or fewer tokens on a small corpus
  if tokenizer_lib.workdir_tokenizer(workdir).get_vocab_size() != data.vocab_size:
    raise ValueError(f"data.vocab_size={data.vocab_size} but --workdir={workdir!r} trained "
                     f"its tokenizer with data.vocab_size={before} and resumes with it; "
                     f"resume with --config.data.vocab_size={before} or use a new --workdir")


def _check_config_is_a_run(workdir: str) -> None:
  """A `config.json` a new run would replace must be one a run wrote (one that stopped
  before its first checkpoint): any other file of that name is the user's."""
  fix = "training here would replace it: move it aside, or give another --workdir"
  saved = _read_saved(workdir, fix)
  if not (RESOLVED in saved or {"model", "train"} <= saved.keys()):
    raise ValueError(f"--workdir={workdir!r}: its {CONFIG_FILE} is not a run's config (no "
                     f"{RESOLVED}, model or train section) and there is no checkpoint; "
                     f"{fix}")


def restore_or_explain(manager, abstract, workdir, model_cfg, exclude=()):
  """`checkpoints.restore_latest`, with a failed restore naming the model fields that
  differ from the workdir's saved config (the usual cause), or the older layer layout."""
  from engram_jax import checkpoints
  try:
    return checkpoints.restore_latest(manager, abstract, exclude)
  except ValueError:
    steps = checkpoints.saved_steps(workdir)
    if steps and checkpoints.segmented_step(workdir, steps[-1]):
      raise ValueError(
          f"--workdir={workdir!r}: checkpoint {steps[-1]} has the segmented layer layout "
          "(engram_jax before the one scanned stack: Engram blocks outside the scan), "
          "which training does not resume; generation and evaluation convert it when "
          "loading; resume with the engram_jax that wrote it, or use a new --workdir"
      ) from None
    differing = model_config_differences(workdir, model_cfg)
    if not differing:
      raise
    raise ValueError(
        f"--workdir={workdir!r} was trained with another model config "
        f"({'; '.join(differing)}): its checkpoints do not restore; resume with the "
        "workdir's config (see its config.json) or use a new --workdir") from None


def host_trained(workdir: str) -> bool:
  """Whether the workdir's checkpoints keep their Engram tables in the `host_tables`
  item: its config says `engram.placement="host"`, or its newest checkpoint has that
  item (a run that switched placement rewrites config.json before its first save)."""
  from engram_jax import checkpoints
  return (saved_placement(workdir) == "host" or
          checkpoints.newest_has_host_tables(workdir))


def saved_placement(workdir: str) -> str:
  """`engram.placement` of the run that wrote the workdir's checkpoints ("device" for
  runs that predate it or have no saved model config)."""
  return saved_model_config(workdir).get("engram", {}).get("placement", "device")


# ----------------------------------------------------------------------------------
# python -m engram_jax.workdir export_tables --workdir=W --out=DIR
# ----------------------------------------------------------------------------------
def export_tables(workdir: str, out_dir: str, overwrite: bool = False) -> str:
  """Writes the newest checkpoint's Engram tables as `disk_tables` files into
  `out_dir` (runs trained with device or host tables alike); returns `out_dir`. An
  `out_dir` holding an export already is refused unless `overwrite`, and one that
  another export is writing always; a failed export leaves no directory it made."""
  from engram_jax import disk_tables
  read_config(workdir)  # a workdir without a run is named before --out is made
  with disk_tables.exporting_to(out_dir, overwrite):  # before the checkpoint is read
    run = load(workdir, tables="host", kind="lm")
    return disk_tables.write_tables(run.tables, out_dir, workdir=paths.absolute(workdir),
                                    step=run.step)


def main(argv=None) -> int:
  from engram_jax import disk_tables
  parser = cli.Parser(
      prog="python -m engram_jax.workdir",
      description="Write a workdir's Engram tables as memory-mappable .npy files "
                  "(`python -m engram_jax.generate --tables=disk --table_dir=DIR`).")
  sub = parser.add_subparsers(dest="command", required=True)
  export = sub.add_parser("export_tables", help="tables of the newest checkpoint -> DIR")
  export.add_argument("--workdir", required=True)
  export.add_argument("--out", required=True)
  export.add_argument("--overwrite", action="store_true",
                      help="replace an export already in --out")
  args = parser.parse_args(argv)

  def body():
    out = export_tables(args.workdir, args.out, args.overwrite)
    print(f"wrote {out}/{disk_tables.TABLES_MANIFEST}")
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
