"""A Hugging Face model folder on disk: config.json plus `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time (memory-mapped by `safetensors`), never the
whole model; writing splits the tensors into shards of at most `max_shard_bytes` with the index HF uses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from transformer.config import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "vocab.json", "merges.txt")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError:
        raise ConfigError("reading and writing Hugging Face folders needs the `safetensors` package: "
                          "pip install -e '.[hf]'") from None
    return safe_open, save_file


class HFFolder:
    """The tensors of one folder: `shapes` and `dtypes` from the file headers (no data read), `read(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"--from-hf {str(self.path)!r} is not a directory; give a Hugging Face model folder")
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"--from-hf {str(self.path)!r} has no {CONFIG}; a Hugging Face model folder holds "
                              f"{CONFIG} and {SINGLE} (or shards listed in {INDEX})")
        try:
            self.config = json.loads((self.path / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.path / CONFIG} is not valid JSON ({e})") from None
        safe_open, _ = _safetensors()
        self._open = safe_open
        self.files = self._files()
        self.shapes, self.dtypes, self._where = {}, {}, {}
        for file in self.files:
            try:
                with safe_open(str(file), "numpy") as f:
                    for name in f.keys():
                        if name in self._where:
                            raise ConfigError(f"tensor {name!r} is in both {self._where[name].name} and {file.name}")
                        piece = f.get_slice(name)
                        self.shapes[name] = tuple(piece.get_shape())
                        self.dtypes[name] = _DTYPES.get(piece.get_dtype(), piece.get_dtype())
                        self._where[name] = file
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None

    def _files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise ConfigError(f"{index} lists {missing[0]!r}, which is not in the folder")
            return [self.path / n for n in names]
        if (self.path / SINGLE).is_file():
            return [self.path / SINGLE]
        raise ConfigError(f"{str(self.path)!r} has neither {SINGLE} nor {INDEX} (PyTorch .bin weights are not read; "
                          "convert them to safetensors first)")

    def read(self, name: str) -> np.ndarray:
        with self._open(str(self._where[name]), "numpy") as f:
            return f.get_tensor(name)


def check_new_dir(path: Path, what: str) -> None:
    """ConfigError unless `path` is absent or an empty directory (nothing a user saved is overwritten)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{what} {str(path)!r} already exists and is not empty; give a new directory")


def write_folder(out: Path, config: dict, tensors, *, max_shard_bytes: int = 5 * 2**30,
                 side_files_from: Path | None = None) -> list[Path]:
    """Write config.json and the (name, array) pairs of `tensors` (an iterable, consumed once) as safetensors
    shards, each written as soon as it is full (host memory holds one shard); the index is written when
    there is more than one shard. Returns the shard paths."""
    _, save_file = _safetensors()
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, np.ndarray] = {}

    def flush():
        path = out / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard), sum(a.nbytes for a in shard.values())))
        shard.clear()

    for name, array in tensors:
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = np.ascontiguousarray(array)
    flush()
    count = len(written)
    names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for (path, _, _), name in zip(written, names):
        path.replace(out / name)
    if count > 1:
        weight_map = {tensor: name for (_, tensors_in, _), name in zip(written, names) for tensor in tensors_in}
        total = sum(size for _, _, size in written)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for side in SIDE_FILES if side_files_from else ():
        if (side_files_from / side).is_file():
            shutil.copy2(side_files_from / side, out / side)
    return [out / n for n in names]
