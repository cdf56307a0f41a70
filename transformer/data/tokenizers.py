"""Tokenizers behind one interface, named by a spec string (`data.tokenizer`):

    bytes                   UTF-8 bytes + PAD, BOS, EOS (transformer.data.tokenizer; needs no file)
    hf:PATH                 a Hugging Face `tokenizer.json` (the file, or a folder holding it), via `tokenizers`
    sentencepiece:PATH      a SentencePiece `.model` file, via `sentencepiece`

Each gives `encode(text) -> int32 ids` (no special tokens added), `decode(ids) -> str` (special tokens dropped),
`vocab_size` and the ids of its BOS / EOS / PAD tokens (None where it has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transformer.config import ConfigError
from transformer.data import tokenizer as byte_tokenizer

KINDS = ("bytes", "hf", "sentencepiece")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer:
    spec: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    def __init__(self):
        self.spec, self.vocab_size = "bytes", byte_tokenizer.VOCAB_SIZE
        self.bos_id, self.eos_id, self.pad_id = byte_tokenizer.BOS, byte_tokenizer.EOS, byte_tokenizer.PAD

    def encode(self, text: str) -> np.ndarray:
        return byte_tokenizer.encode(text)

    def decode(self, ids) -> str:
        return byte_tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1) if i < self.vocab_size])


def _special_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """`tokenizer.json`; BOS / EOS / PAD from `tokenizer_config.json` beside it, else the usual token names."""

    def __init__(self, spec: str, path: Path):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ConfigError(f"data.tokenizer={spec!r} needs the `tokenizers` package") from None
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"data.tokenizer={spec!r}: {str(file)!r} does not exist; give a tokenizer.json or the "
                              "folder holding it")
        try:
            self._backend = Backend.from_file(str(file))
        except Exception as e:
            raise ConfigError(f"data.tokenizer={spec!r}: {str(file)!r} is not a tokenizer.json "
                              f"({str(e).splitlines()[0]})") from None
        self.spec, self.vocab_size = spec, self._backend.get_vocab_size(with_added_tokens=True)
        settings = file.parent / "tokenizer_config.json"
        named = json.loads(settings.read_text()) if settings.is_file() else {}
        self.bos_id = self._find(_special_name(named.get("bos_token")), _BOS_NAMES)
        self.eos_id = self._find(_special_name(named.get("eos_token")), _EOS_NAMES)
        self.pad_id = self._find(_special_name(named.get("pad_token")), _PAD_NAMES)

    def _find(self, configured: str | None, usual: tuple[str, ...]) -> int | None:
        for name in ([configured] if configured else []) + list(usual):
            token = self._backend.token_to_id(name)
            if token is not None:
                return token
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, spec: str, path: Path):
        try:
            import sentencepiece
        except ImportError:
            raise ConfigError(f"data.tokenizer={spec!r} needs the `sentencepiece` package") from None
        if not path.is_file():
            raise ConfigError(f"data.tokenizer={spec!r}: {str(path)!r} does not exist; give a SentencePiece .model file")
        try:
            self._backend = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise ConfigError(f"data.tokenizer={spec!r}: {str(path)!r} is not a SentencePiece model "
                              f"({str(e).splitlines()[0]})") from None
        self.spec, self.vocab_size = spec, self._backend.get_piece_size()
        ids = (self._backend.bos_id(), self._backend.eos_id(), self._backend.pad_id())
        self.bos_id, self.eos_id, self.pad_id = (None if i < 0 else int(i) for i in ids)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._backend.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer `spec` names (see the module docstring); ConfigError naming data.tokenizer otherwise."""
    kind, _, path = spec.partition(":")
    if spec == "bytes":
        return ByteTokenizer()
    if kind not in KINDS[1:] or not path:
        raise ConfigError(f"data.tokenizer={spec!r} is not valid; use bytes, hf:PATH (a tokenizer.json or its folder) "
                          "or sentencepiece:PATH (a .model file)")
    return HFTokenizer(spec, Path(path)) if kind == "hf" else SentencePieceTokenizer(spec, Path(path))


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """ConfigError when the tokenizer can produce ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer={tokenizer.spec!r} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={vocab_size}; use a model with model.vocab_size >= {tokenizer.vocab_size}")
