"""Data: byte-level tokenizer, offline corpora, synthetic tasks and deterministic step-indexed batches."""

from transformer.data.pipeline import Dataset, make_dataset

__all__ = ["Dataset", "make_dataset"]
