"""A checkpoint of a replicated state: written without a program per replica slice, in
the files and metadata orbax's standard handler writes, read back by the loaders."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

from engram_jax import checkpoints  # noqa: E402


def _replicated_state():
  """Small arrays of shapes no other test uses, each on all 8 devices, and one whose
  per-replica slice is above the threshold."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  big_rows = 8 * checkpoints.REPLICA_SLICE_MIN_BYTES // (4 * 8)  # slices of exactly the threshold
  state = {f"w{i}": jnp.full((24, 37 + i), i, jnp.float32) for i in range(6)}
  state.update(step=jnp.int32(5), big=jnp.ones((big_rows, 8), jnp.float32))
  return jax.device_put(state, replicated), replicated


def _traces_during(fn):
  """How many functions JAX traced (cache misses of jit and of eager ops) while fn ran."""
  events = []
  listener = lambda name, *_, **__: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return events.count("/jax/core/compile/jaxpr_trace_duration")


def test_small_replicated_arrays_save_whole_and_restore(tmp_path):
  assert len(jax.devices()) == 8
  state, replicated = _replicated_state()
  mngr = checkpoints.manager(str(tmp_path), async_saves=False)
  traces = _traces_during(lambda: checkpoints.save(mngr, 1, state, {"batches": 1}))
  mngr.close()
  # orbax's default cuts every replicated array with a divisible dimension into 8
  # slices, one eager program each (7 arrays: 56); now only the one at the threshold
  assert traces <= 8, traces
  with open(tmp_path / "checkpoints" / "1" / "_CHECKPOINT_METADATA") as f:
    handlers = json.load(f)["item_handlers"]
  assert handlers["state"].endswith("StandardCheckpointHandler")  # the format is orbax's own
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  restored, step = checkpoints.restore_checkpoint(str(tmp_path), abstract)  # a reader
  assert step == 1
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
