"""What the trainer trains: a model, its data and its eval measure, per `config.task`.

`"lm"` (configs/lm.py): EngramLM on text (grain text pipeline, tokenizer in the
workdir, eval in bits per UTF-8 byte). `"image"` (configs/image.py): the
class-conditional ImageARModel on image codes (grain image pipeline, label dropout for
classifier-free guidance, eval in bits per token). The train loop in `train.py` sees
only a `Task`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import numpy as np

from engram_jax import config as config_lib
from engram_jax import run_config

KINDS = ("lm", "image")


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


def kind_of(config) -> str:
  kind = config.get("task", "lm")
  if kind not in KINDS:
    raise ValueError(f"task={kind!r} is invalid: choose one of {KINDS}")
  return kind


def lm_model_config(config, vocab_size: int) -> config_lib.ModelConfig:
  """The validated LM config; `model.vocab_size = 0` means the tokenizer's size."""
  model_dict = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  if not model_dict.get("vocab_size"):
    model_dict["vocab_size"] = vocab_size
  return config_lib.from_dict(model_dict)


def _text_data_config(config):
  """The typed data section; `data.files_glob` alone means `data.source="files"`
  (a glob given with the default "stdlib" source would otherwise be ignored)."""
  from engram_jax.data import text
  data = dict(config.data)
  if data.get("files_glob") and data.get("source", "stdlib") == "stdlib":
    data["source"] = "files"
  return text.validate(text.TextDataConfig(**data))


def _image_data_config(config):
  from engram_jax.data import images
  return images.validate(images.ImageDataConfig(**dict(config.data)))


def abstract(config, check_data: bool = True) -> Task:
  """The task's model from the config alone (no data read): validation and dry runs.

  An LM whose vocabulary comes from the tokenizer is sized with `data.vocab_size`;
  `check_data=False` skips the data section's checks (a dry run needs no data paths).
  """
  kind = kind_of(config)
  run_config.validate_train(config.train)
  if kind == "lm":
    from engram_jax.models.lm import EngramLM
    data_cfg = _text_data_config(config)
    model_cfg = lm_model_config(config, vocab_size=data_cfg.vocab_size)
    run_config.validate_lm_lengths(data_cfg.seq_len, model_cfg.max_len)
    if not data_cfg.tokenizer_path:  # a tokenizer trained here has data.vocab_size tokens
      run_config.validate_vocab(model_cfg.vocab_size, data_cfg.vocab_size)
    return Task(kind, EngramLM(model_cfg), model_cfg, data_cfg.seq_len)
  from engram_jax.models import image
  if check_data:
    _image_data_config(config)
  image_cfg = image.make_image_config(config.model, config.data)
  return Task(kind, image.ImageARModel(image_cfg), image_cfg.model, image_cfg.cells)


def data_fingerprint(config) -> dict:
  """What decides the train stream (`data.fingerprint`), saved with every checkpoint.
  Lists local files: a source that matches nothing fails here."""
  if kind_of(config) == "image":
    from engram_jax.data import images
    return images.fingerprint(_image_data_config(config))
  from engram_jax.data import text
  return text.fingerprint(_text_data_config(config))


def build(config, workdir: str) -> Task:
  """The task with its train iterator and eval batches for this process."""
  import jax
  pidx, pcount = jax.process_index(), jax.process_count()
  # host tables are gathered from the hash ids the input pipeline computes
  host_hashing = (bool(config.train.get("host_hashing", False))
                  or config.model.get("engram", {}).get("placement", "device") == "host")
  if kind_of(config) == "image":
    from engram_jax.data import images
    task = abstract(config)
    data_cfg = _image_data_config(config)
    engram = task.model_cfg.engram
    spec = engram.hash_spec() if engram.layers and host_hashing else None
    kwargs = dict(process_index=pidx, process_count=pcount, hash_spec=spec,
                  stencil=engram.stencil)
    task.train_iter = images.train_iterator(data_cfg, **kwargs)
    task.eval_batches = images.eval_batches(
        data_cfg, "val", max_batches=config.train.eval_batches, **kwargs)
    return task

  from engram_jax import tokenizer as tokenizer_lib
  from engram_jax.data import text
  from engram_jax.models.lm import EngramLM
  data_cfg = _text_data_config(config)
  tok = text.build_tokenizer(data_cfg, workdir)
  model_cfg = lm_model_config(config, vocab_size=tok.get_vocab_size())
  run_config.validate_vocab(model_cfg.vocab_size, tok.get_vocab_size())
  engram = model_cfg.engram
  compressed = (tokenizer_lib.workdir_compressed_vocab(
      workdir, tok, engram.hash, engram.compressed_vocab_size) if engram.layers else None)
  spec = engram.hash_spec() if engram.layers and host_hashing else None
  kwargs = dict(process_index=pidx, process_count=pcount, compressed_vocab=compressed,
                hash_spec=spec, cache_dir=f"{workdir}/token_cache")
  train_iter = text.train_iterator(data_cfg, tok, **kwargs)
  if pidx == 0:
    tokens = ("" if data_cfg.source == "tfds" else
              f", {len(text.token_stream(data_cfg, tok, 'train', kwargs['cache_dir'])):,} "
              "tokens")
    print(text.describe_corpus(data_cfg) + tokens, flush=True)
  return Task("lm", EngramLM(model_cfg), model_cfg, data_cfg.seq_len, train_iter,
              text.eval_batches(data_cfg, tok, max_batches=config.train.eval_batches,
                                **kwargs),
              tokenizer_lib.token_byte_lengths(tok))
