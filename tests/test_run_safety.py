"""No run lost, no workdir corrupted: locks, metadata, data fingerprints, metrics repair,
and bad input caught before any work (in-process, no subprocess unless a signal is sent).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("clu")
pytest.importorskip("orbax.checkpoint")

from engram_jax import library_log, train, workdir_lock, writers  # noqa: E402
from engram_jax import workdir as workdir_lib  # noqa: E402

from tests import runs  # noqa: E402
from tests.cli import ROOT, run_main  # noqa: E402

CONFIG_FLAG = "--config=tests/lm_test_config.py:tiny"


def _config(steps=4, **train_overrides):
  return runs.tiny_config(steps, **train_overrides)


_metric_rows = runs.metric_rows
_steps = runs.checkpoint_steps


# ---------------------------------------------------------------------------------
# Bad input: one line naming the field, exit 2, before any work (no workdir made)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override,field", [
    ("--config.mesh.fsdp=3", "mesh.fsdp=3"),  # checked before the tokenizer is trained
    ("--config.train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("--config.train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every"),
    ("--config.train.log_every=0", "train.log_every"),
    ("--config.train.eval_every=0", "train.eval_every"),
    ("--config.train.eval_batches=0", "train.eval_batches"),
    ("--config.train.steps=0", "train.steps"),
    ("--config.train.learning_rate=nan", "train.learning_rate"),
    ("--config.train.learning_rate=-0.1", "train.learning_rate"),
    ("--config.train.warmup_steps=50", "train.warmup_steps"),
    ("--config.train.weight_decay=-1", "train.weight_decay"),
    ("--config.train.table_lr_multiplier=0", "train.table_lr_multiplier"),
    ("--config.data.seq_len=64", "data.seq_len"),
    ("--config.model.vocab_size=100", "model.vocab_size"),
    ("--config.model.engram.layers=a,b", "engram.layers"),
    # 2 orders x 2 heads of 10^9 rows: offsets past int32 would wrap and read row 0
    ("--config.model.engram.table_size=1000000000", "engram.table_size"),
    ("--config.data.files_glob=/nonexistent/*.txt", "data.files_glob"),
    ("--config.mesh.num_devices=-4", "mesh.num_devices=-4"),  # sized -4 devices
], ids=lambda v: v if not v.startswith("--") else v.split("=")[0][9:])
def test_bad_field_fails_before_any_work(tmp_path, capfd, override, field):
  workdir = tmp_path / "w"
  code, _, err = run_main(capfd, CONFIG_FLAG, f"--workdir={workdir}", override)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and field in lines[0], err
  assert "Unknown command line flag" not in err
  assert not workdir.exists(), "nothing is left behind by a run that never started"


@pytest.mark.parametrize("flag,says", [
    ("--stpes=3", "--stpes is not a flag; did you mean --config.train.steps=...?"),
    ("--learning_rate=0.1", "did you mean --config.train.learning_rate=...?"),
    ("--workdri=/tmp/x", "--workdri is not a flag; did you mean --workdir?"),
    ("--zzz=1", "--zzz is not a flag: this command takes --accept_data_change, --config,"),
])
def test_an_unknown_flag_names_the_config_field_it_meant(tmp_path, capfd, flag, says):
  """absl guessed among its own logging flags (`--stpes`: "Did you mean:
  stderrthreshold ?")."""
  code, _, err = run_main(capfd, CONFIG_FLAG, f"--workdir={tmp_path / 'w'}", flag)
  assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
  code, _, err = run_main(capfd, *CONFIG_FLAG.split("="), f"--workdir={tmp_path / 'w'}",
                          flag)  # --config PATH, spelled apart
  assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


@pytest.mark.parametrize("config_flag,says", [
    ("--config=configs/lm.py:tinyy", "choose one of ('tiny', 'tiny_baseline'"),
    ("--config=configs/nope.py:tiny", "no config file 'configs/nope.py'"),
])
def test_bad_config_file_or_variant_is_one_line(capfd, config_flag, says):
  code, _, err = run_main(capfd, config_flag, "--workdir=/nonexistent/never")
  assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


@pytest.mark.parametrize("text,says", [
    ("def get_config(:\n", "raised SyntaxError (line 1): invalid syntax; fix the file"),
    ("def get_config():\n  return 1 / 0\n", "raised ZeroDivisionError: division by zero"),
    ('{"model": {"tie_embeddings": false}}', "a workdir's config.json records a run"),
])
def test_a_config_file_that_fails_to_load_is_one_line(capfd, tmp_path, text, says):
  """A Python error in the config file (or a config.json passed as one): one line
  naming the file, not the loader's traceback."""
  path = tmp_path / ("config.json" if text.startswith("{") else "broken.py")
  path.write_text(text)
  code, _, err = run_main(capfd, f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith(f"error: --config={path}: loading it ") and says in err, err


def test_print_config_lists_fields_and_variants(capfd):
  code, out, _ = run_main(capfd, "--config=configs/lm.py:tiny", "--print_config",
                          "--config.train.steps=7")
  assert code == 0 and "--config.train.steps=7" in out.splitlines()
  assert "--config.model.engram.table_size=(4001,)" in out.splitlines()
  assert "tiny, tiny_baseline, small, small_baseline, paper_dense" in out


def test_checkpoints_path_that_is_a_file_fails_up_front(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a directory")
  with pytest.raises(ValueError, match="checkpoints is a file"):
    train.train_and_evaluate(_config(), str(workdir))


# ---------------------------------------------------------------------------------
# One trainer per workdir
# ---------------------------------------------------------------------------------
def test_second_trainer_on_a_workdir_fails_with_the_holder_named(tmp_path, capfd):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
       "from engram_jax import workdir_lock; "
       "lock = workdir_lock.WorkdirLock(sys.argv[2]).acquire(); print('held', flush=True); "
       "time.sleep(120)", ROOT, str(workdir)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code, _, err = run_main(capfd, CONFIG_FLAG, f"--workdir={workdir}")
    assert code == 2 and f"in use by pid {holder.pid}" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (workdir / "checkpoints").exists() and not (workdir / "tokenizer.json").exists()
  finally:
    holder.kill()
    holder.wait()
  # the holder was killed without releasing: its lock is stale and is taken over
  lock = workdir_lock.WorkdirLock(str(workdir)).acquire()
  assert f"pid {holder.pid}" in lock.stale_note()
  lock.release()


def test_a_trainer_that_loses_the_race_for_a_new_workdir_leaves_the_lock(tmp_path,
                                                                        monkeypatch):
  """Two trainers start on a workdir that does not exist: both see it missing, one
  takes the lock. The other must fail without removing the holder's lock file (it
  once did, as the clean-up of a workdir it thought it had made, and a third trainer
  was then let in beside the first)."""
  workdir = str(tmp_path / "new")
  winner = []
  real_ensure = workdir_lib.ensure_writable

  def winner_arrives_first(path):
    real_ensure(path)
    winner.append(workdir_lock.WorkdirLock(path).acquire())
  monkeypatch.setattr(workdir_lib, "ensure_writable", winner_arrives_first)
  with pytest.raises(workdir_lock.WorkdirLocked, match=r"is in use by this process "
                                                       r"\(another thread or notebook cell"):
    train.train_and_evaluate(_config(), workdir)
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  with pytest.raises(workdir_lock.WorkdirLocked):  # a third trainer is still refused
    workdir_lock.WorkdirLock(workdir).acquire()
  winner[0].release()


@pytest.mark.parametrize("what", ["a directory", "a symbolic link to nothing"])
def test_a_lock_path_that_is_not_a_file_is_one_line_naming_it(tmp_path, capfd, what):
  """`.lock` made a directory, or a dangling link: one line saying what it is (a link
  once read as "replaced 5 times ... run the command again", which never helps)."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  lock = workdir / workdir_lock.LOCK_FILE
  if what == "a directory":
    lock.mkdir()
  else:
    lock.symlink_to(tmp_path / "gone")
  code, _, err = run_main(capfd, CONFIG_FLAG, f"--workdir={workdir}")
  assert code == 2 and f"its lock file {lock} is {what}" in err, err
  assert "move it away" in err and len(err.strip().splitlines()) == 1
  assert sorted(os.listdir(workdir)) == [".lock"]


def test_a_lock_file_removed_while_being_taken_is_taken_anew(tmp_path, monkeypatch):
  """A run that made a workdir and fails removes its lock file while holding it; a
  trainer that opened that file just before must not end up holding the removed one
  (a third would then create and hold a new file beside it)."""
  workdir = str(tmp_path)
  first = workdir_lock.WorkdirLock(workdir).acquire()
  real_open, opened = os.open, []

  def open_then_first_leaves(path, *args):
    fd = real_open(path, *args)
    if path == first.path and not opened:
      opened.append(path)
      first.release(remove_file=True)  # between our open and our flock
    return fd
  monkeypatch.setattr(workdir_lock.os, "open", open_then_first_leaves)
  second = workdir_lock.WorkdirLock(workdir).acquire()
  monkeypatch.undo()
  assert opened and second.held
  with pytest.raises(workdir_lock.WorkdirLocked):
    workdir_lock.WorkdirLock(workdir).acquire()
  second.release()


# ---------------------------------------------------------------------------------
# Resume safety: stop on a checkpoint step, completed runs, metrics repair, data change
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """4 steps, checkpoints every 2, stopped by its step budget on a checkpoint step."""
  workdir = str(tmp_path_factory.mktemp("stopped") / "run")
  train.train_and_evaluate(_config(checkpoint_every=2, stop_after_steps=2), workdir)
  return workdir


def test_stop_on_a_checkpoint_step_saves_once(stopped_run):
  assert _steps(stopped_run) == [2]
  assert [r["step"] for r in _metric_rows(stopped_run)] == [1, 2]


def test_resume_repairs_metrics_and_a_finished_run_says_so(stopped_run, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  # as if the previous run logged step 3 and was killed mid-write of step 4's line
  with open(os.path.join(workdir, writers.METRICS_FILE), "a") as f:
    f.write(json.dumps({"step": 3, "train_loss": 123.0}) + "\n" + '{"step": 4, "trai')
  train.train_and_evaluate(_config(checkpoint_every=2), workdir)
  rows = _metric_rows(workdir)
  train_steps = [r["step"] for r in rows if "train_loss" in r]
  assert train_steps == [1, 2, 3, 4] and 123.0 not in [r.get("train_loss") for r in rows]
  out = capsys.readouterr().out
  assert "eval at step 4: eval_loss" in out
  before = _snapshot(workdir)
  # a finished run asked again, with other train fields, changes nothing (it used to
  # record this config in config.json and leave an empty TensorBoard file)
  again = train.train_and_evaluate(_config(steps=3, checkpoint_every=2, learning_rate=0.5),
                                   workdir)
  assert "run complete" in capsys.readouterr().out
  final = [r for r in rows if r["step"] == 4 and "eval_loss" in r][-1]
  assert again == {k: v for k, v in final.items() if k != "step"}  # it returned {}
  assert _snapshot(workdir) == before and _steps(workdir) == [2, 4]
  os.rename(os.path.join(workdir, "config.json"), os.path.join(workdir, "config.moved"))
  train.train_and_evaluate(_config(checkpoint_every=2), workdir)  # moved aside: written
  assert workdir_lib.load(workdir).step == 4


def _snapshot(workdir: str) -> dict:
  """{path: bytes} of every file in `workdir` but the lock (rewritten by every run)
  and the library log."""
  found = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      if name not in (workdir_lock.LOCK_FILE, library_log.LOG_FILE):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          found[os.path.relpath(path, workdir)] = f.read()
  return found


def test_a_config_json_no_run_wrote_is_not_replaced(tmp_path):
  """A directory holding the user's own config.json and no checkpoint: training there
  used to replace the file with the run's config."""
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"my": "precious"}')
  with pytest.raises(ValueError, match=r"config.json is not a run's config .* move it "
                                       r"aside, or give another --workdir"):
    train.train_and_evaluate(_config(), str(workdir))
  assert (workdir / "config.json").read_text() == '{"my": "precious"}'


@pytest.mark.parametrize("garbage", ["garbage{", "[1, 2]"])
def test_a_corrupt_config_json_stops_a_resume_with_one_line(stopped_run, tmp_path, garbage):
  """Torn or not an object: one line naming the file and the fix (it was a bare JSON
  error, or a traceback), the workdir unchanged; moved aside, the run resumes."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  config_json = os.path.join(workdir, "config.json")
  with open(config_json, "w") as f:
    f.write(garbage)
  with pytest.raises(ValueError, match=r"config.json (is not readable JSON|holds no config "
                                       r"object).*, or move it aside to resume"):
    train.train_and_evaluate(_config(checkpoint_every=2), workdir)
  assert open(config_json).read() == garbage and _steps(workdir) == [2]
  os.rename(config_json, config_json + ".torn")
  train.train_and_evaluate(_config(checkpoint_every=2), workdir)
  assert _steps(workdir) == [2, 4]


def test_another_vocab_size_is_refused_on_resume(stopped_run, tmp_path):
  """The workdir's tokenizer is reused on resume: a changed data.vocab_size would be
  recorded in config.json but not used, so it is refused, naming the value to use."""
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run, workdir)
  config = _config(checkpoint_every=2)
  trained_with = config.data.vocab_size
  config.data.vocab_size = trained_with + 64
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(ValueError, match=rf"data.vocab_size={trained_with + 64} but .* "
                                       rf"--config.data.vocab_size={trained_with} or"):
    train.train_and_evaluate(config, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_changed_corpus_is_refused_unless_accepted(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  source = sorted(p for p in os.listdir(os.path.dirname(os.__file__))
                  if p.endswith(".py"))[:6]
  for name in source:
    with open(os.path.join(os.path.dirname(os.__file__), name), "rb") as f:
      (corpus / name).write_bytes(f.read())
  config = _config(stop_after_steps=2)
  config.data.update(files_glob=str(corpus / "*.py"), max_files=0, val_fraction=0.2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert "data: " in capsys.readouterr().out  # inferred source=files, files counted
  (corpus / source[-1]).write_bytes(b"changed = True\n" * 200)
  config.train.stop_after_steps = 0
  with pytest.raises(ValueError, match=r"data source changed since checkpoint 2 .*"
                                       r"files_digest"):
    train.train_and_evaluate(config, workdir)
  train.train_and_evaluate(config, workdir, accept_data_change=True)
  assert "warning: resuming on changed data" in capsys.readouterr().out
  assert _steps(workdir)[-1] == 4


def test_repair_metrics_keeps_whole_lines_up_to_the_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"st')
  assert writers.repair_metrics(str(path), 2) == 2
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  assert writers.repair_metrics(str(path), 2) == 0
  kept_aside = (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()
  assert kept_aside == ['{"step": 3, "a": 3}', '{"st']  # nothing is lost


def test_sigint_during_start_up_is_one_line(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "engram_jax.main", CONFIG_FLAG,
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)  # still importing jax/flax/clu
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in err, err
  assert "nothing was saved" in err


@pytest.mark.parametrize("steps", [8, 4])  # the failure seen by the next save / the last
def test_a_save_failing_in_the_background_is_one_error(tmp_path, monkeypatch, capfd, steps):
  """The disk is full from checkpoint 4 on, which orbax writes in its own threads: the
  run ends with the one-line error naming the kept checkpoints, the libraries'
  leftovers go to the workdir's log and the signal handlers are put back (orbax once
  raised the stored error again on close, replacing that line, and dozens of
  tracebacks reached the console; a failed last save skipped the clean-up)."""
  import signal
  import errno
  import re
  from etils import epath
  path_type = type(epath.Path(str(tmp_path)))
  real_write_text = path_type.write_text

  def disk_full_from_step_4(self, *args, **kwargs):
    if re.search(r"/checkpoints/[4-9]", str(self)):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write_text(self, *args, **kwargs)
  monkeypatch.setattr(path_type, "write_text", disk_full_from_step_4)
  workdir = str(tmp_path / "full")
  with pytest.raises(train.TrainingError,
                     match=r"failed \(No space left on device\); the checkpoints before "
                           r"it are kept \(\[2\]\)"):
    train.train_and_evaluate(_config(steps, checkpoint_every=2), workdir)
  assert _steps(workdir) == [2]
  err = capfd.readouterr().err
  assert "Traceback" not in err and "ERROR" not in err, err[:2000]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_failed_save_is_one_error_and_keeps_older_checkpoints(tmp_path, monkeypatch):
  import errno
  from engram_jax import checkpoints
  real_save, calls = checkpoints.save, []

  def save_then_fill_the_disk(mngr, step, state, data_state, **kwargs):
    calls.append(step)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, "No space left on device")
    real_save(mngr, step, state, data_state, **kwargs)
  monkeypatch.setattr(checkpoints, "save", save_then_fill_the_disk)
  workdir = str(tmp_path / "full")
  with pytest.raises(train.TrainingError,
                     match=r"failed \(No space left on device\); the checkpoints before "
                           r"it are kept \(\[2\]\)"):
    train.train_and_evaluate(_config(checkpoint_every=2), workdir)
  assert _steps(workdir) == [2]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_metrics_log_is_one_line_naming_it(tmp_path, capfd,
                                                                 monkeypatch):
  """The metrics log on a full disk (`/dev/full` answers every write with ENOSPC): one
  line naming the file and the fix, no traceback (it once said only `[Errno 28] No
  space left on device`)."""
  real_writer = writers.JsonlWriter
  monkeypatch.setattr(writers, "JsonlWriter", lambda path: real_writer("/dev/full"))
  code, out, err = run_main(capfd, CONFIG_FLAG, f"--workdir={tmp_path / 'w'}",
                            "--config.train.steps=2")
  assert code == 2, err
  assert err.startswith("error: could not write /dev/full (No space left on device); "
                        "free space on its disk, then run the same command to resume"), err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err


def test_write_failures_read_a_full_disk_from_any_library():
  from engram_jax.errors import write_failure
  for err in (OSError(28, "No space left on device"),
              Exception("No space left on device (os error 28)"),  # Rust (tokenizers)
              OSError("69591 requested and 39904 written")):  # NumPy's short write
    failure = write_failure("/w/x", err)
    assert str(failure) == ("could not write /w/x (No space left on device); free space "
                            "on its disk, then run the command again")
  denied = write_failure("/w/x", PermissionError(13, "Permission denied"))
  assert "(Permission denied); check that its directory is writable" in str(denied)


def test_a_run_trains_in_a_thread_other_than_the_main_one(tmp_path):
  """A notebook's background thread: no signal handler can be installed there (it once
  failed with `signal only works in main thread`); the run trains without one."""
  import threading
  result = {}
  thread = threading.Thread(target=lambda: result.update(
      metrics=train.train_and_evaluate(_config(steps=2), str(tmp_path / "w"))))
  thread.start()
  thread.join(300)
  assert "eval_loss" in result.get("metrics", {}), result


def test_a_filesystem_without_flock_is_one_line_and_leaves_no_lock_file(tmp_path,
                                                                        monkeypatch):
  """NFS without lockd answers flock with ENOLCK: that is not "in use by an unknown
  process", and the lock file this call made does not stay behind."""
  import errno
  import fcntl

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  with pytest.raises(ValueError, match=r"cannot lock .*\(No locks available\): its "
                                       r"filesystem offers no flock; use a --out on a "
                                       r"local disk"):
    workdir_lock.WorkdirLock(str(tmp_path), flag="--out", name=".export.lock",
                             noun="export").acquire()
  assert os.listdir(tmp_path) == []


def test_a_checkpoint_deleted_while_checked_reads_as_missing(tmp_path, monkeypatch):
  from engram_jax import checkpoints, paths
  item = tmp_path / "checkpoints" / "6" / "state"
  item.mkdir(parents=True)

  def deleted_meanwhile(path):
    raise FileNotFoundError(path)
  monkeypatch.setattr(paths, "listdir", deleted_meanwhile)
  assert checkpoints.damaged_files(str(tmp_path), 6) == "checkpoints/6/state/ is missing"
