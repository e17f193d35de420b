"""Engram tables in host memory: exact == device training, resume, overlap, generation
from host and disk tables, and the errors of bad table files."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("clu")
pytest.importorskip("orbax.checkpoint")

from engram_jax import generate as generate_cli
from engram_jax import checkpoints, errors, host_tables, tables, train  # noqa: E402
from engram_jax import workdir as workdir_lib  # noqa: E402
from engram_jax import disk_tables

from tests import lm_test_config  # noqa: E402
from tests import runs as test_runs  # noqa: E402
from tests.conftest import tiny_model_config  # noqa: E402


def _config(placement="host", mode="exact", steps=4, **train_overrides):
  c = lm_test_config.get_config("tiny")
  c.train.update(steps=steps, eval_every=steps, table_optimizer="lazy_adam",
                 host_tables_mode=mode, warmup_steps=1)
  c.train.update(train_overrides)
  c.model.engram.placement = placement
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["train_loss"] for r in rows if "train_loss" in r]


def _newest(workdir):
  return max(checkpoints.saved_steps(workdir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4 steps with device tables and with exact host tables."""
  root = tmp_path_factory.mktemp("host_tables")
  out = {}
  for name, placement in (("device", "device"), ("host", "host")):
    out[name] = str(root / name)
    train.train_and_evaluate(_config(placement), out[name])
  return out


@pytest.mark.parametrize("name", ["lazy_adam", "rowwise_adagrad", "sgd"])
def test_host_update_equals_the_device_row_update(name):
  cfg = tiny_model_config()
  optimizer = tables.make_optimizer(name)
  rng = np.random.default_rng(0)
  spec = cfg.engram.hash_spec()
  tables_L = [rng.normal(size=(cfg.engram.padded_rows(spec.rows(i)), cfg.engram.head_dim))
              .astype(np.float32) for i in range(len(cfg.engram.layers))]
  states_L = [jax.tree_util.tree_map(np.asarray, optimizer.init(t)) for t in tables_L]
  store = host_tables.HostTableStore(
      cfg, [t.copy() for t in tables_L], optimizer,
      [jax.tree_util.tree_map(np.copy, s) for s in states_L], threads=3)
  sparse_L = []
  for table in tables_L:
    ids = rng.integers(0, table.shape[0], 40)
    ids_U, grads = tables.dedup(jnp.asarray(ids, jnp.int32),
                                jnp.asarray(rng.normal(size=(40, table.shape[1])), jnp.float32),
                                table.shape[0])
    sparse_L.append((np.asarray(ids_U), np.asarray(grads)))
  assert store.apply(sparse_L, 3, 0.05) == 0
  for i, (ids_U, grads) in enumerate(sparse_L):
    want, want_state, _ = tables.apply_rows(jnp.asarray(tables_L[i]),
                                            jax.tree_util.tree_map(jnp.asarray, states_L[i]),
                                            jnp.asarray(ids_U), jnp.asarray(grads),
                                            optimizer, jnp.int32(3), jnp.float32(0.05))
    np.testing.assert_allclose(store.tables_L[i], want, rtol=1e-6, atol=1e-7)
    for key, value in want_state.items():
      np.testing.assert_allclose(store.states_L[i][key], value, rtol=1e-6, atol=1e-7)
  # a gather over several threads equals one np.take
  ids = rng.integers(0, 50, (2, 7, len(cfg.engram.layers), spec.num_heads_total))
  for rows, table, row_ids in zip(store.gather(ids), store.tables_L, store.row_ids(ids)):
    np.testing.assert_array_equal(rows, np.take(table, row_ids, axis=0))
  store.close()


def test_exact_host_training_equals_device_training(runs):
  np.testing.assert_allclose(_losses(runs["host"]), _losses(runs["device"]), rtol=1e-6)
  cfg = workdir_lib.model_config(runs["host"])
  paths = tables.table_paths(cfg.engram)
  device_tables = workdir_lib.load(runs["device"], tables="host").tables
  host_run = workdir_lib.load(runs["host"], tables="host")
  host_params, saved_tables = host_run.params, host_run.tables
  for a, b in zip(device_tables.tables_L, saved_tables.tables_L):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(p[0] not in host_params or "table" not in host_params[p[0]]["engram"]
             for p in paths)


def test_host_tables_resume_exactly(runs, tmp_path, capsys):
  workdir = str(tmp_path / "resumed")
  train.train_and_evaluate(_config(stop_after_steps=2), workdir)
  train.train_and_evaluate(_config(), workdir)
  assert "Engram tables in host memory" in capsys.readouterr().out
  np.testing.assert_allclose(_losses(workdir), _losses(runs["host"]), rtol=1e-6)


def _tamper_host_digest(workdir, step):
  """As if a host-table array of checkpoint `step` had bytes changed in place: its
  recorded digest no longer matches what reads back."""
  path = os.path.join(workdir, "checkpoints", str(step), "data", "metadata")
  with open(path) as f:
    data = json.load(f)
  entries = data[checkpoints.HOST_DIGEST_KEY]
  name = next(n for n in entries if n.endswith("table"))
  entries[name][0] = (entries[name][0] + 1) % 2**32
  with open(path, "w") as f:
    json.dump(data, f)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A host-table run with checkpoints 2 and 4 (copied before each damage)."""
  workdir = str(tmp_path_factory.mktemp("host_tables") / "two")
  train.train_and_evaluate(_config(checkpoint_every=2), workdir)
  assert checkpoints.saved_steps(workdir) == [2, 4]
  return workdir


def _copy(workdir, target):
  shutil.copytree(workdir, target)
  return str(target)


def _damage_host_tables(workdir, step, damage):
  """Damage of the `host_tables` item of checkpoint `step`; what a message names."""
  item = os.path.join(workdir, "checkpoints", str(step), checkpoints.HOST_TABLES)
  if damage == "metadata":
    with open(os.path.join(item, "_METADATA"), "w") as f:
      f.write("garbage")
    return f"checkpoints/{step}/host_tables/_METADATA is not readable JSON"
  if damage == "manifest":
    os.remove(os.path.join(item, "manifest.ocdbt"))
    return f"checkpoints/{step}/host_tables/manifest.ocdbt is missing"
  if damage == "item":
    shutil.rmtree(item)
    return f"checkpoints/{step}/host_tables/ is missing"
  _tamper_host_digest(workdir, step)
  return "does not hold the values that were saved"


@pytest.mark.parametrize("damage", ["digest", "item"])
def test_damaged_host_tables_fall_back_or_stop(two_checkpoints, runs, tmp_path, capsys,
                                               damage):
  """Host tables are checked like the state: a newest checkpoint whose host tables do
  not read back as saved (bytes changed, the item lost) is moved aside and the run
  resumes from the one before; with none before, it stops with one line and moves
  nothing."""
  workdir = _copy(two_checkpoints, tmp_path / "damaged")
  names = _damage_host_tables(workdir, 4, damage)
  capsys.readouterr()
  train.train_and_evaluate(_config(steps=6, checkpoint_every=2), workdir)
  out = capsys.readouterr().out
  assert "warning: checkpoint 4, host tables: " in out and names in out, out
  assert "falling back to checkpoint 2" in out and "resumed from step 2" in out, out
  assert os.listdir(os.path.join(workdir, checkpoints.UNREADABLE_DIR)) == ["4"]
  only = _copy(runs["host"], tmp_path / "only")
  _damage_host_tables(only, 4, damage)
  with pytest.raises(ValueError, match=r"checkpoint 4, host tables: .*no older checkpoint"):
    train.train_and_evaluate(_config(steps=6), only)
  assert checkpoints.saved_steps(only) == [4]
  assert not os.path.exists(os.path.join(only, checkpoints.UNREADABLE_DIR))
  with pytest.raises(ValueError, match=r"no readable checkpoint \(step 4: host tables: "):
    workdir_lib.load(only, tables="host")


def test_host_tables_of_another_table_size_name_the_config(runs, tmp_path):
  """Tables that do not fit because the config changed are not damage: one line
  naming the field, and no checkpoint is moved aside."""
  workdir = _copy(runs["host"], tmp_path / "resized")
  c = _config(steps=6)
  c.model.engram.table_size = (1021,)
  with pytest.raises(ValueError, match=r"another model config \(model\.engram\.table_size: "
                                       r"\[509\] -> \[1021\]\)"):
    train.train_and_evaluate(c, workdir)
  assert checkpoints.saved_steps(workdir) == [4]
  assert not os.path.exists(os.path.join(workdir, checkpoints.UNREADABLE_DIR))


@pytest.mark.parametrize("damage", ["metadata", "manifest", "item", "digest"])
def test_readers_pass_over_damaged_host_tables(two_checkpoints, tmp_path, capfd, damage):
  """Generation reads a host-trained run's tables from the newest checkpoint whose
  host tables read back, with one warning line naming the damage of the newer one."""
  workdir = _copy(two_checkpoints, tmp_path / "damaged")
  names = _damage_host_tables(workdir, 4, damage)
  capfd.readouterr()
  assert workdir_lib.load(workdir, tables="host").step == 2
  err = capfd.readouterr().err
  assert err.startswith("warning: checkpoint 4 is unreadable (host tables: ") and names in err
  assert len(err.splitlines()) == 1, err


def test_overlap_is_one_step_stale_but_trains(runs, tmp_path):
  workdir = str(tmp_path / "overlap")
  train.train_and_evaluate(_config(mode="overlap"), workdir)
  exact, overlap = _losses(runs["host"]), _losses(workdir)
  assert overlap[:2] == pytest.approx(exact[:2], rel=1e-6)  # step 1's update: lr 0
  assert overlap[2:] != pytest.approx(exact[2:], rel=1e-7)  # stale rows from step 3 on
  assert np.all(np.isfinite(overlap)) and overlap[-1] == pytest.approx(exact[-1], abs=0.05)


def test_generation_reads_host_trained_tables_from_device_host_and_disk(runs, tmp_path,
                                                                      capsys):
  argv = [f"--workdir={runs['host']}", "--prompt=def ", "--max_new_tokens=5",
          "--temperature=0"]
  outputs = {}
  table_dir = str(tmp_path / "tables")
  assert workdir_lib.main(["export_tables", f"--workdir={runs['host']}", f"--out={table_dir}"]) == 0
  for tables_flag in ("device", "host", "disk"):
    capsys.readouterr()
    extra = [f"--tables={tables_flag}"] + ([f"--table_dir={table_dir}"]
                                           if tables_flag == "disk" else [])
    assert generate_cli.main(argv + extra) == 0
    outputs[tables_flag] = capsys.readouterr().out.split("--- sample 0 ---")[1]
  assert outputs["device"] == outputs["host"] == outputs["disk"]

  # a truncated table file and a table of the wrong shape: one line each, exit 2
  name = json.load(open(os.path.join(table_dir, disk_tables.TABLES_MANIFEST)))["tables"][0]["file"]
  path = os.path.join(table_dir, name)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  assert generate_cli.main(argv + ["--tables=disk", f"--table_dir={table_dir}"]) == 2
  err = capsys.readouterr().err
  assert "truncated" in err and len(err.strip().splitlines()) == 1
  np.save(path, np.zeros((8, 3), np.float32))
  assert generate_cli.main(argv + ["--tables=disk", f"--table_dir={table_dir}"]) == 2
  assert "has shape (8, 3)" in capsys.readouterr().err


@pytest.mark.parametrize("placement,optimizer,says", [
    ("host", "adam", "row-sparse table optimizer"),
    ("disk", "lazy_adam", "for generation"),
])
def test_placements_that_cannot_train_are_refused(tmp_path, placement, optimizer, says):
  with pytest.raises(ValueError, match=says):
    train.train_and_evaluate(_config(placement, table_optimizer=optimizer),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("first,then", [("device", "host"), ("host", "device")])
def test_a_run_moves_its_tables_between_device_and_host(runs, tmp_path, capsys, first,
                                                        then):
  workdir = str(tmp_path / "moved")
  train.train_and_evaluate(_config(first, stop_after_steps=2), workdir)
  train.train_and_evaluate(_config(then), workdir)
  assert f"from {first} to {then} memory" in capsys.readouterr().out
  np.testing.assert_allclose(_losses(workdir), _losses(runs["device"]), rtol=1e-6)
  assert workdir_lib.model_config(workdir).engram.placement == then


def test_a_placement_switch_that_stopped_before_its_first_save(runs, tmp_path, capsys):
  """A run switched from host to device tables writes config.json before its first
  save; stopped there, its newest checkpoint still keeps the tables in `host_tables`:
  readers and the next resume read them from there (they once looked in the params)."""
  workdir = _copy(runs["host"], tmp_path / "switched")
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  with open(path) as f:
    config = json.load(f)
  for model in (config["model"], config[workdir_lib.RESOLVED]["model"]):
    model["engram"]["placement"] = "device"
  with open(path, "w") as f:
    json.dump(config, f)
  assert workdir_lib.load(workdir).step == 4
  train.train_and_evaluate(_config("device", steps=6), workdir)
  assert "moved the tables of checkpoint 4 from host to device memory" in capsys.readouterr().out


def test_sigterm_saves_host_tables_and_resumes_exactly(runs, tmp_path, monkeypatch, capsys):
  """A real SIGTERM to this process during step 2 (the trainer's handler is installed):
  the run saves the host tables with step 2 and stops; the resume ends as if
  uninterrupted."""
  import signal
  real_apply = test_runs.signal_at_step(monkeypatch, host_tables.HostFeed, "apply", 2,
                                        signal.SIGTERM, step_arg=1)  # apply(rows, step)
  workdir = str(tmp_path / "preempted")
  with pytest.raises(errors.RunStopped) as stopped:  # not finished: callers must know
    train.train_and_evaluate(_config(), workdir)
  assert stopped.value.step == 2 and stopped.value.signum == signal.SIGTERM
  assert "stopped at step 2; checkpoint saved" in capsys.readouterr().out
  assert checkpoints.saved_steps(workdir) == [2]
  monkeypatch.setattr(host_tables.HostFeed, "apply", real_apply)
  train.train_and_evaluate(_config(), workdir)
  np.testing.assert_allclose(_losses(workdir), _losses(runs["host"]), rtol=1e-6)
