"""Evaluation of a trained run: held-out loss and accuracy of its training objective (every architecture),
and for a decoder perplexity at many lengths and passkey retrieval.

    python -m transformer.evaluate run_dir=runs/tiny lengths=128,256,512 [num_sequences=8]
        [mode=chunks|sliding] [stride=N] [passkey_lengths=128,256] [depths=0,0.5,1] [trials=10]
        [seed=0] [batch_size=8] [eval_batches=N] [out=PATH] [model.rope_scaling=yarn model.rope_scaling_factor=4 ...]
    python -m transformer.evaluate run_dir=runs/mlm [eval_batches=N]      # an encoder or encoder_decoder run

Any `a.b=value` config override is applied to the run's saved config, so positional scaling
(rope_scaling and its factors) can change at inference without retraining; overrides that
change parameter shapes are refused when the checkpoint is loaded. Prints a table and writes
JSON (default run_dir/evaluation.json). Runs in a single process, on one device unless a
`mesh.*` override asks for more (a `mesh.sequence` axis > 1 evaluates with ring attention).

Held-out report (`held_out_metrics`): the first eval_batches held-out batches of the run's data.objective,
scored like the train loop's eval: mean cross-entropy of the scored tokens, its perplexity, and their accuracy
(argmax == target). For an encoder (MLM) that is masked-token loss and accuracy, for an encoder_decoder the
loss and token accuracy of the decoder's targets (span corruption's targets, or a seq2seq target), for a
decoder next-token loss and accuracy. Encoder and encoder_decoder runs get this report by default (eval_batches
defaults to the run's eval_batches); lengths and passkey_lengths measure a decoder and are refused for them.

Perplexity modes, for each length L over the first `num_sequences` held-out windows of L + 1 tokens:
- "chunks": each window is one forward pass of L tokens (perplexity *at* context length L).
- "sliding": windows of the training length W = data.seq_len move by `stride` (default W / 2);
  each scores only the tokens no earlier window scored, so every token after the first window
  sees at least W - stride tokens of context (a no-extrapolation baseline for L > W).

Passkey accuracy at length L: prompts laid out exactly like the training rows of
data.dataset="passkey" at data.seq_len = L (an example of L + 1 tokens ending in the answer digits); the
model generates the answer greedily with the KV cache (prefill, then decode), and an example counts
when every generated digit is right.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from transformer import runs, sharding, train
from transformer.config import (OVERRIDES_TITLE, SEQUENCE, Config, ConfigError, ModelConfig, apply_overrides, described,
                                print_help_if_asked)
from transformer.data import make_dataset
from transformer.data.placement import place_batch
from transformer.data.synthetic import passkey_example
from transformer.inference.generate import Generator
from transformer.inference.sampling import SamplingConfig
from transformer.loss import loss_sums
from transformer.ops.layout import ring_length_problem
from transformer.runs import LoadedModel

MODES = ("chunks", "sliding")
DECODER_OPTIONS = ("lengths", "passkey_lengths", "num_sequences", "mode", "stride", "batch_size", "depths", "trials",
                   "seed")  # settings of the measurements of a causal decoder only


def load_model(source, *, model_cfg: ModelConfig | None = None, overrides: Sequence[str] = (),
               mesh=None) -> LoadedModel:
    """`runs.load_model` for a causal decoder LM (what perplexity and passkey evaluation need)."""
    return runs.load_model(source, model_cfg=model_cfg, overrides=overrides, mesh=mesh, architectures=("decoder",))


def _check_length(cfg: Config, length: int, ring: int) -> None:
    if length < 1:
        raise ValueError(f"length {length} must be >= 1")
    if cfg.model.position == "learned" and length > cfg.model.max_seq_len:
        raise ValueError(f"length {length} exceeds model.max_seq_len={cfg.model.max_seq_len}, the size of the "
                         "learned position table; use lengths <= max_seq_len or another position encoding")
    if ring > 1 and (problem := ring_length_problem(f"length {length}", length, f"mesh.sequence={ring}", ring, True)):
        raise ValueError(problem)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _loss_sums(graphdef, state, batch, loss_chunk_size: int):
    sums, _ = loss_sums(nnx.merge(graphdef, state), batch, loss_chunk_size=loss_chunk_size)
    return sums


def _batch(inputs_BL, targets_BL, mask_BL) -> dict[str, np.ndarray]:
    B, L = inputs_BL.shape
    return {"inputs_BL": inputs_BL.astype(np.int32), "targets_BL": targets_BL.astype(np.int32),
            "loss_mask_BL": mask_BL.astype(np.float32),
            "positions_BL": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
            "segment_ids_BL": np.ones((B, L), np.int32)}


def _windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each sliding window over `length` tokens."""
    if length <= window:
        return [(0, 0)]
    starts = list(range(0, length - window, stride)) + [length - window]
    return [(start, 0 if i == 0 else starts[i - 1] + window - start) for i, start in enumerate(starts)]


def perplexity_at_lengths(source, lengths: Sequence[int], num_sequences: int = 8, *, mode: str = "chunks",
                          stride: int = 0, model_cfg: ModelConfig | None = None, batch_size: int = 8,
                          mesh=None) -> list[dict]:
    """Held-out perplexity at each length: one dict per length with length, loss (mean nats/token),
    perplexity, tokens, mode (and window, stride for "sliding"). See the module docstring for modes."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; choose one of {', '.join(map(repr, MODES))}")
    if num_sequences < 1 or batch_size < 1:
        raise ValueError(f"num_sequences={num_sequences} and batch_size={batch_size} must be >= 1")
    loaded = load_model(source, model_cfg=model_cfg, mesh=mesh)
    cfg, ring = loaded.cfg, loaded.mesh.shape[SEQUENCE]
    window = cfg.data.seq_len
    stride = stride or max(window // 2, 1)
    if mode == "sliding" and not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in [1, data.seq_len={window}] for mode='sliding'")
    data = make_dataset(cfg.data, "eval", vocab_size=cfg.model.vocab_size)
    results = []
    with sharding.use_mesh(loaded.mesh):
        for length in lengths:
            _check_length(cfg, length, ring)
            tokens_ZL = data.eval_sequences(length, num_sequences)
            spans = _windows(length, window, stride) if mode == "sliding" else [(0, 0)]
            span = min(length, window) if mode == "sliding" else length
            ce = tokens = 0.0
            for start, scored_from in spans:
                mask_L = (np.arange(span) >= scored_from).astype(np.float32)
                for row in range(0, num_sequences, batch_size):
                    rows_BL = tokens_ZL[row:row + batch_size, start:start + span + 1]
                    batch = _batch(rows_BL[:, :-1], rows_BL[:, 1:], np.broadcast_to(mask_L, rows_BL[:, 1:].shape))
                    sums = jax.device_get(_loss_sums(loaded.graphdef, loaded.state, place_batch(batch, loaded.mesh),
                                                     cfg.loss_chunk_size))
                    ce, tokens = ce + float(sums["ce"]), tokens + float(sums["tokens"])
            loss = ce / tokens
            result = {"length": int(length), "mode": mode, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                      "tokens": int(tokens)}
            if mode == "sliding":
                result.update(window=window, stride=stride)
            results.append(result)
    return results


def held_out_metrics(source, num_batches: int = 0, *, model_cfg: ModelConfig | None = None, mesh=None) -> dict:
    """The held-out report of any architecture (module docstring): a dict with objective, batches, tokens (scored),
    loss (mean nats per scored token), perplexity and accuracy over the first `num_batches` held-out batches
    (0: the run's eval_batches), the numbers the train loop's eval logs as eval_loss and eval_accuracy."""
    loaded = runs.load_model(source, model_cfg=model_cfg, mesh=mesh)
    cfg = loaded.cfg
    if num_batches < 0:
        raise ValueError(f"eval_batches={num_batches} must be >= 0 (0: the run's eval_batches={cfg.eval_batches})")
    num_batches = num_batches or cfg.eval_batches
    sharding.validate_for_mesh(cfg, loaded.mesh)
    data = train.training_dataset(cfg)

    def eval_step(graphdef, state, batch):
        return _loss_sums(graphdef, state, batch, cfg.loss_chunk_size), {}

    with sharding.use_mesh(loaded.mesh):
        result = train.evaluate_held_out(eval_step, loaded.graphdef, loaded.state, data, loaded.mesh, num_batches,
                                         causal=cfg.model.causal)
    loss = result["eval_loss"]
    return {"objective": cfg.objective, "batches": num_batches, "tokens": int(result["eval_tokens"]), "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)), "accuracy": result["eval_accuracy"]}


def passkey_prompts(length: int, depth: float, trials: int, rng: np.random.Generator, *,
                    digits: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(prompts, answers_ZY): `trials` passkey examples of length + 1 tokens laid out like the training rows of
    data.seq_len = length; each prompt is an example up to its answer, whose digits are answers_ZY."""
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    examples = [passkey_example(length + 1, float(depth), rng, digits=digits) for _ in range(trials)]
    return ([tokens[:start] for tokens, (start, _) in examples],
            np.stack([tokens[start:end] for tokens, (start, end) in examples]))


def passkey_accuracy(source, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.5, 1.0), trials: int = 10, *,
                     seed: int = 0, model_cfg: ModelConfig | None = None, mesh=None) -> list[dict]:
    """Passkey retrieval by generation, in [0, 1] for each (context length, depth): one dict with length, depth,
    accuracy (every generated answer digit right), digit_accuracy and trials. Prompts come from
    `passkey_prompts` (length = data.seq_len is exactly the training layout); the answer is decoded greedily
    with the KV cache (`inference.generate`), the prompt prefilled with the training kernels (Ring Attention
    on a `sequence` mesh)."""
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    loaded = load_model(source, model_cfg=model_cfg, mesh=mesh)
    cfg = loaded.cfg
    generator = Generator(loaded)
    digits = cfg.data.passkey_digits
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=digits)
    results = []
    for length in lengths:
        _check_length(cfg, length, 1)
        for d, depth in enumerate(depths):
            rng = np.random.default_rng([seed, int(length), d])
            prompts, answers_ZY = passkey_prompts(length, depth, trials, rng, digits=digits)
            generated = generator.generate(prompts, greedy).tokens
            correct_ZY = np.array([np.asarray(row, np.int64) == answer for row, answer in zip(generated, answers_ZY)])
            results.append({"length": int(length), "depth": float(depth),
                            "accuracy": float(np.mean(np.all(correct_ZY, axis=1))),
                            "digit_accuracy": float(np.mean(correct_ZY)), "trials": int(trials)})
    return results


# ---------------------------------------------------------------- CLI


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    cells = [[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Options:
    """The CLI's own `key=value` arguments (see the module docstring); any other key is a config override.
    passkey_lengths defaults to lengths."""

    run_dir: str = described("", "the training run to evaluate (required)")
    lengths: tuple[int, ...] = described((), "comma-separated lengths L to measure perplexity at (a decoder needs "
                                     "lengths or eval_batches)")
    num_sequences: int = described(8, "held-out windows per length")
    mode: str = described("chunks", "chunks: one pass per window of L; sliding: windows of data.seq_len by stride")
    stride: int = described(0, "sliding mode: step between windows; 0: data.seq_len // 2")
    batch_size: int = described(8, "windows per forward pass")
    passkey_lengths: tuple[int, ...] = described((), "passkey prompt lengths; not given: lengths")
    depths: tuple[float, ...] = described((0.0, 0.5, 1.0), "passkey positions, a fraction of the prompt (0: start)")
    trials: int = described(10, "passkey prompts per length and depth")
    seed: int = described(0, "seed of the passkey prompts")
    eval_batches: int = described(0, "held-out batches of the training objective to score; 0: the run's "
                                     "eval_batches for encoder and encoder_decoder runs, none for a decoder")
    out: str = described("", "JSON report path; '': run_dir/evaluation.json")


OPTIONS = tuple(field.name for field in dataclasses.fields(Options))


def parse_args(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """(evaluation options, config overrides) from `key=value` arguments."""
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r} must look like key=value; options: {', '.join(OPTIONS)}, "
                             "or a config override like model.rope_scaling=yarn")
    own = [arg for arg in argv if arg.split("=", 1)[0] in OPTIONS]
    given = {arg.split("=", 1)[0] for arg in own}
    if "run_dir" not in given:
        raise ValueError("run_dir=<training run directory> is required")
    options = apply_overrides(Options(), own)
    if "passkey_lengths" not in given:
        options = dataclasses.replace(options, passkey_lengths=options.lengths)
    return options, [arg for arg in argv if arg not in own]


def check_options(options: Options, architecture: str) -> None:
    """ValueError (one line) unless `options` ask for something a model.architecture run can give."""
    if architecture != "decoder":
        defaults = Options()
        for name in DECODER_OPTIONS:
            if getattr(options, name) != getattr(defaults, name):
                raise ValueError(f"{name}= measures a decoder (perplexity vs length, passkey retrieval) but "
                                 f"model.architecture={architecture!r}; drop {name}= to get the held-out report of "
                                 "its objective (eval_batches=N sets its size)")
    elif not options.lengths and not options.eval_batches:
        raise ValueError("lengths=<comma-separated sequence lengths> is required for a decoder, e.g. "
                         "lengths=256,512 (or eval_batches=N for the held-out report alone)")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring); bad arguments print one line and return 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if print_help_if_asked(argv, __doc__, [("Options (key=value), with defaults", Options)],
                           presets=False, config_title=OVERRIDES_TITLE):
        return 0
    try:
        options, overrides = parse_args(argv)
        loaded = runs.load_model(options.run_dir, overrides=overrides)
        decoder = loaded.cfg.model.architecture == "decoder"
        check_options(options, loaded.cfg.model.architecture)
        held_out = held_out_metrics(loaded, options.eval_batches) if options.eval_batches or not decoder else None
        ppl = perplexity_at_lengths(loaded, options.lengths, options.num_sequences, mode=options.mode,
                                    stride=options.stride, batch_size=options.batch_size) if options.lengths else []
        passkey = passkey_accuracy(loaded, options.passkey_lengths, options.depths, options.trials,
                                   seed=options.seed) if options.passkey_lengths else []
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tail = f" with {' '.join(overrides)}" if overrides else ""
    if held_out:
        print(f"held-out {held_out['objective']} batches of {options.run_dir}{tail}")
        print(_table([held_out], ("batches", "tokens", "loss", "perplexity", "accuracy")))
    if ppl:
        print(("\n" if held_out else "") + f"perplexity ({options.mode}) of {options.run_dir}{tail}")
        print(_table(ppl, ("length", "loss", "perplexity", "tokens")))
    if passkey:
        print("\npasskey retrieval")
        print(_table(passkey, ("length", "depth", "accuracy", "digit_accuracy", "trials")))
    out = Path(options.out or Path(options.run_dir) / "evaluation.json")
    report = {"run_dir": options.run_dir, "overrides": overrides, "model": dataclasses.asdict(loaded.cfg.model),
              "held_out": held_out, "num_sequences": options.num_sequences, "perplexity": ppl, "passkey": passkey}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
