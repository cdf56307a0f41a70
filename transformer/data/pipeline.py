"""Deterministic step-indexed batches, sharded by process.

Row r of step s is element s * global_batch_size + r of one fixed, infinite grain MapDataset: a per-epoch
index shuffle of the corpus windows, or synthetic examples drawn from a Philox RNG keyed by the element
index. The global batch of a step therefore depends only on (cfg, step), never on the process count or on
where a run was resumed; process i of n takes rows [i * B / n, (i + 1) * B / n).
"""

from __future__ import annotations

import functools
import sys

import grain
import numpy as np

from transformer.config import ConfigError, DataConfig
from transformer.data import corpus, synthetic

SPLITS = ("train", "eval")
BATCH_KEYS = ("inputs_BL", "targets_BL", "loss_mask_BL", "positions_BL", "segment_ids_BL")


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


def _window_rows(stream: corpus.TokenStream, seq_len: int, shuffle_seed: int | None) -> grain.MapDataset:
    """Windows of seq_len + 1 tokens at stride seq_len (every token is a target once per epoch), repeated
    forever; reshuffled every epoch when shuffle_seed is given."""
    windows = grain.MapDataset.range((len(stream) - 1) // seq_len)
    if shuffle_seed is not None:
        windows = windows.shuffle(seed=shuffle_seed)
    return windows.repeat().map(
        lambda k: _row(stream.read(k * seq_len, k * seq_len + seq_len + 1), (1, seq_len + 1)))


def _task_rows(cfg: DataConfig, split: str) -> grain.MapDataset:
    return grain.MapDataset.range(sys.maxsize).random_map(
        lambda _, rng: _row(*synthetic.example(cfg, rng)), seed=_split_seed(cfg.seed, split))


def _check_long_enough(stream: corpus.TokenStream, what: str, cfg: DataConfig) -> None:
    if len(stream) < cfg.seq_len + 1:
        raise ConfigError(f"the {what} of data.dataset={cfg.dataset!r} has {len(stream)} tokens, fewer than the "
                          f"data.seq_len + 1 = {cfg.seq_len + 1} one sequence needs; use a shorter data.seq_len, "
                          "more data or another data.eval_fraction")


class Dataset:
    """Batches of one split; see the module docstring for the determinism guarantees."""

    def __init__(self, cfg: DataConfig, split: str, rows: grain.MapDataset, heldout: corpus.TokenStream | None):
        self.cfg = cfg
        self.split = split
        self._rows = rows
        self._heldout = heldout

    @functools.cached_property
    def _eval_rows(self) -> grain.MapDataset:
        if self._heldout is None:
            return _task_rows(self.cfg, "eval")
        _check_long_enough(self._heldout, "held-out split", self.cfg)
        return _window_rows(self._heldout, self.cfg.seq_len, shuffle_seed=None)

    def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        return self._gather(self._rows, "step", step, process_index, process_count)

    def eval_batch(self, index: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of held-out batch `index` (held-out windows in order, cycling; for synthetic tasks
        examples from an RNG stream separate from training)."""
        return self._gather(self._eval_rows, "index", index, process_index, process_count)

    def eval_sequences(self, seq_len: int, num: int) -> np.ndarray:
        """The first `num` non-overlapping windows of seq_len + 1 tokens of the held-out split, int32."""
        if self._heldout is None:
            raise ValueError(f"eval_sequences needs a text corpus; data.dataset={self.cfg.dataset!r} is a synthetic "
                             "task (use synthetic.passkey_example or eval_batch)")
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
        return {key: np.stack([example[key] for example in examples]) for key in BATCH_KEYS}


def make_dataset(cfg: DataConfig, split: str = "train", *, vocab_size: int | None = None) -> Dataset:
    """The dataset of cfg.dataset; `split` "train" or "eval" picks the token stream that batch() samples.
    `vocab_size` (model.vocab_size): .npy token ids outside [0, vocab_size) are refused (ConfigError)."""
    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {', '.join(map(repr, SPLITS))}")
    if cfg.seed < 0:
        raise ConfigError(f"data.seed={cfg.seed} must be >= 0")
    if cfg.dataset in synthetic.TASKS:
        synthetic.check_config(cfg)
        return Dataset(cfg, split, _task_rows(cfg, split), heldout=None)
    train, heldout = corpus.load(cfg, vocab_size).split(cfg.eval_fraction)
    stream = train if split == "train" else heldout
    _check_long_enough(stream, f"{split} split", cfg)
    return Dataset(cfg, split, _window_rows(stream, cfg.seq_len, _split_seed(cfg.seed, split)), heldout)
