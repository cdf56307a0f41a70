"""MoE routing sweep on 2 CPU cores: a byte-level KJV decoder with every layer MoE, 11 routing settings x 3 seeds.

    python experiments/moe_routing.py --preset cpu
    python experiments/moe_routing.py --sweep experiments/configs/sweeps/moe_cpu.py   # the same sweep

To make a new sweep, copy this file, edit `base` (the config of every run) or `runs` (one tuple of
config overrides per run), and pass the copy with --sweep; its results go to a folder of their own.
Capacity factor 1.25 and router z-loss off, so the balancing loss is the only force on the load.
"""

from transformer.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, MoEConfig,
                                OptimConfig)

COEFS = (0.0, 1e-3, 1e-2, 1e-1)


def get_config() -> dict:
    moe = MoEConfig(num_experts=8, top_k=2, router="softmax_topk", capacity_factor=1.25, load_balance_coef=1e-2,
                    router_z_loss_coef=0.0)
    base = Config(
        model=ModelConfig(d_model=64, num_layers=2, num_heads=4, max_seq_len=64, attention_block_size=64, moe=moe),
        mesh=MeshConfig(data=1),
        data=DataConfig(dataset="kjv", seq_len=64, global_batch_size=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=1),
        steps=200, log_every=10, eval_every=200, eval_batches=8, tensorboard=False,
    )
    runs = [(f"model.moe.load_balance_coef={c}",) for c in COEFS]
    runs += [(f"model.moe.num_experts={e}",) for e in (4, 16)]
    runs += [("model.moe.router=switch", "model.moe.top_k=1"),
             ("model.moe.router=switch", "model.moe.top_k=1", "model.moe.load_balance_coef=0"),
             ("model.moe.router=mixtral",), ("model.moe.router=expert_choice",),
             ("model.moe.router=sigmoid_bias", "model.moe.load_balance_coef=0")]
    return dict(base=base, runs=runs, seeds=3)
