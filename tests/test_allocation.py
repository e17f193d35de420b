"""Sparsity allocation: counts equal initialised trees, the rho solver, the configs,
the Engram-27B dry run and the sweep command (micro size, resumable)."""
import csv
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import allocation as allocation_configs
from engram_jax import allocation
from engram_jax.studies import allocation_sweep
from engram_jax import config as config_lib
from engram_jax.models.lm import EngramLM

from tests.conftest import tiny_model_config

BASE = tiny_model_config()  # width 32, depth 4, Engram at 1 and 3 (2 orders x 2 heads)
MOE = config_lib.MoEConfig(num_experts=6, expert_dim=16, top_k=2, num_shared=1,
                           shared_dim=8, first_dense_layers=1)


def _cfg(engram=None, **fields):
  engram = dataclasses.replace(BASE.engram, **(engram or {}))
  return config_lib.validate(dataclasses.replace(BASE, engram=engram, **fields))


CONFIGS = {
    "dense_no_engram": _cfg(engram=dict(layers=())),
    "dense_engram_padded": _cfg(engram=dict(table_row_multiple=64)),
    "moe_engram_hyper3": _cfg(moe=MOE, branches=3,
                              engram=dict(table_row_multiple=32, table_size=(101, 67))),
    "moe_static_hc_gate_off_tied": _cfg(moe=dataclasses.replace(MOE, num_shared=0),
                                        branches=2, hyper="static", tie_embeddings=True,
                                        engram=dict(gate="off", layers=(0,))),
    "v4_hyper2_published": _cfg(branches=2, engram=dict(
        variant="v4", hash="published", compressed_vocab_size=97, pad_id=2)),
    "moe_first_dense_2": _cfg(depth=5, moe=dataclasses.replace(MOE, first_dense_layers=2),
                              head_dim=16, mlp_dim=48, hyper="dynamic"),
}


def _abstract_params(cfg):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(jax.eval_shape(EngramLM(cfg).init, jax.random.key(0), tokens))["params"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_equal_the_initialised_tree(name):
  cfg = CONFIGS[name]
  params = _abstract_params(cfg)
  counts = allocation.param_counts(cfg)
  assert allocation.tree_counts(params) == counts.total
  assert counts.total_params == sum(x.size for x in jax.tree_util.tree_leaves(params))
  stored = sum(v["engram"]["table"].shape[0] for k, v in params.items()
               if k.startswith("block_") and "engram" in v)
  assert counts.table_rows_stored == stored
  if cfg.engram.layers:
    spec = cfg.engram.hash_spec()
    assert counts.table_rows_used == sum(spec.rows(i) for i in range(len(cfg.engram.layers)))
    assert counts.table_params_used == counts.table_rows_used * cfg.engram.head_dim
  if name == "dense_engram_padded":
    assert counts.table_rows_stored > counts.table_rows_used  # padding is counted apart


def test_activated_parameters_and_flops_by_hand():
  cfg = CONFIGS["moe_engram_hyper3"]
  c = allocation.param_counts(cfg, context=16)
  d, e, moe_layers = cfg.width, cfg.engram, 3
  expert = 3 * d * MOE.expert_dim
  assert c.activated["routed_experts"] == moe_layers * MOE.top_k * expert
  assert c.sparse_moe == moe_layers * (MOE.num_experts - MOE.top_k) * expert
  assert c.activated["engram_tables"] == 2 * e.orders * e.heads * e.head_dim
  assert c.sparse_engram == (c.table_rows_used - 2 * e.orders * e.heads) * e.head_dim
  # everything a token does not touch: unused experts, unread rows (and their padding),
  # and the embedding rows of the other tokens
  untouched = c.total_params - c.activated_params
  padding = (c.table_rows_stored - c.table_rows_used) * e.head_dim
  assert untouched == c.sparse_moe + c.sparse_engram + padding + (cfg.vocab_size - 1) * d
  for group in ("router", "routed_experts", "shared_experts", "dense_mlp"):
    assert c.flops[group] == 2 * c.activated[group]
  attn = c.activated["attention"]
  assert c.flops["attention"] == 2 * attn + cfg.depth * 4 * cfg.num_heads * 8 * 16
  assert c.flops["engram_tables"] == 0
  assert c.rho == c.sparse_moe / (c.sparse_moe + c.sparse_engram)


REFERENCE = allocation.pure_moe(_cfg(moe=dataclasses.replace(MOE, num_experts=10),
                                     engram=dict(table_row_multiple=1)))


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 0.8])
def test_iso_params_allocation(rho):
  base = allocation.param_counts(REFERENCE)
  cfg = allocation.allocate(REFERENCE, rho, engram_layers=(1,))
  c = allocation.param_counts(cfg)
  assert cfg.moe.num_experts == 2 + round(8 * rho)
  assert (cfg.moe.top_k, cfg.moe.expert_dim, cfg.moe.shared_dim) == (2, 16, 8)
  assert c.activated["routed_experts"] == base.activated["routed_experts"]
  assert cfg.engram.layers == (1,)
  # iso total: within budget, and one more row per head would not be
  assert c.total_params <= base.total_params
  bigger = dataclasses.replace(cfg, engram=dataclasses.replace(
      cfg.engram, table_size=(cfg.engram.table_size[0] + 1,)))
  assert allocation.param_counts(bigger).total_params > base.total_params
  # the realized share follows the nominal one
  assert abs(c.rho - rho) < 0.12


def test_rho_one_is_the_reference_and_realized_rho_is_monotone():
  assert allocation.allocate(REFERENCE, 1.0, engram_layers=(1,)) == REFERENCE
  rhos = [allocation.param_counts(allocation.allocate(REFERENCE, r, (1,))).rho
          for r in (0.0, 0.25, 0.5, 0.75)]
  assert rhos[0] == 0.0 and all(a < b for a, b in zip(rhos, rhos[1:]))


def test_iso_flops_family_matches_flops_and_params():
  base = allocation.param_counts(REFERENCE)
  for rho in (0.0, 0.5):
    cfg = allocation.allocate(REFERENCE, rho, (1,), family="iso_flops")
    c = allocation.param_counts(cfg)
    assert cfg.moe.shared_dim < REFERENCE.moe.shared_dim
    assert c.total_params <= base.total_params
    # within one unit of shared width (2 * 3 * D FLOPs per MoE layer)
    assert abs(c.flops_per_token - base.flops_per_token) <= 2 * 3 * 32 * 3
    plain = allocation.param_counts(allocation.allocate(REFERENCE, rho, (1,)))
    assert abs(plain.flops_per_token - base.flops_per_token) > abs(
        c.flops_per_token - base.flops_per_token)


def test_expert_multiple_rounds_for_expert_parallelism():
  ref = allocation.pure_moe(_cfg(moe=dataclasses.replace(MOE, num_experts=16, top_k=2)))
  cfg = allocation.allocate(ref, 0.6, (1,), expert_multiple=4)
  assert cfg.moe.num_experts % 4 == 0 and cfg.moe.num_experts == 12


@pytest.mark.parametrize("call, match", [
    (lambda: allocation.allocate(REFERENCE, 1.5, (1,)), r"rho=1.5 is invalid"),
    (lambda: allocation.allocate(_cfg(), 0.5, (1,)), r"model.moe.num_experts=0"),
    (lambda: allocation.allocate(REFERENCE, 0.5, (1,), family="iso_cost"),
     r"allocation.family='iso_cost'"),
    (lambda: allocation.allocate(allocation.pure_moe(_cfg(moe=dataclasses.replace(
        MOE, num_shared=0))), 0.5, (1,), family="iso_flops"), r"moe.num_shared >= 1"),
    (lambda: allocation.allocate(REFERENCE, 0.97, (1,)), r"use a smaller rho"),
    (lambda: allocation.allocate(REFERENCE, 0.9, (1, 2, 3)), r"exceed the budget"),
])
def test_allocation_errors_name_the_problem(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ----------------------------------------------------------------------------------
# configs/allocation.py
# ----------------------------------------------------------------------------------
def _model(c):
  model = c.model.to_dict()
  model["vocab_size"] = model["vocab_size"] or c.data.vocab_size
  return config_lib.from_dict(model)


def test_config_variants_solve_the_family():
  toy = allocation_configs.get_config("toy")
  half = allocation_configs.get_config("toy_rho_0.5")
  assert half.to_dict() == allocation.config_at(toy, 0.5).to_dict()
  assert half.allocation.rho == 0.5 and toy.allocation.rho == 1.0
  assert not toy.model.engram.layers and tuple(half.model.engram.layers) == (1,)
  # any member re-solves to any rho
  assert allocation.config_at(half, 1.0).to_dict() == {**toy.to_dict()}
  base = allocation.param_counts(_model(toy))
  for variant in ("toy_rho_0", "toy_rho_0.25", "toy_flops_rho_0.5"):
    c = allocation.param_counts(_model(allocation_configs.get_config(variant)))
    assert 0.999 * base.total_params <= c.total_params <= base.total_params
  flops = allocation.param_counts(_model(allocation_configs.get_config("toy_flops_rho_0.5")))
  assert abs(flops.flops_per_token / base.flops_per_token - 1) < 0.005
  with pytest.raises(ValueError, match=r"unknown variant 'toy_rh'"):
    allocation_configs.get_config("toy_rh")
  with pytest.raises(ValueError, match=r"toy_rho_R must be a number"):
    allocation_configs.get_config("toy_rho_x")


def test_engram_27b_is_iso_parameter_with_moe_27b():
  moe27 = allocation.param_counts(_model(allocation_configs.get_config("moe_27b")))
  cfg = _model(allocation_configs.get_config("engram_27b"))
  e27 = allocation.param_counts(cfg)
  assert cfg.moe.num_experts == 56 and cfg.moe.num_experts % 8 == 0
  assert cfg.engram.layers == (1, 14) and cfg.branches == 4
  assert 26e9 < moe27.total_params < 27e9 and 3.5e9 < moe27.activated_params < 3.9e9
  assert abs(e27.total_params / moe27.total_params - 1) < 1e-6
  assert 5.0e9 < e27.total["engram_tables"] < 6.0e9
  assert abs(e27.activated_params / moe27.activated_params - 1) < 0.01


def test_dry_run_sizes_engram_27b_on_a_pod_mesh():
  from engram_jax import sizing
  c = allocation_configs.get_config("engram_27b")
  c.mesh.update(num_devices=64, fsdp=8, expert=8, data=-1)
  report = sizing.dry_run_report(c)
  counts = allocation.param_counts(_model(c))
  assert f"routed_experts {counts.total['routed_experts']:>18,} params" in report
  assert "shared_experts" in report and "engram_tables" in report
  per_device = counts.total["routed_experts"] * 4 / 64 / 2**30   # float32 over 64 shards
  assert f"routed experts {per_device:.3f} GiB" in report, report
  assert "fsdp=8 x tensor=1 x expert=8 (64 devices)" in report


# ----------------------------------------------------------------------------------
# The sweep command (micro size: 2 rhos x 3 steps)
# ----------------------------------------------------------------------------------
def test_sweep_writes_table_csv_plot_and_skips_finished_points(tmp_path, capsys):
  pytest.importorskip("clu")
  workdir = str(tmp_path / "study")
  args = ["sweep", "--config=configs/allocation.py:micro", "--rhos=0,1",
          f"--workdir={workdir}", "--steps=3"]
  assert allocation_sweep.main(args) == 0
  with open(os.path.join(workdir, "allocation.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [float(r["rho"]) for r in rows] == [0.0, 1.0]
  assert int(rows[0]["num_experts"]) == 2 and int(rows[1]["num_experts"]) == 8
  assert int(rows[0]["table_rows_used"]) > 0 and int(rows[1]["table_rows_used"]) == 0
  assert all(np.isfinite(float(r["eval_loss"])) and r["steps"] == "3" for r in rows)
  assert abs(int(rows[0]["total_params"]) / int(rows[1]["total_params"]) - 1) < 0.01
  table = open(os.path.join(workdir, "allocation.md")).read()
  assert "| rho | realized | experts |" in table
  assert sum(line.startswith("| ") for line in table.splitlines()) == 3
  assert os.path.getsize(os.path.join(workdir, "allocation.png")) > 1000
  first = capsys.readouterr().out
  assert "skipped" not in first
  mtime = os.path.getmtime(os.path.join(workdir, "rho_0_seed_0", "result.json"))
  assert allocation_sweep.main(args) == 0
  second = capsys.readouterr().out
  assert second.count("finished earlier") == 2 and "train_loss" not in second
  assert os.path.getmtime(os.path.join(workdir, "rho_0_seed_0", "result.json")) == mtime
  # more steps: the points train on from their checkpoints (they were once "finished
  # earlier" and the report said "Steps: [3]")
  assert allocation_sweep.main(args[:-1] + ["--steps=5"]) == 0
  assert capsys.readouterr().out.count("resumed from step 3") == 2
  with open(os.path.join(workdir, "allocation.csv")) as f:
    assert [r["steps"] for r in csv.DictReader(f)] == ["5", "5"]


def test_plan_and_bad_flags(capsys):
  assert allocation_sweep.main(["plan", "--config=configs/allocation.py:toy", "--rhos=0,1"]) == 0
  out = capsys.readouterr().out
  assert sum(line.startswith("| ") for line in out.splitlines()) == 3
  assert "| 1 | 1.000 | 16 |" in out
  assert allocation_sweep.main(["plan", "--config=configs/allocation.py:toy", "--rhos=a"]) == 2
  assert "--rhos='a'" in capsys.readouterr().err
  assert allocation_sweep.main(["plan", "--config=configs/lm.py:tiny"]) == 2
  assert "no `allocation` section" in capsys.readouterr().err


def test_a_sweep_refused_leaves_no_workdir(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "new" / "study"
  assert allocation_sweep.main(["sweep", "--config=configs/allocation.py:micro",
                                "--rhos=0,2", f"--workdir={workdir}"]) == 2
  assert "error: --rhos: allocation rho=2.0 is invalid" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()

  def no_corpus(c, directory):  # a failure once the workdir is made
    assert os.path.isdir(directory)
    raise ValueError("no corpus")
  monkeypatch.setattr(allocation_sweep, "_shared_tokenizer", no_corpus)
  assert allocation_sweep.main(["sweep", "--config=configs/allocation.py:micro",
                                "--rhos=0", f"--workdir={workdir}"]) == 2
  assert capsys.readouterr().err == "error: no corpus\n"
  assert not (tmp_path / "new").exists()


def test_a_damaged_result_is_left_out_of_the_report_with_a_warning(tmp_path, capsys):
  """A truncated result.json of another point stopped the sweep's report ("Expecting
  property name"), a JSON list made it a traceback."""
  import json

  from engram_jax.studies import allocation_sweep
  good = dict(rho=0.0, seed=0, steps=20, eval_loss=4.5)
  for name, text in (("rho_0_seed_0", json.dumps(good)), ("rho_1_seed_0", '{"rho": 1.0,'),
                     ("rho_0.5_seed_0", "[1, 2]")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "result.json").write_text(text)
  assert allocation_sweep.finished_points(str(tmp_path)) == [good]
  warnings = capsys.readouterr().err.splitlines()
  assert len(warnings) == 2 and all(w.startswith("warning: ") and "is damaged" in w
                                    for w in warnings)
