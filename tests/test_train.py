"""Training: resume determinism, preemption, NaN stop, corrupt checkpoints, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

pytest.importorskip("clu")
pytest.importorskip("orbax.checkpoint")

from engram_jax import checkpoints, train  # noqa: E402

from tests import runs  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FLAG = "--config=tests/lm_test_config.py:tiny"


_config = runs.tiny_config
_losses = runs.train_losses
_steps = runs.checkpoint_steps


def _main(*args, **kwargs):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.Popen([sys.executable, "-m", "engram_jax.main", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


def test_resume_is_deterministic(tmp_path):
  one = str(tmp_path / "one")
  train.train_and_evaluate(_config(), one)
  two = str(tmp_path / "two")
  train.train_and_evaluate(_config(stop_after_steps=3), two)
  assert _steps(two) == [3]
  train.train_and_evaluate(_config(), two)
  assert _losses(one) == _losses(two) and len(_losses(one)) == 6


def test_runs_of_equal_settings_share_their_programs(tmp_path, monkeypatch):
  """A second run in the process (another seed) calls the jitted steps of the first: one
  traced program each, and the seed still reaches the init; other settings (a longer
  schedule) get their own."""
  cached, built = train.run_programs, []
  monkeypatch.setattr(train, "run_programs", lambda *a: built.append(cached(*a)) or built[-1])
  cached.cache_clear()
  first, seeded = str(tmp_path / "first"), str(tmp_path / "seeded")
  train.train_and_evaluate(_config(steps=2), first)
  other_seed = _config(steps=2)
  other_seed.seed += 1
  train.train_and_evaluate(other_seed, seeded)
  train.train_and_evaluate(_config(steps=3), first)  # resumes, with another schedule
  assert built[0] is built[1] and built[2] is not built[0]
  for fn in (built[0].init, built[0].train_step, built[0].eval_step):
    assert fn._cache_size() == 1, fn
  assert _losses(seeded)[1] != _losses(first)[1]
  assert len(_losses(first)) == 3


def test_host_and_in_graph_hashing_give_identical_losses(tmp_path):
  device = str(tmp_path / "device")
  host = str(tmp_path / "host")
  train.train_and_evaluate(_config(steps=4, host_hashing=False), device)
  train.train_and_evaluate(_config(steps=4, host_hashing=True), host)
  assert len(_losses(host)) == 4
  assert _losses(host) == _losses(device)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  import numpy as np
  import orbax.checkpoint as ocp
  workdir = str(tmp_path / "nan")
  train.train_and_evaluate(_config(steps=2), workdir)
  with pytest.raises(train.TrainingError, match=r"non-finite .* at step \d+") as err:
    train.train_and_evaluate(_config(steps=40, learning_rate=1e12,
                                     warmup_steps=0, checkpoint_every=1), workdir)
  steps = _steps(workdir)
  assert steps and f"at step {max(steps) + 1};" in str(err.value)
  # the newest kept checkpoint is the state before the bad step, and it is finite
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(max(steps)), "state"))
  assert int(state["step"]) == max(steps)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


@pytest.mark.parametrize("damage", ["torn", "flipped", "metadata"])
def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, capfd, monkeypatch,
                                                          damage):
  """Torn data files fail to read; bytes changed in place (sizes kept) read, as other
  values, and are caught by the digest the save recorded (they used to resume
  silently, with other losses; tests/test_state_digest.py checks the digest itself);
  a garbled `_METADATA` is named. With every checkpoint damaged the run stops with one
  line that says so, and moves nothing."""
  import gc
  unraisable = []  # what would reach stderr at some later garbage collection
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  workdir = str(tmp_path / "corrupt")
  train.train_and_evaluate(_config(steps=4, checkpoint_every=2), workdir)
  assert _steps(workdir) == [2, 4]
  data_dir = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  garble = lambda step: open(os.path.join(workdir, "checkpoints", str(step), "state",
                                          "_METADATA"), "w").write("garbage")
  if damage == "flipped":
    runs.overwrite_middle(data_dir)
  elif damage == "metadata":
    garble(4)
  else:
    for name in os.listdir(data_dir):
      with open(os.path.join(data_dir, name), "wb") as f:
        f.write(b"torn write")
  capfd.readouterr()
  train.train_and_evaluate(_config(steps=6, checkpoint_every=2), workdir)
  out, err = capfd.readouterr()
  assert "checkpoint 4 is unreadable" in out and "resumed from step 2" in out
  assert "bound method" not in out  # the storage error, not a wrapper's repr
  assert "Traceback" not in err and "unreadable" not in err, err  # one line, on stdout
  gc.collect()  # the failed read's abandoned coroutines: into the run's log, not stderr
  assert unraisable == [], [u.exc_value for u in unraisable][:3]
  assert _steps(workdir) == [2, 4, 6]
  kept = os.path.join(workdir, checkpoints.UNREADABLE_DIR, "4", "state", "ocdbt.process_0", "d")
  assert os.listdir(kept), "the unreadable checkpoint is moved aside, not deleted"
  if damage == "metadata":
    assert "checkpoints/4/state/_METADATA is not readable JSON" in out, out
    for step in (2, 4, 6):
      garble(step)
    with pytest.raises(ValueError, match=r"none of the checkpoints \[2, 4, 6\] .* restores "
                                         r"\(checkpoints/6/state/_METADATA is not readable "
                                         r"JSON .*\): damaged; move the checkpoints aside"):
      train.train_and_evaluate(_config(steps=8, checkpoint_every=2), workdir)
    assert _steps(workdir) == [2, 4, 6]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, capsys):
  workdir = str(tmp_path / "preempted")
  proc = _main(CONFIG_FLAG, f"--workdir={workdir}", "--config.train.steps=100000",
               "--config.train.checkpoint_every=100000")
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "checkpoint saved" in out
  (saved,) = _steps(workdir)
  capsys.readouterr()
  config = _config(steps=100000, checkpoint_every=100000, stop_after_steps=2)
  train.train_and_evaluate(config, workdir)
  assert f"resumed from step {saved}" in capsys.readouterr().out
  assert _steps(workdir)[-1] == saved + 2


def _bad_tokenizer(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text("{not json")
  return [f"--config.data.tokenizer_path={path}"], "data.tokenizer_path"


def _missing_tokenizer(tmp_path):
  return [f"--config.data.tokenizer_path={tmp_path / 'absent.json'}"], "data.tokenizer_path"


def _empty_corpus(tmp_path):
  (tmp_path / "empty").mkdir()
  return ["--config.data.source=files",
          f"--config.data.files_glob={tmp_path / 'empty'}/*.txt"], "data.files_glob"


def _unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  return [f"--workdir={blocker / 'run'}"], "--workdir"


def _bad_model_field(tmp_path):
  return ["--config.model.engram.layers=0,7"], "engram.layers"


def _unknown_override(tmp_path):
  del tmp_path
  return ["--config.data.tfds_val_splt=validation"], "--config.data.tfds_val_splt"


def _mistyped_override(tmp_path):
  del tmp_path
  return ["--config.train.steps=many"], "--config.train.steps"


@pytest.mark.parametrize("case", [_bad_tokenizer, _missing_tokenizer, _empty_corpus,
                                  _unwritable_workdir, _bad_model_field,
                                  _unknown_override, _mistyped_override],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_error(tmp_path, case, capfd):
  from tests.cli import run_main
  args, field = case(tmp_path)
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'w'}")
  code, _, err = run_main(capfd, CONFIG_FLAG, *args)
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and field in lines[0], err
  assert "Traceback" not in err


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single"))
  train.train_and_evaluate(_config(steps=3), workdir)
  return _losses(workdir)


@pytest.mark.parametrize("lookup", ["gather", "psum", "all_to_all"])
def test_sharded_training_matches_single_device(tmp_path, single_device_losses, lookup):
  """8 simulated devices (data 2 x fsdp 2 x tensor 2), tables row-sharded over all."""
  config = _config(steps=3)
  config.mesh.update(num_devices=8, data=2, fsdp=2, tensor=2)
  config.model.engram.lookup = lookup
  workdir = str(tmp_path / lookup)
  train.train_and_evaluate(config, workdir)
  sharded = _losses(workdir)
  assert sharded.keys() == single_device_losses.keys()
  for step, loss in single_device_losses.items():
    assert sharded[step] == pytest.approx(loss, rel=2e-5), step


def _image_config(steps=4, **train_overrides):
  from configs import image as image_configs
  c = image_configs.get_config("digits")
  c.model.update(width=32, depth=2, num_heads=2, num_kv_heads=2)
  c.model.engram.update(layers=(1,), heads=2, embed_per_ngram=16, table_size=(61,))
  c.data.update(batch_size=8)
  c.train.update(steps=steps, warmup_steps=1, log_every=1, eval_every=steps,
                 eval_batches=1, checkpoint_every=100)
  c.train.update(train_overrides)
  c.mesh.update(num_devices=1)
  return c


def test_image_task_trains_resumes_and_saves_its_config(tmp_path):
  """The same loop trains the class-conditional image model (configs/image.py)."""
  import ml_collections
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  metrics = train.train_and_evaluate(_image_config(), one)
  assert "eval_bits_per_token" in metrics and "eval_bits_per_byte" not in metrics
  train.train_and_evaluate(_image_config(stop_after_steps=2), two)
  train.train_and_evaluate(_image_config(), two)
  assert _losses(one) == _losses(two) and len(_losses(one)) == 4
  with open(os.path.join(one, "config.json")) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  assert saved.task == "image" and saved.model.engram.table_size == [61]


def test_checkpoints_of_another_layout_stop_instead_of_restarting(tmp_path, capfd):
  import gc
  workdir = str(tmp_path / "other_layout")
  train.train_and_evaluate(_config(steps=2), workdir)
  wider = _config(steps=4)
  wider.model.width = 64  # a different state layout: nothing restores
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  capfd.readouterr()
  with pytest.raises(ValueError, match=r"another model config \(model.width: 32 -> 64\)"):
    train.train_and_evaluate(wider, workdir)
  gc.collect()  # orbax's abandoned read tasks: reported into the run's log, not stderr
  assert "never retrieved" not in capfd.readouterr().err
  assert _steps(workdir) == [2], "the checkpoints stay where they are"
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved, "a failed resume leaves the run's metadata alone"
