"""Typed, frozen configuration with validation, presets and `a.b=value` overrides.

Every run is described by one `Config`. Build it from a preset and command-line
overrides:

    cfg = config_from_args(["--preset", "tiny", "model.d_model=128", "optim.lr=1e-3"])
    cfg = config_from_args(["--config", "experiments/configs/moe_kjv.py", "steps=100"])

`validate()` raises `ConfigError` with one line naming the bad field and what
would be valid; nothing is compiled before the config is valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value: Any, valid: tuple) -> None:
    _check(value in valid, f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def described(default: Any, help: str):
    """A dataclass field with a one-line meaning that `--help` prints (`describe_fields`); a class as `default`
    is a nested config made by its default factory."""
    if isinstance(default, type):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "t5_bias", "nope")
ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
ATTENTION_BIASES = ("none", "qkv", "all")
ATTENTION_KINDS = ("local", "global")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ARCHITECTURES = ("decoder", "encoder", "encoder_decoder")
ATTENTION_KERNELS = ("auto", "reference", "blockwise", "cudnn")
ATTENTIONS = ("mha", "mla")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
ROUTERS = ("softmax_topk", "switch", "mixtral", "expert_choice", "sigmoid_bias")
DATASETS = ("kjv", "text", "npy", "copy", "associative_recall", "passkey", "reverse", "sort", "pairs")
CORPORA = ("kjv", "text", "npy")
SEQ2SEQ_DATASETS = ("pairs", "copy", "reverse", "sort")
OBJECTIVES = ("auto", "next_token", "mlm", "span_corruption", "seq2seq")
OBJECTIVE_DATASETS = {"next_token": DATASETS, "mlm": CORPORA, "span_corruption": CORPORA, "seq2seq": SEQ2SEQ_DATASETS}
ARCHITECTURE_OBJECTIVES = {"decoder": ("next_token",), "encoder": ("mlm",),
                           "encoder_decoder": ("span_corruption", "seq2seq")}
DATA, FSDP, SEQUENCE, TENSOR, EXPERT = "data", "fsdp", "sequence", "tensor", "expert"  # mesh axis names
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR, EXPERT)


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts FFN. `num_experts=0` means dense MLPs everywhere."""

    num_experts: int = described(0, "experts per MoE layer; 0: dense MLPs everywhere")
    every_k_layers: int = described(1, "layer i is MoE when (i + 1) % every_k_layers == 0")
    first_dense_layers: int = described(0, "the first N layers of a stack keep the dense MLP (DeepSeek's "
                                        "first_k_dense_replace); they run unscanned before the scanned groups")
    top_k: int = described(2, "experts per token (expert_choice: sets the capacity)")
    router: str = described("softmax_topk", f"router: {', '.join(ROUTERS)}")
    capacity_factor: float = described(1.25, "an expert takes ceil(capacity_factor * L * top_k / E) tokens per row")
    dropless: bool = described(False, "no capacity: every assignment runs (ragged_dot); expert_choice ignores it")
    routed_scale: float = described(1.0, "routed experts' gate weights are multiplied by this (DeepSeek's "
                                    "routed_scaling_factor)")
    router_groups: int = described(1, "softmax_topk: experts form this many equal groups; a token picks its top_k "
                                   "only inside its router_top_groups best groups, ranked by their best expert "
                                   "(DeepSeek-V2's group_limited_greedy); 1: no grouping")
    router_top_groups: int = described(1, "groups a token may route into (with router_groups > 1)")
    num_shared_experts: int = described(0, "experts every token passes through besides its routed ones")
    d_ff_expert: int = described(0, "hidden size of each expert; 0: model.d_ff")
    load_balance_coef: float = described(1e-2, "coefficient of the Switch load-balancing loss")
    router_z_loss_coef: float = described(1e-3, "coefficient of the router z-loss (squared logsumexp of logits)")
    seq_balance_coef: float = described(0.0, "coefficient of the balancing loss computed per sequence")
    bias_update_rate: float = described(1e-3, "router='sigmoid_bias': bias step per micro-batch (loss-free balancing)")

    def validate(self) -> None:
        for name, value in vars(self).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"moe.{name}={value} must be a finite number")
        _check(self.num_experts >= 0, f"moe.num_experts={self.num_experts} must be >= 0")
        if self.num_experts == 0:
            return
        _one_of("moe.router", self.router, ROUTERS)
        _check(self.every_k_layers >= 1, f"moe.every_k_layers={self.every_k_layers} must be >= 1")
        top_k_max = self.num_experts
        _check(1 <= self.top_k <= top_k_max,
               f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
        if self.router == "switch":
            _check(self.top_k == 1, f"moe.top_k={self.top_k} must be 1 for router='switch'")
        _check(self.first_dense_layers >= 0, f"moe.first_dense_layers={self.first_dense_layers} must be >= 0")
        _check(self.routed_scale > 0, f"moe.routed_scale={self.routed_scale} must be > 0")
        if self.router == "expert_choice":
            _check(self.routed_scale == 1.0, f"moe.routed_scale={self.routed_scale} is not read by "
                                             "router='expert_choice'; leave it at 1")
        self._check_groups()
        _check(self.capacity_factor > 0, f"moe.capacity_factor={self.capacity_factor} must be > 0")
        _check(self.num_shared_experts >= 0, f"moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        _check(self.d_ff_expert >= 0, f"moe.d_ff_expert={self.d_ff_expert} must be >= 0")
        for name in ("load_balance_coef", "router_z_loss_coef", "seq_balance_coef", "bias_update_rate"):
            _check(getattr(self, name) >= 0, f"moe.{name}={getattr(self, name)} must be >= 0")

    def _check_groups(self) -> None:
        groups, top = self.router_groups, self.router_top_groups
        _check(groups >= 1, f"moe.router_groups={groups} must be >= 1")
        if groups == 1:
            _check(top == 1, f"moe.router_top_groups={top} needs moe.router_groups > 1")
            return
        _check(self.router == "softmax_topk", f"moe.router_groups={groups} is read by router='softmax_topk' only, "
                                              f"not {self.router!r}")
        _check(self.num_experts % groups == 0,
               f"moe.num_experts={self.num_experts} is not divisible by moe.router_groups={groups}")
        _check(1 <= top <= groups, f"moe.router_top_groups={top} must be in [1, moe.router_groups={groups}]")
        _check(self.top_k <= top * (self.num_experts // groups),
               f"moe.top_k={self.top_k} exceeds the {top * (self.num_experts // groups)} experts of "
               f"moe.router_top_groups={top} groups")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = described("decoder", f"{', '.join(ARCHITECTURES)}")
    vocab_size: int = described(259, "token ids; 259 = 256 bytes + pad, bos, eos (the byte tokenizer)")
    d_model: int = described(256, "width of the residual stream")
    num_layers: int = described(4, "transformer blocks (the decoder's, for encoder_decoder)")
    num_encoder_layers: int = described(0, "encoder blocks of encoder_decoder; 0: num_layers")
    num_heads: int = described(4, "query heads")
    num_kv_heads: int = described(0, "key/value heads; 0: num_heads (MHA), 1: MQA, otherwise GQA")
    head_dim: int = described(0, "width of each head; 0: d_model // num_heads")
    d_ff: int = described(0, "MLP hidden size; 0: 4 * d_model (swiglu: 8/3 * d_model rounded up to 64)")
    activation: str = described("swiglu", "MLP activation: relu, gelu (exact, erf), gelu_tanh (tanh approximation), "
                                "swiglu")
    attention_bias: str = described("none", "biases of the attention projections: none, qkv (q, k and v: Qwen2), "
                                    "all (q, k, v and output: GPT-2, Llama's attention_bias)")
    mlp_bias: bool = described(False, "biases on every MLP projection (dense MLPs, shared and routed experts)")
    norm: str = described("rmsnorm", f"{', '.join(NORMS)}")
    norm_position: str = described("pre", f"norm before or after each sub-layer: {', '.join(NORM_POSITIONS)}")
    norm_eps: float = described(1e-6, "epsilon of the norms")
    tie_embeddings: bool = described(True, "output projection shares the token embedding matrix")
    max_seq_len: int = described(512, "learned positions: table size; RoPE scaling: the original context length")
    position: str = described("rope", f"positional encoding: {', '.join(POSITIONS)} (t5_bias: T5's learned "
                              "relative-position bias, one table per layer stack)")
    embed_scale: str = described("auto", "token embedding multiplier before absolute positions are added: "
                                 "sqrt_d, none, or auto (sqrt_d for sinusoidal and learned, else none)")
    rope_theta: float = described(10000.0, "RoPE base frequency")
    rope_scaling: str = described("none", f"RoPE context extension: {', '.join(ROPE_SCALINGS)}")
    rope_scaling_factor: float = described(1.0, "target context / max_seq_len for rope_scaling (>= 1)")
    yarn_beta_fast: float = described(32.0, "YaRN: rotations above which a frequency is not interpolated")
    yarn_beta_slow: float = described(1.0, "YaRN: rotations below which a frequency is fully interpolated")
    yarn_mscale: float = described(0.0, "DeepSeek's YaRN (mla, with yarn_mscale_all_dim): the rotated q and k "
                                   "parts scale by m(yarn_mscale) / m(yarn_mscale_all_dim), m(a) = 0.1 a ln(factor) "
                                   "+ 1; 0: YaRN's m(1)")
    yarn_mscale_all_dim: float = described(0.0, "DeepSeek's YaRN, mla only: scores scale by m(yarn_mscale_all_dim)^2 "
                                           "besides 1/sqrt(width); 0: off")
    llama3_low_freq_factor: float = described(1.0, "llama3: wavelengths above max_seq_len / this are interpolated")
    llama3_high_freq_factor: float = described(4.0, "llama3: wavelengths below max_seq_len / this are kept")
    relative_buckets: int = described(32, "t5_bias: buckets of key - query offsets (bidirectional layers: half "
                                      "per sign); half of one sign's are exact, the rest logarithmic")
    relative_max_distance: int = described(128, "t5_bias: offsets at least this far share the last bucket")
    sliding_window: int = described(0, "keys each query sees (local attention); 0: full attention")
    attention_pattern: str = described("", "per-layer attention: a comma list of local, global repeated over the "
                                       "layers (layer i takes entry i mod its length); local layers keep "
                                       "sliding_window, global ones attend to everything; '': every layer alike")
    attention_kernel: str = described("auto", f"{', '.join(ATTENTION_KERNELS)} (auto picks per platform and mask)")
    attention_block_size: int = described(512, "query/key tile of blockwise and ring attention")
    attention: str = described("mha", f"{', '.join(ATTENTIONS)}: mha (MHA/GQA/MQA by num_kv_heads) or mla "
                               "(DeepSeek-V2 multi-head latent attention, layers.latent_attention)")
    kv_lora_rank: int = described(0, "mla: width d_c of the joint key/value latent (what the cache holds)")
    q_lora_rank: int = described(0, "mla: width d_c' of the query latent; 0: full-rank queries")
    qk_nope_head_dim: int = described(0, "mla: per-head query/key width without RoPE; 0: dim_per_head")
    qk_rope_head_dim: int = described(0, "mla: width of the RoPE query/key part (the key part is shared by all "
                                      "heads); 0: dim_per_head // 2")
    v_head_dim: int = described(0, "mla: per-head value width; 0: dim_per_head")
    scan_layers: bool = described(True, "jax.lax.scan over stacked layers (false: unrolled, longer compile)")
    remat: str = described("none", f"activation recomputation in backward: {', '.join(REMAT_POLICIES)}")
    dtype: str = described("float32", f"compute dtype: {', '.join(DTYPES)}")
    param_dtype: str = described("float32", f"dtype parameters are stored and updated in: {', '.join(DTYPES)}")
    init_std: float = described(0.02, "standard deviation of the normal weight initialisation")
    moe: MoEConfig = described(MoEConfig, "mixture of experts (model.moe.*)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def nope_dim(self) -> int:
        """mla: the per-head query/key width without RoPE."""
        return self.qk_nope_head_dim or self.dim_per_head

    @property
    def rope_dim(self) -> int:
        """The width RoPE rotates: the head width, or with mla the decoupled RoPE part."""
        if self.attention == "mla":
            return self.qk_rope_head_dim or self.dim_per_head // 2
        return self.dim_per_head

    @property
    def value_dim(self) -> int:
        """Per-head value width: the head width, or mla's v_head_dim."""
        return (self.v_head_dim or self.dim_per_head) if self.attention == "mla" else self.dim_per_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * -(-(8 * self.d_model // 3) // 64)
        return 4 * self.d_model

    @property
    def causal(self) -> bool:
        """Whether the trained attention is causal (next-token decoders, the encoder-decoder's decoder); the
        encoder-only model's is bidirectional."""
        return self.architecture != "encoder"

    @property
    def encoder_layers(self) -> int:
        return self.num_encoder_layers or self.num_layers

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """attention_pattern's entries ("local" / "global"); () when every layer attends alike."""
        return tuple(kind.strip() for kind in self.attention_pattern.split(",")) if self.attention_pattern else ()

    def layer_window(self, layer: int) -> int:
        """The sliding window of layer `layer` of a stack (0: full attention)."""
        kinds = self.attention_kinds
        if kinds and kinds[layer % len(kinds)] == "global":
            return 0
        return self.sliding_window

    @property
    def layer_group_size(self) -> int:
        """Blocks per scanned layer group: a multiple of moe.every_k_layers (the MoE layers) and of the attention
        pattern's length, so every group holds the same blocks."""
        every_k = self.moe.every_k_layers if self.moe.num_experts else 1
        return math.lcm(every_k, len(self.attention_kinds) or 1)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` of a stack has the MoE FFN: (layer + 1) % moe.every_k_layers == 0, past the
        moe.first_dense_layers."""
        moe = self.moe
        return moe.num_experts > 0 and layer >= moe.first_dense_layers and (layer + 1) % moe.every_k_layers == 0

    @property
    def lead_layers(self) -> int:
        """Layers before the scanned groups (moe.first_dense_layers: dense, unlike the groups)."""
        return self.moe.first_dense_layers if self.moe.num_experts else 0

    def validate(self) -> None:
        for name, value in vars(self).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"model.{name}={value} must be a finite number")
        _one_of("model.architecture", self.architecture, ARCHITECTURES)
        _one_of("model.position", self.position, POSITIONS)
        _one_of("model.embed_scale", self.embed_scale, ("auto", "sqrt_d", "none"))
        _one_of("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _one_of("model.attention_bias", self.attention_bias, ATTENTION_BIASES)
        _one_of("model.norm", self.norm, NORMS)
        _one_of("model.norm_position", self.norm_position, NORM_POSITIONS)
        _one_of("model.attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _one_of("model.remat", self.remat, REMAT_POLICIES)
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.param_dtype", self.param_dtype, DTYPES)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len", "attention_block_size"):
            _check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        for name in ("num_kv_heads", "head_dim", "d_ff", "sliding_window", "num_encoder_layers"):
            _check(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0")
        _check(self.num_heads % self.kv_heads == 0,
               f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}; "
               f"valid kv head counts divide {self.num_heads}")
        if not self.head_dim:
            _check(self.d_model % self.num_heads == 0,
                   f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                   "set model.head_dim or change the head count")
        if self.position == "rope":
            _check(self.dim_per_head % 2 == 0,
                   f"head dim {self.dim_per_head} is odd; RoPE (model.position='rope') needs an even head dim")
            _check(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
        if self.position == "sinusoidal":
            _check(self.d_model % 2 == 0, f"model.d_model={self.d_model} must be even for sinusoidal positions")
        if self.position == "t5_bias":
            least = 2 if self.architecture == "decoder" else 4  # a bidirectional layer halves them per sign
            _check(self.relative_buckets >= least,
                   f"model.relative_buckets={self.relative_buckets} must be >= {least} for model.position='t5_bias' "
                   f"with model.architecture={self.architecture!r} (at least one exact bucket per sign)")
            exact = self.relative_buckets // (4 if self.architecture == "encoder" else 2)  # most of any layer
            _check(self.relative_max_distance > exact,
                   f"model.relative_max_distance={self.relative_max_distance} must be > {exact}, the offsets "
                   f"model.relative_buckets={self.relative_buckets} hold exactly")
        if self.rope_scaling != "none":
            _check(self.position == "rope",
                   f"model.rope_scaling={self.rope_scaling!r} needs model.position='rope', not {self.position!r}")
            _check(self.rope_scaling_factor >= 1.0,
                   f"model.rope_scaling_factor={self.rope_scaling_factor} must be >= 1")
        self._check_attention_pattern()
        self._check_latent_attention()
        self._check_yarn_mscale()
        _check(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        self.moe.validate()
        if self.moe.num_experts:
            stack = min(self.num_layers, self.encoder_layers) if self.architecture == "encoder_decoder" \
                else self.num_layers
            _check(any(self.is_moe_layer(layer) for layer in range(stack)),
                   f"moe.first_dense_layers={self.moe.first_dense_layers} with moe.every_k_layers="
                   f"{self.moe.every_k_layers} leaves no MoE layer in a stack of {stack}; give fewer dense layers, "
                   "or set moe.num_experts=0 for a dense model")

    def _check_latent_attention(self) -> None:
        _one_of("model.attention", self.attention, ATTENTIONS)
        names = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in names:
            _check(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0")
        if self.attention != "mla":
            for name in names:
                _check(getattr(self, name) == 0, f"model.{name}={getattr(self, name)} is for model.attention='mla'; "
                                                 f"set it to 0 or set model.attention='mla'")
            return
        _check(self.kv_lora_rank > 0, f"model.kv_lora_rank={self.kv_lora_rank} must be > 0 with model.attention='mla' "
                                      "(the width of the cached key/value latent)")
        _check(self.position == "rope", f"model.attention='mla' needs model.position='rope' (its decoupled RoPE key), "
                                        f"not {self.position!r}")
        _check(self.rope_dim % 2 == 0, f"model.qk_rope_head_dim={self.rope_dim} must be even (RoPE rotates pairs)")
        _check(self.rope_scaling != "dynamic_ntk",
               "model.rope_scaling='dynamic_ntk' is not supported with model.attention='mla' (the latent cache keeps "
               "rotated keys); use none, linear, ntk, yarn or llama3")
        _check(self.num_kv_heads == 0, f"model.num_kv_heads={self.num_kv_heads} means nothing with "
                                       "model.attention='mla' (keys/values come from one shared latent); set it to 0")
        _check(self.attention_bias == "none", f"model.attention_bias={self.attention_bias!r} is not supported with "
                                              "model.attention='mla'; set it to 'none'")
        _check(self.architecture != "encoder_decoder", "model.attention='mla' is not supported with "
                                                       "model.architecture='encoder_decoder' (cross-attention)")

    def _check_yarn_mscale(self) -> None:
        for name in ("yarn_mscale", "yarn_mscale_all_dim"):
            value = getattr(self, name)
            _check(value >= 0, f"model.{name}={value} must be >= 0")
            _check(value == 0 or self.rope_scaling == "yarn",
                   f"model.{name}={value} is read by model.rope_scaling='yarn' only, not {self.rope_scaling!r}")
        _check(self.yarn_mscale_all_dim == 0 or self.attention == "mla",
               f"model.yarn_mscale_all_dim={self.yarn_mscale_all_dim} (DeepSeek's score scale) is read by "
               "model.attention='mla' only")
        _check(self.yarn_mscale == 0 or self.yarn_mscale_all_dim > 0,
               f"model.yarn_mscale={self.yarn_mscale} acts only with model.yarn_mscale_all_dim > 0 (as in DeepSeek's "
               "YaRN); set both, or leave it 0")

    def _check_attention_pattern(self) -> None:
        kinds = self.attention_kinds
        if not kinds:
            return
        name = f"model.attention_pattern={self.attention_pattern!r}"
        for kind in kinds:
            _check(kind in ATTENTION_KINDS, f"{name} has entry {kind!r}; write a comma list of 'local' and 'global'")
        _check(len(kinds) <= self.num_layers,
               f"{name} has {len(kinds)} entries, more than model.num_layers={self.num_layers}; it repeats over the "
               "layers, so give at most one entry per layer")
        if "local" in kinds:
            _check(self.sliding_window > 0, f"{name} has local layers: set model.sliding_window > 0, their window")
        else:
            _check(self.sliding_window == 0, f"{name} has no local layer, so model.sliding_window="
                                             f"{self.sliding_window} would be unused; set it to 0 or add 'local'")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means 'all remaining devices' (at most one axis)."""

    data: int = described(-1, "pure data parallel: batch split, parameters replicated")
    fsdp: int = described(1, "batch split, parameters and optimizer state sharded (ZeRO-3)")
    sequence: int = described(1, "sequence split, attention as Ring Attention (zigzag order)")
    tensor: int = described(1, "heads, MLP hidden and vocab split (Megatron)")
    expert: int = described(1, "MoE experts split (all-to-all); a batch axis elsewhere")

    @property
    def shape(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def resolved(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; raises ConfigError if they do not fit `num_devices`."""
        self.validate()
        sizes = self.shape
        fixed = math.prod(size for size in sizes.values() if size != -1)
        free = [axis for axis, size in sizes.items() if size == -1]
        if free:
            _check(num_devices % fixed == 0,
                   f"mesh {sizes} needs a device count divisible by {fixed}, but there are {num_devices} devices")
            sizes[free[0]] = num_devices // fixed
        total = math.prod(sizes.values())
        _check(total == num_devices,
               f"mesh {sizes} uses {total} devices but {num_devices} are available; "
               "axis sizes must multiply to the device count (use -1 for one axis to take the rest)")
        return sizes

    def validate(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            _check(size == -1 or size >= 1, f"mesh.{axis}={size} must be -1 or >= 1")
        _check(sum(getattr(self, a) == -1 for a in MESH_AXES) <= 1,
               f"mesh {self.shape}: at most one axis may be -1")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = described("kjv", f"{', '.join(DATASETS)}")
    paths: tuple[str, ...] = described((), "comma-separated text files/dirs ('text'), .npy token files ('npy') or "
                                       ".jsonl files of {\"source\": ..., \"target\": ...} lines ('pairs')")
    seq_len: int = described(256, "tokens per training row (an encoder_decoder's source length)")
    global_batch_size: int = described(16, "rows per step over all devices and micro-batches")
    eval_fraction: float = described(0.02, "tail of the corpus held out for evaluation")
    seed: int = described(0, "seed of the order of training windows, of synthetic examples and of the MLM "
                          "masks and span corruption")
    tokenizer: str = described("bytes", "how the kjv and text corpora and text prompts become ids: bytes, hf:PATH "
                               "(a tokenizer.json or its folder) or sentencepiece:PATH (a .model file)")
    objective: str = described("auto", "next_token, mlm, span_corruption, seq2seq; auto: next_token (decoder), "
                               "mlm (encoder), encoder_decoder: seq2seq on pairs/copy/reverse/sort, else "
                               "span_corruption")
    target_len: int = described(0, "decoder tokens per row of encoder_decoder; 0: derived (span corruption's "
                                "targets, or copy_length + 1, rounded up to a multiple of 8; pairs: seq_len)")
    mask_rate: float = described(0.15, "mlm: fraction of a row's tokens selected (80% MASK, 10% random, 10% kept)")
    noise_density: float = described(0.15, "span_corruption: fraction of a window's tokens corrupted")
    mean_span_length: float = described(3.0, "span_corruption: mean length of a corrupted span")
    # synthetic tasks
    copy_length: int = described(32, "copy, reverse, sort tasks: random bytes per example")
    num_pairs: int = described(16, "associative recall: key-value pairs per row")
    passkey_digits: int = described(5, "passkey task: digits of the key")

    def validate(self) -> None:
        for name, value in vars(self).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"data.{name}={value} must be a finite number")
        _one_of("data.dataset", self.dataset, DATASETS)
        _check(self.seq_len > 1, f"data.seq_len={self.seq_len} must be > 1")
        _check(self.global_batch_size >= 1, f"data.global_batch_size={self.global_batch_size} must be >= 1")
        _check(0.0 < self.eval_fraction < 1.0, f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.dataset in ("text", "npy", "pairs"):
            _check(len(self.paths) > 0, f"data.dataset={self.dataset!r} needs data.paths=<file or directory,...>")
        _one_of("data.objective", self.objective, OBJECTIVES)
        _check(self.target_len >= 0, f"data.target_len={self.target_len} must be >= 0 (0: derived)")
        _check(0.0 < self.mask_rate < 1.0, f"data.mask_rate={self.mask_rate} must be in (0, 1)")
        _check(0.0 < self.noise_density < 1.0, f"data.noise_density={self.noise_density} must be in (0, 1)")
        _check(self.mean_span_length >= 1.0, f"data.mean_span_length={self.mean_span_length} must be >= 1")
        if self.objective != "auto":
            self._check_dataset_fits(self.objective)

    def resolve_objective(self, architecture: str) -> str:
        """data.objective, with 'auto' resolved by `architecture` (model.architecture)."""
        if self.objective != "auto":
            return self.objective
        if architecture == "encoder_decoder":
            return "seq2seq" if self.dataset in SEQ2SEQ_DATASETS else "span_corruption"
        return "mlm" if architecture == "encoder" else "next_token"

    def check_architecture(self, architecture: str) -> str:
        """The objective for `architecture`; ConfigError unless it and data.dataset can train that architecture."""
        _one_of("model.architecture", architecture, ARCHITECTURES)
        objective = self.resolve_objective(architecture)
        valid = ARCHITECTURE_OBJECTIVES[architecture]
        _check(objective in valid, f"data.objective={objective!r} cannot train model.architecture={architecture!r}; "
                                   f"use {' or '.join(map(repr, valid + ('auto',)))}")
        usable = tuple(name for option in valid for name in OBJECTIVE_DATASETS[option])
        _check(self.dataset in usable, f"data.dataset={self.dataset!r} cannot train model.architecture="
                                       f"{architecture!r}; choose one of {', '.join(map(repr, usable))}")
        self._check_dataset_fits(objective)
        return objective

    def _check_dataset_fits(self, objective: str) -> None:
        usable = OBJECTIVE_DATASETS[objective]
        _check(self.dataset in usable, f"data.dataset={self.dataset!r} cannot be used with data.objective="
                                       f"{objective!r}; choose one of {', '.join(map(repr, usable))}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = described(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = described(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = described(100, "linear warmup steps")
    weight_decay: float = described(0.1, "AdamW decoupled weight decay of matrices (not norms, biases)")
    b1: float = described(0.9, "AdamW first-moment decay")
    b2: float = described(0.95, "AdamW second-moment decay")
    eps: float = described(1e-8, "AdamW denominator epsilon")
    clip_norm: float = described(1.0, "clip gradients to this global norm; 0: no clipping")
    grad_accum_steps: int = described(1, "micro-batches per step (divides global_batch_size)")
    z_loss: float = described(0.0, "coefficient of log(Z)^2 on the output softmax")

    def validate(self) -> None:
        for name, value in vars(self).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"optim.{name}={value} must be a finite number")
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(self.eps > 0, f"optim.eps={self.eps} must be > 0 (the AdamW denominator's epsilon)")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optim.b1={self.b1}, optim.b2={self.b2} must be in [0, 1)")
        _check(self.clip_norm >= 0, f"optim.clip_norm={self.clip_norm} must be >= 0")
        _check(self.grad_accum_steps >= 1, f"optim.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        _check(self.z_loss >= 0, f"optim.z_loss={self.z_loss} must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = described(500, "save every this many steps; 0: not on a step interval")
    every_seconds: float = described(0.0, "save every this many seconds; 0: not on a wall-clock interval")
    keep_last: int = described(3, "checkpoints kept")
    keep_every: int = described(0, "also keep every step divisible by this for good; 0: none")
    async_save: bool = described(True, "write checkpoints in the background while training continues")
    init_from: str = described("", "start a new run from the params of this run dir or checkpoint")

    def validate(self) -> None:
        for name, value in vars(self).items():
            _check(not isinstance(value, float) or math.isfinite(value),
                   f"checkpoint.{name}={value} must be a finite number")
        _check(self.every_steps >= 0, f"checkpoint.every_steps={self.every_steps} must be >= 0")
        _check(self.every_seconds >= 0, f"checkpoint.every_seconds={self.every_seconds} must be >= 0")
        _check(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")
        _check(self.keep_every >= 0, f"checkpoint.keep_every={self.keep_every} must be >= 0")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QUANTIZED_BASES = ("none", "int8")
LORA_GROUPS = {"mlp": ("gate", "up", "down"), "attention": ("q", "k", "v", "o")}


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters y = x W + (alpha / rank) * dropout(x) A B on chosen projections, the base frozen."""

    rank: int = described(0, "adapter rank r; 0: no adapters (full fine-tuning or pre-training)")
    alpha: float = described(16.0, "adapters are scaled by alpha / rank")
    targets: str = described("q,v", "projections to adapt, comma-separated: " + ", ".join(LORA_TARGETS)
                             + "; mlp = gate,up,down; attention = q,k,v,o (dense MLPs and MoE shared experts; "
                             "routed experts are not adapted)")
    dropout: float = described(0.0, "dropout rate on the adapter input while training")
    quantize_base: str = described("none", "frozen base projection weights (the adaptable ones and routed experts; "
                                   "not embeddings, norms, routers or MLA's latent down-projections): none (float) "
                                   "or int8 (QLoRA-style: per-output-feature absmax scales, dequantized on the fly; "
                                   "needs model.remat other than none, so the backward recomputes them)")

    @property
    def target_names(self) -> tuple[str, ...]:
        """The adapted projections, groups expanded, in LORA_TARGETS order."""
        names = set()
        for part in (p.strip() for p in self.targets.split(",")):
            names.update(LORA_GROUPS.get(part, (part,)) if part else ())
        return tuple(name for name in LORA_TARGETS if name in names)

    def validate(self) -> None:
        _check(self.rank >= 0, f"lora.rank={self.rank} must be >= 0")
        _check(math.isfinite(self.alpha) and self.alpha > 0, f"lora.alpha={self.alpha} must be a finite number > 0")
        _check(0 <= self.dropout < 1, f"lora.dropout={self.dropout} must be in [0, 1)")
        valid = (*LORA_TARGETS, *LORA_GROUPS)
        parts = [p.strip() for p in self.targets.split(",") if p.strip()]
        unknown = [p for p in parts if p not in valid]
        if unknown:
            raise ConfigError(f"lora.targets={self.targets!r}: {unknown[0]!r} is not a projection; choose from "
                              f"{', '.join(valid)}")
        _check(bool(parts), f"lora.targets={self.targets!r} names no projection; choose from {', '.join(valid)}")
        _one_of("lora.quantize_base", self.quantize_base, QUANTIZED_BASES)
        _check(self.quantize_base == "none" or self.rank > 0,
               f"lora.quantize_base={self.quantize_base!r} quantizes a frozen base; it needs lora.rank > 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = described(ModelConfig, "the network (model.*)")
    mesh: MeshConfig = described(MeshConfig, "device mesh axis sizes (mesh.*)")
    data: DataConfig = described(DataConfig, "dataset and batch (data.*)")
    optim: OptimConfig = described(OptimConfig, "optimizer (optim.*)")
    checkpoint: CheckpointConfig = described(CheckpointConfig, "checkpoints (checkpoint.*)")
    lora: LoRAConfig = described(LoRAConfig, "low-rank adapters on a frozen base (lora.*)")
    run_dir: str = described("runs/default", "directory of the run: config, checkpoints, logs; rerunning resumes")
    steps: int = described(1000, "optimizer steps")
    seed: int = described(0, "seed of parameter init, the training RNG and the end sample")
    log_every: int = described(10, "log metrics every this many steps")
    eval_every: int = described(200, "held-out eval every this many steps; 0: none")
    eval_batches: int = described(8, "batches per held-out eval")
    loss_chunk_size: int = described(0, "output projection + loss in chunks of this many tokens; 0: at once")
    nan_guard: bool = described(True, "stop at a non-finite loss, keeping the last good checkpoint")
    progress_bar: bool = described(True, "tqdm progress bar")
    tensorboard: bool = described(True, "also write TensorBoard logs")
    synchronous: bool = described(False, "read each step's metrics before dispatching the next")
    profile_steps: tuple[int, ...] = described((), "START,END: profile steps START+1..END into run_dir/profile")
    compilation_cache_dir: str = described("jax_cache", "compilation cache; a relative path is under run_dir; '': none")
    sample_tokens: int = described(0, "train's CLI ends by printing this many generated tokens; 0: none")
    sample_prompt: str = described("And God said", "text the end-of-training sample continues")

    def validate(self) -> "Config":
        self.model.validate()
        self.mesh.validate()
        self.data.validate()
        self.optim.validate()
        self.checkpoint.validate()
        self.lora.validate()
        _check(self.lora.rank == 0 or bool(self.checkpoint.init_from),
               f"lora.rank={self.lora.rank} needs checkpoint.init_from=<base run dir>: adapters fine-tune a trained "
               "base, whose weights the run's checkpoints do not hold")
        _check(self.lora.quantize_base == "none" or self.model.remat != "none",
               f"lora.quantize_base={self.lora.quantize_base!r} with model.remat='none' would keep a float copy of "
               "every dequantized weight for the backward pass; set model.remat=dots_saveable (or full) so it is "
               "recomputed from the int8 values")
        _check(self.steps >= 0, f"steps={self.steps} must be >= 0")
        _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
        _check(self.eval_batches >= 1, f"eval_batches={self.eval_batches} must be >= 1")
        _check(self.loss_chunk_size >= 0, f"loss_chunk_size={self.loss_chunk_size} must be >= 0")
        _check(self.sample_tokens >= 0, f"sample_tokens={self.sample_tokens} must be >= 0")
        if self.sample_tokens:
            _check(bool(self.sample_prompt), "sample_prompt must not be empty when sample_tokens > 0")
        if self.profile_steps:
            _check(len(self.profile_steps) == 2 and 0 <= self.profile_steps[0] < self.profile_steps[1] <= self.steps,
                   f"profile_steps={','.join(map(str, self.profile_steps))} must be START,END with "
                   f"0 <= START < END <= steps={self.steps}")
        m, d = self.model, self.data
        objective = self.objective
        if m.position == "learned":
            _check(d.seq_len <= m.max_seq_len,
                   f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}, "
                   "the size of the learned position table")
        if m.architecture == "encoder_decoder" and m.position == "learned":
            from transformer.data.objectives import target_length

            target = target_length(d, objective)
            _check(target <= m.max_seq_len,
                   f"data.target_len={d.target_len or f'0 (derived: {target})'} is longer than model.max_seq_len="
                   f"{m.max_seq_len}, the size of the learned position table")
        _check(d.target_len == 0 or m.architecture == "encoder_decoder",
               f"data.target_len={d.target_len} applies to model.architecture='encoder_decoder' only, not "
               f"{m.architecture!r}; set it to 0")
        defaults = DataConfig()
        for name, user in (("mask_rate", "mlm"), ("noise_density", "span_corruption"),
                           ("mean_span_length", "span_corruption")):
            _check(getattr(d, name) == getattr(defaults, name) or objective == user,
                   f"data.{name}={getattr(d, name)} applies to data.objective={user!r} only, not {objective!r}; "
                   "leave it at its default")
        _check(self.sample_tokens == 0 or m.architecture == "decoder",
               f"sample_tokens={self.sample_tokens}: the end-of-training sample is a decoder's continuation of "
               f"sample_prompt, not defined for model.architecture={m.architecture!r}; set sample_tokens=0 (use "
               "python -m transformer.generate source=... for an encoder_decoder)")
        accum = self.optim.grad_accum_steps
        _check(d.global_batch_size % accum == 0,
               f"data.global_batch_size={d.global_batch_size} is not divisible by optim.grad_accum_steps={accum}")
        _check(m.vocab_size >= 259 or d.dataset == "npy" or d.tokenizer != "bytes",
               f"model.vocab_size={m.vocab_size} is too small for the byte tokenizer (needs >= 259)")
        _check(m.num_encoder_layers == 0 or m.architecture == "encoder_decoder",
               f"model.num_encoder_layers={m.num_encoder_layers} applies to model.architecture='encoder_decoder' "
               f"only, not {m.architecture!r}; set it to 0")
        if objective != "next_token":
            from transformer.data.objectives import check_objective

            check_objective(d, objective, m.vocab_size)
        return self

    @property
    def objective(self) -> str:
        """data.objective with 'auto' resolved by model.architecture; ConfigError when they do not fit."""
        return self.data.check_architecture(self.model.architecture)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        return _from_dict(cls, values, prefix="")


def _from_dict(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, prefix=f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides


_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def parse_value(key: str, text: str, hint: Any) -> Any:
    """`text` as a value of type `hint`: bool, int (integral floats like 1e3 allowed), float, str, or a tuple
    of one of those written comma-separated (empty parts skipped). A ConfigError names `key` otherwise."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        try:
            return tuple(parse_value(key, part, item) for part in text.split(",") if part)
        except ConfigError:
            raise ConfigError(f"{key}={text!r}: expected comma-separated {_PLURALS[item]}") from None
    if hint is bool:
        lowered = text.lower()
        _check(lowered in ("true", "false", "1", "0"), f"{key}={text!r}: expected true or false")
        return lowered in ("true", "1")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            number = None
        _check(number is not None and number.is_integer(), f"{key}={text!r}: expected an integer")
        return int(number)
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    return text


def override(cfg: Any, key: str, text: str, prefix: str = "") -> Any:
    """`cfg` (any frozen dataclass) with the dotted field `key` set from the string `text`, parsed by the
    field's type."""
    head, _, rest = key.partition(".")
    names = {f.name: f for f in fields(cfg)}
    _check(head in names,
           f"unknown config field {prefix + key!r}; valid fields of {prefix or 'the config'}: {', '.join(sorted(names))}")
    hint = typing.get_type_hints(type(cfg))[head]
    current = getattr(cfg, head)
    if dataclasses.is_dataclass(current):
        _check(bool(rest), f"{key!r} is a group; set one of its fields, e.g. {key}.{fields(current)[0].name}=...")
        return replace(cfg, **{head: override(current, rest, text, prefix=f"{prefix}{head}.")})
    _check(not rest, f"{key!r}: {head} has no sub-fields")
    return replace(cfg, **{head: parse_value(prefix + key, text, hint)})


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """`cfg` (a Config, or any frozen dataclass of typed fields) with each `key.sub=value` applied in order."""
    for item in overrides:
        _check("=" in item, f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        cfg = override(cfg, key.strip(), text.strip())
    return cfg


# ---------------------------------------------------------------- presets


def _preset_tiny() -> Config:
    return Config(
        model=ModelConfig(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
                          attention_block_size=64),
        data=DataConfig(seq_len=128, global_batch_size=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        steps=200, eval_every=100, eval_batches=4, log_every=10,
        checkpoint=CheckpointConfig(every_steps=100),
        run_dir="runs/tiny", sample_tokens=160,
    )


def _preset_small() -> Config:
    return Config(
        model=ModelConfig(d_model=384, num_layers=6, num_heads=6, max_seq_len=512),
        data=DataConfig(seq_len=512, global_batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200),
        steps=5000, run_dir="runs/small", sample_tokens=200,
    )


def _preset_125m() -> Config:
    return Config(
        model=ModelConfig(d_model=768, num_layers=12, num_heads=12, max_seq_len=2048, vocab_size=50304,
                          dtype="bfloat16", remat="dots_with_no_batch_dims_saveable"),
        data=DataConfig(dataset="npy", seq_len=2048, global_batch_size=256),
        optim=OptimConfig(lr=6e-4, warmup_steps=2000),
        steps=50000, run_dir="runs/125m",
    )


def _preset_1b() -> Config:
    return Config(
        model=ModelConfig(d_model=2048, num_layers=24, num_heads=16, num_kv_heads=8, max_seq_len=4096,
                          vocab_size=50304, dtype="bfloat16", remat="full"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(dataset="npy", seq_len=4096, global_batch_size=512),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000),
        steps=100000, run_dir="runs/1b",
    )


def _preset_moe() -> Config:
    tiny = _preset_tiny()
    return replace(
        tiny,
        model=replace(tiny.model, moe=MoEConfig(num_experts=8, top_k=2, every_k_layers=1)),
        run_dir="runs/moe",
    )


def _preset_mlm() -> Config:
    """`tiny` as a BERT-style masked LM: bidirectional encoder, 15% of tokens masked, loss on them only."""
    tiny = _preset_tiny()
    return replace(tiny, model=replace(tiny.model, architecture="encoder", vocab_size=384), run_dir="runs/mlm",
                   sample_tokens=0)


def _preset_t5() -> Config:
    """`tiny` as a T5-style encoder-decoder: relative position bias, span corruption (15% in spans of 3)."""
    tiny = _preset_tiny()
    return replace(tiny, model=replace(tiny.model, architecture="encoder_decoder", position="t5_bias",
                                       vocab_size=384), run_dir="runs/t5", sample_tokens=0)


PRESETS = {
    "default": lambda: Config(),
    "tiny": _preset_tiny,
    "mlm": _preset_mlm,
    "t5": _preset_t5,
    "small": _preset_small,
    "125m": _preset_125m,
    "1b": _preset_1b,
    "moe": _preset_moe,
}


def get_preset(name: str) -> Config:
    _check(name in PRESETS, f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config_file(path: str) -> Config:
    """The Config returned by `get_config()` in the Python file `path` (an experiment config, e.g.
    experiments/configs/moe_kjv.py; its docstring states the command that runs it). The file's folder is on
    sys.path while it runs, so configs can share settings through a sibling module."""
    import importlib.util
    import sys
    from pathlib import Path

    file = Path(path)
    _check(file.is_file() and file.suffix == ".py", f"--config {path!r}: no such Python file")
    spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    loaded = set(sys.modules)
    sys.path.insert(0, str(file.parent.absolute()))  # a config may import its siblings (shared settings)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.parent.absolute()))
        for name in set(sys.modules) - loaded:  # siblings of another config folder may share these names
            if getattr(sys.modules[name], "__file__", None) and Path(sys.modules[name].__file__).parent == \
                    file.parent:
                del sys.modules[name]
    get_config = getattr(module, "get_config", None)
    _check(callable(get_config), f"--config {path!r} defines no get_config() function")
    cfg = get_config()
    _check(isinstance(cfg, Config), f"--config {path!r}: get_config() returned {type(cfg).__name__}, not a Config")
    return cfg


def config_from_args(argv: list[str], default_preset: str = "tiny") -> Config:
    """`[--preset NAME | --config FILE.py] [key.sub=value ...]` -> validated Config."""
    base = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if name in ("--preset", "--config"):
            if not has_value:
                _check(bool(args), f"{name} needs a value")
                value = args.pop(0)
            _check(base is None, f"{name} {value!r}: give one --preset or --config, not several")
            base = (name, value)
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option {arg!r}; use --preset NAME or --config FILE.py, "
                              "then key.sub=value overrides")
        else:
            overrides.append(arg)
    kind, value = base or ("--preset", default_preset)
    cfg = get_preset(value) if kind == "--preset" else load_config_file(value)
    return apply_overrides(cfg, overrides).validate()


# ---------------------------------------------------------------- help


HELP_FLAGS = ("-h", "--help")
_CONFIG_FILES = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def format_value(value: Any) -> str:
    """`value` as an override would spell it: true/false, comma-separated tuples, '' for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(format_value, value)) if value else "()"
    if isinstance(value, str):
        return value or "''"
    return str(value)


def describe_fields(obj: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, meaning) of every leaf field of the dataclass `obj` (a class gives its defaults,
    an instance its values), nested dataclasses flattened; the meaning is the field's `described` help."""
    instance = obj() if isinstance(obj, type) else obj
    rows = []
    for f in fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_fields(value, prefix=f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, format_value(value), f.metadata.get("help", "")))
    return rows


def columns(rows: Sequence[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """`rows` of cells as aligned lines; the last cell is free text."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]).rstrip()
            for row in rows]


def wrapped_entry(name: str, items: Sequence[str], width: int = 120) -> list[str]:
    """`name`, then `items` separated by spaces, wrapped under each other."""
    import textwrap

    return textwrap.wrap(" ".join(items) or "(the defaults)", width=width, initial_indent=f"  {name:<8}  ",
                         subsequent_indent=" " * 12, break_on_hyphens=False)


def preset_lines() -> list[str]:
    """One entry per preset: the overrides that make it from the defaults."""
    defaults = {name: value for name, value, _ in describe_fields(Config)}
    lines = []
    for name, make in PRESETS.items():
        changed = [f"{key}={value}" for key, value, _ in describe_fields(make()) if defaults[key] != value]
        lines += wrapped_entry(name, changed)
    return lines


def config_file_lines(folder: Path = _CONFIG_FILES) -> list[str]:
    """One line per Python file in `folder` (default experiments/configs): its path and its docstring's first
    sentence."""
    import ast
    import os
    import textwrap

    rows = []
    for file in sorted(folder.glob("*.py")) if folder.is_dir() else []:
        paragraph = (ast.get_docstring(ast.parse(file.read_text())) or "").split("\n\n")[0]
        sentence = " ".join(paragraph.split()).split(". ")[0]
        rows.append((os.path.relpath(file), textwrap.shorten(sentence, 80, placeholder=" ...")))
    return columns(rows) if rows else ["  (none found)"]


CONFIG_FIELDS_TITLE = "Config fields (a.b=value), with defaults"
OVERRIDES_TITLE = "Config overrides of the run's saved config (a.b=value), with Config's defaults"


def help_text(doc: str, options: Sequence[tuple[str, Any]] = (), *, presets: bool = True,
              config_title: str = CONFIG_FIELDS_TITLE) -> str:
    """`doc`, then each (title, dataclass) of `options` as `name  default  meaning` lines, then (with `presets`)
    the presets and config files, then every Config field."""
    sections = [doc.strip()]
    for title, cls in options:
        sections.append(f"{title}:\n" + "\n".join(columns(describe_fields(cls))))
    if presets:
        sections.append("Presets (--preset NAME; the fields each sets over the defaults):\n"
                        + "\n".join(preset_lines()))
        sections.append("Config files (--config FILE.py):\n" + "\n".join(config_file_lines()))
    sections.append(f"{config_title}:\n" + "\n".join(columns(describe_fields(Config))))
    return "\n\n".join(sections) + "\n"


def print_help_if_asked(argv: Sequence[str], doc: str, options: Sequence[tuple[str, Any]] = (), *,
                        presets: bool = True, config_title: str = CONFIG_FIELDS_TITLE) -> bool:
    """Print `help_text` to stdout and return True when `argv` holds -h or --help."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return False
    print(help_text(doc, options, presets=presets, config_title=config_title), end="")
    return True
