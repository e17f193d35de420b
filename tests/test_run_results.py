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
  run.mkdir()
  (run / "config.json").write_text('{"model": {}, "train": {"steps": 400}}')
  with pytest.raises(ValueError, match=r"holds a run this study did not start \(no "
                                       r"study_run.json\).*give the study its own --workdir"):
    run_results.read(str(run), _config(str(tmp_path)))


def test_a_claim_checks_an_interrupted_run_and_goes_with_a_failed_start(tmp_path):
  run = str(tmp_path / "point")
  config = _config(str(tmp_path))
  with pytest.raises(RuntimeError):  # the trainer failed before writing anything
    with run_results.claimed(run, config):
      raise RuntimeError("bad field")
  assert not os.path.exists(run)  # made for the claim, and gone with it
  assert run_results.read(run, _config(str(tmp_path), gate=0.5)) is None  # starts afresh
  with pytest.raises(KeyboardInterrupt):  # stopped mid-run: the run stays the study's
    with run_results.claimed(run, config):
      with open(os.path.join(run, "config.json"), "w") as f:
        f.write("{}")  # what the trainer writes once it starts
      raise KeyboardInterrupt
  assert os.path.exists(os.path.join(run, run_results.STARTED))
  assert run_results.read(run, config) is None  # resumes
  assert run_results.read(run, _config(str(tmp_path), steps=20, warmup=2)) is None
  with pytest.raises(ValueError, match=r"holds an unfinished run of another config "
                                       r"\(model\.gate: 0\.1 -> 0\.5\)"):
    run_results.read(run, _config(str(tmp_path), gate=0.5))
