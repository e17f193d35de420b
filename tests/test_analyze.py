"""Analyses: LogitLens of the last layer is the model's own loss (LM and image models);
CKA's invariances; the command on LM and image pairs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.models.lm import EngramLM
from engram_jax.studies import analyze

from tests.conftest import tiny_model_config, with_random_conv


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = tiny_model_config()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17)),
                       jnp.int32)
  params = EngramLM(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]
  import flax.linen as nn
  return cfg, with_random_conv(nn.unbox(params), cfg), tokens


def test_last_stream_through_the_lens_is_the_models_own_loss(tiny_lm):
  cfg, params, tokens = tiny_lm
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  streams = analyze.residual_streams(cfg, params, inputs)
  assert len(streams) == cfg.depth + 1
  logits = EngramLM(cfg).apply({"params": params}, inputs)
  np.testing.assert_allclose(analyze.read_out(cfg, params, streams[-1]), logits,
                             atol=2e-5, rtol=2e-5)
  lens = analyze.logit_lens(cfg, params, streams, targets)
  own = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
  assert lens[-1]["loss"] == pytest.approx(float(own), rel=1e-5)
  assert lens[-1]["top1_agreement"] == 1.0
  assert lens[0]["top1_agreement"] < 1.0  # the embedding alone predicts otherwise


def test_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 16))
  rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  assert analyze.linear_cka(x, x) == pytest.approx(1.0)
  assert analyze.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
  unrelated = rng.normal(size=(200, 16))
  assert analyze.linear_cka(x, unrelated) < 0.3
  # partly shared: strictly between
  mixed = x[:, :8] @ rng.normal(size=(8, 16)) + 0.5 * unrelated
  assert 0.3 < analyze.linear_cka(x, mixed) < 1.0


def test_analyze_command_writes_tables_and_heat_map(trained_workdir, tmp_path, capsys):
  out = tmp_path / "analysis"
  assert analyze.main([f"--workdir={trained_workdir}", f"--baseline={trained_workdir}",
                       f"--out={out}", "--batches=1"]) == 0
  cka = np.loadtxt(out / "cka.csv", delimiter=",")
  # a model against itself: every layer is most similar to the same layer
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
  assert (out / "cka.png").stat().st_size > 0
  assert "| layer | Engram loss" in (out / "analysis.md").read_text()
  empty = tmp_path / "empty"
  empty.mkdir()
  assert analyze.main([f"--workdir={empty}", f"--baseline={trained_workdir}",
                       "--batches=1"]) == 2
  assert "error:" in capsys.readouterr().err
  assert os.listdir(empty) == []  # the default --out, EMPTY/analysis, left unmade


def test_a_bad_baseline_is_named_and_leaves_no_out(trained_workdir, tmp_path, capsys):
  missing, out = tmp_path / "missing", tmp_path / "new" / "analysis"
  assert analyze.main([f"--workdir={trained_workdir}", f"--baseline={missing}",
                       f"--out={out}", "--batches=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --baseline='{missing}' has no config.json"), err
  assert len(err.splitlines()) == 1 and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------
# Class-conditional image runs (models.image): the same lens, CKA and command
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_image(request):
  """(config, params, a val batch); tied: the read-out is the embedding's code rows."""
  import dataclasses
  from engram_jax.data import images
  from tests import test_probes
  cfg = test_probes.CFG
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, tie_embeddings=request.param))
  batch = next(iter(images.eval_batches(test_probes.DIGITS, "val", max_batches=1)))
  return cfg, test_probes.init_params(cfg), batch


def test_image_last_stream_through_the_lens_is_the_models_own_nll(tiny_image):
  from engram_jax.data import images
  from engram_jax.models import image
  from engram_jax.studies import evaluate
  from tests import test_probes
  cfg, params, batch = tiny_image
  assert ("unembed" in params) != cfg.model.tie_embeddings
  inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
  streams = analyze.residual_streams(cfg, params, inputs)
  assert len(streams) == cfg.model.depth + 1
  logits = image.ImageARModel(cfg).apply({"params": params}, inputs)
  assert logits.shape[-1] == cfg.codebook_size
  np.testing.assert_allclose(analyze.read_out(cfg, params, streams[-1]), logits,
                             atol=2e-5, rtol=2e-5)
  lens = analyze.logit_lens(cfg, params, streams, targets)
  # evaluate's NLL, with the pipeline's host-side 2D hashing (not the model's own)
  hashed = images.eval_batches(test_probes.DIGITS, "val", max_batches=1,
                               hash_spec=cfg.model.engram.hash_spec(),
                               stencil=cfg.model.engram.stencil)
  nll_bits = evaluate.nll_bits_per_token(image.ImageARModel(cfg), params, hashed)
  assert lens[-1]["loss"] == pytest.approx(nll_bits * np.log(2), rel=1e-5)
  assert lens[-1]["top1_agreement"] == 1.0
  assert lens[0]["top1_agreement"] < 1.0
  cka = analyze.cka_matrix(streams, streams)
  np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
  assert cka.shape == (cfg.model.depth + 1,) * 2 and (cka < 1 - 1e-3).any()


def test_analyze_command_on_an_image_pair(tmp_path, trained_workdir, capsys):
  from tests import test_probes
  engram, _ = test_probes.make_workdir(tmp_path / "engram")
  baseline, _ = test_probes.make_workdir(tmp_path / "baseline", engram=False)
  out = tmp_path / "analysis"
  assert analyze.main([f"--workdir={engram}", f"--baseline={baseline}", f"--out={out}",
                       "--batches=1"]) == 0
  depth = test_probes.CFG.model.depth
  cka = np.loadtxt(out / "cka.csv", delimiter=",")
  assert cka.shape == (depth + 1, depth + 1) and ((0 <= cka) & (cka <= 1 + 1e-6)).all()
  with open(out / "logit_lens.csv") as f:
    rows = f.read().splitlines()
  assert rows[0] == "model,layer,loss,top1_agreement" and len(rows) == 1 + 2 * (depth + 1)
  assert (out / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = (out / "analysis.md").read_text()
  assert "image runs at steps 7 and 7, on 30 validation code sequences" in text
  assert "| layer | Engram loss" in text
  # an image run against an LM run: one error line, nothing computed
  assert analyze.main([f"--workdir={engram}", f"--baseline={trained_workdir}",
                       f"--out={tmp_path / 'mixed'}", "--batches=1"]) == 2
  assert "holds a 'lm' run" in capsys.readouterr().err
