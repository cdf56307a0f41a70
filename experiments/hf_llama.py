"""Our decoder's parameters as a Hugging Face `transformers` `LlamaForCausalLM` (for experiments/bench_decode.py).

    model = hf_llama.to_hf(model_cfg, params)       # params: nnx.State / pure dict of the model's nnx.Params
    model.generate(input_ids, do_sample=False, max_new_tokens=64, use_cache=True)

Only configs that are a Llama are accepted (`check_llama`): a pre-norm RMSNorm decoder with RoPE (no scaling),
SwiGLU, no MoE, no sliding window. The conventions match without permutations:
- RMSNorm: ours is x / sqrt(mean(x^2) + eps) * scale in float32 (scale starts at 1), HF's LlamaRMSNorm is
  weight * x / sqrt(mean(x^2) + eps): weight = scale (not 1 + scale, Gemma's convention); eps = model.norm_eps.
- RoPE: ours rotates pairs (i, i + W/2) with inv_freq = theta^(-2i/W) (`ops.positions.apply_rope`), HF's
  `rotate_half` with cos/sin of cat(freqs, freqs): the same rotate-half layout, so q/k need no interleave
  permutation; rope_theta = model.rope_theta; scores scaled by 1/sqrt(W) in both.
- GQA: query head h reads kv head h // (H / G) in both (ours views heads as G x R groups, HF's repeat_kv).
- Linear weights: torch's nn.Linear holds (out, in), ours (in, ...): q_proj = q_DHW reshaped (D, H*W) and
  transposed, k/v likewise with G heads, o_proj = o_HWD reshaped (H*W, D) transposed; gate/up = gate_DF.T /
  up_DF.T, down = down_FD.T; lm_head = unembed_DV.T, or tied to embed_tokens = tokens_VD.
Scanned layers (params with a leading layers axis) and unrolled ones (`model.scan_layers=false`) both map.
"""

from __future__ import annotations

import numpy as np

from transformer.config import ConfigError, ModelConfig

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def check_llama(cfg: ModelConfig) -> None:
    """ConfigError naming the first field that makes `cfg` something LlamaForCausalLM cannot compute."""
    required = {"architecture": "decoder", "position": "rope", "rope_scaling": "none", "norm": "rmsnorm",
                "norm_position": "pre", "activation": "swiglu", "sliding_window": 0}
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"model.{name}={getattr(cfg, name)!r}: LlamaForCausalLM needs {value!r}")
    if cfg.moe.num_experts:
        raise ConfigError(f"model.moe.num_experts={cfg.moe.num_experts}: LlamaForCausalLM is dense (needs 0)")


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int = 0):
    """The `LlamaConfig` of the same architecture (eager weights in float32 unless loaded otherwise)."""
    from transformers import LlamaConfig

    check_llama(cfg)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head, hidden_act="silu", max_position_embeddings=max_position_embeddings or
        max(cfg.max_seq_len, 8192), rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, use_cache=True)


def _pure(params) -> dict:
    """A nested dict of numpy arrays from an nnx.State (or a pure dict)."""
    from flax import nnx

    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if isinstance(params, dict):
        return {k: _pure(v) for k, v in params.items()}
    return np.asarray(params)


def layer_params(cfg: ModelConfig, params) -> list[dict]:
    """One dict per layer {attn: {q_DHW, k_DGW, v_DGW, o_HWD}, attn_norm: {scale}, ffn: {...}, ffn_norm: {...}},
    from scanned (leading layers axis) or unrolled groups."""
    groups = _pure(params)["layers"]["groups"]
    if "blocks" in groups:  # scanned: each leaf has a leading layers axis
        blocks = groups["blocks"][0]
        layers = [_index(blocks, i) for i in range(cfg.num_layers)]
    else:  # model.scan_layers=false: groups {0: {blocks: {0: ...}}, 1: ...}
        layers = [groups[i]["blocks"][0] for i in sorted(groups)]
    if len(layers) != cfg.num_layers:
        raise ValueError(f"found {len(layers)} layers in the params; model.num_layers={cfg.num_layers}")
    return layers


def _index(tree, i):
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]


def state_dict(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """LlamaForCausalLM's state dict (numpy float32) from our params; see the module docstring."""
    check_llama(cfg)
    D, H, G, W = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    pure = _pure(params)
    f32 = lambda x: np.array(x, np.float32, order="C")  # a writable copy (torch.from_numpy shares it)
    out = {"model.embed_tokens.weight": f32(pure["embed"]["tokens_VD"]),
           "model.norm.weight": f32(pure["final_norm"]["scale"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = f32(pure["embed"]["unembed_DV"].T)
    for i, layer in enumerate(layer_params(cfg, pure)):
        attn, ffn, prefix = layer["attn"], layer["ffn"], f"model.layers.{i}."
        out |= {
            prefix + "self_attn.q_proj.weight": f32(attn["q_DHW"].reshape(D, H * W).T),
            prefix + "self_attn.k_proj.weight": f32(attn["k_DGW"].reshape(D, G * W).T),
            prefix + "self_attn.v_proj.weight": f32(attn["v_DGW"].reshape(D, G * W).T),
            prefix + "self_attn.o_proj.weight": f32(attn["o_HWD"].reshape(H * W, D).T),
            prefix + "mlp.gate_proj.weight": f32(ffn["gate_DF"].T),
            prefix + "mlp.up_proj.weight": f32(ffn["up_DF"].T),
            prefix + "mlp.down_proj.weight": f32(ffn["down_FD"].T),
            prefix + "input_layernorm.weight": f32(layer["attn_norm"]["scale"]),
            prefix + "post_attention_layernorm.weight": f32(layer["ffn_norm"]["scale"]),
        }
    return out


def to_hf(cfg: ModelConfig, params, *, dtype: str = "float32", device: str = "cpu",
          attn_implementation: str = "sdpa", max_position_embeddings: int = 0):
    """A `LlamaForCausalLM` in eval mode holding our params (every tensor of its state dict set: a missing or
    unexpected name, or a wrong shape, raises)."""
    import torch
    from transformers import LlamaForCausalLM

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    config = hf_config(cfg, max_position_embeddings=max_position_embeddings)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    tensors = {name: torch.from_numpy(array) for name, array in state_dict(cfg, params).items()}
    result = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.eval()
