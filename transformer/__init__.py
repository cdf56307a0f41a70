"""Sharded JAX/Flax NNX transformer language models."""
