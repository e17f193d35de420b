"""engram_jax: Engram conditional memory (hashed n-gram tables) in JAX/Flax."""
__version__ = "0.1.0"
