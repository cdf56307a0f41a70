"""Multi-head latent attention (DeepSeek-V2): the layer equals a float64 NumPy implementation of the paper's
equations, its gradients agree across kernels, parameter count, FLOPs and cache bytes per token equal the paper's
formulas (for DeepSeek-V2's own configuration too, from abstract shapes), tensor/sequence-sharded equals one
device (forward and latent-cache decode), and bad configs fail in one line. Decode equal to the full forward over
the latent cache is in tests/test_inference.py (the "mla-*" variants)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_oracle import np_attention
from transformer import sharding
from transformer.config import ConfigError, MeshConfig, ModelConfig
from transformer.inference.cache import cache_specs, init_cache, kv_bytes_per_token
from transformer.layers.latent_attention import LatentAttention
from transformer.model import build_model, count_params, flops_per_token
from transformer.ops.layout import to_zigzag

BASE = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64, init_std=0.3,
                   attention="mla", kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                   v_head_dim=6, attention_kernel="reference")


def cfg_with(**kw) -> ModelConfig:
    cfg = dataclasses.replace(BASE, **kw)
    cfg.validate()
    return cfg


def randomised(module, seed=0):
    """The module with every Param ~ N(0, 0.3) (norm scales 1 + N(0, 0.1))."""
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        scale = "scale" in jax.tree_util.keystr(path)
        value = (1 + 0.1 * rng.standard_normal(leaf.shape)) if scale else 0.3 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


# ------------------------------------------------------------------------------------------- the NumPy oracle


def np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rope(x_BLHR, pos_BL, theta):
    """Rotate-half RoPE: pairs (i, i + R/2) turned by pos * theta^(-2i/R)."""
    R = x_BLHR.shape[-1]
    angle = pos_BL[:, :, None, None] * theta ** (-np.arange(0, R, 2) / R)
    x1, x2 = x_BLHR[..., :R // 2], x_BLHR[..., R // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def np_mla(p, x_BLD, pos_BL, cfg, *, window=0):
    """DeepSeek-V2 (arXiv:2405.04434) eqs. 12-19 and 37-47 in float64; p: the layer's params by name."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    C, N = cfg.kv_lora_rank, cfg.nope_dim
    if cfg.q_lora_rank:
        c_q = np_rms(x_BLD @ p["q_down_DC"], p["q_norm"], cfg.norm_eps)
        q = np.einsum("blc,chw->blhw", c_q, p["q_up_CHW"])
    else:
        q = np.einsum("bld,dhw->blhw", x_BLD, p["q_DHW"])
    q = np.concatenate([q[..., :N], np_rope(q[..., N:], pos_BL, cfg.rope_theta)], -1)
    down = x_BLD @ p["kv_down_DC"]
    c_kv = np_rms(down[..., :C], p["kv_norm"], cfg.norm_eps)
    k_rope = np_rope(down[:, :, None, C:], pos_BL, cfg.rope_theta)
    k_nope = np.einsum("blc,chn->blhn", c_kv, p["k_up_CHN"])
    k = np.concatenate([k_nope, np.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], -1)
    v = np.einsum("blc,chv->blhv", c_kv, p["v_up_CHV"])
    out, _ = np_attention(q, k, v, causal=True, q_pos=pos_BL, kv_pos=pos_BL, window=window,
                          scale=1 / np.sqrt(N + cfg.rope_dim))
    return np.einsum("blhv,hvd->bld", out, p["o_HVD"])


def layer_params(layer) -> dict:
    names = ("q_down_DC", "q_up_CHW", "q_DHW", "kv_down_DC", "k_up_CHN", "v_up_CHV", "o_HVD")
    p = {name: getattr(layer, name)[...] for name in names if hasattr(layer, name)}
    p["kv_norm"] = layer.kv_norm.scale[...]
    if hasattr(layer, "q_norm"):
        p["q_norm"] = layer.q_norm.scale[...]
    return p


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(), marks=pytest.mark.slow),
    pytest.param(dict(q_lora_rank=0, v_head_dim=20, attention_kernel="blockwise", attention_block_size=4),
                 marks=pytest.mark.slow),
    dict(qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0, sliding_window=5, attention_kernel="blockwise",
         attention_block_size=4),
], ids=["q_lora-v6-reference", "full_rank_q-v20-blockwise", "default_widths-window5-blockwise"])
def test_layer_equals_numpy_equations(overrides):
    cfg = cfg_with(**overrides)
    layer = randomised(LatentAttention(cfg, num_layers=2, layer=0, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    x_BLD = rng.standard_normal((2, 11, cfg.d_model))
    pos_BL = np.stack([np.arange(11), np.arange(11) + 7])  # row 1 starts at position 7: RoPE is relative
    got = layer(jnp.asarray(x_BLD, jnp.float32), positions_BL=jnp.asarray(pos_BL, jnp.int32))
    want = np_mla(layer_params(layer), x_BLD, pos_BL, cfg, window=cfg.sliding_window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert np.abs(want).std() > 0.1


@pytest.mark.slow  # keeps the default suite under 15 minutes; forward per kernel stays in the default run
def test_gradients_agree_across_kernels():
    """The zero-padded value width changes nothing in the backward either: blockwise == reference."""
    grads = []
    for kernel in ("reference", "blockwise"):
        cfg = cfg_with(attention_kernel=kernel, attention_block_size=4)
        layer = randomised(LatentAttention(cfg, num_layers=2, rngs=nnx.Rngs(0)))
        x_BLD = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, cfg.d_model)), jnp.float32)
        cot = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, cfg.d_model)), jnp.float32)
        graphdef, state = nnx.split(layer)
        grads.append(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x_BLD) * cot))(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


# ----------------------------------------------------------------------------- sizes against the paper's formulas


def attention_params(cfg) -> int:
    """The paper's per-layer count: D d_c' + d_c' H (d_nope + d_R) [or D H (d_nope + d_R)] + D (d_c + d_R)
    + d_c H (d_nope + d_v) + H d_v D, plus the two latent RMSNorm scales."""
    D, H, C, Cq = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    N, R, V = cfg.nope_dim, cfg.rope_dim, cfg.value_dim
    queries = D * Cq + Cq * H * (N + R) + Cq if Cq else D * H * (N + R)
    return queries + D * (C + R) + C + C * H * (N + V) + H * V * D


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=0)], ids=["q_lora", "full_rank_q"])
def test_param_count_flops_and_cache_bytes_match_formulas(overrides):
    cfg = cfg_with(**overrides)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    D, F, L = cfg.d_model, cfg.ffn_dim, cfg.num_layers
    norms = 2 * D  # the attention and FFN RMSNorm scales
    assert count_params(model) == cfg.vocab_size * D + L * (attention_params(cfg) + 3 * D * F + norms) + D
    latent_params = attention_params(cfg) - cfg.kv_lora_rank - cfg.q_lora_rank  # matmul weights only
    keys = 6 * cfg.num_heads * (cfg.nope_dim + cfg.rope_dim + cfg.value_dim) * 40 * L
    assert flops_per_token(cfg, 40) == 6 * (L * (latent_params + 3 * D * F) + D * cfg.vocab_size) + keys
    per_token = (cfg.kv_lora_rank + cfg.rope_dim) * 4 * L
    assert kv_bytes_per_token(cfg) == per_token
    cache = init_cache(cfg, 3, 20)
    assert cache.k_NBKGW.nbytes + cache.v_NBKGW.nbytes == 3 * 20 * per_token


def deepseek_v2(attention="mla") -> ModelConfig:
    """DeepSeek-V2's attention (paper section 3.1.1 / appendix: D 5120, 128 heads, d_c 512, d_c' 1536,
    d_h 128, d_R 64, 60 layers), bf16; MHA/GQA siblings with d_h 128."""
    common = dict(vocab_size=102400, d_model=5120, num_layers=60, num_heads=128, d_ff=12288, max_seq_len=4096,
                  dtype="bfloat16")
    if attention == "mla":
        return ModelConfig(**common, attention="mla", kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128)
    return ModelConfig(**common, head_dim=128, num_kv_heads={"mha": 0, "gqa8": 16}[attention])


def test_deepseek_v2_attention_params_and_cache_bytes_equal_the_paper():
    cfg = deepseek_v2()
    cfg.validate()
    layer = nnx.eval_shape(lambda: LatentAttention(cfg, num_layers=60, rngs=nnx.Rngs(0)))
    d, n_h, d_h, d_c, d_c_q, d_R, l = 5120, 128, 128, 512, 1536, 64, 60
    paper = d * d_c_q + d_c_q * n_h * (d_h + d_R) + d * (d_c + d_R) + d_c * n_h * 2 * d_h + n_h * d_h * d
    assert paper == 149_225_472
    assert count_params(layer) == paper + d_c_q + d_c  # + the two latent norms' scales
    # KV cache elements per token: (d_c + d_R) l = 9/2 d_h l (paper, table 1), 2 bytes each in bf16
    assert kv_bytes_per_token(cfg) == (d_c + d_R) * l * 2 == 9 * d_h * l // 2 * 2 == 69_120
    specs = cache_specs(cfg, 1, 1)
    assert specs.k_NBKGW.shape == (l, 1, 1, 1, d_c + d_R) and specs.v_NBKGW.shape[-1] == 0
    mha, gqa = deepseek_v2("mha"), deepseek_v2("gqa8")
    assert kv_bytes_per_token(mha) == 2 * n_h * d_h * l * 2  # 2 n_h d_h l
    assert kv_bytes_per_token(gqa) == 2 * 16 * d_h * l * 2  # 2 n_g d_h l
    assert kv_bytes_per_token(mha) / kv_bytes_per_token(cfg) == pytest.approx(56.9, abs=0.05)


# ------------------------------------------------------------------------------------------------- on a mesh


@pytest.mark.parametrize("axes, zigzag", [pytest.param(dict(data=2, fsdp=1, tensor=4), False, marks=pytest.mark.slow),
                                          pytest.param(dict(fsdp=2, tensor=4), False, marks=pytest.mark.slow),
                                          pytest.param(dict(sequence=2, tensor=4), True, marks=pytest.mark.slow)],
                         ids=["data2_tensor4", "fsdp2_tensor4", "ring_sequence2_tensor4"])
def test_sharded_forward_equals_one_device(axes, zigzag):
    cfg = cfg_with(attention_kernel="blockwise", attention_block_size=4, tie_embeddings=False)
    model = randomised(build_model(cfg, rngs=nnx.Rngs(0)))
    tokens_BL = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    positions_BL = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    want, _ = model(tokens_BL)
    mesh = sharding.make_mesh(MeshConfig(**{"data": 1, **axes}))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    q_up = state["layers"]["groups"]["blocks"][0]["attn"]["q_up_CHW"][...]
    assert "tensor" in str(q_up.sharding.spec)
    ring = axes.get("sequence", 1)
    layout = (lambda x: to_zigzag(x, ring)) if zigzag else (lambda x: x)
    with sharding.use_mesh(mesh):
        got, _ = jax.jit(lambda s, x, p: nnx.merge(graphdef, s)(x, positions_BL=p))(
            state, layout(tokens_BL), layout(positions_BL))
    np.testing.assert_allclose(np.asarray(got), np.asarray(layout(want)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes", [pytest.param(dict(data=2, tensor=4), marks=pytest.mark.slow), dict(sequence=2, tensor=4)],
                         ids=["data2_tensor4", "split_cache_sequence2_tensor4"])
def test_sharded_latent_cache_decode_equals_one_device(axes):
    from test_inference_sharded import decode_logits

    cfg = cfg_with(attention_block_size=8)
    model = randomised(build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    rng = np.random.default_rng(5)
    prompt_BL = rng.integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    new_BL = rng.integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    want, _ = decode_logits(cfg, state, prompt_BL, new_BL, one)
    got, cache = decode_logits(cfg, state, prompt_BL, new_BL, sharding.make_mesh(MeshConfig(**{"data": 1, **axes})))
    assert cache.k_NBKGW.shape[-2:] == (1, cfg.kv_lora_rank + cfg.rope_dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    full, _ = model(jnp.asarray(np.concatenate([prompt_BL, new_BL], 1)))
    np.testing.assert_allclose(got[:, 1:], np.asarray(full)[:, 8:], rtol=2e-5, atol=2e-5 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides, message", [
    (dict(kv_lora_rank=0), r"model.kv_lora_rank=0 must be > 0 with model.attention='mla'"),
    (dict(position="alibi"), r"model.attention='mla' needs model.position='rope'.*not 'alibi'"),
    (dict(num_kv_heads=2), r"model.num_kv_heads=2 means nothing with model.attention='mla'"),
    (dict(qk_rope_head_dim=5), r"model.qk_rope_head_dim=5 must be even"),
    (dict(rope_scaling="dynamic_ntk", rope_scaling_factor=2.0), r"model.rope_scaling='dynamic_ntk' is not supported"),
    (dict(attention_bias="qkv"), r"model.attention_bias='qkv' is not supported with model.attention='mla'"),
    (dict(architecture="encoder_decoder"), r"not supported with model.architecture='encoder_decoder'"),
    (dict(attention="mha"), r"model.kv_lora_rank=16 is for model.attention='mla'"),
    (dict(attention="gqa"), r"model.attention='gqa' is not valid; choose one of 'mha', 'mla'"),
    (dict(q_lora_rank=-1), r"model.q_lora_rank=-1 must be >= 0"),
])
def test_bad_configs_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        cfg_with(**overrides)
    assert "\n" not in str(error.value)


def test_inspect_prints_deepseek_v2_cache_and_compression(capsys):
    from transformer import inspect

    overrides = ["model.attention=mla", "model.d_model=5120", "model.num_layers=60", "model.num_heads=128",
                 "model.num_kv_heads=0", "model.kv_lora_rank=512", "model.q_lora_rank=1536",
                 "model.qk_nope_head_dim=128", "model.qk_rope_head_dim=64", "model.v_head_dim=128",
                 "model.dtype=bfloat16", "model.vocab_size=102400"]
    assert inspect.main(["--preset", "tiny", *overrides]) == 0
    out = capsys.readouterr().out
    assert "KV cache per token:       69,124 B" in out  # (512 + 64) x 60 layers x 2 B + the slot position
    assert "MHA's 3,932,160 B is 56.9x this; it equals GQA with 2.25 kv groups of width 128" in out


def test_mla_configs_write_deepseek_v2_config_json_and_read_back_the_same():
    from transformer.config import MoEConfig
    from transformer.hf.configs import hf_config, model_config

    dense = cfg_with(tie_embeddings=False, attention_kernel="auto")
    hf = hf_config(dense)
    assert hf["model_type"] == "deepseek_v2" and hf["first_k_dense_replace"] == dense.num_layers  # no MoE layer
    assert model_config(hf) == dense
    moe = MoEConfig(num_experts=4, top_k=2, first_dense_layers=1, router_groups=2, router_top_groups=1,
                    routed_scale=2.5, num_shared_experts=1, d_ff_expert=16, dropless=True, load_balance_coef=0.0,
                    router_z_loss_coef=0.0, seq_balance_coef=1e-3)
    extended = dataclasses.replace(dense, moe=moe, rope_scaling="yarn", rope_scaling_factor=4.0, yarn_mscale=1.0,
                        yarn_mscale_all_dim=0.8)
    hf = hf_config(extended)
    assert (hf["topk_method"], hf["n_group"], hf["topk_group"], hf["routed_scaling_factor"]) == \
        ("group_limited_greedy", 2, 1, 2.5)
    assert hf["rope_scaling"]["mscale_all_dim"] == 0.8 and hf["max_position_embeddings"] == 4 * dense.max_seq_len
    assert model_config(hf) == extended
    with pytest.raises(ConfigError, match=r"model.norm_eps=1e-05: writing DeepSeek-V2 needs 1e-06"):
        hf_config(dataclasses.replace(dense, norm_eps=1e-5))
    with pytest.raises(ConfigError, match=r"DeepSeek-V2 needs router='softmax_topk'"):
        hf_config(dataclasses.replace(dense, moe=MoEConfig(num_experts=4, router="mixtral")))
