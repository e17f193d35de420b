"""One object for a trained run: `workdir.load` restores what the checkpoint holds, tells
image runs from LM runs, reads workdirs written before config.json held the resolved
model (and resumes them), and puts the tables on the device, in host RAM or on disk
with the same logits."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from engram_jax import config as config_lib  # noqa: E402
from engram_jax import workdir  # noqa: E402
from engram_jax.layers import moe  # noqa: E402

from tests import lm_test_config  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402


def _raw_state(path: str, step: int):
  """The checkpoint's `state` item as orbax reads it with no target: no model code."""
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(path, "checkpoints", str(step), "state"))


def _assert_same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _old_style(trained_workdir, target) -> str:
  """A copy of the run as written before config.json held the resolved model: the
  config alone in config.json, the resolved model in model_config.json."""
  path = shutil.copytree(trained_workdir, target)
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  resolved = saved.pop(workdir.RESOLVED)
  for name, value in (("config.json", saved), ("model_config.json", resolved["model"])):
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      json.dump(value, f, indent=1)
  return str(path)


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw restore
def test_an_lm_run_loads_the_checkpoint_it_holds(trained_workdir, caplog):
  run = workdir.load(trained_workdir)
  assert caplog.records == []  # no library log lines (orbax's item warnings)
  assert run.kind == "lm" and run.step == 3 and run.tables is None
  assert run.config.train.steps == 3 and workdir.RESOLVED not in run.config
  assert run.model.cfg is run.model_cfg and set(run.variables) == {"params"}
  assert run.model_cfg.vocab_size == run.tokenizer.get_vocab_size() > 0
  assert run.vocab_map.shape == (run.model_cfg.vocab_size,)
  _assert_same_tree(run.params, _raw_state(trained_workdir, 3)["params"])
  with open(os.path.join(trained_workdir, "config.json"), encoding="utf-8") as f:
    resolved = json.load(f)[workdir.RESOLVED]
  assert resolved["kind"] == "lm" and config_lib.from_dict(resolved["model"]) == run.model_cfg
  assert not os.path.exists(os.path.join(trained_workdir, "model_config.json"))


def test_a_run_trained_with_a_sharded_lookup_samples_without_a_mesh(trained_workdir,
                                                                     tmp_path):
  """`engram.lookup=all_to_all` needs a mesh; sampling a loaded run has none, and reads
  the same rows with a gather (the params do not depend on the lookup)."""
  from engram_jax import jobs
  path = shutil.copytree(trained_workdir, tmp_path / "all_to_all")
  with open(path / "config.json", encoding="utf-8") as f:
    saved = json.load(f)
  saved["model"]["engram"]["lookup"] = "all_to_all"
  saved[workdir.RESOLVED]["model"]["engram"]["lookup"] = "all_to_all"
  with open(path / "config.json", "w", encoding="utf-8") as f:
    json.dump(saved, f, indent=1)
  run = workdir.load(str(path))
  assert run.model_cfg.engram.lookup == "gather"
  assert run.config.model.engram.lookup == "all_to_all"  # the run's record is kept
  settings = dict(num_samples=2, max_new_tokens=6, temperature=0.8, top_k=20)
  assert jobs.generate(str(path), "def ", **settings) == jobs.generate(trained_workdir, "def ",
                                                                       **settings)


def test_abstract_variables_hold_what_a_checkpoint_holds():
  from engram_jax.models.lm import EngramLM
  cfg = tiny_model_config()
  dense = workdir.abstract_variables(EngramLM(cfg))
  assert set(dense) == {"params"}
  assert dense["params"]["block_1"]["engram"]["table"].shape[1] == cfg.engram.head_dim
  routed = config_lib.validate(dataclasses.replace(
      cfg, moe=config_lib.MoEConfig(num_experts=4, expert_dim=16,
                                                    balance="bias")))
  assert set(workdir.abstract_variables(EngramLM(routed))) == {"params", moe.BIAS}


def test_abstract_variables_trace_a_model_once_and_hand_out_their_own_trees():
  from engram_jax.models.lm import EngramLM
  cfg = tiny_model_config(seed=11)  # a model no other test of this process loads
  traced = workdir._abstract_variables.cache_info().misses
  first = workdir.abstract_variables(EngramLM(cfg))
  first["params"].pop("block_1")  # a caller editing its tree ...
  second = workdir.abstract_variables(EngramLM(cfg))  # an equal model: no second trace
  assert workdir._abstract_variables.cache_info().misses == traced + 1
  assert "block_1" in second["params"]  # ... leaves the next caller's intact


@pytest.mark.parametrize("saved, kind", [
    ({"task": "image", "data": {}}, "image"),
    ({"task": "lm", "data": {"height": 8, "width": 8, "num_classes": 10}}, "lm"),
    ({"model": {}, "data": {"height": 8, "width": 8, "num_classes": 10}}, "image"),  # pre-`task`
    ({"model": {}, "data": {"source": "stdlib"}}, "lm"),
    ({"data": {}, workdir.RESOLVED: {"kind": "image", "model": {}}}, "image"),
])
def test_the_kind_comes_from_the_config(tmp_path, saved, kind):
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config, found = workdir.read_config(str(tmp_path))
  assert found == kind and workdir.RESOLVED not in config


def test_unreadable_configs_are_one_line(tmp_path):
  with pytest.raises(ValueError, match="has no config.json; point it at a directory"):
    workdir.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"task": "video"}')
  with pytest.raises(ValueError, match=r"^task='video' is invalid: choose one of"):
    workdir.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"task": "lm"')
  with pytest.raises(ValueError, match="config.json is not readable JSON"):
    workdir.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"task": "lm"}')
  with pytest.raises(ValueError, match="no resolved_model section .*no model_config.json"):
    workdir.load(str(tmp_path))
  with pytest.raises(ValueError, match="--tables=disk and --table_dir go together"):
    workdir.load(str(tmp_path), tables="disk")
  with pytest.raises(ValueError, match=r"--tables='nvme' is invalid"):
    workdir.load(str(tmp_path), tables="nvme")


def test_run_metadata_is_one_file_that_takes_precedence_over_an_older_pair(tmp_path):
  config, model_cfg = lm_test_config.get_config("tiny"), tiny_model_config()
  (tmp_path / "model_config.json").write_text(json.dumps({"width": 1}))
  workdir.write_run_metadata(str(tmp_path), config, model_cfg)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model_config.json"]  # kept
  assert json.loads((tmp_path / "model_config.json").read_text()) == {"width": 1}
  read, kind = workdir.read_config(str(tmp_path))
  assert kind == "lm" and read.to_dict() == json.loads(workdir.config_json(config))
  assert workdir.saved_model_config(str(tmp_path)) == json.loads(
      json.dumps(config_lib.to_dict(model_cfg)))
  wider = dataclasses.replace(model_cfg, width=64)
  assert workdir.model_config_differences(str(tmp_path), wider) == ["model.width: 32 -> 64"]
  (tmp_path / "model_config.json").unlink()
  (tmp_path / "config.json").write_text('{"torn')
  assert workdir.saved_model_config(str(tmp_path)) == {}


def test_an_old_two_file_workdir_loads_and_resumes(trained_workdir, tmp_path, capsys):
  from engram_jax import train
  old = _old_style(trained_workdir, tmp_path / "old")
  new_run, old_run = workdir.load(trained_workdir), workdir.load(old)
  assert old_run.model_cfg == new_run.model_cfg and old_run.step == 3
  _assert_same_tree(old_run.variables, new_run.variables)
  assert workdir.model_config(old) == new_run.model_cfg
  wider = dataclasses.replace(new_run.model_cfg, width=64)
  assert workdir.model_config_differences(old, wider) == ["model.width: 32 -> 64"]

  # an edited model_config.json is named as the file that does not fit
  edited = _old_style(trained_workdir, tmp_path / "edited")
  with open(os.path.join(edited, "model_config.json"), encoding="utf-8") as f:
    resolved = json.load(f)
  resolved["width"] = 64
  with open(os.path.join(edited, "model_config.json"), "w", encoding="utf-8") as f:
    json.dump(resolved, f)
  with pytest.raises(ValueError, match="model_config.json does not match checkpoint 3"):
    workdir.load(edited)

  config = lm_test_config.get_config("tiny")
  config.train.update(steps=4, eval_every=4)
  legacy = os.path.join(old, "model_config.json")
  with open(legacy, "rb") as f:
    legacy_bytes = f.read()
  capsys.readouterr()
  train.train_and_evaluate(config, old)
  assert "resumed from step 3" in capsys.readouterr().out
  with open(legacy, "rb") as f:  # the older run's file is kept, untouched
    assert f.read() == legacy_bytes
  resumed = workdir.load(old)
  assert resumed.step == 4 and resumed.model_cfg == new_run.model_cfg


def test_export_into_a_used_or_unwritable_out_is_one_line(trained_workdir, tmp_path, capsys):
  """An export already in --out is not replaced unless asked (--overwrite); an --out
  that cannot be written is named, before the checkpoint is read."""
  out = tmp_path / "tables"
  assert workdir.main(["export_tables", f"--workdir={trained_workdir}", f"--out={out}"]) == 0
  manifest = (out / "tables.json").read_text()
  (out / "tables.json").write_text(manifest.replace('"step": 3', '"step": 99'))
  assert workdir.main(["export_tables", f"--workdir={trained_workdir}", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert f"--out='{out}' holds an export already" in err and "--overwrite" in err, err
  assert '"step": 99' in (out / "tables.json").read_text()  # left as it was
  assert workdir.main(["export_tables", f"--workdir={trained_workdir}", f"--out={out}",
                       "--overwrite"]) == 0
  assert (out / "tables.json").read_text() == manifest
  blocked = tmp_path / "a_file"
  blocked.write_text("not a directory")
  assert workdir.main(["export_tables", f"--workdir={trained_workdir}",
                       f"--out={blocked / 'tables'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --out='{blocked / 'tables'}' is not a writable directory"), err


def test_host_and_disk_tables_give_the_device_logits(trained_workdir, tmp_path):
  from engram_jax.sampling import offload
  device = workdir.load(trained_workdir)
  table_dir = workdir.export_tables(trained_workdir, str(tmp_path / "tables"))
  with open(os.path.join(table_dir, "tables.json"), encoding="utf-8") as f:
    assert json.load(f)["step"] == 3
  tokens = np.asarray([device.tokenizer.encode("def main():\n  return 1").ids], np.int32)
  want = np.asarray(device.model.apply(device.variables, tokens,
                                       ngram_tokens_BxT=device.vocab_map[tokens]))
  for placement, directory in (("host", None), ("disk", table_dir)):
    run = workdir.load(trained_workdir, tables=placement, table_dir=directory)
    assert run.step == 3 and "table" not in run.params["block_1"]["engram"]
    for table, layer in zip(run.tables.tables_L, run.model_cfg.engram.layers):
      np.testing.assert_array_equal(
          table, np.asarray(device.params[f"block_{layer}"]["engram"]["table"]))
    got = offload.logits(run.model, run.variables, run.tables, tokens, run.vocab_map)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
