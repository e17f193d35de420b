"""The rho sweep command trains each point once, evaluates, and writes its report."""
import csv
import json
import os

import pytest

pytest.importorskip("orbax.checkpoint")

from engram_jax.studies import rho_sweep as rho_sweep  # noqa: E402


def test_sweep_trains_once_and_reports(tmp_path, capsys):
  args = ["--family=digits", "--rhos=0.51", f"--workdir={tmp_path}", "--steps=2",
          "--samples_per_class=0", "--set=data.label_dropout=0.25"]
  assert rho_sweep.main(args) == 0
  for variant in ("digits_baseline", "digits_rho_0.51"):  # --set reached every point
    with open(tmp_path / variant / "config.json") as f:
      assert json.load(f)["data"]["label_dropout"] == 0.25
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
  # another --set: not the runs there (they were once skipped as trained already)
  assert rho_sweep.main(args[:-1] + ["--set=data.label_dropout=0.5"]) == 2
  err = capsys.readouterr().err
  assert "holds a finished run of another config (data.label_dropout: 0.25 -> 0.5)" in err


def test_bad_rhos_name_the_flag(tmp_path, capsys):
  assert rho_sweep.main(["--rhos=0,2", f"--workdir={tmp_path}"]) == 2
  assert "--rhos" in capsys.readouterr().err


@pytest.mark.parametrize("flags, match", [
    (["--set=data.label_dropout"], "use --set=section.field=value"),
    (["--set=data.nope=1"], "the config has no field 'data.nope'"),
    (["--set=train.steps=many"], "--set=train.steps='many'"),
    (["--inception_weights=w.npz"], "needs --decoder=pkg.module:fn"),
])
def test_bad_overrides_and_feature_nets_fail_before_training(tmp_path, capsys, flags, match):
  assert rho_sweep.main(["--rhos=0.51", f"--workdir={tmp_path}", *flags]) == 2
  assert match in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # nothing trained


def test_overrides_parse_literals_and_strings():
  config = rho_sweep._image_configs().get_config("digits")
  rho_sweep.config_overrides(["model.engram.layers=(1, 2)", "data.source=npz",
                              "train.learning_rate=1e-3"])(config)
  assert tuple(config.model.engram.layers) == (1, 2) and config.data.source == "npz"
  assert config.train.learning_rate == 1e-3


def test_rho_variants_load_through_the_command_line(capfd):
  """config_flags locks the config it loads: every section must be lockable."""
  from tests.cli import run_main
  code, out, err = run_main(capfd, "--dry_run", "--config=configs/image.py:digits_rho_0.51")
  assert code == 0, err[-2000:]
  assert "image model" in out
