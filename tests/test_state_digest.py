"""The checkpoint digest: blind to sharding, not to a changed or moved word."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import checkpoints, sharding, state_digest


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"table": jnp.asarray(rng.standard_normal((64, 8)), jnp.float32),
                     "scale": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)},
          "step": jnp.int32(7), "mask": jnp.asarray(rng.random(5) > 0.5),
          "codes": jnp.asarray(rng.integers(-9, 9, 6), jnp.int8)}


def test_digest_is_the_same_on_any_mesh():
  tree = _tree()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  rows = NamedSharding(mesh, P("data"))
  sharded = dict(tree, params=dict(tree["params"],
                                   table=jax.device_put(tree["params"]["table"], rows)))
  assert len(sharded["params"]["table"].sharding.device_set) == 8
  assert state_digest.digest(sharded) == state_digest.digest(tree)
  assert set(state_digest.digest(tree)) == {"params/table", "params/scale", "step", "mask",
                                            "codes"}


@pytest.mark.parametrize("change", ["one bit", "two swapped", "bf16 bit"])
def test_a_changed_or_moved_word_is_found(change):
  tree = _tree()
  saved = state_digest.digest(tree)
  table = np.asarray(tree["params"]["table"]).copy()
  if change == "one bit":
    table.view(np.uint32)[10, 3] ^= 1 << 17
  elif change == "two swapped":  # the plain sum cannot see it; the weighted one does
    table[[2, 40]] = table[[40, 2]]
  if change == "bf16 bit":
    scale = np.asarray(tree["params"]["scale"]).copy()
    scale.view(np.uint16)[4] ^= 1
    damaged = dict(tree, params=dict(tree["params"], scale=jnp.asarray(scale)))
    want = "params/scale"
  else:
    damaged = dict(tree, params=dict(tree["params"], table=jnp.asarray(table)))
    want = "params/table"
  assert state_digest.first_mismatch(tree, saved) is None
  assert state_digest.first_mismatch(damaged, saved) == want
  with pytest.raises(checkpoints.CorruptCheckpoint, match=rf"^{want} does not hold"):
    checkpoints.check_digest(damaged, {checkpoints.DIGEST_KEY: saved})
  # several processes: every entry of the gathered data state holds the same digest
  with pytest.raises(checkpoints.CorruptCheckpoint):
    checkpoints.check_digest(damaged, {"processes": [{checkpoints.DIGEST_KEY: saved}] * 2})


def test_arrays_read_in_another_dtype_or_not_saved_are_not_compared():
  tree = _tree()
  saved = state_digest.digest({"params": tree["params"]})
  as_f32 = {"params": dict(tree["params"], scale=tree["params"]["scale"].astype(
      jnp.float32)), "extra": jnp.ones(3)}
  assert state_digest.first_mismatch(as_f32, saved) is None
  checkpoints.check_digest(tree, {})  # a checkpoint from before digests: nothing to check


def test_host_arrays_get_the_same_digest_without_the_device():
  """NumPy arrays (or jax arrays in host memory: a reader's host tables) are summed on
  the host, chunk by chunk, to the same numbers."""
  tree = _tree()
  on_host = jax.tree_util.tree_map(np.asarray, tree)
  assert state_digest.digest(on_host) == state_digest.digest(tree)
  big = np.arange(3 * 2**20 + 5, dtype=np.float32)
  assert state_digest._numpy_sums(big, chunk=2**20) == tuple(
      state_digest.digest({"x": jnp.asarray(big)})["x"][:2])


def test_a_failing_check_is_not_a_corrupt_checkpoint(monkeypatch):
  """Only a digest that differs is `CorruptCheckpoint` (which moves a checkpoint
  aside); an error of the check itself (e.g. out of memory) is raised as it is (the
  readers' handling: tests/test_generate.py)."""
  def broken(tree, saved):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
  monkeypatch.setattr(state_digest, "first_mismatch", broken)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    checkpoints.check_digest(_tree(), {checkpoints.DIGEST_KEY: {"step": [0, 0, "int32"]}})
