"""Encoder-decoder generation: `python -m transformer.generate run_dir=... source=...` on a tiny T5-bias run with
random weights prints and writes what `Generator.generate` gives for the same source; greedy generation equals
the full forward's argmax step by step; a source for a decoder run, or none for an encoder-decoder, fails with
one line naming the option, before anything compiles."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import generate as cli
from transformer.checkpoint import Checkpointer
from transformer.config import CheckpointConfig, Config, ConfigError, DataConfig, ModelConfig
from transformer.data import tokenizer
from transformer.inference import generate as generate_module
from transformer.inference.generate import Generator
from transformer.inference.sampling import SamplingConfig

from test_inference import _fast_compiles, init  # noqa: F401 (_fast_compiles: an autouse fixture)

MODEL = ModelConfig(architecture="encoder_decoder", vocab_size=300, d_model=32, num_layers=2, num_encoder_layers=2,
                    num_heads=4, num_kv_heads=2, d_ff=64, init_std=0.3, position="t5_bias", relative_buckets=8,
                    relative_max_distance=12, attention_block_size=8)
DATA = DataConfig(dataset="reverse", copy_length=12, seq_len=16, global_batch_size=2)
NEW = 12


def save_run(run_dir, model_cfg: ModelConfig, seed: int = 0) -> Config:
    """A run directory holding `model_cfg` with random weights (every weight ~ N(0, init_std): varied greedy
    text), as training would leave it."""
    cfg = Config(model=model_cfg, data=DATA, run_dir=str(run_dir)).validate()
    with Checkpointer(str(run_dir), CheckpointConfig(async_save=False), config=cfg) as ckpt:
        ckpt.maybe_save(0, {"model": nnx.to_pure_dict(init(model_cfg, seed)[1])}, force=True)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_run")
    save_run(path, MODEL, seed=1)  # a seed whose greedy text is varied (checked in test_cli_equals_generator)
    return path


def greedy(max_new_tokens=NEW, stop=()):
    return SamplingConfig(temperature=0, max_new_tokens=max_new_tokens, stop_tokens=stop)


@pytest.mark.slow
def test_cli_equals_generator(run_dir, tmp_path, capsys):
    """source text (its bytes + EOS) and source_ids give the Generator's greedy tokens from [BOS] (+ prompt);
    a sources file gives one row per source, each equal to that source generated alone."""
    generator = Generator(str(run_dir))
    source = "stressed desserts"
    source_ids = tokenizer.encode(source, eos=True).tolist()
    want = generator.generate([[tokenizer.BOS]], greedy(stop=(tokenizer.EOS,)), sources=[source_ids])
    assert len(set(want.tokens[0])) > 3  # a varied continuation: the comparison is not vacuous

    out = tmp_path / "out.json"
    assert cli.main([f"run_dir={run_dir}", f"source={source}", f"max_new_tokens={NEW}", "temperature=0",
                     f"out={out}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows == [{"prompt_ids": [tokenizer.BOS], "generated_ids": want.tokens[0], "finish": want.finish[0],
                     "source_ids": source_ids}]
    printed = capsys.readouterr().out  # streamed as text: byte tokens, sentinels above them
    assert tokenizer.decode([t for t in want.tokens[0] if t < 256]) in printed

    # token ids and a decoder prompt, no stop token: every new token compared
    prompt = [7, 8]
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    want = generator.generate([[tokenizer.BOS, *prompt]], greedy(), sources=[ids]).tokens
    assert cli.main([f"run_dir={run_dir}", f"source_ids={','.join(map(str, ids))}", "prompt_ids=7,8",
                     f"max_new_tokens={NEW}", "temperature=0", "stop_tokens=", f"out={out}"]) == 0
    assert [r["generated_ids"] for r in json.loads(out.read_text())["rows"]] == want

    # a file of sources (text and ids), two samples each
    sources_file = tmp_path / "sources.json"
    sources_file.write_text(json.dumps(["abc", ids]))
    assert cli.main([f"run_dir={run_dir}", f"sources_file={sources_file}", "num_samples=2", f"max_new_tokens={NEW}",
                     "temperature=0", "stop_tokens=", f"out={out}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    abc = tokenizer.encode("abc", eos=True).tolist()
    assert [r["source_ids"] for r in rows] == [abc, abc, ids, ids]
    alone = [generator.generate([[tokenizer.BOS]], greedy(), sources=[s]).tokens[0] for s in (abc, ids)]
    assert [r["generated_ids"] for r in rows] == [alone[0], alone[0], alone[1], alone[1]]
    assert alone[0] != alone[1]


@pytest.mark.slow  # keeps the default suite under 15 minutes; the other CLI tests read sources the same way
def test_interactive_lines_are_sources(run_dir, monkeypatch, capsys):
    """interactive=true: each stdin line is a new source, generated from BOS like source=<line>."""
    import io

    generator = Generator(str(run_dir))
    lines = ["abc", "hello"]
    want = [generator.generate([[tokenizer.BOS]], greedy(stop=(tokenizer.EOS,)),
                               sources=[tokenizer.encode(line, eos=True).tolist()]).tokens[0] for line in lines]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main([f"run_dir={run_dir}", "interactive=true", "stream=false", f"max_new_tokens={NEW}",
                     "temperature=0"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[0] ")]
    assert printed == [f"[0] {tokenizer.decode([t for t in tokens if t < tokenizer.VOCAB_SIZE])}" for tokens in want]
    assert want[0] != want[1]


def test_t5_bias_greedy_generation_equals_full_forward_argmax(run_dir):
    """Each greedy token is the argmax of the full (training) forward over the source and the decoder tokens so
    far: the cached encoder output, cross keys/values and T5-biased self-attention change nothing."""
    generator = Generator(str(run_dir))
    sources = [tokenizer.encode("abcdefghij", eos=True).tolist(), [5, 6, 7, 8]]
    prompts = [[tokenizer.BOS], [tokenizer.BOS, 40, 41]]
    result = generator.generate(prompts, greedy(), sources=sources)
    graphdef, state = generator.loaded.graphdef, generator.loaded.state
    width = len(prompts[1]) + NEW  # causal: the zeros after the tokens so far never reach their logits
    forward = jax.jit(lambda state, src, tgt: nnx.merge(graphdef, state)(src, tgt)[0][0])
    for source, prompt, tokens in zip(sources, prompts, result.tokens):
        decoded = list(prompt)
        for token in tokens:
            padded = np.zeros((1, width), np.int32)
            padded[0, :len(decoded)] = decoded
            logits_LV = forward(state, jnp.asarray([source], jnp.int32), jnp.asarray(padded))
            assert token == int(jnp.argmax(logits_LV[len(decoded) - 1]))
            decoded.append(token)
    assert len(result.tokens[0]) == NEW and result.tokens[0] != result.tokens[1]


def no_compiles(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the error")

    for name in ("prefill_step", "decode_steps", "extend_step", "init_cache"):
        monkeypatch.setattr(generate_module, name, refuse)


def test_missing_or_misplaced_sources_fail_with_one_line(run_dir, tmp_path, monkeypatch, capsys):
    decoder_dir = tmp_path / "decoder"
    save_run(decoder_dir, dataclasses.replace(MODEL, architecture="decoder", num_encoder_layers=0))
    no_compiles(monkeypatch)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps([[1, 2], 3]))
    cases = [
        ([f"run_dir={run_dir}"], "encoder_decoder: give exactly one of source=<text>, source_ids="),
        ([f"run_dir={run_dir}", "source=a", "source_ids=1,2"], "not source and source_ids"),
        ([f"run_dir={run_dir}", f"sources_file={tmp_path / 'missing.json'}"], "sources_file=.*cannot be read"),
        ([f"run_dir={run_dir}", f"sources_file={bad_file}"], "sources_file=.*non-empty JSON list of sources"),
        ([f"run_dir={run_dir}", "source_ids=1,300"], "source 0 has token id 300"),
        ([f"run_dir={run_dir}", "source=a", "speculative=lookup"], "speculative decode decoder-only runs"),
        ([f"run_dir={decoder_dir}", "prompt=hi", "source=a"], "source= is the encoder input of an encoder_decoder "
                                                              "run, but this run's model.architecture='decoder'"),
        ([f"run_dir={decoder_dir}", "prompt=hi", "source_ids=1"], "drop source_ids="),
    ]
    for argv, match in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert re.search(match, err), (match, err)


def test_generator_refuses_sources_it_cannot_use(run_dir, tmp_path, monkeypatch):
    decoder_dir = tmp_path / "decoder"
    save_run(decoder_dir, dataclasses.replace(MODEL, architecture="decoder", num_encoder_layers=0))
    decoder, encdec = Generator(str(decoder_dir)), Generator(str(run_dir))
    no_compiles(monkeypatch)
    with pytest.raises(ConfigError, match="sources=.*encoder_decoder model; this model is model.architecture='dec"):
        decoder.generate([[1]], greedy(), sources=[[2]])
    with pytest.raises(ConfigError, match="needs sources="):
        encdec.generate([[1]], greedy())
    with pytest.raises(ConfigError, match="one source per prompt: 1 sources for 2 prompts"):
        encdec.generate([[1], [2]], greedy(), sources=[[3]])
