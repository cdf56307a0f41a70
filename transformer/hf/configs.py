"""Hugging Face config.json <-> `ModelConfig` for the families the library computes exactly.

Llama (1-3, with linear / dynamic / YaRN / llama3 RoPE scaling; attention_bias and mlp_bias), Mistral
(sliding window), Mixtral (top-k experts, softmax over the chosen logits, no capacity drops), Qwen2 (q/k/v
biases; its sliding window on the layers from max_window_layers on, or as `layer_types` says, becomes
model.attention_pattern), GPT-2 (learned absolute positions, LayerNorm, biases on every projection, tanh
GELU, tied output) and DeepSeek-V2 / V2-Lite (model.attention="mla"; dense first_k_dense_replace layers, then
softmax top-k experts, greedy or group-limited, gates times routed_scaling_factor, plus shared experts; YaRN
with DeepSeek's mscale / mscale_all_dim). A config.json option the library cannot compute (an unknown
`model_type`, another activation, router noise, GPT-2's per-layer score scaling, ...) is refused with a ConfigError naming the
field. Keys that do not change the function (token ids, `use_cache`, GPT-2's dropout rates, ...) are kept
in the run directory and written back on export, so an import/export round trip returns the same
config.json.
"""

from __future__ import annotations

from transformer.config import ConfigError, ModelConfig, MoEConfig
from transformer.ops import positions as pos_ops

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "deepseek_v2": "DeepseekV2ForCausalLM"}
NOT_YET = {  # families whose options the library does not have yet
    "deepseek_v3": ("its router (sigmoid scores, groups ranked by the sum of their two best experts, "
                    "e_score_correction_bias) and multi-token-prediction layers"),
}
_DEEPSEEK_LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV2 q_a / kv_a norms use it whatever rms_norm_eps says
_DEEPSEEK_TOPK = {"greedy", "group_limited_greedy"}
_DEEPSEEK_DEFAULTS = dict(first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=64,
                          n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                          moe_intermediate_size=1407, routed_scaling_factor=1.0)  # DeepseekV2Config's
_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic_ntk", "yarn": "yarn", "llama3": "llama3"}
_UNSUPPORTED_IF_TRUE = ("use_qk_norm", "qk_layernorm")
_UNSUPPORTED_IF_NONZERO = ("attention_dropout", "hidden_dropout", "router_jitter_noise")
_GPT2_UNSUPPORTED_IF_TRUE = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_LOCAL, _GLOBAL = "sliding_attention", "full_attention"  # Qwen2's layer_types


def _refuse(field: str, value, why: str) -> ConfigError:
    return ConfigError(f"config.json {field}={value!r}: {why}")


def _deepseek(hf: dict, key: str):
    """hf[key], DeepseekV2Config's default when absent (q_lora_rank may be null: full-rank queries)."""
    return hf.get(key, _DEEPSEEK_DEFAULTS[key])


def _required(hf: dict, key: str):
    if hf.get(key) is None:
        raise _refuse(key, hf.get(key), "is required (the library will not guess it)")
    return hf[key]


def _rope_params(hf: dict) -> dict:
    return {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


def _rope(hf: dict, *, deepseek: bool = False) -> dict:
    """ModelConfig RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x);
    `deepseek` reads DeepSeek's YaRN mscale / mscale_all_dim."""
    params = _rope_params(hf)
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
    for key in ("mscale", "mscale_all_dim"):
        if params.get(key) and not (deepseek and kind == "yarn"):
            raise _refuse(f"rope_scaling.{key}", params[key], "DeepSeek's YaRN variant is read for deepseek_v2 "
                                                              "with rope_type 'yarn' only")
    if params.get("truncate", True) is not True:
        raise _refuse("rope_scaling.truncate", params["truncate"], "the library truncates YaRN's correction range")
    if kind == "yarn":
        mscale, mscale_all_dim = float(params.get("mscale") or 0.0), float(params.get("mscale_all_dim") or 0.0)
        fields.update(yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all_dim)
        default_factor = pos_ops.yarn_rotation_scale(fields["rope_scaling_factor"], mscale, mscale_all_dim)
        if params.get("attention_factor") not in (None, default_factor):
            raise _refuse("rope_scaling.attention_factor", params["attention_factor"],
                          f"the library computes {default_factor} from factor (and DeepSeek's mscales)")
        fields["yarn_beta_fast"] = float(params.get("beta_fast", 32.0))
        fields["yarn_beta_slow"] = float(params.get("beta_slow", 1.0))
    if kind == "llama3":
        fields["llama3_low_freq_factor"] = float(params["low_freq_factor"])
        fields["llama3_high_freq_factor"] = float(params["high_freq_factor"])
    return fields


def _qwen2_layers(hf: dict) -> tuple[int, list[str]]:
    """(window, layer_types) of a Qwen2 config.json: the layers from max_window_layers on slide when
    use_sliding_window, unless `layer_types` lists them."""
    layers = int(hf["num_hidden_layers"])
    window = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window") else 0
    first = int(hf.get("max_window_layers", layers))
    types = hf.get("layer_types") or [_LOCAL if window and i >= first else _GLOBAL for i in range(layers)]
    if len(types) != layers or set(types) - {_LOCAL, _GLOBAL}:
        raise _refuse("layer_types", types, f"give {layers} entries of {_LOCAL!r} / {_GLOBAL!r}")
    if _LOCAL in types and not window:
        raise _refuse("layer_types", types, "has sliding layers but use_sliding_window / sliding_window set none")
    return window, list(types)


def _qwen2_windows(hf: dict) -> dict:
    """sliding_window and attention_pattern (the shortest period of layer_types) of a Qwen2 config.json."""
    window, types = _qwen2_layers(hf)
    layers = len(types)
    if _LOCAL not in types:
        return dict(sliding_window=0)
    if _GLOBAL not in types:
        return dict(sliding_window=window)
    period = next(p for p in range(1, layers + 1) if all(types[i] == types[i % p] for i in range(layers)))
    pattern = ",".join("local" if kind == _LOCAL else "global" for kind in types[:period])
    return dict(sliding_window=window, attention_pattern=pattern)


def _llama_like(hf: dict, model_type: str) -> ModelConfig:
    for key in _UNSUPPORTED_IF_TRUE:
        if hf.get(key):
            raise _refuse(key, hf[key], "the library has no norms there")
    for key in _UNSUPPORTED_IF_NONZERO:
        if hf.get(key):
            raise _refuse(key, hf[key], "must be 0 (the library has no such noise or dropout)")
    if model_type != "llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise _refuse(key, hf[key], f"{FAMILIES[model_type]} has no such biases")
    if model_type != "qwen2" and hf.get("layer_types"):
        raise _refuse("layer_types", hf["layer_types"], "per-layer attention types are read for qwen2 only")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "the gated MLP of these families is SwiGLU ('silu')")
    heads = int(hf["num_attention_heads"])
    moe = MoEConfig()
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        router="mixtral", dropless=True, load_balance_coef=float(hf.get("router_aux_loss_coef", 0.0)),
                        router_z_loss_coef=0.0)
    windows = {"llama": dict(sliding_window=0), "qwen2": _qwen2_windows(hf)}.get(
        model_type, dict(sliding_window=int(hf.get("sliding_window") or 0)))
    attention_bias = {"llama": "all" if hf.get("attention_bias") else "none", "qwen2": "qkv"}.get(model_type, "none")
    return ModelConfig(
        architecture="decoder", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), d_ff=int(hf["intermediate_size"]),
        activation="swiglu", attention_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        norm="rmsnorm", norm_position="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), position="rope",
        init_std=float(hf.get("initializer_range", 0.02)), moe=moe, **windows, **_rope(hf))


def _deepseek_moe(hf: dict, layers: int) -> MoEConfig:
    """MoEConfig of a deepseek_v2 config.json: dense (no experts) when first_k_dense_replace covers every layer."""
    first_dense = int(_deepseek(hf, "first_k_dense_replace") or 0)
    if first_dense >= layers:
        return MoEConfig()
    if int(hf.get("moe_layer_freq", 1)) != 1:
        raise _refuse("moe_layer_freq", hf["moe_layer_freq"], "the library reads 1 (every layer after "
                                                              "first_k_dense_replace is MoE, as transformers builds)")
    if hf.get("norm_topk_prob"):
        raise _refuse("norm_topk_prob", hf["norm_topk_prob"], "transformers' DeepseekV2 ignores it while DeepSeek's "
                                                              "own code renormalises the gates; the library refuses "
                                                              "to guess (V2 and V2-Lite have false)")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise _refuse("scoring_func", hf["scoring_func"], "DeepSeek-V2 routes by softmax")
    method = hf.get("topk_method", "greedy")
    if method not in _DEEPSEEK_TOPK:
        raise _refuse("topk_method", method, f"the library computes {', '.join(sorted(_DEEPSEEK_TOPK))}")
    grouped = method == "group_limited_greedy"
    coef = float(hf.get("aux_loss_alpha") or 0.0)
    seq_aux = bool(hf.get("seq_aux", True))
    return MoEConfig(num_experts=int(_deepseek(hf, "n_routed_experts")),
                     top_k=int(_required(hf, "num_experts_per_tok")), router="softmax_topk", dropless=True,
                     first_dense_layers=first_dense, num_shared_experts=int(_deepseek(hf, "n_shared_experts") or 0),
                     d_ff_expert=int(_deepseek(hf, "moe_intermediate_size")),
                     routed_scale=float(_deepseek(hf, "routed_scaling_factor")),
                     router_groups=int(hf.get("n_group") or 1) if grouped else 1,
                     router_top_groups=int(hf.get("topk_group") or 1) if grouped else 1,
                     load_balance_coef=0.0 if seq_aux else coef, seq_balance_coef=coef if seq_aux else 0.0,
                     router_z_loss_coef=0.0)


def _deepseek_v2(hf: dict) -> ModelConfig:
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(key, hf[key], "the library's MLA and DeepSeek experts have no biases")
    for key in _UNSUPPORTED_IF_NONZERO:
        if hf.get(key):
            raise _refuse(key, hf[key], "must be 0 (the library has no such noise or dropout)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "DeepSeek's MLPs are SwiGLU ('silu')")
    heads = int(hf["num_attention_heads"])
    if int(hf.get("num_key_value_heads") or heads) != heads:
        raise _refuse("num_key_value_heads", hf["num_key_value_heads"], f"MLA expands the latent into every head; "
                                                                        f"give num_attention_heads={heads}")
    eps = float(hf.get("rms_norm_eps", 1e-6))
    if eps != _DEEPSEEK_LATENT_NORM_EPS:
        raise _refuse("rms_norm_eps", eps, f"transformers' DeepseekV2 normalises the q/kv latents with eps "
                                           f"{_DEEPSEEK_LATENT_NORM_EPS} whatever this says; the library uses one "
                                           "model.norm_eps for every norm, so it reads only "
                                           f"{_DEEPSEEK_LATENT_NORM_EPS}")
    layers = int(hf["num_hidden_layers"])
    rope = _rope(hf, deepseek=True)
    if rope["rope_scaling"] == "dynamic_ntk":
        raise _refuse("rope_scaling.rope_type", "dynamic", "MLA's latent cache keeps rotated keys")
    return ModelConfig(
        architecture="decoder", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), num_layers=layers,
        num_heads=heads, d_ff=int(hf["intermediate_size"]), activation="swiglu", norm="rmsnorm", norm_position="pre",
        norm_eps=eps, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), position="rope",
        init_std=float(hf.get("initializer_range", 0.02)), attention="mla",
        kv_lora_rank=int(_deepseek(hf, "kv_lora_rank")), q_lora_rank=int(_deepseek(hf, "q_lora_rank") or 0),
        qk_nope_head_dim=int(_deepseek(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_deepseek(hf, "qk_rope_head_dim")),
        v_head_dim=int(_deepseek(hf, "v_head_dim")),
        moe=_deepseek_moe(hf, layers), **rope)


def _gpt2(hf: dict) -> ModelConfig:
    for key in _GPT2_UNSUPPORTED_IF_TRUE:
        if hf.get(key):
            raise _refuse(key, hf[key], "the library computes GPT-2's plain attention (must be false)")
    if not hf.get("scale_attn_weights", True):
        raise _refuse("scale_attn_weights", hf["scale_attn_weights"], "the library scales scores by 1/sqrt(head width)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _refuse("activation_function", act, f"the library computes {', '.join(_GPT2_ACTIVATIONS)}")
    d_model = int(hf["n_embd"])
    return ModelConfig(
        architecture="decoder", vocab_size=int(hf["vocab_size"]), d_model=d_model, num_layers=int(hf["n_layer"]),
        num_heads=int(hf["n_head"]), d_ff=int(hf.get("n_inner") or 4 * d_model), activation=_GPT2_ACTIVATIONS[act],
        attention_bias="all", mlp_bias=True, norm="layernorm", norm_position="pre",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        position="learned", embed_scale="none", max_seq_len=int(hf["n_positions"]),
        init_std=float(hf.get("initializer_range", 0.02)))


def model_config(hf: dict) -> ModelConfig:
    """The ModelConfig computing what `hf` (a parsed config.json) describes; ConfigError naming the first
    field the library cannot express."""
    model_type = hf.get("model_type")
    if model_type in NOT_YET:
        raise _refuse("model_type", model_type, f"needs {NOT_YET[model_type]}, which the library does not have yet")
    if model_type not in FAMILIES:
        raise _refuse("model_type", model_type, f"supported: {', '.join(FAMILIES)}")
    build = {"gpt2": _gpt2, "deepseek_v2": _deepseek_v2}.get(model_type)
    cfg = build(hf) if build else _llama_like(hf, model_type)
    cfg.validate()
    return cfg


def _require(cfg: ModelConfig, who: str, **required) -> None:
    for name, value in required.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"model.{name}={getattr(cfg, name)!r}: writing {who} needs {value!r}")


def family(cfg: ModelConfig) -> str:
    """The HF model_type that computes `cfg` (ConfigError naming the field otherwise)."""
    from transformer.layers.embed import embed_multiplier

    _require(cfg, "an HF family", architecture="decoder", norm_position="pre")
    if embed_multiplier(cfg) != 1.0:
        raise ConfigError(f"model.embed_scale={cfg.embed_scale!r} scales the token embedding; the HF families "
                          "need 'none'")
    if cfg.attention == "mla":
        _require(cfg, "DeepSeek-V2", norm="rmsnorm", activation="swiglu", mlp_bias=False, sliding_window=0,
                 norm_eps=_DEEPSEEK_LATENT_NORM_EPS)
        moe = cfg.moe
        if moe.num_experts and (moe.router != "softmax_topk" or moe.every_k_layers != 1):
            raise ConfigError(f"model.moe (router={moe.router!r}, every_k_layers={moe.every_k_layers}): DeepSeek-V2 "
                              "needs router='softmax_topk' and every layer after moe.first_dense_layers MoE")
        return "deepseek_v2"
    if cfg.position == "learned":
        _require(cfg, "GPT-2", norm="layernorm", attention_bias="all", mlp_bias=True, kv_heads=cfg.num_heads,
                 dim_per_head=cfg.d_model // cfg.num_heads, sliding_window=0)
        if cfg.activation not in _GPT2_ACTIVATIONS.values() or cfg.moe.num_experts:
            kinds = ", ".join(sorted(set(_GPT2_ACTIVATIONS.values())))
            raise ConfigError(f"model.activation={cfg.activation!r}, model.moe.num_experts={cfg.moe.num_experts}: "
                              f"GPT-2 needs a dense MLP with one of {kinds}")
        return "gpt2"
    _require(cfg, "an HF family (GPT-2: 'learned')", position="rope")
    _require(cfg, "a rotary HF family", norm="rmsnorm", activation="swiglu")
    if cfg.moe.num_experts:
        moe = cfg.moe
        if (moe.router != "mixtral" or moe.every_k_layers != 1 or moe.num_shared_experts or moe.first_dense_layers
                or moe.routed_scale != 1.0):
            raise ConfigError(f"model.moe (router={moe.router!r}, every_k_layers={moe.every_k_layers}, "
                              f"num_shared_experts={moe.num_shared_experts}, first_dense_layers="
                              f"{moe.first_dense_layers}, routed_scale={moe.routed_scale}): Mixtral needs "
                              "router='mixtral', every layer MoE, no shared experts and unscaled gates")
        _require(cfg, "Mixtral", attention_bias="none", mlp_bias=False, attention_pattern="")
        return "mixtral"
    if cfg.attention_bias == "qkv":
        _require(cfg, "Qwen2", mlp_bias=False)
        if _qwen2_layer_types(cfg) is None:
            raise ConfigError(f"model.attention_pattern={cfg.attention_pattern!r}: Qwen2 slides on the layers from "
                              "max_window_layers on, or as layer_types lists, which must fit num_layers")
        return "qwen2"
    if cfg.sliding_window:
        _require(cfg, "Mistral", attention_bias="none", mlp_bias=False, attention_pattern="")
        return "mistral"
    return "llama"


def _qwen2_layer_types(cfg: ModelConfig) -> list[str] | None:
    """Qwen2's layer_types for cfg's windows (None when a layer's window differs from sliding_window)."""
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    if any(w not in (0, cfg.sliding_window) for w in windows):
        return None
    return [_LOCAL if w else _GLOBAL for w in windows]


def _qwen2_window_keys(cfg: ModelConfig, out: dict) -> dict:
    """Nothing when the saved keys describe cfg's windows already; else use_sliding_window, sliding_window and
    max_window_layers (the first sliding layer), plus layer_types when the saved config has them or when the
    sliding layers are not all those from max_window_layers on."""
    types = _qwen2_layer_types(cfg)
    if out.get("model_type") == "qwen2" and out.get("num_hidden_layers") == cfg.num_layers:
        window, saved_types = _qwen2_layers(out)
        if saved_types == types and window == (cfg.sliding_window if _LOCAL in types else window):
            return {}
    keys = dict(use_sliding_window=_LOCAL in types)
    first = types.index(_LOCAL) if _LOCAL in types else cfg.num_layers
    if _LOCAL in types:
        keys.update(sliding_window=cfg.sliding_window, max_window_layers=first)
    if out.get("layer_types") or types != [_GLOBAL] * first + [_LOCAL] * (cfg.num_layers - first):
        keys["layer_types"] = types
    return keys


def hf_config(cfg: ModelConfig, *, saved: dict | None = None, torch_dtype: str | None = None) -> dict:
    """config.json for `cfg`: the keys of `saved` (the imported config.json, if any) with every key that
    describes the function replaced by cfg's values."""
    model_type = family(cfg)
    out = dict(saved or {})
    out.update(model_type=model_type, architectures=[FAMILIES[model_type]], vocab_size=cfg.vocab_size,
               initializer_range=cfg.init_std)
    if model_type == "gpt2":
        out.update(_gpt2_keys(cfg, out))
    elif model_type == "deepseek_v2":
        out.update(_deepseek_keys(cfg, out))
    else:
        out.update(_llama_like_keys(cfg, out, model_type))
    if torch_dtype:
        out["torch_dtype"] = torch_dtype
    return out


def _gpt2_keys(cfg: ModelConfig, out: dict) -> dict:
    act = out.get("activation_function", "gelu_new")
    keys = dict(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps,
                activation_function=act if _GPT2_ACTIVATIONS.get(act) == cfg.activation else
                {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation])
    keys["n_inner"] = None if cfg.ffn_dim == 4 * cfg.d_model and out.get("n_inner") is None else cfg.ffn_dim
    if "n_ctx" in out:
        keys["n_ctx"] = cfg.max_seq_len
    if "tie_word_embeddings" in out or not cfg.tie_embeddings:
        keys["tie_word_embeddings"] = cfg.tie_embeddings
    return keys


def _llama_like_keys(cfg: ModelConfig, out: dict, model_type: str) -> dict:
    keys = dict(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
                hidden_act="silu", rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    if model_type in ("mistral", "mixtral"):
        keys["sliding_window"] = cfg.sliding_window or None
    if model_type == "qwen2":
        keys.update(_qwen2_window_keys(cfg, out))
    if model_type == "llama":
        for name, value in (("attention_bias", cfg.attention_bias == "all"), ("mlp_bias", cfg.mlp_bias)):
            if name in out or value:
                keys[name] = value
    if model_type == "mixtral":
        keys.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                    router_aux_loss_coef=cfg.moe.load_balance_coef)
    return keys | _rope_keys(cfg, out)


def _rope_keys(cfg: ModelConfig, out: dict) -> dict:
    """RoPE keys in the saved config's format (transformers 5 rope_parameters, or rope_theta + rope_scaling),
    DeepSeek's mscales included; max_position_embeddings when the saved config has none."""
    keys = {}
    mscales = {"mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}
    saved = {k: v for k, v in (out.get("rope_parameters") or out.get("rope_scaling") or {}).items() if k not in mscales}
    hf_types = {v: k for k, v in _ROPE_TYPES.items()}
    if cfg.rope_scaling not in hf_types:
        raise ConfigError(f"model.rope_scaling={cfg.rope_scaling!r}: no Hugging Face rope_type computes it; use one of "
                          f"{', '.join(hf_types)}")
    type_key = "type" if "type" in saved and "rope_type" not in saved else "rope_type"  # as the saved config has it
    rope = {type_key: hf_types[cfg.rope_scaling], "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = cfg.max_seq_len
    if cfg.rope_scaling == "yarn":
        rope.update(beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        rope.update({k: v for k, v in mscales.items() if v})
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor)
    if "rope_parameters" in out:
        keys["rope_parameters"] = {**saved, **rope}
    else:
        keys["rope_theta"] = rope.pop("rope_theta")
        keys["rope_scaling"] = None if cfg.rope_scaling == "none" else {**saved, **rope}
    if "max_position_embeddings" not in out:
        extended = cfg.rope_scaling in ("yarn", "llama3")
        keys["max_position_embeddings"] = int(cfg.max_seq_len * (cfg.rope_scaling_factor if extended else 1))
    return keys


def _deepseek_keys(cfg: ModelConfig, out: dict) -> dict:
    moe = cfg.moe
    keys = dict(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, hidden_act="silu",
                rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, kv_lora_rank=cfg.kv_lora_rank,
                q_lora_rank=cfg.q_lora_rank or None, qk_nope_head_dim=cfg.nope_dim, qk_rope_head_dim=cfg.rope_dim,
                v_head_dim=cfg.value_dim, attention_bias=False)
    if not moe.num_experts:
        return keys | _rope_keys(cfg, out) | dict(first_k_dense_replace=cfg.num_layers)
    grouped = moe.router_groups > 1
    keys.update(first_k_dense_replace=moe.first_dense_layers, moe_layer_freq=1, n_routed_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared_experts,
                moe_intermediate_size=moe.d_ff_expert or cfg.ffn_dim, routed_scaling_factor=moe.routed_scale,
                norm_topk_prob=False, scoring_func="softmax")
    saved_grouped = out.get("topk_method") == "group_limited_greedy"
    if grouped or not saved_grouped or (out.get("n_group") or 1) > 1:  # else: grouped in name only, kept as saved
        keys["topk_method"] = "group_limited_greedy" if grouped else "greedy"
        if grouped or "n_group" in out:
            keys.update(n_group=moe.router_groups, topk_group=moe.router_top_groups)
    coef = moe.seq_balance_coef or moe.load_balance_coef
    if coef or out.get("aux_loss_alpha"):
        keys.update(aux_loss_alpha=coef, seq_aux=bool(moe.seq_balance_coef))
    return keys | _rope_keys(cfg, out)
