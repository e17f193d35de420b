"""`python -m engram_jax.main --config=configs/lm.py:tiny --workdir=DIR` trains (and resumes).

`--dry_run` sizes the config instead: parameter counts and bytes per device on the
config's mesh, from abstract shapes only (nothing is allocated or compiled).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer loads TF

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.DEFINE_bool("dry_run", False, "Print parameter counts and per-device bytes; no training.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  from engram_jax import train
  try:
    if FLAGS.dry_run:
      print(train.dry_run_report(FLAGS.config))
      return
    if not FLAGS.workdir:
      raise ValueError("--workdir is required to train; give a directory for checkpoints "
                       "and metrics (or pass --dry_run)")
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, train.TrainingError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
