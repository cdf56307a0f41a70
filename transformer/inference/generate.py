"""Generation with the KV cache: prefill, then decode, with sampling, stop tokens and streaming.

    generator = Generator(run_dir)                      # or a LoadedModel, or (Config, model state)
    result = generator.generate([[5, 17, 42], [7]], SamplingConfig(temperature=0.8, top_p=0.9))
    result.tokens                                       # the new token ids of each row

Two jitted pure functions do the work, both `(params, cache, ...) -> (..., cache)` with the cache donated:
- prefill: each chunk of the (right-padded) prompts goes through `model.extend` (the first chunk with the
  training kernels, Ring Attention on a `sequence` mesh; later chunks, `prefill_chunk` tokens each, against
  the cache) and returns each row's logits after its last prompt token;
- decode: `decode_steps` tokens per call, a `lax.fori_loop` of sample -> extend(one token). A row that
  emits a stop token or reaches max_new_tokens stops writing to the cache; the host loop ends when every
  row has, and streams each call's tokens to `on_tokens`.
Positions continue each row's own length, so prompts of different lengths share a batch with no attention to
padding. `Generator` keeps the cache of its last call: `generate(..., keep_cache=True)` then continues those
rows from where they stopped (prompt caching for multi-turn use).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import runs, sharding
from transformer.config import ConfigError
from transformer.inference import sampling as sampling_ops
from transformer.inference.cache import KVCache, check_fits, init_cache, ring_window
from transformer.inference.sampling import SamplingConfig
from transformer.ops.layout import ring_multiple

FINISHED = -1  # the token a finished row emits in a decode call


@dataclasses.dataclass
class Generation:
    """What `generate` returns: the new tokens of each row (a stop token included), why each row ended
    ("stop" or "length"), and timings."""

    tokens: list[list[int]]
    finish: list[str]
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _last_logits(model, hidden_BLD, valid_BL):
    last_B = jnp.maximum(jnp.sum(valid_BL, axis=1) - 1, 0)
    return model.logits(jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0])


@functools.partial(jax.jit, static_argnames=("graphdef", "fresh"), donate_argnames=("cache",))
def prefill_step(graphdef, state, cache: KVCache, tokens_BL, valid_BL, source=None, *, fresh: bool):
    """(logits_BV after each row's last valid token of this chunk, cache)."""
    model = nnx.merge(graphdef, state)
    extra = {} if source is None else dict(src_BS=source[0], src_valid_BS=source[1])
    hidden_BLD, cache = model.extend(tokens_BL, cache, valid_BL=valid_BL, fresh=fresh, **extra)
    return _last_logits(model, hidden_BLD, valid_BL), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def extend_step(graphdef, state, cache: KVCache, tokens_BL, valid_BL):
    """(logits_BLV float32 of every new token, cache): L tokens per row against the cache (decode, verify)."""
    model = nnx.merge(graphdef, state)
    hidden_BLD, cache = model.extend(tokens_BL, cache, valid_BL=valid_BL)
    return model.logits(hidden_BLD), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "steps"), donate_argnames=("cache",))
def decode_steps(graphdef, state, cache: KVCache, logits_BV, done_B, count_B, seen_BV, first_step, *,
                 sampling: SamplingConfig, steps: int):
    """`steps` decode steps: sample each row's next token from logits_BV (with the rows' keys for step
    first_step + t), then, unless the row is done, run it through the model. A done row emits FINISHED and
    writes nothing; the shapes stay fixed, so one compilation serves the whole generation. Returns
    (tokens_BT, cache, logits_BV, done_B, count_B, seen_BV)."""
    model = nnx.merge(graphdef, state)
    stops = jnp.asarray(sampling.stop_tokens or (-2,), jnp.int32)
    keys_B = sampling_ops.row_keys(sampling.seed, done_B.shape[0])

    def step(t, carry):
        cache, logits_BV, done_B, count_B, seen_BV, tokens_BT = carry
        token_B = sampling_ops.sample(logits_BV, sampling_ops.step_keys(keys_B, first_step + t), sampling,
                                      seen_BV if sampling.repetition_penalty != 1 else None)
        token_B = jnp.where(done_B, FINISHED, token_B)
        seen_BV = sampling_ops.mark_seen(seen_BV, token_B)
        count_B = count_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.isin(token_B, stops) | (count_B >= sampling.max_new_tokens)
        feed_B1 = jnp.where(done_B, 0, token_B)[:, None]
        hidden_B1D, cache = model.extend(feed_B1, cache, valid_BL=~done_B[:, None])
        return cache, model.logits(hidden_B1D[:, 0]), done_B, count_B, seen_BV, tokens_BT.at[:, t].set(token_B)

    tokens_BT = jnp.full((done_B.shape[0], steps), FINISHED, jnp.int32)
    cache, logits_BV, done_B, count_B, seen_BV, tokens_BT = jax.lax.fori_loop(
        0, steps, step, (cache, logits_BV, done_B, count_B, seen_BV, tokens_BT))
    replicated = lambda x: sharding.constrain(x, (None,) * x.ndim)  # every process reads them
    return replicated(tokens_BT), cache, logits_BV, replicated(done_B), count_B, seen_BV


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BL, valid_BL): prompts right-padded with 0 to a common length, a multiple of `multiple`."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token; got prompt lengths {lengths}")
    L = -(-max(lengths) // multiple) * multiple
    tokens_BL = np.zeros((len(prompts), L), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_BL[row, :len(prompt)] = np.asarray(prompt, np.int32)
    return tokens_BL, np.arange(L)[None, :] < np.asarray(lengths)[:, None]


def on_mesh(x, mesh):
    """A host array as a jax.Array replicated over `mesh` (every process passes the same values)."""
    x = np.asarray(x)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.make_array_from_process_local_data(replicated, x, x.shape)


class Generator:
    """A loaded model ready to generate; keeps the cache of its last call for `keep_cache`."""

    def __init__(self, source, *, overrides: Sequence[str] = (), mesh=None):
        self.loaded = runs.load_model(source, overrides=overrides, mesh=mesh,
                                      architectures=("decoder", "encoder_decoder"))
        self.cfg = self.loaded.cfg
        self.model_cfg = self.cfg.model
        self.cache: KVCache | None = None
        self._unfed: list[int | None] = []

    @property
    def vocab_size(self) -> int:
        return self.model_cfg.vocab_size

    def check_prompts(self, prompts, what: str = "prompt") -> list[list[int]]:
        rows = [list(map(int, np.asarray(p).reshape(-1))) for p in prompts]
        V = self.vocab_size
        for row, prompt in enumerate(rows):
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise ConfigError(f"{what} {row} has token id {bad[0]}, outside the model's vocabulary [0, {V})")
        return rows

    def cache_length(self, prompt_len: int, sampling: SamplingConfig, max_len: int, *, extra: int = 0,
                     extra_reason: str = "") -> int:
        """Cache positions for prompts of up to prompt_len tokens, max_new_tokens and `extra` positions a call may
        write beyond them (checked against `max_len` when given, and against the model), rounded to the ring."""
        needed = prompt_len + sampling.max_new_tokens + extra
        if max_len and needed > max_len:
            raise ConfigError(f"the longest prompt ({prompt_len} tokens) plus max_new_tokens={sampling.max_new_tokens}"
                              f"{extra_reason} needs {needed} cache positions but max_len={max_len}; "
                              "shorten the prompt, lower max_new_tokens or raise max_len")
        ring = dict(self.loaded.mesh.shape).get("sequence", 1)
        length = -(-max(needed, max_len) // ring) * ring
        check_fits(self.model_cfg, length, self.loaded.mesh)
        return length

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(), *,
                 max_len: int = 0, prefill_chunk: int = 0, decode_steps_per_call: int = 16,
                 on_tokens: Callable[[np.ndarray], None] | None = None, keep_cache: bool = False,
                 sources: Sequence[Sequence[int]] | None = None) -> Generation:
        """New tokens for each prompt (lists of token ids). max_len: cache positions per row (0: longest
        prompt + max_new_tokens); prefill_chunk: prompt tokens per prefill call (0: the whole prompt);
        on_tokens(tokens_BT): called after every decode call with its tokens (FINISHED for finished rows).
        keep_cache=True continues the rows of the previous call with these prompts appended.
        sources: the encoder inputs of an encoder-decoder model, one per prompt (the prompt then starts the
        decoder)."""
        sampling = sampling.validate(self.vocab_size)
        prompts = self.check_prompts(prompts)
        mesh, graphdef, state = self.loaded.mesh, self.loaded.graphdef, self.loaded.state
        ring = dict(mesh.shape).get("sequence", 1)
        multiple = ring_multiple(ring, True) if ring > 1 else 1
        if prefill_chunk < 0 or decode_steps_per_call < 1:
            raise ConfigError(f"prefill_chunk={prefill_chunk} must be >= 0 and decode_steps_per_call="
                              f"{decode_steps_per_call} >= 1")
        encdec = self.model_cfg.architecture == "encoder_decoder"
        if encdec and not keep_cache and sources is None:
            raise ConfigError("an encoder-decoder model needs sources=[...], the encoder input of each prompt")
        if keep_cache and sources is not None:
            raise ConfigError("keep_cache=True continues the previous call's rows, whose sources are encoded in the "
                              "cache; new sources=[...] need keep_cache=False")
        if sources is not None and not encdec:
            raise ConfigError("sources=[...] are the encoder inputs of an encoder_decoder model; this model is "
                              f"model.architecture={self.model_cfg.architecture!r}")
        if sources is not None:
            if len(sources) != len(prompts):
                raise ConfigError(f"give one source per prompt: {len(sources)} sources for {len(prompts)} prompts")
            sources = self.check_prompts(sources, "source")
            if min(map(len, sources)) < 1:
                raise ConfigError("every source needs at least one token; got source lengths "
                                  f"{list(map(len, sources))}")
        if keep_cache and (self.cache is None or self.cache.batch != len(prompts)):
            raise ConfigError("keep_cache=True continues the previous call's rows: give as many prompts as "
                              f"it had ({0 if self.cache is None else self.cache.batch})")
        prompt_lengths = [len(p) for p in prompts]
        if keep_cache:  # the last token of the previous call was emitted but never fed to the model
            prompts = [[last, *p] if last is not None else p for last, p in zip(self._unfed, prompts)]
        tokens_BL, valid_BL = pad_prompts(prompts, multiple)
        chunk = tokens_BL.shape[1] if not prefill_chunk else -(-prefill_chunk // multiple) * multiple
        B = len(prompts)
        with sharding.use_mesh(mesh):
            start = time.perf_counter()
            fresh = not keep_cache
            if fresh:
                length = self.cache_length(tokens_BL.shape[1], sampling, max_len)
                if self.model_cfg.moe.num_experts and self.model_cfg.moe.router == "expert_choice":
                    raise ConfigError("model.moe.router='expert_choice' lets experts pick tokens across the whole "
                                      "sequence, so it cannot decode one token at a time; use a token-choice router")
                extra = max(chunk - 1, 0) if tokens_BL.shape[1] > chunk else 0
                source = None
                if encdec:  # a bidirectional encoder's ring needs a multiple of the ring size
                    source = tuple(on_mesh(x, mesh) for x in pad_prompts(sources, ring))
                cache = init_cache(self.model_cfg, B, length, extra_slots=extra,
                                   source_len=0 if source is None else source[0].shape[1], mesh=mesh)
            else:
                cache, source = self.cache, None
                needed = int(np.max(np.asarray(cache.lengths_B))) + tokens_BL.shape[1] + sampling.max_new_tokens
                window = ring_window(self.model_cfg)
                ring = bool(window) and cache.slots >= window  # else a short cache holds no whole window
                if not ring and needed > cache.slots:
                    raise ConfigError(f"continuing needs {needed} cache positions but the cache has {cache.slots}; "
                                      "start a new conversation or generate with a larger max_len")
                if self.model_cfg.position == "learned" and needed > self.model_cfg.max_seq_len:
                    raise ConfigError(f"continuing needs {needed} positions but model.max_seq_len="
                                      f"{self.model_cfg.max_seq_len} is the size of the learned position table; "
                                      "start a new conversation or lower max_new_tokens")
                if ring:  # a call writing more than slots - window + 1 tokens overwrites keys its own queries read
                    chunk = min(chunk, cache.slots - window + 1)
            logits_BV = None
            for begin in range(0, tokens_BL.shape[1], chunk):
                piece_BL = tokens_BL[:, begin:begin + chunk]
                piece_valid_BL = valid_BL[:, begin:begin + chunk]
                if piece_BL.shape[1] < chunk:
                    pad = ((0, 0), (0, chunk - piece_BL.shape[1]))
                    piece_BL, piece_valid_BL = np.pad(piece_BL, pad), np.pad(piece_valid_BL, pad)
                piece_BL, piece_valid_BL = on_mesh(piece_BL, mesh), on_mesh(piece_valid_BL, mesh)
                chunk_logits_BV, cache = prefill_step(graphdef, state, cache, piece_BL, piece_valid_BL,
                                                      source if fresh and begin == 0 else None,
                                                      fresh=fresh and begin == 0)
                has_last_B = piece_valid_BL.any(axis=1)
                logits_BV = chunk_logits_BV if logits_BV is None else jnp.where(has_last_B[:, None], chunk_logits_BV,
                                                                                logits_BV)
            jax.block_until_ready(logits_BV)
            prefill_seconds = time.perf_counter() - start

            start = time.perf_counter()
            seen_BV = np.zeros((B, self.vocab_size), bool)
            seen_BV[np.nonzero(valid_BL)[0], tokens_BL[valid_BL]] = True
            done_B, count_B, seen_BV = (on_mesh(x, mesh) for x in (np.zeros(B, bool), np.zeros(B, np.int32), seen_BV))
            pieces, steps = [], min(decode_steps_per_call, sampling.max_new_tokens)
            while not bool(np.all(np.asarray(done_B))):
                tokens_BT, cache, logits_BV, done_B, count_B, seen_BV = decode_steps(
                    graphdef, state, cache, logits_BV, done_B, count_B, seen_BV, len(pieces) * steps,
                    sampling=sampling, steps=steps)
                tokens_BT = np.asarray(tokens_BT)
                pieces.append(tokens_BT)
                if on_tokens is not None:
                    on_tokens(tokens_BT)
            decode_seconds = time.perf_counter() - start
        self.cache = cache
        result = to_generation(np.concatenate(pieces, axis=1), sampling, prompt_lengths, prefill_seconds,
                               decode_seconds)
        self._unfed = [row[-1] if row else None for row in result.tokens]
        return result


def to_generation(tokens_BT: np.ndarray, sampling: SamplingConfig, prompt_lengths: list[int],
                  prefill_seconds: float, decode_seconds: float) -> Generation:
    """A `Generation` from the emitted tokens of every call (FINISHED where a row had ended)."""
    rows = [[int(t) for t in row_T if t != FINISHED] for row_T in tokens_BT]
    finish = ["stop" if row and row[-1] in sampling.stop_tokens else "length" for row in rows]
    return Generation(rows, finish, list(prompt_lengths), prefill_seconds, decode_seconds)


def generate(source, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             **options) -> Generation:
    """`Generator(source).generate(prompts, sampling, **options)` for one-off use (experiments, tests)."""
    return Generator(source).generate(prompts, sampling, **options)
