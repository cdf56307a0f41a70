"""transformer.convert: Hugging Face folders (built here with random weights, no network, no torch) imported
into run directories and exported back. References: the bytes of the source tensors (round trip) and a
float64 NumPy forward of the Llama / Mistral / Mixtral / Qwen2 / GPT-2 equations written from the HF code,
independent of the library's mapping. With `transformers` installed, its logits and greedy generation too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from flax import nnx

from scipy.special import erf

from transformer import convert
from transformer.config import ConfigError, ModelConfig, MoEConfig
from transformer.hf import configs, folder as hf_folder
from transformer.runs import load_model

D, H, G, W, F, V, N, E = 32, 4, 2, 8, 48, 97, 3, 4

BASE = {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": G, "head_dim": W, "intermediate_size": F,
        "vocab_size": V, "num_hidden_layers": N, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
FAMILIES = {
    "llama": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False,
              "mlp_bias": False},
    "llama_tied_scaled": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                          "tie_word_embeddings": True, "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "mistral": {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5},
    "mixtral": {**BASE, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": E,
                "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "sliding_window": None},
    "llama_biases": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": True,
                     "mlp_bias": True},
    # the window on layers 1 and 2 only: model.attention_pattern="global,local,local"
    "qwen2": {**BASE, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True,
              "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_embd": D, "n_layer": N,
             "n_head": H, "n_positions": 32, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
             "attn_pdrop": 0.1, "scale_attn_weights": True, "bos_token_id": 1, "eos_token_id": 2,
             "torch_dtype": "float32"},
}
FAMILIES["gpt2_exact_gelu_untied"] = {**FAMILIES["gpt2"], "activation_function": "gelu", "n_inner": F,
                                      "tie_word_embeddings": False}
# DeepSeek-V2 shapes in miniature: MLA (C, Cq, N, R, VH), a dense first layer, then E experts per layer with group
# limits, a shared expert and scaled gates; YaRN with DeepSeek's two mscales (unequal, so both act)
C, CQ, NOPE, ROPE, VH, FE = 16, 12, 8, 4, 6, 16
DEEPSEEK = {**{k: BASE[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                                    "num_hidden_layers", "hidden_act", "initializer_range", "tie_word_embeddings",
                                    "bos_token_id", "eos_token_id", "torch_dtype")},
            "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "num_key_value_heads": H,
            "rms_norm_eps": 1e-6, "kv_lora_rank": C, "q_lora_rank": CQ, "qk_nope_head_dim": NOPE,
            "qk_rope_head_dim": ROPE, "v_head_dim": VH, "attention_bias": False, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "n_routed_experts": E, "num_experts_per_tok": 2, "n_shared_experts": 1,
            "moe_intermediate_size": FE, "routed_scaling_factor": 2.5, "topk_method": "group_limited_greedy",
            "n_group": 2, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
            "seq_aux": True, "max_position_embeddings": 64, "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}}
FAMILIES["deepseek_v2"] = DEEPSEEK
FAMILIES["deepseek_v2_lite"] = {**DEEPSEEK, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1,
                                "topk_group": 1, "routed_scaling_factor": 1.0, "tie_word_embeddings": True,
                                "rope_scaling": {**DEEPSEEK["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707}}


def is_gpt2(config: dict) -> bool:
    return config["model_type"] == "gpt2"


def is_deepseek(config: dict) -> bool:
    return config["model_type"] == "deepseek_v2"


def tied(config: dict) -> bool:
    return config.get("tie_word_embeddings", is_gpt2(config))


def hf_tensors(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights with the names and shapes of the HF checkpoints ((out, in); GPT-2's Conv1D: (in, out))."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(dtype)
    if is_gpt2(config):
        return gpt2_tensors(config, normal, dtype)
    if is_deepseek(config):
        return deepseek_tensors(config, normal, dtype)
    out = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": (1 + normal(D)).astype(dtype)}
    if not tied(config):
        out["lm_head.weight"] = normal(V, D)
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias")
    for i in range(N):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": normal(H * W, D), p + "self_attn.k_proj.weight": normal(G * W, D),
                p + "self_attn.v_proj.weight": normal(G * W, D), p + "self_attn.o_proj.weight": normal(D, H * W),
                p + "input_layernorm.weight": (1 + normal(D)).astype(dtype),
                p + "post_attention_layernorm.weight": (1 + normal(D)).astype(dtype)}
        if qkv_bias:
            out |= {p + "self_attn.q_proj.bias": normal(H * W), p + "self_attn.k_proj.bias": normal(G * W),
                    p + "self_attn.v_proj.bias": normal(G * W)}
        if config.get("attention_bias"):
            out[p + "self_attn.o_proj.bias"] = normal(D)
        if config.get("mlp_bias"):
            out |= {p + "mlp.gate_proj.bias": normal(F), p + "mlp.up_proj.bias": normal(F),
                    p + "mlp.down_proj.bias": normal(D)}
        if config["model_type"] == "mixtral":
            out[p + "block_sparse_moe.gate.weight"] = normal(E, D)
            for e in range(E):
                q = p + f"block_sparse_moe.experts.{e}."
                out |= {q + "w1.weight": normal(F, D), q + "w3.weight": normal(F, D), q + "w2.weight": normal(D, F)}
        else:
            out |= {p + "mlp.gate_proj.weight": normal(F, D), p + "mlp.up_proj.weight": normal(F, D),
                    p + "mlp.down_proj.weight": normal(D, F)}
    return out


def gpt2_tensors(config: dict, normal, dtype) -> dict[str, np.ndarray]:
    inner = config["n_inner"] or 4 * D
    scale = lambda: (1 + normal(D)).astype(dtype)
    t = "transformer."
    out = {t + "wte.weight": normal(V, D), t + "wpe.weight": normal(config["n_positions"], D),
           t + "ln_f.weight": scale(), t + "ln_f.bias": normal(D)}
    if not tied(config):
        out["lm_head.weight"] = normal(V, D)
    for i in range(N):
        p = f"{t}h.{i}."
        out |= {p + "ln_1.weight": scale(), p + "ln_1.bias": normal(D), p + "ln_2.weight": scale(),
                p + "ln_2.bias": normal(D), p + "attn.c_attn.weight": normal(D, 3 * D),
                p + "attn.c_attn.bias": normal(3 * D), p + "attn.c_proj.weight": normal(D, D),
                p + "attn.c_proj.bias": normal(D), p + "mlp.c_fc.weight": normal(D, inner),
                p + "mlp.c_fc.bias": normal(inner), p + "mlp.c_proj.weight": normal(inner, D),
                p + "mlp.c_proj.bias": normal(D)}
    return out


def deepseek_tensors(config: dict, normal, dtype) -> dict[str, np.ndarray]:
    scale = lambda n: (1 + normal(n)).astype(dtype)
    out = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": scale(D)}
    if not tied(config):
        out["lm_head.weight"] = normal(V, D)
    for i in range(N):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out |= {p + "input_layernorm.weight": scale(D), p + "post_attention_layernorm.weight": scale(D),
                a + "kv_a_proj_with_mqa.weight": normal(C + ROPE, D), a + "kv_a_layernorm.weight": scale(C),
                a + "kv_b_proj.weight": normal(H * (NOPE + VH), C), a + "o_proj.weight": normal(D, H * VH)}
        if config["q_lora_rank"]:
            out |= {a + "q_a_proj.weight": normal(CQ, D), a + "q_a_layernorm.weight": scale(CQ),
                    a + "q_b_proj.weight": normal(H * (NOPE + ROPE), CQ)}
        else:
            out[a + "q_proj.weight"] = normal(H * (NOPE + ROPE), D)
        m = p + "mlp."
        if i < config["first_k_dense_replace"]:
            out |= {m + "gate_proj.weight": normal(F, D), m + "up_proj.weight": normal(F, D),
                    m + "down_proj.weight": normal(D, F)}
            continue
        shared = FE * config["n_shared_experts"]
        out |= {m + "gate.weight": normal(E, D), m + "shared_experts.gate_proj.weight": normal(shared, D),
                m + "shared_experts.up_proj.weight": normal(shared, D),
                m + "shared_experts.down_proj.weight": normal(D, shared)}
        for e in range(E):
            out |= {m + f"experts.{e}.gate_proj.weight": normal(FE, D),
                    m + f"experts.{e}.up_proj.weight": normal(FE, D),
                    m + f"experts.{e}.down_proj.weight": normal(D, FE)}
    return out


def write_hf(path: Path, config: dict, tensors: dict, *, shards: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_numpy.save_file(part, str(path / file))
        weight_map |= {n: file for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ---------------------------------------------------------------- float64 reference of the HF equations


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _inv_freq(config):
    inv = 1.0 / config["rope_theta"] ** (np.arange(0, W, 2) / W)
    scaling = config.get("rope_scaling")
    if scaling and scaling["rope_type"] == "llama3":  # transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def _rope(x_LHW, inv):
    angles = np.arange(x_LHW.shape[0])[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1))[:, None], np.sin(np.concatenate([angles] * 2, -1))[:, None]
    rotated = np.concatenate([-x_LHW[..., W // 2:], x_LHW[..., :W // 2]], -1)
    return x_LHW * cos + rotated * sin


def _layer_windows(config: dict) -> list[int]:
    """Each layer's sliding window (0: none) as the HF model computes it."""
    if config["model_type"] == "qwen2":
        window = config["sliding_window"] if config.get("use_sliding_window") else 0
        return [window if i >= config["max_window_layers"] else 0 for i in range(N)]
    return [0 if config["model_type"] in ("llama", "gpt2") else config.get("sliding_window") or 0] * N


def _softmax_attention(q, k, v, window):
    """Causal attention of (L, H, W) queries to (L, H, W) keys/values, scaled by 1/sqrt(W) -> (L, H W)."""
    L = len(q)
    q_pos, k_pos = np.arange(L)[:, None], np.arange(L)[None]
    visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    scores = np.where(visible[None], np.einsum("qhw,khw->hqk", q, k) / np.sqrt(W), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khw->qhw", probs, v).reshape(L, -1)


def reference_logits(config: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    if is_gpt2(config):
        return gpt2_reference_logits(config, t, tokens)
    if is_deepseek(config):
        return deepseek_reference_logits(config, t, tokens)
    eps, L = config["rms_norm_eps"], len(tokens)
    x = t["model.embed_tokens.weight"][tokens]
    silu = lambda z: z / (1 + np.exp(-z))

    def linear(h, name):  # nn.Linear: h W^T (+ b)
        return h @ t[name + ".weight"].T + t.get(name + ".bias", 0.0)

    for i, window in enumerate(_layer_windows(config)):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        q = _rope(linear(h, p + "self_attn.q_proj").reshape(L, H, W), _inv_freq(config))
        k = _rope(linear(h, p + "self_attn.k_proj").reshape(L, G, W), _inv_freq(config))
        v = linear(h, p + "self_attn.v_proj").reshape(L, G, W)
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
        x = x + linear(_softmax_attention(q, k, v, window), p + "self_attn.o_proj")
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if config["model_type"] == "mixtral":
            logits = h @ t[p + "block_sparse_moe.gate.weight"].T
            out = np.zeros_like(h)
            for row in range(L):
                top = np.argsort(-logits[row])[:config["num_experts_per_tok"]]
                gates = np.exp(logits[row, top] - logits[row, top].max())
                gates /= gates.sum()
                for e, g in zip(top, gates):
                    q_ = p + f"block_sparse_moe.experts.{e}."
                    a = silu(h[row] @ t[q_ + "w1.weight"].T) * (h[row] @ t[q_ + "w3.weight"].T)
                    out[row] += g * (a @ t[q_ + "w2.weight"].T)
            x = x + out
        else:
            a = silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj")
            x = x + linear(a, p + "mlp.down_proj")
    x = _rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if tied(config) else t["lm_head.weight"]
    return x @ head.T


def _yarn_mscale(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * np.log(factor) + 1.0


def _deepseek_rope(config: dict):
    """(inverse frequencies, cos/sin factor, score scale) as transformers' _compute_yarn_parameters and
    DeepseekV2Attention compute them."""
    rope, dim, base = config["rope_scaling"], ROPE, config["rope_theta"]
    factor, old = rope["factor"], rope["original_max_position_embeddings"]
    correction = lambda rotations: dim * np.log(old / (rotations * 2 * np.pi)) / (2 * np.log(base))
    low, high = max(np.floor(correction(rope["beta_fast"])), 0), min(np.ceil(correction(rope["beta_slow"])), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low + (0.001 if low == high else 0)), 0, 1)
    extrapolated = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    inv = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    cos_sin_factor = _yarn_mscale(factor, rope["mscale"]) / _yarn_mscale(factor, rope["mscale_all_dim"])
    score_scale = (NOPE + ROPE) ** -0.5 * _yarn_mscale(factor, rope["mscale_all_dim"]) ** 2
    return inv, cos_sin_factor, score_scale


def _interleaved_rope(x_LHR, inv, factor):
    """DeepSeek's rotation: pairs (2j, 2j + 1) as complex numbers times factor * e^(i pos inv_j)."""
    z = x_LHR[..., 0::2] + 1j * x_LHR[..., 1::2]
    z = z * (factor * np.exp(1j * np.arange(len(x_LHR))[:, None, None] * inv))
    return np.stack([z.real, z.imag], -1).reshape(x_LHR.shape)


def deepseek_reference_logits(config: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    """DeepseekV2ForCausalLM: MLA with interleaved RoPE on the decoupled parts, a dense first layer, then softmax
    top-k experts (group-limited, gates times routed_scaling_factor) plus shared experts."""
    eps, L = config["rms_norm_eps"], len(tokens)
    inv, rope_factor, score_scale = _deepseek_rope(config)
    silu = lambda z: z / (1 + np.exp(-z))
    linear = lambda h, name: h @ t[name + ".weight"].T
    mlp = lambda h, m: linear(silu(linear(h, m + "gate_proj")) * linear(h, m + "up_proj"), m + "down_proj")
    x = t["model.embed_tokens.weight"][tokens]
    for i in range(N):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        if config["q_lora_rank"]:
            q = linear(_rms(linear(h, a + "q_a_proj"), t[a + "q_a_layernorm.weight"], 1e-6), a + "q_b_proj")
        else:
            q = linear(h, a + "q_proj")
        q = q.reshape(L, H, NOPE + ROPE)
        latent = linear(h, a + "kv_a_proj_with_mqa")
        kv = linear(_rms(latent[:, :C], t[a + "kv_a_layernorm.weight"], 1e-6), a + "kv_b_proj").reshape(L, H, -1)
        k_rope = _interleaved_rope(latent[:, None, C:], inv, rope_factor)
        q = np.concatenate([q[..., :NOPE], _interleaved_rope(q[..., NOPE:], inv, rope_factor)], -1)
        k = np.concatenate([kv[..., :NOPE], np.repeat(k_rope, H, axis=1)], -1)
        scores = np.einsum("qhw,khw->hqk", q, k) * score_scale
        scores = np.where(np.tril(np.ones((L, L), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + linear(np.einsum("hqk,khv->qhv", probs, kv[..., NOPE:]).reshape(L, -1), a + "o_proj")
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if i < config["first_k_dense_replace"]:
            x = x + mlp(h, m)
            continue
        router = h @ t[m + "gate.weight"].T
        router = np.exp(router - router.max(-1, keepdims=True))
        router /= router.sum(-1, keepdims=True)
        out = mlp(h, m + "shared_experts.")
        for row in range(L):
            scores_e = router[row].copy()
            if config["topk_method"] == "group_limited_greedy":
                groups = scores_e.reshape(config["n_group"], -1)
                keep = np.argsort(-groups.max(-1))[:config["topk_group"]]
                scores_e = np.where(np.isin(np.arange(config["n_group"]), keep)[:, None], groups, 0.0).ravel()
            for e in np.argsort(-scores_e)[:config["num_experts_per_tok"]]:
                out[row] += scores_e[e] * config["routed_scaling_factor"] * mlp(h[row], m + f"experts.{e}.")
        x = x + out
    x = _rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if tied(config) else t["lm_head.weight"]
    return x @ head.T


def _layer_norm(x, w, b, eps):
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt(np.mean(c * c, -1, keepdims=True) + eps) * w + b


GELUS = {"gelu_new": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
         "gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))}


def gpt2_reference_logits(config: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
    """GPT2LMHeadModel: learned positions, pre-LayerNorm blocks, Conv1D (x W + b with W stored (in, out))."""
    eps, L, act = config["layer_norm_epsilon"], len(tokens), GELUS[config["activation_function"]]
    x = t["transformer.wte.weight"][tokens] + t["transformer.wpe.weight"][:L]
    conv1d = lambda h, name: h @ t[name + ".weight"] + t[name + ".bias"]
    for i in range(N):
        p = f"transformer.h.{i}."
        h = _layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        q, k, v = (z.reshape(L, H, W) for z in np.split(conv1d(h, p + "attn.c_attn"), 3, axis=-1))
        x = x + conv1d(_softmax_attention(q, k, v, 0), p + "attn.c_proj")
        h = _layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        x = x + conv1d(act(conv1d(h, p + "mlp.c_fc")), p + "mlp.c_proj")
    x = _layer_norm(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    head = t["transformer.wte.weight"] if tied(config) else t["lm_head.weight"]
    return x @ head.T


def our_logits(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    loaded = load_model(run_dir)
    model = nnx.merge(loaded.graphdef, loaded.state)
    logits, _ = model(jax.numpy.asarray(tokens)[None])
    return np.asarray(logits[0], np.float64)


TOKENS = np.random.default_rng(7).integers(0, V, 12)


# ---------------------------------------------------------------- tests


SLOW_FAMILIES = ("gpt2", "gpt2_exact_gelu_untied", "llama_biases", "mixtral", "deepseek_v2_lite")  # covered in the
# default run by their siblings, the GPT-2 hub-layout test and the sharded bfloat16 folder test; run with -m slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n
                                  for n in sorted(FAMILIES)])
def test_import_matches_the_float64_reference_and_round_trips_bit_for_bit(tmp_path, name):
    config = FAMILIES[name]
    tensors = hf_tensors(config)
    source = write_hf(tmp_path / "hf", config, tensors)
    convert.import_hf(source, tmp_path / "run")
    np.testing.assert_allclose(our_logits(tmp_path / "run", TOKENS), reference_logits(config, tensors, TOKENS),
                               atol=2e-5, rtol=2e-5)
    files = convert.export_hf(tmp_path / "run", tmp_path / "out")
    back = {k: v for f in files for k, v in safetensors_numpy.load_file(str(f)).items()}
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {**config, **_normalised(config)}


def _normalised(config: dict) -> dict:
    """Keys the export writes in canonical form (same values as the source's)."""
    if is_gpt2(config) or is_deepseek(config):
        return {}
    out = {"head_dim": W}
    if config["model_type"] in ("mistral", "mixtral"):
        out["sliding_window"] = config.get("sliding_window")
    if config.get("rope_scaling") is None:
        out["rope_scaling"] = None
    return out


@pytest.mark.parametrize("name", ["mixtral", "gpt2", pytest.param("deepseek_v2", marks=pytest.mark.slow)])
# gpt2: q, k, v shards cut from the fused c_attn; deepseek_v2: k_up / v_up from kv_b_proj, RoPE rows reordered
def test_sharded_bfloat16_folder_imports_onto_a_mesh_shard_by_shard_and_exports_the_same_bytes(tmp_path, monkeypatch,
                                                                                                name):
    config = {**FAMILIES[name], "torch_dtype": "bfloat16"}
    tensors = hf_tensors(config, seed=3, dtype=ml_dtypes.bfloat16)
    source = write_hf(tmp_path / "hf", config, tensors, shards=3)
    reads = []
    original = hf_folder.HFFolder.read
    monkeypatch.setattr(hf_folder.HFFolder, "read", lambda self, n: reads.append(n) or original(self, n))
    convert.import_hf(source, tmp_path / "run", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"])
    assert len(reads) >= len(tensors)  # read per device shard, never as one whole-model load
    single = our_logits(tmp_path / "run", TOKENS)
    np.testing.assert_allclose(single, reference_logits(config, tensors, TOKENS), atol=2e-4, rtol=2e-4)
    files = convert.export_hf(tmp_path / "run", tmp_path / "out", max_shard_bytes=40_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = {k: v for f in files for k, v in safetensors_numpy.load_file(str(f)).items()}
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key


@pytest.mark.slow
def test_converted_run_generates_and_fine_tunes(tmp_path):
    from transformer import generate, train
    from transformer.config import Config, apply_overrides

    config = FAMILIES["llama"]
    convert.import_hf(write_hf(tmp_path / "hf", config, hf_tensors(config)), tmp_path / "run")
    out = tmp_path / "gen.json"
    assert generate.main([f"run_dir={tmp_path / 'run'}", "prompt_ids=5,6,7", "max_new_tokens=4",
                          "temperature=0", f"out={out}"]) == 0
    generated = json.loads(out.read_text())["rows"][0]["generated_ids"]
    expected, tokens = [], [5, 6, 7]
    for _ in range(4):  # greedy continuation by the float64 reference
        nxt = int(np.argmax(reference_logits(config, hf_tensors(config), np.array(tokens))[-1]))
        expected.append(nxt)
        tokens.append(nxt)
    assert generated == expected
    tokens_file = tmp_path / "tokens.npy"
    np.save(tokens_file, np.random.default_rng(0).integers(0, V, 4000).astype(np.uint16))
    cfg = apply_overrides(Config.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())), [
        f"checkpoint.init_from={tmp_path / 'run'}", f"run_dir={tmp_path / 'ft'}", "steps=2", "data.dataset=npy",
        f"data.paths={tokens_file}", "data.seq_len=16", "data.global_batch_size=8", "checkpoint.every_steps=2",
        "optim.warmup_steps=1", "progress_bar=false", "sample_tokens=0", "eval_every=0"])
    summary = train.train(cfg)
    assert summary["origin"] == "init_from" and summary["step"] == 2 and np.isfinite(summary["losses"]).all()


BAD_FOLDERS = {  # problem: (family, change to its config.json or tensors, the error's words)
    "no_config": ("llama", lambda c, t: None, "has no config.json"),
    "unknown_type": ("llama", lambda c, t: c.update(model_type="gptj"), "model_type='gptj'"),
    "not_yet": ("llama", lambda c, t: c.update(model_type="deepseek_v3"),
                "model_type='deepseek_v3': needs its router"),
    "deepseek_norm_topk": ("deepseek_v2", lambda c, t: c.update(norm_topk_prob=True),
                           "norm_topk_prob=True: transformers' DeepseekV2 ignores it"),
    "deepseek_eps": ("deepseek_v2", lambda c, t: c.update(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    "deepseek_freq": ("deepseek_v2", lambda c, t: c.update(moe_layer_freq=2), "moe_layer_freq=2"),
    "deepseek_expert_missing": ("deepseek_v2", lambda c, t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"),
                                "lacks tensor 'model.layers.2.mlp.experts.3.up_proj.weight'"),
    "deepseek_dense_layer_has_experts": (
        "deepseek_v2", lambda c, t: c.update(first_k_dense_replace=2),
        "lacks tensor 'model.layers.1.mlp.down_proj.weight' (3 missing)"),
    "mistral_bias": ("mistral", lambda c, t: c.update(attention_bias=True),
                     "attention_bias=True: MistralForCausalLM has no such biases"),
    "activation": ("llama", lambda c, t: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    "missing": ("llama", lambda c, t: t.pop("model.layers.2.mlp.up_proj.weight"),
                "lacks tensor 'model.layers.2.mlp.up_proj.weight'"),
    "extra": ("llama", lambda c, t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(H * W, np.float32)}),
              "has tensor 'model.layers.0.self_attn.q_proj.bias'"),
    "missing_bias": ("qwen2", lambda c, t: t.pop("model.layers.1.self_attn.k_proj.bias"),
                     "lacks tensor 'model.layers.1.self_attn.k_proj.bias'"),
    "shape": ("llama", lambda c, t: t.update({"model.norm.weight": np.ones(D - 1, np.float32)}),
              "tensor 'model.norm.weight' has shape (31,) but config.json implies (32,)"),
    "rope": ("llama", lambda c, t: c.update(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
             "rope_scaling.rope_type='longrope'"),
    "qwen2_layer_types": ("qwen2", lambda c, t: c.update(use_sliding_window=False,
                                                         layer_types=["full_attention"] + ["sliding_attention"] * 2),
                          "layer_types=['full_attention', 'sliding_attention', 'sliding_attention']: has sliding"),
    "gpt2_inverse_layer_idx": ("gpt2", lambda c, t: c.update(scale_attn_by_inverse_layer_idx=True),
                               "scale_attn_by_inverse_layer_idx=True: the library computes GPT-2's plain attention"),
    "gpt2_reorder": ("gpt2", lambda c, t: c.update(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
    "gpt2_unscaled": ("gpt2", lambda c, t: c.update(scale_attn_weights=False), "scale_attn_weights=False"),
    "gpt2_activation": ("gpt2", lambda c, t: c.update(activation_function="swish"), "activation_function='swish'"),
    "gpt2_conv1d_shape": ("gpt2", lambda c, t: t.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((4 * D, D),
                                                                                                     np.float32)}),
                          "tensor 'transformer.h.0.mlp.c_fc.weight' has shape (128, 32) but config.json implies "
                          "(32, 128)"),
}


@pytest.mark.parametrize("problem", sorted(BAD_FOLDERS))
def test_bad_folders_fail_with_one_line_and_write_nothing(tmp_path, capsys, problem):
    name, change, expected = BAD_FOLDERS[problem]
    config, tensors = dict(FAMILIES[name]), hf_tensors(FAMILIES[name])
    change(config, tensors)
    source = write_hf(tmp_path / "hf", config, tensors)
    if problem == "no_config":
        (source / "config.json").unlink()
    assert convert.main(["--from-hf", str(source), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_deepseek_v2_lite_config_gives_the_papers_15_7b_total_and_2_4b_active_parameters():
    """DeepSeek-V2-Lite's published config.json (arXiv:2405.04434 appendix B: 15.7B parameters, 2.4B activated per
    token), counted from the abstract model: MLA, one dense layer, 26 MoE layers of 64 + 2 shared experts."""
    from transformer.model import build_model, count_params

    hf = {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
          "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
          "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
          "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
          "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
          "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
          "attention_bias": False, "initializer_range": 0.02,
          "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
          "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                                "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                                "type": "yarn"}}
    cfg = configs.model_config(hf)
    assert (cfg.max_seq_len, cfg.rope_scaling_factor, cfg.moe.first_dense_layers) == (4096, 40.0, 1)
    total = count_params(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    idle_experts = 26 * (64 - 6) * 3 * 2048 * 1408
    assert round(total / 1e9, 1) == 15.7
    active = total - idle_experts - 102400 * 2048  # the input embedding is a lookup, not an activated weight
    assert 2.4e9 <= active < 2.5e9  # 2.45B: the paper's "2.4B"
    assert configs.hf_config(cfg, saved=hf) == hf  # written back as the hub's config.json has it ("type": "yarn")


def test_existing_directories_are_never_overwritten(tmp_path, capsys):
    config = FAMILIES["llama"]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert convert.main(["--from-hf", str(source), "--run-dir", str(tmp_path / "run")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    convert.import_hf(source, tmp_path / "run2")
    assert convert.main(["--to-hf", str(tmp_path / "run2"), "--out", str(source)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_gpt2_hub_layout_without_the_transformer_prefix_and_with_mask_buffers_imports_the_same(tmp_path):
    config = FAMILIES["gpt2"]
    tensors = hf_tensors(config)
    hub = {name.removeprefix("transformer."): value for name, value in tensors.items()}
    hub |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)) for i in range(N)}
    hub |= {f"h.{i}.attn.masked_bias": np.asarray(-1e4, np.float32) for i in range(N)}
    convert.import_hf(write_hf(tmp_path / "hf", config, hub), tmp_path / "run")
    np.testing.assert_allclose(our_logits(tmp_path / "run", TOKENS), reference_logits(config, tensors, TOKENS),
                               atol=2e-5, rtol=2e-5)
    files = convert.export_hf(tmp_path / "run", tmp_path / "out")  # written as GPT2LMHeadModel saves them
    assert sorted(safetensors_numpy.load_file(str(files[0]))) == sorted(tensors)


QWEN2 = {**FAMILIES["qwen2"], "num_hidden_layers": 6}


@pytest.mark.parametrize("change, pattern", [
    (dict(use_sliding_window=False), ""),
    (dict(max_window_layers=0), ""),  # every layer slides: sliding_window alone
    (dict(max_window_layers=6), ""),
    (dict(max_window_layers=4), "global,global,global,global,local,local"),
    (dict(layer_types=["sliding_attention", "full_attention"] * 3), "local,global"),
    (dict(layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2), "local,local,global"),
])
def test_qwen2_windows_become_an_attention_pattern_and_export_back(change, pattern):
    hf = {**QWEN2, **change}
    cfg = configs.model_config(hf)
    assert cfg.attention_pattern == pattern and cfg.attention_bias == "qkv"
    slides = [cfg.layer_window(i) == 5 for i in range(6)]
    window = 5 if hf["use_sliding_window"] else 0
    want = [t == "sliding_attention" for t in hf["layer_types"]] if "layer_types" in hf else \
        [bool(window) and i >= hf["max_window_layers"] for i in range(6)]
    assert slides == want
    assert configs.model_config(configs.hf_config(cfg)) == cfg  # from a bare config: no saved keys to lean on
    assert configs.hf_config(cfg, saved=hf) == {**hf, "head_dim": W, "rope_scaling": None}


@pytest.mark.parametrize("changes, expected", [
    (dict(attention_pattern="local,global", sliding_window=4),
     "model.attention_pattern='local,global': writing Mistral needs ''"),
    (dict(position="alibi"), "model.position='alibi': writing an HF family (GPT-2: 'learned') needs 'rope'"),
    (dict(moe=MoEConfig(num_experts=4, router="mixtral", routed_scale=2.0)),
     "routed_scale=2.0): Mixtral needs router='mixtral', every layer MoE, no shared experts and unscaled gates"),
    (dict(moe=MoEConfig(num_experts=4, router="mixtral", first_dense_layers=1)), "first_dense_layers=1"),
    (dict(rope_scaling="ntk", rope_scaling_factor=2.0), "model.rope_scaling='ntk': no Hugging Face rope_type"),
    (dict(embed_scale="sqrt_d"), "model.embed_scale='sqrt_d'"),
    (dict(activation="gelu"), "model.activation='gelu': writing a rotary HF family needs 'swiglu'"),
    (dict(attention_bias="qkv", mlp_bias=True), "model.mlp_bias=True: writing Qwen2 needs False"),
    (dict(position="learned", norm="layernorm", attention_bias="all"),
     "model.embed_scale='auto' scales the token embedding; the HF families need 'none'"),
    (dict(position="learned", embed_scale="none", norm="layernorm", attention_bias="all"),
     "model.mlp_bias=False: writing GPT-2 needs True"),
    (dict(position="learned", embed_scale="none", norm="layernorm", attention_bias="all", mlp_bias=True,
          activation="swiglu"), "GPT-2 needs a dense MLP with one of gelu, gelu_tanh, relu"),
])
def test_configs_no_hf_family_computes_are_refused_on_export(changes, expected):
    cfg = ModelConfig(vocab_size=V, d_model=D, num_layers=N, num_heads=H, **changes)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        configs.hf_config(cfg)


# ---------------------------------------------------------------- against transformers (optional extra)

FOR_CLASS = {"llama": "LlamaForCausalLM", "llama_tied_scaled": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "mixtral": "MixtralForCausalLM", "llama_biases": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v2_lite": "DeepseekV2ForCausalLM",
             "gpt2": "GPT2LMHeadModel", "gpt2_exact_gelu_untied": "GPT2LMHeadModel"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_and_greedy_generation_match_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformer.inference.generate import Generator
    from transformer.inference.sampling import SamplingConfig

    config = FAMILIES[name]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config, seed=1))
    convert.import_hf(source, tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "out")
    model = getattr(transformers, FOR_CLASS[name]).from_pretrained(str(tmp_path / "out"), torch_dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)[None]).logits[0].double().numpy()
    np.testing.assert_allclose(our_logits(tmp_path / "run", TOKENS), theirs, atol=1e-4, rtol=1e-4)
    prompt = [3, 9, 4, 1]
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    ours = Generator(str(tmp_path / "run")).generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=6),
                                                     max_len=16)
    assert list(ours.tokens[0]) == hf_out


def test_a_folder_with_a_tokenizer_gives_a_run_that_reads_and_generates_through_it(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from transformer.data.pipeline import make_dataset

    config = FAMILIES["llama"]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config))
    words = ["<unk>", "<s>", "</s>", "the", "and", "of", "God", "LORD", "said"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(V - len(words))])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(source / "tokenizer.json"))
    cfg = convert.import_hf(source, tmp_path / "run")
    assert cfg.data.dataset == "kjv" and cfg.data.tokenizer == f"hf:{(tmp_path / 'run' / 'hf').absolute()}"
    assert (tmp_path / "run" / "hf" / "tokenizer.json").is_file()
    batch = make_dataset(cfg.data, vocab_size=cfg.model.vocab_size).batch(0)
    assert batch["inputs_BL"].max() < V and {3, 4, 5} <= set(batch["inputs_BL"].ravel().tolist())
    from transformer import generate

    out = tmp_path / "gen.json"
    capsys.readouterr()
    assert generate.main([f"run_dir={tmp_path / 'run'}", "prompt=the LORD said", "max_new_tokens=5", "temperature=0",
                          f"out={out}"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["prompt_ids"] == [3, 7, 8]
    streamed = capsys.readouterr().out.splitlines()[0]  # row 0 streams its text as it decodes
    assert streamed == tok.decode(row["generated_ids"], skip_special_tokens=True)


def test_a_tokenizer_larger_than_the_model_is_refused_and_nothing_written(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    config = FAMILIES["llama"]
    source = write_hf(tmp_path / "hf", config, hf_tensors(config))
    vocab = {f"w{i}": i for i in range(V + 5)}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0")).save(str(source / "tokenizer.json"))
    assert convert.main(["--from-hf", str(source), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"has {V + 5} tokens, more than model.vocab_size={V}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
