"""The smallest trainable LM config: `--config=tests/lm_test_config.py:tiny`.

One definition for the in-process tests and the command-line (subprocess) tests.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm  # noqa: E402


def get_config(variant: str = "tiny"):
  c = lm.get_config(variant)
  c.model.update(width=32, depth=2, max_len=32)
  c.model.engram.update(layers=(1,) if c.model.engram.layers else (), heads=2,
                        embed_per_ngram=16, table_size=(509,))
  c.data.update(max_files=12, seq_len=16, batch_size=4, vocab_size=300)
  c.train.update(steps=6, warmup_steps=2, log_every=1, eval_every=6, eval_batches=2,
                 checkpoint_every=100)
  c.mesh.update(num_devices=1)  # tests see 8 simulated devices; mesh tests opt in
  return c
