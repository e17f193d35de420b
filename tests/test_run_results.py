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
