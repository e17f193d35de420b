"""The rho sweep command trains each point once, evaluates, and writes its report."""
import csv
import os

import pytest

pytest.importorskip("orbax.checkpoint")

from engram_jax import rho_sweep  # noqa: E402


def test_sweep_trains_once_and_reports(tmp_path, capsys):
  args = ["--family=digits", "--rhos=0.51", f"--workdir={tmp_path}", "--steps=2",
          "--samples_per_class=0"]
  assert rho_sweep.main(args) == 0
  with open(tmp_path / "rho_sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["digits_baseline", "digits_rho_0.51"]
  assert [float(r["rho"]) for r in rows] == [1.0, 0.51]
  assert all(int(r["step"]) == 2 and float(r["nll_bits_per_token"]) > 0 for r in rows)
  # the budget: the Engram point holds as many parameters as the baseline, within 1%
  stored = [int(r["params"]) for r in rows]
  assert abs(stored[1] - stored[0]) / stored[0] < 0.01
  assert os.path.getsize(tmp_path / "rho_sweep.png") > 1000
  capsys.readouterr()
  assert rho_sweep.main(args) == 0
  assert capsys.readouterr().out.count("skipped") == 2


def test_bad_rhos_name_the_flag(tmp_path, capsys):
  assert rho_sweep.main(["--rhos=0,2", f"--workdir={tmp_path}"]) == 2
  assert "--rhos" in capsys.readouterr().err


def test_rho_variants_load_through_the_command_line():
  """config_flags locks the config it loads: every section must be lockable."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "engram_jax.main", "--dry_run",
                         "--config=configs/image.py:digits_rho_0.51"],
                        cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "image model" in proc.stdout
