"""Training: resume determinism, NaN stop, bad input exits cleanly."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("clu")
pytest.importorskip("orbax.checkpoint")

from engram_jax import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import lm as lm_configs  # noqa: E402


def _config(steps=6, **train_overrides):
  c = lm_configs.get_config("tiny")
  c.model.update(width=32, depth=2, max_len=32)
  c.model.engram.update(layers=(1,), heads=2, embed_per_ngram=16, table_size=(509,))
  c.data.update(max_files=12, seq_len=16, batch_size=4, vocab_size=300)
  c.train.update(steps=steps, warmup_steps=2, log_every=1, eval_every=steps,
                 eval_batches=2, checkpoint_every=100)
  c.train.update(train_overrides)
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_resume_is_deterministic(tmp_path):
  one = str(tmp_path / "one")
  train.train_and_evaluate(_config(), one)
  two = str(tmp_path / "two")
  train.train_and_evaluate(_config(stop_after_steps=3), two)
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["3"]
  train.train_and_evaluate(_config(), two)
  assert _losses(one) == _losses(two) and len(_losses(one)) == 6


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  train.train_and_evaluate(_config(steps=2), workdir)
  with pytest.raises(train.TrainingError, match=r"non-finite loss .* at step \d+"):
    train.train_and_evaluate(_config(steps=40, learning_rate=1e12,
                                     warmup_steps=0, checkpoint_every=1), workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps, "the good checkpoint must survive"


def test_empty_corpus_is_one_line_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "engram_jax.main", "--config=configs/lm.py:tiny",
       f"--workdir={tmp_path / 'w'}", "--config.data.source=files",
       f"--config.data.files_glob={empty}/*.txt"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "data.files_glob" in proc.stderr and "Traceback" not in proc.stderr
