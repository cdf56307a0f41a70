"""Data pipeline: tokenizer, offline corpora, deterministic sharded batches, synthetic tasks, errors."""

import dataclasses
import re
import socket

import numpy as np
import pytest

from transformer.config import ConfigError, DataConfig
from transformer.data import Dataset, corpus, make_dataset, synthetic, tokenizer
from transformer.data.tokenizer import BOS, EOS, PAD

GENESIS_1_1 = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module", autouse=True)
def kjv_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv(corpus.CACHE_ENV, str(path))
        yield path


@pytest.fixture
def npy_dir(tmp_path):
    """arange(1000) split over three files of different int dtypes: token value == stream position."""
    tokens = np.arange(1000)
    root = tmp_path / "npy"
    for name, part, dtype in (("a.npy", tokens[:300], np.uint16), ("b/c.npy", tokens[300:650], np.int32),
                              ("d.npy", tokens[650:], np.int64)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / name, part.astype(dtype))
    return root


def _npy_cfg(path, **kwargs):
    return DataConfig(**{"dataset": "npy", "paths": (str(path),), "seq_len": 9, "global_batch_size": 3,
                         "eval_fraction": 0.1, **kwargs})


def test_tokenizer_round_trip_unicode():
    text = "Grüße, 世界! naïve café — 🎉\n\ttab"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tokenizer.decode(ids) == text
    wrapped = tokenizer.encode(text, bos=True, eos=True)
    assert wrapped[0] == BOS and wrapped[-1] == EOS and tokenizer.decode(wrapped) == text
    assert tokenizer.decode(np.append(ids, [PAD, PAD])) == text
    assert tokenizer.VOCAB_SIZE == 259
    with pytest.raises(ValueError, match="259"):
        tokenizer.decode([65, 259])


def test_kjv_loads_offline_and_is_cached(kjv_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the KJV corpus must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokens = corpus.kjv_tokens()
    assert list(kjv_cache.glob("*.npy")) and not list(kjv_cache.glob("*.tmp"))
    assert tokenizer.decode(tokens[:len(GENESIS_1_1)]) == GENESIS_1_1
    assert tokenizer.decode(tokens[-200:]).endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert len(tokens) > 4_000_000
    again = corpus.kjv_tokens()
    assert isinstance(again, np.memmap) and np.array_equal(again, tokens)


def test_batch_deterministic_and_shardable():
    cfg = DataConfig(seq_len=32, global_batch_size=4, seed=3)
    ds = make_dataset(cfg)
    full = ds.batch(7)
    assert {k: (v.shape, v.dtype) for k, v in full.items()} == {
        "inputs_BL": ((4, 32), np.int32), "targets_BL": ((4, 32), np.int32), "loss_mask_BL": ((4, 32), np.float32),
        "positions_BL": ((4, 32), np.int32), "segment_ids_BL": ((4, 32), np.int32)}
    fresh = make_dataset(cfg).batch(7)
    halves = [ds.batch(7, process_index=i, process_count=2) for i in range(2)]
    for key, value in full.items():
        assert np.array_equal(value, ds.batch(7)[key])
        assert np.array_equal(value, fresh[key])
        assert np.array_equal(value, np.concatenate([h[key] for h in halves]))
    assert halves[0]["inputs_BL"].shape == (2, 32)
    assert not np.array_equal(full["inputs_BL"], ds.batch(8)["inputs_BL"])
    other_seed = make_dataset(DataConfig(seq_len=32, global_batch_size=4, seed=4)).batch(7)
    assert not np.array_equal(full["inputs_BL"], other_seed["inputs_BL"])
    assert np.array_equal(full["positions_BL"], np.broadcast_to(np.arange(32), (4, 32)))
    assert (full["loss_mask_BL"] == 1).all() and (full["segment_ids_BL"] == 1).all()


def test_windows_are_corpus_text_with_shifted_targets():
    ds = make_dataset(DataConfig(seq_len=32, global_batch_size=4))
    text = bytes(np.asarray(corpus.kjv_tokens()))
    batch = ds.batch(2)
    for inputs, targets in zip(batch["inputs_BL"], batch["targets_BL"]):
        assert np.array_equal(inputs[1:], targets[:-1])
        window = bytes(np.append(inputs, targets[-1]).astype(np.uint8))
        assert text.find(window) >= 0


def test_npy_stream_concatenates_files_of_any_dtype(npy_dir):
    stream = corpus.load(_npy_cfg(npy_dir))
    assert len(stream) == 1000 and np.array_equal(stream.read(0, 1000), np.arange(1000))
    assert np.array_equal(stream.read(295, 655), np.arange(295, 655))


def test_train_windows_cover_epoch_and_avoid_heldout(npy_dir):
    ds = make_dataset(_npy_cfg(npy_dir))
    num_train, seq_len = 900, 9
    num_windows = (num_train - 1) // seq_len
    starts = []
    for step in range(num_windows // 3):
        batch = ds.batch(step)
        assert np.array_equal(batch["targets_BL"], batch["inputs_BL"] + 1)
        starts += list(batch["inputs_BL"][:, 0])
    assert sorted(starts) == list(range(0, num_windows * seq_len, seq_len))
    later = np.concatenate([ds.batch(step)["targets_BL"] for step in range(33, 200)])
    assert later.max() < num_train

    heldout = ds.eval_sequences(seq_len=19, num=5)
    assert heldout.dtype == np.int32 and heldout.shape == (5, 20)
    assert np.array_equal(heldout.reshape(-1), np.arange(num_train, num_train + 100))
    eval_batch = ds.eval_batch(1)
    assert eval_batch["inputs_BL"].min() >= num_train
    assert np.array_equal(eval_batch["inputs_BL"][:, 0], num_train + np.arange(3, 6) * seq_len)
    eval_split = make_dataset(_npy_cfg(npy_dir), split="eval")
    assert eval_split.batch(0)["inputs_BL"].min() >= num_train


def test_text_directory_sorted_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("alpha é\n")
    (tmp_path / "b.txt").write_text("beta\n")
    (tmp_path / "c.bin").write_bytes(b"\x00ignored")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    extra = tmp_path / "c.bin"
    tokens = corpus.text_tokens((str(tmp_path), str(extra)))
    expected = np.concatenate([tokenizer.encode("beta\n", eos=True), tokenizer.encode("alpha é\n", eos=True),
                               np.frombuffer(b"\x00ignored", np.uint8), [EOS]])
    assert np.array_equal(tokens, expected)
    cfg = DataConfig(dataset="text", paths=(str(tmp_path),), seq_len=4, global_batch_size=2, eval_fraction=0.2)
    batch = make_dataset(cfg).batch(0)
    assert np.array_equal(batch["inputs_BL"][:, 1:], batch["targets_BL"][:, :-1])


def _answer(batch, row):
    return batch["targets_BL"][row][batch["loss_mask_BL"][row] > 0]


def test_copy_task_mask_is_exactly_the_copy():
    cfg = DataConfig(dataset="copy", seq_len=48, global_batch_size=4, copy_length=10)
    batch = make_dataset(cfg).batch(5)
    for row in range(4):
        inputs = batch["inputs_BL"][row]
        assert inputs[0] == BOS and inputs[11] == synthetic.COPY_SEPARATOR
        np.testing.assert_array_equal(_answer(batch, row), inputs[1:11])
        np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask_BL"][row]), np.arange(11, 21))
        np.testing.assert_array_equal(batch["segment_ids_BL"][row], np.arange(48) < 22)
        assert (inputs[22:] == PAD).all() and inputs[21] == inputs[10]
    assert not np.array_equal(batch["inputs_BL"][0], batch["inputs_BL"][1])


def test_associative_recall_answer_recoverable_from_prompt():
    cfg = DataConfig(dataset="associative_recall", seq_len=128, global_batch_size=4, num_pairs=12)
    batch = make_dataset(cfg).batch(0)
    for row in range(4):
        mask = batch["loss_mask_BL"][row] > 0
        prompt = tokenizer.decode(batch["inputs_BL"][row][:np.flatnonzero(mask)[0] + 1])
        pairs = dict(re.findall(r"([a-z]{3}):(\d\d) ", prompt))
        assert len(pairs) == 12
        query = re.search(r"\? ([a-z]{3}):$", prompt).group(1)
        assert tokenizer.decode(_answer(batch, row)) == pairs[query]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_depth_and_answer(depth):
    length = 700
    tokens, (start, end) = synthetic.passkey_example(length, depth, np.random.default_rng(1), digits=6)
    assert tokens.dtype == np.int32 and len(tokens) == length and tokens[0] == BOS and end == length
    text = tokenizer.decode(tokens)
    key = re.search(r"The pass key is (\d{6})\. Remember it\.", text)
    assert tokenizer.decode(tokens[start:end]) == key.group(1) and end - start == 6
    assert text.endswith("What is the pass key? The pass key is " + key.group(1))
    filler_len = length - synthetic._passkey_min_length(6)
    assert abs(key.start() - depth * filler_len) <= 25


def test_passkey_dataset_scores_only_key():
    batch = make_dataset(DataConfig(dataset="passkey", seq_len=160, global_batch_size=2)).batch(3)
    for row in range(2):
        prompt = tokenizer.decode(batch["inputs_BL"][row])
        key = re.search(r"The pass key is (\d{5})\.", prompt).group(1)
        assert tokenizer.decode(_answer(batch, row)) == key
        assert batch["loss_mask_BL"][row].sum() == 5 and batch["loss_mask_BL"][row][-5:].all()


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_deterministic_across_processes(task):
    cfg = DataConfig(dataset=task, seq_len=160, global_batch_size=4, seed=2)
    ds = make_dataset(cfg)
    full = ds.batch(11)
    parts = [make_dataset(cfg).batch(11, process_index=i, process_count=4) for i in range(4)]
    for key in full:
        assert np.array_equal(full[key], np.concatenate([p[key] for p in parts]))
    assert not np.array_equal(full["inputs_BL"], ds.batch(12)["inputs_BL"])
    assert not np.array_equal(full["inputs_BL"], ds.eval_batch(11)["inputs_BL"])
    assert np.array_equal(ds.eval_batch(2)["inputs_BL"], ds.eval_batch(2)["inputs_BL"])


def test_bad_inputs_raise_clear_errors(tmp_path, npy_dir):
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError, match=re.escape(missing)):
        make_dataset(DataConfig(dataset="text", paths=(missing,)))
    floats = tmp_path / "bad" / "floats.npy"
    floats.parent.mkdir()
    np.save(floats, np.zeros(10, np.float32))
    with pytest.raises(ConfigError, match="float32"):
        make_dataset(_npy_cfg(floats))
    ds = make_dataset(_npy_cfg(npy_dir))
    with pytest.raises(ValueError, match=r"global_batch_size=3 is not divisible by process_count=2"):
        ds.batch(0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match=r"process_index=3"):
        ds.batch(0, process_index=3, process_count=3)
    with pytest.raises(ValueError, match=r"step=-1"):
        ds.batch(-1)
    with pytest.raises(ValueError, match=r"needs 1000 held-out tokens but the held-out split has 100"):
        ds.eval_sequences(seq_len=99, num=10)
    with pytest.raises(ValueError, match="split='test'"):
        make_dataset(_npy_cfg(npy_dir), split="test")
    with pytest.raises(ConfigError, match=r"has 900 tokens.*seq_len \+ 1 = 1001"):
        make_dataset(_npy_cfg(npy_dir, seq_len=1000))
    with pytest.raises(ConfigError, match=r"data.copy_length=40 needs 82 tokens"):
        make_dataset(DataConfig(dataset="copy", seq_len=64, copy_length=40))
    with pytest.raises(ValueError, match="depth=1.5"):
        synthetic.passkey_example(500, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="synthetic"):
        make_dataset(DataConfig(dataset="copy", seq_len=80)).eval_sequences(16, 1)
    assert isinstance(ds, Dataset)


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_tightest_fit(task):
    cfg = DataConfig(dataset=task, seq_len=8, copy_length=5, num_pairs=3, passkey_digits=4)
    cfg = dataclasses.replace(cfg, seq_len=synthetic.required_length(cfg) - 1)
    batch = make_dataset(cfg).batch(0)
    assert batch["segment_ids_BL"].all() and batch["loss_mask_BL"][:, -1].all()
    with pytest.raises(ConfigError, match=f"needs {cfg.seq_len + 1} tokens"):
        make_dataset(dataclasses.replace(cfg, seq_len=cfg.seq_len - 1))
