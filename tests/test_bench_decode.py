"""experiments/bench_decode.py at its quick preset (tiny random models, no HF, untrained speculative models): every
section runs and writes its CSV and markdown with their columns. With transformers installed, the HF weight
mapping (experiments/hf_llama.py) reproduces our logits."""

import csv

import numpy as np
import pytest

import bench_decode as bench

COLUMNS = {
    "throughput": ["impl", "batch", "prompt_len", "new_tokens", "steps_per_call", "prefill_tok_s", "decode_tok_s",
                   "step_ms", "decode_vs_hf", "match", "logit_diff"],
    "bandwidth": ["batch", "step_ms", "param_mb", "cache_mb", "achieved_gb_s", "copy_gb_s", "fresh_copy_gb_s",
                  "fraction"],
    "long_context": ["context", "devices", "cache_mib_per_device", "prefill_s", "ms_per_token", "tokens_per_s",
                     "timed_calls"],
    "speculative": ["method", "trained", "draft_tokens", "new_tokens", "decode_s", "tokens_per_s", "speedup",
                    "acceptance", "tokens_per_call", "same_tokens"],
}


@pytest.mark.slow
def test_quick_preset_writes_every_section(tmp_path):
    out = bench.main(["--preset", "quick", "--results-dir", str(tmp_path), "--contexts", "64"])
    for section, columns in COLUMNS.items():
        with open(tmp_path / f"{section}.csv") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == columns
            assert len(list(reader)) == len(out[section]) > 0
        assert (tmp_path / f"{section}.md").read_text().count("\n|") >= 2
    throughput = out["throughput"]
    assert [(r["impl"], r["batch"]) for r in throughput] == [("ours (jax)", 1)]
    for row in throughput:
        assert row["decode_tok_s"] == pytest.approx(row["batch"] * 1e3 / row["step_ms"])
    bandwidth = out["bandwidth"][0]
    assert bandwidth["step_ms"] == throughput[0]["step_ms"]
    assert bandwidth["fraction"] == pytest.approx(bandwidth["achieved_gb_s"] / bandwidth["copy_gb_s"])
    assert [(r["context"], r["devices"], r["timed_calls"]) for r in out["long_context"]] == [(64, 8, 2)]
    methods = [r["method"] for r in out["speculative"]]
    assert methods == ["target alone", "draft model (1 layer)"]
    assert all(r["same_tokens"] for r in out["speculative"])  # greedy speculative = the target's tokens


def test_bad_sections_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "quick", "--sections", "throughput,latency"])
    assert "'latency'" in capsys.readouterr().err


def test_hf_mapping_reproduces_our_logits():
    pytest.importorskip("transformers")
    import hf_llama
    import jax.numpy as jnp
    import torch
    from flax import nnx

    preset = bench.PRESETS["quick"]
    for shape in (preset.model, bench.Shape(d_model=64, layers=2, heads=4, kv_heads=1, d_ff=96, tie=True)):
        cfg, model = bench.random_model(preset, shape, 64)
        tokens = np.random.default_rng(0).integers(0, shape.vocab, (2, 24))
        ours, _ = model(jnp.asarray(tokens))
        hf = hf_llama.to_hf(cfg.model, nnx.state(model, nnx.Param))
        with torch.inference_mode():
            theirs = hf(torch.from_numpy(tokens)).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)
