"""Multi-query needle in a haystack at toy scale (the Engram paper's long-context claim).

A document is filler lines from a real corpus with K key -> value needles hidden among
them (`the code of KEY is VALUE.`), followed by Q queries (`code of KEY? VALUE`). The
model must copy each queried value from its needle: recall needs attention over the
document, so it measures what Engram frees attention to do (the paper: Multi-Query NIAH
84.2 -> 97.0).

    python -m engram_jax.studies.niah make --out=DIR [--docs=4000 --needles=3 --seed=0]
    python -m engram_jax.main --config=configs/lm.py:niah --workdir=W \
        --config.data.files_glob='DIR/train/*.txt'   (the recipe: docs/analyses.md)
    python -m engram_jax.studies.niah eval --workdir=W --data=DIR

`make` writes `train/*.txt` (documents, answers included: the LM loss teaches the task)
and `val.jsonl` (each query's prompt and its value). `eval` greedily decodes after each
prompt and scores exact recall of the value. Documents are deterministic per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig

import numpy as np

from engram_jax import cli

_KEY_LETTERS = "bcdfghjklmnpqrstvwxz"


def filler_lines(max_lines: int = 20000) -> list[str]:
  """Short, non-empty lines of the standard library's sources (present everywhere)."""
  root = sysconfig.get_paths()["stdlib"]
  lines = []
  for name in sorted(os.listdir(root)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if 8 <= len(line) <= 60 and "code of" not in line:
          lines.append(line)
    if len(lines) >= max_lines:
      break
  return lines[:max_lines]


def make_document(rng: np.random.Generator, filler: list[str], needles: int = 3,
                  queries: int = 2, filler_lines_per_doc: int = 6, key_letters: int = 3,
                  value_digits: int = 3) -> dict:
  """One document: {"text": full text, "queries": [(prompt, value), ...]}.

  Keys are `key_letters` consonants (distinct within a document), values
  `value_digits` digits; the queried keys are a random subset of the needles, in
  random order. Short keys and values (1 letter, 2 digits) become one BPE token each,
  which turns the task into single-token associative recall: a toy model learns it.
  """
  if needles > len(_KEY_LETTERS) ** key_letters:
    raise ValueError(f"needles={needles}: at most {len(_KEY_LETTERS) ** key_letters} "
                     f"distinct keys of {key_letters} letters")
  keys = set()
  while len(keys) < needles:
    keys.add("".join(rng.choice(list(_KEY_LETTERS), key_letters)))
  keys = sorted(keys)
  rng.shuffle(keys)
  values = [f"{int(v):0{value_digits}d}"
            for v in rng.integers(0, 10 ** value_digits, needles)]
  lines = [filler[int(i)] for i in rng.integers(0, len(filler), filler_lines_per_doc)]
  for key, value in zip(keys, values):
    lines.insert(int(rng.integers(0, len(lines) + 1)), f"the code of {key} is {value}.")
  body = "\n".join(lines) + "\n"
  asked = rng.permutation(needles)[:queries]
  text, prompts = body, []
  for i in asked:
    prompt = text + f"code of {keys[i]}?"
    prompts.append((prompt, values[i]))
    text = prompt + f" {values[i]}\n"
  return {"text": text, "queries": prompts}


CORPUS_FILE = "niah.json"  # the parameters `make` wrote the corpus in a directory with


def make_corpus(out: str, docs: int = 4000, val_docs: int = 200, needles: int = 3,
                queries: int = 2, seed: int = 0, docs_per_file: int = 200,
                filler_lines_per_doc: int = 6, key_letters: int = 3,
                value_digits: int = 3, overwrite: bool = False) -> None:
  """Writes `out/train/part-0000.txt`, `part-0001.txt`, ... (`docs_per_file` documents
  each) and `out/val.jsonl`; the same files for the same seed.

  A corpus already in `out` is replaced only by the same request (a killed `make`
  run again) or with `overwrite`: one of other parameters would otherwise keep the
  old parts the new one has fewer of, and `train/*.txt` would mix the two."""
  from engram_jax import paths
  made = dict(docs=docs, val_docs=val_docs, needles=needles, queries=queries, seed=seed,
              docs_per_file=docs_per_file, filler_lines_per_doc=filler_lines_per_doc,
              key_letters=key_letters, value_digits=value_digits)
  parts = -(-docs // docs_per_file)
  _check_out(out)
  before = _made_with(out)
  if before is not None and before != made and not overwrite:
    differing = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in made.items()
                          if before.get(k) != v) if before else "parameters unknown"
    raise ValueError(f"--out={out} holds a NIAH corpus already ({differing}); pass "
                     "--overwrite to replace it, or give another --out")
  rng = np.random.default_rng(seed)
  filler = filler_lines()
  shape = dict(needles=needles, queries=queries, filler_lines_per_doc=filler_lines_per_doc,
               key_letters=key_letters, value_digits=value_digits)
  os.makedirs(os.path.join(out, "train"), exist_ok=True)
  # first: a killed `make` is then taken up by the same request, refused for another
  paths.atomic_write_text(os.path.join(out, CORPUS_FILE), json.dumps(made, indent=1))
  for stale in _part_files(out)[parts:]:  # the replaced corpus's parts past this one's
    os.remove(stale)
  for name in os.listdir(os.path.join(out, "train")):  # a killed make's partial writes
    if name.startswith(".tmp-part-"):
      os.remove(os.path.join(out, "train", name))
  # each file whole or not at all: a killed `make` leaves no truncated file behind
  for part in range(parts):
    count = min(docs_per_file, docs - part * docs_per_file)
    texts = [make_document(rng, filler, **shape)["text"] for _ in range(count)]
    paths.atomic_write_text(os.path.join(out, "train", f"part-{part:04d}.txt"),
                            "\n".join(texts))
  rows = [json.dumps({"prompt": prompt, "value": value}) + "\n"
          for _ in range(val_docs)
          for prompt, value in make_document(rng, filler, **shape)["queries"]]
  paths.atomic_write_text(os.path.join(out, "val.jsonl"), "".join(rows))


_PART = re.compile(r"part-(\d{4,})\.txt")


def _part_files(out: str) -> list[str]:
  """`out/train/part-NNNN.txt` in the order of their numbers (what `make` writes)."""
  train = os.path.join(out, "train")
  names = os.listdir(train) if os.path.isdir(train) else []
  return [os.path.join(train, n) for n in
          sorted((n for n in names if _PART.fullmatch(n)),
                 key=lambda n: int(_PART.fullmatch(n).group(1)))]


def _check_out(out: str) -> None:
  """`out` must be a directory (or not yet exist) whose `train/` holds only parts
  `make` writes: the configs train on `train/*.txt`, so any other file would join them."""
  train = os.path.join(out, "train")
  for path in (out, train):
    if os.path.lexists(path) and not os.path.isdir(path):
      raise ValueError(f"--out={out}: {path} is not a directory; give another --out")
  others = sorted(n for n in (os.listdir(train) if os.path.isdir(train) else [])
                  if not _PART.fullmatch(n) and not n.startswith("."))  # glob skips those
  if others:
    raise ValueError(f"--out={out}: {train} holds files `make` did not write "
                     f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which "
                     "training on train/*.txt would mix in; give another --out")


def _made_with(out: str):
  """The parameters of the corpus in `out`: None when there is none, {} when they are
  unknown (written before `CORPUS_FILE`, or it is damaged)."""
  if not (_part_files(out) or os.path.exists(os.path.join(out, "val.jsonl"))
          or os.path.exists(os.path.join(out, CORPUS_FILE))):
    return None
  try:
    with open(os.path.join(out, CORPUS_FILE), encoding="utf-8") as f:
      made = json.load(f)
  except (OSError, ValueError):
    return {}
  return made if isinstance(made, dict) else {}


def read_queries(data: str) -> list[dict]:
  """`data/val.jsonl`'s queries; a damaged file (a killed `make`, an edit) is a
  ValueError naming it and the line, not a json traceback."""
  path = os.path.join(data, "val.jsonl")
  remake = f"run `python -m engram_jax.studies.niah make --out={data}` again"
  if not os.path.isfile(path):
    raise ValueError(f"--data={data!r} has no val.jsonl; write one with "
                     "`python -m engram_jax.studies.niah make --out=DIR`")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except UnicodeDecodeError as err:
    raise ValueError(f"{path} is not UTF-8 text ({err.reason}); {remake}") from None
  queries = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      query = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path} line {number} is not a json object ({err.msg}, the file "
                       f"may be truncated); {remake}") from None
    if not (isinstance(query, dict) and isinstance(query.get("prompt"), str)
            and isinstance(query.get("value"), str)):
      raise ValueError(f"{path} line {number} is not a query (a json object with string "
                       f"\"prompt\" and \"value\"); {remake}")
    queries.append(query)
  if not queries:
    raise ValueError(f"{path} has no queries; {remake}")
  return queries


def recalled(answer: str, value: str) -> bool:
  """The decoded answer starts with the whole value: "42" does not score on "423"."""
  answer = answer.strip()
  return answer.startswith(value) and not answer[len(value):][:1].isdigit()


def recall(workdir: str, data: str, max_queries: int = 0, batch_size: int = 16) -> dict:
  """Exact recall of the queried values by greedy decoding, over `data/val.jsonl`."""
  import jax
  import jax.numpy as jnp

  from engram_jax import workdir as workdir_lib
  from engram_jax.sampling import text as generate
  if max_queries < 0:
    raise ValueError(f"max_queries={max_queries}: use 0 (all) or a positive integer")
  queries = read_queries(data)
  if max_queries:
    queries = queries[:max_queries]
  trained = workdir_lib.load(workdir, kind="lm")
  model, params, tok, vocab_map, step = (trained.model, trained.variables, trained.tokenizer,
                                         trained.vocab_map, trained.step)
  new_tokens = 3
  encoded = [tok.encode(q["prompt"]).ids for q in queries]
  bucket = generate.prompt_bucket(max(len(e) for e in encoded), new_tokens,
                                  model.cfg.max_len)
  run = jax.jit(lambda p, prompts, lengths: generate.generate(
      model, p, prompts, lengths, jax.random.key(0), max_new_tokens=new_tokens,
      temperature=0.0, vocab_map_V=vocab_map))
  correct, skipped = 0, 0
  for start in range(0, len(queries), batch_size):
    chunk = encoded[start:start + batch_size]
    prompts = np.zeros((batch_size, bucket), np.int32)
    lengths = np.ones(batch_size, np.int32)
    for row, ids in enumerate(chunk):
      ids = ids[-bucket:]  # the end of a too-long document (the query) is kept
      skipped += len(ids) < len(chunk[row])
      prompts[row, :len(ids)] = ids
      lengths[row] = len(ids)
    out = run(params, jnp.asarray(prompts), jnp.asarray(lengths))
    for row, q in enumerate(queries[start:start + batch_size]):
      correct += recalled(tok.decode(np.asarray(out[row]).tolist()), q["value"])
    print(f"niah: {min(start + batch_size, len(queries))}/{len(queries)} queries, "
          f"recall so far {correct / min(start + batch_size, len(queries)):.3f}",
          flush=True)
  return {"recall": correct / len(queries), "queries": len(queries), "step": step,
          "truncated_prompts": skipped}


def main(argv=None) -> int:
  parser = cli.Parser(
      prog="python -m engram_jax.studies.niah",
      description="Multi-query needle-in-a-haystack corpus and recall evaluation.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  make = sub.add_parser("make", help="write a NIAH corpus (train/*.txt, val.jsonl)")
  make.add_argument("--out", required=True)
  make.add_argument("--docs", type=int, default=4000)
  make.add_argument("--val_docs", type=int, default=200)
  make.add_argument("--needles", type=int, default=3)
  make.add_argument("--queries", type=int, default=2)
  make.add_argument("--seed", type=int, default=0)
  make.add_argument("--filler_lines", type=int, default=6, help="filler lines per document")
  make.add_argument("--key_letters", type=int, default=3, help="letters per key")
  make.add_argument("--value_digits", type=int, default=3, help="digits per value")
  make.add_argument("--overwrite", action="store_true",
                    help="replace a corpus of other parameters already in --out")
  ev = sub.add_parser("eval", help="exact recall of a trained workdir")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--data", required=True, help="a directory written by `make`")
  ev.add_argument("--max_queries", type=int, default=0, help="0 = all")
  args = parser.parse_args(argv)

  def body():
    if args.command == "make":
      for name in ("docs", "val_docs", "needles", "queries", "key_letters",
                   "value_digits"):
        if getattr(args, name) < 1:
          raise ValueError(f"--{name}={getattr(args, name)}: use 1 or more")
      if args.filler_lines < 0:
        raise ValueError(f"--filler_lines={args.filler_lines}: use 0 or more")
      if args.queries > args.needles:
        raise ValueError(f"--queries={args.queries} exceeds --needles={args.needles}: "
                         "each query asks a different needle")
      make_corpus(args.out, args.docs, args.val_docs, args.needles, args.queries,
                  args.seed, filler_lines_per_doc=args.filler_lines,
                  key_letters=args.key_letters, value_digits=args.value_digits,
                  overwrite=args.overwrite)
      print(f"wrote {args.out}/train/*.txt and {args.out}/val.jsonl")
    else:
      if args.max_queries < 0:
        raise ValueError(f"--max_queries={args.max_queries}: use 0 (all) or more")
      print(json.dumps(recall(args.workdir, args.data, args.max_queries)))
  return cli.run(body)


if __name__ == "__main__":
  sys.exit(main())
