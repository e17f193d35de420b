"""One check shared by every "cached decode equals the full forward" test."""
import jax
import numpy as np

from engram_jax.sampling import text


def assert_cached_equals_full(model, variables, seq_BxT, lengths_B, full_BxTxV,
                              prompt_len: int, steps: int, *extra, rtol=2e-4, atol=2e-4):
  """Prefill each row's first `lengths_B[b]` tokens (padded to `prompt_len`), force the
  next `steps` tokens through cached decode steps, and compare each step's logits with
  the full forward's at the same position (`extra`: more `teacher_forced_logits` args)."""
  seq, lengths = np.asarray(seq_BxT), np.asarray(lengths_B)
  prompt = np.where(np.arange(prompt_len)[None] < lengths[:, None], seq[:, :prompt_len], 0)
  forced = np.stack([seq[b, lengths[b]:lengths[b] + steps] for b in range(len(seq))])
  cached = jax.jit(text.teacher_forced_logits, static_argnums=0)(
      model, variables, prompt, lengths, forced, *extra)
  full = np.asarray(full_BxTxV)
  for b in range(len(seq)):
    # the logits after feeding the token at position p predict p+1: compare position-wise
    np.testing.assert_allclose(cached[b], full[b, lengths[b]:lengths[b] + steps],
                               rtol=rtol, atol=atol)
