"""Cached decoding equals the full forward (Engram at two layers, ragged prompts); the CLI."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from engram_jax import library_log
from engram_jax import generate as generate_cli
from engram_jax import workdir as workdir_lib
from engram_jax.sampling import text as generate
from engram_jax.models.lm import EngramLM

from tests.equivalence import assert_cached_equals_full
from tests.conftest import tiny_model_config, with_random_conv

CFG = tiny_model_config()


def test_prefill_plus_cached_decode_equals_full_forward():
  rng = np.random.default_rng(0)
  seq = rng.integers(0, CFG.vocab_size, (3, 30)).astype(np.int32)
  lengths = np.array([4, 11, 7], np.int32)
  model = EngramLM(CFG)
  params = with_random_conv(nn.unbox(model.init(jax.random.key(0), seq))["params"], CFG)
  full = model.apply({"params": params}, seq)
  assert_cached_equals_full(model, params, seq, lengths, full, 11, 30 - int(lengths.max()))


def _params_with_conv(model, seq):
  return with_random_conv(nn.unbox(model.init(jax.random.key(0), seq))["params"], CFG)


def test_greedy_equals_full_forward_argmax_loop():
  model = EngramLM(CFG)
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
  lengths = np.array([5, 9], np.int32)
  params = _params_with_conv(model, prompt)
  new = 12
  run = jax.jit(generate.generate, static_argnums=0,
                static_argnames=("max_new_tokens", "temperature"))
  got = run(model, params, prompt, lengths, jax.random.key(0), max_new_tokens=new,
            temperature=0.0)
  compiled = run._cache_size()  # jit's cache of `generate` also holds other tests' models
  # other prompts and lengths in the same (batch, bucket, max_new_tokens): no recompile
  run(model, params, prompt[::-1], np.array([9, 2], np.int32), jax.random.key(1),
      max_new_tokens=new, temperature=0.0)
  assert run._cache_size() == compiled
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  for b in range(2):
    seq = np.zeros((1, CFG.max_len), np.int32)  # fixed buffer: one compile; causal model
    seq[0, :lengths[b]] = prompt[b, :lengths[b]]
    for i in range(new):
      pos = lengths[b] + i
      seq[0, pos] = int(np.argmax(forward(seq)[0, pos - 1]))
    np.testing.assert_array_equal(np.asarray(got[b]), seq[0, lengths[b]:lengths[b] + new])


def test_prompt_buckets_are_powers_of_two_within_the_context():
  assert [generate.prompt_bucket(n, 8, 128) for n in (1, 8, 9, 16, 17, 100)] == [
      8, 8, 16, 16, 32, 120]


def test_top_k_top_p_stay_in_the_allowed_set():
  logits = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2, np.float32))
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_k=2)))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws)) == {0, 1}
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_p=0.85)))(
      jax.random.split(jax.random.key(1), 400))
  assert set(np.unique(draws)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 needs the third
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0, top_p=0.45)))(
      jax.random.split(jax.random.key(2), 200))
  assert set(np.unique(draws)) == {0}
  # rows are independent streams: two identical rows do not always draw the same token
  draws = jax.jit(jax.vmap(lambda k: generate.sample(logits, k, 1.0)))(
      jax.random.split(jax.random.key(3), 200))
  assert np.any(draws[:, 0] != draws[:, 1])


def test_eos_rows_pad_and_length_check():
  model = EngramLM(CFG)
  prompt = np.ones((2, 4), np.int32)
  params = _params_with_conv(model, prompt)
  lengths = np.array([4, 4], np.int32)
  greedy = generate.generate(model, params, prompt, lengths, jax.random.key(0),
                             max_new_tokens=6, temperature=0.0)
  eos = int(greedy[0, 1])
  out = np.asarray(generate.generate(model, params, prompt, lengths, jax.random.key(0),
                                     max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=-1))
  first = int(np.argmax(out[0] == eos))
  assert (out[0, first + 1:] == -1).all() and (out[0, :first + 1] == greedy[0, :first + 1]).all()
  with pytest.raises(ValueError, match="model.max_len=48"):
    generate.generate(model, params, prompt, lengths, jax.random.key(0), max_new_tokens=45)


# ----------------------------------------------------------------------------------
# The command line: a workdir trained for a few steps (conftest.trained_workdir)
# ----------------------------------------------------------------------------------
def test_cli_samples_from_the_newest_checkpoint(trained_workdir, capsys):
  args = [f"--workdir={trained_workdir}", "--prompt=def ", "--max_new_tokens=8"]
  assert generate_cli.main(args + ["--temperature=0", "--num_samples=2"]) == 0
  out = capsys.readouterr().out
  assert "step 3" in out
  samples = out.split("--- sample ")[1:]
  assert len(samples) == 2 and samples[0][1:] == samples[1][1:]  # greedy rows agree
  assert all(s.split("\n", 1)[1].startswith("def ") for s in samples)
  # the CLI's greedy text is what the library's generate() gives for the same prompt
  run = workdir_lib.load(trained_workdir)
  tok = run.tokenizer
  ids = tok.encode("def ", add_special_tokens=False).ids
  new = generate.generate(run.model, run.variables, np.array([ids], np.int32),
                          np.array([len(ids)], np.int32), jax.random.key(0),
                          max_new_tokens=8, temperature=0.0, vocab_map_V=run.vocab_map)
  from engram_jax import tokenizer as tokenizer_lib
  row = [int(t) for t in new[0]]
  eos = tokenizer_lib.eos_id(tok)
  row = row[:row.index(eos)] if eos in row else row
  assert samples[0].split("\n", 1)[1].rstrip("\n") == "def " + tok.decode(row)
  assert generate_cli.main(args + ["--temperature=1", "--top_k=5", "--seed=1"]) == 0


def test_cli_errors_name_the_flag(trained_workdir, tmp_path, capsys):
  assert generate_cli.main([f"--workdir={tmp_path}"]) == 2
  assert "has no config.json" in capsys.readouterr().err
  import shutil
  empty = tmp_path / "no_ckpt"
  empty.mkdir()
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(trained_workdir, name), empty / name)
  assert generate_cli.main([f"--workdir={empty}"]) == 2
  assert "has no checkpoint" in capsys.readouterr().err
  torn = tmp_path / "torn_tokenizer"
  shutil.copytree(trained_workdir, torn)
  (torn / "tokenizer.json").write_text((torn / "tokenizer.json").read_text()[:500])
  assert generate_cli.main([f"--workdir={torn}"]) == 2
  err = capsys.readouterr().err  # the run's own tokenizer: not a field the user set
  assert "cannot load tokenizer" in err and "restore it from a copy" in err, err
  assert "data.tokenizer_path" not in err
  long_prompt = "x " * 40
  assert generate_cli.main([f"--workdir={trained_workdir}", f"--prompt={long_prompt}",
                        "--max_new_tokens=8"]) == 2
  assert "model.max_len=32" in capsys.readouterr().err
  assert generate_cli.main([f"--workdir={trained_workdir}", "--top_p=0"]) == 2
  assert "--top_p" in capsys.readouterr().err
  # bytes a shell passes through that are not UTF-8 arrive as lone surrogates
  assert generate_cli.main([f"--workdir={trained_workdir}", "--prompt=\udcff\udcfe x"]) == 2
  assert capsys.readouterr().err == ("error: --prompt holds bytes that are not UTF-8 text; "
                                     "give the prompt as UTF-8\n")


@pytest.mark.parametrize("flag, value", [
    ("temperature", "nan"), ("temperature", "inf"), ("temperature", "-0.5"),
    ("top_k", "-1"), ("top_p", "0.0"), ("top_p", "nan")])
def test_cli_sampling_error_names_only_the_bad_flag(tmp_path, capsys, flag, value):
  assert generate_cli.main([f"--workdir={tmp_path}", f"--{flag}={value}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"error: --{flag}={value}: use ")
  others = {"--temperature", "--top_k", "--top_p", "--cfg_scale"} - {f"--{flag}"}
  assert not any(other in err for other in others), err


def test_image_sampling_settings_are_checked_one_flag_at_a_time():
  good = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
  generate.check_sampling(good)
  with pytest.raises(ValueError, match=r"^--cfg_scale=nan: use a finite number >= 0"):
    generate.check_sampling({**good, "cfg_scale": float("nan")})


def test_cli_help_lists_image_flags_and_defaults(trained_workdir, tmp_path, capsys):
  with pytest.raises(SystemExit):
    generate_cli.main(["--help"])
  help_text = capsys.readouterr().out
  assert "--classes" in help_text and "--cfg_scale" in help_text
  assert "image workdirs" in help_text and "(default: 64)" in help_text
  assert generate_cli.main([f"--workdir={trained_workdir}", "--classes=1"]) == 2
  assert "only for image workdirs" in capsys.readouterr().err  # an LM run
  assert generate_cli.main([f"--workdir={tmp_path}", "--classes=1"]) == 2
  assert "has no config.json" in capsys.readouterr().err  # no run at all: said first


def _copy_workdir(trained_workdir, target):
  import shutil
  shutil.copytree(trained_workdir, target)
  return str(target)


@pytest.mark.parametrize("tear,names", [
    ("data", ""), ("metadata", "checkpoints/5/state/_METADATA is not readable JSON"),
    ("manifest", ""), ("changed", "does not hold the values that were saved"),
    ("data_item", "checkpoints/5/data/ is missing")])
def test_corrupt_latest_checkpoint_is_one_warning_line(trained_workdir, tmp_path, capfd, tear,
                                                       names):
  """Torn data files, a garbled `_METADATA`, a lost manifest, a lost `data` item (the
  digest to check): the newest checkpoint is skipped with one line naming the damage.
  (The middle two read as arrays gone missing, which once blamed config.json instead
  of falling back; without its `data` item a checkpoint was once read unchecked.)"""
  workdir = _copy_workdir(trained_workdir, tmp_path / "corrupt")
  ckpts = os.path.join(workdir, "checkpoints")
  import shutil
  shutil.copytree(os.path.join(ckpts, "3"), os.path.join(ckpts, "5"))
  state = os.path.join(ckpts, "5", "state")
  if tear == "data":
    data_dir = os.path.join(state, "ocdbt.process_0", "d")
    for name in os.listdir(data_dir):
      with open(os.path.join(data_dir, name), "wb") as f:
        f.write(b"torn write")
  elif tear == "changed":  # it reads, but a params array is not what was saved (which
    # bytes of the files hold params varies with the async writes: its digest, then)
    import json
    path = os.path.join(ckpts, "5", "data", "metadata")
    with open(path) as f:
      data = json.load(f)
    name = next(n for n in data["state_digest"] if n.startswith("params/"))
    data["state_digest"][name][0] = (data["state_digest"][name][0] + 1) % 2**32
    with open(path, "w") as f:
      json.dump(data, f)
  elif tear == "metadata":
    with open(os.path.join(state, "_METADATA"), "w") as f:
      f.write("garbage")
  elif tear == "data_item":
    shutil.rmtree(os.path.join(ckpts, "5", "data"))
  else:
    os.remove(os.path.join(state, "manifest.ocdbt"))
  log = os.path.join(workdir, library_log.LOG_FILE)
  logged = _read_or_none(log) or b""
  capfd.readouterr()
  step = workdir_lib.load(workdir).step
  err = capfd.readouterr().err
  assert step == 3
  assert err.startswith("warning: checkpoint 5 is unreadable (") and err.endswith(
      "); using checkpoint 3\n"), err
  assert names in err, err
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  # the libraries' account of the failed read is appended to the run's log
  now = _read_or_none(log)
  assert now.startswith(logged) and len(now) > len(logged)


def test_every_checkpoint_damaged_names_the_damage_not_the_config(trained_workdir,
                                                                  tmp_path):
  """A garbled `_METADATA` reads as arrays gone missing: with every checkpoint so, the
  error once said config.json did not match; it names the damaged files."""
  from engram_jax import checkpoints
  workdir = _copy_workdir(trained_workdir, tmp_path / "garbled")
  steps = checkpoints.saved_steps(workdir)
  for step in steps:
    with open(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"), "w") as f:
      f.write("garbage")
  with pytest.raises(ValueError, match=rf"no readable checkpoint \(step {steps[-1]}: "
                                       rf"checkpoints/{steps[-1]}/state/_METADATA is not "
                                       r"readable JSON .*restore the damaged files"):
    workdir_lib.load(workdir)


def test_a_failing_digest_check_is_raised_not_taken_for_damage(trained_workdir, monkeypatch):
  """An error of the check itself (out of memory, a bug) is not a damaged checkpoint:
  the reader raises it rather than skipping good checkpoints one by one."""
  from engram_jax import state_digest

  def broken(tree, saved):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
  monkeypatch.setattr(state_digest, "first_mismatch", broken)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    workdir_lib.load(trained_workdir)


def test_a_checkpoint_replaced_while_read_sends_the_reader_to_the_new_one(
    trained_workdir, tmp_path, monkeypatch, capfd):
  """A trainer keeping one checkpoint saves 7 and deletes 3 while a reader restores 3:
  the reader lists the checkpoints again and reads 7 (it reported no readable one)."""
  from engram_jax import checkpoints
  workdir = _copy_workdir(trained_workdir, tmp_path / "live")
  ckpts = os.path.join(workdir, "checkpoints")
  real_restore_step, calls = checkpoints._restore_step, []

  def trainer_moves_on(workdir_, step, items):
    calls.append(step)
    if len(calls) == 1:
      os.rename(os.path.join(ckpts, str(step)), os.path.join(ckpts, "7"))
    return real_restore_step(workdir_, step, items)
  monkeypatch.setattr(checkpoints, "_restore_step", trainer_moves_on)
  assert workdir_lib.load(workdir).step == 7 and calls == [3, 7]


def test_a_checkpoint_half_deleted_while_read_is_not_called_damaged(trained_workdir,
                                                                   tmp_path, monkeypatch,
                                                                   capfd):
  """A trainer keeping one checkpoint deletes 5 while a reader restores it (its `state`
  item already gone, the directory not yet) and saves 7: the reader waits for the
  listing to settle and reads 7, with no warning (it once said 5 was damaged and told
  the user to restore files from a copy); a listing that never settles is one line
  saying so."""
  import shutil

  from engram_jax import checkpoints
  workdir = _copy_workdir(trained_workdir, tmp_path / "live")
  ckpts = os.path.join(workdir, "checkpoints")
  spare = str(tmp_path / "spare")
  shutil.copytree(os.path.join(ckpts, "3"), spare)
  os.rename(os.path.join(ckpts, "3"), os.path.join(ckpts, "5"))
  real_restore_step, saves = checkpoints._restore_step, [7]

  def deleted_while_read(workdir_, step, items):
    shutil.rmtree(os.path.join(ckpts, str(step), "state"))
    return real_restore_step(workdir_, step, items)

  def trainer_saves_and_deletes(seconds):
    for name in os.listdir(ckpts):
      shutil.rmtree(os.path.join(ckpts, name))
    shutil.copytree(spare, os.path.join(ckpts, str(saves[-1])))
    saves.append(saves[-1] + 2)  # saves[-2]: the newest saved
  monkeypatch.setattr(checkpoints, "_restore_step", deleted_while_read)
  monkeypatch.setattr(checkpoints.time, "sleep", trainer_saves_and_deletes)
  capfd.readouterr()
  with pytest.raises(ValueError, match=r"changed while they were read, 8 times .*run the "
                                       r"command again"):
    workdir_lib.load(workdir)  # every read meets a deletion
  monkeypatch.setattr(checkpoints, "_restore_step", real_restore_step)
  os.rename(os.path.join(ckpts, str(saves[-2])), os.path.join(ckpts, "5"))
  calls = []

  def once(workdir_, step, items):
    calls.append(step)
    return (deleted_while_read if len(calls) == 1 else real_restore_step)(workdir_, step,
                                                                          items)
  monkeypatch.setattr(checkpoints, "_restore_step", once)
  assert workdir_lib.load(workdir).step == saves[-2] and calls == [5, saves[-2]]
  assert capfd.readouterr().err == ""


def _read_or_none(path):
  return open(path, "rb").read() if os.path.exists(path) else None


def test_loading_a_run_leaves_its_files_as_they_were(trained_workdir):
  """A read-only command (sampling, evaluation, probes, analyses) writes nothing into
  the run it reads, not even the libraries' chatter of a restore that went well."""
  def snapshot():
    return {os.path.join(d, f): _read_or_none(os.path.join(d, f))
            for d, _, files in os.walk(trained_workdir) for f in files}
  before = snapshot()
  workdir_lib.load(trained_workdir)
  workdir_lib.load(trained_workdir, tables="host")
  assert snapshot() == before


def test_config_that_does_not_fit_the_checkpoint_is_one_error_line(trained_workdir,
                                                                    tmp_path, capfd):
  import json
  workdir = _copy_workdir(trained_workdir, tmp_path / "edited")
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  saved["resolved_model"]["model"]["width"] *= 2
  with open(path, "w", encoding="utf-8") as f:
    json.dump(saved, f)
  capfd.readouterr()
  assert generate_cli.main([f"--workdir={workdir}"]) == 2
  err = capfd.readouterr().err
  assert "config.json does not match checkpoint 3" in err, err
  assert "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("lookup", ["psum"])  # gather under sharding: test_train, test_sharding
def test_generation_with_sharded_params_equals_unsharded(lookup):
  """Params laid out over 8 devices by the rules (tables row-sharded): same tokens."""
  import dataclasses
  from engram_jax import sharding
  cfg = dataclasses.replace(CFG, engram=dataclasses.replace(CFG.engram, lookup=lookup))
  model = EngramLM(cfg)
  prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  lengths = np.array([5, 8], np.int32)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  run = jax.jit(generate.generate, static_argnums=0,
                static_argnames=("max_new_tokens", "temperature"))
  with sharding.use_mesh(mesh):
    boxed = jax.eval_shape(model.init, jax.random.key(0), prompt)["params"]
    params = _params_with_conv(EngramLM(CFG), prompt)  # gather-initialised, same values
    params = jax.device_put(params, sharding.state_shardings(boxed, mesh))
    table = params["block_1"]["engram"]["table"]
    assert len({s.device for s in table.addressable_shards}) == 8
    assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 8
    sharded = run(model, params, prompt, lengths, jax.random.key(0), max_new_tokens=6,
                  temperature=0.0)
  plain = run(EngramLM(CFG), jax.device_get(params), prompt, lengths, jax.random.key(0),
              max_new_tokens=6, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(plain))


def test_jobs_generate_takes_numpy_numbers(trained_workdir):
  """A notebook's loop over np.arange: the keyword checks must not refuse NumPy ints."""
  from engram_jax import jobs
  texts = jobs.generate(trained_workdir, "x", max_new_tokens=np.int64(2),
                        num_samples=np.int32(2), temperature=np.float32(0.5))
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  with pytest.raises(ValueError, match=r"^prompt holds bytes that are not UTF-8 text"):
    jobs.generate(trained_workdir, "\udcff")
