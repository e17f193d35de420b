"""The sparsity-allocation study (arXiv 2601.07372, Sec. 3): one training run per rho.

`python -m engram_jax.studies.allocation_sweep sweep --config=configs/allocation.py:toy
--rhos=0,0.5,1 --workdir=W` trains one config per (rho, seed) with
`train.train_and_evaluate` (each point resumable, a finished point only read back) and
writes a table, a CSV and a plot of validation loss vs rho; `plan` prints the
allocations without training. The arithmetic lives in `engram_jax.allocation`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from engram_jax.allocation import allocate, config_at, reference_of, summary
from engram_jax import cli
from engram_jax.studies import run_results
CSV_FIELDS = ("rho", "rho_realized", "seed", "num_experts", "shared_dim", "table_size",
              "table_rows_used", "table_rows_stored", "total_params", "activated_params",
              "flops_per_token", "total_vs_ref", "activated_vs_ref", "flops_vs_ref",
              "steps", "eval_loss", "eval_bits_per_byte")


def load_config(spec: str):
  """`path.py:variant` -> the file's `get_config(variant)`."""
  from engram_jax import config_files
  return config_files.load(spec)


def point_config(c, rho: float, seed: int, steps: Optional[int] = None):
  """The family config `c` at `rho`, with `seed` (init and data order) and `steps`."""
  out = config_at(c, rho)
  out.seed = seed
  out.data.seed = seed
  if steps is not None:
    from engram_jax import run_config
    run_config.with_steps(out.train, steps)
  return out


def point_dir(workdir: str, rho: float, seed: int) -> str:
  import os
  return os.path.join(workdir, f"rho_{rho:g}_seed_{seed}")


def _shared_tokenizer(c, workdir: str) -> str:
  """Trains (once) the tokenizer every point uses, so they see the same tokens."""
  import os
  from engram_jax.data import text
  if c.data.get("tokenizer_path"):
    return c.data.tokenizer_path
  text.build_tokenizer(text.TextDataConfig(**dict(c.data)), workdir)
  from engram_jax import tokenizer as tokenizer_lib
  return os.path.join(workdir, tokenizer_lib.WORKDIR_TOKENIZER)


def run_point(c, rho: float, seed: int, workdir: str, steps: Optional[int] = None
              ) -> Optional[dict]:
  """Trains one point (resuming its workdir) and returns its row; a point with a
  result of this config is finished and only read back (`run_results`). None when
  the point stopped before `train.steps` (`train.stop_after_steps`)."""
  from engram_jax import workdir as workdir_lib
  directory = point_dir(workdir, rho, seed)
  config = point_config(c, rho, seed, steps)
  row = run_results.read(directory, config)
  if row is not None:
    print(f"rho {rho:g} seed {seed}: finished earlier (eval_loss "
          f"{row['eval_loss']:.4f}), skipped", flush=True)
    return row
  print(f"rho {rho:g} seed {seed}: {config.model.moe.num_experts} experts, Engram layers "
        f"{tuple(config.model.engram.layers)} table_size "
        f"{tuple(config.model.engram.table_size)} -> {directory}", flush=True)
  if not run_results.train(directory, config):
    return None
  metrics = run_results.final_eval(directory, int(config.train.steps))
  trained = workdir_lib.model_config(directory)
  reference = dataclasses.replace(reference_of(config), vocab_size=trained.vocab_size)
  row = dict(rho=rho, seed=seed, steps=int(config.train.steps), **summary(trained, reference),
             eval_loss=metrics.get("eval_loss"),
             eval_bits_per_byte=metrics.get("eval_bits_per_byte"))
  run_results.write(directory, row, config)
  return row


def sweep(c, rhos, workdir: str, steps: Optional[int] = None, seeds=(0,)) -> list[dict]:
  """Trains every (rho, seed) point of family `c` not finished yet, then reports every
  finished point in `workdir` (`write_report`). A failure leaves no directory it
  made and left empty."""
  from engram_jax import paths
  paths.local_output(workdir, "--workdir")  # the sweep's root: local reports
  for rho in rhos:  # every rho solvable before anything is made or trains
    try:
      config_at(c, rho)
    except ValueError as err:
      raise ValueError(f"--rhos: {err}") from None
  with paths.no_empty_dir_left(workdir):
    return _sweep(c, rhos, workdir, steps, seeds)


def _sweep(c, rhos, workdir: str, steps: Optional[int], seeds) -> list[dict]:
  from engram_jax import workdir as workdir_lib
  workdir_lib.ensure_writable(workdir)
  c = config_at(c, c.allocation.rho)
  c.data.tokenizer_path = _shared_tokenizer(c, workdir)
  unfinished = [(rho, seed) for rho in rhos for seed in seeds
                if run_point(c, rho, seed, workdir, steps) is None]
  if unfinished:
    raise ValueError(f"--workdir={workdir!r}: {len(unfinished)} points stopped before "
                     "train.steps (train.stop_after_steps); run the same command again "
                     "to train them on, then to report")
  rows = finished_points(workdir)
  write_report(workdir, rows, c)
  return rows


def finished_points(workdir: str) -> list[dict]:
  """The rows of every finished point in `workdir` (this and earlier invocations)."""
  import glob
  import json
  import os
  import sys
  rows = []
  for path in glob.glob(os.path.join(workdir, "rho_*_seed_*", run_results.RESULT)):
    try:
      with open(path, encoding="utf-8") as f:
        row = json.load(f)
    except (OSError, ValueError):
      row = None
    if not isinstance(row, dict) or not {"rho", "seed"} <= row.keys():
      print(f"warning: {path} is damaged (it is written whole: an edit?); that point is "
            "left out of the report until the sweep trains it again (its --rhos and "
            "--seeds)", file=sys.stderr, flush=True)
      continue
    row.pop(run_results.CONFIG, None)
    if row.get("eval_loss") is not None:  # a stopped point of older code: not finished
      rows.append(row)
  return sorted(rows, key=lambda r: (r["rho"], r["seed"]))


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else float("nan")


def write_report(workdir: str, rows: list[dict], c) -> None:
  """DIR/allocation.csv (one row per point), .md (per rho, mean over seeds), .png."""
  import os

  from engram_jax import paths
  from engram_jax.studies import reports
  # every report file whole or as it was: a kill truncates none
  reports.write_csv(os.path.join(workdir, "allocation.csv"), rows, CSV_FIELDS)
  by_rho = {}
  for row in rows:
    by_rho.setdefault(row["rho"], []).append(row)
  best = min(by_rho, key=lambda r: _mean(x["eval_loss"] for x in by_rho[r]))
  lines = [f"# Sparsity allocation: {c.allocation.family}, {len(rows)} runs", "",
           f"Validation loss (nats/token) vs rho, the share of the sparse parameters held "
           f"by routed experts (1 = pure MoE). Steps: "
           f"{sorted({r['steps'] for r in rows})}; seeds per rho: "
           f"{sorted({len(v) for v in by_rho.values()})}.", "",
           "| rho | realized | experts | Engram rows | total params | activated | "
           "FLOPs/token | val loss | per seed | bits/byte |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for rho in sorted(by_rho):
    group, first = by_rho[rho], by_rho[rho][0]
    losses = [r["eval_loss"] for r in group]
    lines.append(
        f"| {rho:g}{' (best)' if rho == best else ''} | {first['rho_realized']:.3f} | "
        f"{first['num_experts']} | {first['table_rows_used']:,} | "
        f"{first['total_params']:,} ({first['total_vs_ref']:+.2%}) | "
        f"{first['activated_params']:,} ({first['activated_vs_ref']:+.2%}) | "
        f"{first['flops_per_token']:,} ({first['flops_vs_ref']:+.2%}) | "
        f"{_mean(losses):.4f} | {', '.join(f'{x:.4f}' for x in losses)} | "
        f"{_mean(r.get('eval_bits_per_byte') for r in group):.4f} |")
  lines += ["", "Percentages: against the pure-MoE reference (rho = 1) of the family."]
  paths.atomic_write_text(os.path.join(workdir, "allocation.md"), "\n".join(lines) + "\n")
  _plot(os.path.join(workdir, "allocation.png"), by_rho, c.allocation.family)


def _plot(path: str, by_rho: dict, family: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rhos = sorted(by_rho)
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
  for rho in rhos:
    losses = [r["eval_loss"] for r in by_rho[rho]]
    ax.scatter([rho] * len(losses), losses, s=12, color="tab:gray", alpha=0.7)
  ax.plot(rhos, [_mean(r["eval_loss"] for r in by_rho[rho]) for rho in rhos], "o-",
          color="tab:blue", label="mean over seeds")
  ax.set_xlabel("rho (share of sparse params in routed experts)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"Sparsity allocation ({family})", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  from engram_jax import paths
  paths.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
  plt.close(fig)


def plan(c, rhos) -> str:
  """The allocation of every rho as a markdown table, without training."""
  reference = reference_of(c)
  lines = ["| rho | realized | experts | shared width | table_size | Engram rows (stored) | "
           "total params | activated | FLOPs/token |", "|---|---|---|---|---|---|---|---|---|"]
  for rho in rhos:
    solved = allocate(reference, rho, tuple(c.allocation.engram_layers),
                      c.allocation.family, c.allocation.expert_multiple)
    s = summary(solved, reference)
    lines.append(f"| {rho:g} | {s['rho_realized']:.3f} | {s['num_experts']} | "
                 f"{s['shared_dim']} | {s['table_size']:,} | {s['table_rows_used']:,} "
                 f"({s['table_rows_stored']:,}) | {s['total_params']:,} "
                 f"({s['total_vs_ref']:+.2%}) | {s['activated_params']:,} "
                 f"({s['activated_vs_ref']:+.2%}) | {s['flops_per_token']:,} "
                 f"({s['flops_vs_ref']:+.2%}) |")
  return "\n".join(lines)


def _floats(text: str, flag: str) -> list[float]:
  return cli.parse_list(text, flag, float, example="0,0.5,1")


def main(argv=None) -> int:
  import os
  parser = cli.Parser(
      prog="python -m engram_jax.studies.allocation_sweep",
      description="Sparsity allocation between MoE experts and Engram tables.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, text in (("sweep", "train one point per rho and seed, then write "
                      "allocation.md/.csv/.png in --workdir"),
                     ("plan", "print the allocation of each rho (no training)")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=True, help="configs/allocation.py:toy")
    p.add_argument("--rhos", default="0,0.25,0.5,0.75,1")
    if name == "sweep":
      p.add_argument("--workdir", required=True)
      p.add_argument("--steps", type=int, default=None, help="override train.steps")
      p.add_argument("--seeds", default="0")
      p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a config field (repeatable), e.g. "
                          "--set=data.source=site_packages --set=data.max_files=1500")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  def body():
    c = load_config(args.config)
    if "allocation" not in c:
      raise ValueError(f"--config={args.config!r} has no `allocation` section; use a "
                       "family of configs/allocation.py (e.g. configs/allocation.py:toy)")
    rhos = _floats(args.rhos, "--rhos")
    if args.command == "plan":
      print(plan(c, rhos))
      return 0
    if args.steps is not None and args.steps < 1:
      raise ValueError(f"--steps={args.steps}: use a positive integer")
    seeds = [int(s) for s in _floats(args.seeds, "--seeds")]
    from engram_jax import config_files
    config_files.overrides(args.set)(c)
    sweep(c, rhos, args.workdir, args.steps, seeds)
    print(f"wrote {os.path.join(args.workdir, 'allocation.md')}, allocation.csv, "
          "allocation.png", flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
