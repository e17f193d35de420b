"""Language-model configs: `--config=configs/lm.py:VARIANT`, every field overridable.

Variants: tiny (2-core CPU, minutes), tiny_baseline (same backbone, no Engram),
small (one GPU), niah and niah_baseline (tiny on a needle-in-a-haystack corpus that
`python -m engram_jax.studies.niah make` writes: docs/analyses.md). Example:
`--config=configs/lm.py:tiny --config.train.steps=50 --config.model.engram.layers=1,3`.

Paper scale (docs/scale_out.md has their `--dry_run` sizes): paper_dense is the Engram
paper's layout on a ~3.5B dense backbone (30 blocks of width 2560, Engram at layers 1
and 15, N = 2, 3 with 8 heads each and 1280 features, ~5.6B table params as in
Engram-27B), paper_dense_100b the same with ~100B table params (the paper's host
offload experiment). Suffixes pick a mesh: _v5p (64 chips of a v5p-128, fully
sharded) and _8gpu (an 8xH100 box); without one the mesh is every visible device.
"""
import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  variants = ("tiny", "tiny_baseline", "small", "small_baseline", "paper_dense",
              "paper_dense_v5p", "paper_dense_8gpu", "paper_dense_100b",
              "paper_dense_100b_v5p", "paper_dense_100b_8gpu", "niah", "niah_baseline")
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
                             table_row_multiple=512,
                             # "device" | "host": tables in host RAM, training too
                             # (docs/scale_out.md); "disk" for generation
                             placement="device",
                             # docs/v4.md: the published hash and V4.1's layer
                             hash="engram_jax", compressed_vocab_size=0, pad_id=0,
                             variant="paper"))
  c.data = dict(source="stdlib", files_glob="", tfds_name="", tfds_data_dir="",
                tfds_train_split="train", tfds_val_split="test", text_field="text",
                max_files=120, seq_len=64, batch_size=8, seed=0, worker_count=0,
                tokenizer_path="", vocab_size=1024, val_fraction=0.02)
  c.train = dict(steps=300, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1,
                 table_lr_multiplier=5.0, grad_clip=1.0, host_hashing=False,
                 # "adam" (dense, the paper's) | "lazy_adam" | "rowwise_adagrad" | "sgd":
                 # row-sparse, step cost independent of table rows (docs/tables.md)
                 table_optimizer="adam",
                 # host tables: "overlap" (rows gathered while the last step's update
                 # lands: one step stale) | "exact" (equal to device tables)
                 host_tables_mode="overlap",
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
  if variant.startswith("paper_dense"):
    _paper_dense(c, variant)
  if variant.startswith("niah"):
    # Rows of 128 tokens hold a whole document (~57 tokens) and more; documents with
    # one-token keys and values (docs/analyses.md). A higher learning rate stalls.
    c.model.max_len = 128
    c.data.update(source="files", files_glob="workdirs/niah_data/train/*.txt",
                  max_files=0, val_fraction=0.05, seq_len=128, batch_size=16)
    c.train.update(steps=2000, eval_every=2000, log_every=100, checkpoint_every=2000)
  if variant.endswith("baseline"):
    c.model.engram.layers = ()
  return c


# Min rows per hash head: 2 layers x 16 heads x 80 dims x rows = table params.
_PAPER_TABLE_ROWS = {"paper_dense": 2_200_000,      # ~5.6B (Engram-27B: 5.7B)
                     "paper_dense_100b": 39_062_500}  # ~100B (the offload experiment)


def _paper_dense(c: ml_collections.ConfigDict, variant: str) -> None:
  """The paper's Engram layout on a dense backbone; a mesh per suffix."""
  base = variant.removesuffix("_v5p").removesuffix("_8gpu")
  c.model.update(vocab_size=0, width=2560, depth=30, num_heads=32, num_kv_heads=8,
                 max_len=4096, dtype="bfloat16", remat="full")
  # Engram at 0-based layers 1 and 14: the paper's layers 2 and 15 (as engram_27b).
  c.model.engram.update(layers=(1, 14), max_ngram=3, heads=8, embed_per_ngram=640,
                        table_size=(_PAPER_TABLE_ROWS[base],), lookup="psum")
  # A real run points these at its corpus and a 128k tokenizer (data.tokenizer_path).
  c.data.update(source="tfds", tfds_name="c4/en", tfds_val_split="validation",
                max_files=0, seq_len=4096,
                batch_size=256, vocab_size=131072, worker_count=4)
  c.train.update(steps=100_000, learning_rate=4e-4, warmup_steps=2000, log_every=100,
                 eval_every=5000, checkpoint_every=1000, host_hashing=True)
  # Row-sparse tables: a step of 256 x 4096 tokens reads at most 16.8M of a layer's 35M
  # rows (100B: of 625M; fewer distinct, n-grams repeat), while dense Adam rewrites
  # every row, its m and v. lazy_adam keeps Adam's per-element moments on the rows read
  # (closest to the paper's Adam); at 100B params its m, v would add 745 GiB, so there
  # one Adagrad accumulator per row (1/80 of the table) holds the state instead.
  c.train.table_optimizer = "rowwise_adagrad" if base == "paper_dense_100b" else "lazy_adam"
  if variant.endswith("_v5p"):    # v5p-128: 64 chips, params and batch over all
    c.mesh.update(data=1, fsdp=-1, num_devices=64)
  elif variant.endswith("_8gpu"):  # 8xH100: fsdp over the 8 GPUs of the box
    c.mesh.update(data=1, fsdp=-1, num_devices=8)
