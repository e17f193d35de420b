"""Language-model configs: `--config=configs/lm.py:VARIANT`, every field overridable.

Variants: tiny (2-core CPU, minutes), tiny_baseline (same backbone, no Engram),
small (one GPU). Example: `--config=configs/lm.py:tiny --config.train.steps=50
--config.model.engram.layers=1,3`.
"""
import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variants = ("tiny", "tiny_baseline", "small", "small_baseline")
  if variant not in variants:
    raise ValueError(f"configs/lm.py: unknown variant {variant!r}; choose one of {variants}")
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.model = dict(vocab_size=0,  # 0 = the tokenizer's size
                 width=64, depth=4, num_heads=4, num_kv_heads=2, max_len=128,
                 dtype="float32", remat="none", tie_embeddings=False,
                 engram=dict(layers=(1,), max_ngram=3, heads=4, embed_per_ngram=32,
                             table_size=(4001,), gate="learned", table_trainable=True,
                             table_init_std=1.0, seed=0, lookup="gather",
                             table_row_multiple=512))
  c.data = dict(source="stdlib", files_glob="", tfds_name="", tfds_data_dir="",
                max_files=120, seq_len=64, batch_size=8, seed=0, worker_count=0,
                tokenizer_path="", vocab_size=1024, val_fraction=0.02)
  c.train = dict(steps=300, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1,
                 table_lr_multiplier=5.0, grad_clip=1.0, host_hashing=False,
                 log_every=25, eval_every=100, eval_batches=8, checkpoint_every=100,
                 keep_checkpoints=3,
                 stop_after_steps=0)  # > 0: stop (and save) after this many steps of this run
  # Devices per mesh axis (-1 = the rest); num_devices 0 = every visible device. Tables
  # are row-sharded over all axes (docs/sharding.md); engram.lookup picks the strategy.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, num_devices=0)
  if variant.startswith("small"):
    c.model.update(width=512, depth=8, num_heads=8, num_kv_heads=4, max_len=1024,
                   dtype="bfloat16")
    c.model.engram.update(layers=(1, 5), heads=8, embed_per_ngram=256,
                          table_size=(200003,))
    c.data.update(max_files=0, seq_len=512, batch_size=32, vocab_size=8192)
    c.train.update(steps=5000, learning_rate=1e-3, warmup_steps=200, eval_every=500,
                   checkpoint_every=500)
  if variant.endswith("baseline"):
    c.model.engram.layers = ()
  return c
