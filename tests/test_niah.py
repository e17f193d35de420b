"""NIAH: documents are deterministic per seed, every needle is recoverable, recall scores."""
import json
import os
import re

import numpy as np
import pytest

from engram_jax.studies import niah


def test_documents_are_deterministic_and_every_needle_recoverable():
  filler = niah.filler_lines(500)
  one = [niah.make_document(np.random.default_rng(7), filler, needles=4, queries=3)
         for _ in range(1)]
  two = [niah.make_document(np.random.default_rng(7), filler, needles=4, queries=3)
         for _ in range(1)]
  assert one == two
  other = niah.make_document(np.random.default_rng(8), filler, needles=4, queries=3)
  assert other != one[0]
  for doc in one + [other]:
    needles = dict(re.findall(r"the code of (\w+) is (\d{3})\.", doc["text"]))
    assert len(needles) == 4
    assert len(doc["queries"]) == 3
    for prompt, value in doc["queries"]:
      key = re.search(r"code of (\w+)\?$", prompt).group(1)
      assert needles[key] == value and doc["text"].startswith(prompt)
      assert f"{prompt} {value}\n" in doc["text"]  # the answer follows its query


def test_short_keys_and_values():
  filler = niah.filler_lines(500)
  doc = niah.make_document(np.random.default_rng(3), filler, needles=8, queries=8,
                           filler_lines_per_doc=0, key_letters=1, value_digits=2)
  lines = doc["text"].splitlines()
  needles = dict(re.findall(r"the code of (\w) is (\d\d)\.", doc["text"]))
  assert len(needles) == 8 and len(lines) == 16  # no filler: needles, then queries
  for prompt, value in doc["queries"]:
    assert needles[re.search(r"code of (\w)\?$", prompt).group(1)] == value
  with pytest.raises(ValueError, match="distinct keys"):
    niah.make_document(np.random.default_rng(3), filler, needles=21, key_letters=1)


def test_recalled_compares_whole_values():
  assert niah.recalled(" 42\ncode", "42") and niah.recalled("042.", "042")
  assert not niah.recalled(" 423", "42") and not niah.recalled(" 4", "42")


def test_corpus_and_recall_scoring(trained_workdir, tmp_path):
  niah.make_corpus(str(tmp_path), docs=3, val_docs=2, seed=1, docs_per_file=2)
  assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
      "part-0000.txt", "part-0001.txt"]
  queries = niah.read_queries(str(tmp_path))
  assert len(queries) == 4
  # score against what the model itself answers: recall 1, then against other values: 0
  from engram_jax import workdir
  from engram_jax.sampling import text as generate
  import jax
  import jax.numpy as jnp
  run = workdir.load(trained_workdir)
  model, params, tok, vocab_map = run.model, run.variables, run.tokenizer, run.vocab_map
  answers = []
  for q in queries:
    ids = tok.encode(q["prompt"]).ids
    bucket = generate.prompt_bucket(len(ids), 3, model.cfg.max_len)
    ids = ids[-bucket:]
    prompt = np.zeros((1, bucket), np.int32)
    prompt[0, :len(ids)] = ids
    out = generate.generate(model, params, jnp.asarray(prompt),
                            jnp.asarray([len(ids)], jnp.int32), jax.random.key(0),
                            max_new_tokens=3, temperature=0.0, vocab_map_V=vocab_map)
    answers.append(tok.decode(np.asarray(out[0]).tolist()).strip())
  with open(tmp_path / "val.jsonl", "w") as f:
    for q, answer in zip(queries, answers):
      f.write(json.dumps({"prompt": q["prompt"], "value": answer or "<none>"}) + "\n")
  scored = niah.recall(trained_workdir, str(tmp_path), batch_size=2)
  assert scored["recall"] == sum(bool(a) for a in answers) / len(answers)
  with open(tmp_path / "val.jsonl", "w") as f:
    for q, answer in zip(queries, answers):
      f.write(json.dumps({"prompt": q["prompt"], "value": "\x00never"}) + "\n")
  assert niah.recall(trained_workdir, str(tmp_path), batch_size=2)["recall"] == 0.0


def make_small(out) -> None:
  assert niah.main(["make", f"--out={out}", "--docs=2", "--val_docs=2", "--needles=2",
                    "--queries=1", "--filler_lines=1"]) == 0


@pytest.mark.parametrize("damage, match", [
    (lambda text: text[:text.index("\n") + 20], r"val\.jsonl line 2 is not a json object"
                                                r" \(Unterminated string"),
    (lambda text: text + '["a list"]\n', r"val\.jsonl line 3 is not a query"),
    (lambda text: text + '{"prompt": "p"}\n', r"val\.jsonl line 3 is not a query"),
    (lambda text: "\n", r"val\.jsonl has no queries"),
])
def test_a_damaged_val_jsonl_names_the_file_line_and_fix(tmp_path, capsys, damage, match):
  data = tmp_path / "data"
  make_small(data)
  capsys.readouterr()
  val = data / "val.jsonl"
  assert len(niah.read_queries(str(data))) == 2
  val.write_text(damage(val.read_text()))
  assert niah.main(["eval", f"--workdir={tmp_path / 'W'}", f"--data={data}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {val}") and len(err.splitlines()) == 1, err
  assert re.search(match, err), err
  assert f"niah make --out={data}` again" in err
  val.write_bytes(b"\xff\xfe{")
  with pytest.raises(ValueError, match=r"val\.jsonl is not UTF-8 text .* make --out="):
    niah.read_queries(str(data))


def test_make_writes_whole_files(tmp_path, monkeypatch):
  """A killed `make` leaves the previous corpus, not half a val.jsonl to trip `eval`."""
  from engram_jax import paths
  make_small(tmp_path)
  before = (tmp_path / "val.jsonl").read_bytes()

  def killed(path, write):
    raise KeyboardInterrupt
  monkeypatch.setattr(paths, "atomic_write", killed)
  with pytest.raises(KeyboardInterrupt):
    niah.make_corpus(str(tmp_path), docs=2, val_docs=5, needles=2, queries=1,
                     overwrite=True)
  assert (tmp_path / "val.jsonl").read_bytes() == before


def test_make_into_a_corpus_of_other_parameters_needs_overwrite(tmp_path, capsys):
  """It used to replace the parts it wrote and keep the old ones past them: training
  on `train/*.txt` then mixed two corpora."""
  out = tmp_path / "data"
  small = ["--val_docs=2", "--needles=2", "--queries=1", "--filler_lines=1"]
  assert niah.main(["make", f"--out={out}", "--docs=500", *small]) == 0  # 3 parts
  parts = sorted((out / "train").iterdir())
  first = [p.read_bytes() for p in parts]
  capsys.readouterr()
  assert niah.main(["make", f"--out={out}", "--docs=100", *small]) == 2
  assert capsys.readouterr().err == (
      f"error: --out={out} holds a NIAH corpus already (docs 500 -> 100); pass "
      "--overwrite to replace it, or give another --out\n")
  assert [p.read_bytes() for p in sorted((out / "train").iterdir())] == first
  assert niah.main(["make", f"--out={out}", "--docs=500", *small]) == 0  # the same: fine
  assert [p.read_bytes() for p in sorted((out / "train").iterdir())] == first
  assert niah.main(["make", f"--out={out}", "--docs=100", "--overwrite", *small]) == 0
  assert [p.name for p in (out / "train").iterdir()] == ["part-0000.txt"]
  other = tmp_path / "other"
  assert niah.main(["make", f"--out={other}", "--docs=100", *small]) == 0
  capsys.readouterr()
  (out / "train" / ".tmp-part-0000.txtab12").write_text("half")  # a kill -9's leftover
  assert niah.main(["make", f"--out={out}", "--docs=100", *small]) == 0  # taken up
  assert [p.name for p in (out / "train").iterdir()] == ["part-0000.txt"]
  (out / "train" / "notes.txt").write_text("mine")
  assert niah.main(["make", f"--out={out}", "--docs=100", *small]) == 2
  assert "holds files `make` did not write (notes.txt)" in capsys.readouterr().err
  (tmp_path / "a_file").write_text("x")
  assert niah.main(["make", f"--out={tmp_path / 'a_file'}", "--docs=100", *small]) == 2
  assert capsys.readouterr().err.startswith(f"error: --out={tmp_path / 'a_file'}: ")
  assert (out / "train" / "part-0000.txt").read_bytes() == (
      other / "train" / "part-0000.txt").read_bytes()


def test_eval_rejects_a_negative_max_queries(tmp_path, capsys):
  assert niah.main(["eval", "--workdir=W", f"--data={tmp_path}", "--max_queries=-1"]) == 2
  assert capsys.readouterr().err == ("error: --max_queries=-1: use 0 (all) or more\n")


def test_stale_parts_are_found_past_part_9999(tmp_path):
  """Sorted as text, part-10000.txt came before part-9999.txt and survived a smaller
  corpus written over a bigger one."""
  train = tmp_path / "train"
  train.mkdir()
  for n in (2, 9999, 10000, 10001):
    (train / f"part-{n:04d}.txt").write_text("")
  assert [os.path.basename(p) for p in niah._part_files(str(tmp_path))] == [
      "part-0002.txt", "part-9999.txt", "part-10000.txt", "part-10001.txt"]
