"""The Colab notebooks run top to bottom (nbclient) at toy size, already installed."""
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(name, tmp_path, **env):
  os.environ.update({"ENGRAM_COLAB_SKIP_INSTALL": "1", "ENGRAM_REPO": ROOT,
                     "ENGRAM_COLAB_WORKDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
                     **env})
  try:
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
  finally:
    for key in ("ENGRAM_COLAB_SKIP_INSTALL", "ENGRAM_REPO", "ENGRAM_COLAB_WORKDIR",
                *env):
      os.environ.pop(key, None)
  return nb


def _outputs(nb) -> str:
  return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))


def test_lm_quickstart(tmp_path):
  nb = _execute("lm_quickstart.ipynb", tmp_path, ENGRAM_COLAB_STEPS="3",
                ENGRAM_COLAB_CONFIG="tests/lm_test_config.py")
  text = _outputs(nb)
  assert "tiny_baseline: eval loss" in text and "tiny: eval loss" in text
  assert os.path.getsize(tmp_path / "loss_curves.png") > 1000
  assert text.count("'def ") == 2  # two samples continue the prompt


def test_image_quickstart(tmp_path):
  toy = ("--config.model.width=32 --config.model.depth=3 --config.model.num_heads=2 "
         "--config.model.num_kv_heads=2 --config.model.engram.table_size=61 "
         "--config.mesh.num_devices=1")
  nb = _execute("image_quickstart.ipynb", tmp_path, ENGRAM_COLAB_STEPS="3",
                ENGRAM_COLAB_EXTRA=toy, ENGRAM_COLAB_SAMPLES="0")
  text = _outputs(nb)
  assert "digits final: step 3" in text and "digits_baseline final: step 3" in text
  for name in ("digits_samples.png", "digits_baseline_samples.png"):
    assert os.path.getsize(tmp_path / name) > 200
  assert "| gate" in text or "gate" in text.lower()
  for probe in ("gate_clamp", "table"):
    for ext in ("md", "csv", "png"):
      assert (tmp_path / "digits" / "probes" / f"{probe}.{ext}").exists()
