"""Two processes on 127.0.0.1 train as one job, checkpoint, stop, resume, and match one process.

`launch/multiprocess_cpu.sh 2 ...` starts two `engram_jax.main` processes (2 simulated
CPU devices each, gloo collectives), so the mesh has 4 devices over 2 processes. The
reference is one process on a 4-device mesh fed the same global batches: each
process reads its own share of the train rows, so the reference's iterator joins the
two processes' iterators (process 0's rows first, as on the mesh).
"""
import json
import re
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("clu")
pytest.importorskip("orbax.checkpoint")

from engram_jax import sizing, train  # noqa: E402

from tests import lm_test_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "multiprocess_cpu.sh")
STEPS = 4
# Row-sparse tables (engram_jax.tables): their per-row state is saved by both processes
# and the sparse update runs on the 2x2 mesh; dense Adam is covered on one process.
TABLE_OPTIMIZER = "lazy_adam"
RUN_TIMEOUT_S = 420  # per launch: import, tokenizer, compile and 2 steps on a busy 2-core CPU


def _worker_xla_flags() -> str:
  """The pytest process's XLA flags without its 8 devices (the script sets the workers')."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if "xla_force_host_platform_device_count" not in f)


def _launch(workdir, *overrides):
  """Runs the launch script to completion; its process group is killed on timeout."""
  env = {**os.environ, "DEVICES_PER_PROCESS": "2", "TIMEOUT": str(RUN_TIMEOUT_S - 20),
         "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHON": sys.executable}
  env["XLA_FLAGS"] = _worker_xla_flags()
  proc = subprocess.Popen(
      ["bash", SCRIPT, "2", "tests/lm_test_config.py:tiny", workdir,
       f"--config.train.steps={STEPS}", f"--config.train.eval_every={STEPS}",
       f"--config.train.table_optimizer={TABLE_OPTIMIZER}", *overrides],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"two-process run exceeded {RUN_TIMEOUT_S}s:\n{out[-4000:]}")
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, out[-4000:]
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _process_log(workdir, i):
  with open(os.path.join(workdir, "logs", f"process_{i}.log")) as f:
    return f.read()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Steps 1-2 with the tables row-sharded over both processes' devices, stop
  (checkpoint), then steps 3-4 resumed with `engram.placement=host`: the tables move
  from the devices to a full replica in each process's host memory. Two launches of 2
  processes cover sharded tables, resume, the placement switch and host replicas."""
  workdir = str(tmp_path_factory.mktemp("two_process"))
  _launch(workdir, "--config.train.stop_after_steps=2")
  first = [_process_log(workdir, i) for i in range(2)]
  _launch(workdir, "--config.model.engram.placement=host",
          "--config.train.host_tables_mode=exact")
  second = [_process_log(workdir, i) for i in range(2)]
  return workdir, first, second


class _Joined:
  """One iterator yielding the per-process batches of several processes, concatenated."""

  def __init__(self, parts):
    self._parts = parts

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(p) for p in self._parts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return self._parts[0].get_state()

  def set_state(self, state):
    for p in self._parts:
      p.set_state(state)

  def close(self):
    for p in self._parts:
      p.close()


@pytest.fixture(scope="module")
def one_process_metrics(tmp_path_factory):
  """One process, a 4-device mesh, the two processes' global batches."""
  from engram_jax.data import text
  real = text.train_iterator

  def joined(cfg, tok, *, process_index=0, process_count=1, **kwargs):
    del process_index, process_count
    return _Joined([real(cfg, tok, process_index=i, process_count=2, **kwargs)
                    for i in range(2)])

  workdir = str(tmp_path_factory.mktemp("one_process"))
  config = lm_test_config.get_config("tiny")
  config.train.update(steps=STEPS, eval_every=STEPS, table_optimizer=TABLE_OPTIMIZER)
  config.mesh.update(num_devices=4)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(text, "train_iterator", joined)
    train.train_and_evaluate(config, workdir)
  return _metrics(workdir)


def test_two_processes_checkpoint_and_resume(two_process_run):
  workdir, first, second = two_process_run
  for i in range(2):
    assert "stopped at step 2; checkpoint saved" in first[i], first[i][-2000:]
    assert "resumed from step 2" in second[i], second[i][-2000:]
    assert "moved the tables of checkpoint 2 from device to host memory" in second[i]
    assert f"final: step {STEPS}" in second[i], second[i][-2000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert steps == [2, STEPS]
  # checkpoint 2's tables are row-sharded over both processes' devices: each process
  # writes its own rows (the small replicated arrays are written whole by process 0)
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  # every process's data state is in the checkpoint (orbax writes JSON from process 0)
  data_file = os.path.join(workdir, "checkpoints", str(STEPS), "data", "metadata")
  with open(data_file) as f:
    saved = json.load(f)
  assert [p["batches"] for p in saved["processes"]] == [STEPS, STEPS]
  assert saved["processes"][0]["fingerprint"] == saved["processes"][1]["fingerprint"]
  # metrics are written once, by process 0
  train_steps = [r["step"] for r in _metrics(workdir) if "train_loss" in r]
  assert train_steps == list(range(1, STEPS + 1))


def test_two_processes_match_one_process(two_process_run, one_process_metrics):
  """Exact host tables (`host_tables_mode=exact`) train as device tables do, so the
  switch changes no loss."""
  workdir, _, _ = two_process_run
  got, want = _metrics(workdir), one_process_metrics
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for g, w in zip(got, want):
    assert g["step"] == w["step"]
    for key in w:
      assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["step"], key)


def test_two_processes_keep_identical_host_table_replicas(two_process_run):
  """After the switch to host tables each process holds a full replica and applies the
  same (globally deduplicated) row updates, so the replicas end bit-identical."""
  _, _, second = two_process_run
  digests = [re.search(r"host tables of process \d: sha256 (\w+)", log) for log in second]
  assert all(digests), [log[-2000:] for log in second]
  assert digests[0].group(1) == digests[1].group(1)


# ----------------------------------------------------------------------------------
# Distributed flags and the launch scripts (no second process needed)
# ----------------------------------------------------------------------------------
def test_init_distributed_is_a_no_op_for_one_process(monkeypatch):
  from engram_jax import main
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  assert main.init_distributed("auto") == 1
  assert main.init_distributed("on", num_processes=1) == 1
  assert main.init_distributed("off", "127.0.0.1:1234", 2, 0) == 1
  with pytest.raises(ValueError, match="--process_id=5"):
    main.init_distributed("auto", "127.0.0.1:1234", 2, 5)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    main.init_distributed("auto")


def test_a_coordinator_port_in_use_is_one_line_before_jax_starts(monkeypatch):
  """Process 0 on a port something listens on: jax's RPC server failed inside C++ (a
  segmentation fault, or a traceback); the port is checked first. No jax call is
  made, so this runs in-process."""
  import socket

  import jax

  from engram_jax import main
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(a))
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ValueError, match=rf"port {port} is in use on this host .*choose "
                                         r"another port for every process"):
      main.init_distributed("on", f"127.0.0.1:{port}", 2, 0)
  assert not called


def test_missing_coordinator_is_a_one_line_error(tmp_path):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    env.pop(name, None)
  proc = subprocess.run(
      [sys.executable, "-m", "engram_jax.main", "--config=tests/lm_test_config.py:tiny",
       f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--coordinator_address" in errors[0], proc.stderr[-2000:]


def test_multiprocess_script_fails_when_a_process_fails(tmp_path):
  env = {**os.environ, "TIMEOUT": "240", "TF_CPP_MIN_LOG_LEVEL": "2",
         "XLA_FLAGS": _worker_xla_flags(), "PYTHON": sys.executable}  # not the PATH's python
  proc = subprocess.run(
      ["bash", SCRIPT, "2", "tests/lm_test_config.py:tiny", str(tmp_path),
       "--config.model.engram.layers=0,7"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      start_new_session=True)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "engram.layers" in proc.stdout and "exited with status 2" in proc.stderr
  usage = subprocess.run(["bash", SCRIPT, "two", "c", str(tmp_path)], capture_output=True,
                         text=True, timeout=30)
  assert usage.returncode == 2 and "N=two" in usage.stderr


def _dry_run(script, *args, **env):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args],
                        env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True,
                        text=True, timeout=60)


def test_launch_scripts_parse_and_dry_run():
  for script in ("multiprocess_cpu.sh", "gpu_local.sh", "tpu_pod.sh"):
    check = subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, (script, check.stderr)

  tpu = _dry_run("tpu_pod.sh", "configs/lm.py:paper_dense_v5p", "gs://bkt/runs/a",
                 "--config.train.steps=10", "--config.data.files_glob=/data/my corpus/*.txt",
                 TPU_NAME="engram-pod", ZONE="us-east5-a", PROJECT="proj")
  assert tpu.returncode == 0, tpu.stderr
  lines = [l for l in tpu.stdout.splitlines() if l.startswith("gcloud ")]
  assert lines[0].startswith("gcloud compute tpus tpu-vm describe engram-pod --zone=us-east5-a "
                             "--project=proj")
  assert lines[1] == ("gcloud compute tpus tpu-vm create engram-pod --zone=us-east5-a "
                      "--project=proj --accelerator-type=v5p-128 --version=v2-alpha-tpuv5")
  assert " scp " in lines[2] and lines[2].endswith("--worker=all")
  assert all("--worker=all" in l for l in lines[3:]) and len(lines) == 6
  assert 'pip install -q -e ".[tpu,train]"' in lines[3]
  assert "gcsfuse" in lines[4] and "bkt /mnt/gcs/bkt" in lines[4]
  assert ("python -m engram_jax.main --config=configs/lm.py:paper_dense_v5p "
          "--workdir=/mnt/gcs/bkt/runs/a --distributed=on --config.train.steps=10 "
          "'\\''--config.data.files_glob=/data/my corpus/*.txt'\\''") in lines[5]

  native = _dry_run("tpu_pod.sh", "configs/lm.py:tiny", "gs://bkt/runs/a/", TPU_NAME="t",
                    ZONE="z", GCSFUSE="0")
  assert native.returncode == 0 and "gcsfuse" not in native.stdout, native.stderr
  assert "--workdir=gs://bkt/runs/a --distributed=on" in native.stdout

  local = _dry_run("tpu_pod.sh", "configs/lm.py:tiny", "/tmp/run", TPU_NAME="t", ZONE="z")
  assert local.returncode == 2 and "WORKDIR=/tmp/run" in local.stderr
  unnamed = _dry_run("tpu_pod.sh", "configs/lm.py:tiny", "gs://b/r", ZONE="z")
  assert unnamed.returncode != 0 and "TPU_NAME" in unnamed.stderr

  gpu = _dry_run("gpu_local.sh", "configs/lm.py:paper_dense_8gpu", "/tmp/run",
                 "--config.train.steps=10")
  assert gpu.returncode == 0, gpu.stderr
  assert "JAX_PLATFORMS=cuda" in gpu.stdout and "--distributed=off" in gpu.stdout
  assert "--config=configs/lm.py:paper_dense_8gpu --workdir=/tmp/run" in gpu.stdout


def test_paper_scale_configs_size_on_an_abstract_mesh():
  """The paper layout's tables split over all 64 chips of a v5p-128 (docs/scale_out.md)."""
  sys.path.insert(0, ROOT)
  from configs import lm
  report = sizing.dry_run_report(lm.get_config("paper_dense_v5p"))
  assert "Engram layers [1, 14], lookup 'psum'" in report
  assert "engram_tables       5,632,737,280 params" in report
  assert "(64 devices)" in report and "(Engram tables 0.328 GiB)" in report
