"""Hugging Face config.json <-> `ModelConfig` for the families the library computes exactly.

Llama (1-3, with linear / dynamic / YaRN / llama3 RoPE scaling), Mistral (sliding window) and Mixtral (top-k
experts, softmax over the chosen logits, no capacity drops). A config.json option the library cannot
compute (an unknown `model_type`, biases, another activation, router noise, ...) is refused with a
ConfigError naming the field. Keys that do not change the function (token ids, `use_cache`, ...) are kept in
the run directory and written back on export, so an import/export round trip returns the same config.json.
"""

from __future__ import annotations

import math

from transformer.config import ConfigError, ModelConfig, MoEConfig

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
NOT_YET = {  # families whose options the library does not have yet
    "qwen2": "q/k/v projection biases (attention_bias)",
    "gpt2": "biases on every projection, learned absolute positions with LayerNorm and tanh GELU",
    "deepseek_v2": "multi-head latent attention (MLA)",
}
_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn", "llama3": "llama3"}
_UNSUPPORTED_IF_TRUE = ("attention_bias", "mlp_bias", "use_qk_norm", "qk_layernorm")
_UNSUPPORTED_IF_NONZERO = ("attention_dropout", "hidden_dropout", "router_jitter_noise")


def _refuse(field: str, value, why: str) -> ConfigError:
    return ConfigError(f"config.json {field}={value!r}: {why}")


def _rope(hf: dict) -> dict:
    """ModelConfig RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _refuse("rope_scaling.rope_type", kind, f"the library computes {', '.join(_ROPE_TYPES)}")
    max_len = int(hf.get("max_position_embeddings", 2048))
    fields = dict(rope_theta=theta, rope_scaling=_ROPE_TYPES[kind], max_seq_len=max_len)
    if kind == "default":
        return fields
    fields["rope_scaling_factor"] = float(params["factor"])
    if kind in ("yarn", "llama3"):
        fields["max_seq_len"] = int(params.get("original_max_position_embeddings") or max_len)
    if kind == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if params.get(key):
                raise _refuse(f"rope_scaling.{key}", params[key], "DeepSeek's YaRN variant is not computed")
        default_factor = 0.1 * math.log(fields["rope_scaling_factor"]) + 1.0
        if params.get("attention_factor") not in (None, default_factor):
            raise _refuse("rope_scaling.attention_factor", params["attention_factor"],
                          f"the library uses YaRN's 0.1 ln(factor) + 1 = {default_factor}")
        fields["yarn_beta_fast"] = float(params.get("beta_fast", 32.0))
        fields["yarn_beta_slow"] = float(params.get("beta_slow", 1.0))
    if kind == "llama3":
        fields["llama3_low_freq_factor"] = float(params["low_freq_factor"])
        fields["llama3_high_freq_factor"] = float(params["high_freq_factor"])
    return fields


def model_config(hf: dict) -> ModelConfig:
    """The ModelConfig computing what `hf` (a parsed config.json) describes; ConfigError naming the first
    field the library cannot express."""
    model_type = hf.get("model_type")
    if model_type in NOT_YET:
        raise _refuse("model_type", model_type, f"needs {NOT_YET[model_type]}, which the library does not have yet")
    if model_type not in FAMILIES:
        raise _refuse("model_type", model_type, f"supported: {', '.join(FAMILIES)}")
    for key in _UNSUPPORTED_IF_TRUE:
        if hf.get(key):
            raise _refuse(key, hf[key], "the library's projections have no biases / norms there")
    for key in _UNSUPPORTED_IF_NONZERO:
        if hf.get(key):
            raise _refuse(key, hf[key], "must be 0 (the library has no such noise or dropout)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "the gated MLP of these families is SwiGLU ('silu')")
    heads = int(hf["num_attention_heads"])
    moe = MoEConfig()
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        router="mixtral", dropless=True, load_balance_coef=float(hf.get("router_aux_loss_coef", 0.0)),
                        router_z_loss_coef=0.0)
    cfg = ModelConfig(
        architecture="decoder", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), d_ff=int(hf["intermediate_size"]),
        activation="swiglu", norm="rmsnorm", norm_position="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), position="rope",
        sliding_window=int(hf.get("sliding_window") or 0) if model_type != "llama" else 0,
        init_std=float(hf.get("initializer_range", 0.02)), moe=moe, **_rope(hf))
    cfg.validate()
    return cfg


def family(cfg: ModelConfig) -> str:
    """The HF model_type that computes `cfg` (ConfigError naming the field otherwise)."""
    required = {"architecture": "decoder", "position": "rope", "norm": "rmsnorm", "norm_position": "pre",
                "activation": "swiglu"}
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"model.{name}={getattr(cfg, name)!r}: the HF families need {value!r}")
    if cfg.moe.num_experts:
        if cfg.moe.router != "mixtral" or cfg.moe.every_k_layers != 1 or cfg.moe.num_shared_experts:
            raise ConfigError(f"model.moe (router={cfg.moe.router!r}, every_k_layers={cfg.moe.every_k_layers}, "
                              f"num_shared_experts={cfg.moe.num_shared_experts}): Mixtral needs router='mixtral', "
                              "every layer MoE and no shared experts")
        return "mixtral"
    return "mistral" if cfg.sliding_window else "llama"


def hf_config(cfg: ModelConfig, *, saved: dict | None = None, torch_dtype: str | None = None) -> dict:
    """config.json for `cfg`: the keys of `saved` (the imported config.json, if any) with every key that
    describes the function replaced by cfg's values."""
    model_type = family(cfg)
    out = dict(saved or {})
    out.update(model_type=model_type, architectures=[FAMILIES[model_type]], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
               hidden_act="silu", rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
               initializer_range=cfg.init_std)
    if model_type != "llama":
        out["sliding_window"] = cfg.sliding_window or None
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.load_balance_coef)
    rope = {"rope_type": {v: k for k, v in _ROPE_TYPES.items()}[cfg.rope_scaling], "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = cfg.max_seq_len
    if cfg.rope_scaling == "yarn":
        rope.update(beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor)
    if "rope_parameters" in out:
        out["rope_parameters"] = {**out["rope_parameters"], **rope}
    else:
        out["rope_theta"] = rope.pop("rope_theta")
        out["rope_scaling"] = None if cfg.rope_scaling == "none" else {**(out.get("rope_scaling") or {}), **rope}
    if "max_position_embeddings" not in out:
        extended = cfg.rope_scaling in ("yarn", "llama3")
        out["max_position_embeddings"] = int(cfg.max_seq_len * (cfg.rope_scaling_factor if extended else 1))
    if torch_dtype:
        out["torch_dtype"] = torch_dtype
    return out

