"""`python -m engram_jax.main --config=configs/lm.py:tiny --workdir=DIR` trains (and resumes)."""
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:tiny.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from engram_jax import train
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, train.TrainingError, PermissionError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
