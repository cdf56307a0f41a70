"""MoE routing sweep on one GPU: a byte-level KJV decoder (d_model 512, 8 layers, all MoE, bf16), 11 routing
settings around 16 experts top-2.

    python experiments/moe_routing.py --preset gpu
    python experiments/moe_routing.py --preset gpu --seeds 3   # with error bars

To make a new sweep, copy this file, edit `base` or `runs` (one tuple of config overrides per run), and pass
the copy with --sweep. Capacity factor 1.25 and router z-loss off.
"""

from transformer.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, MoEConfig,
                                OptimConfig)

COEFS = (0.0, 1e-3, 1e-2, 1e-1)


def get_config() -> dict:
    moe = MoEConfig(num_experts=16, top_k=2, router="softmax_topk", capacity_factor=1.25, load_balance_coef=1e-2,
                    router_z_loss_coef=0.0)
    base = Config(
        model=ModelConfig(d_model=512, num_layers=8, num_heads=8, max_seq_len=512, attention_block_size=512,
                          dtype="bfloat16", moe=moe),
        mesh=MeshConfig(data=1),
        data=DataConfig(dataset="kjv", seq_len=512, global_batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=50),
        checkpoint=CheckpointConfig(every_steps=250, keep_last=1),
        steps=500, log_every=20, eval_every=500, eval_batches=16, tensorboard=False,
    )
    runs = [(f"model.moe.load_balance_coef={c}",) for c in COEFS]
    runs += [(f"model.moe.num_experts={e}",) for e in (8, 32)]
    runs += [("model.moe.router=switch", "model.moe.top_k=1"),
             ("model.moe.router=switch", "model.moe.top_k=1", "model.moe.load_balance_coef=0"),
             ("model.moe.router=mixtral",), ("model.moe.router=expert_choice",),
             ("model.moe.router=sigmoid_bias", "model.moe.load_balance_coef=0")]
    return dict(base=base, runs=runs, seeds=1)
