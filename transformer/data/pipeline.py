"""Deterministic step-indexed batches, sharded by process.

Row r of step s is element s * global_batch_size + r of one fixed, infinite grain MapDataset: a per-epoch
index shuffle of the corpus windows (or of the pairs of 'pairs'), or synthetic examples drawn from a Philox RNG
keyed by the element index; the masking or span corruption of an encoder objective draws from an RNG keyed by
the element index too. The global batch of a step therefore depends only on (cfg, step), never on the process
count or on where a run was resumed; process i of n takes rows [i * B / n, (i + 1) * B / n).

What a row holds depends on the objective (data.objective resolved by model.architecture):
- next_token (decoder): inputs and the next tokens; corpus rows are scored everywhere, task rows on the answer.
- mlm (encoder): the masked window, the original tokens scored on the selected positions (objectives.mlm_row).
- span_corruption, seq2seq (encoder_decoder): the decoder side in BATCH_KEYS and the encoder's in SOURCE_KEYS,
  S = data.seq_len, L = Dataset.target_len (objectives.encoder_decoder_row).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import grain
import numpy as np

from transformer.config import ARCHITECTURE_OBJECTIVES, ConfigError, DataConfig
from transformer.data import corpus, objectives, pairs, synthetic
from transformer.data.tokenizer import EOS

SPLITS = ("train", "eval")
BATCH_KEYS = ("inputs_BL", "targets_BL", "loss_mask_BL", "positions_BL", "segment_ids_BL")
SOURCE_KEYS = ("sources_BS", "source_positions_BS", "source_segment_ids_BS")  # encoder_decoder objectives only
ENCODER_DECODER_OBJECTIVES = ARCHITECTURE_OBJECTIVES["encoder_decoder"]


def _row(tokens: np.ndarray, answer_span: tuple[int, int]) -> dict[str, np.ndarray]:
    """Model inputs for one example of L + 1 tokens whose tokens[start:end] are scored and end the real
    part (tokens from `end` on are padding)."""
    start, end = answer_span
    t_L = np.arange(len(tokens) - 1)
    return {
        "inputs_BL": tokens[:-1].astype(np.int32),
        "targets_BL": tokens[1:].astype(np.int32),
        "loss_mask_BL": ((t_L + 1 >= start) & (t_L + 1 < end)).astype(np.float32),
        "positions_BL": t_L.astype(np.int32),
        "segment_ids_BL": (t_L < end).astype(np.int32),
    }


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def _corruption_seed(seed: int, split: str) -> int:
    """Seed of the masking / span-corruption RNG, apart from the window order's."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split), 1]).generate_state(1)[0])


def _indices(count: int, shuffle_seed: int | None) -> grain.MapDataset:
    """0..count-1 repeated forever; reshuffled every epoch when shuffle_seed is given."""
    indices = grain.MapDataset.range(count)
    if shuffle_seed is not None:
        indices = indices.shuffle(seed=shuffle_seed)
    return indices.repeat()


def _window_rows(stream: corpus.TokenStream, seq_len: int, shuffle_seed: int | None) -> grain.MapDataset:
    """Next-token rows of windows of seq_len + 1 tokens at stride seq_len (every token is a target once per
    epoch)."""
    return _indices((len(stream) - 1) // seq_len, shuffle_seed).map(
        lambda k: _row(stream.read(k * seq_len, k * seq_len + seq_len + 1), (1, seq_len + 1)))


def _corrupted_rows(stream: corpus.TokenStream, width: int, transform: Callable, shuffle_seed: int | None,
                    corruption_seed: int) -> grain.MapDataset:
    """transform(window, rng) of the windows of `width` tokens at stride `width`, the RNG keyed by the element."""
    return _indices(len(stream) // width, shuffle_seed).random_map(
        lambda k, rng: transform(stream.read(k * width, (k + 1) * width), rng), seed=corruption_seed)


def _random_rows(cfg: DataConfig, split: str, make_row: Callable) -> grain.MapDataset:
    """An endless dataset whose element i is make_row(rng), rng keyed by (data.seed, split, i)."""
    return grain.MapDataset.range(sys.maxsize).random_map(lambda _, rng: make_row(rng),
                                                          seed=_split_seed(cfg.seed, split))


def _task_rows(cfg: DataConfig, split: str) -> grain.MapDataset:
    return _random_rows(cfg, split, lambda rng: _row(*synthetic.example(cfg, rng)))


def _seq2seq_task_rows(cfg: DataConfig, split: str, target_len: int) -> grain.MapDataset:
    return _random_rows(cfg, split, lambda rng: objectives.seq2seq_row(
        *synthetic.source_target(cfg.dataset, cfg.copy_length, rng), cfg.seq_len, target_len))


def _check_long_enough(stream: corpus.TokenStream, what: str, cfg: DataConfig, width: int | None = None) -> None:
    """`width`: tokens of one window of an encoder objective; None: a next-token window of data.seq_len + 1."""
    if len(stream) < (width or cfg.seq_len + 1):
        needs = (f"data.seq_len + 1 = {cfg.seq_len + 1} one sequence needs" if width is None else
                 f"{width} tokens one window of data.objective needs with data.seq_len={cfg.seq_len}")
        raise ConfigError(f"the {what} of data.dataset={cfg.dataset!r} has {len(stream)} tokens, fewer than the "
                          f"{needs}; use a shorter data.seq_len, more data or another data.eval_fraction")


class Dataset:
    """Batches of one split; see the module docstring for the determinism guarantees. `objective` is the
    resolved data.objective, `target_len` the length L of the rows' decoder side (data.seq_len unless
    encoder_decoder), `keys` the batch keys."""

    def __init__(self, cfg: DataConfig, split: str, rows: grain.MapDataset, eval_rows: Callable[[], grain.MapDataset],
                 heldout: corpus.TokenStream | None = None, *, objective: str = "next_token",
                 target_len: int | None = None):
        self.cfg = cfg
        self.split = split
        self.objective = objective
        self.target_len = target_len or cfg.seq_len
        self.keys = BATCH_KEYS + (SOURCE_KEYS if objective in ENCODER_DECODER_OBJECTIVES else ())
        self._rows = rows
        self._make_eval_rows = eval_rows
        self._heldout = heldout

    @functools.cached_property
    def _eval_rows(self) -> grain.MapDataset:
        return self._make_eval_rows()

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        return self._gather(self._rows, "step", step, process_index, process_count)

    def eval_batch(self, index: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of held-out batch `index` (held-out windows or pairs in order, cycling, corrupted by
        an RNG keyed by the eval split's seed; for synthetic tasks examples from an RNG stream separate from
        training)."""
        return self._gather(self._eval_rows, "index", index, process_index, process_count)

    def eval_sequences(self, seq_len: int, num: int) -> np.ndarray:
        """The first `num` non-overlapping windows of seq_len + 1 tokens of the held-out split, int32."""
        if self._heldout is None:
            kind = "a synthetic task" if self.cfg.dataset in synthetic.TASKS else "paired data"
            raise ValueError(f"eval_sequences needs a text corpus; data.dataset={self.cfg.dataset!r} is {kind} "
                             "(use synthetic.passkey_example or eval_batch)")
        if seq_len < 1 or num < 1:
            raise ValueError(f"eval_sequences(seq_len={seq_len}, num={num}): both must be >= 1")
        needed = num * (seq_len + 1)
        if needed > len(self._heldout):
            raise ValueError(f"eval_sequences(seq_len={seq_len}, num={num}) needs {needed} held-out tokens but the "
                             f"held-out split has {len(self._heldout)} (data.eval_fraction={self.cfg.eval_fraction}); "
                             "ask for fewer or shorter sequences or raise data.eval_fraction")
        return self._heldout.read(0, needed).reshape(num, seq_len + 1)

    def _gather(self, rows: grain.MapDataset, name: str, step: int, process_index: int,
                process_count: int) -> dict[str, np.ndarray]:
        batch_size = self.cfg.global_batch_size
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{name}={step!r} must be an integer >= 0")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ValueError(f"data.global_batch_size={batch_size} is not divisible by process_count={process_count}; "
                             "use a batch size that is a multiple of the process count")
        local = batch_size // process_count
        first = int(step) * batch_size + process_index * local
        examples = [rows[i] for i in range(first, first + local)]
        return {key: np.stack([example[key] for example in examples]) for key in self.keys}


def make_dataset(cfg: DataConfig, split: str = "train", *, vocab_size: int | None = None,
                 architecture: str = "decoder") -> Dataset:
    """The dataset of cfg.dataset for the objective data.objective resolves to with `architecture`
    (model.architecture; ConfigError when they do not fit); `split` "train" or "eval" picks the stream that
    batch() samples. `vocab_size` (model.vocab_size): .npy token ids outside [0, vocab_size) (or in the top ids
    an objective reserves) are refused (ConfigError); mlm and span_corruption need it for their mask and
    sentinel ids."""
    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {', '.join(map(repr, SPLITS))}")
    if cfg.seed < 0:
        raise ConfigError(f"data.seed={cfg.seed} must be >= 0")
    objective = cfg.check_architecture(architecture)
    if cfg.tokenizer != "bytes" and (objective != "next_token" or cfg.dataset not in ("kjv", "text", "npy")):
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} tokenizes the kjv and text corpora for next-token "
                          f"training; data.dataset={cfg.dataset!r} with data.objective={objective!r} uses the byte "
                          "tokenizer's special tokens: set data.tokenizer=bytes")
    if objective in ("mlm", "span_corruption") and vocab_size is None:
        raise ValueError(f"make_dataset(vocab_size=None): data.objective={objective!r} needs the model's vocab_size "
                         "(its mask or sentinel ids); pass vocab_size=cfg.model.vocab_size")
    if objective != "next_token":
        objectives.check_objective(cfg, objective, vocab_size)
    if cfg.dataset == "pairs":
        return _pairs_dataset(cfg, split, objective)
    if cfg.dataset in synthetic.TASKS and objective == "seq2seq":
        target_len = objectives.target_length(cfg, objective)
        return Dataset(cfg, split, _seq2seq_task_rows(cfg, split, target_len),
                       lambda: _seq2seq_task_rows(cfg, "eval", target_len), objective=objective, target_len=target_len)
    if cfg.dataset in synthetic.TASKS:
        synthetic.check_config(cfg)
        return Dataset(cfg, split, _task_rows(cfg, split), lambda: _task_rows(cfg, "eval"))
    stream = corpus.load(cfg, vocab_size, objectives.reserved_top_ids(cfg, objective))
    train, heldout = stream.split(cfg.eval_fraction)
    chosen = train if split == "train" else heldout
    if objective == "next_token":
        _check_long_enough(chosen, f"{split} split", cfg)

        def eval_rows() -> grain.MapDataset:
            _check_long_enough(heldout, "held-out split", cfg)
            return _window_rows(heldout, cfg.seq_len, shuffle_seed=None)

        return Dataset(cfg, split, _window_rows(chosen, cfg.seq_len, _split_seed(cfg.seed, split)), eval_rows, heldout)
    width, transform = objectives.window_transform(cfg, objective, vocab_size)

    def corrupted_rows(stream: corpus.TokenStream, what: str, rows_split: str, shuffle: bool) -> grain.MapDataset:
        _check_long_enough(stream, what, cfg, width)
        return _corrupted_rows(stream, width, transform, _split_seed(cfg.seed, rows_split) if shuffle else None,
                               _corruption_seed(cfg.seed, rows_split))

    return Dataset(cfg, split, corrupted_rows(chosen, f"{split} split", split, shuffle=True),
                   lambda: corrupted_rows(heldout, "held-out split", "eval", shuffle=False), heldout,
                   objective=objective, target_len=objectives.target_length(cfg, objective))


def _pairs_dataset(cfg: DataConfig, split: str, objective: str) -> Dataset:
    """Pairs of the JSONL files: seq2seq rows (source + EOS; target + EOS), or for a decoder the prompt
    source + EOS and the scored answer target + EOS. The tail data.eval_fraction of the pairs is held out."""
    train, heldout = pairs.split(pairs.load(cfg.paths), cfg.eval_fraction)
    if objective == "seq2seq":
        target_len = objectives.target_length(cfg, objective)

        def row(pair: pairs.Pair) -> dict[str, np.ndarray]:
            return objectives.seq2seq_row(pair.source, pair.target, cfg.seq_len, target_len)
    else:
        target_len = None

        def row(pair: pairs.Pair) -> dict[str, np.ndarray]:
            return _row(*synthetic.assemble(cfg.seq_len + 1, np.append(pair.source, EOS),
                                            np.append(pair.target, EOS), pair.where))
    pairs.check_fit(train + heldout, cfg.seq_len, target_len)

    def rows(chosen: list[pairs.Pair], shuffle_seed: int | None) -> grain.MapDataset:
        return _indices(len(chosen), shuffle_seed).map(lambda k: row(chosen[k]))

    chosen = train if split == "train" else heldout
    return Dataset(cfg, split, rows(chosen, _split_seed(cfg.seed, split)), lambda: rows(heldout, None),
                   objective=objective, target_len=target_len)
