"""What the studies report, and how sure they are: bootstrap intervals and paired
permutation tests over per-image values, and reports as markdown, CSV and a PNG.

Used by the probes (`studies/probes.py`) and the rho sweep; docs/probes.md has the
formulas.
"""
from __future__ import annotations

import csv
import functools
import itertools
import os
from typing import Callable, Optional, Sequence

import numpy as np

from engram_jax import paths as paths_lib


def chunks(n: int, size: int) -> list[slice]:
  """[0, n) in slices of at most `size` (batches of images; resamples in bounded memory)."""
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------
def bootstrap_ci(values_I, rng: np.random.Generator, n_boot: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean (images resampled with replacement)."""
  values = np.asarray(values_I, np.float64)
  means = np.empty(n_boot)
  for part in chunks(n_boot, 1000):
    rows = rng.integers(0, len(values), (part.stop - part.start, len(values)))
    means[part] = values[rows].mean(1)
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def paired_permutation_test(a_I, b_I, rng: np.random.Generator,
                            n_perm: int = 10000) -> float:
  """Two-sided p-value of mean(a - b) = 0 by random sign flips of the paired
  differences: (1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + n_perm)."""
  d = np.asarray(a_I, np.float64) - np.asarray(b_I, np.float64)
  observed = abs(d.mean())
  hits = 0
  for part in chunks(n_perm, 1000):
    signs = rng.choice(np.array([-1.0, 1.0]), (part.stop - part.start, len(d)))
    hits += int(np.sum(np.abs(signs @ d) / len(d) >= observed * (1 - 1e-12)))
  return (1 + hits) / (1 + n_perm)


def summarise(results: dict[str, dict[str, np.ndarray]], *, seed: int = 0,
              n_boot: int = 1000, n_perm: int = 10000,
              compare: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
  """(per-kind means with bootstrap CIs, pairwise permutation tests among `compare`)."""
  rng = np.random.default_rng(seed)
  summary = []
  for kind, r in results.items():
    row = {"kind": kind, "n": len(r["kl"])}
    for m in ("kl", "js"):
      low, high = bootstrap_ci(r[m], rng, n_boot)
      row.update({m: float(np.mean(r[m])), f"{m}_low": low, f"{m}_high": high})
    summary.append(row)
  tests = []
  for a, b in itertools.combinations(compare, 2):
    row = {"kind_a": a, "kind_b": b}
    for m in ("kl", "js"):
      row[f"{m}_diff"] = float(np.mean(results[a][m] - results[b][m]))
      row[f"{m}_p"] = paired_permutation_test(results[a][m], results[b][m], rng, n_perm)
    tests.append(row)
  return summary, tests


# ----------------------------------------------------------------------------------
# Reports: markdown, CSV, PNG
# ----------------------------------------------------------------------------------
def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
  columns = list(rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_report(out_dir: str, name: str, tables: Sequence[tuple[str, list[dict]]],
                 plot: Callable, header: str = "") -> list[str]:
  """`name.md` (every table), one CSV per table (`name.csv`, `name_<title>.csv`) and
  `name.png` drawn by `plot(figure)`; returns the paths. Each file is written whole or
  not at all: a kill mid-write leaves the previous report as it was."""
  from matplotlib.figure import Figure
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{name}.md")]
  text = f"# {name}\n\n{header}\n\n" if header else f"# {name}\n\n"
  text += "".join(f"## {title}\n\n{markdown_table(rows)}\n\n" for title, rows in tables)
  paths_lib.atomic_write_text(paths[0], text)
  for i, (title, rows) in enumerate(tables):
    path = os.path.join(out_dir, f"{name}.csv" if i == 0 else f"{name}_{title}.csv")
    write_csv(path, rows)
    paths.append(path)
  fig = Figure(figsize=(9, 3.5))
  plot(fig)
  paths.append(os.path.join(out_dir, f"{name}.png"))
  paths_lib.atomic_write(paths[-1], functools.partial(
      fig.savefig, format="png", dpi=100, bbox_inches="tight"))  # the temp name has no .png
  return paths


def write_csv(path: str, rows: Sequence[dict], fields: Optional[Sequence[str]] = None
              ) -> None:
  """`rows` (dicts) as a CSV with a header line of `fields` (default: the first row's
  keys; other keys are left out), whole or not at all."""
  def write(tmp: str) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]), extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
  paths_lib.atomic_write(path, write)
