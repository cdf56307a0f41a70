"""Inference: KV cache, prefill and decode, sampling, speculative decoding, generation."""
