"""Byte-level tokenizer: UTF-8 bytes are tokens 0..255, plus PAD, BOS and EOS. Needs no vocabulary file.

MASK, the masked-LM mask token, is id VOCAB_SIZE: a model trained with data.objective='mlm' on bytes needs
model.vocab_size >= 260. Text never encodes to it."""

from __future__ import annotations

import numpy as np

PAD = 256
BOS = 257
EOS = 258
VOCAB_SIZE = 259
MASK = 259
SPECIAL_TOKENS = (PAD, BOS, EOS)


def encode(text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 tokens, optionally wrapped in BOS ... EOS."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    return np.concatenate([[BOS] * bos, ids, [EOS] * eos]).astype(np.int32)


def decode(ids) -> str:
    """Text of byte tokens; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"decode needs integer token ids, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= VOCAB_SIZE)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the byte vocabulary [0, {VOCAB_SIZE})")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
