"""Encoder objectives and seq2seq data: BERT masking statistics and packed documents, T5 span corruption
(lengths as T5 computes them, exact reconstruction), copy/reverse/sort/pairs rows, determinism per step and
across process counts, clear errors; the decoder's batches are pinned to their values before these objectives."""

import hashlib
import json
import math

import numpy as np
import pytest

from transformer.config import Config, ConfigError, DataConfig, ModelConfig
from transformer.data import corpus, make_dataset, objectives
from transformer.data.pipeline import BATCH_KEYS, SOURCE_KEYS
from transformer.data.tokenizer import BOS, EOS, MASK, PAD

SPAN_VOCAB = 384  # ByT5's vocabulary: 256 bytes, specials and sentinels


@pytest.fixture
def random_text(tmp_path):
    """Twelve files of random bytes (a text corpus: each file then EOS)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "random"
    root.mkdir()
    for i in range(12):
        (root / f"{i:02d}.txt").write_bytes(rng.integers(0, 256, int(rng.integers(4000, 9000)), np.uint8).tobytes())
    return root


@pytest.fixture
def short_docs(tmp_path):
    """Many short documents, so windows pack several."""
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(60):
        (root / f"{i:03d}.txt").write_text("ab" * (i % 7) + f"doc {i}.")
    return root


def _text_cfg(root, **kwargs):
    return DataConfig(**{"dataset": "text", "paths": (str(root),), "eval_fraction": 0.05, **kwargs})


def _train_stream(cfg: DataConfig) -> np.ndarray:
    train = corpus.load(cfg).split(cfg.eval_fraction)[0]
    return train.read(0, len(train))


def _real(row: dict, key: str, segments: str) -> np.ndarray:
    return row[key][row[segments] > 0]


# ---------------------------------------------------------------- masked LM


def test_mlm_follows_the_80_10_10_recipe(random_text):
    cfg = _text_cfg(random_text, seq_len=128, global_batch_size=64)
    ds = make_dataset(cfg, vocab_size=MASK + 1, architecture="encoder")
    assert ds.objective == "mlm" and ds.keys == BATCH_KEYS
    stream = _train_stream(cfg)
    windows = stream[:len(stream) // 128 * 128].reshape(-1, 128)
    known = {row.tobytes() for row in windows}
    outcomes = {"mask": 0, "random": 0, "kept": 0}
    replacements = []
    for step in range(12):
        batch = ds.batch(step)
        for inputs, targets, scored in zip(batch["inputs_BL"], batch["targets_BL"], batch["loss_mask_BL"] > 0):
            assert targets.tobytes() in known
            maskable = targets < 256
            assert scored.sum() == max(1, round(0.15 * maskable.sum()))
            assert not scored[~maskable].any()
            np.testing.assert_array_equal(inputs[~scored], targets[~scored])
            masked = inputs[scored] == MASK
            changed = ~masked & (inputs[scored] != targets[scored])
            outcomes["mask"] += masked.sum()
            outcomes["random"] += changed.sum()
            outcomes["kept"] += (~masked & ~changed).sum()
            replacements += list(inputs[scored][~masked])
    total = sum(outcomes.values())
    # a random replacement draws the original byte with probability 1/256
    expected = {"mask": 0.8, "random": 0.1 * 255 / 256, "kept": 0.1 + 0.1 / 256}
    for name, p in expected.items():
        assert abs(outcomes[name] / total - p) <= 4 * math.sqrt(p * (1 - p) / total), (name, outcomes, total)
    replacements = np.array(replacements)
    assert replacements.min() >= 0 and replacements.max() < 256 and len(np.unique(replacements)) > 200


def test_mask_never_selects_padding_or_specials():
    rng = np.random.default_rng(3)
    for _ in range(200):
        tokens = np.full(40, PAD, np.int32)
        length = int(rng.integers(1, 40))
        tokens[:length] = rng.integers(0, 256, length)
        tokens[rng.integers(0, length)] = EOS
        inputs, selected = objectives.mask_tokens(tokens, tokens < 256, 0.15, rng, mask=MASK, random_high=256)
        assert not selected[tokens >= 256].any()
        np.testing.assert_array_equal(inputs[tokens >= 256], tokens[tokens >= 256])
        assert selected.sum() == (max(1, round(0.15 * (tokens < 256).sum())) if (tokens < 256).any() else 0)


def test_mlm_packed_documents_have_their_own_segments_and_positions(short_docs):
    cfg = _text_cfg(short_docs, seq_len=32, global_batch_size=8)
    ds = make_dataset(cfg, vocab_size=300, architecture="encoder")
    stream = _train_stream(cfg)
    windows = {stream[k:k + 32].tobytes() for k in range(0, len(stream) - 31, 32)}
    for step in range(4):
        batch = ds.batch(step)
        for row in range(8):
            targets = batch["targets_BL"][row]
            assert targets.tobytes() in windows
            segment, position, want_segments, want_positions = 1, 0, [], []
            for token in targets:
                want_segments.append(segment)
                want_positions.append(position)
                segment, position = (segment + 1, 0) if token == EOS else (segment, position + 1)
            np.testing.assert_array_equal(batch["segment_ids_BL"][row], want_segments)
            np.testing.assert_array_equal(batch["positions_BL"][row], want_positions)
            assert batch["segment_ids_BL"][row].max() >= 2  # several documents per window


def test_mlm_on_npy_masks_with_the_top_id(tmp_path):
    vocab = 1000
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, vocab - 1, 20000).astype(np.int32))
    cfg = DataConfig(dataset="npy", paths=(str(tmp_path / "ids.npy"),), seq_len=64, global_batch_size=16)
    batch = make_dataset(cfg, vocab_size=vocab, architecture="encoder").batch(2)
    scored = batch["loss_mask_BL"] > 0
    assert (scored.sum(1) == round(0.15 * 64)).all()
    masked = batch["inputs_BL"] == vocab - 1
    assert masked[scored].mean() > 0.6 and not masked[~scored].any()
    assert batch["inputs_BL"].max() == vocab - 1 and (batch["segment_ids_BL"] == 1).all()
    np.testing.assert_array_equal(batch["positions_BL"], np.broadcast_to(np.arange(64), (16, 64)))
    np.save(tmp_path / "ids.npy", np.array([5] * 200 + [vocab - 1] + [6] * 200, np.int32))
    with pytest.raises(ConfigError, match=r"token id 999 at position 200, one of the top 1 ids of model.vocab_size="):
        make_dataset(cfg, vocab_size=vocab, architecture="encoder")


# ---------------------------------------------------------------- span corruption


def _t5_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """T5's compute_input_and_target_lengths (t5.data.preprocessors), transcribed."""
    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_span))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def test_span_lengths_are_t5s():
    assert _t5_lengths(512, 0.15, 3.0) == (568, 114)  # the T5 paper's setting
    for seq_len in (16, 64, 100, 512, 1024):
        for density, mean_span in ((0.15, 3.0), (0.3, 5.0), (0.5, 3.0), (0.1, 1.0)):
            layout = objectives.span_layout(DataConfig(seq_len=seq_len, noise_density=density,
                                                       mean_span_length=mean_span))
            assert (layout.raw_len, layout.target_tokens) == _t5_lengths(seq_len, density, mean_span)
            assert layout.source_len <= seq_len
            assert layout.num_noise == round(layout.raw_len * density)
            assert layout.num_spans == max(1, round(layout.num_noise / mean_span))


@pytest.mark.parametrize("seq_len,density,mean_span", [(16, 0.15, 3.0), (64, 0.15, 3.0), (128, 0.3, 2.5),
                                                        (512, 0.15, 3.0), (40, 0.3, 1.0)])
def test_span_corruption_reconstructs_its_window(seq_len, density, mean_span):
    layout = objectives.span_layout(DataConfig(seq_len=seq_len, noise_density=density, mean_span_length=mean_span))
    for seed in range(100):
        rng = np.random.default_rng(seed)
        window = rng.integers(0, 259, layout.raw_len).astype(np.int32)  # bytes, PAD, BOS, EOS
        is_noise = objectives.noise_mask(layout, rng)
        runs = np.flatnonzero(np.diff(np.concatenate([[0], is_noise.astype(int)])) == 1)
        assert is_noise.sum() == layout.num_noise and len(runs) == layout.num_spans
        assert not is_noise[0] and is_noise[-1]
        source, target = objectives.corrupt_spans(window, is_noise, SPAN_VOCAB)
        assert len(source) == layout.source_len and len(target) == layout.target_tokens
        sentinels = SPAN_VOCAB - 1 - np.arange(layout.num_spans)
        np.testing.assert_array_equal(source[source > EOS], sentinels)
        np.testing.assert_array_equal(target[target > EOS], sentinels)
        assert target[0] == SPAN_VOCAB - 1 and source[-1] == EOS and target[-1] == EOS
        np.testing.assert_array_equal(objectives.reconstruct(source, target, SPAN_VOCAB), window)


def test_span_corruption_rows_rebuild_corpus_windows(random_text):
    cfg = _text_cfg(random_text, seq_len=64, global_batch_size=8)
    ds = make_dataset(cfg, vocab_size=SPAN_VOCAB, architecture="encoder_decoder")
    layout = objectives.span_layout(cfg)
    assert ds.objective == "span_corruption" and ds.keys == BATCH_KEYS + SOURCE_KEYS
    assert ds.target_len == -(-layout.target_tokens // 8) * 8
    stream = _train_stream(cfg)
    for step in (0, 7):
        batch = ds.batch(step)
        assert batch["sources_BS"].shape == (8, 64) and batch["targets_BL"].shape == (8, ds.target_len)
        for r in range(8):
            row = {key: value[r] for key, value in batch.items()}
            source = _real(row, "sources_BS", "source_segment_ids_BS")
            target = _real(row, "targets_BL", "segment_ids_BL")
            assert len(source) == layout.source_len and len(target) == layout.target_tokens
            window = objectives.reconstruct(source, target, SPAN_VOCAB)
            starts = [k for k in range(0, len(stream) - layout.raw_len + 1, layout.raw_len)
                      if np.array_equal(stream[k:k + layout.raw_len], window)]
            assert starts
            np.testing.assert_array_equal(row["inputs_BL"], np.concatenate([[BOS], row["targets_BL"][:-1]]))
            np.testing.assert_array_equal(row["loss_mask_BL"], row["segment_ids_BL"])
            assert (row["targets_BL"][len(target):] == PAD).all() and (row["sources_BS"][len(source):] == PAD).all()
            np.testing.assert_array_equal(row["positions_BL"], np.arange(ds.target_len))
            np.testing.assert_array_equal(row["source_positions_BS"], np.arange(64))


# ---------------------------------------------------------------- seq2seq rows


@pytest.mark.parametrize("task,transform", [("copy", lambda x: x), ("reverse", lambda x: x[::-1]),
                                            ("sort", np.sort)])
def test_seq2seq_task_rows(task, transform):
    cfg = DataConfig(dataset=task, seq_len=20, copy_length=13, global_batch_size=4)
    ds = make_dataset(cfg, architecture="encoder_decoder")
    assert ds.objective == "seq2seq" and ds.target_len == 16
    batch = ds.batch(3)
    for r in range(4):
        source = batch["sources_BS"][r]
        assert source[13] == EOS and (source[14:] == PAD).all() and (source[:13] < 256).all()
        np.testing.assert_array_equal(batch["source_segment_ids_BS"][r], np.arange(20) < 14)
        want = np.concatenate([transform(source[:13]), [EOS], [PAD] * 2])
        np.testing.assert_array_equal(batch["targets_BL"][r], want)
        np.testing.assert_array_equal(batch["inputs_BL"][r], np.concatenate([[BOS], want[:-1]]))
        np.testing.assert_array_equal(batch["loss_mask_BL"][r], np.arange(16) < 14)
    assert not np.array_equal(batch["sources_BS"][0], batch["sources_BS"][1])


@pytest.mark.parametrize("task,transform", [("reverse", lambda x: x[::-1]), ("sort", np.sort)])
def test_decoder_reverse_and_sort_prompt_answer(task, transform):
    batch = make_dataset(DataConfig(dataset=task, seq_len=48, global_batch_size=4, copy_length=10)).batch(5)
    for r in range(4):
        inputs = batch["inputs_BL"][r]
        assert inputs[0] == BOS and inputs[11] == EOS and (inputs[22:] == PAD).all()
        np.testing.assert_array_equal(batch["targets_BL"][r][batch["loss_mask_BL"][r] > 0], transform(inputs[1:11]))
        np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask_BL"][r]), np.arange(11, 21))


PAIRS = [("hello", "bonjour"), ("cat", "chat"), ("good night", "bonne nuit"), ("dog", "chien"), ("yes", "oui"),
         ("thank you", "merci"), ("é", "ü"), ("water", "eau"), ("sun", "soleil"), ("moon", "lune")]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"source": s, "target": t}) for s, t in PAIRS[:6]) + "\n\n"
                    + "\n".join(json.dumps({"target": t, "source": s, "note": 1}) for s, t in PAIRS[6:]) + "\n")
    return path


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_pairs_seq2seq_rows_cover_the_train_pairs_each_epoch(pairs_file):
    cfg = DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=16, global_batch_size=4, eval_fraction=0.2)
    ds = make_dataset(cfg, architecture="encoder_decoder")
    assert ds.objective == "seq2seq" and ds.target_len == 16
    rows = [{key: value[r] for key, value in ds.batch(step).items()} for step in range(2) for r in range(4)]
    seen = [(list(_real(row, "sources_BS", "source_segment_ids_BS")), list(_real(row, "targets_BL", "segment_ids_BL")))
            for row in rows]
    want = [(_bytes(s) + [EOS], _bytes(t) + [EOS]) for s, t in PAIRS[:8]]
    assert sorted(seen) == sorted(want)  # 8 train pairs, each once in the first epoch
    for row in rows:
        np.testing.assert_array_equal(row["inputs_BL"], np.concatenate([[BOS], row["targets_BL"][:-1]]))
        np.testing.assert_array_equal(row["loss_mask_BL"], row["segment_ids_BL"])
    heldout = ds.eval_batch(0)
    for r, (s, t) in enumerate(PAIRS[8:] * 2):
        np.testing.assert_array_equal(heldout["sources_BS"][r][:len(_bytes(s)) + 1], _bytes(s) + [EOS])
        np.testing.assert_array_equal(heldout["targets_BL"][r][:len(_bytes(t)) + 1], _bytes(t) + [EOS])


def test_pairs_for_a_decoder_are_prompt_and_answer(pairs_file):
    cfg = DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=24, global_batch_size=2, eval_fraction=0.2)
    batch = make_dataset(cfg).eval_batch(0)
    assert set(batch) == set(BATCH_KEYS)
    for r, (s, t) in enumerate(PAIRS[8:]):
        tokens = [BOS] + _bytes(s) + [EOS] + _bytes(t) + [EOS]
        np.testing.assert_array_equal(batch["inputs_BL"][r][:len(tokens)], tokens)
        np.testing.assert_array_equal(batch["targets_BL"][r][batch["loss_mask_BL"][r] > 0], _bytes(t) + [EOS])
        np.testing.assert_array_equal(batch["segment_ids_BL"][r], np.arange(24) < len(tokens))


# ---------------------------------------------------------------- determinism


def _objective_datasets(random_text, pairs_file):
    yield _text_cfg(random_text, seq_len=32, global_batch_size=4, seed=2), 300, "encoder"
    yield _text_cfg(random_text, seq_len=32, global_batch_size=4, seed=2), SPAN_VOCAB, "encoder_decoder"
    yield DataConfig(dataset="sort", seq_len=40, global_batch_size=4, copy_length=9), 259, "encoder_decoder"
    yield DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=16, global_batch_size=4), 259, "encoder_decoder"
    yield DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=32, global_batch_size=4), 259, "decoder"
    yield DataConfig(dataset="reverse", seq_len=40, global_batch_size=4, copy_length=9), 259, "decoder"


def test_batches_depend_only_on_config_and_step(random_text, pairs_file):
    for cfg, vocab, architecture in _objective_datasets(random_text, pairs_file):
        ds = make_dataset(cfg, vocab_size=vocab, architecture=architecture)
        fresh = make_dataset(cfg, vocab_size=vocab, architecture=architecture)
        full = ds.batch(9)
        halves = [fresh.batch(9, process_index=i, process_count=2) for i in range(2)]
        assert set(full) == set(ds.keys)
        for key in ds.keys:
            np.testing.assert_array_equal(full[key], np.concatenate([half[key] for half in halves]), err_msg=key)
            np.testing.assert_array_equal(ds.eval_batch(3)[key], fresh.eval_batch(3)[key], err_msg=key)
        assert not np.array_equal(full["targets_BL"], ds.batch(10)["targets_BL"]), cfg


def test_mlm_masks_each_epoch_afresh(random_text):
    cfg = _text_cfg(random_text, seq_len=512, global_batch_size=8)
    ds = make_dataset(cfg, vocab_size=300, architecture="encoder")
    windows = len(_train_stream(cfg)) // 512
    batches = [ds.batch(step) for step in range(-(-2 * windows // 8))]
    targets, scored = (np.concatenate([batch[key] for batch in batches]) for key in ("targets_BL", "loss_mask_BL"))
    epochs = [{targets[i].tobytes(): scored[i] for i in range(start, start + windows)} for start in (0, windows)]
    assert len(epochs[0]) == windows and epochs[0].keys() == epochs[1].keys()
    assert all(not np.array_equal(epochs[0][window], epochs[1][window]) for window in epochs[0])


# ---------------------------------------------------------------- errors


def _config(architecture="decoder", vocab_size=259, num_encoder_layers=0, **data):
    return Config(model=ModelConfig(architecture=architecture, vocab_size=vocab_size,
                                    num_encoder_layers=num_encoder_layers), data=DataConfig(**data))


@pytest.mark.parametrize("cfg,message", [
    (_config(objective="mlm"), r"data.objective='mlm' cannot train model.architecture='decoder'; use 'next_token'"),
    (_config(objective="span_corruption"), r"data.objective='span_corruption' cannot train model.architecture='dec"),
    (_config("encoder_decoder", objective="next_token"), r"data.objective='next_token' cannot train model.arch"),
    (_config("encoder", objective="seq2seq", dataset="copy"), r"data.objective='seq2seq' cannot train model.arch"),
    (_config("encoder", dataset="copy"), r"data.dataset='copy' cannot train model.architecture='encoder'"),
    (_config("encoder_decoder", dataset="passkey"), r"data.dataset='passkey' cannot train model.architecture="),
    (_config("encoder_decoder", objective="seq2seq"), r"data.dataset='kjv' cannot be used with data.objective="),
    (_config(num_encoder_layers=2), r"model.num_encoder_layers=2 applies to model.architecture='encoder_decoder'"),
    (_config("encoder_decoder", target_len=8, seq_len=128), r"data.target_len=8 is shorter than the 29 tokens"),
    (_config("encoder_decoder", dataset="copy", seq_len=32), r"data.copy_length=32 needs 33 source tokens"),
    (_config("encoder_decoder", noise_density=0.9, mean_span_length=1.0),
     r"data.noise_density=0.9 .* 230 noise spans in a window of 255 but only 25 kept"),
    (_config(mask_rate=1.0), r"data.mask_rate=1.0 must be in \(0, 1\)"),
    (_config(mean_span_length=0.5), r"data.mean_span_length=0.5 must be >= 1"),
])
def test_config_refuses_mismatches(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_dataset_errors(tmp_path, random_text, pairs_file):
    text = _text_cfg(random_text, seq_len=64)
    with pytest.raises(ConfigError, match=r"model.vocab_size=259 is too small for data.objective='mlm' .*>= 260"):
        make_dataset(text, vocab_size=259, architecture="encoder")
    with pytest.raises(ConfigError, match=r"model.vocab_size=262 is too small .*'span_corruption'.*>= 263"):
        make_dataset(text, vocab_size=262, architecture="encoder_decoder")
    with pytest.raises(ValueError, match=r"vocab_size=None.*'span_corruption'"):
        make_dataset(text, architecture="encoder_decoder")
    with pytest.raises(ConfigError, match=r"data.objective='mlm' cannot train model.architecture='decoder'"):
        make_dataset(DataConfig(objective="mlm"), vocab_size=300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a", "target": "b"\n')
    with pytest.raises(ConfigError, match=rf"{bad}:2: not valid JSON"):
        make_dataset(DataConfig(dataset="pairs", paths=(str(bad),)), architecture="encoder_decoder")
    bad.write_text('{"source": "a", "target": "b"}\n\n["a", "b"]\n')
    with pytest.raises(ConfigError, match=rf"{bad}:3: expected an object with string fields"):
        make_dataset(DataConfig(dataset="pairs", paths=(str(bad),)), architecture="encoder_decoder")
    bad.write_text('{"source": "a", "target": "b"}\n')
    with pytest.raises(ConfigError, match=r"hold 1 source/target pairs"):
        make_dataset(DataConfig(dataset="pairs", paths=(str(bad),)), architecture="encoder_decoder")
    long_pairs = DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=16, target_len=8)
    with pytest.raises(ConfigError, match=rf"{pairs_file}:3: .* target \+ EOS 11 of the 8 decoder tokens"):
        make_dataset(long_pairs, architecture="encoder_decoder")
    with pytest.raises(ConfigError, match=rf"{pairs_file}:3: a 10-byte source and 10-byte target need 23 tokens"):
        make_dataset(DataConfig(dataset="pairs", paths=(str(pairs_file),), seq_len=20))
    with pytest.raises(ConfigError, match=r"fewer than the 64 tokens one window of data.objective"):
        make_dataset(_text_cfg(random_text, seq_len=64, eval_fraction=0.0001), "eval", vocab_size=300,
                     architecture="encoder")


# ---------------------------------------------------------------- the decoder is unchanged


def _digest(ds) -> str:
    digest = hashlib.sha256()
    for batch in (ds.batch(0), ds.batch(5), ds.eval_batch(1)):
        for key in BATCH_KEYS:
            digest.update(key.encode() + batch[key].tobytes() + str(batch[key].dtype).encode())
    return digest.hexdigest()[:16]


def test_decoder_batches_are_pinned(tmp_path):
    """Digests of next-token batches computed before the encoder objectives existed."""
    (tmp_path / "a.txt").write_text("In the beginning was the word.\n" * 20)
    (tmp_path / "b.txt").write_text("Call me Ishmael. " * 30)
    np.save(tmp_path / "t.npy", (np.arange(3000) * 7919 % 50000).astype(np.int32))
    cases = [(DataConfig(dataset="copy", seq_len=48, global_batch_size=4, copy_length=10, seed=1), "e35b18577e34b685"),
             (DataConfig(dataset="associative_recall", seq_len=96, global_batch_size=4, num_pairs=8),
              "9c84655ea196b01d"),
             (DataConfig(dataset="passkey", seq_len=120, global_batch_size=2), "0553e16deb0b0ade"),
             (DataConfig(dataset="text", paths=(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")), seq_len=16,
                         global_batch_size=4, seed=2), "2f03098380d443f7"),
             (DataConfig(dataset="npy", paths=(str(tmp_path / "t.npy"),), seq_len=32, global_batch_size=4, seed=3),
              "a4ec29239396ebff")]
    for cfg, digest in cases:
        assert _digest(make_dataset(cfg, vocab_size=50304, architecture="decoder")) == digest, cfg.dataset
