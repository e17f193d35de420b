"""`python -m engram_jax.generate --workdir=W`: samples from a trained run, whatever its kind.

A language-model run prints text continuations (`sampling.text`, with the tables on
the device, in host RAM or memory-mapped from disk: `sampling.offload`); an image run
writes a PNG grid of samples per class (`sampling.image`). The run's own config says
which, so there is one command to remember.
"""
import argparse

import jax
import numpy as np

from engram_jax import cli
from engram_jax.sampling import text


def check_request(max_new_tokens: int, num_samples: int, temperature: float, top_k: int,
                  top_p: float) -> None:
  """A ValueError naming the first flag out of range (before any checkpoint is read)."""
  for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples)):
    if value < 1:
      raise ValueError(f"--{name}={value}: use a positive integer")
  text.check_sampling(dict(temperature=temperature, top_k=top_k, top_p=top_p))


def continue_prompt(run, prompt: str, *, max_new_tokens: int = 64, num_samples: int = 1,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0) -> list[str]:
  """`num_samples` continuations of `prompt` (text, without the prompt) from a loaded LM
  run (`workdir.load`): what `python -m engram_jax.generate --prompt=...` prints. Tables
  in host RAM or on disk (`run.tables`) are read by a host callback per step."""
  from engram_jax import tokenizer as tokenizer_lib
  check_request(max_new_tokens, num_samples, temperature, top_k, top_p)
  tok, max_len = run.tokenizer, run.model.cfg.max_len
  eos = tokenizer_lib.eos_id(tok)
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError:  # bytes a shell passed through that are not UTF-8
    raise ValueError("--prompt holds bytes that are not UTF-8 text; give the prompt as "
                     "UTF-8") from None
  ids = tok.encode(prompt, add_special_tokens=False).ids or [eos]
  if len(ids) + max_new_tokens > max_len:
    raise ValueError(f"--prompt is {len(ids)} tokens; with --max_new_tokens={max_new_tokens} "
                     f"that exceeds the model's context model.max_len={max_len}; shorten "
                     "the prompt or ask for fewer tokens")
  prompt_BxT = np.zeros((num_samples, text.prompt_bucket(len(ids), max_new_tokens, max_len)),
                        np.int32)
  prompt_BxT[:, :len(ids)] = ids
  lengths_B = np.full((num_samples,), len(ids), np.int32)
  sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, eos_id=eos, pad_id=eos, vocab_map_V=run.vocab_map)
  if run.tables is not None:
    from engram_jax.sampling import offload
    new_BxS = offload.generate(run.model, run.variables, run.tables, prompt_BxT, lengths_B,
                               jax.random.key(seed), **sampling)
  else:
    new_BxS = _generate_jit(run.model, run.variables, prompt_BxT, lengths_B,
                            jax.random.key(seed), **sampling)
  texts = []
  for row in np.asarray(new_BxS).tolist():
    texts.append(tok.decode(row[:row.index(eos)] if eos in row else row))
  return texts


_generate_jit = jax.jit(text.generate, static_argnums=0, static_argnames=(
    "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"))


def _is_image_run(argv) -> bool:
  import sys

  from engram_jax import workdir
  parser = cli.Parser(add_help=False)
  parser.add_argument("--workdir")
  known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    return bool(known.workdir) and workdir.read_config(known.workdir)[1] == "image"
  except (ValueError, OSError):
    return False


IMAGE_FLAGS = ("classes", "samples_per_class", "cfg_scale", "out")


def build_parser():
  """The one `python -m engram_jax.generate` command line: language-model flags, and
  the image flags that apply when `--workdir` is an image run (`sampling.image.main`)."""
  parser = cli.Parser(
      prog="python -m engram_jax.generate",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      description="Sample from the newest checkpoint of a training workdir: text "
                  "continuations for a language model; for an image run (config.json "
                  "with data.height/width/num_classes) a PNG grid of samples per class.")
  parser.add_argument("--workdir", required=True, help="a directory written by "
                      "`python -m engram_jax.main`")
  parser.add_argument("--prompt", default="",
                      help="text to continue, language models (default: %(default)r)")
  parser.add_argument("--max_new_tokens", type=int, default=64, help="language models")
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="0 = greedy; image runs default to the config's sample section")
  parser.add_argument("--top_k", type=int, default=0, help="0 = off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
  parser.add_argument("--seed", type=int, default=0, help="sampling RNG seed")
  parser.add_argument("--num_samples", type=int, default=1, help="language models")
  parser.add_argument("--tables", choices=("device", "host", "disk"), default="device",
                      help="where the Engram tables live while sampling: device memory, "
                           "host RAM (rows gathered by a host callback), or .npy files "
                           "memory-mapped from --table_dir (`python -m engram_jax.workdir "
                           "export_tables`); language models")
  parser.add_argument("--table_dir", default="", help="with --tables=disk")
  image = parser.add_argument_group(
      "image workdirs", "these apply only when --workdir is an image run")
  image.add_argument("--classes", default=argparse.SUPPRESS,
                     help="comma-separated class ids (default: all classes)")
  image.add_argument("--samples_per_class", type=int, default=argparse.SUPPRESS,
                     help="samples in each row of the grid (default: 8)")
  image.add_argument("--cfg_scale", type=float, default=argparse.SUPPRESS,
                     help="classifier-free guidance, 0 or 1 = off (default: the "
                          "config's sample.cfg_scale)")
  image.add_argument("--out", default=argparse.SUPPRESS,
                     help="PNG path (default: WORKDIR/samples_stepS_seedN.png)")
  return parser


def main(argv=None) -> int:
  from engram_jax.sampling import image
  if _is_image_run(argv):  # an image workdir: --classes, --cfg_scale, a PNG grid
    return image.main(argv)
  args = build_parser().parse_args(argv)

  def body():
    from engram_jax import workdir
    image_flags = [f"--{name}" for name in IMAGE_FLAGS if hasattr(args, name)]
    if image_flags:
      workdir.read_config(args.workdir)  # no run there at all: that is the error to name
      raise ValueError(f"{', '.join(image_flags)}: only for image workdirs; "
                       f"--workdir={args.workdir!r} is not an image run")
    check_request(args.max_new_tokens, args.num_samples, args.temperature, args.top_k,
                  args.top_p)
    run = workdir.load(args.workdir, args.tables, args.table_dir or None, kind="lm")
    texts = continue_prompt(run, args.prompt, max_new_tokens=args.max_new_tokens,
                            num_samples=args.num_samples, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"# {args.workdir} step {run.step}", flush=True)
    for i, sample in enumerate(texts):
      print(f"--- sample {i} ---\n{args.prompt}{sample}", flush=True)
  return cli.run(body)


if __name__ == "__main__":
  raise SystemExit(main())
