"""Language models: decoder-only (`DecoderLM`, the main model), bidirectional `EncoderLM`, and
`EncoderDecoderLM` (encoder + decoder with cross-attention); `build_model` picks one from the config.

Layers are grouped into `LayerGroup`s of `ModelConfig.layer_group_size` blocks (a multiple of
`moe.every_k_layers` and of the `attention_pattern` length; 1 for dense uniform models), so every group
holds the same MoE and dense blocks with the same windows and all groups are identical. With
`scan_layers` the groups are created by `nnx.vmap` (params get a leading "layers" axis) and applied by
`jax.lax.scan` over split/merged group states; otherwise they are an `nnx.List` applied in a Python loop.
Both paths run the same (optionally rematerialised) group step, so for equal params they compute the same
function. The `moe.first_dense_layers` (DeepSeek's dense first layers) come before the groups as one unscanned
`lead` group, and the groups start after them; layers left over when the rest is not a multiple of the group
size follow the groups unscanned, continuing the MoE and attention patterns.

Non-Param state (the MoE `RouterBias`) written inside the step comes back through the scan
outputs and, with `update_router_bias=True`, is written into the model (in place); otherwise the
model's variables are left untouched, so a model merged from closed-over state stays usable. MoE
statistics come back through the scan outputs too: aux = {"aux_loss": sum of weighted MoE losses,
"moe/<stat>": per-MoE-layer values stacked on a leading axis ("expert_load_E" is logged as "expert_load_NE",
the key metrics.flatten splits per layer and expert)}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from transformer import sharding
from transformer.config import ARCHITECTURES, REMAT_POLICIES, ConfigError, ModelConfig
from transformer.inference.cache import KV, KVCache, plan_write
from transformer.layers import latent_attention
from transformer.layers.block import LayerGroup
from transformer.layers.embed import Embed, check_tokens
from transformer.layers.moe import expert_capacity
from transformer.layers.norms import make_norm

_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _add_layers_axis(module: nnx.Module) -> None:
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("logical_axes")
            if axes is not None:
                node.set_metadata(logical_axes=("layers", *axes))


def _group_step(graphdef, *, remat: str, scanned: bool, update_router_bias: bool, context: dict):
    """step(x_BLD, params, rest) -> (x_BLD, aux, rest): one LayerGroup applied functionally."""

    def step(x_BLD, params, rest):
        group = nnx.merge(graphdef, params, rest)
        x_BLD, aux = group(x_BLD, update_router_bias=update_router_bias, **context)
        return x_BLD, aux, nnx.split(group, nnx.Param, ...)[2]

    if remat == "none":
        return step
    if remat not in _POLICIES:
        raise ConfigError(f"model.remat={remat!r} is not valid; choose one of {', '.join(map(repr, REMAT_POLICIES))}")
    return jax.checkpoint(step, policy=_POLICIES[remat], prevent_cse=not scanned)


class LayerStack(nnx.Module):
    """num_layers blocks, scanned or unrolled; `__call__` -> (x_BLD, MoE stats stacked per MoE layer).

    With model.position="t5_bias" the stack owns T5's relative-position bias table relative_bias_OH (one row
    per bucket, one column per head), shared by its layers' self-attention as in T5, and passes it to every
    layer with the other per-call context."""

    def __init__(self, cfg: ModelConfig, *, num_layers: int, causal: bool, cross: bool = False, rngs: nnx.Rngs):
        size, lead = cfg.layer_group_size, cfg.lead_layers
        num_groups, leftover = divmod(num_layers - lead, size)
        self.scan = cfg.scan_layers
        self.remat = cfg.remat
        self.group_size = size
        init_bias = jax.nn.initializers.normal(stddev=cfg.init_std)
        self.relative_bias_OH = nnx.Param(
            init_bias(rngs.params(), (cfg.relative_buckets, cfg.num_heads), jnp.dtype(cfg.param_dtype)),
            logical_axes=(None, "heads"), weight_decay=False) if cfg.position == "t5_bias" else None  # as T5

        def make(first_layer, group_size, group_rngs):
            return LayerGroup(cfg, first_layer=first_layer, size=group_size, num_layers=num_layers, causal=causal,
                              cross=cross, rngs=group_rngs)

        self.lead = make(0, lead, rngs) if lead else None
        if num_groups == 0:
            self.groups = None
        elif self.scan:
            create = nnx.vmap(lambda key: make(lead, size, nnx.Rngs(params=key)), in_axes=0, out_axes=0)
            self.groups = create(jax.random.split(rngs.params(), num_groups))
            _add_layers_axis(self.groups)
        else:
            self.groups = nnx.List([make(lead + g * size, size, rngs) for g in range(num_groups)])
        self.leftover = make(lead + num_groups * size, leftover, rngs) if leftover else None

    def _apply(self, group, x_BLD, **step_options):
        graphdef, params, rest = nnx.split(group, nnx.Param, ...)
        x_BLD, aux, rest = _group_step(graphdef, remat=self.remat, scanned=False, **step_options)(x_BLD, params, rest)
        if step_options["update_router_bias"]:
            nnx.update(group, rest)
        return x_BLD, aux

    def _with_bias(self, context: dict) -> dict:
        """The per-call context of every layer, with the stack's T5 bias table when it has one."""
        if self.relative_bias_OH is None:
            return context
        return dict(context, relative_bias_OH=self.relative_bias_OH[...])

    def __call__(self, x_BLD: jax.Array, *, update_router_bias: bool = False, **context) -> tuple[jax.Array, dict]:
        options = dict(update_router_bias=update_router_bias, context=self._with_bias(context))
        stats = []  # per group, each MoE block's stats stacked on a leading axis
        if self.lead is not None:
            x_BLD, aux = self._apply(self.lead, x_BLD, **options)
            stats.append(aux)
        if self.groups is not None and self.scan:
            graphdef, params, rest = nnx.split(self.groups, nnx.Param, ...)
            step = _group_step(graphdef, remat=self.remat, scanned=True, **options)

            def body(x_BLD, layer):
                x_BLD, aux, layer_rest = step(x_BLD, *layer)
                return x_BLD, (aux, layer_rest)

            x_BLD, (scanned, rest) = jax.lax.scan(body, x_BLD, (params, rest))
            stats.append(jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), scanned))
            if update_router_bias:
                nnx.update(self.groups, rest)
        elif self.groups is not None:
            for group in self.groups:
                x_BLD, aux = self._apply(group, x_BLD, **options)
                stats.append(aux)
        if self.leftover is not None:
            x_BLD, aux = self._apply(self.leftover, x_BLD, **options)
            stats.append(aux)
        stats = [s for s in stats if s]
        return x_BLD, jax.tree.map(lambda *values: jnp.concatenate(values), *stats) if stats else {}


    def extend(self, x_BLD: jax.Array, kv, cross, write, **kwargs):
        """Every block's `extend` in order, carrying the stacked caches (kv, cross; see inference.cache), which
        the scan updates in place: (x_BLD, kv, cross)."""
        kwargs = self._with_bias(kwargs)
        done = 0
        if self.lead is not None:
            x_BLD, kv, cross = self.lead.extend(x_BLD, kv, cross, 0, write, **kwargs)
            done = len(self.lead.blocks)
        if self.groups is not None and self.scan:
            graphdef, state = nnx.split(self.groups)
            size, lead = self.group_size, done

            def body(carry, layer):
                x_BLD, kv, cross = carry
                group_state, index = layer
                return nnx.merge(graphdef, group_state).extend(x_BLD, kv, cross, lead + index * size, write,
                                                               **kwargs), None

            num_groups = jax.tree.leaves(state)[0].shape[0]
            (x_BLD, kv, cross), _ = jax.lax.scan(body, (x_BLD, kv, cross), (state, jnp.arange(num_groups)))
            done += num_groups * size
        elif self.groups is not None:
            for group in self.groups:
                x_BLD, kv, cross = group.extend(x_BLD, kv, cross, done, write, **kwargs)
                done += len(group.blocks)
        if self.leftover is not None:
            x_BLD, kv, cross = self.leftover.extend(x_BLD, kv, cross, done, write, **kwargs)
        return x_BLD, kv, cross


def moe_aux(stats: dict, prefix: str = "moe/") -> dict:
    """Model aux dict from stacked MoE stats: "aux_loss" (summed over layers) plus prefixed stats."""
    aux = {"aux_loss": jnp.sum(stats["aux_loss"]).astype(jnp.float32) if stats else jnp.zeros((), jnp.float32)}
    for key, value in stats.items():
        if key != "aux_loss":
            aux[prefix + (key[:-2] + "_NE" if key.endswith("_E") else key)] = value
    return aux


def _check_like(name: str, value, shape: tuple) -> None:
    if value is not None and tuple(jnp.shape(value)) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(jnp.shape(value))}; expected {tuple(shape)} like the tokens")


class _SingleStackLM(nnx.Module):
    """embed -> blocks -> final norm (pre-norm only) -> output projection."""

    causal: bool

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.embed = Embed(cfg, rngs=rngs)
        self.layers = LayerStack(cfg, num_layers=cfg.num_layers, causal=self.causal, rngs=rngs)
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None

    def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None, return_hidden: bool = False,
                 update_router_bias: bool = False) -> tuple[jax.Array, dict]:
        """(logits_BLV float32, or the final hidden_BLD with return_hidden, aux). Positions default
        to arange; segment ids (packed sequences) keep attention inside each segment."""
        check_tokens("tokens_BL", tokens_BL)
        _check_like("positions_BL", positions_BL, tokens_BL.shape)
        _check_like("segment_ids_BL", segment_ids_BL, tokens_BL.shape)
        x_BLD = self.embed(tokens_BL, positions_BL)
        x_BLD, stats = self.layers(x_BLD, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                                   update_router_bias=update_router_bias)
        if self.final_norm is not None:
            x_BLD = self.final_norm(x_BLD)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "embed"))
        return (x_BLD if return_hidden else self.logits(x_BLD)), moe_aux(stats)

    def logits(self, hidden_BLD: jax.Array) -> jax.Array:
        """Output projection of final hidden states -> float32 logits (used by the chunked loss)."""
        return self.embed.logits(hidden_BLD)

    def extend(self, tokens_BL: jax.Array, cache: KVCache, *, valid_BL: jax.Array | None = None,
               fresh: bool = False) -> tuple[jax.Array, KVCache]:
        """(hidden_BLD after the final norm, cache): the next L tokens of each row (right-padded where
        valid_BL is False) run against the KV cache and are written into it. Their positions continue each
        row's cache.lengths_B. fresh=True: the cache is empty (a prompt's first chunk). See inference.cache."""
        if not self.causal:
            raise ConfigError("model.architecture='encoder' is bidirectional: it has no causal decoder to "
                              "decode with; use a 'decoder' or 'encoder_decoder' model")
        return _extend(self, self.layers, self.final_norm, tokens_BL, cache, valid_BL, fresh)


class DecoderLM(_SingleStackLM):
    """Causal language model (the main model)."""

    causal = True


class EncoderLM(_SingleStackLM):
    """Bidirectional encoder with a token-prediction head (every position sees the whole sequence)."""

    causal = False


class EncoderDecoderLM(nnx.Module):
    """Encoder (cfg.encoder_layers, bidirectional) + causal decoder (cfg.num_layers) whose blocks
    cross-attend to the encoder output; one token embedding shared by both and the output."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        pre = cfg.norm_position == "pre"
        self.embed = Embed(cfg, rngs=rngs)
        self.encoder = LayerStack(cfg, num_layers=cfg.encoder_layers, causal=False, rngs=rngs)
        self.encoder_norm = make_norm(cfg) if pre else None
        self.decoder = LayerStack(cfg, num_layers=cfg.num_layers, causal=True, cross=True, rngs=rngs)
        self.decoder_norm = make_norm(cfg) if pre else None

    def encode(self, sources_BS: jax.Array, *, source_positions_BS: jax.Array | None = None,
               source_segment_ids_BS: jax.Array | None = None, update_router_bias: bool = False
               ) -> tuple[jax.Array, dict]:
        """(encoder output x_BSD after its final norm, encoder MoE stats). Positions default to arange;
        segment ids keep attention inside each source segment (0: padding)."""
        check_tokens("sources_BS", sources_BS)
        _check_like("source_positions_BS", source_positions_BS, sources_BS.shape)
        _check_like("source_segment_ids_BS", source_segment_ids_BS, sources_BS.shape)
        x_BSD, stats = self.encoder(self.embed(sources_BS, source_positions_BS), positions_BL=source_positions_BS,
                                    segment_ids_BL=source_segment_ids_BS, update_router_bias=update_router_bias)
        if self.encoder_norm is not None:
            x_BSD = self.encoder_norm(x_BSD)
        return sharding.constrain(x_BSD, ("batch", "length", "embed")), stats

    def __call__(self, sources_BS: jax.Array, inputs_BL: jax.Array, *, source_positions_BS: jax.Array | None = None,
                 source_segment_ids_BS: jax.Array | None = None, positions_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None, return_hidden: bool = False,
                 update_router_bias: bool = False) -> tuple[jax.Array, dict]:
        """(logits_BLV float32 for the decoder inputs, or the final hidden_BLD with return_hidden, aux).
        Positions of either side default to arange (explicit ones keep zigzag-ordered rows exact); a target
        token cross-attends only to source tokens of its segment id. Decoder MoE stats are "moe/...", encoder
        ones "moe/encoder/..."."""
        check_tokens("inputs_BL", inputs_BL)
        _check_like("positions_BL", positions_BL, inputs_BL.shape)
        _check_like("segment_ids_BL", segment_ids_BL, inputs_BL.shape)
        if sources_BS.shape[0] != inputs_BL.shape[0]:
            raise ValueError(f"sources_BS batch {sources_BS.shape[0]} differs from inputs_BL batch "
                             f"{inputs_BL.shape[0]}")
        context_BSD, enc_stats = self.encode(sources_BS, source_positions_BS=source_positions_BS,
                                             source_segment_ids_BS=source_segment_ids_BS,
                                             update_router_bias=update_router_bias)
        x_BLD, dec_stats = self.decoder(self.embed(inputs_BL, positions_BL), positions_BL=positions_BL,
                                        segment_ids_BL=segment_ids_BL, context_BSD=context_BSD,
                                        context_segment_ids_BS=source_segment_ids_BS,
                                        update_router_bias=update_router_bias)
        if self.decoder_norm is not None:
            x_BLD = self.decoder_norm(x_BLD)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "embed"))
        aux = moe_aux(dec_stats)
        enc_aux = moe_aux(enc_stats, prefix="moe/encoder/")
        aux["aux_loss"] = aux["aux_loss"] + enc_aux.pop("aux_loss")
        aux.update(enc_aux)
        return (x_BLD if return_hidden else self.logits(x_BLD)), aux

    def logits(self, hidden_BLD: jax.Array) -> jax.Array:
        return self.embed.logits(hidden_BLD)

    def extend(self, tokens_BL: jax.Array, cache: KVCache, *, valid_BL: jax.Array | None = None,
               fresh: bool = False, src_BS: jax.Array | None = None,
               src_valid_BS: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """`DecoderLM.extend` for the decoder. With fresh=True the source src_BS (right-padded where src_valid_BS
        is False) is encoded once and every layer's cross-attention keys/values are stored in the cache."""
        context_BSD = None
        if fresh:
            if src_BS is None:
                raise ValueError("the first extend of an encoder-decoder needs src_BS, the source to encode")
            src_valid_BS = jnp.ones(src_BS.shape, bool) if src_valid_BS is None else src_valid_BS
            context_BSD, _ = self.encode(src_BS, source_segment_ids_BS=src_valid_BS.astype(jnp.int32))
            cache = cache._replace(source_valid_BS=src_valid_BS)
        return _extend(self, self.decoder, self.decoder_norm, tokens_BL, cache, valid_BL, fresh,
                       context_BSD=context_BSD, source_valid_BS=cache.source_valid_BS)


def _extend(model, stack: LayerStack, final_norm, tokens_BL, cache: KVCache, valid_BL, fresh: bool, **cross):
    check_tokens("tokens_BL", tokens_BL)
    valid_BL = jnp.ones(tokens_BL.shape, bool) if valid_BL is None else valid_BL
    _check_like("valid_BL", valid_BL, tokens_BL.shape)
    write = plan_write(cache, valid_BL)
    x_BLD = model.embed(tokens_BL, write.positions_BL)
    crossed = cache.cross_k_NBSGW is not None
    x_BLD, kv, cross_kv = stack.extend(x_BLD, KV(cache.k_NBKGW, cache.v_NBKGW),
                                       KV(cache.cross_k_NBSGW, cache.cross_v_NBSGW) if crossed else None, write,
                                       fresh=fresh, **cross)
    if final_norm is not None:
        x_BLD = final_norm(x_BLD)
    cache = cache._replace(k_NBKGW=kv.k, v_NBKGW=kv.v, positions_BK=write.cache_positions_BK,
                           lengths_B=write.lengths_B)
    if crossed:
        cache = cache._replace(cross_k_NBSGW=cross_kv.k, cross_v_NBSGW=cross_kv.v)
    return x_BLD, cache


_MODELS = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """DecoderLM, EncoderLM or EncoderDecoderLM for cfg.architecture (validates cfg first)."""
    if cfg.architecture not in _MODELS:
        raise ConfigError(f"model.architecture={cfg.architecture!r} is not valid; "
                          f"choose one of {', '.join(map(repr, ARCHITECTURES))}")
    return _MODELS[cfg.architecture](cfg, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param elements; the MoE RouterBias is not counted)."""
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _layer_matmul_params(cfg: ModelConfig, *, moe: bool, cross: bool, experts: float) -> float:
    """Matmul weights one token passes through in one layer; an MoE layer counts its router, `experts`
    routed experts and the shared experts."""
    D, H, G, W = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    attention = latent_attention.matmul_params(cfg) if cfg.attention == "mla" else 2 * D * H * W + 2 * D * G * W
    matrices = 3 if cfg.activation == "swiglu" else 2
    if moe:
        F = cfg.moe.d_ff_expert or cfg.ffn_dim
        ffn = D * cfg.moe.num_experts + (experts + cfg.moe.num_shared_experts) * matrices * D * F
    else:
        ffn = matrices * D * cfg.ffn_dim
    return attention * (2 if cross else 1) + ffn


def _moe_layers(cfg: ModelConfig, num_layers: int) -> int:
    return sum(cfg.is_moe_layer(layer) for layer in range(num_layers))


def _stack_matmul_params(cfg: ModelConfig, num_layers: int, *, cross: bool, experts: float) -> float:
    moe_layers = _moe_layers(cfg, num_layers)
    return ((num_layers - moe_layers) * _layer_matmul_params(cfg, moe=False, cross=cross, experts=0)
            + moe_layers * _layer_matmul_params(cfg, moe=True, cross=cross, experts=experts))


def _moe_work(cfg: ModelConfig, seq_len: int, *, executed: bool) -> tuple[float, float]:
    """(routed experts per token, one-hot dispatch + combine FLOPs per token) of one MoE layer.

    Capacity dispatch computes E x C slots per row: E C / L experts per token, of which expert choice fills
    all and token choice top_k (the rest are padding or drops). Its dispatch and combine einsums cost
    2 E C D FLOPs per token each forward, and three more such matmuls backward (d tokens, d expert
    outputs, d gates)."""
    moe = cfg.moe
    if moe.num_experts == 0 or (moe.dropless and moe.router != "expert_choice"):
        return moe.top_k, 0.0
    slots = moe.num_experts * expert_capacity(seq_len, moe.num_experts, moe.top_k, moe.capacity_factor)
    experts = slots / seq_len if executed or moe.router == "expert_choice" else moe.top_k
    return experts, (10 * slots * cfg.d_model if executed else 0.0)


def _keys_per_query(cfg: ModelConfig, num_layers: int, length: int, causal: bool, executed: bool) -> int:
    """Keys a query attends to, summed over a stack's layers: `length`, or the layer's sliding window when
    smaller (bidirectional: 2 window - 1); executed: always `length`."""
    total = 0
    for layer in range(num_layers):
        window = 0 if executed else cfg.layer_window(layer)
        total += min(length, window if causal else 2 * window - 1) if window else length
    return total


def _score_and_value_width(cfg: ModelConfig, executed: bool) -> int:
    """Per-head width of the q.k product plus that of the weighted sum of values: 2 W, or with MLA
    (N + R) + V (executed: the kernel runs both at max(N + R, V), see `LatentAttention._attend`)."""
    if cfg.attention != "mla":
        return 2 * cfg.dim_per_head
    qk, v = cfg.nope_dim + cfg.rope_dim, cfg.value_dim
    return 2 * max(qk, v) if executed else qk + v


def flops_per_token(cfg: ModelConfig, seq_len: int, *, target_len: int | None = None,
                    executed: bool = False) -> float:
    """Training (forward + backward) FLOPs per target token of seq_len-token rows: 6 x the matmul weights a
    token passes through + 12 x heads x head width x the keys each query attends to, per attention layer (MLA:
    6 x heads x (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) x the keys).

    Model FLOPs (default; the MFU numerator, PaLM style): MoE layers count the router, the top_k routed
    experts (expert choice: its E C / L filled slots) and the shared experts. A query attends to seq_len
    keys (causal masks are not halved), or to its layer's sliding window when smaller (bidirectional:
    2 window - 1 keys). The output projection counts, the embedding lookup does not (nor do biases).
    Encoder-decoder: rows of seq_len source tokens and target_len (default seq_len) decoder tokens; per
    decoder token, the encoder's work over seq_len / target_len source tokens (cross-attention keys and
    values are projected once per source token) and cross-attention from each decoder token to all seq_len
    source tokens.

    executed=True: the matmul FLOPs the train step runs with the reference attention kernel, i.e. what XLA's
    cost analysis counts besides elementwise work: every query meets every key whatever the mask; capacity
    MoE runs all E C slots plus its one-hot dispatch and combine einsums (`_moe_work`); dropless MoE runs
    top_k rows of a grouped matmul (on CPU, ragged_dot computes every expert densely instead). Remat
    recomputation is not counted; the blockwise, cuDNN and ring kernels skip masked tiles and recompute the
    scores (one more L x L matmul) in their backward.
    """
    target_len = seq_len if target_len is None else target_len
    for name, length in (("seq_len", seq_len), ("target_len", target_len)):
        if length < 1:
            raise ValueError(f"{name}={length} must be >= 1")
    experts, dispatch = _moe_work(cfg, target_len, executed=executed)
    per_key = 6 * cfg.num_heads * _score_and_value_width(cfg, executed)
    if cfg.architecture == "encoder_decoder":
        share = seq_len / target_len  # source tokens per decoder token
        source_experts, source_dispatch = _moe_work(cfg, seq_len, executed=executed)
        cross_kv = 2 * cfg.d_model * cfg.kv_heads * cfg.dim_per_head * cfg.num_layers
        weights = (_stack_matmul_params(cfg, cfg.num_layers, cross=True, experts=experts) - cross_kv
                   + share * (_stack_matmul_params(cfg, cfg.encoder_layers, cross=False, experts=source_experts)
                              + cross_kv))
        attention = per_key * (share * _keys_per_query(cfg, cfg.encoder_layers, seq_len, False, executed)
                               + _keys_per_query(cfg, cfg.num_layers, target_len, True, executed)
                               + cfg.num_layers * seq_len)
        routing = (_moe_layers(cfg, cfg.num_layers) * dispatch
                   + share * _moe_layers(cfg, cfg.encoder_layers) * source_dispatch)
    else:
        weights = _stack_matmul_params(cfg, cfg.num_layers, cross=False, experts=experts)
        encoder = cfg.architecture == "encoder"
        attention = per_key * _keys_per_query(cfg, cfg.num_layers, seq_len if encoder else target_len, not encoder,
                                              executed)
        routing = _moe_layers(cfg, cfg.num_layers) * dispatch
    weights += cfg.d_model * cfg.vocab_size
    return float(6 * weights + attention + routing)
