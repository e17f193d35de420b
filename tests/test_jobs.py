"""engram_jax.jobs: configs and overrides as a notebook gives them (the jobs themselves
run end to end in tests/test_colab.py)."""
import os

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
