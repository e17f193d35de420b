"""Forward vs forward+backward cost: RMSNorm, the Engram layer and `tiny`'s train step,
with the hand-written backwards ("custom_vjp": RMSNorm and the Engram conv) and with
plain autodiff of the same expressions ("autodiff", the code before), in one process.

The "autodiff" path swaps `engram_jax.layers.norms.rms_norm` and
`engram_jax.layers.engram.causal_dilated_conv` for the plain expressions while
tracing, so both paths run the same model code otherwise. Paths alternate in
rounds (medians) so that load drift on a shared machine hits both.
"""
import argparse
import contextlib
import math
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm as lm_configs  # noqa: E402
from engram_jax import run_config  # noqa: E402
from engram_jax.layers import engram as engram_lib  # noqa: E402
from engram_jax.layers import norms  # noqa: E402
from engram_jax.layers.engram import Engram  # noqa: E402
from timing import median_seconds  # noqa: E402  bench/timing.py
from train_step import build  # noqa: E402  bench/train_step.py


def autodiff_rms_norm(x, scale, eps=1e-6, out_dtype=jnp.float32):
  """RMSNorm as it was before the custom VJP: autodiff differentiates every op."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(out_dtype)


def autodiff_conv(x_BxTxMD, kernel_KxMD, dilation, history_BxPxMD):
  """The Engram conv as it was before its custom VJP: slices of the extended input."""
  ext = jnp.concatenate([history_BxPxMD.astype(x_BxTxMD.dtype), x_BxTxMD], axis=1)
  t = x_BxTxMD.shape[1]
  return sum(kernel_KxMD[j].astype(x_BxTxMD.dtype) * ext[:, j * dilation:j * dilation + t]
             for j in range(kernel_KxMD.shape[0]))


@contextlib.contextmanager
def norm_impl(name: str):
  """Traces with the given RMSNorm and conv cores ("custom_vjp" or "autodiff")."""
  saved = norms.rms_norm, engram_lib.causal_dilated_conv
  if name == "autodiff":
    norms.rms_norm, engram_lib.causal_dilated_conv = autodiff_rms_norm, autodiff_conv
  try:
    yield
  finally:
    norms.rms_norm, engram_lib.causal_dilated_conv = saved


def full_size_buffers(compiled_hlo: str, elements: int) -> int:
  """Instructions of the entry computation that write an array of `elements` values.

  A load-independent measure of a backward's memory traffic (each is a full-size
  write), where wall time on a shared machine is noise.
  """
  entry = compiled_hlo[compiled_hlo.index("\nENTRY"):]
  count = 0
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (\w+)\(", line)
    if m and m.group(2) not in ("parameter", "bitcast", "tuple"):
      count += math.prod(int(v) for v in m.group(1).split(",") if v) == elements
  return count


def norm_fns(x_BxTxD):
  """Jitted forward and forward+backward of one RMSNorm (fresh trace per impl)."""
  scale_D = jnp.ones(x_BxTxD.shape[-1:])
  fwd = jax.jit(lambda x, s: norms.rms_norm(x, s, 1e-6, jnp.dtype(jnp.float32)))
  loss = lambda x, s: jnp.sum(norms.rms_norm(x, s, 1e-6, jnp.dtype(jnp.float32)) ** 2)
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  buffers = full_size_buffers(bwd.lower(x_BxTxD, scale_D).compile().as_text(), x_BxTxD.size)
  return (lambda: fwd(x_BxTxD, scale_D)), (lambda: bwd(x_BxTxD, scale_D)), buffers


def engram_fns(model_cfg, batch: int, seq: int):
  """Jitted forward and forward+backward (wrt params and hidden) of one Engram layer."""
  spec = model_cfg.engram.hash_spec()
  layer = Engram(model_cfg.engram, spec.rows(0), model_cfg.norm_eps)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(batch, seq, 1, model_cfg.width)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, spec.rows(0), (batch, seq, spec.offsets_LxH.shape[1])),
                    jnp.int32)
  params = nn.unbox(layer.init(jax.random.key(0), h, ids))
  # A random conv kernel (it starts at zero) so the conv path does real work.
  params["params"]["conv"] = jax.random.normal(jax.random.key(1),
                                               params["params"]["conv"].shape)
  fwd = jax.jit(layer.apply)
  loss = lambda p, h: jnp.sum(layer.apply(p, h, ids) ** 2)
  bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  buffers = full_size_buffers(bwd.lower(params, h).compile().as_text(), h.size)
  return (lambda: fwd(params, h, ids)), (lambda: bwd(params, h)), buffers


def alternate(fns: dict, rounds: int, repeats: int) -> dict:
  """Median seconds per name, the names timed in turn for `rounds` rounds."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(median_seconds(fn, repeats))
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variant", default="tiny", help="configs/lm.py variant")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=10, help="calls per round (median)")
  parser.add_argument("--steps", type=int, default=10, help="train steps per round")
  parser.add_argument("--layer_batch", type=int, default=0,
                      help="batch of the norm / Engram layer timings (0 = the config's)")
  parser.add_argument("--layer_seq", type=int, default=0, help="their length (0 = config's)")
  parser.add_argument("--no_step", action="store_true", help="skip the train step")
  args = parser.parse_args(argv)

  config = lm_configs.get_config(args.variant)
  vocab, batch, seq = config.data.vocab_size, config.data.batch_size, config.data.seq_len
  model_cfg = run_config.from_config(config).with_tokenizer_vocab(vocab).model
  lb, ls = args.layer_batch or batch, args.layer_seq or seq
  x = jnp.asarray(np.random.default_rng(0).normal(size=(lb, ls, model_cfg.width)),
                  jnp.float32)
  fns, buffers, layer_buffers = {}, {}, {}
  for impl in ("custom_vjp", "autodiff"):
    with norm_impl(impl):
      nf, nb, buffers[impl] = norm_fns(x)
      ef, eb, layer_buffers[impl] = engram_fns(model_cfg, lb, ls)
      # Trace + compile now, while the chosen norm is installed.
      for fn in (nf, nb, ef, eb):
        jax.block_until_ready(fn())
    fns.update({f"norm fwd {impl}": nf, f"norm f+b {impl}": nb,
                f"engram fwd {impl}": ef, f"engram f+b {impl}": eb})
  t = alternate(fns, args.rounds, args.repeats)

  tokens = np.random.default_rng(1).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  data = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); "
        f"{args.variant}: width {model_cfg.width}; norm and Engram layer on batch {lb} x "
        f"seq {ls}; median of {args.rounds} alternating rounds x {args.repeats} calls")
  for what in ("norm", "engram"):
    for impl in ("custom_vjp", "autodiff"):
      f, b = t[f"{what} fwd {impl}"], t[f"{what} f+b {impl}"]
      print(f"{what:6s} {impl:10s}: fwd {f * 1e3:7.3f} ms, fwd+bwd {b * 1e3:7.3f} ms, "
            f"ratio {b / f:5.2f}x")
  print("norm fwd+bwd full-size buffers written (compiled HLO): "
        + ", ".join(f"{impl} {n}" for impl, n in buffers.items()))
  print("Engram layer fwd+bwd buffers of [B, T, D] size (compiled HLO): "
        + ", ".join(f"{impl} {n}" for impl, n in layer_buffers.items()))
  if args.no_step:
    return
  steps = {}
  for impl in ("custom_vjp", "autodiff"):
    with norm_impl(impl):
      _, step, state = build(config, vocab, engram=True)
      state, metrics = step(state, data)
      jax.block_until_ready(metrics["loss"])
    steps[impl] = [step, state]

  def run(impl):
    step, state = steps[impl]
    for _ in range(args.steps):
      state, metrics = step(state, data)
    steps[impl][1] = state
    return metrics["loss"]

  step_t = alternate({impl: (lambda impl=impl: run(impl)) for impl in steps}, args.rounds, 1)
  print(f"train step, batch {batch} x seq {seq}, {args.steps} steps per round:")
  for impl in ("custom_vjp", "autodiff"):
    print(f"train step {impl:10s}: {step_t[impl] / args.steps * 1e3:7.2f} ms/step")
  print(f"train step custom_vjp / autodiff: {step_t['custom_vjp'] / step_t['autodiff']:.3f}x")


if __name__ == "__main__":
  main()
