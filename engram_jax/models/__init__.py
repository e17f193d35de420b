"""Models built from engram_jax.layers."""
