"""Shared fixtures: tiny configs so that every module compiles in seconds on 2 cores."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Mesh tests need several devices; on CPU, 8 simulated ones (set before jax loads).
# The test programs are tiny and compile-bound: LLVM optimisation off compiles them in
# 30-45% less time (a tiny MoE LM's init 12.2 -> 6.7 s, its gradient 8.8 -> 6.0 s on a
# 2-core CPU); every equivalence a test checks runs both sides under the same flags.
_TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8",
                   "xla_backend_optimization_level": "0"}
for _flag, _value in _TEST_XLA_FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

# Tests rebuild the same tiny programs many times (each training run, each CLI
# subprocess): an on-disk compilation cache, inherited by the subprocesses, compiles
# each once. One directory per pytest-xdist worker, so no two test processes write
# one cache at once; set JAX_COMPILATION_CACHE_DIR to choose another place.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    f"engram_jax_test_xla_cache_{os.getuid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engram_jax import config as config_lib  # noqa: E402


def tiny_model_config(**engram_overrides) -> config_lib.ModelConfig:
  engram = dict(layers=(1, 3), max_ngram=3, heads=2, embed_per_ngram=16,
                table_size=(61, 67), seed=3)
  engram.update(engram_overrides)
  return config_lib.validate(config_lib.ModelConfig(
      vocab_size=97, width=32, depth=4, num_heads=4, num_kv_heads=2, max_len=48,
      engram=config_lib.EngramConfig(**engram)))


@pytest.fixture(scope="session")
def real_token_stream() -> np.ndarray:
  """UTF-8 bytes of a few standard-library sources: a real token stream everywhere."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(stdlib.glob("*.py"))[:20]
  data = b"".join(f.read_bytes() for f in files)
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def with_random_conv(params, cfg: config_lib.ModelConfig):
  """Engram conv kernels start at zero; randomise them so tests exercise the conv path."""
  import jax
  out = jax.tree_util.tree_map(lambda x: x, params)
  for layer in cfg.engram.layers:
    engram = out[f"block_{layer}"]["engram"]
    engram["conv"] = jax.random.normal(jax.random.key(layer), engram["conv"].shape)
  return out


def take(iterator, n):
  """The next n batches of a data iterator."""
  return [next(iterator) for _ in range(n)]


def same_batches(batches_a, batches_b) -> bool:
  """Two lists of batch dicts hold the same keys and arrays, in order."""
  return len(batches_a) == len(batches_b) and all(
      a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
      for a, b in zip(batches_a, batches_b))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A workdir of `tests/lm_test_config.py:tiny` trained 3 steps (read-only for tests)."""
  pytest.importorskip("orbax.checkpoint")
  pytest.importorskip("clu")
  from engram_jax import train
  from tests import lm_test_config
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = lm_test_config.get_config("tiny")
  config.train.update(steps=3, eval_every=3)
  train.train_and_evaluate(config, workdir)
  return workdir


# pytest-xdist (`--dist loadfile`) hands test files to its workers in collection order,
# once its own reordering (files with the most tests first) is off. The slowest files
# (seconds, measured warm on 2 cores) go first, so the run does not end with one worker
# busy on a long file while the other idles.
SLOWEST_FILES_FIRST = ("test_moe_lm.py", "test_multihost.py", "test_colab.py",
                       "test_train.py", "test_inception.py", "test_generate.py",
                       "test_offload.py", "test_analyze.py", "test_probes.py",
                       "test_moe.py", "test_sparse_tables.py", "test_allocation.py",
                       "test_host_tables.py", "test_rho_sweep.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files kept
