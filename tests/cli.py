"""Commands run in-process, as a user would type them (no subprocess start-up)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capfd, *args) -> tuple[int, str, str]:
  """`python -m engram_jax.main ARGS` in this process from the repository root:
  (exit status, stdout, stderr)."""
  from engram_jax import main
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    capfd.readouterr()
    code = main.run(["engram_jax.main", *args])
  finally:
    os.chdir(cwd)
  captured = capfd.readouterr()
  return code, captured.out, captured.err
