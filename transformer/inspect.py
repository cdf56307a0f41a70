"""Calculator: a config's parameters, training FLOPs per token and KV-cache memory, without allocating it.

    python -m transformer.inspect --preset 1b data.seq_len=131072
    python -m transformer.inspect --preset tiny batch=8 context=4096 compile=true
    python -m transformer.inspect --config experiments/configs/kjv_small.py model.sliding_window=256

Own options (`key=value`, like evaluate.py's); every other argument is a config override (`a.b=value`) after
`--preset NAME` or `--config FILE.py`:

    batch=N       cache rows (default 1)
    context=N     tokens of context per row (default data.seq_len)
    source=N      encoder-decoder only: source tokens whose cross-attention keys/values are cached
                  (default data.seq_len)
    compile=true  also compile the decode step (`inference.generate.extend_step`, one new token per row) on
                  abstract params and cache, and print XLA's memory analysis of it

Figures:
- parameters: the exact count of the model's nnx.Params from `nnx.eval_shape` (nothing allocated), and their
  bytes in model.param_dtype;
- training FLOPs per token at data.seq_len (`model.flops_per_token`: 6 x matmul weights + attention; an
  encoder-decoder's per target token, with data.seq_len source tokens and its resolved data.target_len);
- KV-cache bytes per token of context (`inference.cache.bytes_per_token`: K and V of every kv head of every
  layer in model.dtype, or with model.attention='mla' the latent and RoPE key, compared with MHA and GQA of
  the same heads; plus the slot's int32 position), and the cache of `batch` rows of `context` tokens
  (`cache_bytes`; with a sliding window the ring buffer holds min(context, window) slots). The cache's arrays
  are also laid out abstractly (`cache_specs`) and their bytes must equal the formula.

With compile=true the decode step is lowered on jax.ShapeDtypeStruct params and cache on one device and
compiled by the current backend; its arguments must hold at least params + cache bytes (an encoder-decoder's
decode step reads neither the encoder nor the cross-attention K/V projections, whose outputs are cached; jit
drops unused arguments, so there it is the params the step reads). Exit
code 2 with one line for a bad option or config.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Sequence

from transformer.config import Config, ConfigError, apply_overrides, config_from_args, print_help_if_asked

_NO_DATA = "not-read-by-inspect"  # data.paths stand-in: presets on 'npy' data need no files here


@dataclasses.dataclass(frozen=True)
class Options:
    """The calculator's own `key=value` arguments; 0 means the default named in the module docstring."""

    batch: int = 1
    context: int = 0
    source: int = 0
    compile: bool = False


OPTIONS = tuple(f.name for f in dataclasses.fields(Options))


@dataclasses.dataclass(frozen=True)
class Report:
    params: int
    param_bytes: int
    decode_param_bytes: int  # params a decode step reads (an encoder-decoder's encoder and cross K/V: prefill only)
    flops_per_token: float  # training (forward + backward) at seq_len
    seq_len: int
    batch: int
    context: int
    source: int  # encoder-decoder source tokens cached (0: none)
    slots: int  # cache slots per row (context, or the sliding window's ring buffer)
    bytes_per_token: int  # 0: the model has no KV cache (encoder)
    cache_bytes: int  # the formula (inference.cache.cache_bytes)
    allocated_cache_bytes: int  # the arrays of cache_specs, summed
    compiled: dict | None = None  # XLA memory analysis of the decode step (compile=true)


def _target(cfg) -> dict:
    """flops_per_token's target_len for an encoder-decoder (its resolved data.target_len), else nothing."""
    if cfg.model.architecture != "encoder_decoder":
        return {}
    from transformer.data.objectives import target_length

    return {"target_len": target_length(cfg.data, cfg.objective)}


def parse_args(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """(options, config arguments: --preset/--config and overrides); ConfigError (one line) for an argument
    that is neither an option nor a config override."""
    own, config_args = [], []
    args = list(argv)
    fields = {f.name for f in dataclasses.fields(Config)}
    valid = f"options: {', '.join(OPTIONS)} (key=value), --preset NAME, --config FILE.py, or a config " \
            f"override key.sub=value"
    while args:
        arg = args.pop(0)
        name, has_value, _ = arg.partition("=")
        if name in ("--preset", "--config"):
            config_args.append(arg)
            if not has_value:
                if not args:
                    raise ConfigError(f"{name} needs a value")
                config_args.append(args.pop(0))
        elif arg.startswith("-") or not has_value:
            raise ConfigError(f"unknown option {arg!r}; {valid}")
        elif name in OPTIONS:
            own.append(arg)
        elif name.partition(".")[0] not in fields:
            raise ConfigError(f"unknown option {name!r}; {valid} (config fields: {', '.join(sorted(fields))})")
        else:
            config_args.append(arg)
    options = apply_overrides(Options(), own)
    if options.batch < 1:
        raise ConfigError(f"batch={options.batch} must be >= 1")
    for name in ("context", "source"):
        if getattr(options, name) < 0:
            raise ConfigError(f"{name}={getattr(options, name)} must be >= 1 (0: data.seq_len)")
    return options, config_args


def load_config(config_args: Sequence[str]) -> Config:
    """The validated Config of `--preset/--config` and overrides (data files are never read here)."""
    return config_from_args([f"data.paths={_NO_DATA}", *config_args])


def _decode_reads(path: tuple[str, ...]) -> bool:
    """Whether a decode step reads the parameter at `path`: not an encoder-decoder's encoder, nor its
    cross-attention key/value projections (their outputs are cached at prefill)."""
    return path[0] not in ("encoder", "encoder_norm") and not ("cross_attn" in path and path[-1] in
                                                                 ("k_DGW", "v_DGW"))


def _nbytes(arrays) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays)


def abstract_model(cfg: Config):
    """(graphdef, abstract state) of the model: shapes and dtypes only, nothing allocated."""
    from flax import nnx

    from transformer.model import build_model

    return nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))))


def count(cfg: Config, options: Options = Options()) -> Report:
    """The figures (no compilation); asserts that the abstract cache's bytes equal the formula."""
    import jax
    from flax import nnx

    from transformer.inference import cache as kv
    from transformer.model import flops_per_token

    m = cfg.model
    _, state = abstract_model(cfg)
    params = jax.tree.leaves(nnx.filter_state(state, nnx.Param))
    decoding = [x for path, x in jax.tree_util.tree_leaves_with_path(nnx.filter_state(state, nnx.Param))
                if _decode_reads(tuple(str(k.key) for k in path if hasattr(k, "key")))]
    context = options.context or cfg.data.seq_len
    source = (options.source or cfg.data.seq_len) if m.architecture == "encoder_decoder" else 0
    if options.source and m.architecture != "encoder_decoder":
        raise ConfigError(f"source={options.source} applies to model.architecture='encoder_decoder' only, "
                          f"not {m.architecture!r}")
    report = dict(params=sum(math.prod(x.shape) for x in params),
                  param_bytes=_nbytes(params), decode_param_bytes=_nbytes(decoding),
                  flops_per_token=flops_per_token(m, cfg.data.seq_len, **_target(cfg)), seq_len=cfg.data.seq_len,
                  batch=options.batch, context=context, source=source)
    if m.architecture == "encoder":
        return Report(**report, slots=0, bytes_per_token=0, cache_bytes=0, allocated_cache_bytes=0)
    formula = kv.cache_bytes(m, options.batch, context, source_len=source)
    specs = kv.cache_specs(m, options.batch, context, source_len=source)
    allocated = _nbytes([x for x in specs if x is not None])
    assert allocated == formula, f"cache_specs hold {allocated} bytes but cache_bytes gives {formula}"
    return Report(**report, slots=kv.num_slots(m, context), bytes_per_token=kv.bytes_per_token(m),
                  cache_bytes=formula, allocated_cache_bytes=allocated)


def compile_decode_step(cfg: Config, batch: int, context: int, source: int = 0, device=None):
    """`extend_step` (one new token per row against a cache of `context` tokens) lowered on abstract params
    and cache placed on one device, and compiled: (compiled, abstract state, cache specs)."""
    import jax
    import jax.numpy as jnp

    from transformer import sharding
    from transformer.config import MeshConfig
    from transformer.inference import cache as kv
    from transformer.inference.generate import extend_step

    if cfg.model.architecture == "encoder":
        raise ConfigError("model.architecture='encoder' has no causal decoder, so no decode step to compile")
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=[device or jax.devices()[0]])
    with sharding.use_mesh(mesh):
        graphdef, state = abstract_model(cfg)
        placed = lambda specs, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), specs, shardings)
        state = placed(state, sharding.state_shardings(state, mesh))
        specs = kv.cache_specs(cfg.model, batch, context, source_len=source)
        cache = kv.KVCache(*(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                             for x, s in zip(specs, kv.cache_shardings(specs, mesh))))
        token = sharding.named_sharding(("batch", None), mesh, (batch, 1))
        tokens_BL = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=token)
        valid_BL = jax.ShapeDtypeStruct((batch, 1), jnp.bool_, sharding=token)
        compiled = extend_step.lower(graphdef, state, cache, tokens_BL, valid_BL).compile()
    return compiled, state, cache


def memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program, in bytes; total = arguments + outputs - aliased + temps."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ValueError("this backend gives no memory analysis of compiled programs")
    out = {"argument": int(analysis.argument_size_in_bytes), "output": int(analysis.output_size_in_bytes),
           "alias": int(analysis.alias_size_in_bytes), "temp": int(analysis.temp_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def inspect(cfg: Config, options: Options = Options()) -> Report:
    """`count`, plus the compiled decode step's memory with options.compile (asserted >= params + cache)."""
    report = count(cfg, options)
    if not options.compile:
        return report
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        compiled, _, _ = compile_decode_step(cfg, options.batch, report.context, report.source)
    mem = memory(compiled)
    needed = report.decode_param_bytes + report.cache_bytes
    assert mem["argument"] >= needed, (f"the compiled decode step's arguments hold {mem['argument']} bytes, "
                                       f"less than the params it reads + cache = {needed}")
    return dataclasses.replace(report, compiled=mem)


def human_bytes(n: float) -> str:
    """Bytes in binary units: 512 B, 3.00 KiB, 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    """A count in SI units: 1.50 K, 25.3 M, 1.21 B, 3.1 T."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def _cache_entry(m) -> str:
    if m.attention == "mla":
        return (f"latent {m.kv_lora_rank} + RoPE key {m.rope_dim} of {m.num_layers} layers in {m.dtype}, "
                "the paper's (d_c + d_R) l")
    return f"K and V of {m.num_layers} layers x {m.kv_heads} kv heads x {m.dim_per_head} in {m.dtype}"


def _latent_compression(m) -> list[str]:
    """MLA's cache against MHA (2 n_h d_h l) and GQA (2 n_g d_h l) with d_h = qk_nope_head_dim."""
    if m.attention != "mla":
        return []
    import jax.numpy as jnp

    from transformer.inference.cache import kv_bytes_per_token

    latent = kv_bytes_per_token(m)
    per_kv_head = 2 * m.nope_dim * m.num_layers * jnp.dtype(m.dtype).itemsize
    return [f"  vs MHA / GQA:           MHA's {m.num_heads * per_kv_head:,} B is "
            f"{m.num_heads * per_kv_head / latent:.3g}x this; it equals GQA with {latent / per_kv_head:.3g} kv "
            f"groups of width {m.nope_dim}"]


def format_report(cfg: Config, r: Report) -> str:
    m = cfg.model
    heads = (f"{m.num_heads} heads / {m.kv_heads} kv heads of width {m.dim_per_head}" if m.attention != "mla" else
             f"MLA: {m.num_heads} heads, q/k width {m.nope_dim} + RoPE {m.rope_dim}, v width {m.value_dim}, "
             f"kv latent {m.kv_lora_rank}, q latent {m.q_lora_rank or 'none'}")
    shape = (f"{m.architecture}, {m.num_layers} layers, d_model {m.d_model}, {heads}, d_ff {m.ffn_dim}, "
             f"vocab {m.vocab_size}, {m.dtype} compute, {m.param_dtype} params")
    lines = [
        f"model:                    {shape}",
        f"parameters:               {r.params:,} ({human_count(r.params)}; {human_bytes(r.param_bytes)} "
        f"in {m.param_dtype})",
        f"training FLOPs per token: {r.flops_per_token:.4g} ({human_count(r.flops_per_token)}FLOP at "
        f"data.seq_len={r.seq_len}; 6 x matmul weights + attention)",
    ]
    if not r.bytes_per_token:
        lines.append("KV cache:                 none (model.architecture='encoder' is bidirectional: no decoding)")
        return "\n".join(lines)
    window = f", sliding window {m.sliding_window}: a ring buffer of {r.slots} slots" if m.sliding_window else ""
    if "global" in m.attention_kinds:
        window = f", attention_pattern {m.attention_pattern!r}: its global layers need every slot"
    lines += [
        f"KV cache per token:       {r.bytes_per_token:,} B ({human_bytes(r.bytes_per_token)}: {_cache_entry(m)}, "
        "+ 4 B slot position)",
        *_latent_compression(m),
        f"KV cache:                 {r.cache_bytes:,} B ({human_bytes(r.cache_bytes)}) for batch={r.batch} x "
        f"context={r.context:,} tokens ({r.slots:,} slots per row{window})"
        + (f" + cross-attention K/V of {r.source:,} source tokens" if r.source else ""),
        f"  allocated abstractly:   {r.allocated_cache_bytes:,} B (cache_specs summed; equals the formula)",
        f"params + cache:           {human_bytes(r.param_bytes + r.cache_bytes)}",
    ]
    if r.compiled is not None:
        c = r.compiled
        lines += [
            f"decode step compiled (extend_step, 1 token x {r.batch} rows; XLA memory_analysis):",
            f"  arguments:              {c['argument']:,} B ({human_bytes(c['argument'])}; >= "
            f"{'the params it reads' if r.decode_param_bytes != r.param_bytes else 'params'} + cache "
            f"{human_bytes(r.decode_param_bytes + r.cache_bytes)})",
            f"  outputs:                {c['output']:,} B ({human_bytes(c['output'])}; {human_bytes(c['alias'])} "
            "reuse the donated cache)",
            f"  temporaries:            {c['temp']:,} B ({human_bytes(c['temp'])})",
            f"  total:                  {c['total']:,} B ({human_bytes(c['total'])}; arguments + outputs - "
            "donated + temporaries)",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring); a bad argument prints one line and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if print_help_if_asked(argv, __doc__):
        return 0
    try:
        options, config_args = parse_args(argv)
        cfg = load_config(config_args)
        report = inspect(cfg, options)
    except (ConfigError, ValueError) as err:
        print(f"inspect: {err}", file=sys.stderr)
        return 2
    print(format_report(cfg, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
