"""Encoder objectives: BERT masked-LM rows and T5 span corruption of corpus windows, and encoder-decoder rows.

Special ids. Byte corpora (kjv, text) use the tokenizer's PAD, BOS, EOS and MASK (259), and a window packs
documents: a new one starts after each EOS. A pre-tokenized corpus (npy) has its own specials, unknown here: its
mask token is the top id vocab_size - 1 and a window is one document. T5 sentinel i is vocab_size - 1 - i on
every corpus (as ByT5). An npy corpus must not use the top ids its objective reserves (`reserved_top_ids`;
checked when it loads). Encoder-decoder rows pad with PAD, end source and target with EOS and start the decoder
with BOS on every dataset, npy included (where those ids may also be ordinary tokens of its tokenizer).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from transformer.config import ConfigError, DataConfig
from transformer.data import synthetic
from transformer.data.tokenizer import BOS, EOS, MASK, PAD, VOCAB_SIZE

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the rest stay unchanged
BYTES = 256  # byte corpora: only bytes are selected, random replacements are bytes
TARGET_LEN_MULTIPLE = 8  # derived data.target_len is rounded up to this

Row = dict[str, np.ndarray]


# ---------------------------------------------------------------- masked LM (BERT)


def mask_id(dataset: str, vocab_size: int) -> int:
    """The mask token of data.dataset: tokenizer.MASK on byte corpora, the top id on npy corpora."""
    return vocab_size - 1 if dataset == "npy" else MASK


def mask_tokens(tokens_L: np.ndarray, maskable_L: np.ndarray, rate: float, rng: np.random.Generator, *,
                mask: int, random_high: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT's corruption of one row: (inputs_L, selected_L). round(rate * maskable count) of the maskable
    positions (at least one when any is) are selected uniformly; each becomes `mask` (80%), a uniform id in
    [0, random_high) (10%; it may draw the original) or stays itself (10%)."""
    candidates = np.flatnonzero(maskable_L)
    count = max(1, round(rate * len(candidates))) if len(candidates) else 0
    chosen = rng.choice(candidates, count, replace=False)
    action = rng.random(count)
    inputs_L = tokens_L.astype(np.int32)
    inputs_L[chosen[action < MASK_SHARE]] = mask
    replaced = chosen[action >= 1 - RANDOM_SHARE]
    inputs_L[replaced] = rng.integers(0, random_high, len(replaced))
    selected_L = np.zeros(len(tokens_L), bool)
    selected_L[chosen] = True
    return inputs_L, selected_L


def documents(tokens_L: np.ndarray, eos: int = EOS) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids_L from 1, positions_L from 0 in each) of the documents packed in a row: a new one starts
    after each `eos`."""
    starts_L = np.concatenate([[True], tokens_L[:-1] == eos])
    t_L = np.arange(len(tokens_L))
    positions_L = t_L - np.maximum.accumulate(np.where(starts_L, t_L, 0))
    return np.cumsum(starts_L).astype(np.int32), positions_L.astype(np.int32)


def mlm_row(window_L: np.ndarray, cfg: DataConfig, vocab_size: int, rng: np.random.Generator) -> Row:
    """The masked-LM row of a corpus window of data.seq_len tokens (`mask_tokens` at data.mask_rate): byte
    corpora select bytes (not EOS) and draw random bytes; npy corpora select any id and draw ids below the mask
    token. Scored on the selected positions only."""
    L = len(window_L)
    if cfg.dataset == "npy":
        maskable_L, random_high = np.ones(L, bool), vocab_size - 1
        segment_ids_L, positions_L = np.ones(L, np.int32), np.arange(L, dtype=np.int32)
    else:
        maskable_L, random_high = window_L < BYTES, BYTES
        segment_ids_L, positions_L = documents(window_L)
    inputs_L, selected_L = mask_tokens(window_L, maskable_L, cfg.mask_rate, rng, mask=mask_id(cfg.dataset, vocab_size),
                                       random_high=random_high)
    return {"inputs_BL": inputs_L, "targets_BL": window_L.astype(np.int32),
            "loss_mask_BL": selected_L.astype(np.float32), "positions_BL": positions_L,
            "segment_ids_BL": segment_ids_L}


# ---------------------------------------------------------------- span corruption (T5)


class SpanLayout(NamedTuple):
    """Fixed lengths of span corruption: every window has raw_len tokens, num_noise of them corrupted, in
    num_spans spans."""

    raw_len: int
    num_noise: int
    num_spans: int

    @property
    def source_len(self) -> int:
        """Encoder input: the kept tokens, a sentinel per span, EOS."""
        return self.raw_len - self.num_noise + self.num_spans + 1

    @property
    def target_tokens(self) -> int:
        """Decoder target: a sentinel and the tokens of each span, EOS."""
        return self.num_noise + self.num_spans + 1


def _layout(raw_len: int, noise_density: float, mean_span_length: float) -> SpanLayout:
    num_noise = min(max(round(raw_len * noise_density), 1), raw_len - 1)
    return SpanLayout(raw_len, num_noise, max(round(num_noise / mean_span_length), 1))


def span_layout(cfg: DataConfig) -> SpanLayout:
    """T5's counts (random_spans_noise_mask) for the longest window whose encoder input fits data.seq_len
    (compute_input_and_target_lengths): noise = round(n * noise_density) within [1, n - 1],
    spans = max(1, round(noise / mean_span_length))."""
    def fits(raw_len: int) -> bool:
        return _layout(raw_len, cfg.noise_density, cfg.mean_span_length).source_len <= cfg.seq_len

    if not fits(2):
        raise ConfigError(f"data.seq_len={cfg.seq_len} is too short for span corruption: the shortest window's "
                          f"encoder input needs {_layout(2, cfg.noise_density, cfg.mean_span_length).source_len}")
    low, high = 2, 4
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    layout = _layout(low, cfg.noise_density, cfg.mean_span_length)
    kept = layout.raw_len - layout.num_noise
    if layout.num_spans > kept:
        raise ConfigError(f"data.noise_density={cfg.noise_density} with data.mean_span_length={cfg.mean_span_length} "
                          f"makes {layout.num_spans} noise spans in a window of {layout.raw_len} but only {kept} kept "
                          "tokens to separate them; lower data.noise_density or raise data.mean_span_length")
    return layout


def _random_lengths(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (each >= 1) of a uniformly random split of `total` items into `parts` runs."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(layout: SpanLayout, rng: np.random.Generator) -> np.ndarray:
    """is_noise over a window (T5's random_spans_noise_mask): num_spans runs of kept tokens, each followed by a
    noise span; both sets of run lengths are random splits of their totals."""
    noise = _random_lengths(layout.num_noise, layout.num_spans, rng)
    kept = _random_lengths(layout.raw_len - layout.num_noise, layout.num_spans, rng)
    return np.repeat(np.tile([False, True], layout.num_spans), np.stack([kept, noise], axis=1).reshape(-1))


def sentinel(vocab_size: int, i):
    """T5 sentinel i (an int or an array of them): vocab_size - 1 - i, from the top of the vocabulary (as ByT5)."""
    return vocab_size - 1 - i


def corrupt_spans(tokens: np.ndarray, is_noise: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """T5's (source, target): the source is the tokens with noise span i replaced by sentinel i
    (vocab_size - 1 - i), then EOS; the target is each sentinel followed by its span's tokens, then EOS."""
    starts = is_noise & ~np.concatenate([[False], is_noise[:-1]])
    source = np.where(starts, sentinel(vocab_size, np.cumsum(starts) - 1), tokens)[~is_noise | starts]
    sentinels = sentinel(vocab_size, np.arange(starts.sum()))
    target = np.insert(tokens[is_noise], (np.cumsum(is_noise) - 1)[starts], sentinels)
    return np.append(source, EOS).astype(np.int32), np.append(target, EOS).astype(np.int32)


def reconstruct(source: np.ndarray, target: np.ndarray, vocab_size: int) -> np.ndarray:
    """The tokens a `corrupt_spans` pair came from (source and target without padding, each ending in EOS):
    every sentinel of the source replaced by the tokens after the same sentinel in the target."""
    if len(source) == 0 or len(target) == 0 or source[-1] != EOS or target[-1] != EOS:
        raise ValueError("reconstruct needs a source and a target that each end in EOS (padding removed)")
    spans: list[list[int]] = []
    for token in target[:-1].tolist():
        if token == sentinel(vocab_size, len(spans)):
            spans.append([])
        elif not spans:
            raise ValueError(f"the target starts with {token}, not sentinel 0 = {vocab_size - 1}")
        else:
            spans[-1].append(token)
    tokens, used = [], 0
    for token in source[:-1].tolist():
        if used < len(spans) and token == sentinel(vocab_size, used):
            tokens += spans[used]
            used += 1
        else:
            tokens.append(token)
    if used != len(spans):
        raise ValueError(f"the target has {len(spans)} sentinels but the source {used}")
    return np.array(tokens, np.int32)


def span_corruption_row(window: np.ndarray, layout: SpanLayout, vocab_size: int, source_len: int, target_len: int,
                        rng: np.random.Generator) -> Row:
    """The encoder-decoder row of a corpus window of layout.raw_len tokens (`noise_mask`, `corrupt_spans`)."""
    source, target = corrupt_spans(window, noise_mask(layout, rng), vocab_size)
    return encoder_decoder_row(source, target, source_len, target_len)


# ---------------------------------------------------------------- encoder-decoder rows


def _padded(tokens: np.ndarray, length: int) -> np.ndarray:
    if len(tokens) > length:
        raise ValueError(f"{len(tokens)} tokens do not fit in {length}")
    return np.concatenate([tokens, np.full(length - len(tokens), PAD)]).astype(np.int32)


def encoder_decoder_row(source: np.ndarray, target: np.ndarray, source_len: int, target_len: int) -> Row:
    """`source` right-padded to source_len for the encoder; teacher forcing on `target` right-padded to
    target_len: inputs BOS + targets[:-1], scored on the real target tokens."""
    sources_S, targets_L = _padded(source, source_len), _padded(target, target_len)
    s_S, t_L = np.arange(source_len, dtype=np.int32), np.arange(target_len, dtype=np.int32)
    real_L = t_L < len(target)
    return {"inputs_BL": np.concatenate([[BOS], targets_L[:-1]]).astype(np.int32), "targets_BL": targets_L,
            "loss_mask_BL": real_L.astype(np.float32), "positions_BL": t_L, "segment_ids_BL": real_L.astype(np.int32),
            "sources_BS": sources_S, "source_positions_BS": s_S,
            "source_segment_ids_BS": (s_S < len(source)).astype(np.int32)}


def seq2seq_row(source: np.ndarray, target: np.ndarray, source_len: int, target_len: int) -> Row:
    """The encoder-decoder row of a (source, target) pair of byte strings: source + EOS, target + EOS."""
    return encoder_decoder_row(np.append(source, EOS), np.append(target, EOS), source_len, target_len)


# ---------------------------------------------------------------- lengths and checks


def target_length(cfg: DataConfig, objective: str) -> int:
    """Decoder tokens per row: data.seq_len for the single-stack objectives; for encoder_decoder data.target_len,
    or when it is 0 the targets' length (span corruption: noise + spans + 1, copy/reverse/sort: copy_length + 1)
    rounded up to a multiple of TARGET_LEN_MULTIPLE, or data.seq_len for pairs."""
    if objective in ("next_token", "mlm"):
        return cfg.seq_len
    if cfg.target_len:
        return cfg.target_len
    if cfg.dataset == "pairs":
        return cfg.seq_len
    needed = span_layout(cfg).target_tokens if objective == "span_corruption" else cfg.copy_length + 1
    return -(-needed // TARGET_LEN_MULTIPLE) * TARGET_LEN_MULTIPLE


def reserved_top_ids(cfg: DataConfig, objective: str) -> int:
    """Top ids of the vocabulary `objective` takes on cfg.dataset: span corruption's sentinels, an npy corpus's
    mask token."""
    if objective == "span_corruption":
        return span_layout(cfg).num_spans
    return int(objective == "mlm" and cfg.dataset == "npy")


def min_vocab_size(cfg: DataConfig, objective: str) -> int:
    """The smallest model.vocab_size `objective` works with on cfg.dataset."""
    if objective == "span_corruption":
        return MASK + 1 + span_layout(cfg).num_spans
    if objective == "mlm":
        return 2 if cfg.dataset == "npy" else MASK + 1
    return 1 if cfg.dataset == "npy" else VOCAB_SIZE


def check_objective(cfg: DataConfig, objective: str, vocab_size: int | None = None) -> None:
    """ConfigError unless the lengths of `objective` fit data.seq_len and data.target_len and, given, vocab_size
    (model.vocab_size) has room for its mask or sentinel ids."""
    what = f"data.objective={objective!r}"
    if objective == "span_corruption":
        needed = span_layout(cfg).target_tokens
        what += " (sentinel ids are the top ids, above the byte tokenizer's bytes, PAD, BOS, EOS, MASK)"
        if cfg.target_len and cfg.target_len < needed:
            raise ConfigError(f"data.target_len={cfg.target_len} is shorter than the {needed} tokens every span "
                              f"corruption target needs with data.seq_len={cfg.seq_len}, data.noise_density="
                              f"{cfg.noise_density}, data.mean_span_length={cfg.mean_span_length}; set data.target_len "
                              f">= {needed} or 0 (derived)")
    if objective == "mlm" and cfg.dataset != "npy":
        what += f" (its mask token is id {MASK})"
    if objective == "seq2seq" and cfg.dataset in synthetic.BYTE_TASKS:
        needed = cfg.copy_length + 1
        if cfg.copy_length < 1:
            raise ConfigError(f"data.copy_length={cfg.copy_length} must be >= 1")
        if needed > cfg.seq_len:
            raise ConfigError(f"data.dataset={cfg.dataset!r} with data.copy_length={cfg.copy_length} needs {needed} "
                              f"source tokens (bytes and EOS) but data.seq_len={cfg.seq_len}; raise data.seq_len or "
                              "lower data.copy_length")
        if cfg.target_len and cfg.target_len < needed:
            raise ConfigError(f"data.target_len={cfg.target_len} is shorter than the {needed} target tokens (bytes "
                              f"and EOS) of data.copy_length={cfg.copy_length}; set data.target_len >= {needed} or 0")
    minimum = min_vocab_size(cfg, objective)
    if vocab_size is not None and vocab_size < minimum:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for {what} on data.dataset={cfg.dataset!r}; "
                          f"set model.vocab_size >= {minimum}")


def window_transform(cfg: DataConfig, objective: str, vocab_size: int
                     ) -> tuple[int, Callable[[np.ndarray, np.random.Generator], Row]]:
    """(window width, row of a window and an RNG) of a corpus objective, 'mlm' or 'span_corruption'."""
    if objective == "mlm":
        return cfg.seq_len, lambda window, rng: mlm_row(window, cfg, vocab_size, rng)
    layout, target_len = span_layout(cfg), target_length(cfg, objective)
    return layout.raw_len, lambda window, rng: span_corruption_row(window, layout, vocab_size, cfg.seq_len,
                                                                   target_len, rng)
