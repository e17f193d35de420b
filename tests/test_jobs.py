"""engram_jax.jobs: configs and overrides as a notebook gives them (the jobs themselves
run end to end in tests/test_colab.py)."""
import os

import numpy as np
import pytest

from engram_jax import jobs


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: the installed copy is used
  c = jobs.config("configs/image.py:digits", {"train.steps": 7, "model.engram.table_size": [61]})
  assert c.train.steps == 7 and tuple(c.model.engram.table_size) == (61,)


def test_an_unknown_override_names_its_field():
  with pytest.raises(ValueError, match="no field 'train.stepz'"):
    jobs.config("configs/lm.py:tiny", {"train.stepz": 3})


def test_a_missing_config_file_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="no file"):
    jobs.config(os.path.join(tmp_path, "nope.py") + ":tiny")


@pytest.mark.parametrize("call, match", [
    (lambda: jobs.probes("W", probe="bogus"),
     r"^probe='bogus': choose one of gate_clamp, donor, table, all$"),
    (lambda: jobs.probes("W", probe="gate_clamp", nosuch=1),
     r"^nosuch: not an argument of jobs\.probes \(its keywords: workdir, probe, split, "),
    (lambda: jobs.probes("W", split="dev"), r"^split='dev': choose one of train, val, test$"),
    (lambda: jobs.probes("W", max_batches=-1), r"^max_batches=-1: use 0 or a positive"),
    (lambda: jobs.probes("W", max_batches="two"), r"^max_batches='two': give an int$"),
    (lambda: jobs.probes("W", seed=1.5), r"^seed=1\.5: give an int$"),
    (lambda: jobs.probes("W", bootstrap=0), r"^bootstrap=0: use a positive integer$"),
    (lambda: jobs.probes("W", inception_weights="w.npz"), r"^inception_weights='w\.npz' needs "
                                                          r"decoder="),
    (lambda: jobs.evaluate("W", split="bogus"), r"^split='bogus': choose one of train, val"),
    (lambda: jobs.evaluate("W", nosuch=2), r"^nosuch: not an argument of jobs\.evaluate "),
    (lambda: jobs.evaluate("W", samples_per_class=-1), r"^samples_per_class=-1: use 0 or"),
    (lambda: jobs.evaluate("W", reference_stats="/no/such.npz"),
     r"^reference_stats='/no/such\.npz': no such file"),
    (lambda: jobs.generate("W", "x", nosuch=1), r"^nosuch: not an argument of jobs\.generate "),
    (lambda: jobs.generate("W", b"def "), r"^prompt=b'def ': give a str$"),
    (lambda: jobs.generate("W", "x", max_new_tokens="8"), r"^max_new_tokens='8': give an int$"),
    (lambda: jobs.generate("W", "x", max_new_tokens=8.7), r"^max_new_tokens=8\.7: give an int"),
    (lambda: jobs.generate("W", "x", temperature=None), r"^temperature=None: give a number$"),
    (lambda: jobs.train("configs/lm.py:tiny", "W", [("train.steps", 20)]),
     r"^overrides=\[\('train.steps', 20\)\]: give a dict of dotted field -> value"),
    (lambda: jobs.train(5, "W"), r"^spec_or_config=5: give a config spec such as"),
    (lambda: jobs.generate("W", "x", max_new_tokens=np.float32(2)), r"give an int$"),
])
def test_a_bad_job_keyword_is_a_value_error_naming_it(call, match, capsys):
  """argparse would print usage and raise SystemExit(2); a job raises, printing nothing,
  before any checkpoint is read ("W" does not exist)."""
  with pytest.raises(ValueError, match=match) as raised:
    call()
  assert "\n" not in str(raised.value) and "--" not in str(raised.value)
  assert capsys.readouterr() == ("", "")


def test_job_keywords_parse_as_the_command_line_does(tmp_path):
  from engram_jax.studies import probes
  flags = dict(max_batches=2, samples_per_class="3", gates=[0, 0.1, "learned"],
               split="val", bootstrap=50)
  args = jobs._arguments(probes.build_parser(), "probes",
                         dict(workdir=tmp_path, probe="donor", **flags))
  argv = [f"--workdir={tmp_path}", "--probe=donor", "--max_batches=2", "--samples_per_class=3",
          "--gates=0,0.1,learned", "--split=val", "--bootstrap=50"]
  assert vars(args) == vars(probes.parse_args(argv))
