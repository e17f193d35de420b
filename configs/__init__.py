"""The shipped configs, one file per task: `--config=configs/lm.py:tiny`.

Installed with the package as `engram_jax.configs`, so `configs/lm.py:tiny` resolves from
any directory (a notebook in /content, a TPU VM home) when no such file is beside it.
"""
