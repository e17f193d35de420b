"""probes: gate clamp (g = 0 is Engram removed), donor probe (self is exactly 0, donor
choice), table collapse/randomise, statistics, reports; and the workdir CLIs
(probes, evaluate, generate_image) on a checkpoint written here like training does."""
import csv
import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import image as image_configs
from engram_jax import checkpoints
from engram_jax.studies import evaluate
from engram_jax.studies import feature_nets
from engram_jax.sampling import image as generate_image
from engram_jax.studies import probes, reports
from engram_jax.data import images
from engram_jax.models import image
from engram_jax.models.layouts import relayout_params

from tests.conftest import with_random_conv

DIGITS = images.ImageDataConfig(batch_size=30)
CFG = image.make_image_config(
    dict(width=32, depth=3, num_heads=4, num_kv_heads=2,
         engram=dict(layers=(1, 2), max_ngram=3, heads=2, embed_per_ngram=16,
                     table_size=(61,), table_row_multiple=8, seed=1)), DIGITS)
MODEL = image.ImageARModel(CFG)


def init_params(cfg=CFG, seed=0):
  """Random init with random conv kernels (zero at init) so the conv path matters."""
  p = nn.unbox(jax.jit(image.ImageARModel(cfg).init)(
      jax.random.key(seed), jnp.zeros((1, cfg.cells), jnp.int32)))["params"]
  return with_random_conv(p, cfg.model)


@pytest.fixture(scope="module")
def params():
  return init_params()


@pytest.fixture(scope="module")
def batches():
  out = list(images.eval_batches(DIGITS, "test", max_batches=2))
  assert np.bincount(np.concatenate([b["labels"] for b in out])).min() >= 2
  return out


# ----------------------------------------------------------------------------------
# Gate clamp
# ----------------------------------------------------------------------------------
def test_gate_zero_equals_model_with_engram_removed_in_nll(params, batches):
  rows = probes.gate_clamp(CFG, params, batches, gates=(0.0, 0.5, "learned"))
  assert [r["gate"] for r in rows] == ["0", "0.5", "learned"]
  baseline = dataclasses.replace(CFG, model=dataclasses.replace(
      CFG.model, engram=dataclasses.replace(CFG.model.engram, layers=())))
  base_nll = evaluate.nll_bits_per_token(
      image.ImageARModel(baseline), relayout_params(params, CFG.model, baseline.model),
      batches)
  np.testing.assert_allclose(rows[0]["nll_bits"], base_nll, rtol=1e-6)
  for row in rows[1:]:
    assert abs(row["nll_bits"] - base_nll) > 1e-3, row


def test_params_for_gate_drops_the_learned_gate_weights_and_needs_them_back(params):
  clamped = probes.params_for_gate(params, 0.1)
  engram = clamped["block_1"]["engram"]
  assert not {"key", "hidden_norm", "key_norm"} & set(engram)
  assert {"table", "value", "conv", "conv_norm"} <= set(engram)
  assert "key" in params["block_1"]["engram"]  # the input is not edited
  # exactly the params a constant-gate model initialises
  want = image.abstract_params(probes.with_gate(CFG, 0.1))
  assert (jax.tree_util.tree_structure(want) ==
          jax.tree_util.tree_structure(clamped))
  with pytest.raises(ValueError, match="constant engram.gate"):
    probes.params_for_gate(clamped, "learned")


def test_a_traced_gate_value_equals_the_static_constant(params, batches):
  """What gate_clamp runs: a model built for gate 1.0 with the constant as a param."""
  static = evaluate.nll_bits_per_token(image.ImageARModel(probes.with_gate(CFG, 0.3)),
                                       probes.params_for_gate(params, 0.3), batches[:1])
  traced = evaluate.nll_bits_per_token(
      image.ImageARModel(probes.with_gate(CFG, 1.0)),
      probes.with_traced_gate(probes.params_for_gate(params, 1.0), 0.3), batches[:1])
  one = evaluate.nll_bits_per_token(image.ImageARModel(probes.with_gate(CFG, 1.0)),
                                    probes.params_for_gate(params, 1.0), batches[:1])
  np.testing.assert_allclose(traced, static, rtol=1e-6)
  assert abs(traced - one) > 1e-4  # the param, not the model's 1.0, set the gate
  compiled = evaluate._nll_sum._cache_size()
  probes.gate_clamp(CFG, params, batches[:1], gates=(0.0, 0.7))
  assert evaluate._nll_sum._cache_size() == compiled  # constants reuse one program


def test_gate_clamp_with_sample_quality(params, batches):
  net = lambda x: (np.asarray(x, float).reshape(len(x), -1),
                   np.eye(10)[np.asarray(x).reshape(len(x), -1).sum(1) % 10])
  reference = net(feature_nets.split_images(DIGITS, "test")[0])[0]
  quality = evaluate.SampleQuality(net, reference, 2, 0, dict(
      cfg_scale=0.0, temperature=1.0, top_k=0, top_p=1.0), "pixels")
  rows = probes.gate_clamp(CFG, params, batches[:1], gates=(0.0, "learned"),
                           quality=quality)
  for row in rows:
    assert set(row) == {"gate", "nll_bits", "fid", "inception_score", "samples"}
    assert row["samples"] == 20 and row["fid"] > 0 and 1 <= row["inception_score"] <= 10
  assert rows[0]["fid"] != rows[1]["fid"]


# ----------------------------------------------------------------------------------
# Donor probe
# ----------------------------------------------------------------------------------
def test_donor_indices_pick_same_class_nearest_farthest_and_random():
  cells = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 1],
                    [5, 5, 5, 5], [5, 5, 5, 4]])
  labels = np.array([0, 0, 0, 0, 1, 1])
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(probes.donor_indices(cells, labels, "self", rng), range(6))
  np.testing.assert_array_equal(probes.donor_indices(cells, labels, "matched", rng),
                                [1, 0, 3, 1, 5, 4])
  np.testing.assert_array_equal(probes.donor_indices(cells, labels, "adversarial", rng),
                                [2, 2, 0, 0, 5, 4])
  random = np.stack([probes.donor_indices(cells, labels, "random", rng) for _ in range(50)])
  assert np.all(labels[random] == labels) and np.all(random != np.arange(6))
  assert len(np.unique(random[:, 0])) == 3  # draws among all three others
  with pytest.raises(ValueError, match="no other image of its class"):
    probes.donor_indices(cells[:5], labels[:5], "matched", rng)


def test_donor_probe_self_is_exactly_zero_and_other_donors_are_not(params, batches):
  results = probes.donor_probe(MODEL, params, batches, seed=0)
  n = sum(len(b["labels"]) for b in batches)
  assert set(results) == set(probes.DONOR_KINDS)
  assert np.all(results["self"]["kl"] == 0.0) and np.all(results["self"]["js"] == 0.0)
  labels = np.concatenate([b["labels"] for b in batches])
  for kind in ("matched", "random", "adversarial"):
    r = results[kind]
    assert r["kl"].shape == (n,) and np.all(r["kl"] >= 0) and r["kl"].mean() > 0
    assert np.all(r["js"] <= np.log(2) + 1e-6) and r["js"].mean() > 0
    assert np.all(labels[r["donor"]] == labels) and np.all(r["donor"] != np.arange(n))


def test_kl_js_of_known_distributions():
  p, q = np.log([[[0.5, 0.5]]]), np.log([[[0.9, 0.1]]])
  kl, js = probes.kl_js(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32))
  want_kl = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  m = np.array([0.7, 0.3])
  want_js = 0.5 * (np.sum(0.5 * np.log(0.5 / m)) + 0.9 * np.log(0.9 / 0.7) +
                   0.1 * np.log(0.1 / 0.3))
  np.testing.assert_allclose(kl, [want_kl], rtol=1e-5)
  np.testing.assert_allclose(js, [want_js], rtol=1e-5)


# ----------------------------------------------------------------------------------
# Table probe
# ----------------------------------------------------------------------------------
def test_edit_tables(params):
  collapsed = probes.edit_tables(CFG, params, "collapse", jax.random.key(0))
  table = collapsed["block_2"]["engram"]["table"]
  rows = CFG.model.engram.hash_spec().rows(1)
  np.testing.assert_allclose(table, np.broadcast_to(
      params["block_2"]["engram"]["table"][:rows].mean(0), table.shape), rtol=1e-6)
  fresh = probes.edit_tables(CFG, params, "randomise", jax.random.key(0))
  new = np.asarray(fresh["block_1"]["engram"]["table"])
  assert new.shape == params["block_1"]["engram"]["table"].shape
  assert abs(new.std() - CFG.model.engram.table_init_std) < 0.05
  assert not np.allclose(new, params["block_1"]["engram"]["table"])
  np.testing.assert_array_equal(fresh["block_1"]["engram"]["value"]["kernel"],
                                params["block_1"]["engram"]["value"]["kernel"])


def test_table_collapse_and_randomise_change_the_next_token_distributions(params, batches):
  results = probes.table_probe(MODEL, params, batches, seed=0)
  assert set(results) == set(probes.TABLE_KINDS)
  for kind, r in results.items():
    assert np.all(r["kl"] > 0) and np.all(r["js"] > 0), kind


# ----------------------------------------------------------------------------------
# Statistics and reports
# ----------------------------------------------------------------------------------
def test_bootstrap_ci_and_paired_permutation_test():
  rng = np.random.default_rng(0)
  values = rng.normal(1.0, 1.0, 200)
  low, high = reports.bootstrap_ci(values, rng, 2000)
  assert low < values.mean() < high and 0.1 < high - low < 0.5  # ~ 2 * 1.96 / sqrt(200)
  a = rng.normal(size=40)
  assert reports.paired_permutation_test(a, a, rng, 500) == 1.0
  assert reports.paired_permutation_test(a + 1.0, a, rng, 500) == pytest.approx(1 / 501)
  # exchangeable pairs: p-values are not systematically small
  ps = [reports.paired_permutation_test(rng.normal(size=30), rng.normal(size=30), rng, 200)
        for _ in range(40)]
  assert 0.3 < np.mean(ps) < 0.7


def test_write_report_writes_markdown_csv_and_png(tmp_path):
  results = {"a": {"kl": np.array([0.0, 0.0]), "js": np.array([0.0, 0.0])},
             "b": {"kl": np.array([1e-3, 2e-3]), "js": np.array([1e-4, 3e-4])}}
  summary, tests = reports.summarise(results, n_boot=20, n_perm=20, compare=("a", "b"))
  paths = reports.write_report(str(tmp_path), "demo", [("summary", summary),
                                                      ("tests", tests)],
                              probes.plot_divergences(summary), "header line")
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["demo.csv", "demo.md", "demo.png", "demo_tests.csv"]
  text = (tmp_path / "demo.md").read_text()
  assert "header line" in text and "| kind | n | kl |" in text
  with open(tmp_path / "demo.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["kind"] for r in rows] == ["a", "b"] and float(rows[1]["kl"]) == 1.5e-3
  assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------
# Workdir CLIs on a checkpoint laid out as training writes it
# ----------------------------------------------------------------------------------
def make_workdir(path, engram: bool = True, save: bool = True):
  """config.json + checkpoints/STEP/state ({step, params, opt_state}) + metrics.jsonl;
  returns (path, saved params)."""
  c = image_configs.get_config("digits" if engram else "digits_baseline")
  c.model.update(width=32, depth=3, num_kv_heads=2)
  c.model.engram.update(table_size=(61,), heads=2, embed_per_ngram=16)
  c.data.batch_size = 30
  c.sample.update(cfg_scale=1.5, num_samples=4)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(c.to_json())
  params = None
  if save:
    params = init_params(image.make_image_config(c.model, c.data))
    state = {"step": jnp.array(7), "params": params, "opt_state": {}}
    mngr = checkpoints.manager(path, async_saves=False)
    checkpoints.save(mngr, 7, state, {"batches": 7})
    mngr.wait_until_finished()
    mngr.close()
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 7, "train_loss": 2.0}) + "\n")
  return str(path), params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def workdir(saved):
  return saved[0]


def test_loading_an_image_workdir_restores_the_saved_params(saved):
  from engram_jax import workdir
  run = workdir.load(saved[0])
  assert run.kind == "image" and run.tokenizer is None and run.vocab_map is None
  assert run.step == 7 and run.config.data.batch_size == 30 and run.model.cfg.model.width == 32
  jax.tree_util.tree_map(np.testing.assert_array_equal, run.params, saved[1])
  with pytest.raises(ValueError, match=r"holds a 'image' run .* reads 'lm' runs"):
    workdir.load(saved[0], kind="lm")


def test_generate_image_cli_writes_a_png_grid(workdir, capsys):
  out = os.path.join(workdir, "grid", "s.png")
  assert generate_image.main([f"--workdir={workdir}", "--classes=0,3", "--samples_per_class=3",
                              "--temperature=0.5", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert out in printed and "cfg_scale=1.5" in printed and "temperature=0.5" in printed
  assert open(out, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
  with np.load(os.path.join(workdir, "grid", "s.npz")) as npz:
    assert npz["codes"].shape == (6, 8, 8)
    np.testing.assert_array_equal(npz["labels"], [0, 0, 0, 3, 3, 3])
  # its own outputs are replaced by the same command again
  assert generate_image.main([f"--workdir={workdir}", "--classes=0", "--samples_per_class=1",
                              f"--out={out}"]) == 0


def test_generate_image_never_replaces_files_it_did_not_write(workdir, tmp_path, capsys):
  """`--out=mydata.png` replaced the user's dataset `mydata.npz` (codes and labels,
  the samples' own format) with 4 samples; `--out=WORKDIR/config.json` wrote a PNG
  over the run's config."""
  data = tmp_path / "mydata.npz"
  np.savez(data, codes=np.zeros((3, 8, 8), np.int32), labels=np.zeros(3, np.int32))
  before = data.read_bytes()
  cases = [(tmp_path / "mydata.png", "mydata.npz exists and is not a sample `generate` wrote"),
           (os.path.join(workdir, "config.json"), "give a .png path"),
           (tmp_path, "give a .png path"),
           (tmp_path / "mydata.npz" / "a.png", "mydata.npz is not a directory")]
  os.makedirs(tmp_path / "dir.png")
  cases.append((tmp_path / "dir.png", "dir.png is a directory"))
  for out, says in cases:
    assert generate_image.main([f"--workdir={workdir}", "--classes=0", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out={out}: ") and says in err, err
  assert data.read_bytes() == before
  assert json.loads(open(os.path.join(workdir, "config.json")).read())
  # samples of a version before the mark: a matplotlib PNG beside codes and labels
  from matplotlib.figure import Figure
  old = tmp_path / "old_samples.png"
  Figure().savefig(old, format="png")
  np.savez(tmp_path / "old_samples.npz", codes=np.zeros((1, 8, 8), np.int32),
           labels=np.zeros(1, np.int32))
  assert generate_image.main([f"--workdir={workdir}", "--classes=0", "--samples_per_class=1",
                              f"--out={old}"]) == 0
  with np.load(tmp_path / "old_samples.npz") as npz:
    assert "sampled_by" in npz.files


@pytest.mark.parametrize("flags, match", [
    (["--classes=0,10"], r"--classes: class 10 is outside \[0, data.num_classes=10\)"),
    (["--classes=a"], "--classes='a'"),
    (["--samples_per_class=0"], "--samples_per_class=0"),
    (["--temperature=inf"], r"^error: --temperature=inf: use a finite number >= 0 \(0 = greedy\)$"),
    (["--cfg_scale=nan"], r"^error: --cfg_scale=nan: use a finite number >= 0"),
])
def test_generate_image_cli_errors(workdir, capsys, flags, match):
  assert generate_image.main([f"--workdir={workdir}", *flags]) == 2
  assert re.search(match, capsys.readouterr().err)


def test_generate_image_cli_without_checkpoint_or_config(tmp_path, capsys):
  bare, _ = make_workdir(tmp_path / "bare", save=False)
  assert generate_image.main([f"--workdir={bare}"]) == 2
  assert "has no checkpoint" in capsys.readouterr().err
  assert generate_image.main([f"--workdir={tmp_path / 'none'}"]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_generate_dispatches_on_the_runs_kind(workdir, tmp_path, capsys):
  from engram_jax import generate as generate_cli
  lm = tmp_path / "lm"
  lm.mkdir()
  (lm / "config.json").write_text(json.dumps({"model": {}, "data": {"source": "stdlib"}}))
  assert not generate_cli._is_image_run([f"--workdir={lm}", "--prompt=x"])
  assert generate_cli._is_image_run([f"--workdir={workdir}"])
  assert generate_cli.main([f"--workdir={workdir}", "--classes=12"]) == 2
  assert "--classes" in capsys.readouterr().err  # the image CLI answered


def test_probes_cli_writes_every_probe(workdir, capsys):
  argv = [f"--workdir={workdir}", "--probe=all", "--max_batches=2", "--samples_per_class=2",
          "--gates=0,learned", "--bootstrap=50", "--permutations=100"]
  assert probes.main(argv) == 0
  out_dir = os.path.join(workdir, "probes")
  for name in ("gate_clamp", "donor", "table"):
    for ext in ("md", "csv", "png"):
      assert os.path.getsize(os.path.join(out_dir, f"{name}.{ext}")) > 0, (name, ext)
  assert os.path.exists(os.path.join(out_dir, "donor_tests.csv"))
  with open(os.path.join(out_dir, "gate_clamp.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["gate"] for r in rows] == ["0", "learned"]
  assert all(float(r["fid"]) > 0 for r in rows)
  with open(os.path.join(out_dir, "donor.csv")) as f:
    donor = {r["kind"]: r for r in csv.DictReader(f)}
  assert float(donor["self"]["kl"]) == 0.0 and float(donor["random"]["kl"]) > 0
  printed, progress = capsys.readouterr()
  assert "digits classifier (test accuracy" in printed
  for loop in ("gate clamp: gates: 2/2", "NLL batches: 2/2", "sampling batches: 1/1",
               "donor probe batches: 2/2", "table probe batches: 2/2"):
    assert loop in progress, (loop, progress)  # long runs say how far they are, on stderr
  assert os.path.exists(os.path.join(workdir, "digits_classifier_levels8_split0_seed0_"
                                     "steps400.npz"))


def test_probes_cli_errors(workdir, tmp_path, capsys):
  assert probes.main([f"--workdir={workdir}", "--probe=gate_clamp", "--gates=2"]) == 2
  assert "--gates: '2'" in capsys.readouterr().err
  baseline, _ = make_workdir(tmp_path / "base", engram=False)
  assert probes.main([f"--workdir={baseline}", "--probe=donor"]) == 2
  assert "model.engram.layers is empty" in capsys.readouterr().err


def test_evaluate_cli_writes_metrics(workdir, capsys):
  assert evaluate.main([f"--workdir={workdir}", "--split=val", "--max_batches=1",
                        "--samples_per_class=2"]) == 0
  with open(os.path.join(workdir, "eval_val_step7.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 7 and metrics["nll_bits_per_token"] > 0
  assert metrics["fid"] > 0 and metrics["samples"] == 20
