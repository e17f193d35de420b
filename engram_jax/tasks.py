"""What the trainer trains: a model, its data and its eval measure, per run kind.

`"lm"` (configs/lm.py): EngramLM on text (grain text pipeline, tokenizer in the
workdir, eval in bits per UTF-8 byte). `"image"` (configs/image.py): the
class-conditional ImageARModel on image codes (grain image pipeline, label dropout for
classifier-free guidance, eval in bits per token). Everything here reads a validated
`run_config.RunConfig`; the train loop in `train.py` sees only a `Task`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import numpy as np

from engram_jax import config as config_lib
from engram_jax import paths, run_config


@dataclasses.dataclass
class Task:
  """A model with its data: everything `train._train_loop` needs besides the config."""
  kind: str
  model: nn.Module
  model_cfg: config_lib.ModelConfig
  seq_len: int
  train_iter: Any = None
  eval_batches: Any = None
  byte_lengths_V: Optional[np.ndarray] = None  # LM: bytes per token, for bits per byte


def abstract(run: run_config.RunConfig) -> Task:
  """The task's model alone (no data read): dry runs. An LM whose vocabulary comes
  from the tokenizer is sized with `data.vocab_size`."""
  if run.kind == "lm":
    from engram_jax.models.lm import EngramLM
    return Task("lm", EngramLM(run.model), run.model, run.data.seq_len)
  from engram_jax.models import image
  return Task("image", image.ImageARModel(run.model), run.model.model, run.model.cells)


def data_fingerprint(run: run_config.RunConfig) -> dict:
  """What decides the train stream (`data.fingerprint`), saved with every checkpoint.
  Lists local files: a source that matches nothing fails here."""
  if run.kind == "image":
    from engram_jax.data import images
    return images.fingerprint(run.data)
  from engram_jax.data import text
  return text.fingerprint(run.data)


def build(run: run_config.RunConfig, workdir: str) -> Task:
  """The task with its train iterator and eval batches for this process."""
  import jax
  pidx, pcount = jax.process_index(), jax.process_count()
  # host tables are gathered from the hash ids the input pipeline computes
  host_hashing = run.train.host_hashing or run.backbone.engram.placement == "host"
  max_batches = run.train.eval_batches
  if run.kind == "image":
    from engram_jax.data import images
    task = abstract(run)
    engram = task.model_cfg.engram
    spec = engram.hash_spec() if engram.layers and host_hashing else None
    kwargs = dict(process_index=pidx, process_count=pcount, hash_spec=spec,
                  stencil=engram.stencil)
    task.train_iter = images.train_iterator(run.data, **kwargs)
    task.eval_batches = images.eval_batches(run.data, "val", max_batches=max_batches,
                                            **kwargs)
    return task

  from engram_jax import tokenizer as tokenizer_lib
  from engram_jax.data import text
  from engram_jax.models.lm import EngramLM
  data_cfg = run.data
  from engram_jax import checkpoints  # said once, before a run's first checkpoint
  first_start = pidx == 0 and not checkpoints.saved_steps(workdir)
  binary = text.binary_files(data_cfg) if first_start else []
  if binary:
    print(f"warning: {len(binary)} file(s) matched by data.files_glob look binary (NUL "
          f"bytes in their first {text.BINARY_PROBE_BYTES // 1024} KiB), e.g. "
          f"{', '.join(binary[:2])}: they are trained on as text; narrow the glob to text "
          "files", flush=True)
  tok = text.build_tokenizer(data_cfg, workdir)
  model_cfg = run.with_tokenizer_vocab(tok.get_vocab_size()).model
  engram = model_cfg.engram
  compressed = (tokenizer_lib.workdir_compressed_vocab(
      workdir, tok, engram.hash, engram.compressed_vocab_size) if engram.layers else None)
  spec = engram.hash_spec() if engram.layers and host_hashing else None
  # The token cache is memory-mapped: in a local workdir, else (gs://) in the local
  # default cache (token_cache.default_cache_dir).
  cache_dir = f"{workdir}/token_cache" if paths.is_local(workdir) else None
  kwargs = dict(process_index=pidx, process_count=pcount, compressed_vocab=compressed,
                hash_spec=spec, cache_dir=cache_dir)
  train_iter = text.train_iterator(data_cfg, tok, **kwargs)
  if pidx == 0:
    tokens = ("" if data_cfg.source == "tfds" else
              f", {len(text.token_stream(data_cfg, tok, 'train', kwargs['cache_dir'])):,} "
              "tokens")
    print(text.describe_corpus(data_cfg) + tokens, flush=True)
  return Task("lm", EngramLM(model_cfg), model_cfg, data_cfg.seq_len, train_iter,
              text.eval_batches(data_cfg, tok, max_batches=max_batches, **kwargs),
              tokenizer_lib.token_byte_lengths(tok))
