"""Probes of what Engram does in an AR image model (arXiv 2605.13179).

* `gate_clamp`: the same weights with the gate fixed to constants g (and the learned
  gate): NLL, and FID / IS of samples. g = 0 removes the Engram pathway exactly.
* `donor`: the backbone reads the image's own tokens; only Engram's hash inputs come
  from another image of the same class (matched: the nearest, adversarial: the
  farthest, random), or from the image itself (the control, divergence exactly 0).
  KL and JS of the next-token distributions against the original, bootstrap CIs,
  and paired permutation tests of whether donor kinds can be told apart.
* `table`: the learned table collapsed to its mean row or replaced by fresh
  N(0, table_init_std) rows, and the pathway switched off (g = 0): the same
  divergences, to set the donor probe's numbers against.

Every probe is a function of (model config or model, params, batches), testable
without a workdir; `python -m engram_jax.studies.probes --workdir=DIR --probe=...` runs them
on a checkpoint and writes `DIR/probes/<probe>.{md,csv,png}`. docs/probes.md has the
formulas.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import cli
from engram_jax import config as config_lib
from engram_jax import run_config
from engram_jax import spatial_hashing
from engram_jax.studies import evaluate
from engram_jax.studies import feature_nets
from engram_jax.studies.reports import chunks, summarise, write_report
from engram_jax.models.image import ImageARModel, ImageModelConfig
from engram_jax.layers.engram import GATE_VALUE
from engram_jax.progress import progress

GATES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, "learned")
DONOR_KINDS = ("self", "matched", "random", "adversarial")
TABLE_KINDS = ("collapse", "randomise", "gate_off")
PROBES = ("gate_clamp", "donor", "table")
_LEARNED_GATE_PARAMS = ("key", "hidden_norm", "key_norm")  # unused by a constant gate


# ----------------------------------------------------------------------------------
# Gate clamp
# ----------------------------------------------------------------------------------
def with_gate(cfg: ImageModelConfig, gate) -> ImageModelConfig:
  """The same model with `engram.gate = gate` ("learned", "off" or a constant)."""
  engram = dataclasses.replace(cfg.model.engram, gate=gate)
  return dataclasses.replace(
      cfg, model=config_lib.validate(dataclasses.replace(cfg.model, engram=engram)))


def _engram_blocks(params) -> list[str]:
  return [name for name, sub in params.items() if isinstance(sub, dict) and "engram" in sub]


def params_for_gate(params, gate):
  """`params` laid out for `gate`: a constant gate drops W_K and the gate's norms."""
  constant = config_lib.gate_constant(gate)
  out = dict(params)
  for name in _engram_blocks(params):
    engram = dict(params[name]["engram"])
    if constant is None:
      missing = [k for k in _LEARNED_GATE_PARAMS if k not in engram]
      if missing:
        raise ValueError(f"engram.gate='learned': {name}/engram lacks {missing}; these "
                         "weights were trained with a constant engram.gate, so clamp the "
                         "gate to constants only (--gates=0,0.1,...)")
    else:
      engram = {k: v for k, v in engram.items() if k not in _LEARNED_GATE_PARAMS}
    out[name] = {**params[name], "engram": engram}
  return out


def with_traced_gate(params, constant: float):
  """Constant-gate params (`params_for_gate`) with the constant as the `GATE_VALUE`
  param of every Engram layer: a model built for any constant gate then computes this
  one, so all constants share one compiled program."""
  out = dict(params)
  for name in _engram_blocks(params):
    out[name] = {**params[name], "engram": {**params[name]["engram"],
                                            GATE_VALUE: np.float32(constant)}}
  return out


def gate_label(gate) -> str:
  return gate if isinstance(gate, str) else f"{float(gate):g}"


def gate_clamp(cfg: ImageModelConfig, params, batches: Sequence[dict], *,
               gates=GATES, quality: Optional[Callable] = None) -> list[dict]:
  """One row per gate: NLL (bits per token) and, with `quality(model, params)`, its dict
  (FID, IS). Pass the same sampling key for every gate: common random numbers."""
  if not cfg.model.engram.layers:
    raise ValueError("gate_clamp: model.engram.layers is empty; the probe needs Engram")
  rows = []
  for gate in progress(gates, "gate clamp: gates"):
    constant = config_lib.gate_constant(gate)
    # every constant runs the model built for gate 1.0, its value a traced param:
    # one compiled NLL and sampler for all of them (the learned gate needs its own)
    model = ImageARModel(with_gate(cfg, gate if constant is None else 1.0))
    gate_params = params_for_gate(params, gate)
    if constant is not None:
      gate_params = with_traced_gate(gate_params, constant)
    row = {"gate": gate_label(gate),
           "nll_bits": evaluate.nll_bits_per_token(model, gate_params, batches)}
    if quality is not None:
      row.update(quality(model, gate_params))
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------------
# Divergences of next-token distributions
# ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model: ImageARModel, params, inputs_BxT, hash_ids_BxTxLxH):
  return jax.nn.log_softmax(
      model.apply({"params": params}, inputs_BxT, hash_ids_BxTxLxH=hash_ids_BxTxLxH), -1)


@jax.jit
def kl_js(logp_BxTxC, logq_BxTxC):
  """Per-image KL(p || q) and JS(p, q) in nats, averaged over positions: `[B]` each.

  Entries where the two log-probabilities are equal contribute exactly 0 (also to JS,
  where log m is taken as log p), so identical inputs give exactly 0.
  """
  p, q = jnp.exp(logp_BxTxC), jnp.exp(logq_BxTxC)
  kl = jnp.sum(p * (logp_BxTxC - logq_BxTxC), -1)
  logm = jnp.where(logp_BxTxC == logq_BxTxC, logp_BxTxC,
                   jnp.logaddexp(logp_BxTxC, logq_BxTxC) - jnp.log(2.0))
  js = 0.5 * jnp.sum(p * (logp_BxTxC - logm) + q * (logq_BxTxC - logm), -1)
  return kl.mean(-1), js.mean(-1)


def _hash_ids(cfg: ImageModelConfig, cells_BxT) -> np.ndarray:
  e = cfg.model.engram
  return spatial_hashing.spatial_hash_ids(np.asarray(cells_BxT, np.int32), e.hash_spec(),
                                  cfg.height, cfg.width, e.stencil)


def _stack(batches: Sequence[dict]) -> dict[str, np.ndarray]:
  if not batches:
    raise ValueError("no batches: check --split and --max_batches")
  return {k: np.concatenate([np.asarray(b[k]) for b in batches])
          for k in ("inputs", "targets", "labels")}


# ----------------------------------------------------------------------------------
# Donor probe
# ----------------------------------------------------------------------------------
def donor_indices(cells_IxT, labels_I, kind: str, rng: np.random.Generator) -> np.ndarray:
  """The donor of every image: itself ("self") or another image of its class.

  Distance is the Hamming distance between code grids (cells that differ).
  "matched": the nearest other same-class image; "adversarial": the farthest; "random":
  a uniform draw among the others. Ties go to the lowest index.
  """
  cells, labels = np.asarray(cells_IxT), np.asarray(labels_I)
  n = len(labels)
  if kind == "self":
    return np.arange(n)
  if kind not in DONOR_KINDS:
    raise ValueError(f"--donors: unknown donor kind {kind!r}; use {list(DONOR_KINDS)}")
  counts = np.bincount(labels)
  lonely = np.flatnonzero(counts[labels] < 2)
  if len(lonely):
    raise ValueError(f"donor probe: image {lonely[0]} (class {labels[lonely[0]]}) has no "
                     "other image of its class among the probed batches; raise "
                     "--max_batches (or data.batch_size)")
  if kind == "random":
    others = [np.flatnonzero((labels == labels[i]) & (np.arange(n) != i)) for i in range(n)]
    return np.array([rng.choice(row) for row in others])
  donors = np.empty(n, np.int64)
  for label in np.unique(labels):  # distances within a class only: O(sum n_c^2 T)
    members = np.flatnonzero(labels == label)
    distance = (cells[members, None, :] != cells[None, members, :]).sum(-1)
    np.fill_diagonal(distance, -1 if kind == "adversarial" else np.iinfo(np.int64).max)
    pick = np.argmax(distance, 1) if kind == "adversarial" else np.argmin(distance, 1)
    donors[members] = members[pick]
  return donors


def donor_probe(model: ImageARModel, params, batches: Sequence[dict], *,
                kinds=DONOR_KINDS, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """{kind: {"kl": [I], "js": [I], "donor": [I]}}: each image against itself read
  through a donor's Engram hash inputs (the backbone keeps the image's tokens)."""
  cfg = model.cfg
  if not cfg.model.engram.layers:
    raise ValueError("donor probe: model.engram.layers is empty; the probe needs Engram")
  data = _stack(batches)
  cells, labels = data["targets"], data["labels"]
  size = len(batches[0]["labels"])
  rng = np.random.default_rng(seed)
  donors = {kind: donor_indices(cells, labels, kind, rng) for kind in kinds}
  out = {kind: {"kl": [], "js": [], "donor": donors[kind]} for kind in kinds}
  for rows in progress(chunks(len(labels), size), "donor probe batches"):
    inputs = jnp.asarray(data["inputs"][rows])
    reference = _log_probs(model, params, inputs, _hash_ids(cfg, cells[rows]))
    for kind in kinds:
      swapped = _log_probs(model, params, inputs, _hash_ids(cfg, cells[donors[kind][rows]]))
      kl, js = kl_js(reference, swapped)
      out[kind]["kl"].append(np.asarray(kl))
      out[kind]["js"].append(np.asarray(js))
  return {k: {m: np.concatenate(v) if m != "donor" else v for m, v in d.items()}
          for k, d in out.items()}


# ----------------------------------------------------------------------------------
# Table probe
# ----------------------------------------------------------------------------------
def edit_tables(cfg: ImageModelConfig, params, kind: str, rng_key):
  """Params with every Engram table collapsed to its mean row or re-drawn.

  "collapse": every row (padding included) = the mean of the rows a hash can address;
  "randomise": fresh N(0, engram.table_init_std) rows (the initialiser's law).
  """
  e = cfg.model.engram
  spec, out = e.hash_spec(), dict(params)
  for i, layer in enumerate(e.layers):
    name = f"block_{layer}"
    table = params[name]["engram"]["table"]
    if kind == "collapse":
      new = jnp.broadcast_to(jnp.mean(table[:spec.rows(i)], 0), table.shape)
    elif kind == "randomise":
      new = e.table_init_std * jax.random.normal(jax.random.fold_in(rng_key, i),
                                                 table.shape, table.dtype)
    else:
      raise ValueError(f"edit_tables: unknown kind {kind!r}; use 'collapse' or 'randomise'")
    out[name] = {**params[name], "engram": {**params[name]["engram"],
                                            "table": new.astype(table.dtype)}}
  return out


def table_probe(model: ImageARModel, params, batches: Sequence[dict], *,
                kinds=TABLE_KINDS, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """{kind: {"kl": [I], "js": [I]}}: the model with edited tables (or with the pathway
  off, "gate_off") against the model as trained, on the images' own hash inputs."""
  cfg = model.cfg
  if not cfg.model.engram.layers:
    raise ValueError("table probe: model.engram.layers is empty; the probe needs Engram")
  data = _stack(batches)
  size = len(batches[0]["labels"])
  key = jax.random.key(seed)
  variants = {}
  for kind in kinds:
    if kind == "gate_off":
      variants[kind] = (ImageARModel(with_gate(cfg, 0.0)), params_for_gate(params, 0.0))
    else:
      variants[kind] = (model, edit_tables(cfg, params, kind, key))
  out = {kind: {"kl": [], "js": []} for kind in kinds}
  for rows in progress(chunks(len(data["labels"]), size), "table probe batches"):
    inputs, ids = jnp.asarray(data["inputs"][rows]), _hash_ids(cfg, data["targets"][rows])
    reference = _log_probs(model, params, inputs, ids)
    for kind, (alt_model, alt_params) in variants.items():
      kl, js = kl_js(reference, _log_probs(alt_model, alt_params, inputs, ids))
      out[kind]["kl"].append(np.asarray(kl))
      out[kind]["js"].append(np.asarray(js))
  return {k: {m: np.concatenate(v) for m, v in d.items()} for k, d in out.items()}


def plot_gate_clamp(rows: Sequence[dict]) -> Callable:
  metrics = [m for m in ("nll_bits", "fid", "inception_score") if m in rows[0]]

  def plot(fig):
    labels = [r["gate"] for r in rows]
    for i, metric in enumerate(metrics):
      ax = fig.add_subplot(1, len(metrics), i + 1)
      ax.plot(range(len(rows)), [r[metric] for r in rows], "o-")
      ax.set_xticks(range(len(rows)), labels, rotation=45)
      ax.set_xlabel("gate g")
      ax.set_title(metric)
    fig.tight_layout()
  return plot


def plot_divergences(summary: Sequence[dict]) -> Callable:
  def plot(fig):
    for i, metric in enumerate(("kl", "js")):
      ax = fig.add_subplot(1, 2, i + 1)
      means = np.array([r[metric] for r in summary])
      err = np.array([[r[metric] - r[f"{metric}_low"], r[f"{metric}_high"] - r[metric]]
                      for r in summary]).T
      x = np.arange(len(summary))
      ax.bar(x, means, yerr=err, capsize=3)
      ax.set_xticks(x, [r["kind"] for r in summary], rotation=30)
      if np.any(means > 0):
        ax.set_yscale("log")
      for xi, m in zip(x, means):
        if m <= 0:
          ax.annotate("0", (xi, 0), xycoords=("data", "axes fraction"), ha="center",
                      va="bottom")
      ax.set_title(f"{metric.upper()} vs original (nats/token, 95% CI)")
    fig.tight_layout()
  return plot


# ----------------------------------------------------------------------------------
# Command line: python -m engram_jax.studies.probes --workdir=DIR --probe=donor
# ----------------------------------------------------------------------------------
def _parse_gates(text: str):
  gates = []
  for item in text.split(","):
    item = item.strip()
    if item in ("learned", "off"):
      gates.append(item)
    elif item:
      try:
        value = float(item)
      except ValueError:
        value = -1.0
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"--gates: {item!r} is not 'learned', 'off' or a number in [0, 1]")
      gates.append(value)
  if not gates:
    raise ValueError("--gates is empty: e.g. --gates=0,0.1,1,learned")
  return gates


def _divergence_report(args, out_dir: str, name: str, results, compare, header) -> list[str]:
  summary, tests = summarise(results, seed=args.seed, n_boot=args.bootstrap,
                             n_perm=args.permutations, compare=compare)
  tables = [("summary", summary)] + ([("tests", tests)] if tests else [])
  header += (f"\n\nkl = KL(p_original || p_{name}), js = Jensen-Shannon, in nats per cell, "
             f"mean over images; _low/_high: 95% percentile bootstrap CI "
             f"({args.bootstrap} resamples)")
  if tests:
    header += (f"; p: two-sided paired sign-flip permutation test of equal means "
               f"({args.permutations} permutations)")
  return write_report(out_dir, name, tables, plot_divergences(summary), header)


def run(args) -> list[str]:
  """Runs the probes of parsed `args` on the workdir's newest checkpoint; the paths."""
  from engram_jax import workdir
  from engram_jax.data import images

  trained = workdir.load(args.workdir, kind="image")
  config, model, params, step = trained.config, trained.model, trained.params, trained.step
  cfg = model.cfg
  if not cfg.model.engram.layers:
    raise ValueError(f"--workdir={args.workdir!r}: model.engram.layers is empty (a "
                     "baseline); the probes need a model with Engram")
  data_cfg = run_config.image_data_config(config.data)
  if args.batch_size:
    data_cfg = dataclasses.replace(data_cfg, batch_size=args.batch_size)
  batches = list(images.eval_batches(data_cfg, args.split,
                                     max_batches=args.max_batches or None))
  from engram_jax import paths
  out_dir = (paths.local_output(args.out, "--out") if args.out else
             paths.local_output(os.path.join(args.workdir, "probes"), "--out"))
  header = (f"workdir `{args.workdir}`, step {step}, split `{args.split}`, "
            f"{sum(len(b['labels']) for b in batches)} images, seed {args.seed}")
  paths = []
  probes = PROBES if args.probe == "all" else (args.probe,)
  if "gate_clamp" in probes:
    trained = cfg.model.engram.gate
    gates = (_parse_gates(args.gates) if args.gates else
             [g for g in GATES if g != "learned" or config_lib.gate_constant(trained) is None])
    quality, note = None, f"; trained with engram.gate={gate_label(trained)}"
    if args.samples_per_class:
      quality = evaluate.quality_from_config(
          config, args.split, samples_per_class=args.samples_per_class, seed=args.seed,
          cache_dir=args.classifier_dir or args.workdir, **feature_nets.feature_net_options(args))
      note += f"; FID/IS: {args.samples_per_class} samples per class, {quality.describe}"
    rows = gate_clamp(cfg, params, batches, gates=gates, quality=quality)
    paths += write_report(out_dir, "gate_clamp", [("gates", rows)], plot_gate_clamp(rows),
                          header + note)
  if "donor" in probes:
    results = donor_probe(model, params, batches, seed=args.seed)
    paths += _divergence_report(args, out_dir, "donor", results,
                                [k for k in DONOR_KINDS if k != "self"], header)
  if "table" in probes:
    results = table_probe(model, params, batches, seed=args.seed)
    paths += _divergence_report(args, out_dir, "table", results, (), header)
  return paths


def parse_args(argv):
  """The probes command's flags, checked before any work (a ValueError names the flag)."""
  return check_args(build_parser().parse_args(argv))


def build_parser() -> cli.Parser:
  """The probes command's flags (also the keywords of `jobs.probes`)."""
  parser = cli.Parser(
      prog="python -m engram_jax.studies.probes",
      description="Probe how an image model uses Engram; writes DIR/probes/<probe>."
                  "{md,csv,png} (docs/probes.md).")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--probe", required=True, choices=PROBES + ("all",))
  parser.add_argument("--split", default="test", choices=("train", "val", "test"))
  parser.add_argument("--max_batches", type=int, default=0, help="0 = every full batch")
  parser.add_argument("--batch_size", type=int, default=0, help="0 = data.batch_size")
  parser.add_argument("--out", default="", help="output directory (default DIR/probes)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--gates", default="", help="gate_clamp: e.g. 0,0.1,1,learned "
                      "(default 0,0.01,0.05,0.1,0.2,0.5,1,learned)")
  parser.add_argument("--samples_per_class", type=int, default=10,
                      help="gate_clamp: samples per class for FID/IS; 0 = NLL only")
  feature_nets.add_feature_net_flags(parser)
  parser.add_argument("--classifier_dir", default="",
                      help="where the digits classifier is cached (default: the workdir)")
  parser.add_argument("--bootstrap", type=int, default=1000)
  parser.add_argument("--permutations", type=int, default=10000)
  return parser


def check_args(args):
  """`args` when every value is usable, else a ValueError naming the flag."""
  for name in ("max_batches", "batch_size", "samples_per_class"):
    if getattr(args, name) < 0:
      raise ValueError(f"--{name}={getattr(args, name)}: use 0 or a positive integer")
  for name in ("bootstrap", "permutations"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name}={getattr(args, name)}: use a positive integer")
  feature_nets.feature_net_options(args)  # a contradictory choice fails before any work
  return args


def main(argv=None) -> int:

  def body():
    paths = run(parse_args(argv))
    for path in paths:
      print(path, flush=True)
    for path in paths:
      if path.endswith(".md"):
        with open(path, encoding="utf-8") as f:
          print(f.read(), flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
