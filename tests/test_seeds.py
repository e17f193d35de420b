"""Seed studies: Welch's t against scipy, and a real 2 variants x 2 seeds run."""
import os

import numpy as np
import pytest

from engram_jax.studies import seeds

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
