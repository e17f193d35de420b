"""bench/accelerator_check.py: `--smoke` writes every section; bare-image imports."""
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
NOT_ON_A_BARE_GPU_IMAGE = ("grain", "clu", "ml_collections")


def test_smoke_writes_every_section(tmp_path):
  saved = list(sys.path)
  sys.path.insert(0, BENCH)
  try:
    import accelerator_check
  finally:
    sys.path[:] = saved  # bench/ holds modules (moe, decode, ...) no test should see
  out = str(tmp_path / "acc")
  report = accelerator_check.main(["--smoke", f"--out={out}"])
  with open(out + ".json") as f:
    saved = json.load(f)
  for section in accelerator_check.SECTIONS:
    assert section in saved and saved[section], section
  assert saved["train_mfu"]["model_flops_per_step"] > 0
  assert set(saved["decode"]["per_batch"]) == {"1", "2"}
  assert saved["offload"].get("same_tokens", True)
  assert "| gather |" in open(out + ".md").read()
  assert report["gather"]["gather_gbps"] > 0


def test_imports_without_grain_clu_ml_collections():
  """What the script imports must load on an image without the training extras."""
  code = ("import sys\n"
          f"for m in {NOT_ON_A_BARE_GPU_IMAGE!r}: sys.modules[m] = None\n"
          f"sys.path.insert(0, {BENCH!r})\n"
          "import accelerator_check\n"
          "from engram_jax.sampling import offload\n"
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          f"{NOT_ON_A_BARE_GPU_IMAGE!r} and sys.modules[m] is not None]\n"
          "assert not bad, bad\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
