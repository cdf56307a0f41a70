"""Generate text (or token ids) from a trained run, streaming as it decodes.

    python -m transformer.generate run_dir=runs/tiny prompt="And God said" [max_new_tokens=200]
        [temperature=0.8] [top_k=0] [top_p=1] [min_p=0] [repetition_penalty=1] [stop_tokens=258] [seed=0]
        [num_samples=1] [max_len=0] [prefill_chunk=0] [decode_steps=16]
        [draft_run_dir=runs/draft | speculative=lookup] [draft_tokens=4]
        [prompt_ids=5,17,42] [out=FILE.json] [interactive=true] [mesh.sequence=4 ... any config override]
    python -m transformer.generate run_dir=runs/t5 source="text to transform" [prompt=""] [...]
        [source_ids=5,17,42 | sources_file=FILE.json]

`prompt` is text, tokenized by the run's data.tokenizer (bytes, or the hf:/sentencepiece: tokenizer a converted
Hugging Face run carries), and the output is decoded by it; `prompt_ids` gives token ids instead (for scripts).
temperature=0 is greedy. The default stop token is the tokenizer's EOS. `draft_run_dir` decodes speculatively with a
small draft model, `speculative=lookup` with n-gram prompt lookup (no second model); both print the
acceptance rate. `out` writes the prompt and generated ids of every row as JSON. `interactive=true` reads
one prompt per line from stdin and keeps the KV cache between turns, so each turn only prefills its new text.
Any `a.b=value` is a config override of the run's saved config (e.g. mesh.sequence=4 splits the cache over
4 devices, model.rope_scaling=yarn extends the context). Bad arguments print one line and exit 2.

An encoder_decoder run needs the encoder's input: `source` (text, encoded like the training sources: its
bytes then EOS), `source_ids` (token ids, taken as they are) or `sources_file`, a JSON list of sources (texts
or lists of ids) giving num_samples rows each. The encoder runs once per source and every layer's
cross-attention keys/values are cached; the decoder starts from BOS followed by the prompt (none by
default). With interactive=true each stdin line is a new source.
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
from transformer.data.tokenizers import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer
from transformer.inference.generate import FINISHED, Generation, Generator
from transformer.inference.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Options:
    """The CLI's own `key=value` arguments; any other key is a config override."""

    run_dir: str = described("", "the training run to generate from (required)")
    prompt: str = described("", "prompt text for the byte tokenizer")
    prompt_ids: tuple[int, ...] = described((), "comma-separated prompt token ids instead of prompt")
    source: str = described("", "encoder_decoder: source text for the encoder (its bytes, then EOS)")
    source_ids: tuple[int, ...] = described((), "encoder_decoder: comma-separated source token ids instead of source")
    sources_file: str = described("", "encoder_decoder: JSON list of sources (texts or lists of ids), one row each")
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
    """Prints row 0's new tokens as text as they arrive: bytes through an incremental UTF-8 decoder (a character
    split across calls is decoded correctly), other tokenizers by decoding all tokens so far and printing what
    is new."""

    def __init__(self, text_tokenizer: Tokenizer | None = None, out=None):
        self.tokenizer = None if isinstance(text_tokenizer, (ByteTokenizer, type(None))) else text_tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.printed = ""
        self.out = sys.stdout if out is None else out

    def __call__(self, tokens_BT: np.ndarray) -> None:
        ids = [int(t) for t in tokens_BT[0] if t != FINISHED]
        if self.tokenizer is None:
            self.out.write(self.decoder.decode(bytes(t for t in ids if t < 256)))
        else:
            self.ids += ids
            text = self.tokenizer.decode(self.ids)
            self.out.write(text[len(self.printed):] if text.startswith(self.printed) else text)
            self.printed = text
        self.out.flush()


SOURCE_OPTIONS = ("source", "source_ids", "sources_file")


def _encoder_decoder(generator: Generator) -> bool:
    return generator.model_cfg.architecture == "encoder_decoder"


def _text_tokenizer(generator: Generator) -> Tokenizer | None:
    """The tokenizer of the run's text (None: token ids in and out): data.tokenizer when not bytes; else bytes for
    byte data with the byte vocabulary or an encoder-decoder's (its span-corruption sentinels are the ids above
    the bytes and specials)."""
    spec = generator.cfg.data.tokenizer
    if spec != "bytes":
        text_tokenizer = load_tokenizer(spec)
        check_vocab(text_tokenizer, generator.vocab_size)
        return text_tokenizer
    if generator.cfg.data.dataset == "npy":
        return None
    byte_vocab = generator.vocab_size == tokenizer.VOCAB_SIZE or _encoder_decoder(generator)
    return ByteTokenizer() if byte_vocab else None


def _prompt_tokens(options: Options, text: str | None = None, *, encoder_decoder: bool = False,
                   text_tokenizer: Tokenizer | None = None) -> list[int]:
    """The decoder's prompt: prompt_ids or the prompt text through the run's tokenizer (bytes when it has none);
    an encoder-decoder's starts with BOS and may be empty."""
    if text is None and options.prompt_ids:
        tokens = list(options.prompt_ids)
    else:
        text = options.prompt if text is None else text
        if not text and not encoder_decoder:
            raise ConfigError("give prompt=<text> or prompt_ids=<comma-separated token ids>")
        tokens = (text_tokenizer or ByteTokenizer()).encode(text).tolist()
    return [tokenizer.BOS, *tokens] if encoder_decoder else tokens


def _source_tokens(options: Options, generator: Generator) -> list[list[int]] | None:
    """The encoder input of every row of an encoder_decoder run (None for a decoder): num_samples rows per
    source; ConfigError naming the option when a source is missing, extra or malformed."""
    given = [name for name in SOURCE_OPTIONS if getattr(options, name)]
    if not _encoder_decoder(generator):
        if given:
            raise ConfigError(f"{given[0]}= is the encoder input of an encoder_decoder run, but this run's "
                              f"model.architecture={generator.model_cfg.architecture!r}; drop {given[0]}=")
        return None
    if len(given) != 1:
        raise ConfigError("this run is an encoder_decoder: give exactly one of source=<text>, "
                          "source_ids=<comma-separated ids> or sources_file=<JSON list of sources>"
                          + (f", not {' and '.join(given)}" if given else ""))
    if options.source:
        sources = [_encode_source(options.source)]
    elif options.source_ids:
        sources = [list(options.source_ids)]
    else:
        sources = _read_sources(options.sources_file)
    return [source for source in sources for _ in range(options.num_samples)]


def _encode_source(text: str) -> list[int]:
    """A source text as training encodes it: its bytes, then EOS."""
    return tokenizer.encode(text, eos=True).tolist()


def _read_sources(path: str) -> list[list[int]]:
    """The sources in the JSON file `path`: texts (encoded by `_encode_source`) and lists of token ids."""
    try:
        sources = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"sources_file={path!r} cannot be read as JSON ({e})") from None

    def valid(source) -> bool:
        ids = isinstance(source, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in source)
        return bool(source) and (isinstance(source, str) or ids)

    if not isinstance(sources, list) or not sources or not all(map(valid, sources)):
        raise ConfigError(f"sources_file={path!r} must hold a non-empty JSON list of sources, each a non-empty text "
                          "or a non-empty list of token ids")
    return [_encode_source(x) if isinstance(x, str) else x for x in sources]


def _run(generator: Generator, draft, options: Options, sampling: SamplingConfig, prompt: list[int],
         keep_cache: bool = False, sources: list[list[int]] | None = None,
         text_tokenizer: Tokenizer | None = None) -> Generation:
    """num_samples rows from the prompt, or one row per source (the encoder input of each row)."""
    prompts = [prompt] * (options.num_samples if sources is None else len(sources))
    if options.speculative or draft is not None:
        from transformer.inference.speculative import speculative_generate

        return speculative_generate(generator, prompts, sampling, draft=draft, draft_tokens=options.draft_tokens,
                                    max_len=options.max_len)
    streams = options.stream and text_tokenizer is not None and jax.process_index() == 0
    stream = TextStream(text_tokenizer) if streams else None
    result = generator.generate(prompts, sampling, max_len=options.max_len, prefill_chunk=options.prefill_chunk,
                                decode_steps_per_call=options.decode_steps, on_tokens=stream, keep_cache=keep_cache,
                                sources=sources)
    if stream is not None:
        print()
    return result


def _report(result: Generation, text_tokenizer: Tokenizer | None, streamed: bool) -> None:
    for row, tokens in enumerate(result.tokens):
        if text_tokenizer is not None and not (streamed and row == 0):
            print(f"[{row}] {text_tokenizer.decode(tokens)}")
        elif text_tokenizer is None:
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
        text_tokenizer = _text_tokenizer(generator)
        if not stops_given and text_tokenizer is not None and text_tokenizer.eos_id is not None:
            sampling = dataclasses.replace(sampling, stop_tokens=(text_tokenizer.eos_id,))
        sampling.validate(generator.vocab_size)
        encoder_decoder = _encoder_decoder(generator)
        if encoder_decoder and (options.draft_run_dir or options.speculative):
            raise ConfigError("draft_run_dir / speculative decode decoder-only runs; drop them for this "
                              "encoder_decoder run")
        if options.interactive and encoder_decoder:
            if any(getattr(options, name) for name in SOURCE_OPTIONS):
                raise ConfigError("interactive=true reads each source from stdin; drop source / source_ids / "
                                  "sources_file")
            sources = None
        else:
            sources = _source_tokens(options, generator)
        draft = Generator(options.draft_run_dir) if options.draft_run_dir else None
        streamed = options.stream and text_tokenizer is not None and not options.speculative and draft is None
        if options.interactive:
            return _interactive(generator, draft, options, sampling, text_tokenizer, streamed)
        prompt = _prompt_tokens(options, encoder_decoder=encoder_decoder, text_tokenizer=text_tokenizer)
        result = _run(generator, draft, options, sampling, prompt, sources=sources, text_tokenizer=text_tokenizer)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:
        return 0
    _report(result, text_tokenizer, streamed)
    if options.out:
        rows = [{"prompt_ids": prompt, "generated_ids": tokens, "finish": finish}
                for tokens, finish in zip(result.tokens, result.finish)]
        for row, source in zip(rows, sources or ()):
            row["source_ids"] = source
        report = {"run_dir": options.run_dir, "overrides": overrides, "sampling": dataclasses.asdict(sampling),
                  "rows": rows, "stats": result.stats}
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _interactive(generator: Generator, draft, options: Options, sampling: SamplingConfig,
                 text_tokenizer: Tokenizer | None, streamed: bool) -> int:
    """One prompt per stdin line; the cache is kept between turns (each turn prefills only its new text). For
    an encoder_decoder, each line is a new source (the decoder starts from BOS and the prompt option)."""
    if draft is not None or options.speculative:
        raise ConfigError("interactive=true decodes without a draft; drop draft_run_dir / speculative")
    encoder_decoder = _encoder_decoder(generator)
    learned = generator.model_cfg.position == "learned"
    max_len = options.max_len or (generator.model_cfg.max_seq_len if learned else INTERACTIVE_MAX_LEN)
    options = dataclasses.replace(options, num_samples=1, max_len=options.max_len if encoder_decoder else max_len)
    decoder_prompt = _prompt_tokens(options, encoder_decoder=True, text_tokenizer=text_tokenizer) \
        if encoder_decoder else None
    turn = 0
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text:
            continue
        tokens = (_encode_source(text) if encoder_decoder else text_tokenizer.encode(text).tolist()) \
            if text_tokenizer is not None else [int(t) for t in text.replace(",", " ").split()]
        try:
            if encoder_decoder:
                result = _run(generator, None, options, sampling, decoder_prompt, sources=[tokens],
                              text_tokenizer=text_tokenizer)
            else:
                result = _run(generator, None, options, sampling, tokens, keep_cache=turn > 0,
                              text_tokenizer=text_tokenizer)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _report(result, text_tokenizer, streamed)
        turn += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
