"""How long a process's first checkpoint save blocks: orbax's default vs the trainer's.

A state of `--arrays` small arrays, each replicated over every device (as a data-parallel
mesh keeps the backbone), is saved once through a plain orbax CheckpointManager (its
standard handler: replicated arrays written replica-parallel, one eager slice program per
array and replica) and once through `engram_jax.checkpoints.manager` (slices only of
>= 1 MiB). Each round gives both paths arrays of shapes neither has seen, so both pay a
first save; the paths alternate. Prints the blocking time of `save` (the loop's stall)
and the time until the save is on disk, medians over rounds, and the ratio.

    python bench/checkpoint_save.py --devices 8 --arrays 60 --rounds 3
"""
import argparse
import os
import statistics
import sys
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--arrays", type=int, default=60)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

  import jax
  import jax.numpy as jnp
  import numpy as np
  import orbax.checkpoint as ocp
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from engram_jax import checkpoints

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def plain_manager(workdir):
    return ocp.CheckpointManager(os.path.join(workdir, checkpoints.CHECKPOINT_DIR),
                                 item_names=checkpoints.ITEMS)

  paths = {"orbax default": plain_manager, "engram_jax": checkpoints.manager}
  times = {name: ([], []) for name in paths}
  width = 16
  for r in range(args.rounds):
    for name, make in paths.items():
      width += 1  # shapes this process has not sliced before
      state = jax.device_put({f"w{i}": jnp.ones((64, width + 97 * i), jnp.float32)
                              for i in range(args.arrays)}, replicated)
      with tempfile.TemporaryDirectory() as workdir:  # this script's own, removed after
        mngr = make(workdir)
        start = time.perf_counter()
        checkpoints.save(mngr, 1, state, {"round": r})
        blocked = time.perf_counter() - start
        mngr.wait_until_finished()
        times[name][0].append(blocked)
        times[name][1].append(time.perf_counter() - start)
        mngr.close()
  print(f"{args.arrays} arrays replicated over {args.devices} devices, first save of a "
        f"process, median of {args.rounds} rounds:")
  for name, (blocked, total) in times.items():
    print(f"  {name:14s} blocks {statistics.median(blocked):7.3f} s, "
          f"on disk after {statistics.median(total):7.3f} s")
  ratio = (statistics.median(times["orbax default"][0])
           / statistics.median(times["engram_jax"][0]))
  print(f"  blocking, orbax default / engram_jax: {ratio:.1f}x")


if __name__ == "__main__":
  main()
