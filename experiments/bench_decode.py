"""Decode speed: prefill and decode tokens/s against Hugging Face transformers, the decode step's achieved memory
bandwidth, sharded-cache decode latency at long contexts, and speculative decoding with a 1-layer draft.

    python experiments/bench_decode.py --preset cpu     # 2 quiet cores: under 10 min (+ ~4 min training, once)
    python experiments/bench_decode.py --preset gpu     # one or more GPUs, bfloat16, contexts to 1M tokens
    python experiments/bench_decode.py --preset quick   # seconds: tiny sizes, no HF, untrained speculative models

Sections (`--sections`, default all), each written as <section>.csv / <section>.md under --results-dir
(default experiments/results/bench_decode/<preset>/):

throughput: a Llama-style model (RoPE, RMSNorm, SwiGLU, GQA, untied embeddings; ~24M parameters in the cpu and
  gpu presets, random weights with init_std 0.02 and RMSNorm scales 1 + 0.1 N(0, 1), so the norm mapping is
  exercised too) generates greedily with `Generator.generate` (`decode_steps_per_call` tokens per jitted call)
  from random prompts of --prompt-len tokens at each batch size. One run compiles; the figures are medians of
  --repeats runs after it: prefill tokens/s = batch x prompt / prefill seconds, decode tokens/s = batch x new
  tokens / decode seconds (the step count equals the new tokens: the first token is sampled from the prefill's
  logits, every token is then fed through the model). The same weights in `transformers`' LlamaForCausalLM
  (`hf_llama.to_hf`; torch on the CPU in float32, or CUDA in the gpu preset's dtype) run
  `generate(do_sample=False, use_cache=True)`, after a 2-token warm-up, --repeats times each way: prefill = the
  median time of max_new_tokens=1, decode = (median time of max_new_tokens=N - that) / (N - 1) per step.
  `match` is the shortest common prefix of our greedy tokens and HF's over the rows, `logit diff` the largest
  |logit difference| of one forward pass over the batch-1 prompt. The HF rows are skipped, with the reason
  printed, when torch/transformers are not installed (`pip install -e ".[bench]"`) or with --no-hf.
bandwidth: the batch-1 decode step's bytes over its time: parameter bytes (the input embedding table, read one
  row per token, left out) + the KV-cache bytes of the tokens it attends to (K, V and slot positions of every
  layer, averaged over the steps), as a fraction of this machine's bandwidth measured in the same run: a jitted
  in-place `x + 1` on --copy-mib MiB (donated, so no fresh pages are touched), (read + write) bytes / time,
  best of 9; a copy into a fresh output (page faults included) is shown beside it.
long_context: the same model on a cache split over all devices (mesh.sequence = device count, mesh.data=1;
  the cpu preset asks for 8 fake CPU devices before jax starts): a random prompt of each --contexts length is
  prefilled (Ring Attention), then --context-new-tokens tokens are decoded, --context-steps-per-call per call;
  latency per token = the median time between decode calls (the first, which compiles, left out) / tokens per
  call. Prefill seconds include compilation. (Fake CPU devices share the machine's cores and each computes the
  replicated projections of the token: there the figures show the split cache working, not its speed.)
speculative: a 6-layer target and a 1-layer draft trained on the KJV (`transformer.train`, seq_len 128, run
  dirs under <results-dir>/runs/, reused once trained; --spec-steps 0 uses untrained random models instead, which
  only exercises the code) decode greedily from held-out KJV prompts at batch 1: the target alone
  (`Generator.generate`), `speculative_generate` with the draft and with prompt lookup (not in the quick
  preset), each warmed up on one more prompt, then interleaved prompt by prompt; speedup = the target's decode
  seconds / speculative decode seconds, acceptance = accepted / proposed draft tokens, and whether the tokens
  equal the target's (greedy speculative decoding must reproduce them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import numpy as np

import harness

SECTIONS = ("throughput", "bandwidth", "long_context", "speculative")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: d_model, layers, query and kv heads, MLP width, vocabulary, tied embeddings."""

    d_model: int
    layers: int
    heads: int
    kv_heads: int
    d_ff: int
    vocab: int = 259
    tie: bool = False

    def overrides(self) -> dict:
        return dict(d_model=self.d_model, num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                    d_ff=self.d_ff, vocab_size=self.vocab, tie_embeddings=self.tie)


@dataclasses.dataclass(frozen=True)
class Preset:
    """The defaults of the command-line flags of the same names, and the models."""

    platform: str
    cpu_devices: int  # fake CPU devices for the split cache (0: the real devices)
    dtype: str  # compute and parameter dtype of the random model
    model: Shape
    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    steps_per_call: int
    repeats: int
    hf: bool
    hf_device: str
    copy_mib: int
    contexts: tuple[int, ...]
    context_new_tokens: int
    context_steps_per_call: int
    context_prefill_chunk: int  # 0: each prompt in one prefill call
    spec_steps: int  # training steps of target and draft (0: untrained random models)
    spec_target: harness.TrainingPreset
    spec_draft: harness.TrainingPreset
    spec_prompts: int  # batch-1 prompts timed (after one warm-up)
    spec_prompt_len: int
    spec_new_tokens: int
    draft_tokens: int
    spec_lookup: bool = True  # also time prompt-lookup drafts


LLAMA_24M = Shape(d_model=512, layers=8, heads=8, kv_heads=2, d_ff=1536)
TARGET = harness.TrainingPreset(d_model=128, layers=6, heads=4, batch=16, steps=300, lr=3e-3, warmup=30)
DRAFT = dataclasses.replace(TARGET, layers=1)
PRESETS = {
    "cpu": Preset(platform="cpu", cpu_devices=8, dtype="float32", model=LLAMA_24M, prompt_len=512, new_tokens=128,
                  batches=(1, 8), steps_per_call=32, repeats=2, hf=True, hf_device="cpu", copy_mib=256,
                  contexts=(1024, 4096), context_new_tokens=48, context_steps_per_call=16,
                  context_prefill_chunk=0, spec_steps=300,
                  spec_target=TARGET, spec_draft=DRAFT, spec_prompts=8, spec_prompt_len=64, spec_new_tokens=128,
                  draft_tokens=4),
    "gpu": Preset(platform="gpu", cpu_devices=0, dtype="bfloat16", model=LLAMA_24M, prompt_len=512, new_tokens=256,
                  batches=(1, 8), steps_per_call=32, repeats=5, hf=True, hf_device="cuda", copy_mib=4096,
                  contexts=(16384, 65536, 262144, 1048576), context_new_tokens=96,
                  context_steps_per_call=32, context_prefill_chunk=0,
                  spec_steps=1000, spec_target=dataclasses.replace(TARGET, d_model=256, batch=32, steps=1000,
                                                                   warmup=100),
                  spec_draft=dataclasses.replace(TARGET, d_model=256, layers=1, batch=32, steps=1000, warmup=100),
                  spec_prompts=5, spec_prompt_len=64, spec_new_tokens=256, draft_tokens=4),
    "quick": Preset(platform="cpu", cpu_devices=8, dtype="float32",
                    model=Shape(d_model=64, layers=2, heads=4, kv_heads=2, d_ff=128), prompt_len=32, new_tokens=16,
                    batches=(1,), steps_per_call=8, repeats=1, hf=False, hf_device="cpu", copy_mib=16,
                    contexts=(64, 128), context_new_tokens=24, context_steps_per_call=8,
                    context_prefill_chunk=0, spec_steps=0,
                    spec_target=dataclasses.replace(TARGET, d_model=64, layers=2),
                    spec_draft=dataclasses.replace(TARGET, d_model=64, layers=1), spec_prompts=1, spec_prompt_len=16,
                    spec_new_tokens=16, draft_tokens=4, spec_lookup=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.Parser("bench_decode", __doc__, PRESETS)
    parser.add_argument("--sections", type=lambda s: tuple(p for p in s.split(",") if p), default=SECTIONS,
                        help=f"comma-separated, from {','.join(SECTIONS)} (default all)")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--batches", type=harness.ints)
    parser.add_argument("--steps-per-call", type=int, help="decode_steps_per_call of Generator.generate")
    parser.add_argument("--repeats", type=int, help="timed runs after the warm-up")
    parser.add_argument("--no-hf", dest="hf", action="store_false", default=None,
                        help="skip the Hugging Face transformers rows")
    parser.add_argument("--copy-mib", type=int, help="array size of the bandwidth measurement")
    parser.add_argument("--contexts", type=harness.ints, help="context lengths of the split-cache decode")
    parser.add_argument("--context-new-tokens", type=int)
    parser.add_argument("--context-steps-per-call", type=int, help="decode_steps_per_call at long contexts")
    parser.add_argument("--spec-steps", type=int, help="training steps of the speculative target and draft "
                                                       "(0: untrained random models)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections: unknown {unknown[0] if unknown else '(none given)'!r}; choose from "
                     f"{', '.join(SECTIONS)}")
    if min(args.batches) < 1 or args.new_tokens < 2 or args.prompt_len < 1 or args.steps_per_call < 1:
        parser.error("need --batches >= 1, --new-tokens >= 2, --prompt-len >= 1, --steps-per-call >= 1")
    if args.repeats < 1 or args.copy_mib < 1 or args.spec_steps < 0:
        parser.error("need --repeats >= 1, --copy-mib >= 1, --spec-steps >= 0")
    if args.context_steps_per_call < 1 or args.context_new_tokens < 3 * args.context_steps_per_call:
        parser.error(f"--context-new-tokens={args.context_new_tokens} must be >= 3 x --context-steps-per-call="
                     f"{args.context_steps_per_call} >= 3: two decode calls after the compiling one are timed")
    return args


def start_jax(platform: str, cpu_devices: int):
    import os

    if platform == "cpu":
        harness.fake_cpu_devices(cpu_devices)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.default_backend() != platform:
        raise ValueError(f"--preset needs the {platform} backend, but JAX started on {jax.default_backend()!r}; "
                         "use the preset of this machine")
    return jax


# ---------------------------------------------------------------- the random model


def random_model(preset: Preset, shape: Shape, max_len: int):
    """(Config, nnx model) of `shape` with random weights (RMSNorm scales 1 + 0.1 N(0, 1))."""
    from transformer.config import Config, MeshConfig, ModelConfig

    model_cfg = ModelConfig(**shape.overrides(), dtype=preset.dtype, param_dtype=preset.dtype, init_std=0.02,
                            max_seq_len=max_len)
    return Config(model=model_cfg, mesh=MeshConfig(data=1)).validate(), init_model(model_cfg, seed=0, norm_noise=0.1)


def init_model(model_cfg, seed: int, norm_noise: float = 0.0):
    """A model of `model_cfg` with NumPy random weights: N(0, init_std^2), output projections (o, down) scaled by
    1 / sqrt(2 layers) like the library's init, RMSNorm scales 1 + norm_noise N(0, 1). (jax.random's threefry
    initialisers take XLA's CPU compiler seconds per shape; NumPy takes none.)"""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from transformer.model import build_model

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def init(path, x):
        name = str(path[-2].key if str(getattr(path[-1], "name", "")) == "value" else path[-1].key)
        if name == "scale":
            value = 1 + norm_noise * rng.standard_normal(x.shape)
        elif name == "bias":
            value = np.zeros(x.shape)
        else:
            std = model_cfg.init_std / (math.sqrt(2 * model_cfg.num_layers) if name in ("o_HWD", "down_FD") else 1)
            value = std * rng.standard_normal(x.shape)
        return jnp.asarray(value, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, abstract))


def _median(values) -> float:
    return float(statistics.median(values))


def _greedy(new_tokens: int):
    from transformer.inference.sampling import SamplingConfig

    return SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)


# ---------------------------------------------------------------- throughput


def hf_status(args) -> str:
    """'' when the HF rows can run, else why not."""
    if not args.hf:
        return "--no-hf"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        return f"{err.name} is not installed (pip install -e '.[bench]')"
    except OSError as err:  # a torch wheel whose native libraries do not load here
        return f"torch does not load: {err}"
    if PRESETS[args.preset].hf_device == "cuda" and not torch.cuda.is_available():
        return "torch has no CUDA device here"
    return ""


def ours(gen, prompts, args) -> dict:
    sampling = _greedy(args.new_tokens)
    run = lambda: gen.generate(prompts, sampling, decode_steps_per_call=args.steps_per_call)
    run()  # compiles
    runs = [run() for _ in range(args.repeats)]
    B, P, N = len(prompts), len(prompts[0]), args.new_tokens
    prefill, decode = _median(r.prefill_seconds for r in runs), _median(r.decode_seconds for r in runs)
    gen.cache = None
    return {"tokens": np.asarray(runs[-1].tokens), "prefill_tok_s": B * P / prefill, "decode_tok_s": B * N / decode,
            "step_ms": 1e3 * decode / N}


def hf_generate(model, prompts, args) -> dict:
    import torch

    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompts), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(new_tokens):
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, use_cache=True)
        sync()
        return time.perf_counter() - start, out

    B, P, N = ids.shape[0], ids.shape[1], args.new_tokens
    with torch.inference_mode():
        timed(2)  # warm-up (nothing to compile: the first calls' allocations)
        firsts, fulls = [], []
        for _ in range(args.repeats):
            firsts.append(timed(1)[0])
            seconds, out = timed(N)
            fulls.append(seconds)
    prefill, full = _median(firsts), _median(fulls)
    decode = max(full - prefill, 1e-9)
    return {"tokens": out[:, P:].cpu().numpy(), "prefill_tok_s": B * P / prefill,
            "decode_tok_s": B * (N - 1) / decode, "step_ms": 1e3 * decode / (N - 1)}


def common_prefix(a_BT, b_BT) -> int:
    """The shortest common prefix, over rows, of two token arrays."""
    shortest = a_BT.shape[1]
    for a, b in zip(a_BT, b_BT):
        differ = np.flatnonzero(a[:len(b)] != b[:len(a)])
        shortest = min(shortest, int(differ[0]) if differ.size else min(len(a), len(b)))
    return shortest


def logit_diff(cfg, model, hf_model, prompt) -> float:
    """max |our logits - HF's| of one forward pass over `prompt` (1 row)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens_BL: nnx.merge(graphdef, state)(tokens_BL)[0])
    ours_BLV = np.asarray(forward(state, jnp.asarray(prompt, jnp.int32)))
    with torch.inference_mode():
        device = next(hf_model.parameters()).device
        theirs = hf_model(torch.as_tensor(np.asarray(prompt), device=device)).logits.float().cpu().numpy()
    return float(np.max(np.abs(ours_BLV.astype(np.float32) - theirs)))


def throughput_rows(args, cfg, model, gen) -> tuple[list[dict], str]:
    """(rows, why the HF rows are missing or '')."""
    import jax
    from flax import nnx

    preset = PRESETS[args.preset]
    why_not = hf_status(args)
    hf_model = None
    if why_not:
        print(f"  HF transformers rows skipped: {why_not}", flush=True)
    else:
        import hf_llama

        hf_model = hf_llama.to_hf(cfg.model, jax.device_get(nnx.state(model, nnx.Param)), dtype=preset.dtype,
                                  device=preset.hf_device,
                                  max_position_embeddings=args.prompt_len + args.new_tokens)
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batches:
        prompts = rng.integers(3, cfg.model.vocab_size, (B, args.prompt_len))
        mine = ours(gen, prompts, args)
        row = {"impl": "ours (jax)", "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "steps_per_call": args.steps_per_call, "prefill_tok_s": mine["prefill_tok_s"],
               "decode_tok_s": mine["decode_tok_s"], "step_ms": mine["step_ms"], "decode_vs_hf": float("nan"),
               "match": "", "logit_diff": float("nan")}
        rows.append(row)
        print(f"  ours B={B}: prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_tok_s']:.1f} tok/s "
              f"({row['step_ms']:.1f} ms/step)", flush=True)
        if hf_model is None:
            continue
        theirs = hf_generate(hf_model, prompts, args)
        match = common_prefix(mine["tokens"], theirs["tokens"])
        row["decode_vs_hf"] = mine["decode_tok_s"] / theirs["decode_tok_s"]
        row["match"] = f"{match}/{args.new_tokens}"
        if B == min(args.batches):
            row["logit_diff"] = logit_diff(cfg, model, hf_model, prompts[:1])
        rows.append({**row, "impl": "hf transformers (torch)", "steps_per_call": 1,
                     **{k: theirs[k] for k in ("prefill_tok_s", "decode_tok_s", "step_ms")}, "decode_vs_hf": 1.0})
        print(f"  HF   B={B}: prefill {theirs['prefill_tok_s']:.0f} tok/s, decode {theirs['decode_tok_s']:.1f} tok/s "
              f"({theirs['step_ms']:.1f} ms/step); ours/HF decode {row['decode_vs_hf']:.2f}x, greedy tokens "
              f"equal for the first {row['match']}", flush=True)
    return rows, why_not


def throughput_markdown(rows, device: str, params: int, dtype: str, why_not: str = "") -> str:
    table = harness.markdown_table(
        ["impl", "batch", "prompt", "new", "prefill tok/s", "decode tok/s", "ms/step", "decode vs HF",
         "greedy match", "logit diff"],
        [[r["impl"], r["batch"], r["prompt_len"], r["new_tokens"], f"{r['prefill_tok_s']:.0f}",
          f"{r['decode_tok_s']:.1f}", f"{r['step_ms']:.2f}", _num(r["decode_vs_hf"], ".2f", "x"), r["match"] or "–",
          _num(r["logit_diff"], ".1e")] for r in rows], align=["---"] + ["---:"] * 9)
    skipped = f"\nHugging Face transformers rows skipped: {why_not}.\n" if why_not else ""
    return (f"Greedy generation on {device}, a {params / 1e6:.1f}M-parameter Llama-style model in {dtype}; "
            f"medians after a warm-up run.\n\n{table}{skipped}")


def jax_platform() -> str:
    import jax

    return jax.default_backend()


def _num(value: float, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


# ---------------------------------------------------------------- bandwidth


def copy_bandwidth(mib: int) -> tuple[float, float]:
    """(in-place, fresh-output) bytes/s of a jitted x + 1 over `mib` MiB of float32: (read + write) / best time."""
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    in_place = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    fresh = jax.jit(lambda x: x + 1.0)
    x = jax.block_until_ready(in_place(jnp.zeros((n,), jnp.float32)))
    best_in_place = best_fresh = math.inf
    for _ in range(9):
        start = time.perf_counter()
        x = jax.block_until_ready(in_place(x))
        best_in_place = min(best_in_place, time.perf_counter() - start)
    jax.block_until_ready(fresh(x))
    for _ in range(9):
        start = time.perf_counter()
        y = jax.block_until_ready(fresh(x))
        best_fresh = min(best_fresh, time.perf_counter() - start)
        del y
    return 2 * n * 4 / best_in_place, 2 * n * 4 / best_fresh


def bandwidth_rows(args, cfg, model, gen, step_ms: float | None) -> list[dict]:
    import jax
    from flax import nnx

    from transformer.inference.cache import bytes_per_token

    m = cfg.model
    if step_ms is None:
        prompts = np.random.default_rng(0).integers(3, m.vocab_size, (1, args.prompt_len))
        step_ms = ours(gen, prompts, args)["step_ms"]
    params = nnx.state(model, nnx.Param)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not m.tie_embeddings:  # the input table is read one row per token
        param_bytes -= m.vocab_size * m.d_model * np.dtype(m.param_dtype).itemsize
    mean_context = args.prompt_len + (args.new_tokens + 1) / 2  # keys a step attends to, averaged over steps
    cache_bytes = bytes_per_token(m) * mean_context
    in_place, fresh = copy_bandwidth(args.copy_mib)
    achieved = (param_bytes + cache_bytes) / (step_ms / 1e3)
    row = {"batch": 1, "step_ms": step_ms, "param_mb": param_bytes / 1e6, "cache_mb": cache_bytes / 1e6,
           "achieved_gb_s": achieved / 1e9, "copy_gb_s": in_place / 1e9, "fresh_copy_gb_s": fresh / 1e9,
           "fraction": achieved / in_place}
    print(f"  decode step {step_ms:.2f} ms reads {row['param_mb'] + row['cache_mb']:.1f} MB: "
          f"{row['achieved_gb_s']:.2f} GB/s = {row['fraction']:.1%} of the in-place copy's {row['copy_gb_s']:.1f} GB/s "
          f"(fresh-output copy {row['fresh_copy_gb_s']:.1f} GB/s)", flush=True)
    return [row]


def bandwidth_markdown(rows, device: str, args) -> str:
    table = harness.markdown_table(
        ["batch", "step ms", "params MB", "KV cache MB", "achieved GB/s", "copy GB/s", "fraction",
         "fresh-output copy GB/s"],
        [[r["batch"], f"{r['step_ms']:.2f}", f"{r['param_mb']:.1f}", f"{r['cache_mb']:.2f}",
          f"{r['achieved_gb_s']:.2f}", f"{r['copy_gb_s']:.1f}", f"{r['fraction']:.1%}", f"{r['fresh_copy_gb_s']:.1f}"]
         for r in rows], align=["---:"] * 8)
    return (f"Decode step memory bandwidth on {device}: (parameter + KV-cache bytes read per step) / step time, "
            f"against a jitted in-place x + 1 over {args.copy_mib} MiB ((read + write) / best of 9).\n\n{table}")


# ---------------------------------------------------------------- long context, split cache


def long_context_rows(args, cfg, model) -> list[dict]:
    from transformer.inference.cache import cache_bytes
    from transformer.inference.generate import Generator

    gen = Generator((cfg, model), overrides=["mesh.data=1", "mesh.sequence=-1"])
    ring = dict(gen.loaded.mesh.shape)["sequence"]
    rng = np.random.default_rng(2)
    rows = []
    for context in args.contexts:
        prompt = rng.integers(3, cfg.model.vocab_size, (1, context))
        stamps = []
        result = gen.generate(prompt, _greedy(args.context_new_tokens),
                              decode_steps_per_call=args.context_steps_per_call,
                              prefill_chunk=PRESETS[args.preset].context_prefill_chunk,
                              on_tokens=lambda _: stamps.append(time.perf_counter()))
        calls = np.diff(stamps)  # between decode calls: the compiling first call is left out
        per_token = _median(calls) / args.context_steps_per_call
        total = cache_bytes(cfg.model, 1, gen.cache.slots)
        gen.cache = None
        rows.append({"context": context, "devices": ring, "cache_mib_per_device": total / ring / 2**20,
                     "prefill_s": result.prefill_seconds, "ms_per_token": 1e3 * per_token,
                     "tokens_per_s": 1 / per_token, "timed_calls": len(calls)})
        print(f"  context {context}: {1e3 * per_token:.2f} ms/token on a cache split over {ring} devices "
              f"({rows[-1]['cache_mib_per_device']:.1f} MiB each); prefill {result.prefill_seconds:.1f} s with "
              "compilation", flush=True)
    return rows


def long_context_markdown(rows, device: str, args) -> str:
    table = harness.markdown_table(
        ["context", "devices", "cache MiB / device", "prefill s (with compile)", "ms / token", "tokens/s"],
        [[f"{r['context']:,}", r["devices"], f"{r['cache_mib_per_device']:.1f}", f"{r['prefill_s']:.1f}",
          f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}"] for r in rows], align=["---:"] * 6)
    fake = ("\n\nThe devices are fake CPU devices sharing this machine's cores: each computes the (replicated) "
            "projections of the token, so these latencies show the split cache working, not a speed."
            if jax_platform() == "cpu" and rows and rows[0]["devices"] > 1 else "")
    return (f"Batch-1 decode latency with the KV cache split over the `sequence` axis on {device}; median time "
            f"between decode calls of {args.context_steps_per_call} tokens, the compiling call left out.\n\n{table}"
            f"{fake}")


# ---------------------------------------------------------------- speculative decoding


def spec_generators(args, preset: Preset):
    """(target, draft, trained) Generators: trained on the KJV into <results-dir>/runs/, or random."""
    from transformer.config import Config, MeshConfig, ModelConfig
    from transformer.inference.generate import Generator

    seq_len = 128
    if args.spec_steps == 0:
        made = []
        for seed, shape in enumerate((preset.spec_target, preset.spec_draft)):
            model_cfg = ModelConfig(d_model=shape.d_model, num_layers=shape.layers, num_heads=shape.heads,
                                    max_seq_len=seq_len)
            made.append(Generator((Config(model=model_cfg, mesh=MeshConfig(data=1)), init_model(model_cfg, seed))))
        return made[0], made[1], False
    generators = []
    for name, shape in (("target", preset.spec_target), ("draft", preset.spec_draft)):
        shape = dataclasses.replace(shape, steps=args.spec_steps)
        run_dir = args.results_dir / "runs" / name
        cfg = shape.training_config(seq_len=seq_len, run_dir=run_dir, checkpoints=1,
                                    model=dict(max_seq_len=seq_len), eval_every=0, log_every=50)
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=-1))  # data parallel over all (fake CPU) devices
        harness.train_run(cfg)
        generators.append(Generator(str(run_dir)))
    return generators[0], generators[1], True


def kjv_prompts(count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` byte tokens from the KJV's held-out tail, each starting at a verse."""
    from transformer.data.corpus import kjv_tokens

    tokens = np.asarray(kjv_tokens())
    tail = tokens[int(len(tokens) * 0.99):]
    newlines = np.flatnonzero(tail == ord("\n"))  # byte tokens: token b is byte b
    starts = newlines[:: max(len(newlines) // (count + 1), 1)][1:count + 1] + 1
    return [tail[s:s + length].astype(int).tolist() for s in starts]


def speculative_rows(args, preset: Preset) -> list[dict]:
    try:
        from transformer.inference.speculative import speculative_generate
    except ImportError:
        print("  speculative section skipped: transformer.inference.speculative has no speculative_generate",
              flush=True)
        return []
    target, draft, trained = spec_generators(args, preset)
    prompts = kjv_prompts(preset.spec_prompts + 1, preset.spec_prompt_len)
    sampling = _greedy(preset.spec_new_tokens)
    methods = {"target alone": lambda p: target.generate([p], sampling, decode_steps_per_call=args.steps_per_call),
               f"draft model ({preset.spec_draft.layers} layer)": lambda p: speculative_generate(
                   target, [p], sampling, draft=draft, draft_tokens=preset.draft_tokens),
               "prompt lookup": lambda p: speculative_generate(target, [p], sampling, draft_tokens=preset.draft_tokens)}
    if not preset.spec_lookup:
        del methods["prompt lookup"]
    for run in methods.values():
        run(prompts[0])  # compiles
    results = {method: [] for method in methods}
    for prompt in prompts[1:]:  # methods interleaved, so a change in the machine's load hits all alike
        for method, run in methods.items():
            results[method].append(run(prompt))
    baseline = results["target alone"]
    base_seconds = sum(r.decode_seconds for r in baseline)
    rows = []
    for method, runs in results.items():
        seconds = sum(r.decode_seconds for r in runs)
        proposed = sum(r.stats.get("proposed", 0) for r in runs)
        accepted = sum(r.stats.get("accepted", 0) for r in runs)
        same = all(r.tokens == b.tokens for r, b in zip(runs, baseline))
        rows.append({"method": method, "trained": trained, "draft_tokens": preset.draft_tokens if runs[0].stats else 0,
                     "new_tokens": sum(r.new_tokens for r in runs), "decode_s": seconds,
                     "tokens_per_s": sum(r.new_tokens for r in runs) / seconds, "speedup": base_seconds / seconds,
                     "acceptance": accepted / proposed if proposed else float("nan"),
                     "tokens_per_call": _median(r.stats["tokens_per_target_call"] for r in runs)
                     if "tokens_per_target_call" in runs[0].stats else 1.0,
                     "same_tokens": same})
        print(f"  {method}: {rows[-1]['tokens_per_s']:.1f} tok/s, speedup {rows[-1]['speedup']:.2f}x, acceptance "
              f"{_num(rows[-1]['acceptance'], '.2f')}, tokens equal the target's: {same}", flush=True)
    return rows


def speculative_markdown(rows, device: str, preset: Preset, args) -> str:
    table = harness.markdown_table(
        ["method", "draft tokens", "new tokens", "decode s", "tokens/s", "speedup", "acceptance",
         "tokens / target call", "same tokens"],
        [[r["method"], r["draft_tokens"] or "–", r["new_tokens"], f"{r['decode_s']:.2f}", f"{r['tokens_per_s']:.1f}",
          f"{r['speedup']:.2f}x", _num(r["acceptance"], ".2f"), f"{r['tokens_per_call']:.2f}",
          "yes" if r["same_tokens"] else "no"] for r in rows], align=["---"] + ["---:"] * 8)
    t, d = preset.spec_target, preset.spec_draft
    trained = (f"trained {args.spec_steps} steps on the KJV at seq_len 128" if rows and rows[0]["trained"]
               else "untrained (random weights: the acceptance rate means nothing)")
    return (f"Greedy speculative decoding at batch 1 on {device}: target {t.layers} layers x d_model {t.d_model}, "
            f"draft {d.layers} layer x d_model {d.d_model}, {trained}; {preset.spec_prompts} "
            f"held-out KJV prompts of {preset.spec_prompt_len} tokens, {preset.spec_new_tokens} new tokens each, "
            f"after a warm-up prompt.\n\n{table}")


# ---------------------------------------------------------------- main


def _section_done(name: str, began: float) -> float:
    now = time.perf_counter()
    print(f"  ({name}: {now - began:.0f} s)", flush=True)
    return now


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    jax = start_jax(preset.platform, preset.cpu_devices)
    from transformer.inference.generate import Generator
    from transformer.model import count_params

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} devices)"
    print(f"bench_decode --preset {args.preset} on {device}", flush=True)
    out, written = {}, []
    needs_model = {"throughput", "bandwidth", "long_context"} & set(args.sections)
    if needs_model:
        longest = max([args.prompt_len + args.new_tokens, *args.contexts]) + args.context_new_tokens
        cfg, model = random_model(preset, preset.model, longest)
        params = count_params(model)
        gen = Generator((cfg, model))
        print(f"model: {params / 1e6:.2f}M parameters, {preset.dtype}", flush=True)
    began = time.perf_counter()
    if "throughput" in args.sections:
        out["throughput"], why_not = throughput_rows(args, cfg, model, gen)
        written += harness.write_results(args.results_dir, "throughput", out["throughput"],
                                         throughput_markdown(out["throughput"], device, params, preset.dtype, why_not))
        began = _section_done("throughput", began)
    if "bandwidth" in args.sections:
        batch_1 = [r for r in out.get("throughput", []) if r["impl"].startswith("ours") and r["batch"] == 1]
        out["bandwidth"] = bandwidth_rows(args, cfg, model, gen, batch_1[0]["step_ms"] if batch_1 else None)
        written += harness.write_results(args.results_dir, "bandwidth", out["bandwidth"],
                                         bandwidth_markdown(out["bandwidth"], device, args))
        began = _section_done("bandwidth", began)
    if "long_context" in args.sections:
        out["long_context"] = long_context_rows(args, cfg, model)
        written += harness.write_results(args.results_dir, "long_context", out["long_context"],
                                         long_context_markdown(out["long_context"], device, args))
        began = _section_done("long_context", began)
    if "speculative" in args.sections:
        out["speculative"] = speculative_rows(args, preset)
        if out["speculative"]:
            written += harness.write_results(args.results_dir, "speculative", out["speculative"],
                                             speculative_markdown(out["speculative"], device, preset, args))
        _section_done("speculative", began)
    for path in written:
        if path.suffix == ".md":
            print(f"\n{path.read_text()}")
    for path in written:
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
