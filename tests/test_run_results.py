"""A study's results are read back for the same request however it is spelled, train
on for a longer one, and are refused for another config (studies/run_results.py)."""
import json
import os

import ml_collections
import pytest

from engram_jax.studies import run_results


def _config(workdir, steps=10, warmup=1, gate=0.1):
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(steps=steps, warmup_steps=warmup,
                                           eval_every=steps, layers=(1, 2)))
  c.model = ml_collections.ConfigDict(dict(gate=gate, table=None))
  c.data = ml_collections.ConfigDict(dict(
      tokenizer_path=os.path.join(workdir, "tokenizer.json")))
  return c


@pytest.fixture
def study(tmp_path):
  root = tmp_path / "study"
  (root / "run").mkdir(parents=True)
  (root / "tokenizer.json").write_text('{"a tokenizer": 1}')
  run_results.write(str(root / "run"), {"eval_loss": 4.2}, _config(str(root)))
  return root


def test_the_same_request_reads_back_however_its_paths_are_spelled(study, monkeypatch):
  assert run_results.read(str(study / "run"), _config(str(study))) == {"eval_loss": 4.2}
  monkeypatch.chdir(study.parent)  # --workdir=study, relative
  assert run_results.read("study/run", _config("study")) == {"eval_loss": 4.2}
  moved = study.parent / "moved"
  os.rename(study, moved)  # the whole study moved: its old tokenizer path is gone
  assert run_results.read(str(moved / "run"), _config(str(moved))) == {"eval_loss": 4.2}


def test_a_longer_request_trains_on_and_another_config_is_refused(study):
  run = str(study / "run")
  # `run_config.with_steps` raises the warm-up with the steps: still the same run, longer
  assert run_results.read(run, _config(str(study), steps=20, warmup=2)) is None
  with pytest.raises(ValueError, match=r"another config \(train\.warmup_steps: 1 -> 2\)"):
    run_results.read(run, _config(str(study), warmup=2))  # the warm-up alone: another run
  with pytest.raises(ValueError, match=r"another config \(model\.gate: 0\.1 -> 0\.5\)"):
    run_results.read(run, _config(str(study), gate=0.5))
  other = study.parent / "other_tokenizer.json"
  other.write_text('{"another": 2}')
  c = _config(str(study))
  c.data.tokenizer_path = str(other)
  with pytest.raises(ValueError, match=r"data\.tokenizer_path"):
    run_results.read(run, c)


def test_fields_of_another_code_version_are_not_compared(study):
  path = study / "run" / run_results.RESULT
  saved = json.loads(path.read_text())
  saved[run_results.CONFIG]["train"]["removed_knob"] = 1  # a field since removed
  path.write_text(json.dumps(saved))
  c = _config(str(study))
  c.model.added_knob = 3  # and one added since
  assert run_results.read(str(study / "run"), c) == {"eval_loss": 4.2}


def test_a_run_the_study_did_not_start_is_refused(tmp_path):
  """The user's own run under the study's root (README: `digits_baseline` under
  `workdirs`) was trained on under the study's schedule, its config rewritten."""
  run = tmp_path / "digits_baseline"
  (run / "checkpoints" / "400").mkdir(parents=True)
  (run / "config.json").write_text('{"model": {}, "train": {"steps": 400}}')
  with pytest.raises(ValueError, match=r"holds a run this study did not start \(no "
                                       r"study_run.json\).*give the study its own --workdir"):
    run_results.read(str(run), _config(str(tmp_path)))
  (run / run_results.STARTED).write_text('{"config": ')  # torn: not "not started"
  with pytest.raises(ValueError, match=r"study_run.json is damaged"):
    run_results.read(str(run), _config(str(tmp_path)))


def _trainer_started(run: str, checkpoint: bool) -> None:
  """What the trainer leaves: config.json once it starts, a checkpoint later."""
  with open(os.path.join(run, "config.json"), "w") as f:
    f.write("{}")
  if checkpoint:
    os.makedirs(os.path.join(run, "checkpoints", "2"))


def test_a_claim_checks_an_interrupted_run_and_goes_with_a_failed_start(tmp_path):
  run = str(tmp_path / "variant" / "seed_0")
  config = _config(str(tmp_path))
  with pytest.raises(RuntimeError):  # the trainer failed before writing anything
    with run_results.claimed(run, config):
      raise RuntimeError("bad field")
  assert not os.path.exists(tmp_path / "variant")  # made for the claim, gone with it
  with pytest.raises(RuntimeError):  # failed after starting, before any checkpoint
    with run_results.claimed(run, config):
      _trainer_started(run, checkpoint=False)
      raise RuntimeError("out of memory at the first step")
  assert not os.path.exists(os.path.join(run, run_results.STARTED))
  # nothing to resume: another request (a smaller batch) starts afresh
  assert run_results.read(run, _config(str(tmp_path), gate=0.5)) is None
  with pytest.raises(KeyboardInterrupt):  # stopped mid-run: the run stays the study's
    with run_results.claimed(run, config):
      _trainer_started(run, checkpoint=True)
      raise KeyboardInterrupt
  assert os.path.exists(os.path.join(run, run_results.STARTED))
  assert run_results.read(run, config) is None  # resumes
  assert run_results.read(run, _config(str(tmp_path), steps=20, warmup=2)) is None
  with pytest.raises(ValueError, match=r"holds an unfinished run of another config "
                                       r"\(model\.gate: 0\.1 -> 0\.5\)"):
    run_results.read(run, _config(str(tmp_path), gate=0.5))


def test_a_claim_refused_by_a_live_trainer_leaves_its_record(tmp_path):
  """Two studies on one root: the second's claim, refused because the first's trainer
  holds the directory, used to replace the first's record, and the first's resume
  was then refused as "another config"."""
  from engram_jax import workdir_lock
  run = str(tmp_path / "point")
  first, second = _config(str(tmp_path)), _config(str(tmp_path), gate=0.5)
  with run_results.claimed(run, first), workdir_lock.WorkdirLock(run):
    _trainer_started(run, checkpoint=True)
    with pytest.raises(workdir_lock.WorkdirLocked):
      with run_results.claimed(run, second):  # read() passes: no result yet
        workdir_lock.WorkdirLock(run).acquire()  # what its trainer does first
  assert run_results.read(run, first) is None


def test_a_claim_on_a_dangling_link_is_one_line(tmp_path):
  run = tmp_path / "point"
  run.symlink_to(tmp_path / "gone")
  with pytest.raises(ValueError, match=r"--workdir: .*point cannot be a run's directory"):
    with run_results.claimed(str(run), _config(str(tmp_path))):
      pass
