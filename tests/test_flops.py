"""FLOP accounting: `flops_per_token` against XLA's cost analysis of the same computation (layers unrolled,
reference attention), and the peak FLOP/s behind MFU.

XLA counts every matmul plus elementwise work (softmax, norms, loss, AdamW), so its count must lie in
[executed, (1 + TOLERANCE) x executed]; in these configs (head width 64, d_model 128) the elementwise share
is 1.5-3.5%. Executed FLOPs differ from model FLOPs (the MFU numerator) by terms each case states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from transformer import aot, metrics
from transformer.config import ModelConfig, config_from_args
from transformer.layers.moe import expert_capacity
from transformer.loss import token_loss_sums
from transformer.model import build_model, flops_per_token

TOLERANCE = 0.05
B, L = 4, 64
SMALL = ["mesh.data=1", "model.d_model=128", "model.num_heads=2", "model.head_dim=64", "model.num_layers=1",
         f"data.seq_len={L}", f"data.global_batch_size={B}", "model.scan_layers=false",
         "model.attention_kernel=reference", "sample_tokens=0", "model.vocab_size=384"]


def small(*overrides: str):
    return config_from_args(["--preset", "tiny", *SMALL, *overrides])


def _moe_args(router: str) -> tuple[str, ...]:
    return ("model.num_layers=2", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.every_k_layers=2",
            f"model.moe.router={router}")


def moe_dispatch(m: ModelConfig) -> float:
    """One-hot dispatch + combine einsums per token per MoE layer: 2 E C D each forward, 3 such backward."""
    E = m.moe.num_experts
    return 10 * E * expert_capacity(L, E, m.moe.top_k, m.moe.capacity_factor) * m.d_model


CASES = {  # overrides, executed - model FLOPs per token
    "dense_mha": ((), lambda m: 0.0),
    "gqa": (("model.num_heads=4", "model.num_kv_heads=2"), lambda m: 0.0),
    # capacity factor 1 with E C = L top_k: every computed expert slot is an active assignment; only routing is extra
    "moe_active_experts": (("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0"),
                           moe_dispatch),
    # the reference kernel computes all L x L scores; model FLOPs count the window's w keys per query
    "sliding_window": (("model.sliding_window=16",), lambda m: 12 * m.num_heads * m.dim_per_head * (L - 16)),
    # MLA: the kernel runs the values zero-padded to the q/k width 64 + 32; model FLOPs count (64 + 32) + 48
    "mla_q_lora": (("model.num_kv_heads=0", "model.attention=mla", "model.kv_lora_rank=64", "model.q_lora_rank=48",
                    "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=48"),
                   lambda m: 6 * m.num_heads * (2 * 96 - (96 + 48)) * L),
}


@pytest.mark.parametrize("name", CASES)
def test_executed_flops_match_xla_cost_analysis(name):
    overrides, extra_per_token = CASES[name]
    cfg = small(*overrides)
    report = aot.run(cfg, jax.devices()[:1])
    assert report.xla_flops_caveats == ()
    executed = report.executed_flops_per_step
    assert executed <= report.xla_flops_per_device <= (1 + TOLERANCE) * executed
    assert executed - report.model_flops_per_step == pytest.approx(extra_per_token(cfg.model) * B * L, abs=1)


@pytest.mark.parametrize("target_len", [L, L // 4])
def test_encoder_decoder_forward_backward_matches_xla(target_len):
    """The model's loss gradient compiled directly, for rows of L source and `target_len` decoder tokens."""
    cfg = small("model.architecture=encoder_decoder", "model.num_kv_heads=1").model
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def loss(params, rest, src_BS, tgt_BL):
        logits_BLV, _ = nnx.merge(graphdef, params, rest)(src_BS, tgt_BL)
        return token_loss_sums(logits_BLV, tgt_BL, jnp.ones(tgt_BL.shape))["ce"]

    sources_BS, tokens_BL = (jax.ShapeDtypeStruct((B, n), jnp.int32) for n in (L, target_len))
    xla = aot.xla_flops(jax.jit(jax.grad(loss)).lower(params, rest, sources_BS, tokens_BL).compile())
    executed = flops_per_token(cfg, L, target_len=target_len, executed=True) * B * target_len
    assert executed == flops_per_token(cfg, L, target_len=target_len) * B * target_len
    assert executed <= xla <= (1 + TOLERANCE) * executed


def test_a_scanned_layer_stack_is_counted_once_and_reported():
    report = aot.run(small("model.num_layers=2", "model.scan_layers=true"), jax.devices()[:1])
    assert report.xla_flops_caveats == ("scanned layers: loop body counted once, not 2 times "
                                        "(model.scan_layers=false unrolls it)",)
    assert report.xla_flops_per_device < 0.75 * report.executed_flops_per_step
    assert "not comparable" in aot.format_report(report, "cpu")


def test_caveats_name_every_loop_and_recomputation():
    cfg = small("model.num_layers=4", "model.scan_layers=true", "model.attention_kernel=auto", "model.remat=full",
                "optim.grad_accum_steps=2", "loss_chunk_size=32", "model.moe.num_experts=4",
                "model.moe.dropless=true")
    mesh = aot.prepare_mesh(cfg, jax.devices()[:1])
    caveats = "\n".join(aot.xla_flops_caveats(cfg, mesh, "cpu"))
    for text in ("scanned layers: loop body counted once, not 4 times", "accumulation: loop body counted once, not 2",
                 "chunked loss: loop body counted once, not 4", "blockwise", "remat='full'", "ragged_dot"):
        assert text in caveats
    assert "ragged_dot" not in "\n".join(aot.xla_flops_caveats(cfg, mesh, "tpu"))


def test_model_flops_conventions():
    m = small(*_moe_args("softmax_topk")).model
    D, F, V, HW = 128, m.ffn_dim, m.vocab_size, 2 * 64
    attention_weights, dense_ffn = 4 * D * HW, 3 * D * F
    dense = 6 * (2 * attention_weights + 2 * dense_ffn + D * V) + 12 * HW * L * 2
    moe = dense + 6 * (D * 8 + dense_ffn)  # router + a second active expert in the MoE layer
    assert flops_per_token(small("model.num_layers=2").model, L) == dense
    assert flops_per_token(m, L) == moe
    slots = 8 * expert_capacity(L, 8, 2, 1.25)  # 160 slots: 2.5 per token, all filled under expert choice
    assert flops_per_token(small(*_moe_args("expert_choice")).model, L) == moe + 6 * (slots / L - 2) * dense_ffn
    encoder = small("model.architecture=encoder", "model.num_layers=2", "model.sliding_window=8").model
    assert flops_per_token(encoder, L) == dense - 12 * HW * (L - 15) * 2  # bidirectional window: 2 w - 1 keys
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
        flops_per_token(m, 0)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v3", 61.5e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_per_device(kind, peak):
    assert metrics.peak_flops_per_device(kind) == peak


def test_mfu_uses_the_peak_of_every_device():
    assert metrics.mfu(2e5, 3e9, 4, "TPU v5 lite") == pytest.approx(2e5 * 3e9 / (4 * 197e12))
    assert metrics.mfu(2e5, 3e9, 4, "cpu") is None
