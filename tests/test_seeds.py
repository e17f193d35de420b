"""Seed studies: Welch's t against scipy, and a real 2 variants x 2 seeds run."""
import os

import numpy as np
import pytest

from engram_jax.studies import seeds

from tests import runs
from tests.cli import ROOT


def test_welch_t_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  a, b = rng.normal(1.0, 0.1, 3), rng.normal(1.2, 0.3, 4)
  assert seeds.welch_t(a, b) == pytest.approx(
      stats.ttest_ind(b, a, equal_var=False).statistic)


def test_variants_times_seeds_train_report_and_resume(tmp_path, capsys):
  short = "train.steps=2;train.warmup_steps=1;train.eval_every=2;train.log_every=1"
  args = [f"--config={os.path.join(ROOT, 'tests/lm_test_config.py')}:tiny",
          f"--workdir={tmp_path}", "--seeds=0,1",
          f"--variant=learned:{short}",
          f"--variant=gate_0.1:{short};model.engram.gate=0.1"]
  assert seeds.main(args) == 0
  rows = {(r["variant"], r["seed"]): r["eval_loss"]
          for r in seeds.run(args[0][9:], [seeds.parse_variant(v[10:]) for v in args[3:]],
                             [0, 1], str(tmp_path))}
  assert len(rows) == 4 and len(set(rows.values())) == 4  # seeds and gates all differ
  summary = (tmp_path / "summary.md").read_text()
  assert "| gate_0.1 |" in summary and "+- " in summary
  assert "seeds: learned seed 0" in capsys.readouterr().out  # the second run read back
  assert seeds.main(args[:3] + ["--variant=x:model.engram.nope=1"]) == 2


def _args(workdir, short="train.steps=2;train.warmup_steps=1;train.eval_every=2;"
          "train.log_every=1", gate="0.1"):
  return [f"--config={os.path.join(ROOT, 'tests/lm_test_config.py')}:tiny",
          f"--workdir={workdir}", "--seeds=0",
          f"--variant=learned:{short}", f"--variant=gate:{short};model.engram.gate={gate}"]


def _results(workdir):
  import json
  return {name: json.load(open(os.path.join(workdir, name, "seed_0", "result.json")))
          ["eval_loss"] for name in ("learned", "gate")}


def test_a_stopped_run_is_not_counted_and_the_study_resumes_it(tmp_path, capsys,
                                                               monkeypatch):
  """Ctrl-C during a study's first run: the trainer saves and the study stops (exit
  130) without writing that run's result (it once recorded the half-trained run as
  finished, trained the others, then died on the missing metric, and every rerun
  with it); the rerun resumes it and ends as an uninterrupted study does."""
  import signal

  from engram_jax import writers
  whole = str(tmp_path / "whole")
  assert seeds.main(_args(whole)) == 0
  runs.signal_at_step(monkeypatch, writers.ConsoleProgress, "report", 1, signal.SIGINT,
                      step_arg=0)  # Ctrl-C after step 1's console line
  stopped = str(tmp_path / "stopped")
  capsys.readouterr()
  assert seeds.main(_args(stopped)) == 130
  err = capsys.readouterr().err
  assert "stopped at step 1; checkpoint saved (a signal stopped the run); run the same " \
         "command to resume" in err, err
  assert os.listdir(stopped) == ["learned"]  # the next run never started
  assert not os.path.exists(os.path.join(stopped, "learned", "seed_0", "result.json"))
  monkeypatch.undo()
  assert seeds.main(_args(stopped)) == 0
  assert _results(stopped) == _results(whole)


def test_a_changed_request_trains_on_or_is_refused(tmp_path, capsys):
  """A finished study asked again with more steps trains its runs on; asked with
  another variant config under the same name, it is one line naming the field (the
  old results were once printed as the new request's answer)."""
  workdir = str(tmp_path / "study")
  assert seeds.main(_args(workdir)) == 0
  capsys.readouterr()
  assert seeds.main(_args(workdir, gate="0.5")) == 2
  err = capsys.readouterr().err
  assert err == (f"error: --workdir: {workdir}/gate/seed_0 holds a finished run of "
                 "another config (model.engram.gate: '0.1' -> '0.5'); use a new "
                 "--workdir for this request, or move that run away to train it again\n")
  longer = "train.steps=4;train.warmup_steps=1;train.eval_every=2;train.log_every=1"
  two_steps = _results(workdir)
  assert seeds.main(_args(workdir, longer)) == 0
  assert "resumed from step 2" in capsys.readouterr().out
  assert _results(workdir) != two_steps


@pytest.mark.parametrize("variant,says", [
    ("bad:model.engram.gate", "--variant=bad:model.engram.gate: use "
     "--variant=bad:section.field=value, e.g. --variant=bad:model.engram.gate=0.1"),
    ("g:model.engram.gat=0.1", "--variant=g:model.engram.gat=...: the config has no "
     "field 'model.engram.gat'"),
])
def test_a_bad_variant_is_one_line_in_the_variant_syntax(tmp_path, capsys, variant, says):
  """The lines used to spell it `--variant=bad=section.field=value` with an image
  config's field as the example."""
  args = [f"--config={os.path.join(ROOT, 'tests/lm_test_config.py')}:tiny",
          f"--workdir={tmp_path / 'w'}", "--seeds=0", f"--variant={variant}"]
  assert seeds.main(args) == 2
  assert capsys.readouterr().err == f"error: {says}\n"
  assert not (tmp_path / "w").exists()
