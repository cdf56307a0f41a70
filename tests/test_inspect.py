"""`python -m transformer.inspect`: its figures against formulas written out here from the config, the sliding
window's ring buffer, the compiled decode step's memory, and the one-line errors."""

import pytest

from transformer import inspect as calc


def _tiny(*overrides):
    return calc.load_config(["--preset", "tiny", *overrides])


def _by_hand(cfg):
    """(parameters, matmul weights a token passes through) of a pre-norm RMSNorm SwiGLU decoder with tied
    embeddings, written out from the config."""
    m = cfg.model
    D, H, G, W, F, V, N = (m.d_model, m.num_heads, m.kv_heads, m.dim_per_head, m.ffn_dim, m.vocab_size,
                           m.num_layers)
    attention = D * H * W + 2 * D * G * W + H * W * D  # q, k, v, o
    mlp = 3 * D * F  # gate, up, down
    norms = 2 * D  # attention and MLP RMSNorm scales
    params = V * D + N * (attention + mlp + norms) + D  # + final norm
    return params, N * (attention + mlp) + D * V


def test_tiny_preset_against_formulas():
    cfg = _tiny()
    m = cfg.model
    assert (m.d_model, m.num_layers, m.num_heads, m.kv_heads, m.dim_per_head, m.ffn_dim) == (128, 2, 4, 2, 32, 384)
    report = calc.count(cfg, calc.Options(batch=3, context=200))
    params, matmul_weights = _by_hand(cfg)
    assert report.params == params == 427_008
    assert report.param_bytes == report.decode_param_bytes == 4 * params
    attention_flops = 12 * m.num_heads * m.dim_per_head * cfg.data.seq_len * m.num_layers
    assert report.flops_per_token == 6 * matmul_weights + attention_flops
    kv_bytes = 2 * m.num_layers * m.kv_heads * m.dim_per_head * 4  # float32 K and V per token
    assert report.bytes_per_token == kv_bytes + 4  # + the slot's int32 position
    tokens = 3 * 200
    assert report.slots == 200
    assert report.cache_bytes == kv_bytes * tokens + 4 * tokens + 4 * 3  # + slot positions + row lengths
    assert report.allocated_cache_bytes == report.cache_bytes


def test_defaults_are_one_row_of_seq_len_and_dtype_follows_the_compute_dtype():
    cfg = _tiny("model.dtype=bfloat16", "data.seq_len=64")
    report = calc.count(cfg)
    kv_bytes = 2 * 2 * 2 * 32 * 2
    assert (report.batch, report.context, report.slots) == (1, 64, 64)
    assert report.cache_bytes == (kv_bytes + 4) * 64 + 4
    assert report.param_bytes == 4 * report.params  # params stay float32


def test_sliding_window_cache_is_the_ring_buffer():
    cfg = _tiny("model.sliding_window=32")
    report = calc.count(cfg, calc.Options(batch=2, context=10_000))
    assert report.slots == 32
    assert report.cache_bytes == report.allocated_cache_bytes == 2 * 32 * (2 * 2 * 2 * 32 * 4 + 4) + 2 * 4
    short = calc.count(cfg, calc.Options(context=16))
    assert short.slots == 16  # shorter than the window: only the context's slots


def test_compiled_decode_step_holds_params_and_cache(capsys):
    assert calc.main(["--preset", "tiny", "batch=2", "context=256", "compile=true"]) == 0
    out = capsys.readouterr().out
    report = calc.inspect(_tiny(), calc.Options(batch=2, context=256, compile=True))
    mem = report.compiled
    assert mem["argument"] >= report.param_bytes + report.cache_bytes
    assert mem["alias"] >= report.cache_bytes  # the donated cache is written in place
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    assert f"{mem['argument']:,} B" in out and f"{report.cache_bytes:,} B" in out
    assert "parameters:               427,008" in out


def test_cli_prints_every_figure(capsys):
    assert calc.main(["--preset", "tiny", "model.sliding_window=16", "context=4096"]) == 0
    out = capsys.readouterr().out
    for label in ("parameters:", "training FLOPs per token:", "KV cache per token:", "KV cache:",
                  "allocated abstractly:"):
        assert label in out
    assert "a ring buffer of 16 slots" in out
    assert "decode step compiled" not in out


@pytest.mark.parametrize("argv, names", [
    (["--preset", "tiny", "batchsize=3"], ["'batchsize'", "batch, context"]),
    (["--preset", "tiny", "--batch=3"], ["'--batch=3'", "batch, context"]),
    (["--preset", "tiny", "context"], ["'context'", "key=value"]),
    (["--preset", "tiny", "model.foo=1"], ["'model.foo'"]),
    (["--preset", "tiny", "batch=0"], ["batch=0"]),
    (["--preset", "tiny", "compile=maybe"], ["compile='maybe'"]),
    (["--preset", "tiny", "source=64"], ["source=64", "encoder_decoder"]),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv, names):
    assert calc.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("inspect: ")
    for name in names:
        assert name in err
