"""Paired text for seq2seq (data.dataset='pairs'): JSONL files of {"source": str, "target": str} lines, as bytes."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from transformer.config import ConfigError
from transformer.data.corpus import expand_paths
from transformer.data.tokenizer import encode

SUFFIXES = (".jsonl",)


class Pair(NamedTuple):
    source: np.ndarray  # byte tokens, int32
    target: np.ndarray
    where: str  # "file:line"


def load(paths: tuple[str, ...]) -> list[Pair]:
    """Every pair of the files in order (directories give their *.jsonl files, recursively, sorted); blank
    lines are skipped. A line that is not a JSON object with string "source" and "target" is a ConfigError
    naming its file and line."""
    pairs = []
    for path in expand_paths(paths, SUFFIXES):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"data.paths entry {str(path)!r} is not UTF-8 text (byte {error.start})") from None
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); every line of "
                                  'a data.dataset=\'pairs\' file is {"source": "...", "target": "..."}') from None
            if not (isinstance(record, dict) and isinstance(record.get("source"), str)
                    and isinstance(record.get("target"), str)):
                raise ConfigError(f"{where}: expected an object with string fields \"source\" and \"target\", got "
                                  f"{line.strip()[:80]}")
            pairs.append(Pair(encode(record["source"]), encode(record["target"]), where))
    return pairs


def split(pairs: list[Pair], eval_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, heldout): the last `eval_fraction` of the pairs (at least one, leaving at least one) is held out."""
    if len(pairs) < 2:
        raise ConfigError(f"data.paths hold {len(pairs)} source/target pairs; data.dataset='pairs' needs at least 2 "
                          "(training and held out)")
    num_eval = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction)))
    return pairs[:-num_eval], pairs[-num_eval:]


def check_fit(pairs: list[Pair], seq_len: int, target_len: int | None) -> None:
    """ConfigError at the first pair too long for its rows: with `target_len` (encoder-decoder) source + EOS
    within data.seq_len and target + EOS within data.target_len; without (a decoder) BOS source EOS target EOS
    within data.seq_len + 1."""
    for pair in pairs:
        source, target = len(pair.source), len(pair.target)
        if target_len is None and 3 + source + target > seq_len + 1:
            raise ConfigError(f"{pair.where}: a {source}-byte source and {target}-byte target need "
                              f"{3 + source + target} tokens (BOS source EOS target EOS) but data.seq_len={seq_len} "
                              f"gives {seq_len + 1}; raise data.seq_len or shorten the pair")
        if target_len is not None and (source + 1 > seq_len or target + 1 > target_len):
            raise ConfigError(f"{pair.where}: the source + EOS needs {source + 1} tokens of data.seq_len={seq_len} "
                              f"and the target + EOS {target + 1} of the {target_len} decoder tokens (data.target_len; "
                              "0: data.seq_len); raise them or shorten the pair")
