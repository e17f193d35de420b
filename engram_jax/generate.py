"""`python -m engram_jax.generate --workdir=W`: samples from a trained run, whatever its kind.

A language-model run prints text continuations (`sampling.text`, with the tables on
the device, in host RAM or memory-mapped from disk: `sampling.offload`); an image run
writes a PNG grid of samples per class (`sampling.image`). The run's own config says
which, so there is one command to remember.
"""
import jax
import numpy as np


def _is_image_run(argv) -> bool:
  import argparse
  import sys

  from engram_jax import workdir
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--workdir")
  known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    return bool(known.workdir) and workdir.read_config(known.workdir)[1] == "image"
  except (ValueError, OSError):
    return False


IMAGE_FLAGS = ("classes", "samples_per_class", "cfg_scale", "out")


def build_parser():
  """The one `python -m engram_jax.generate` command line: language-model flags, and
  the image flags that apply when `--workdir` is an image run (`generate_image.main`)."""
  import argparse
  parser = argparse.ArgumentParser(
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
  import sys

  from engram_jax.sampling import image
  if _is_image_run(argv):  # an image workdir: --classes, --cfg_scale, a PNG grid
    return image.main(argv)
  from engram_jax.sampling import text
  args = build_parser().parse_args(argv)
  try:
    for name in ("max_new_tokens", "num_samples"):
      if getattr(args, name) < 1:
        raise ValueError(f"--{name}={getattr(args, name)}: use a positive integer")
    image_flags = [f"--{name}" for name in IMAGE_FLAGS if hasattr(args, name)]
    if image_flags:
      raise ValueError(f"{', '.join(image_flags)}: only for image workdirs; "
                       f"--workdir={args.workdir!r} is not an image run")
    text.check_sampling(dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    from engram_jax import workdir
    run = workdir.load(args.workdir, args.tables, args.table_dir or None)
    model, variables, tok, vocab_map, step = (run.model, run.variables, run.tokenizer,
                                              run.vocab_map, run.step)
    from engram_jax import tokenizer as tokenizer_lib
    eos = tokenizer_lib.eos_id(tok)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids or [eos]
    max_len = model.cfg.max_len
    if len(ids) + args.max_new_tokens > max_len:
      raise ValueError(f"--prompt is {len(ids)} tokens; with --max_new_tokens="
                       f"{args.max_new_tokens} that exceeds the model's context "
                       f"model.max_len={max_len}; shorten the prompt or ask for fewer tokens")
    bucket = text.prompt_bucket(len(ids), args.max_new_tokens, max_len)
    prompt = np.zeros((args.num_samples, bucket), np.int32)
    prompt[:, :len(ids)] = ids
    lengths = np.full((args.num_samples,), len(ids), np.int32)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, eos_id=eos, pad_id=eos,
                    vocab_map_V=vocab_map)
    if run.tables is not None:
      from engram_jax.sampling import offload as offload
      new = np.asarray(offload.generate(model, variables, run.tables, prompt, lengths,
                                        jax.random.key(args.seed), **sampling))
    else:
      sample = jax.jit(text.generate, static_argnums=0, static_argnames=(
          "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"))
      new = np.asarray(sample(model, variables, prompt, lengths, jax.random.key(args.seed),
                              **sampling))
  except (ValueError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"# {args.workdir} step {step}", flush=True)
  for i, row in enumerate(new):
    cut = list(row[:list(row).index(eos)]) if eos in row else list(row)
    print(f"--- sample {i} ---\n{args.prompt}{tok.decode(cut)}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
