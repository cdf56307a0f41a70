"""Data: byte-level tokenizer, offline corpora, synthetic tasks, paired text, the encoder objectives (masked
LM, span corruption) and deterministic step-indexed batches."""

from transformer.data.pipeline import Dataset, make_dataset

__all__ = ["Dataset", "make_dataset"]
