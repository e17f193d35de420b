"""Every command's own flag errors are one line and exit status 2, like its other bad
input (in-process: `main(argv)`)."""
import importlib

import pytest

from engram_jax import cli

COMMANDS = ("engram_jax.generate", "engram_jax.workdir", "engram_jax.import_engram",
            "engram_jax.sampling.image", "engram_jax.studies.evaluate",
            "engram_jax.studies.inception", "engram_jax.studies.analyze",
            "engram_jax.studies.probes", "engram_jax.studies.seeds",
            "engram_jax.studies.rho_sweep", "engram_jax.studies.allocation_sweep",
            "engram_jax.studies.niah")


@pytest.mark.parametrize("module", COMMANDS)
def test_an_unknown_flag_is_one_line_and_status_2(module, capsys):
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as exit_:
    main(["--workdir=/nonexistent", "--no_such_flag=1"])
  assert exit_.value.code == 2
  out, err = capsys.readouterr()
  assert not out
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  # the unknown flag, or first a required one it lacks (a subcommand, --config, ...)
  assert ("--no_such_flag" in lines[0] or "required" in lines[0]) and "--help" in lines[0]


def test_a_missing_required_flag_and_a_bad_type_name_the_flag(capsys):
  parser = cli.Parser(prog="python -m tool")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1)
  for argv, flag in (([], "--workdir"), (["--workdir=w", "--steps=many"], "--steps")):
    with pytest.raises(SystemExit) as exit_:
      parser.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and flag in err, err
    assert "`python -m tool --help` lists the flags" in err


def test_run_prints_the_first_line_of_a_multi_line_error(capsys):
  def body():
    raise ValueError("data.levels=1: use 2..17\n  (a detail a library appended)")
  assert cli.run(body) == 2
  assert capsys.readouterr().err == "error: data.levels=1: use 2..17\n"
