"""One-shot accelerator check: the figures a first GPU/TPU session should bring back.

Needs only jax, flax, optax and numpy (no grain, clu, ml_collections: a bare GPU image
lacks them): models are built from `engram_jax.config` dataclasses and fed random
token batches. Writes `--out`.json (every figure, plus notes) and `--out`.md (a table).

Sections:
  gather        Engram table row gather GB/s vs a device-to-device copy, same run
  train_mfu     `small`-sized train step: time, tokens/s, model FLOPs utilisation
  engram_overhead  the same step with Engram / without (same backbone)
  decode        cached decode tokens/s at batch 1, 8, 64
  offload       host-memory tables (engram_jax.sampling.offload) decode overhead
  row_sparse    row-sparse vs dense table step, if `train.table_optimizer` exists

MFU counts model FLOPs from the config (not from XLA):
  6 * P_matmul * tokens  +  12 * depth * seq * width * tokens     (fwd + bwd)
where P_matmul is every matrix the step multiplies by (attention, MLP, unembedding,
Engram's key/value projections; not the input embedding or the Engram tables, which
are gathered, not multiplied) and the second term is attention's QK^T and AV (full
T x T as XLA computes it; a causal kernel would do half). Peak FLOP/s come from
`--peak_tflops` or a table of known devices (dense bf16); unknown devices get no MFU.

Usage (one GPU, < 8 minutes):  python bench/accelerator_check.py --out=/tmp/acc
Smoke (CPU; decode at batch 1 and 2 only):  python bench/accelerator_check.py --smoke --out=/tmp/acc
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_BENCH), _BENCH]
from engram_jax import config as config_lib  # noqa: E402
try:  # the train state and steps; in `train` itself in older checkouts
  from engram_jax import train_steps  # noqa: E402
except ImportError:
  from engram_jax import train as train_steps  # noqa: E402
from engram_jax.sampling import text as generate
from engram_jax.models.lm import EngramLM  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py

SECTIONS = ("gather", "train_mfu", "engram_overhead", "decode", "offload", "row_sparse")
# Dense bf16 peak TFLOP/s per chip (vendor figures, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0}


@dataclasses.dataclass(frozen=True)
class Sizes:
  model: config_lib.ModelConfig
  batch: int
  seq: int
  steps: int                      # timed train steps per path
  decode_batches: tuple[int, ...]
  prompt: int
  new_tokens: int
  gather_rows: int                # table rows for the gather check
  gather_ids: int                 # rows gathered per call
  repeats: int


def small_model(vocab: int = 8192) -> config_lib.ModelConfig:
  """configs/lm.py:small, without ml_collections."""
  return config_lib.validate(config_lib.ModelConfig(
      vocab_size=vocab, width=512, depth=8, num_heads=8, num_kv_heads=4, max_len=1024,
      dtype="bfloat16", engram=config_lib.EngramConfig(
          layers=(1, 5), max_ngram=3, heads=8, embed_per_ngram=256, table_size=(200003,))))


def smoke_model() -> config_lib.ModelConfig:
  return config_lib.validate(config_lib.ModelConfig(
      vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=2, max_len=32,
      engram=config_lib.EngramConfig(layers=(1,), max_ngram=3, heads=2, embed_per_ngram=16,
                                     table_size=(61,))))


def sizes(smoke: bool) -> Sizes:
  if smoke:
    return Sizes(smoke_model(), batch=2, seq=16, steps=2, decode_batches=(1, 2),
                 prompt=4, new_tokens=4, gather_rows=4096, gather_ids=1024, repeats=2)
  return Sizes(small_model(), batch=32, seq=512, steps=10, decode_batches=(1, 8, 64),
               prompt=32, new_tokens=128, gather_rows=1 << 22, gather_ids=1 << 20,
               repeats=10)


# ----------------------------------------------------------------------------------
# FLOPs, device peak
# ----------------------------------------------------------------------------------
def matmul_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters the step multiplies by (see the module docstring)."""
  d, h, kv = cfg.width, cfg.resolved_head_dim, cfg.num_kv_heads
  attention = d * h * (2 * cfg.num_heads + 2 * kv)
  mlp = 3 * d * cfg.resolved_mlp_dim
  e = cfg.engram
  engram = len(e.layers) * (e.features * d * (1 + cfg.branches))
  return cfg.depth * (attention + mlp) + engram + d * cfg.vocab_size


def train_flops(cfg: config_lib.ModelConfig, batch: int, seq: int) -> float:
  tokens = batch * seq
  return 6.0 * matmul_params(cfg) * tokens + 12.0 * cfg.depth * seq * cfg.width * tokens


def peak_flops(override_tflops: float) -> tuple[float | None, str]:
  kind = jax.devices()[0].device_kind
  if override_tflops:
    return override_tflops * 1e12, f"{kind} (--peak_tflops)"
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12, kind
  return None, kind


# ----------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------
def check_gather(s: Sizes, width: int) -> dict:
  """Rows gathered per second as GB/s of rows read, vs a same-size array copy."""
  rng = np.random.default_rng(0)
  table = jax.device_put(jnp.asarray(rng.normal(size=(s.gather_rows, width)), jnp.float32))
  ids = jax.device_put(jnp.asarray(rng.integers(0, s.gather_rows, s.gather_ids), jnp.int32))
  block = jax.device_put(table[:s.gather_ids])
  gather = jax.jit(lambda t, i: jnp.take(t, i, axis=0, mode="clip"))
  copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))  # reads and writes every byte
  jax.block_until_ready((gather(table, ids), copy(block)))
  t_gather = median_seconds(lambda: gather(table, ids), s.repeats)
  t_copy = median_seconds(lambda: copy(block), s.repeats)
  nbytes = s.gather_ids * width * 4
  # Both move the same bytes: read nbytes (rows / the block), write nbytes.
  return {"rows": s.gather_rows, "row_width": width, "dtype": "float32",
          "ids": s.gather_ids, "bytes_read_and_written": 2 * nbytes,
          "gather_gbps": 2 * nbytes / t_gather / 1e9, "copy_gbps": 2 * nbytes / t_copy / 1e9,
          "gather_over_copy": t_copy / t_gather}


def _batch(s: Sizes, vocab: int, seed: int = 0) -> dict:
  tokens = np.random.default_rng(seed).integers(0, vocab, (s.batch, s.seq + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def _train_setup(cfg: config_lib.ModelConfig, seq: int, tx):
  model = EngramLM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, seq), jnp.int32)))
  params = params["params"]
  if hasattr(train_steps, "init_train_state"):
    state = train_steps.init_train_state(tx, params)
  else:
    state = train_steps.TrainState(jnp.array(0, jnp.int32), params, tx.init(params))
  return model, state


def _dense_tx(cfg: config_lib.ModelConfig):
  from engram_jax import optim
  return optim.make_optimizer(optim.warmup_cosine(1e-3, 10, 1000), weight_decay=0.1,
                              table_lr_multiplier=5.0,
                              table_trainable=cfg.engram.table_trainable, grad_clip=1.0)


def time_train(cfg, s: Sizes, tx) -> float:
  """Median seconds per step of the real jitted, donated train step."""
  model, state = _train_setup(cfg, s.seq, tx)
  step = train_steps.make_train_step(model, tx)
  data = _batch(s, cfg.vocab_size)
  state, metrics = step(state, data)
  jax.block_until_ready(metrics["loss"])
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], data)
    return metrics["loss"]
  return median_seconds(one, s.steps)


def check_train(s: Sizes, peak: float | None) -> tuple[dict, dict]:
  cfg = s.model
  base = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, layers=()))
  t_engram = time_train(cfg, s, _dense_tx(cfg))
  t_base = time_train(base, s, _dense_tx(base))
  tokens = s.batch * s.seq
  flops = train_flops(cfg, s.batch, s.seq)
  mfu = {"batch": s.batch, "seq": s.seq, "step_s": t_engram, "tokens_per_s": tokens / t_engram,
         "matmul_params": matmul_params(cfg), "model_flops_per_step": flops,
         "flops_formula": "6 * matmul_params * tokens + 12 * depth * seq * width * tokens",
         "achieved_tflops": flops / t_engram / 1e12,
         "mfu": None if peak is None else flops / t_engram / peak}
  flops_base = train_flops(base, s.batch, s.seq)
  overhead = {"engram_step_s": t_engram, "baseline_step_s": t_base,
              "engram_over_baseline": t_engram / t_base,
              "baseline_mfu": None if peak is None else flops_base / t_base / peak}
  return mfu, overhead


def _decode_fn(model, s: Sizes, **kwargs):
  return jax.jit(lambda p, x, n: generate.generate(
      model, p, x, n, jax.random.key(0), max_new_tokens=s.new_tokens, temperature=0.0,
      **kwargs))


def check_decode(s: Sizes, params) -> dict:
  model = EngramLM(s.model)
  out = {"prompt": s.prompt, "new_tokens": s.new_tokens, "per_batch": {}}
  for b in s.decode_batches:
    prompt = jnp.asarray(np.random.default_rng(b).integers(0, s.model.vocab_size,
                                                           (b, s.prompt)), jnp.int32)
    lengths = jnp.full((b,), s.prompt, jnp.int32)
    fn = _decode_fn(model, s)
    jax.block_until_ready(fn(params, prompt, lengths))
    t = median_seconds(lambda: fn(params, prompt, lengths), max(2, s.repeats // 3))
    out["per_batch"][str(b)] = {"call_s": t, "tokens_per_s": b * s.new_tokens / t,
                                "ms_per_step": 1e3 * t / s.new_tokens}
  return out


def check_offload(s: Sizes, params) -> dict:
  try:
    from engram_jax import host_tables
    from engram_jax.sampling import offload
  except ImportError as err:  # e.g. a dependency missing from a bare image
    return {"skipped": f"engram_jax.sampling.offload does not import: {err}"}
  model = EngramLM(s.model)
  device_params, tables = host_tables.split_params(params, s.model)
  b = s.decode_batches[min(1, len(s.decode_batches) - 1)]
  prompt = np.random.default_rng(1).integers(0, s.model.vocab_size, (b, s.prompt))
  lengths = np.full((b,), s.prompt, np.int32)
  on_device = _decode_fn(model, s)
  args = (jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths))
  host = lambda: offload.generate(model, device_params, tables, prompt, lengths,
                                  jax.random.key(0), max_new_tokens=s.new_tokens,
                                  temperature=0.0)
  same = np.array_equal(np.asarray(on_device(params, *args)), np.asarray(host()))
  reps = max(2, s.repeats // 3)
  t_dev = median_seconds(lambda: on_device(params, *args), reps)
  t_host = median_seconds(host, reps)
  return {"batch": b, "table_bytes": tables.nbytes, "same_tokens": bool(same),
          "on_device_s": t_dev, "offloaded_s": t_host, "offloaded_over_on_device": t_host / t_dev}


def check_row_sparse(s: Sizes) -> dict:
  from engram_jax import optim, run_config
  if not (hasattr(optim, "from_train_config") and hasattr(train_steps, "init_train_state")):
    return {"skipped": "optim.from_train_config is not in this checkout (row-sparse "
                       "tables not merged yet)"}
  out = {}
  for name in ("adam", "lazy_adam"):
    t = run_config.TrainConfig(learning_rate=1e-3, warmup_steps=10, steps=1000,
                               weight_decay=0.1, table_lr_multiplier=5.0, grad_clip=1.0,
                               table_optimizer=name)
    try:
      _, tx = optim.from_train_config(t, s.model.engram)
      out[f"{name}_step_s"] = time_train(s.model, s, tx)
    except Exception as err:  # another engineer's API may differ: report, don't die
      return {"skipped": f"train.table_optimizer exists but {name!r} failed here: "
                         f"{type(err).__name__}: {err}"}
  out["dense_adam_over_lazy_adam"] = out["adam_step_s"] / out["lazy_adam_step_s"]
  return out


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------
def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def markdown(report: dict) -> str:
  lines = [f"# Accelerator check ({report['device']['kind']}, jax {report['jax']})", "",
           "| section | figure | value |", "|---|---|---|"]
  for section in SECTIONS:
    body = report[section]
    flat = {}
    for key, value in body.items():
      if isinstance(value, dict):
        for k2, v2 in value.items():
          for k3, v3 in (v2.items() if isinstance(v2, dict) else [("", v2)]):
            flat[f"{key}[{k2}] {k3}".strip()] = v3
      else:
        flat[key] = value
    for key, value in flat.items():
      lines.append(f"| {section} | {key} | {_fmt(value)} |")
  lines += ["", f"Total wall time: {report['wall_s']:.1f} s. Sizes: {report['sizes']}."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="./accelerator_check",
                      help="writes OUT.json and OUT.md")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, seconds)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU (default: from a table of known devices)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  s = sizes(args.smoke)
  peak, kind = peak_flops(args.peak_tflops)
  report = {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": {"kind": kind, "count": jax.device_count(), "peak_flops": peak},
            "smoke": args.smoke,
            "sizes": {"batch": s.batch, "seq": s.seq, "width": s.model.width,
                      "depth": s.model.depth, "vocab": s.model.vocab_size,
                      "engram_layers": list(s.model.engram.layers)}}
  section_s = {}

  def timed(name, fn):
    begin = time.perf_counter()
    out = fn()
    section_s[name] = time.perf_counter() - begin  # compiles included
    print(f"{name}: {section_s[name]:.1f} s", flush=True)
    return out

  report["gather"] = timed("gather", lambda: check_gather(s, s.model.engram.head_dim))
  report["train_mfu"], report["engram_overhead"] = timed("train", lambda: check_train(s, peak))
  model = EngramLM(s.model)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, s.prompt), jnp.int32)))["params"]
  report["decode"] = timed("decode", lambda: check_decode(s, params))
  report["offload"] = timed("offload", lambda: check_offload(s, params))
  report["row_sparse"] = timed("row_sparse", lambda: check_row_sparse(s))
  report["section_s"] = section_s
  report["wall_s"] = time.perf_counter() - start
  out = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(report, f, indent=1, default=str)
  with open(out + ".md", "w") as f:
    f.write(markdown(report))
  print(markdown(report))
  return report


if __name__ == "__main__":
  main()
