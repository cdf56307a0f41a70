"""Tokenize a text corpus once into sharded token files that `data.dataset=npy` reads.

    python -m transformer.pretokenize --tokenizer hf:~/models/llama/tokenizer.json --out data/kjv-llama FILES_OR_DIRS...

Documents are the text files (`.txt`, `.md`; directories give theirs, recursively) and the lines of `.jsonl`
files (their "text" field). Each document's ids are followed by the tokenizer's EOS (the document boundary
that segment ids and packing use). Shards `tokens-00000.npy`, ... hold at most --shard-tokens ids each, as
uint16 when the vocabulary fits, else uint32, and `pretokenized.json` records the tokenizer, its vocabulary
size, EOS id, the source files and the token count. Shards are written under OUT.partial, renamed to OUT
when complete. Train on them with
`data.dataset=npy data.paths=OUT model.vocab_size=>= the vocabulary`. OUT must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from transformer.config import ConfigError
from transformer.data.corpus import TEXT_SUFFIXES, expand_paths
from transformer.data.tokenizers import Tokenizer, load_tokenizer
from transformer.hf.folder import check_new_dir

MANIFEST = "pretokenized.json"


def documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() != ".jsonl":
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}:{number} is not a JSON object with a \"text\" field") from None
            yield text


def pretokenize(tokenizer: Tokenizer, paths: list[str], out: Path, *, shard_tokens: int = 100_000_000) -> dict:
    """Write the shards and the manifest (see the module docstring); returns the manifest."""
    if tokenizer.eos_id is None:
        raise ConfigError(f"--tokenizer {tokenizer.spec!r} has no EOS token to end documents with")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {shard_tokens} must be >= 1")
    files = expand_paths(tuple(paths), (*TEXT_SUFFIXES, ".jsonl"))
    check_new_dir(out, "--out")
    final, out = out, out.with_name(out.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        manifest = _write(tokenizer, files, out, shard_tokens)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()
    out.replace(final)
    return manifest


def _write(tokenizer: Tokenizer, files: list[Path], out: Path, shard_tokens: int) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    pieces, pending, shards, total, count = [], 0, [], 0, 0

    def write(ids):
        shards.append(f"tokens-{len(shards):05d}.npy")
        np.save(out / shards[-1], ids)

    for text in documents(files):
        pieces.append(np.append(tokenizer.encode(text), tokenizer.eos_id).astype(dtype))
        count, total, pending = count + 1, total + len(pieces[-1]), pending + len(pieces[-1])
        if pending >= shard_tokens:
            buffer = np.concatenate(pieces)
            while len(buffer) >= shard_tokens:
                write(buffer[:shard_tokens])
                buffer = buffer[shard_tokens:]
            pieces, pending = [buffer], len(buffer)
    if pending:
        write(np.concatenate(pieces))
    manifest = {"tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "dtype": np.dtype(dtype).name, "documents": count, "tokens": total, "shards": shards,
                "sources": [str(f) for f in files]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformer.pretokenize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--tokenizer", required=True, help="bytes, hf:PATH or sentencepiece:PATH")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the shards")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="token ids per shard file at most")
    parser.add_argument("paths", nargs="+", help="text files, .jsonl files or directories")
    args = parser.parse_args(argv)
    try:
        manifest = pretokenize(load_tokenizer(args.tokenizer), args.paths, args.out, shard_tokens=args.shard_tokens)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{manifest['documents']} documents, {manifest['tokens']:,} tokens in {len(manifest['shards'])} shard(s) "
          f"under {args.out} (vocabulary {manifest['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
