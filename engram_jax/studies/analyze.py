"""The Engram paper's mechanistic analyses: LogitLens per layer and CKA between models.

`python -m engram_jax.studies.analyze --workdir=ENGRAM --baseline=BASELINE --out=DIR`

- **LogitLens**: each block's residual stream read out through the model's own final
  norm and unembedding: its next-token loss and how often its top-1 token equals the
  final layer's. The paper's claim: with Engram, early layers reach "final-like"
  predictions sooner (static reconstruction is offloaded to memory).
- **Linear CKA** (Kornblith et al. 2019) between every layer of the Engram model and
  every layer of the baseline, on the same tokens: the paper reads an off-diagonal shift
  (Engram layer l resembles a deeper baseline layer) as effective depth gained.

Residual streams are computed block by block from the trained params
(`models.layouts.unstack_blocks`): the same blocks the model scans, applied one at a time so
that every layer's output is visible; the last stream through the LogitLens equals the
model's own logits (tested). Both kinds of run (dense or hyper-connected backbones):
LM workdirs (1D n-grams, logits over the vocabulary, validation token rows) and
class-conditional image workdirs (`models.image`: 2D RoPE, 2D stencil n-grams, logits
over the codebook, validation code sequences that start with the class token). The
two kinds differ only in `_decoder`, `residual_streams`' hashing and RoPE, `read_out`'s
columns and `_eval_sequences`; the lens, CKA, tables and plot are shared.
"""
from __future__ import annotations

import argparse
import csv
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import cli
from engram_jax import config as config_lib
from engram_jax import hashing
from engram_jax import paths
from engram_jax import run_config
from engram_jax.layers.hyper import collapse_branches, expand_branches
from engram_jax.layers.norms import RMSNorm
from engram_jax.models import image, layouts, lm


def _decoder(model_cfg) -> tuple[config_lib.ModelConfig, image.ImageModelConfig | None]:
  """(the decoder's `ModelConfig`, the image grid or None): an image model is the LM's
  decoder plus a grid, so everything below takes either config."""
  if isinstance(model_cfg, image.ImageModelConfig):
    return model_cfg.model, model_cfg
  return model_cfg, None


def residual_streams(model_cfg, params, tokens_BxT,
                     ngram_tokens_BxT=None) -> list[jax.Array]:
  """`[B, T, D]` streams: the embedding, then the output of every block (L + 1 in all).

  model_cfg: a `ModelConfig` (LM) or an `ImageModelConfig` (tokens: the class token,
    then the cells; Engram hashes the 2D stencil and RoPE rotates with (row, column),
    both as `ImageARModel` does). ngram_tokens_BxT: an LM's compressed-vocabulary ids.
  With hyper-connections a stream is the sum of its branches (the model's read-out).
  """
  cfg, grid = _decoder(model_cfg)
  if cfg.moe.enabled:
    raise ValueError("analyses support dense backbones (model.moe.num_experts=0)")
  b, t = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  hash_ids, rope_BxTxA = None, None
  if grid is not None:
    rope_BxTxA = image.rope_positions_2d(positions_BxT, grid.width)
    if cfg.engram.layers:  # the model's own hashing: no params needed
      hash_ids = image.ImageARModel(grid).apply({}, tokens_BxT, method="engram_hash_ids")
  elif cfg.engram.layers:
    ngram = tokens_BxT if ngram_tokens_BxT is None else ngram_tokens_BxT
    hash_ids = hashing.ngram_hash_ids(jnp.asarray(ngram), cfg.engram.hash_spec())
  h = params["embed"]["embedding"][tokens_BxT].astype(jnp.dtype(cfg.dtype))
  streams = [h.astype(jnp.float32)]
  if cfg.hyper_connections:
    h = expand_branches(h, cfg.branches)
  for layer, block_params in enumerate(layouts.unstack_blocks(params, cfg)):
    engram_index = (cfg.engram.layers.index(layer) if layer in cfg.engram.layers
                    else None)
    block = lm.Block(cfg, engram_index=engram_index, layer=layer)
    h = block.apply({"params": block_params}, h, positions_BxT, hash_ids, None,
                    rope_BxTxA)
    streams.append((collapse_branches(h) if cfg.hyper_connections else h)
                   .astype(jnp.float32))
  return streams


def read_out(model_cfg, params, h_BxTxD):
  """Logits of a stream through the final norm and the unembedding: `[B, T, V]` for an
  LM, `[B, T, C]` (the codebook; classes are never predicted) for an image model."""
  cfg, grid = _decoder(model_cfg)
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  normed = RMSNorm(("embed",), cfg.norm_eps, dtype, pdtype).apply(
      {"params": params["final_norm"]}, h_BxTxD.astype(dtype))
  if cfg.tie_embeddings:
    kernel = params["embed"]["embedding"].T
    if grid is not None:
      kernel = kernel[:, :grid.codebook_size]
  else:
    kernel = params["unembed"]["kernel"]
  return jnp.einsum("btd,dv->btv", normed, kernel.astype(dtype)).astype(jnp.float32)


def logit_lens(model_cfg, params, streams, targets_BxT) -> list[dict]:
  """Per stream: `loss` (nats/token of the targets) and `top1_agreement` with the
  final stream's top-1 token."""
  final_top1 = jnp.argmax(read_out(model_cfg, params, streams[-1]), axis=-1)
  rows = []
  for layer, h in enumerate(streams):
    logits = read_out(model_cfg, params, h)
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1).mean()
    agree = (jnp.argmax(logits, axis=-1) == final_top1).mean()
    rows.append({"layer": layer, "loss": float(loss), "top1_agreement": float(agree)})
  return rows


def linear_cka(x_IxD, y_IxD) -> float:
  """Linear CKA of two representations of the same I examples (their widths may
  differ): 1 for identical ones, invariant to orthogonal transforms and isotropic
  scaling of either."""
  x = np.asarray(x_IxD, np.float64)
  y = np.asarray(y_IxD, np.float64)
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  cross = np.linalg.norm(y.T @ x) ** 2
  return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def cka_matrix(streams_a, streams_b) -> np.ndarray:
  """Linear CKA between every pair of layers (tokens flattened): entry (i, j) pairs
  stream i of `streams_a` with stream j of `streams_b`."""
  flat = lambda h: np.asarray(h).reshape(-1, h.shape[-1])
  a, b = [flat(h) for h in streams_a], [flat(h) for h in streams_b]
  return np.array([[linear_cka(x, y) for y in b] for x in a])


# ----------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------
def _eval_sequences(run, batches: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs `[I, T]`, targets `[I, T]`) of the first `batches` validation batches of
  the run's own data config: an LM's token rows (targets shifted by one), an image
  run's code sequences (the class token, then the cells; targets the cells)."""
  if run.kind == "image":
    from engram_jax.data import images
    data_cfg = run_config.image_data_config(run.config.data)
    read = list(images.eval_batches(data_cfg, "val", max_batches=batches))
  else:
    from engram_jax.data import text
    data_cfg = run_config.text_data_config(run.config.data)  # the run's data section
    read = list(text.eval_batches(data_cfg, run.tokenizer, max_batches=batches))
  return (np.concatenate([b["inputs"] for b in read]),
          np.concatenate([b["targets"] for b in read]))


def _same_inputs(engram, baseline) -> None:
  """Raises unless the baseline reads the Engram run's sequences as the same tokens
  (same kind, vocabulary and, for images, grid)."""
  shape = lambda run: (run.model_cfg.vocab_size, getattr(run.model_cfg, "cells", None),
                       getattr(run.model_cfg, "codebook_size", None))
  if shape(engram) != shape(baseline):
    raise ValueError(
        f"--baseline={baseline.workdir!r} does not read --workdir={engram.workdir!r}'s "
        f"sequences: (vocabulary, cells, codebook) {shape(baseline)} vs {shape(engram)}")


def analyze(workdir: str, baseline: str, out: str, batches: int = 4) -> dict:
  """Writes logit_lens.csv, cka.csv, cka.png and analysis.md into `out`; both runs
  read the Engram run's validation sequences. A failure leaves no directory it made;
  each file is written whole or not at all."""
  with paths.no_empty_dir_left(out):
    return _analyze(workdir, baseline, out, batches)


def _load_baseline(baseline: str, kind: str):
  """`workdir.load` of the baseline, its errors naming --baseline, not --workdir."""
  from engram_jax import workdir as workdir_lib
  from engram_jax.errors import first_line
  try:
    return workdir_lib.load(baseline, kind=kind)
  except (ValueError, OSError) as err:
    message = first_line(err, limit=2000)
    named = message.replace(f"--workdir={baseline!r}", f"--baseline={baseline!r}")
    raise ValueError(named if named != message else f"--baseline={baseline!r}: {message}"
                     ) from None


def _analyze(workdir: str, baseline: str, out: str, batches: int) -> dict:
  from engram_jax import progress
  from engram_jax import workdir as workdir_lib
  engram_run = workdir_lib.load(workdir)  # the baseline must be of the same kind
  runs = {"engram": engram_run, "baseline": _load_baseline(baseline, engram_run.kind)}
  _same_inputs(*runs.values())
  os.makedirs(out, exist_ok=True)  # once both runs read
  inputs_IxT, targets_IxT = map(jnp.asarray, _eval_sequences(engram_run, batches))
  results, streams = {}, {}
  for name, run in progress.progress(runs.items(), "analyze: models", total=len(runs)):
    params = nn.unbox(run.params)
    ngram = None if run.vocab_map is None else run.vocab_map[inputs_IxT]
    streams[name] = residual_streams(run.model_cfg, params, inputs_IxT, ngram)
    results[name] = {"step": run.step,
                     "lens": logit_lens(run.model_cfg, params, streams[name], targets_IxT)}
  cka = cka_matrix(streams["engram"], streams["baseline"])
  write_analysis(out, results, cka, _markdown(results, cka, workdir, baseline,
                                               engram_run.kind, inputs_IxT.shape))
  return {"logit_lens": results, "cka": cka}


def write_analysis(out: str, results: dict, cka, markdown: str) -> None:
  """logit_lens.csv, cka.csv, cka.png and analysis.md, each whole or not at all: a kill
  mid-write keeps the previous analysis, never half a file."""
  paths.atomic_write(os.path.join(out, "logit_lens.csv"),
                     functools.partial(_write_lens_csv, results=results))
  paths.atomic_write(os.path.join(out, "cka.csv"), functools.partial(_write_cka_csv, cka=cka))
  _plot_cka(cka, os.path.join(out, "cka.png"))
  paths.atomic_write_text(os.path.join(out, "analysis.md"), markdown)


def _write_lens_csv(path: str, results: dict) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["model", "layer", "loss", "top1_agreement"])
    for name, result in results.items():
      for row in result["lens"]:
        writer.writerow([name, row["layer"], f"{row['loss']:.5f}",
                         f"{row['top1_agreement']:.5f}"])


def _write_cka_csv(path: str, cka) -> None:
  with open(path, "w", encoding="utf-8") as f:
    np.savetxt(f, cka, delimiter=",", fmt="%.5f",
               header="rows: engram layers 0..L (0 = embedding); columns: baseline layers")


def _plot_cka(cka, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(4.5, 4))
  image = ax.imshow(cka, origin="lower", vmin=0, vmax=1, cmap="viridis")
  ax.set_xlabel("baseline layer (0 = embedding)")
  ax.set_ylabel("Engram model layer (0 = embedding)")
  ax.set_title("linear CKA")
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  try:  # the temp name has no .png: the format is given
    paths.atomic_write(path, functools.partial(fig.savefig, format="png", dpi=120))
  finally:
    plt.close(fig)


def _markdown(results, cka, workdir, baseline, kind: str, shape_IxT) -> str:
  what = "code sequences (class token, then cells)" if kind == "image" else "token rows"
  lines = [f"# Analyses: `{workdir}` (Engram) vs `{baseline}` (baseline)", "",
           f"{kind} runs at steps {results['engram']['step']} and "
           f"{results['baseline']['step']}, on {shape_IxT[0]} validation {what} of "
           f"{shape_IxT[1]} positions.", "",
           "LogitLens (each stream through the final norm and unembedding; loss in "
           "nats per predicted token):", "",
           "| layer | Engram loss | baseline loss | Engram top-1 agr. | baseline top-1 agr. |",
           "|---|---|---|---|---|"]
  for e, b in zip(results["engram"]["lens"], results["baseline"]["lens"]):
    lines.append(f"| {e['layer']} | {e['loss']:.4f} | {b['loss']:.4f} | "
                 f"{e['top1_agreement']:.3f} | {b['top1_agreement']:.3f} |")
  best = cka.argmax(axis=1)
  lines += ["", "CKA: for each Engram layer, the most similar baseline layer:", "",
            "| Engram layer | best baseline layer | CKA |", "|---|---|---|"]
  lines += [f"| {i} | {j} | {cka[i, j]:.3f} |" for i, j in enumerate(best)]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = cli.Parser(
      prog="python -m engram_jax.studies.analyze",
      description="LogitLens per layer and CKA between an Engram model and its baseline "
                  "(LM or class-conditional image runs).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the Engram model's workdir")
  parser.add_argument("--baseline", required=True, help="the baseline model's workdir")
  parser.add_argument("--out", default="", help="output directory (default WORKDIR/analysis)")
  parser.add_argument("--batches", type=int, default=4, help="validation batches to read")
  args = parser.parse_args(argv)

  def body():
    out = paths.local_output(args.out or os.path.join(args.workdir, "analysis"), "--out")
    if args.batches < 1:
      raise ValueError(f"--batches={args.batches}: use 1 or more")
    analyze(args.workdir, args.baseline, out, args.batches)
    print(f"wrote {out}/{{analysis.md,logit_lens.csv,cka.csv,cka.png}}")
  return cli.run(body)


if __name__ == "__main__":
  sys.exit(main())
