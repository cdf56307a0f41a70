"""Synthetic tasks for length generalisation: copy, reverse, sort, associative recall, passkey retrieval.

Every example is exactly `length` tokens: BOS, a prompt, the answer, then PAD. It comes with its answer
span (start, end): tokens[start:end] is the answer, the only part that is scored. Copy, reverse and sort
are also (source, target) pairs for encoder-decoder models (`source_target`).
"""

from __future__ import annotations

import numpy as np

from transformer.config import ConfigError, DataConfig
from transformer.data.tokenizer import BOS, EOS, PAD, encode

TASKS = ("copy", "associative_recall", "passkey", "reverse", "sort")
BYTE_TASKS = {"copy": np.copy, "reverse": np.flip, "sort": np.sort}  # task: its target from the source bytes
COPY_SEPARATOR = EOS
KEY_LETTERS = 3  # associative recall keys: 3 lowercase letters
VALUE_DIGITS = 2
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is "

Example = tuple[np.ndarray, tuple[int, int]]


def assemble(length: int, prompt: np.ndarray, answer: np.ndarray, what: str) -> Example:
    """BOS, prompt, answer, PAD... as `length` tokens with the answer's span."""
    needed = 1 + len(prompt) + len(answer)
    if needed > length:
        raise ValueError(f"{what} needs {needed} tokens but length={length}")
    tokens = np.full(length, PAD, np.int32)
    tokens[0] = BOS
    tokens[1:needed] = np.concatenate([prompt, answer])
    return tokens, (needed - len(answer), needed)


def source_target(task: str, copy_length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`copy_length` random bytes and their copy, reversal or sorted order (task 'copy', 'reverse', 'sort')."""
    source = rng.integers(0, 256, copy_length, dtype=np.int32)
    return source, BYTE_TASKS[task](source).astype(np.int32)


def copy_example(length: int, copy_length: int, rng: np.random.Generator, task: str = "copy") -> Example:
    """BOS x_1..x_n EOS y_1..y_n PAD...: random bytes, a separator, and y, their copy (or reversal or sorted
    order for task 'reverse' or 'sort'): the answer."""
    source, answer = source_target(task, copy_length, rng)
    prompt = np.concatenate([source, [COPY_SEPARATOR]]).astype(np.int32)
    return assemble(length, prompt, answer, f"{task} with copy_length={copy_length}")


def associative_recall_example(length: int, num_pairs: int, rng: np.random.Generator) -> Example:
    """BOS "abc:12 xyz:34 ... ? xyz:" then the queried value "34" (the answer)."""
    max_pairs = 26 ** KEY_LETTERS
    if not 1 <= num_pairs <= max_pairs:
        raise ValueError(f"num_pairs={num_pairs} must be in [1, {max_pairs}]")
    codes = rng.choice(max_pairs, num_pairs, replace=False)
    keys = ["".join(chr(ord("a") + code // 26 ** i % 26) for i in range(KEY_LETTERS)) for code in codes]
    values = ["".join(map(str, rng.integers(0, 10, VALUE_DIGITS))) for _ in keys]
    query = int(rng.integers(num_pairs))
    prompt = " ".join(f"{k}:{v}" for k, v in zip(keys, values)) + f" ? {keys[query]}:"
    return assemble(length, encode(prompt), encode(values[query]), f"associative recall with num_pairs={num_pairs}")


def passkey_example(length: int, depth: float, rng: np.random.Generator, *, digits: int = 5) -> Example:
    """Filler text with "The pass key is 12345. Remember it." at `depth` in [0, 1] of the filler (snapped to the
    nearest filler sentence start), then QUESTION; the answer is the digits, ending the sequence."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    key = "".join(map(str, rng.integers(0, 10, digits)))
    filler_len = length - _passkey_min_length(digits)
    if filler_len < 0:
        raise ValueError(f"passkey with digits={digits} needs at least {_passkey_min_length(digits)} tokens "
                         f"but length={length}")
    filler = FILLER * (filler_len // len(FILLER) + 1)
    starts = [base + s for base in range(0, filler_len, len(FILLER)) for s in _SENTENCE_STARTS
              if base + s < filler_len] + [filler_len]
    cut = min(starts, key=lambda s: abs(s - depth * filler_len))
    prompt = filler[:cut] + _key_sentence(key) + filler[cut:filler_len] + QUESTION
    return assemble(length, encode(prompt), encode(key), f"passkey with digits={digits}")


_SENTENCE_STARTS = [0] + [i + 2 for i, ch in enumerate(FILLER[:-2]) if ch == "."]


def _key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. "


def _passkey_min_length(digits: int) -> int:
    return 1 + len(_key_sentence("0" * digits)) + len(QUESTION) + digits


def required_length(cfg: DataConfig) -> int:
    """Tokens one example of cfg.dataset needs (BOS, prompt and answer)."""
    if cfg.dataset in BYTE_TASKS:
        return 2 + 2 * cfg.copy_length
    if cfg.dataset == "associative_recall":
        return 1 + cfg.num_pairs * (KEY_LETTERS + VALUE_DIGITS + 2) + 2 + KEY_LETTERS + 1 + VALUE_DIGITS
    if cfg.dataset == "passkey":
        return _passkey_min_length(cfg.passkey_digits)
    raise ConfigError(f"data.dataset={cfg.dataset!r} is not a synthetic task; choose one of {', '.join(TASKS)}")


def check_config(cfg: DataConfig) -> None:
    """Raise ConfigError unless every example of cfg.dataset fits in data.seq_len + 1 tokens."""
    field = {"associative_recall": "num_pairs", "passkey": "passkey_digits"}.get(cfg.dataset, "copy_length")
    value = getattr(cfg, field)
    if value < 1:
        raise ConfigError(f"data.{field}={value} must be >= 1")
    if cfg.dataset == "associative_recall" and value > 26 ** KEY_LETTERS:
        raise ConfigError(f"data.num_pairs={value} exceeds the {26 ** KEY_LETTERS} distinct keys")
    needed = required_length(cfg)
    if needed > cfg.seq_len + 1:
        raise ConfigError(f"data.dataset={cfg.dataset!r} with data.{field}={value} needs {needed} tokens per sequence "
                          f"but data.seq_len={cfg.seq_len} gives {cfg.seq_len + 1}; set data.seq_len >= {needed - 1} "
                          f"or lower data.{field}")


def example(cfg: DataConfig, rng: np.random.Generator) -> Example:
    """One example of cfg.dataset with data.seq_len + 1 tokens (passkey depth drawn uniformly)."""
    length = cfg.seq_len + 1
    if cfg.dataset in BYTE_TASKS:
        return copy_example(length, cfg.copy_length, rng, cfg.dataset)
    if cfg.dataset == "associative_recall":
        return associative_recall_example(length, cfg.num_pairs, rng)
    if cfg.dataset == "passkey":
        return passkey_example(length, float(rng.random()), rng, digits=cfg.passkey_digits)
    raise ConfigError(f"data.dataset={cfg.dataset!r} is not a synthetic task; choose one of {', '.join(TASKS)}")
