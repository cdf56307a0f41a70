"""Tokenizers by spec (bytes, hf:PATH, sentencepiece:PATH), each built here from a small corpus (no network), and
`python -m transformer.pretokenize` into shards that the npy dataset reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transformer import pretokenize
from transformer.config import ConfigError
from transformer.data import corpus
from transformer.data.tokenizers import check_vocab, load_tokenizer

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n") * 20


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("hf")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return path


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("spm")
    (path / "corpus.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(path / "corpus.txt"), model_prefix=str(path / "m"), vocab_size=80,
                                   model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0,
                                   minloglevel=2)
    return path / "m.model"


def test_bytes_round_trips_any_text():
    tok = load_tokenizer("bytes")
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    text = "héllo, wörld ✓"
    assert tok.encode(text).tolist() == list(text.encode()) and tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_file_or_folder(hf_tokenizer_dir):
    for spec in (f"hf:{hf_tokenizer_dir}", f"hf:{hf_tokenizer_dir / 'tokenizer.json'}"):
        tok = load_tokenizer(spec)
        assert tok.vocab_size == 300 and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
        ids = tok.encode("And God said")
        assert ids.dtype == np.int32 and len(ids) < len("And God said")  # merges learned from the corpus
        assert tok.decode(ids) == "And God said"
        assert tok.decode([*ids, tok.eos_id]) == "And God said"  # special tokens dropped


def test_sentencepiece_tokenizer(sentencepiece_model):
    tok = load_tokenizer(f"sentencepiece:{sentencepiece_model}")
    assert tok.vocab_size == 80 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    ids = tok.encode("the face of the waters")
    assert tok.decode(ids) == "the face of the waters"


@pytest.mark.parametrize("spec, message", [
    ("gpt2", "data.tokenizer='gpt2' is not valid"),
    ("hf:", "data.tokenizer='hf:' is not valid"),
    ("hf:/nonexistent/tokenizer.json", "does not exist"),
    ("sentencepiece:/nonexistent.model", "does not exist"),
])
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_tokenizer(spec)


def test_corrupt_tokenizer_files_are_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path}")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="is not a SentencePiece model"):
        load_tokenizer(f"sentencepiece:{tmp_path / 'bad.model'}")


def test_a_vocabulary_larger_than_the_model_is_refused(hf_tokenizer_dir):
    tok = load_tokenizer(f"hf:{hf_tokenizer_dir}")
    check_vocab(tok, 300)
    with pytest.raises(ConfigError, match="has 300 tokens, more than model.vocab_size=259"):
        check_vocab(tok, 259)


def test_pretokenize_writes_shards_the_npy_corpus_reads_back(tmp_path, hf_tokenizer_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("In the beginning")
    (docs / "b.md").write_text("And God said")
    (docs / "c.jsonl").write_text(json.dumps({"text": "Let there be light"}) + "\n\n" + json.dumps({"text": "x"}))
    spec = f"hf:{hf_tokenizer_dir}"
    assert pretokenize.main(["--tokenizer", spec, "--out", str(tmp_path / "out"), "--shard-tokens", "5",
                             str(docs)]) == 0
    manifest = json.loads((tmp_path / "out" / "pretokenized.json").read_text())
    tok = load_tokenizer(spec)
    expected = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in
                               ["In the beginning", "And God said", "Let there be light", "x"]])
    assert manifest["tokens"] == len(expected) and manifest["documents"] == 4 and manifest["dtype"] == "uint16"
    assert len(manifest["shards"]) == -(-len(expected) // 5)
    stream = corpus.npy_tokens((str(tmp_path / "out"),), vocab_size=300)
    np.testing.assert_array_equal(stream.read(0, len(stream)), expected)


def test_pretokenize_refuses_a_non_empty_out_and_bad_jsonl(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.npy").write_bytes(b"mine")
    (tmp_path / "a.txt").write_text("text")
    assert pretokenize.main(["--tokenizer", "bytes", "--out", str(tmp_path / "out"), str(tmp_path / "a.txt")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.npy").read_bytes() == b"mine"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert pretokenize.main(["--tokenizer", "bytes", "--out", str(tmp_path / "o2"), str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2 is not a JSON object with a \"text\" field" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()


def test_text_corpus_through_a_tokenizer_feeds_the_decoder_batches(tmp_path, hf_tokenizer_dir):
    from transformer.data.pipeline import make_dataset
    from transformer.config import DataConfig

    (tmp_path / "a.txt").write_text(TEXT)
    spec = f"hf:{hf_tokenizer_dir}"
    cfg = DataConfig(dataset="text", paths=(str(tmp_path / "a.txt"),), tokenizer=spec, seq_len=16,
                     global_batch_size=2, eval_fraction=0.1)
    tok = load_tokenizer(spec)
    stream = np.append(tok.encode(TEXT), tok.eos_id)
    batch = make_dataset(cfg, vocab_size=300).batch(0)
    for row in range(2):  # every row is a window of the tokenized stream
        window = np.concatenate([batch["inputs_BL"][row], batch["targets_BL"][row][-1:]])
        starts = [s for s in range(0, len(stream) - 16, 16) if (stream[s:s + 17] == window).all()]
        assert starts, "row is not a window of the tokenized corpus"
    with pytest.raises(ConfigError, match="has 300 tokens, more than model.vocab_size=260"):
        make_dataset(cfg, vocab_size=260)
    with pytest.raises(ConfigError, match="data.tokenizer='hf:.*' tokenizes the kjv and text corpora"):
        make_dataset(DataConfig(dataset="copy", tokenizer=spec, seq_len=80), vocab_size=300)
