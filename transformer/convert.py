"""Hugging Face checkpoints in and out of run directories.

    python -m transformer.convert --from-hf DIR --run-dir RUN [a.b=value ...]
    python -m transformer.convert --to-hf RUN --out DIR [--dtype bfloat16] [--max-shard-gb 5]
    python -m transformer.convert --merge RUN --out NEW_RUN

--from-hf reads DIR's config.json and safetensors (one file or shards with model.safetensors.index.json),
maps the config (transformer.hf.configs: Llama, Mistral, Mixtral, Qwen2, GPT-2; anything the library cannot
compute is refused naming the field) and every tensor (transformer.hf.weights), checks every name and shape
against the headers before anything is read or written, and writes RUN: config.json (data: the KJV through the folder's
own tokenizer, data.tokenizer=hf:RUN/hf, when the folder has tokenizer.json or tokenizer.model; otherwise
data.dataset=npy with a placeholder path for token files of the model's tokenizer), a params-only checkpoint at
step 0 (placed on the mesh of `mesh.*`, each device shard read straight from the files) and hf/ (DIR's
config.json and tokenizer files). `a.b=value` overrides change the run's config, e.g. model.dtype=bfloat16,
or model.rope_scaling=yarn model.rope_scaling_factor=4 to extend the context.

A converted run is used as it is by `python -m transformer.evaluate run_dir=RUN` and `python -m
transformer.generate run_dir=RUN`, and fine-tuned from with `python -m transformer.train
checkpoint.init_from=RUN run_dir=NEW ...` (a new run dir: RUN holds no optimizer state).

--to-hf writes the run's newest checkpoint as a folder `transformers` loads (`from_pretrained(DIR)`), in the
dtype of the imported checkpoint (else float32) unless --dtype says otherwise. RUN and DIR must be new or
empty directories: nothing is overwritten.

--merge reads a LoRA run (lora.rank > 0: its base from checkpoint.init_from, its adapters from its newest
checkpoint), folds alpha / r * A B into the base weights and writes NEW_RUN like a converted run (config.json
without lora.*, a params-only checkpoint at step 0, the base's hf/ folder when it has one), for evaluate, generate
and --to-hf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from transformer import distributed, lora, runs, sharding
from transformer.checkpoint import CONFIG_FILE, Checkpointer
from transformer.config import (DTYPES, CheckpointConfig, Config, ConfigError, DataConfig, LoRAConfig, MeshConfig,
                                ModelConfig, apply_overrides, print_help_if_asked)
from transformer.data.tokenizers import check_vocab, load_tokenizer
from transformer.hf import configs, folder as hf_folder, weights
from transformer.model import build_model

HF_DIR = "hf"  # inside a converted run: the source config.json and tokenizer files
NO_DATA = "set-data.paths-to-token-ids.npy"  # a converted run's data: its token ids come from its own tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m transformer.convert", add_help=False, allow_abbrev=False)
    parser.add_argument("--from-hf", metavar="DIR", help="Hugging Face model folder to import")
    parser.add_argument("--run-dir", metavar="RUN", help="new run directory to write (with --from-hf)")
    parser.add_argument("--to-hf", metavar="RUN", help="run directory to export")
    parser.add_argument("--merge", metavar="RUN", help="LoRA run directory whose adapters to fold into its base")
    parser.add_argument("--out", metavar="DIR", help="new Hugging Face folder (--to-hf) or run directory (--merge)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="exported tensor dtype")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest exported safetensors file")
    return parser


def _data_config(folder: hf_folder.HFFolder, run_dir: Path, model: ModelConfig) -> DataConfig:
    """KJV through the folder's own tokenizer (as copied into RUN/hf) when it has one, else npy token files; rows
    no longer than a learned position table."""
    own = run_dir.absolute() / HF_DIR
    seq_len = min(DataConfig.seq_len, model.max_seq_len) if model.position == "learned" else DataConfig.seq_len
    if (folder.path / "tokenizer.json").is_file():
        return DataConfig(dataset="kjv", tokenizer=f"hf:{own}", seq_len=seq_len)
    if (folder.path / "tokenizer.model").is_file():
        return DataConfig(dataset="kjv", tokenizer=f"sentencepiece:{own / 'tokenizer.model'}", seq_len=seq_len)
    return DataConfig(dataset="npy", paths=(NO_DATA,), seq_len=seq_len)


def _check_tokenizer(folder: hf_folder.HFFolder, cfg: Config) -> None:
    """ConfigError when the folder's tokenizer is unreadable or has more tokens than model.vocab_size."""
    if cfg.data.tokenizer == "bytes":
        return
    kind, _, path = cfg.data.tokenizer.partition(":")
    source = f"{kind}:{folder.path / Path(path).name}" if kind == "sentencepiece" else f"{kind}:{folder.path}"
    check_vocab(load_tokenizer(source), cfg.model.vocab_size)


def import_hf(source: str | Path, run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """Convert the HF folder `source` into the new run directory `run_dir` (see the module docstring)."""
    started = time.perf_counter()
    folder = hf_folder.HFFolder(source)
    run_dir = Path(run_dir)
    model = configs.model_config(folder.config)
    cfg = Config(model=model, data=_data_config(folder, run_dir, model), run_dir=str(run_dir))
    cfg = apply_overrides(cfg, list(overrides)).validate()
    _check_tokenizer(folder, cfg)
    hf_folder.check_new_dir(run_dir, "--run-dir")
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.use_mesh(mesh):
        abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))
        abstract, _ = sharding.placed(abstract, mesh)
        weights.check_folder(folder, cfg.model, nnx.to_pure_dict(abstract))
        state = weights.import_state(folder, cfg.model, abstract)
        with Checkpointer(str(run_dir), cfg.checkpoint, config=cfg) as ckpt:
            ckpt.maybe_save(0, {"model": nnx.to_pure_dict(state)}, force=True)
            ckpt.wait_until_finished()
    if jax.process_index() == 0:
        (run_dir / HF_DIR).mkdir(exist_ok=True)
        for name in (hf_folder.CONFIG, *hf_folder.SIDE_FILES):
            if (folder.path / name).is_file():
                shutil.copy2(folder.path / name, run_dir / HF_DIR / name)
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(state)))
        print(f"converted {folder.path} ({folder.config['model_type']}, {params:,} params, "
              f"{len(folder.files)} file(s)) into {run_dir} in {time.perf_counter() - started:.1f} s")
    return cfg


def export_hf(run_dir: str | Path, out: str | Path, *, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write the run's newest checkpoint as a Hugging Face folder `out` (see the module docstring)."""
    from transformer.runs import load_model

    run_dir, out = Path(run_dir), Path(out)
    loaded = load_model(run_dir, architectures=("decoder",))
    saved_path = run_dir / HF_DIR / hf_folder.CONFIG
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    dtype = dtype or (saved or {}).get("torch_dtype") or (saved or {}).get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config = configs.hf_config(loaded.cfg.model, saved=saved, torch_dtype=dtype)
    hf_folder.check_new_dir(out, "--out")
    pure = nnx.to_pure_dict(loaded.state)
    tensors = weights.export_tensors(loaded.cfg.model, pure, np.dtype(jax.numpy.dtype(dtype)))
    return hf_folder.write_folder(out, config, tensors, max_shard_bytes=max_shard_bytes,
                                  side_files_from=run_dir / HF_DIR if saved else None)


def adapted_model(run_dir: str | Path, mesh) -> tuple[Config, nnx.Module]:
    """(config, model with its adapters) of the LoRA run `run_dir`: the base params from its
    checkpoint.init_from, the adapters (and the other non-base state) from its newest checkpoint."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"--merge {str(run_dir)!r} has no {CONFIG_FILE}; give the directory of a LoRA run")
    cfg = Config.from_dict(json.loads(config_path.read_text())).validate()
    if not cfg.lora.rank:
        raise ConfigError(f"--merge {str(run_dir)!r} is not a LoRA run (lora.rank=0): it has no adapters to merge")
    return cfg, runs.adapted_model(run_dir, cfg, mesh)


def merge_lora(run_dir: str | Path, out: str | Path) -> Config:
    """Write the LoRA run `run_dir` with its adapters folded into the base as the new run `out` (module doc)."""
    out = Path(out)
    hf_folder.check_new_dir(out, "--out")
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    cfg, model = adapted_model(run_dir, mesh)
    merged = lora.merge_adapters(model)
    new = dataclasses.replace(cfg, run_dir=str(out), lora=LoRAConfig(), checkpoint=CheckpointConfig()).validate()
    with sharding.use_mesh(mesh), Checkpointer(str(out), new.checkpoint, config=new) as ckpt:
        ckpt.maybe_save(0, {"model": nnx.to_pure_dict(nnx.state(model))}, force=True)
        ckpt.wait_until_finished()
    base_hf = Path(cfg.checkpoint.init_from) / HF_DIR
    if jax.process_index() == 0:
        if base_hf.is_dir():
            shutil.copytree(base_hf, out / HF_DIR)
        print(f"merged {merged} adapters of {run_dir} into {out}")
    return new


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if print_help_if_asked(argv, __doc__ + "\n" + parser.format_help(), presets=False):
        return 0
    args, rest = parser.parse_known_args(argv)
    try:
        unknown = [a for a in rest if a.startswith("-") or "=" not in a]
        if unknown:
            raise ConfigError(f"unknown argument {unknown[0]!r}; see --help")
        if sum(map(bool, (args.from_hf, args.to_hf, args.merge))) != 1:
            raise ConfigError("give exactly one of --from-hf DIR (with --run-dir RUN), --to-hf RUN (with --out DIR) "
                              "or --merge RUN (with --out NEW_RUN)")
        distributed.initialize()
        if args.merge:
            if not args.out or rest:
                raise ConfigError("--merge RUN needs --out NEW_RUN, the new run directory to write, and nothing else")
            merge_lora(args.merge, args.out)
        elif args.from_hf:
            if not args.run_dir:
                raise ConfigError("--from-hf needs --run-dir RUN, the new run directory to write")
            import_hf(args.from_hf, args.run_dir, rest)
        else:
            if not args.out:
                raise ConfigError("--to-hf needs --out DIR, the new Hugging Face folder to write")
            if rest:
                raise ConfigError(f"--to-hf takes no config overrides (got {rest[0]!r})")
            files = export_hf(args.to_hf, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
            print(f"wrote {args.out} ({len(files)} safetensors file(s))")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
