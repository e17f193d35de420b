"""Workdirs on object stores (engram_jax.paths), without a network.

Three ways in: `is_local` decisions; a fake `gs://` filesystem (etils.epath's own test
backend, with `gs://bucket/...` mapped onto a temp directory) under which the run seam's
helpers write and read real gs:// URLs; and a whole training run in a local directory
that `paths.is_local` calls remote, so every remote branch (no flock, whole-file metric
rewrites, the log copied up at exit, the token cache kept local) runs for real.
"""
import glob
import json
import os
import tempfile
from unittest import mock

import numpy as np
import pytest

from engram_jax import paths, workdir_lock, writers

_FS_CALLS = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open",
             "remove", "rename", "replace", "rmtree", "stat", "walk")


@pytest.fixture
def fake_gcs(tmp_path):
  """`gs://bucket/...` is `tmp_path/gcs/bucket/...` for etils.epath; yields that root."""
  from etils.epath import gpath, testing
  root = tmp_path / "gcs"
  root.mkdir()

  def local(path):
    path = os.fspath(path)
    return str(root) + "/" + path[len("gs://"):] if path.startswith("gs://") else path

  def forward(original, path, *args, **kwargs):
    args = tuple(local(a) if isinstance(a, (str, os.PathLike)) else a for a in args)
    return original(local(path), *args, **kwargs)

  # with TensorFlow installed epath sends gs:// to tf.io.gfile: send it to the mock
  with testing.mock_epath(**{name: forward for name in _FS_CALLS}), \
       mock.patch.object(gpath, "_is_tf_installed", return_value=False):
    yield root


@pytest.fixture
def failing_gcs():
  """Every gs:// call fails as TensorFlow's gfile does without a network."""
  from etils.epath import gpath, testing

  def fail(original, path, *args, **kwargs):
    raise RuntimeError("Error executing an HTTP request: libcurl code 6 meaning 'Could "
                       "not resolve hostname'\n\t when reading metadata of " + str(path))

  with testing.mock_epath(**{name: fail for name in _FS_CALLS}), \
       mock.patch.object(gpath, "_is_tf_installed", return_value=False):
    yield


# ---------------------------------------------------------------------------------
# Decisions on path strings
# ---------------------------------------------------------------------------------
def test_urls_are_remote_and_keep_their_scheme():
  assert paths.is_local("/tmp/run") and paths.is_local("run") and paths.is_local("~/r")
  assert not paths.is_local("gs://bucket/run") and not paths.is_local("s3://b/r")
  assert paths.join("gs://bucket/run", "checkpoints", "4") == "gs://bucket/run/checkpoints/4"
  assert paths.absolute("gs://bucket/run/") == "gs://bucket/run"  # abspath would mangle it
  assert paths.absolute("run") == os.path.abspath("run")
  assert paths.join("run", "config.json") == os.path.join("run", "config.json")


# ---------------------------------------------------------------------------------
# gs:// URLs through the helpers, on the fake store
# ---------------------------------------------------------------------------------
def test_files_and_directories_on_the_fake_store(fake_gcs):
  paths.atomic_write_text("gs://bucket/run/config.json", '{"a": 1}')
  assert (fake_gcs / "bucket/run/config.json").read_text() == '{"a": 1}'
  assert paths.exists("gs://bucket/run/config.json") and not paths.exists("gs://bucket/x")
  assert paths.read_text("gs://bucket/run/config.json") == '{"a": 1}'
  def write_npy(tmp):
    with open(tmp, "wb") as f:
      np.save(f, np.arange(3))
  paths.atomic_write("gs://bucket/run/t.npy", write_npy)
  assert np.load(fake_gcs / "bucket/run/t.npy").tolist() == [0, 1, 2]
  paths.makedirs("gs://bucket/run/checkpoints/2")
  assert paths.listdir("gs://bucket/run/checkpoints") == ["2"]
  assert paths.listdir("gs://bucket/run/nothing") == []
  paths.rename("gs://bucket/run/checkpoints/2", "gs://bucket/run/moved")
  assert paths.is_dir("gs://bucket/run/moved") and not paths.exists("gs://bucket/run/checkpoints/2")
  paths.remove("gs://bucket/run/config.json")
  paths.remove("gs://bucket/run/config.json", missing_ok=True)
  with pytest.raises(FileNotFoundError):
    paths.remove("gs://bucket/run/config.json")


def test_a_backend_error_is_one_oserror_line_naming_the_path(failing_gcs):
  with pytest.raises(OSError) as err:
    paths.read_text("gs://bucket/run/config.json")
  message = str(err.value)
  assert "\n" not in message and "gs://bucket/run/config.json" in message
  assert "Could not resolve hostname" in message


def test_the_metrics_writer_rewrites_a_remote_file_whole(fake_gcs, monkeypatch):
  local = fake_gcs / "bucket/run/metrics.jsonl"
  local.parent.mkdir(parents=True)
  local.write_text('{"step": 1, "loss": 3.0}\n')  # a previous run's line stays
  writer = writers.JsonlWriter("gs://bucket/run/metrics.jsonl", flush_seconds=3600)
  writer.write(2, {"loss": 2.0})  # the first line is written at once
  assert [json.loads(l)["step"] for l in local.read_text().splitlines()] == [1, 2]
  writer.write(3, {"loss": 1.0})  # held: object stores throttle rewrites of one object
  assert len(local.read_text().splitlines()) == 2
  writer.close()
  assert [json.loads(l)["step"] for l in local.read_text().splitlines()] == [1, 2, 3]


def test_metrics_repair_on_a_remote_file(fake_gcs):
  local = fake_gcs / "bucket/run/metrics.jsonl"
  local.parent.mkdir(parents=True)
  local.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  assert writers.repair_metrics("gs://bucket/run/metrics.jsonl", 2) == 2
  assert local.read_text() == '{"step": 1}\n{"step": 2}\n'
  dropped = fake_gcs / "bucket/run/metrics.dropped.jsonl"
  assert dropped.read_text() == '{"step": 3}\n{"step": 4, "lo\n'
  local.write_text('{"step": 1}\n{"step": 5}\n')  # a second repair adds to the dropped file
  assert writers.repair_metrics("gs://bucket/run/metrics.jsonl", 2) == 1
  assert dropped.read_text().splitlines()[-1] == '{"step": 5}'


def test_tokenizer_and_compressed_vocab_in_a_remote_workdir(fake_gcs, tmp_path):
  pytest.importorskip("tokenizers")
  from engram_jax import tokenizer as tokenizer_lib
  corpus = tmp_path / "a.txt"
  corpus.write_text("def f(x):\n    return x + 1\n" * 50)
  tok = tokenizer_lib.load_or_train("gs://bucket/run", [str(corpus)], 300)
  assert (fake_gcs / "bucket/run/tokenizer.json").exists()
  again = tokenizer_lib.load_tokenizer("gs://bucket/run/tokenizer.json")
  assert again.to_str() == tok.to_str()
  assert tokenizer_lib.load_or_train("gs://bucket/run", [], 300).to_str() == tok.to_str()
  vocab = tokenizer_lib.workdir_compressed_vocab("gs://bucket/run", tok, "ours")
  cached = list((fake_gcs / "bucket/run").glob("compressed_vocab-*.npy"))
  assert len(cached) == 1
  np.testing.assert_array_equal(
      tokenizer_lib.workdir_compressed_vocab("gs://bucket/run", tok, "ours"), vocab)


def test_run_metadata_in_a_remote_workdir(fake_gcs):
  pytest.importorskip("ml_collections")
  from engram_jax import workdir
  from tests import lm_test_config
  from tests.conftest import tiny_model_config
  (fake_gcs / "bucket/run").mkdir(parents=True)
  (fake_gcs / "bucket/run" / workdir.LEGACY_MODEL_CONFIG).write_text("{}")
  config = lm_test_config.get_config("tiny")
  workdir.write_run_metadata("gs://bucket/run", config, tiny_model_config())
  assert (fake_gcs / "bucket/run" / workdir.LEGACY_MODEL_CONFIG).read_text() == "{}"  # kept
  read, kind = workdir.read_config("gs://bucket/run")
  assert kind == "lm" and read.train.steps == config.train.steps
  assert workdir.saved_model_config("gs://bucket/run")["width"] == tiny_model_config().width


def test_the_lock_says_it_is_not_enforced_on_an_object_store(fake_gcs, capsys):
  with workdir_lock.WorkdirLock("gs://bucket/run") as lock:
    assert not lock.enforced and lock.stale_note() is None
  out = capsys.readouterr().out
  assert len(out.strip().splitlines()) == 1 and "lock is not enforced" in out
  assert "gs://bucket/run" in out and not (fake_gcs / "bucket/run/.lock").exists()


def test_checkpoint_listing_and_quarantine_in_a_remote_workdir(fake_gcs, capsys):
  pytest.importorskip("orbax.checkpoint")
  from engram_jax import checkpoints
  for step in (2, 4, 6):
    (fake_gcs / f"bucket/run/checkpoints/{step}").mkdir(parents=True)
  (fake_gcs / "bucket/run/checkpoints/6.orbax-checkpoint-tmp-1").mkdir()
  assert checkpoints.saved_steps("gs://bucket/run") == [2, 4, 6]
  (fake_gcs / "bucket/run/checkpoints_unreadable/6").mkdir(parents=True)
  checkpoints.quarantine_steps("gs://bucket/run", [6])
  assert checkpoints.saved_steps("gs://bucket/run") == [2, 4]
  assert (fake_gcs / "bucket/run/checkpoints_unreadable/6.1").is_dir()
  assert "gs://bucket/run/checkpoints_unreadable/6.1" in capsys.readouterr().out


def test_library_logs_of_a_remote_workdir_stay_local_then_are_added(fake_gcs, monkeypatch,
                                                                    tmp_path, capsys):
  pytest.importorskip("orbax.checkpoint")
  from engram_jax import library_log
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  remote = fake_gcs / "bucket/run" / library_log.LOG_FILE
  remote.parent.mkdir(parents=True)
  remote.write_text("an earlier run\n")
  with library_log.run_log("gs://bucket/run") as log:
    assert paths.is_local(log) and log.startswith(str(tmp_path))
    with open(log, "a") as f:
      f.write("orbax: something\n")
  assert remote.read_text() == "an earlier run\norbax: something\n"
  out = capsys.readouterr().out
  assert len(out.strip().splitlines()) == 1 and log in out
  with library_log.run_log("gs://bucket/run") as again:  # only this run's lines go up
    assert again == log
  assert remote.read_text() == "an earlier run\norbax: something\n"


def test_a_workdir_that_cannot_be_reached_is_one_line(failing_gcs):
  pytest.importorskip("orbax.checkpoint")
  from engram_jax import workdir as workdir_lib
  with pytest.raises(ValueError) as err:
    workdir_lib.ensure_writable("gs://bucket/run")
  message = str(err.value)
  assert "\n" not in message and message.startswith("--workdir='gs://bucket/run'")
  assert "Could not resolve hostname" in message


def test_memory_mapped_files_refuse_remote_directories(tmp_path):
  from engram_jax import disk_tables
  from engram_jax.data import token_cache
  with pytest.raises(ValueError, match="--table_dir='gs://b/t'.*local directory"):
    disk_tables.disk_tables(None, "gs://b/t")
  with pytest.raises(ValueError, match="--out='gs://b/t'.*local directory"):
    disk_tables.write_tables(None, "gs://b/t")
  pytest.importorskip("tokenizers")
  with pytest.raises(ValueError, match="memory-mapped"):
    token_cache.stream_path(None, [], "files", "train", "gs://b/cache")


# ---------------------------------------------------------------------------------
# A whole run through the remote branches, on a local directory
# ---------------------------------------------------------------------------------
def test_a_run_in_a_remote_workdir_trains_resumes_and_loads(tmp_path, monkeypatch, capsys):
  pytest.importorskip("clu")
  pytest.importorskip("orbax.checkpoint")
  from engram_jax import checkpoints, train
  from engram_jax import workdir as workdir_lib
  from engram_jax.data import token_cache
  from tests import runs
  bucket = str(tmp_path / "bucket")
  monkeypatch.setattr(paths, "is_local", lambda p: not os.fspath(p).startswith(bucket))
  monkeypatch.setattr(token_cache, "default_cache_dir", lambda: str(tmp_path / "cache"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  run = os.path.join(bucket, "run")

  train.train_and_evaluate(runs.tiny_config(4, checkpoint_every=2, stop_after_steps=2), run)
  out = capsys.readouterr().out
  assert "lock is not enforced" in out and "library logs go to" in out
  assert not os.path.exists(os.path.join(run, workdir_lock.LOCK_FILE))
  assert not os.path.exists(os.path.join(run, "token_cache"))  # kept on the local disk
  assert os.listdir(tmp_path / "cache")
  assert [r["step"] for r in runs.metric_rows(run)] == [1, 2]  # flushed at close
  assert len(glob.glob(os.path.join(run, "events.out.tfevents.*"))) == 1  # TensorBoard's too

  with open(os.path.join(run, writers.METRICS_FILE), "a") as f:  # as if killed mid-line
    f.write(json.dumps({"step": 3, "train_loss": 123.0}) + "\n" + '{"step": 4, "trai')
  train.train_and_evaluate(runs.tiny_config(4, checkpoint_every=2), run)
  rows = runs.metric_rows(run)
  assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
  assert 123.0 not in [r.get("train_loss") for r in rows]
  assert runs.checkpoint_steps(run) == [2, 4]
  assert checkpoints.saved_steps(run) == [2, 4]
  loaded = workdir_lib.load(run)
  assert loaded.step == 4 and loaded.tokenizer is not None


def test_a_gs_workdir_without_a_network_is_one_line(tmp_path, capfd):
  """The real gs:// backend (TensorFlow's gfile), no mock: here there is no network or
  no credentials, and the command says so in one line before any work."""
  pytest.importorskip("clu")
  from tests.cli import run_main
  code, _, err = run_main(capfd, "--config=tests/lm_test_config.py:tiny",
                          "--workdir=gs://engram-jax-no-such-bucket-7f3a/run",
                          "--config.train.steps=2")
  lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert "gs://engram-jax-no-such-bucket-7f3a/run" in lines[0]


def test_outputs_that_need_a_local_directory_name_their_flag(capsys):
  """Reports, PNG grids and study roots under a gs:// workdir are one line, not a
  local directory literally named `gs:` in the working directory."""
  from engram_jax import paths
  from engram_jax.studies import seeds
  assert paths.local_output("/tmp/x", "--out") == "/tmp/x"
  with pytest.raises(ValueError, match=r"--out='gs://b/run/probes': .*LOCAL_PATH"):
    paths.local_output("gs://b/run/probes", "--out")
  assert seeds.main(["--config=configs/lm.py:tiny", "--workdir=gs://b/sweep",
                     "--variant=learned"]) == 2
  assert "--workdir='gs://b/sweep'" in capsys.readouterr().err
  assert not os.path.exists("gs:")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_atomic_write_names_the_file_and_the_fix(tmp_path):
  """A full disk under any writer (here `/dev/full`, which answers every write with
  ENOSPC; NumPy and the tokenizers' Rust code word it their own ways) is one OSError
  naming the file: `main` prints it as one line (the tokenizer's bare Exception was a
  traceback). Nothing is left at the path; an error of the writer's own code passes."""
  import numpy as np
  target = str(tmp_path / "out.npy")

  def numpy_short_write(tmp):
    with open("/dev/full", "wb") as f:
      np.save(f, np.zeros(1 << 16, np.float32))

  def rust_style(tmp):
    raise Exception("No space left on device (os error 28)")
  for write in (numpy_short_write, rust_style):
    with pytest.raises(OSError) as err:
      paths.atomic_write(target, write)
    assert str(err.value) == (f"could not write {target} (No space left on device); free "
                              "space on its disk, then run the command again"), write
  assert os.listdir(tmp_path) == []

  def a_bug(tmp):
    raise TypeError("not a write failure")
  with pytest.raises(TypeError):
    paths.atomic_write(target, a_bug)
