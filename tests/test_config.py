"""Config validation: every bad value fails up front, naming the field and the fix."""
import dataclasses

import pytest

from engram_jax import config as config_lib

from tests.conftest import tiny_model_config

BASE = tiny_model_config()


def _engram(**kw):
  return dataclasses.replace(BASE, engram=dataclasses.replace(BASE.engram, **kw))


@pytest.mark.parametrize("cfg, match", [
    (lambda: _engram(max_ngram=1), r"engram.max_ngram=1 is invalid: must be >= 2"),
    (lambda: _engram(embed_per_ngram=15), r"engram.embed_per_ngram=15 .*multiple of engram.heads=2"),
    (lambda: dataclasses.replace(BASE, num_heads=5), r"model.num_heads=5 .*must divide model.width=32"),
    (lambda: dataclasses.replace(BASE, num_kv_heads=3), r"model.num_kv_heads=3 .*divide model.num_heads=4"),
    (lambda: _engram(layers=(1, 4)), r"engram.layers=\(1, 4\) .*\[0, model.depth=4\)"),
    (lambda: _engram(layers=(-1,)), r"engram.layers=\(-1,\)"),
    (lambda: _engram(table_size=(1,)), r"engram.table_size=\(1,\) .*>= engram.heads=2"),
    (lambda: _engram(table_size=(61, 67, 71)), r"engram.table_size=.*one per order \(2"),
    (lambda: _engram(gate="sometimes"), r"engram.gate='sometimes' .*'learned', 'off' or a constant"),
    (lambda: _engram(gate=1.5), r"engram.gate=1.5"),
    (lambda: dataclasses.replace(BASE, remat="some"), r"model.remat='some' .*\('none', 'full', 'dots'\)"),
    (lambda: dataclasses.replace(BASE, dtype="fp8"), r"model.dtype='fp8'"),
])
def test_validation_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg())


def test_from_dict_round_trip_and_overrides():
  d = config_lib.to_dict(BASE)
  assert config_lib.from_dict(d) == BASE
  d["engram"]["layers"] = "0,2"
  d["engram"]["gate"] = "0.1"
  cfg = config_lib.from_dict(d)
  assert cfg.engram.layers == (0, 2) and cfg.engram.gate == 0.1


def test_from_dict_unknown_field():
  with pytest.raises(ValueError, match=r"engram.layer is not a known field"):
    config_lib.from_dict({"engram": {"layer": [1]}})


def test_valid_gates_accepted():
  for gate in ("learned", "off", 0.0, 0.1, 1.0):
    config_lib.validate(_engram(gate=gate))
