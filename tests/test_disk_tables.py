"""Disk tables' export and manifest: one export owns --out at a time, a malformed or
mismatched manifest is one line naming what differs, and a failed export leaves no
directory it made. Tiny tables, no training: the checkpoint read is stubbed."""
import json
import os
import threading
import types

import numpy as np
import pytest

from engram_jax import disk_tables
from engram_jax import workdir as workdir_lib
from engram_jax.host_tables import HostTables

from tests.conftest import tiny_model_config

CFG = tiny_model_config()


def _tables(seed: int = 0) -> HostTables:
  e, spec = CFG.engram, CFG.engram.hash_spec()
  rng = np.random.default_rng(seed)
  return HostTables(CFG, [rng.standard_normal((e.padded_rows(spec.rows(i)), e.head_dim))
                          .astype(np.float32) for i in range(len(e.layers))])


@pytest.fixture
def stub_run(monkeypatch, tmp_path):
  """`export_tables` of a workdir whose checkpoint is `_tables()` at step 3."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  monkeypatch.setattr(workdir_lib, "read_config", lambda w: (None, "lm"))
  monkeypatch.setattr(workdir_lib, "load", lambda w, **kw: types.SimpleNamespace(
      tables=_tables(), step=3))
  return str(workdir)


def _manifest(table_dir) -> dict:
  with open(os.path.join(table_dir, disk_tables.TABLES_MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def test_a_second_export_to_the_same_out_is_refused_while_the_first_writes(
    stub_run, tmp_path, monkeypatch, capsys):
  """Two concurrent writers: the first is held inside its first table file, the second
  (the CLI) is refused in one line naming the first's pid, and the first completes."""
  out = str(tmp_path / "tables")
  writing, go_on = threading.Event(), threading.Event()
  save = disk_tables._save_npy

  def held_save(path, array):
    writing.set()
    assert go_on.wait(30)
    save(path, array)
  monkeypatch.setattr(disk_tables, "_save_npy", held_save)
  result = {}
  first = threading.Thread(target=lambda: result.update(
      out=workdir_lib.export_tables(stub_run, out)))
  first.start()
  try:
    assert writing.wait(30)
    monkeypatch.setattr(disk_tables, "_save_npy", save)
    for extra in ([], ["--overwrite"]):
      assert workdir_lib.main(["export_tables", f"--workdir={stub_run}", f"--out={out}",
                               *extra]) == 2
      err = capsys.readouterr().err
      assert err.startswith(f"error: --out={out!r} is in use by this process (another "
                            f"thread or notebook cell, pid {os.getpid()}) on host "), err
      assert "wait for that export to finish, stop it, or use another --out" in err
      assert len(err.splitlines()) == 1
  finally:
    go_on.set()
    first.join(30)
  assert result["out"] == out
  assert sorted(os.listdir(out)) == ["block_1.npy", "block_3.npy", "tables.json"]
  assert _manifest(out)["step"] == 3
  loaded = disk_tables.disk_tables(CFG, out)
  for a, b in zip(loaded.tables_L, _tables().tables_L):
    np.testing.assert_array_equal(a, b)
  # the export done, the emptiness check (under the lock) refuses a second one
  assert workdir_lib.main(["export_tables", f"--workdir={stub_run}", f"--out={out}"]) == 2
  assert "holds an export already" in capsys.readouterr().err


def test_a_lock_left_by_a_killed_export_is_taken_over(stub_run, tmp_path):
  out = tmp_path / "tables"
  out.mkdir()
  (out / disk_tables.EXPORT_LOCK).write_text('{"pid": 999999999}')  # no flock held on it
  assert workdir_lib.export_tables(stub_run, str(out)) == str(out)
  assert not (out / disk_tables.EXPORT_LOCK).exists()
  assert _manifest(out)["tables"][0]["file"] == "block_1.npy"


def test_a_failed_export_leaves_no_directory_it_made(stub_run, tmp_path, monkeypatch,
                                                     capsys):
  missing = tmp_path / "missing"
  out = tmp_path / "new" / "tables"
  monkeypatch.undo()  # the real workdir reader
  assert workdir_lib.main(["export_tables", f"--workdir={missing}", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --workdir='{missing}' has no config.json"), err
  assert not (tmp_path / "new").exists()

  made = []

  def broken_load(workdir, **kwargs):  # the checkpoint fails after --out was made
    made.append(os.path.isdir(out))
    raise ValueError("no readable checkpoint")
  monkeypatch.setattr(workdir_lib, "read_config", lambda w: (None, "lm"))
  monkeypatch.setattr(workdir_lib, "load", broken_load)
  assert workdir_lib.main(["export_tables", f"--workdir={stub_run}", f"--out={out}"]) == 2
  assert made == [True] and not (tmp_path / "new").exists()
  kept = tmp_path / "kept"  # an empty directory of the user's stays
  kept.mkdir()
  assert workdir_lib.main(["export_tables", f"--workdir={stub_run}", f"--out={kept}"]) == 2
  assert kept.is_dir() and os.listdir(kept) == []


@pytest.fixture
def exported(tmp_path):
  out = str(tmp_path / "tables")
  disk_tables.write_tables(_tables(), out, workdir=str(tmp_path / "run"), step=3)
  return out


def _edit(table_dir, value) -> None:
  with open(os.path.join(table_dir, disk_tables.TABLES_MANIFEST), "w") as f:
    json.dump(value, f)


@pytest.mark.parametrize("manifest,says", [
    ([], r'is not an export manifest \(a JSON object with a "tables" list\)'),
    ({"tables": {"file": "block_1.npy"}}, "is not an export manifest"),
    ({"tables": [{"shape": [2560, 8]}]}, 'entry 0 of .* needs a "file" name'),
    ({"tables": [{"file": "../block_1.npy", "shape": [64, 8]}]}, 'entry 0 .* "file" name'),
    ({"tables": [{"file": "block_1.npy", "shape": "64x8"}]}, 'an integer "shape"'),
])
def test_a_malformed_manifest_is_one_line(exported, manifest, says):
  _edit(exported, manifest)
  with pytest.raises(ValueError, match=says) as err:
    disk_tables.disk_tables(CFG, exported)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"--table_dir={exported!r}")
  assert "export the tables again" in message


def test_shape_errors_name_what_differs(exported):
  manifest = _manifest(exported)
  want = tuple(manifest["tables"][0]["shape"])
  path = os.path.join(exported, "block_1.npy")
  # the manifest edited: the file fits the model, the record does not
  manifest["tables"][0]["shape"] = [want[0] + 1, want[1]]
  _edit(exported, manifest)
  with pytest.raises(ValueError) as err:
    disk_tables.disk_tables(CFG, exported)
  assert str(err.value) == (
      f"--table_dir: {path} has shape {want} but tables.json records "
      f"{(want[0] + 1, want[1])} (a file replaced or a manifest edited by hand); export "
      "the tables again")
  # file and record agree, the model differs
  np.save(path, np.zeros((8, 3), np.float32))
  manifest["tables"][0]["shape"] = [8, 3]
  _edit(exported, manifest)
  with pytest.raises(ValueError, match=rf"has shape \(8, 3\); this model needs "
                                       rf"\({want[0]}, {want[1]}\)"):
    disk_tables.disk_tables(CFG, exported)
  # all three differ
  manifest["tables"][0]["shape"] = [9, 3]
  _edit(exported, manifest)
  with pytest.raises(ValueError, match=rf"has shape \(8, 3\) but tables.json records "
                                       rf"\(9, 3\), and this model needs \({want[0]}, "):
    disk_tables.disk_tables(CFG, exported)


def test_a_file_of_another_dtype_or_an_empty_one_is_one_line(exported):
  """A float16 file of the right shape was read (other rows than exported); float64
  failed inside jax; an empty file was a traceback (EOFError)."""
  path = os.path.join(exported, "block_1.npy")
  want = tuple(_manifest(exported)["tables"][0]["shape"])
  for dtype in (np.float16, np.float64):
    np.save(path, np.zeros(want, dtype))
    with pytest.raises(ValueError) as err:
      disk_tables.disk_tables(CFG, exported)
    assert str(err.value) == (f"--table_dir: {path} holds {np.dtype(dtype)} but tables.json "
                              "records float32 (a file replaced by hand); export the "
                              "tables again")
  open(path, "wb").close()
  with pytest.raises(ValueError, match=r"block_1.npy is unreadable or truncated \(.*\); "
                                       r"export the tables again"):
    disk_tables.disk_tables(CFG, exported)


def test_tables_of_another_run_or_step_are_one_warning(exported, tmp_path, capsys):
  run = str(tmp_path / "run")
  disk_tables.disk_tables(CFG, exported, workdir=run, step=3)
  assert capsys.readouterr().err == ""
  moved = str(tmp_path / "moved")
  for workdir, step in ((moved, 3), (run, 5)):
    disk_tables.disk_tables(CFG, exported, workdir=workdir, step=step)
    out = capsys.readouterr().err
    assert out == (f"warning: --table_dir={exported!r} holds tables exported from {run} "
                   f"at step 3; sampling {workdir} at step {step} (export this run's "
                   "tables if that is not meant)\n"), out


def test_bfloat16_tables_read_back_as_bfloat16(tmp_path):
  """`.npy` stores bfloat16 as raw 2-byte records (`|V2`): a bfloat16 run's export was
  refused as "a file replaced by hand", and read as bytes before that."""
  import jax.numpy as jnp
  tables = _tables()
  bf16 = HostTables(CFG, [t.astype(jnp.bfloat16) for t in tables.tables_L])
  out = str(tmp_path / "bf16")
  disk_tables.write_tables(bf16, out)
  read = disk_tables.disk_tables(CFG, out)
  for want, got in zip(bf16.tables_L, read.tables_L):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
