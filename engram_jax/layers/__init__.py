"""Flax linen building blocks: norms, attention, MLP, Engram."""
