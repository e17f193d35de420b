"""Compressed vocabulary: the ids Engram hashes instead of raw token ids.

Tokens whose text normalises to the same string (case, accents, whitespace runs) share
one compressed id, so an n-gram and its capitalised or spaced variants hit the same
table rows. `V` is the tokenizer's vocabulary (docs/architecture.md).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Sequence

import numpy as np

_WHITESPACE_RUN = re.compile(r"[ \t\r\n]+")


def normalize_token_text(text: str) -> str:
  """The canonical form two tokens must share to be merged (our rule, "engram_jax").

  NFKC, then NFD with nonspacing marks (Mn) removed (strip accents), lower-case, runs of
  whitespace folded to one space, outer spaces stripped; a token that is only
  whitespace keeps a single space so it does not merge with the empty string.
  A standard-library transcription of the reference's `tokenizers` sequence
  (`reference_normalizer`), equal to it on Latin text but not everywhere: Python's
  `lower` applies the final-sigma rule, `strip` also removes U+001C..U+001F, spacing
  marks (Mc, e.g. Devanagari vowel signs) are kept, and the Unicode tables differ in
  version. Kept as it is: runs made with it hash with it; the published rule uses
  the reference's own normaliser.
  """
  text = unicodedata.normalize("NFKC", text)
  text = unicodedata.normalize("NFD", text)
  text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
  text = _WHITESPACE_RUN.sub(" ", text.lower())
  if text == " ":
    return text
  return text.strip()


def reference_normalizer():
  """The reference's normaliser (the official demo's and V4.1's `CompressedTokenizer`),
  built from Hugging Face `tokenizers`, which the published rule needs anyway (it
  reads a `tokenizers.Tokenizer`).

  Its StripAccents drops every mark (Mn, Mc, Me), Lowercase maps each character on
  its own, Strip removes White_Space only, all from the library's Unicode tables: only
  the library itself reproduces it for every token of a multilingual vocabulary.
  """
  from tokenizers import Regex, normalizers
  sentinel = "\uE000"  # keeps an all-whitespace token as one space through Strip
  return normalizers.Sequence([
      normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
      normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), sentinel), normalizers.Strip(),
      normalizers.Replace(sentinel, " ")])


def compressed_vocab_from_texts(texts: Sequence[str | None],
                                raw_keys: Sequence[str] | None = None,
                                normalize: Callable[[str], str] = normalize_token_text
                                ) -> np.ndarray:
  """Maps token id -> compressed id, merging tokens whose normalised texts are equal.

  `texts[i]` is the decoded text of token i, or None when it does not decode to valid
  text (a partial UTF-8 byte): such tokens keep an id of their own, or, with
  `raw_keys` (the published rule), are keyed by their raw token string `raw_keys[i]`
  in the same key space as normalised texts. `normalize` gives a text's key (ours by
  default). Compressed ids are dense, assigned in order of first appearance.
  """
  key_to_new: dict[Any, int] = {}
  out = np.empty(len(texts), dtype=np.int32)
  for token_id, text in enumerate(texts):
    if text is None:
      raw = None if raw_keys is None else raw_keys[token_id]
      key: Any = ("raw", token_id) if raw is None else raw
    else:
      norm = normalize(text)
      key = norm if norm else text
    out[token_id] = key_to_new.setdefault(key, len(key_to_new))
  return out


def _decoded_texts(tokenizer) -> list[str | None]:
  texts = []
  for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    texts.append(None if "\ufffd" in text else text)
  return texts


def compressed_vocab_from_tokenizer(tokenizer) -> np.ndarray:
  """Compressed vocabulary of a Hugging Face `tokenizers.Tokenizer`."""
  return compressed_vocab_from_texts(_decoded_texts(tokenizer))


def published_compressed_vocab(tokenizer, expected_size: int | None = None) -> np.ndarray:
  """The published compressed vocabulary of a `tokenizers.Tokenizer`, `[V]` int32.

  As `compressed_vocab_from_tokenizer`, but with the reference's own normaliser
  (`reference_normalizer`), and a token whose decoded text holds U+FFFD is keyed by its
  raw token string (so it may merge with a text key, as in the reference).
  `expected_size` (e.g. V4.1's `engram_compressed_vocab_size`) is checked: the
  multipliers depend on it, so a mismatch is an error.
  """
  texts = _decoded_texts(tokenizer)
  raw = [tokenizer.id_to_token(i) for i in range(len(texts))]
  vocab = compressed_vocab_from_texts(texts, raw, reference_normalizer().normalize_str)
  size = int(vocab.max()) + 1 if vocab.size else 0
  if expected_size is not None and size != int(expected_size):
    raise ValueError(f"compressed vocabulary has {size} entries but "
                     f"{int(expected_size)} were declared: wrong tokenizer for this "
                     f"checkpoint?")
  return vocab


def compressed_vocab_for(tokenizer, mode: str = "engram_jax",
                         expected_size: int | None = None) -> np.ndarray:
  """The compressed vocabulary a hash mode expects (`engram.hash`): the published
  rule, size-checked, for "published"; ours otherwise."""
  if mode == "published":
    return published_compressed_vocab(tokenizer, expected_size or None)
  return compressed_vocab_from_tokenizer(tokenizer)


def identity_vocab(vocab_size: int) -> np.ndarray:
  """The map used when there is no tokenizer (images, toy data)."""
  return np.arange(vocab_size, dtype=np.int32)
