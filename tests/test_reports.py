"""Report writers are atomic: a kill mid-write leaves the previous files byte-identical
and no temp file behind (probes' and sweeps' reports, analyze's tables and heat map, the
image sample grid)."""
import builtins
import os

import numpy as np
import pytest

from engram_jax.sampling import image
from engram_jax.studies import analyze, probes, reports


class Killed(BaseException):
  """What a kill looks like to the writer: no `except Exception` catches it."""


def kill_the_nth_write(monkeypatch, n: int) -> None:
  """The `n`-th file opened for writing takes half of its first write, then the process
  is 'killed' (every writer ends in `open`: csv, markdown, numpy, matplotlib / PIL)."""
  real_open, opened = builtins.open, [0]

  class HalfFile:
    def __init__(self, f):
      self._f = f

    def write(self, data):
      self._f.write(data[:max(1, len(data) // 2)])
      self._f.flush()
      raise Killed

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

  def fake_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if not any(c in mode for c in "wax+"):
      return f
    opened[0] += 1
    return HalfFile(f) if opened[0] == n else f

  monkeypatch.setattr(builtins, "open", fake_open)


def snapshot(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def check_kills_keep_the_previous_files(monkeypatch, directory, write, count: int):
  """`write()` once; then the same write killed in each of its `count` files in turn
  leaves every file as it was (the same bytes are rewritten before the kill)."""
  write()
  before = snapshot(directory)
  assert len(before) == count and all(before.values())
  for n in range(1, count + 1):
    with monkeypatch.context() as patch:
      kill_the_nth_write(patch, n)
      with pytest.raises(Killed):
        write()
    after = snapshot(directory)
    assert after.keys() == before.keys(), (n, sorted(after))  # no .tmp-* left behind
    for name in before:
      assert after[name] == before[name], (n, name)


def test_write_report_killed_mid_write_keeps_the_previous_report(tmp_path, monkeypatch):
  results = {"a": {"kl": np.array([0.0, 0.1]), "js": np.array([0.0, 0.01])},
             "b": {"kl": np.array([1e-3, 2e-3]), "js": np.array([1e-4, 3e-4])}}
  summary, tests = reports.summarise(results, n_boot=20, n_perm=20, compare=("a", "b"))

  def write():
    return reports.write_report(str(tmp_path), "demo", [("summary", summary),
                                                        ("tests", tests)],
                                probes.plot_divergences(summary), "header")
  check_kills_keep_the_previous_files(monkeypatch, tmp_path, write, 4)
  assert snapshot(tmp_path)["demo.png"][:8] == b"\x89PNG\r\n\x1a\n"  # PNG, not named .png


def test_analysis_files_killed_mid_write_keep_the_previous_analysis(tmp_path, monkeypatch):
  lens = [{"layer": i, "loss": 2.0 - i, "top1_agreement": 0.5 * i} for i in range(2)]
  results = {"engram": {"step": 3, "lens": lens}, "baseline": {"step": 3, "lens": lens}}
  cka = np.array([[1.0, 0.4], [0.3, 0.9]])
  check_kills_keep_the_previous_files(
      monkeypatch, tmp_path,
      lambda: analyze.write_analysis(str(tmp_path), results, cka, "# analysis\n"), 4)
  np.testing.assert_allclose(np.loadtxt(tmp_path / "cka.csv", delimiter=","), cka)
  assert snapshot(tmp_path)["cka.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_grid_files_killed_mid_write_keep_the_previous_grid(tmp_path, monkeypatch):
  codes = np.random.default_rng(0).integers(0, 8, (2, 3, 4, 4))
  png, npz = str(tmp_path / "grid.png"), str(tmp_path / "grid.npz")

  def write():
    image.save_grid_png(png, codes, [0, 1], 7)
    image.save_codes_npz(npz, codes.reshape(6, 4, 4), np.repeat([0, 1], 3))
  check_kills_keep_the_previous_files(monkeypatch, tmp_path, write, 2)
  assert snapshot(tmp_path)["grid.png"][:8] == b"\x89PNG\r\n\x1a\n"
  with np.load(npz) as saved:  # np.savez kept the name (no .npz.npz)
    np.testing.assert_array_equal(saved["codes"], codes.reshape(6, 4, 4))
