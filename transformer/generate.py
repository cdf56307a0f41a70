"""Generate text (or token ids) from a trained run, streaming as it decodes.

    python -m transformer.generate run_dir=runs/tiny prompt="And God said" [max_new_tokens=200]
        [temperature=0.8] [top_k=0] [top_p=1] [min_p=0] [repetition_penalty=1] [stop_tokens=258] [seed=0]
        [num_samples=1] [max_len=0] [prefill_chunk=0] [decode_steps=16]
        [draft_run_dir=runs/draft | speculative=lookup] [draft_tokens=4]
        [prompt_ids=5,17,42] [out=FILE.json] [interactive=true] [mesh.sequence=4 ... any config override]

`prompt` is text for the byte tokenizer; `prompt_ids` gives token ids instead (for scripts). temperature=0 is
greedy. The default stop token is the byte tokenizer's EOS. `draft_run_dir` decodes speculatively with a
small draft model, `speculative=lookup` with n-gram prompt lookup (no second model); both print the
acceptance rate. `out` writes the prompt and generated ids of every row as JSON. `interactive=true` reads
one prompt per line from stdin and keeps the KV cache between turns, so each turn only prefills its new text.
Any `a.b=value` is a config override of the run's saved config (e.g. mesh.sequence=4 splits the cache over
4 devices, model.rope_scaling=yarn extends the context). Bad arguments print one line and exit 2.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from transformer import distributed
from transformer.config import OVERRIDES_TITLE, ConfigError, apply_overrides, described, print_help_if_asked
from transformer.data import tokenizer
from transformer.inference.generate import FINISHED, Generation, Generator
from transformer.inference.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Options:
    """The CLI's own `key=value` arguments; any other key is a config override."""

    run_dir: str = described("", "the training run to generate from (required)")
    prompt: str = described("", "prompt text for the byte tokenizer")
    prompt_ids: tuple[int, ...] = described((), "comma-separated prompt token ids instead of prompt")
    num_samples: int = described(1, "rows generated from the prompt")
    max_len: int = described(0, "cache positions per row; 0: prompt + max_new_tokens")
    prefill_chunk: int = described(0, "prompt tokens per prefill call; 0: the whole prompt at once")
    decode_steps: int = described(16, "tokens decoded per device call")
    draft_run_dir: str = described("", "decode speculatively with this run as the draft model")
    speculative: str = described("", "lookup: speculative decoding with n-gram prompt lookup drafts")
    draft_tokens: int = described(4, "tokens a draft proposes per verification")
    out: str = described("", "write prompt and generated ids of every row to this JSON file")
    interactive: bool = described(False, "one prompt per stdin line, keeping the KV cache between turns")
    stream: bool = described(True, "print row 0's text as it decodes")


INTERACTIVE_MAX_LEN = 4096  # cache positions of an interactive session unless max_len says otherwise
SAMPLING = tuple(f.name for f in dataclasses.fields(SamplingConfig))
OPTIONS = tuple(f.name for f in dataclasses.fields(Options))


def parse_args(argv: Sequence[str]) -> tuple[Options, SamplingConfig, list[str], bool]:
    """(options, sampling, config overrides, whether stop_tokens was given)."""
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} must look like key=value; options: {', '.join(OPTIONS + SAMPLING)}, "
                              "or a config override like mesh.sequence=4")
    key = lambda arg: arg.split("=", 1)[0]
    own = [a for a in argv if key(a) in OPTIONS]
    knobs = [a for a in argv if key(a) in SAMPLING]
    overrides = [a for a in argv if key(a) not in OPTIONS + SAMPLING]
    for arg in overrides:
        if "." not in key(arg):
            raise ConfigError(f"unknown option {key(arg)!r}; options: {', '.join(OPTIONS + SAMPLING)}, "
                              "or a config override like mesh.sequence=4")
    options = apply_overrides(Options(), own)
    if not options.run_dir:
        raise ConfigError("run_dir=<training run directory> is required")
    if options.speculative not in ("", "lookup"):
        raise ConfigError(f"speculative={options.speculative!r} is not valid; use speculative=lookup or "
                          "draft_run_dir=<run dir of a draft model>")
    if options.num_samples < 1:
        raise ConfigError(f"num_samples={options.num_samples} must be >= 1")
    sampling = apply_overrides(SamplingConfig(), knobs)
    return options, sampling, overrides, any(key(a) == "stop_tokens" for a in knobs)


class TextStream:
    """Prints row 0's new tokens as text as they arrive (UTF-8 split across calls is decoded correctly)."""

    def __init__(self, out=sys.stdout):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out = out

    def __call__(self, tokens_BT: np.ndarray) -> None:
        ids = [t for t in tokens_BT[0] if t != FINISHED and t < 256]
        self.out.write(self.decoder.decode(bytes(ids)))
        self.out.flush()


def _prompt_tokens(options: Options, text: str | None = None) -> list[int]:
    if text is None and options.prompt_ids:
        return list(options.prompt_ids)
    text = options.prompt if text is None else text
    if not text:
        raise ConfigError("give prompt=<text> or prompt_ids=<comma-separated token ids>")
    return tokenizer.encode(text).tolist()


def _run(generator: Generator, draft, options: Options, sampling: SamplingConfig, prompt: list[int],
         keep_cache: bool = False) -> Generation:
    prompts = [prompt] * options.num_samples
    if options.speculative or draft is not None:
        from transformer.inference.speculative import speculative_generate

        return speculative_generate(generator, prompts, sampling, draft=draft, draft_tokens=options.draft_tokens,
                                    max_len=options.max_len)
    streams = options.stream and generator.vocab_size == tokenizer.VOCAB_SIZE and jax.process_index() == 0
    stream = TextStream() if streams else None
    result = generator.generate(prompts, sampling, max_len=options.max_len, prefill_chunk=options.prefill_chunk,
                                decode_steps_per_call=options.decode_steps, on_tokens=stream, keep_cache=keep_cache)
    if stream is not None:
        print()
    return result


def _report(result: Generation, byte_vocab: bool, streamed: bool) -> None:
    for row, tokens in enumerate(result.tokens):
        if byte_vocab and not (streamed and row == 0):
            print(f"[{row}] {tokenizer.decode([t for t in tokens if t < tokenizer.VOCAB_SIZE])}")
        elif not byte_vocab:
            print(f"[{row}] {' '.join(map(str, tokens))}")
    rate = result.new_tokens / max(result.decode_seconds, 1e-9)
    line = (f"-- {result.new_tokens} new tokens in {result.decode_seconds:.2f} s ({rate:.1f} tokens/s); prefill "
            f"{sum(result.prompt_lengths)} tokens in {result.prefill_seconds:.2f} s; finish: {', '.join(result.finish)}")
    if "acceptance_rate" in result.stats:
        line += f"; draft acceptance {result.stats['acceptance_rate']:.2f}"
    print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if print_help_if_asked(argv, __doc__, [("Options (key=value), with defaults", Options),
                                           ("Sampling (key=value), with defaults", SamplingConfig)],
                           presets=False, config_title=OVERRIDES_TITLE):
        return 0
    try:
        options, sampling, overrides, stops_given = parse_args(argv)
        distributed.initialize()
        if not Path(options.run_dir, "config.json").exists():
            raise ConfigError(f"run_dir={options.run_dir!r} has no config.json; give the directory of a training run")
        generator = Generator(options.run_dir, overrides=overrides)
        byte_vocab = generator.vocab_size == tokenizer.VOCAB_SIZE and generator.cfg.data.dataset != "npy"
        if not stops_given and byte_vocab:
            sampling = dataclasses.replace(sampling, stop_tokens=(tokenizer.EOS,))
        sampling.validate(generator.vocab_size)
        draft = Generator(options.draft_run_dir) if options.draft_run_dir else None
        streamed = options.stream and byte_vocab and not options.speculative and draft is None
        if options.interactive:
            return _interactive(generator, draft, options, sampling, byte_vocab, streamed)
        prompt = _prompt_tokens(options)
        result = _run(generator, draft, options, sampling, prompt)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:
        return 0
    _report(result, byte_vocab, streamed)
    if options.out:
        report = {"run_dir": options.run_dir, "overrides": overrides, "sampling": dataclasses.asdict(sampling),
                  "rows": [{"prompt_ids": prompt, "generated_ids": tokens, "finish": finish}
                           for tokens, finish in zip(result.tokens, result.finish)], "stats": result.stats}
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _interactive(generator: Generator, draft, options: Options, sampling: SamplingConfig, byte_vocab: bool,
                 streamed: bool) -> int:
    """One prompt per stdin line; the cache is kept between turns (each turn prefills only its new text)."""
    if draft is not None or options.speculative:
        raise ConfigError("interactive=true decodes without a draft; drop draft_run_dir / speculative")
    learned = generator.model_cfg.position == "learned"
    max_len = options.max_len or (generator.model_cfg.max_seq_len if learned else INTERACTIVE_MAX_LEN)
    options = dataclasses.replace(options, num_samples=1, max_len=max_len)
    turn = 0
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text:
            continue
        prompt = tokenizer.encode(text).tolist() if byte_vocab else [int(t) for t in text.replace(",", " ").split()]
        try:
            result = _run(generator, None, options, sampling, prompt, keep_cache=turn > 0)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _report(result, byte_vocab, streamed)
        turn += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
