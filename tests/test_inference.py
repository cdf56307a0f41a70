"""Inference acceptance: prefill + KV-cache decode equals the full forward (every position encoding, GQA/MQA,
sliding-window ring buffers, MoE, scanned and unrolled layers, chunked and ragged prefill, encoder-decoder),
greedy generation equals repeated full forwards, cache sizes match the calculator, bad input fails early.

Every check compares against an independent computation: the model's full-sequence forward (training path),
per-row runs, or the byte formula. Parameters are filled from NumPy (no PRNG compile) and XLA compiles with
most optimisations off: both only cut compile time on the shared CPUs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig
from transformer.inference import generate as generate_module
from transformer.inference.cache import cache_bytes, init_cache, num_slots
from transformer.inference.generate import Generator
from transformer.inference.sampling import SamplingConfig
from transformer.model import build_model

V = 300
TOL = 1e-5
BASE = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64, init_std=0.3, max_seq_len=64,
                   attention_kernel="reference")


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """Tiny programs: XLA's optimisation passes cost more than they save here (numerics stay float32)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def cfg_with(**kw) -> ModelConfig:
    cfg = dataclasses.replace(BASE, **kw)
    cfg.validate()
    return cfg


def init(cfg: ModelConfig, seed: int = 0):
    """(graphdef, state) with every weight ~ N(0, init_std) (norm scales 1 + N(0, 0.1), biases N(0, 0.1), the MoE
    router bias 0)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1 + 0.1 * rng.standard_normal(leaf.shape)
        elif "router_bias" in name:
            value = np.zeros(leaf.shape)
        elif "bias" in name:
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = cfg.init_std * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def run_config(cfg: ModelConfig) -> Config:
    """A run config around `cfg` for `Generator` (data.seq_len within a learned position table)."""
    return Config(model=cfg, data=DataConfig(seq_len=min(cfg.max_seq_len, 64)))


def random_rows(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).astype(np.int32) for n in lengths]


def rel_errors(got_LV, want_LV) -> np.ndarray:
    """Per position ||got - want||_2 / ||want||_2."""
    got_LV, want_LV = np.asarray(got_LV, np.float64), np.asarray(want_LV, np.float64)
    assert got_LV.shape == want_LV.shape, (got_LV.shape, want_LV.shape)
    return np.linalg.norm(got_LV - want_LV, axis=-1) / np.linalg.norm(want_LV, axis=-1)


# ----------------------------------------------------------------------------------------- the two computations


def incremental(cfg, graphdef, state, rows, prompt_lengths, *, chunk=0, extra_slots=0, max_len=0):
    """Each row's logits at every position from the cache path: the (right-padded) prompts prefilled in chunks
    of `chunk` tokens (0: one chunk; the first fresh, the rest against the cache), then the rest of each row
    fed one token per decode call. Returns (list of (len_r, V) arrays, the final cache)."""
    B = len(rows)
    steps = len(rows[0]) - prompt_lengths[0]
    assert all(len(r) - p == steps for r, p in zip(rows, prompt_lengths)), "rows need equal decode counts"
    P = max(prompt_lengths)
    c = chunk or P
    U = -(-P // c)
    prompt_BP = np.zeros((B, U * c), np.int32)
    valid_BP = np.zeros((B, U * c), bool)
    for r, (row, p) in enumerate(zip(rows, prompt_lengths)):
        prompt_BP[r, :p], valid_BP[r, :p] = row[:p], True
    decode_BN = np.stack([row[p:] for row, p in zip(rows, prompt_lengths)]).astype(np.int32)
    length = max_len or max(len(r) for r in rows)

    def run(state, prompt_BP, valid_BP, decode_BN):
        model = nnx.merge(graphdef, state)
        cache = init_cache(cfg, B, length, extra_slots=extra_slots)
        hidden_BLD, cache = model.extend(prompt_BP[:, :c], cache, valid_BL=valid_BP[:, :c], fresh=True)
        hidden = [hidden_BLD]
        if U > 1:
            chunks_UBC, valid_UBC = (jnp.swapaxes(x[:, c:].reshape(B, U - 1, c), 0, 1) for x in (prompt_BP, valid_BP))

            def chunk_step(cache, piece):
                hidden_BCD, cache = model.extend(piece[0], cache, valid_BL=piece[1])
                return cache, hidden_BCD

            cache, hidden_UBCD = jax.lax.scan(chunk_step, cache, (chunks_UBC, valid_UBC))
            hidden.append(jnp.swapaxes(hidden_UBCD, 0, 1).reshape(B, (U - 1) * c, -1))
        prompt_BPV = model.logits(jnp.concatenate(hidden, axis=1))

        def decode_step(cache, token_B):
            hidden_B1D, cache = model.extend(token_B[:, None], cache)
            return cache, model.logits(hidden_B1D[:, 0])

        cache, decode_NBV = jax.lax.scan(decode_step, cache, decode_BN.T)
        return prompt_BPV, jnp.swapaxes(decode_NBV, 0, 1), cache

    prompt_BPV, decode_BNV, cache = jax.jit(run)(state, prompt_BP, valid_BP, decode_BN)
    prompt_BPV, decode_BNV = np.asarray(prompt_BPV), np.asarray(decode_BNV)
    logits = [np.concatenate([prompt_BPV[r, :p], decode_BNV[r]]) for r, p in enumerate(prompt_lengths)]
    return logits, cache


def full_forward(cfg, graphdef, state, rows, *, alone=False):
    """Each row's logits from the training forward: the rows right-padded into one batch, or (alone=True) each
    row alone in a batch of one. Causal, so tail padding never reaches a row's positions. MoE must drop
    nothing."""
    forward = jax.jit(lambda state, tokens_BL: nnx.merge(graphdef, state)(tokens_BL))
    L = max(len(r) for r in rows)
    tokens_BL = np.zeros((len(rows), L), np.int32)
    for r, row in enumerate(rows):
        tokens_BL[r, :len(row)] = row
    out = []
    for batch_BL in ([row_L[None] for row_L in tokens_BL] if alone else [tokens_BL]):
        logits_BLV, aux = forward(state, batch_BL)
        if cfg.moe.num_experts:
            assert float(np.max(aux["moe/dropped_fraction"])) == 0.0, "the full forward must drop no MoE token"
        out += list(np.asarray(logits_BLV))
    return [logits_LV[:len(row)] for logits_LV, row in zip(out, rows)]


# ------------------------------------------------------------------------ 1. incremental decode == full forward

VARIANTS = {
    # name: (model overrides, prompt lengths, decode steps, prefill chunk, extra slots); "ragged": right-padded
    # prompts of different lengths ("alone": compared with each row's forward run alone, batch of one)
    "mha-rope-ragged-blockwise": (dict(attention_kernel="auto", attention_block_size=8), [7, 3], 17, 0, 0),
    "mqa-rope_linear-unscanned-chunked": (dict(num_kv_heads=1, rope_scaling="linear", rope_scaling_factor=2.0,
                                               scan_layers=False), [12, 12], 12, 4, 0),
    "gqa-rope_ntk": (dict(num_kv_heads=2, rope_scaling="ntk", rope_scaling_factor=4.0), [6, 6], 18, 0, 0),
    "gqa-rope_yarn": (dict(num_kv_heads=2, rope_scaling="yarn", rope_scaling_factor=4.0, max_seq_len=16),
                      [6, 6], 18, 0, 0),
    "mqa-rope_llama3": (dict(num_kv_heads=1, rope_scaling="llama3", rope_scaling_factor=8.0, max_seq_len=16),
                        [6, 6], 18, 0, 0),
    "gqa-alibi-unscanned-ragged": (dict(position="alibi", num_kv_heads=2, scan_layers=False), [4, 9], 15, 0, 0),
    "mha-learned": (dict(position="learned", max_seq_len=24), [6, 6], 18, 0, 0),
    "mqa-sinusoidal-postnorm_layernorm_gelu": (dict(position="sinusoidal", num_kv_heads=1, norm_position="post",
                                                    norm="layernorm", activation="gelu"), [6, 6], 18, 0, 0),
    "gqa-nope-untied": (dict(position="nope", num_kv_heads=2, tie_embeddings=False), [6, 6], 18, 0, 0),
    # T5 bias: 8 one-sided buckets, offsets up to 23 pass max_distance 12
    "gqa-t5_bias-ragged-blockwise": (dict(position="t5_bias", num_kv_heads=2, relative_buckets=8,
                                          relative_max_distance=12, attention_kernel="auto", attention_block_size=8),
                                     [7, 3], 17, 0, 0),
    "mqa-t5_bias-window4-chunked-unscanned": (dict(position="t5_bias", num_kv_heads=1, relative_buckets=8,
                                                   relative_max_distance=6, sliding_window=4, scan_layers=False,
                                                   attention_block_size=4), [12, 12], 12, 4, 3),
    # window 4, 4 slots: 34 decode steps wrap the ring 8 times
    "gqa-rope-window4-ring-blockwise": (dict(num_kv_heads=2, sliding_window=4, attention_kernel="auto",
                                             attention_block_size=4), [6, 6], 34, 0, 0),
    # window 4 < chunk 6, extra_slots 5: 9 slots; three prefill chunks (the first wider than the window) and
    # 22 decode steps wrap the ring 4 times; ragged rows (one row's last chunk is padding only)
    "alibi-window4-chunked-ragged_alone-unscanned": (dict(position="alibi", sliding_window=4, scan_layers=False,
                                                          attention_block_size=4), [18, 11], 22, 6, 5),
    # 3 layers = 1 group of (dense, MoE) + 1 leftover dense layer; capacity C = L: the full forward drops nothing
    "moe-topk2-capacity-leftover-ragged": (
        dict(num_layers=3, num_kv_heads=2, moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=2,
                                                         capacity_factor=4.0)), [9, 5], 15, 0, 0),
    "moe-mixtral-dropless-shared-leftover-unscanned": (
        dict(num_layers=3, scan_layers=False, moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=2,
                                                            router="mixtral", dropless=True,
                                                            num_shared_experts=1)), [6, 6], 18, 0, 0),
    # biases (Qwen2's q/k/v; GPT-2's everywhere, with learned positions, LayerNorm and exact GELU)
    "gqa-rope-qkv_bias-gelu_tanh-ragged": (dict(num_kv_heads=2, attention_bias="qkv", activation="gelu_tanh"),
                                           [7, 3], 15, 0, 0),
    "mha-learned-layernorm-all_biases-gelu-chunked": (
        dict(position="learned", embed_scale="none", norm="layernorm", attention_bias="all", mlp_bias=True,
             activation="gelu", max_seq_len=24), [12, 12], 12, 4, 0),
    # attention_pattern: windowed and global layers share one cache of every slot; 3 layers = 1 scanned group of
    # (local, global) + 1 leftover local layer
    "gqa-rope-pattern_local_global-window4-ragged-blockwise": (
        dict(num_layers=3, num_kv_heads=2, attention_pattern="local,global", sliding_window=4,
             attention_kernel="auto", attention_block_size=4), [7, 3], 17, 0, 0),
    # every layer MoE with a pattern of 2: groups of 2 MoE blocks + a leftover MoE block; biases in every expert
    "moe-pattern_global_local-window3-biases-chunked-unscanned": (
        dict(num_layers=3, scan_layers=False, attention_pattern="global,local", sliding_window=3, mlp_bias=True,
             attention_bias="all", moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=1, router="mixtral",
                                                 dropless=True, num_shared_experts=1)), [9, 9], 10, 4, 3),
    # multi-head latent attention: the cache holds only the latent and the RoPE key, queries absorb W_UK
    "mla-q_lora-v_width6-ragged-blockwise": (
        dict(attention="mla", kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
             attention_kernel="auto", attention_block_size=8), [7, 3], 17, 0, 0),
    "mla-rope_linear-window4-chunked-unscanned": (
        dict(attention="mla", kv_lora_rank=16, rope_scaling="linear", rope_scaling_factor=2.0, sliding_window=4,
             scan_layers=False, attention_block_size=4), [12, 12], 12, 4, 3),
    "mla-moe-shared-leftover-ragged": (
        dict(attention="mla", kv_lora_rank=12, q_lora_rank=8, num_layers=3,
             moe=MoEConfig(num_experts=4, top_k=2, every_k_layers=2, router="mixtral", dropless=True,
                           num_shared_experts=1)), [9, 5], 15, 0, 0),
    # DeepSeek-V2's layout: a dense first layer before the scanned MoE groups (group-limited routing, scaled
    # gates), YaRN with DeepSeek's mscales (rotated keys in the latent cache, scores times m(all_dim)^2)
    "mla-deepseek-first_dense-grouped-yarn_mscale-chunked": (
        dict(attention="mla", kv_lora_rank=12, q_lora_rank=8, num_layers=3, rope_scaling="yarn",
             rope_scaling_factor=4.0, max_seq_len=8, yarn_mscale=1.0, yarn_mscale_all_dim=0.8,
             moe=MoEConfig(num_experts=4, top_k=2, first_dense_layers=1, router_groups=2, dropless=True,
                           routed_scale=2.5, num_shared_experts=1)), [9, 9], 12, 4, 0),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_equals_full_forward(name):
    overrides, prompts, steps, chunk, extra = VARIANTS[name]
    cfg = cfg_with(**overrides)
    graphdef, state = init(cfg)
    rows = random_rows([p + steps for p in prompts])
    got, cache = incremental(cfg, graphdef, state, rows, prompts, chunk=chunk, extra_slots=extra)
    want = full_forward(cfg, graphdef, state, rows, alone="alone" in name)
    errors = np.concatenate([rel_errors(g, w) for g, w in zip(got, want)])
    print(f"{name}: max rel err {errors.max():.2e}")
    assert errors.max() < TOL, (name, errors.max(), np.argmax(errors))
    assert np.std(np.concatenate(want)) > 0.1  # logits vary: the comparison is not vacuous
    assert cache.slots == num_slots(cfg, max(len(r) for r in rows), extra)
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [len(r) for r in rows])
    if cfg.attention_pattern:  # a global layer needs every position: no ring buffer
        assert cache.slots == max(len(r) for r in rows)
    elif cfg.sliding_window:
        assert cache.slots == cfg.sliding_window + extra < max(len(r) for r in rows)


def test_dynamic_ntk_decode_equals_forward_over_the_prefix():
    """Dynamic NTK frequencies follow the current length: decode position t equals the last position of a full
    forward over the first t + 1 tokens; the sequence crosses max_seq_len (5) mid-decode.

    One layer: with more, no KV cache can match this reference past max_seq_len. Deeper layers read keys/values
    made from earlier steps' hidden states, computed with the frequencies of those shorter lengths, while a full
    forward over t + 1 tokens recomputes them all at length t + 1's (with 2 layers the last position differs by
    ~3e-2 relative; before the scaling starts the cache path is exact at any depth, see the rope variants)."""
    prompt, total, original = 4, 8, 5
    rows = random_rows([total, total], seed=5)
    tokens_BT = np.stack(rows)
    cfg = cfg_with(num_layers=1, num_kv_heads=2, rope_scaling="dynamic_ntk", rope_scaling_factor=4.0,
                   max_seq_len=original)
    graphdef, state = init(cfg)
    got_BTV = np.stack(incremental(cfg, graphdef, state, rows, [prompt, prompt])[0])

    def forward(state, tokens_BT):  # the prompt's forward, the last position of every longer prefix's, the whole
        model = nnx.merge(graphdef, state)
        lasts = [model(tokens_BT[:, :end])[0][:, -1] for end in range(prompt + 1, total + 1)]
        want_BTV = jnp.concatenate([model(tokens_BT[:, :prompt])[0], jnp.stack(lasts, axis=1)], axis=1)
        return want_BTV, model(tokens_BT)[0]

    want_BTV, whole_BTV = map(np.asarray, jax.jit(forward)(state, tokens_BT))
    errors_BT = np.stack([rel_errors(got_BTV[r], want_BTV[r]) for r in range(2)])
    print(f"dynamic_ntk: max rel err {errors_BT.max():.2e} ({errors_BT[:, original:].max():.2e} past max_seq_len)")
    assert errors_BT.max() < TOL
    # the frequencies really move: the forward over all 8 tokens differs from the prefix forwards
    assert rel_errors(whole_BTV[0, original:-1], want_BTV[0, original:-1]).min() > 1e-3


# ---------------------------------------------------------------------------------------- 2. encoder-decoder


@pytest.mark.parametrize("position, biases", [("rope", True), ("t5_bias", False)])  # biases: cross-attention's too
def test_encoder_decoder_decode_equals_forward_and_padded_source_equals_alone(position, biases):
    cfg = cfg_with(architecture="encoder_decoder", num_kv_heads=2, num_encoder_layers=1, position=position,
                   relative_buckets=8, relative_max_distance=5, attention_bias="all" if biases else "none",
                   mlp_bias=biases)
    graphdef, state = init(cfg, seed=6)
    S, prompt, T = 7, 4, 12
    src_lengths = [S, 4]  # row 1's source is right-padded
    src_BS = np.zeros((2, S), np.int32)
    for r, (n, src) in enumerate(zip(src_lengths, random_rows(src_lengths, seed=7))):
        src_BS[r, :n] = src
    src_valid_BS = np.arange(S)[None, :] < np.asarray(src_lengths)[:, None]
    tgt_BT = np.stack(random_rows([T, T], seed=8))

    def run(state, src_BS, src_valid_BS, tgt_BT):
        model = nnx.merge(graphdef, state)
        cache = init_cache(cfg, 2, T, source_len=S)
        hidden_BPD, cache = model.extend(tgt_BT[:, :prompt], cache, fresh=True, src_BS=src_BS,
                                         src_valid_BS=src_valid_BS)

        def decode_step(cache, token_B):
            hidden_B1D, cache = model.extend(token_B[:, None], cache)
            return cache, model.logits(hidden_B1D[:, 0])

        cache, decode_NBV = jax.lax.scan(decode_step, cache, tgt_BT[:, prompt:].T)
        return jnp.concatenate([model.logits(hidden_BPD), jnp.swapaxes(decode_NBV, 0, 1)], axis=1), cache

    got_BTV, cache = jax.jit(run)(state, src_BS, src_valid_BS, tgt_BT)
    assert cache.nbytes() == cache_bytes(cfg, 2, T, source_len=S)
    # row 0 (unpadded source) against model(src, tgt); row 1 (padded source) against its 4 source tokens alone,
    # and against another source of 4 tokens (row 0's first 4), from which it must differ
    def forward(state, src_BS, tgt_BT):
        model = nnx.merge(graphdef, state)
        short_BS = jnp.stack([src_BS[1, :4], src_BS[0, :4]])
        return model(src_BS[:1], tgt_BT[:1])[0][0], model(short_BS, jnp.stack([tgt_BT[1]] * 2))[0]

    want_TV, short_2TV = jax.jit(forward)(state, src_BS, tgt_BT)
    errors = rel_errors(got_BTV[0], want_TV), rel_errors(got_BTV[1], short_2TV[0])
    print(f"encoder-decoder: max rel err unpadded {errors[0].max():.2e}, padded source {errors[1].max():.2e}")
    assert errors[0].max() < TOL and errors[1].max() < TOL
    assert rel_errors(got_BTV[1], short_2TV[1]).min() > 1e-3


# --------------------------------------------------------------------------------------------- 3. generation


@jax.jit(static_argnames="graphdef")
def _greedy_loop(graphdef, state, tokens_BL, lengths_B, steps):
    model = nnx.merge(graphdef, state)
    rows_B = jnp.arange(tokens_BL.shape[0])

    def step(_, carry):
        tokens_BL, lengths_B = carry
        logits_BLV = model(tokens_BL)[0]
        next_B = jnp.argmax(logits_BLV[rows_B, lengths_B - 1], axis=-1).astype(jnp.int32)
        return tokens_BL.at[rows_B, lengths_B].set(next_B), lengths_B + 1

    return jax.lax.fori_loop(0, steps, step, (tokens_BL, lengths_B))[0]


def greedy_reference(graphdef, state, prompts, new_tokens, width=0):
    """Greedy continuation of each prompt by repeated full forwards (argmax at each row's last position), the
    loop on device over a (B, width) buffer (default: just long enough; causal, so the tail is never seen)."""
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    width = width or int(lengths_B.max()) + new_tokens
    assert width >= lengths_B.max() + new_tokens
    tokens_BL = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        tokens_BL[r, :len(p)] = p
    out_BL = np.asarray(_greedy_loop(graphdef, state, tokens_BL, lengths_B, new_tokens))
    return [out_BL[r, n:n + new_tokens].tolist() for r, n in enumerate(lengths_B)]


@pytest.fixture(scope="module")
def gen_model():
    cfg = cfg_with(num_kv_heads=2, max_seq_len=128)
    graphdef, state = init(cfg, seed=9)
    prompts = [row.tolist() for row in random_rows([11, 5], seed=10)]
    expected = greedy_reference(graphdef, state, prompts, 32)
    return Generator((run_config(cfg), state)), prompts, expected


@pytest.mark.parametrize("options", [dict(), dict(prefill_chunk=4, decode_steps_per_call=5)], ids=["plain", "chunked"])
def test_greedy_generation_equals_repeated_full_forwards(gen_model, options):
    generator, prompts, expected = gen_model
    result = generator.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=32), **options)
    assert result.tokens == expected
    assert result.finish == ["length", "length"]
    assert len(set(expected[0] + expected[1])) > 8  # not a constant continuation


def test_greedy_generation_sliding_window_ring():
    """Window 8, prompts longer than the window, 100 new tokens: the ring buffer keeps 8 slots throughout; then
    a continuation of the same rows (keep_cache)."""
    cfg = cfg_with(num_kv_heads=1, sliding_window=8, max_seq_len=128)
    graphdef, state = init(cfg, seed=11)
    prompts = [row.tolist() for row in random_rows([11, 5], seed=12)]
    width = 11 + 100 + 1 + 9 + 4  # one reference program for the first call and the continuation
    expected = greedy_reference(graphdef, state, prompts, 100, width)
    generator = Generator((run_config(cfg), state))
    result = generator.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=100), decode_steps_per_call=25)
    assert result.tokens == expected
    assert generator.cache.slots == 8
    np.testing.assert_array_equal(np.asarray(generator.cache.lengths_B), [11 + 99, 5 + 99])
    assert generator.cache.nbytes() == cache_bytes(cfg, 2, 111)
    # continuing (keep_cache) with new prompts longer than the ring's spare slots equals the full history's greedy
    more = [row.tolist() for row in random_rows([9, 6], seed=14)]
    histories = [p + t + m for p, t, m in zip(prompts, result.tokens, more)]
    further = generator.generate(more, SamplingConfig(temperature=0, max_new_tokens=4), keep_cache=True)
    assert further.tokens == greedy_reference(graphdef, state, histories, 4, width)
    assert generator.cache.slots == 8
    # a window cache shorter than the window (7 slots: 3 + 4 tokens) cannot continue past its length
    short = Generator((run_config(cfg), state))
    short.generate([[1, 2, 3], [4, 5, 6]], SamplingConfig(temperature=0, max_new_tokens=4))
    assert short.cache.slots == 7
    with pytest.raises(ConfigError, match="cache positions but the cache has 7"):
        short.generate([[7], [8]], SamplingConfig(temperature=0, max_new_tokens=4), keep_cache=True)


def test_stop_token_ends_only_its_row(gen_model):
    generator, prompts, expected = gen_model
    stop = expected[0][4]  # row 0 emits it at step 5
    sampling = SamplingConfig(temperature=0, max_new_tokens=32, stop_tokens=(stop,))
    result = generator.generate(prompts, sampling, prefill_chunk=4, decode_steps_per_call=5)
    for row, want in zip(result.tokens, expected):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert row == want[:cut]
    assert result.tokens[0][-1] == stop and len(result.tokens[0]) == expected[0].index(stop) + 1
    assert result.finish[0] == "stop"
    assert result.finish[1] == ("stop" if stop in expected[1] else "length")
    assert len(result.tokens[1]) > len(result.tokens[0])  # the other row continued


def test_sampling_is_reproducible_and_rows_are_independent(gen_model):
    generator, prompts, greedy = gen_model
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    first = generator.generate(prompts, sampling, decode_steps_per_call=6).tokens
    again = generator.generate(prompts, sampling, decode_steps_per_call=6).tokens
    assert first == again
    other = random_rows([8], seed=13)[0].tolist()  # a different second row, as long as the padded batch
    swapped = generator.generate([prompts[0], other], sampling, decode_steps_per_call=6).tokens
    assert swapped[0] == first[0]
    assert first[0] != greedy[0][:12] and first[1] != greedy[1][:12]  # it really samples


# ------------------------------------------------------------------------------------------------ 4. cache size


@pytest.mark.parametrize("overrides, batch, max_len, extra, source_len", [
    (dict(num_kv_heads=2), 3, 50, 0, 0),
    (dict(num_kv_heads=1, sliding_window=8, dtype="bfloat16"), 2, 1000, 0, 0),
    (dict(sliding_window=8), 2, 1000, 5, 0),
    (dict(architecture="encoder_decoder", num_kv_heads=2, num_layers=3), 2, 20, 0, 9),
], ids=["gqa", "window-bf16", "window-extra", "encoder-decoder"])
def test_cache_bytes_match_the_calculator(overrides, batch, max_len, extra, source_len):
    cfg = cfg_with(**overrides)
    cache = init_cache(cfg, batch, max_len, extra_slots=extra, source_len=source_len)
    assert cache.nbytes() == cache_bytes(cfg, batch, max_len, extra_slots=extra, source_len=source_len)
    # the formula, written out: K/V of every layer and kv head per slot, an int32 position per slot, a length per row
    slots = min(max_len, cfg.sliding_window + extra) if cfg.sliding_window else max_len
    itemsize = jnp.dtype(cfg.dtype).itemsize
    per_slot = 2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head * itemsize + 4
    cross = batch * source_len * (2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head * itemsize + 1)
    assert cache.nbytes() == batch * slots * per_slot + 4 * batch + cross
    assert cache.slots == slots
    if cfg.sliding_window:
        assert cache.slots == cfg.sliding_window + extra  # however long max_len is


# ------------------------------------------------------------------------------------------------ 5. bad input


def no_compiles(monkeypatch):
    """Fail if generation reaches a jitted step: the error must come before anything compiles."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the error")

    for name in ("prefill_step", "decode_steps", "extend_step", "init_cache"):
        monkeypatch.setattr(generate_module, name, refuse)


@pytest.fixture
def before_compiling(monkeypatch):
    no_compiles(monkeypatch)


def small_generator(**overrides):
    cfg = cfg_with(**overrides)
    return Generator((run_config(cfg), init(cfg)[1]))


def test_bad_sampling_and_prompts_raise_config_errors(before_compiling):
    generator = small_generator()
    with pytest.raises(ConfigError, match="max_len=8"):
        generator.generate([list(range(10))], SamplingConfig(max_new_tokens=1), max_len=8)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="top_p"):
            generator.generate([[1, 2]], SamplingConfig(top_p=top_p))
    with pytest.raises(ConfigError, match="temperature"):
        generator.generate([[1, 2]], SamplingConfig(temperature=-0.5))
    with pytest.raises(ConfigError, match=f"token id {V}, outside the model's vocabulary"):
        generator.generate([[1, 2], [3, V]], SamplingConfig())


def test_unusable_models_raise_config_errors(before_compiling):
    encoder_cfg = cfg_with(architecture="encoder")
    with pytest.raises(ConfigError, match="architecture='encoder'"):
        Generator((run_config(encoder_cfg), init(encoder_cfg)[1]))
    with pytest.raises(ConfigError, match="architecture='encoder'"):
        init_cache(encoder_cfg, 1, 8)
    expert_choice = small_generator(moe=MoEConfig(num_experts=4, top_k=2, router="expert_choice"))
    with pytest.raises(ConfigError, match="expert_choice"):
        expert_choice.generate([[1, 2]], SamplingConfig(max_new_tokens=2))
    learned = small_generator(position="learned", max_seq_len=16)
    with pytest.raises(ConfigError, match="max_seq_len=16"):
        learned.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=14))
    with pytest.raises(ConfigError, match="max_seq_len=16"):
        init_cache(learned.model_cfg, 1, 17)


def test_continuing_past_a_learned_position_table_raises(monkeypatch):
    """A sliding-window ring never runs out of slots, but learned positions end at max_seq_len."""
    generator = small_generator(position="learned", sliding_window=4, max_seq_len=16)
    generator.generate([[1, 2, 3, 4, 5, 6]], SamplingConfig(temperature=0, max_new_tokens=4))
    assert generator.cache.slots == 4
    no_compiles(monkeypatch)
    with pytest.raises(ConfigError, match="max_seq_len=16"):  # 6 + 4 + 5 + 6 = 21 positions
        generator.generate([[7, 8, 9, 10, 11]], SamplingConfig(temperature=0, max_new_tokens=6), keep_cache=True)
