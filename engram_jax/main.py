"""`python -m engram_jax.main --config=configs/lm.py:tiny --workdir=DIR` trains (and resumes).

`--dry_run` sizes the config instead: parameter counts and bytes per device on the
config's mesh, from abstract shapes only (nothing is allocated or compiled).

Several processes (hosts) join one run through `jax.distributed.initialize`, called
here before jax touches a device: with `--coordinator_address`, `--num_processes` and
`--process_id` (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`),
or with `--distributed=on` where jax detects them itself (Cloud TPU pods, SLURM, Open
MPI). One process needs none of it. docs/scale_out.md has the launch commands.
"""
import os
import re
import signal
import sys


def _interrupted_early(signum, frame):
  del signum, frame
  print("interrupted before this run's first step; nothing was saved (a checkpoint "
        "already in --workdir is untouched)", file=sys.stderr)
  os._exit(130)  # no traceback from whatever import or compile was running


if __name__ == "__main__":  # until the trainer installs its own save-and-stop handler
  signal.signal(signal.SIGINT, _interrupted_early)

# tensorflow-datasets sources load TensorFlow: keep its start-up chatter off the console
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
_ABSL_FLAGS = frozenset(FLAGS)  # absl's own (logging) flags, defined on its import
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.DEFINE_bool("dry_run", False, "Print parameter counts and per-device bytes; no training.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Join a multi-process run: auto = when the address/count/id flags or "
                  "env vars are set, or under SLURM/Open MPI with several tasks; on = "
                  "always (jax detects what is unset: TPU pods, SLURM, Open MPI); off = never.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 "
                     "(default $JAX_PROCESS_ID).")
flags.DEFINE_bool("accept_data_change", False,
                  "Resume even though the data source changed since the checkpoint (the "
                  "batches then differ from an uninterrupted run's).")
flags.DEFINE_bool("print_config", False,
                  "Print every field of --config (after overrides) and the variants of "
                  "its file, then exit: the fields any --config.FIELD=VALUE can set.")
flags.mark_flags_as_required(["config"])
COMMAND_FLAGS = sorted(frozenset(FLAGS) - _ABSL_FLAGS)  # this command's own


def _env_int(name: str):
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer; unset it or fix it") from None


def _cluster_detected() -> bool:
  """SLURM or Open MPI launched several tasks (jax reads their variables itself)."""
  slurm_tasks = os.environ.get("SLURM_NTASKS", "1")
  return ("SLURM_JOB_ID" in os.environ and slurm_tasks.isdigit() and int(slurm_tasks) > 1
          or "OMPI_MCA_orte_hnp_uri" in os.environ)


# Seconds every process waits for all to join: first the check-in with process 0
# (`rendezvous`: a wrong count or id is one line), then `jax.distributed.initialize`,
# which ends the process itself (a fatal log, exit 134) past it, as it does when a
# process stops answering during the run.
JOIN_TIMEOUT_S = 300


def init_distributed(mode: str = "auto", coordinator_address=None, num_processes=None,
                     process_id=None) -> int:
  """Calls `jax.distributed.initialize` when the run has several processes.

  Must run before anything asks jax for its devices. Returns the process count. On
  CPU, cross-process collectives use gloo (jax 0.10's default, set explicitly for
  older versions where it is off).
  """
  import jax
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
  process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
  given = (coordinator_address, num_processes, process_id)
  if mode == "off" or num_processes == 1:
    return 1
  if mode == "auto" and all(v is None for v in given) and not _cluster_detected():
    return 1
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: use 1 or more")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is outside [0, --num_processes="
                     f"{num_processes})")
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes is not None:  # the wait for the others is silent otherwise
    print(f"distributed: process {process_id} of {num_processes}, coordinator "
          f"{coordinator_address}; waiting up to {JOIN_TIMEOUT_S} s for all to join",
          file=sys.stderr, flush=True)
  if None not in given:  # jax detects nothing here: the launch itself can be wrong
    from engram_jax import rendezvous
    if process_id == 0:
      rendezvous.gather(coordinator_address, num_processes, JOIN_TIMEOUT_S)
    else:
      rendezvous.check_in(coordinator_address, num_processes, process_id, JOIN_TIMEOUT_S)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=JOIN_TIMEOUT_S)
  except (ValueError, TypeError) as err:
    raise ValueError(f"jax.distributed.initialize failed ({err}): pass "
                     "--coordinator_address=HOST:PORT, --num_processes and --process_id "
                     "(or run where jax detects them: a TPU pod, SLURM, Open MPI), or "
                     "--distributed=off for one process") from None
  except jax.errors.JaxRuntimeError as err:  # e.g. "Failed to start RPC server"
    raise ValueError(f"--coordinator_address={coordinator_address}: joining the run "
                     f"failed ({_one_line(err)}); the port must be free on process 0's "
                     "host (choose another) and reachable from the others, and "
                     "--num_processes must match the processes started") from None
  return jax.process_count()


def config_variants(config_arg: str) -> tuple[str, ...]:
  """The variants a config file lists (its `get_config` error names them), or ()."""
  path = config_arg.split(":")[0]
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
  except OSError:
    return ()
  found = re.search(r"variants\s*=\s*\(([^)]*)\)", source)
  return tuple(re.findall(r'"([^"]+)"', found.group(1))) if found else ()


def _config_fields(config) -> dict:
  """{"train.steps": 300, ...}: every field of a ConfigDict by its dotted name."""
  from flax import traverse_util
  return traverse_util.flatten_dict(config.to_dict(), sep=".")


def describe_config(config, config_arg: str) -> str:
  """Every field with its value, then the file's variants (`--print_config`)."""
  lines = [f"--config.{k}={v!r}" for k, v in sorted(_config_fields(config).items())]
  variants = config_variants(config_arg)
  if variants:
    lines.append(f"variants of {config_arg.split(':')[0]}: {', '.join(variants)}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax INFO logs drown the progress lines
    logging.set_verbosity(logging.WARNING)
  from engram_jax import train  # importing touches no device: initialize can follow
  try:
    if FLAGS.print_config:
      print(describe_config(FLAGS.config, FLAGS["config"].serialize().split("=", 1)[-1]))
      return
    if not FLAGS.dry_run:
      init_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                       FLAGS.process_id)
    if FLAGS.dry_run:
      from engram_jax import sizing
      print(sizing.dry_run_report(FLAGS.config))
      return
    if not FLAGS.workdir:
      raise ValueError("--workdir is required to train; give a directory for checkpoints "
                       "and metrics (or pass --dry_run)")
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             accept_data_change=FLAGS.accept_data_change)
  except train.RunStopped as stop:  # saved: a preempted run (SIGTERM) ends well, Ctrl-C 130
    sys.exit(0 if stop.signum == signal.SIGTERM else 130)
  except KeyboardInterrupt:
    _interrupted_early(signal.SIGINT, None)
  except (ValueError, OSError, train.TrainingError) as err:
    print(f"error: {_one_line(err)}", file=sys.stderr)
    sys.exit(2)


def _one_line(err: BaseException) -> str:
  """The last line of a (possibly multi-line, traceback-quoting) message."""
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  if not lines:
    return type(err).__name__
  if len(lines) == 1:
    return lines[0]
  # ml_collections quotes the config file's traceback: its last line is the error
  errors = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", l)]
  text = errors[-1] if errors else lines[-1]
  return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", text)


def _config_error(argv) -> str | None:
  """A config file that did not load (ml_collections defers the error to first use)."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  try:
    FLAGS.config.get("task")
  except Exception as err:  # noqa: BLE001  IOError from ml_collections' _ErrorConfig
    path = config_arg.split(":")[0]
    if not os.path.isfile(path):
      return (f"--config={config_arg}: no config file {path!r}; give a file such as "
              "configs/lm.py:tiny or configs/image.py:digits")
    return f"--config={config_arg}: {_one_line(err)}"
  return None


def parse_flags(argv):
  """absl's parser, but a bad flag, config file or `--config.*` override is a one-line
  error, exit 2."""
  try:
    remaining = FLAGS(argv)
    message = _config_error(argv)
    if message is None:
      return remaining
  except flags.Error as err:
    message = _one_line(err)
    config_arg = next((a for a in argv if a.startswith("--config=")), "")
    unknown = re.match(r"Unknown command line flag '([^']+)'", message)
    if unknown:  # absl's guesses are its own flags (--stpes: "stderrthreshold")
      spelled_apart = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
      message = _unknown_flag(unknown.group(1), (spelled_apart or
                                                 [config_arg.split("=", 1)[-1]])[0])
    variants = config_variants(config_arg.split("=", 1)[-1])
    if (str(err).startswith("flag --config=") and "unknown variant" not in message
        and variants):
      message += f" (variants: {', '.join(variants)})"
  except (AttributeError, KeyError) as err:  # ml_collections: an override of no field
    text = str(err)
    named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
             and any(f"{part}\\'" in text or f"{part}'" in text
                     for part in a.split("=")[0].split(".")[1:])]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    message = (f"{named[0] if named else 'a --config.* override'} names no field of the "
               "config; " + (f"did you mean {hint.group(1)!r}?" if hint else
                             "check the spelling against the config file (list the "
                             "fields with --print_config)"))
  except Exception as err:  # noqa: BLE001  the config file itself failed to load
    message = _config_file_error(argv, err)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_flag(name: str, config_arg: str) -> str:
  """One line for `--NAME`, no flag of this command: the config field it most likely
  meant (a field is set as `--config.FIELD=VALUE`), else the command's own flags."""
  import difflib
  from engram_jax import config_files
  try:
    fields = sorted(_config_fields(config_files.load(config_arg)))
  except Exception:  # noqa: BLE001  no config (or a broken one): no field to suggest
    fields = []
  leaf = {field.rsplit(".", 1)[-1]: field for field in fields}
  close = (difflib.get_close_matches(name, fields, n=1)
           or [leaf[m] for m in difflib.get_close_matches(name, list(leaf), n=1)])
  own = difflib.get_close_matches(name, COMMAND_FLAGS, n=1)
  if close and not own:
    return (f"--{name} is not a flag; did you mean --config.{close[0]}=...? (config "
            "fields are set as --config.FIELD=VALUE; --print_config lists them)")
  if own:
    return f"--{name} is not a flag; did you mean --{own[0]}?"
  return (f"--{name} is not a flag: this command takes "
          f"{', '.join('--' + f for f in COMMAND_FLAGS)}; config fields are set as "
          "--config.FIELD=VALUE (--print_config lists them)")


def _config_file_error(argv, err: Exception) -> str:
  """One line for a config file that raised while loading (a syntax error, a failing
  `get_config`), naming the file and where."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
  where = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
  hint = ("a workdir's config.json records a run, it is not a config file: pass the "
          "configs/*.py the run was made with" if path.split(":")[0].endswith(".json")
          else "fix the file (Python defining get_config(), like configs/lm.py)")
  detail = err.msg if isinstance(err, SyntaxError) else _one_line(err)
  return f"--config={path}: loading it raised {type(err).__name__}{where}: {detail}; {hint}"


def with_shipped_configs(argv) -> list[str]:
  """`--config=configs/NAME.py:...` pointed at the installed copy when the working
  directory has no such file (`config_files.resolve`)."""
  from engram_jax import config_files
  return [("--config=" + config_files.resolve_arg(a.split("=", 1)[1]))
          if a.startswith("--config=") else a for a in argv]


def run(argv) -> int:
  """The command in-process (tests): parse `argv`, run, return the exit status."""
  argv = with_shipped_configs(argv)
  saved_argv = sys.argv
  sys.argv = list(argv)  # ml_collections finds the --config.* overrides in sys.argv
  try:
    main(parse_flags(list(argv)))
  except SystemExit as exit_:
    return 0 if exit_.code is None else (exit_.code if isinstance(exit_.code, int) else 1)
  finally:
    sys.argv = saved_argv
    for name in [n for n in FLAGS if n.startswith("config.")]:
      delattr(FLAGS, name)  # ml_collections defines one flag per override, per parse
    FLAGS.unparse_flags()
  return 0


if __name__ == "__main__":
  sys.argv = with_shipped_configs(sys.argv)
  app.run(main, flags_parser=parse_flags)
