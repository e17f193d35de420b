"""Sizing a run from shapes alone: `python -m engram_jax.main --dry_run`.

`dry_run_report(config)` builds the run's model, optimizer and train state as abstract
shapes (`jax.eval_shape`, nothing allocated or compiled) on the config's mesh, also a
pod-scale mesh on a laptop (`AbstractMesh`), and reports parameters by group
(`param_groups.parameter_overview`) and bytes in all and per device, Engram tables and
their optimizer state apart.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from engram_jax import optim, param_groups, run_config, sharding, tasks, train_steps


def tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def table_leaves(opt_state) -> list:
  """The leaves of a dense optimizer state that belong to Engram tables (Adam's m, v)."""
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if param_groups.group(path) == "engram_tables"]


def dry_run_report(config) -> str:
  """Parameter counts by group and bytes of the train state, from shapes alone.

  `config`: a `run_config.RunConfig`, or a ConfigDict converted here (its image data
  paths unchecked: a dry run reads no data).
  """
  run = (config if isinstance(config, run_config.RunConfig)
         else run_config.from_config(config, dry_run=True))
  task = tasks.abstract(run)
  model, model_cfg, seq_len = task.model, task.model_cfg, task.seq_len
  _, tx = optim.from_train_config(run.train, model_cfg.engram)
  mesh = sharding.mesh_from_config(run.mesh, abstract=True)
  with jax.sharding.use_abstract_mesh(mesh):  # psum/all_to_all lookups trace on a mesh
    state = train_steps.abstract_train_state(model, tx, seq_len)
    shardings = train_steps.train_state_shardings(model, tx, seq_len, mesh, abstract=state)
  params = nn.unbox(state.params)
  counts = param_groups.parameter_overview(params)
  by_group = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree_util.tree_leaves(shardings.params)):
    group = param_groups.overview_view(param_groups.group(path))
    by_group.setdefault(group, []).append((leaf, sh))
  group_bytes = lambda group: sharding.bytes_per_device(
      [t for t, _ in by_group.get(group, [])], [s for _, s in by_group.get(group, [])])
  gib = lambda n: f"{n / 2**30:.3f} GiB"
  mesh_text = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  m = model_cfg.moe
  lines = [f"{task.kind} model: width {model_cfg.width}, depth {model_cfg.depth}, vocab "
           f"{model_cfg.vocab_size}, Engram layers {list(model_cfg.engram.layers)}, "
           f"lookup {model_cfg.engram.lookup!r}"]
  if m.enabled:
    lines.append(f"  MoE: {m.num_experts} routed experts (top {m.top_k}, width "
                 f"{m.expert_dim}) + {m.num_shared} shared (width {m.resolved_shared_dim}) "
                 f"from layer {m.first_dense_layers}; branches {model_cfg.branches}")
  lines += [f"  {k:<14} {v:>18,} params" for k, v in counts.items()]
  opt_trees = (state.opt_state, state.table_opt_state)
  opt_shardings = (shardings.opt_state, shardings.table_opt_state)
  lines.append(f"  total bytes: params {gib(tree_bytes(params))}, optimizer state "
               f"{gib(tree_bytes(opt_trees))} (train.table_optimizer "
               f"{run.train.table_optimizer!r})")
  lines.append(f"mesh {mesh_text} ({mesh.size} devices), bytes per device:")
  parts = [f"Engram tables {gib(group_bytes('engram_tables'))}"]
  if m.enabled:
    parts.append(f"routed experts {gib(group_bytes('routed_experts'))}")
  table_state = sharding.bytes_per_device(
      (table_leaves(state.opt_state), state.table_opt_state),
      (table_leaves(shardings.opt_state), shardings.table_opt_state))
  lines.append(f"  params {gib(sharding.bytes_per_device(params, shardings.params))} "
               f"({', '.join(parts)}), optimizer state "
               f"{gib(sharding.bytes_per_device(opt_trees, opt_shardings))} (Engram "
               f"tables {gib(table_state)})")
  if model_cfg.engram.placement == "host" and model_cfg.engram.layers:
    host_bytes = tree_bytes([leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
        params) if param_groups.group(path) == "engram_tables"]) + tree_bytes(
            state.table_opt_state)
    lines.append(f"engram.placement='host': the Engram tables and their optimizer state "
                 f"live in host RAM instead, {gib(host_bytes)} on every host (a full "
                 "replica per process); subtract them from the per-device figures above")
  return "\n".join(lines)
