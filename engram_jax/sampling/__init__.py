"""Sampling from trained models: `text` (KV-cached decode in one `lax.scan`), `image`
(class-conditional raster decode with guidance) and `offload` (decode with the Engram
tables in host RAM or on disk). Core: imports only jax, flax and numpy at module level."""
