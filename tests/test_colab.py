"""The Colab notebooks run top to bottom (nbclient) at toy size. engram_jax is importable
here, so the install cell installs nothing; the kernel inherits the tests' 8 simulated
CPU devices, so the scale-out cell shards the tables over a real 8-device mesh."""
import json
import os
import re

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TOY = {"model.width": 32, "model.depth": 3, "model.num_heads": 2,
             "model.num_kv_heads": 2, "model.engram.table_size": [61], "mesh.num_devices": 1}


def _execute(name, tmp_path, **env):
  env = {"ENGRAM_COLAB_WORKDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
         "ENGRAM_COLAB_MESH_STEPS": "2", **env}
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  try:
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
  return nb


def _cell_text(cell) -> str:
  """Printed text and rendered markdown of a cell."""
  parts = []
  for out in cell.get("outputs", []):
    data = out.get("data", {})
    parts.append(out.get("text", "") or "".join(data.get("text/markdown", "")))
  return "\n".join(parts)


def _outputs(nb) -> list[str]:
  return [_cell_text(cell) for cell in nb.cells if cell.cell_type == "code"]


def _mesh_checks(text: str) -> None:
  assert "8 x cpu (cpu)" in text  # the kernel's 8 devices
  per_device = re.search(r"engram tables: .* row-sharded over (\d+) devices", text)
  assert per_device and per_device.group(1) == "8", text[-1500:]


def test_lm_quickstart(tmp_path):
  """Runs from an empty directory: the shipped configs resolve from the package."""
  config = os.path.join(ROOT, "tests", "lm_test_config.py")
  nb = _execute("lm_quickstart.ipynb", tmp_path, ENGRAM_COLAB_STEPS="3",
                ENGRAM_COLAB_CONFIG=config)
  install, train, plot, sample, mesh = _outputs(nb)
  assert "runtime: cpu" in install
  assert "step 3/3" in train and "final: step 3" in train  # progress lines, live
  assert re.search(r"tiny_baseline: eval loss \d", plot) and re.search(r"tiny: eval loss \d",
                                                                       plot)
  assert os.path.getsize(tmp_path / "loss_curves.png") > 1000
  # the notebook prints what the library samples from its run (same seed, same settings)
  from engram_jax import jobs
  texts = jobs.generate(str(tmp_path / "tiny"), "def ", num_samples=2, max_new_tokens=16,
                        temperature=0.8, top_k=40)
  assert len(texts) == 2 and any(texts)
  assert sample.splitlines() == [repr("def " + text) for text in texts]
  _mesh_checks(mesh)


def test_image_quickstart(tmp_path):
  nb = _execute("image_quickstart.ipynb", tmp_path, ENGRAM_COLAB_STEPS="3",
                ENGRAM_COLAB_OVERRIDES=json.dumps(IMAGE_TOY), ENGRAM_COLAB_SAMPLES="2",
                ENGRAM_COLAB_GATES="0,learned")  # one constant gate: the same code path
  install, train, samples, scores, probes, mesh = _outputs(nb)
  assert "final: step 3" in train
  for variant in ("digits", "digits_baseline"):
    assert os.path.getsize(tmp_path / f"{variant}_samples.png") > 200
    assert re.search(rf"{variant}: nll_bits_per_token \d.*fid \d", scores), scores
  assert "(60, 8, 8)" in samples  # 10 classes x 6 samples of 8x8 codes
  for probe in ("gate_clamp", "table"):
    for ext in ("md", "csv", "png"):
      assert (tmp_path / "digits" / "probes" / f"{probe}.{ext}").exists()
  assert "learned" in probes and "collapse" in probes  # both tables rendered
  _mesh_checks(mesh)


@pytest.mark.parametrize("name", ["lm_quickstart.ipynb", "image_quickstart.ipynb"])
def test_install_cell_on_a_fresh_runtime(name, tmp_path, monkeypatch):
  """The first cell with engram_jax missing: pip installs `engram_jax[EXTRA] @ SOURCE`
  from a wheel path or a git URL, the extra following the runtime; no source is one
  clear error. (subprocess.run is recorded, not run: nothing is downloaded.)"""
  import importlib.util
  import subprocess
  source = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4).cells[1].source
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: (
      None if mod == "engram_jax" and not calls else real_find_spec(mod, *a)))
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.delenv("ENGRAM_SOURCE", raising=False)
  monkeypatch.setenv("ENGRAM_COLAB_WORKDIR", str(tmp_path))
  wheel = tmp_path / "engram_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  exec(source.replace('ENGRAM_SOURCE = ""', f'ENGRAM_SOURCE = "{wheel}"'), {})
  assert calls[-1][-1] == f"engram_jax[train] @ {wheel.as_uri()}"  # CPU: no jax extra
  calls.clear()
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  exec(source.replace('ENGRAM_SOURCE = ""', 'ENGRAM_SOURCE = "git+https://example.org/e.git"'),
       {})
  assert calls[-1][-1] == "engram_jax[train,tpu] @ git+https://example.org/e.git"
  calls.clear()
  with pytest.raises(RuntimeError, match="set ENGRAM_SOURCE"):
    exec(source, {})
