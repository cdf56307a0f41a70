"""A byte-level MoE decoder on the King James Bible: 8 experts, top-2 softmax routing in every second
layer, capacity factor 1.25 (dropped tokens ride the residual), Switch load-balancing loss 1e-2 and
router z-loss 1e-3. Routing health (per-layer expert load, max/mean, CV, dropped fraction, router
entropy, expert reuse) is in metrics.jsonl and TensorBoard under moe/.

    python -m transformer.train --config experiments/configs/moe_kjv.py
    python -m transformer.train --config experiments/configs/moe_kjv.py mesh.expert=4 mesh.data=-1   # expert parallel
    python -m transformer.train --config experiments/configs/moe_kjv.py model.moe.router=sigmoid_bias model.moe.load_balance_coef=0
"""

from transformer.config import Config, DataConfig, ModelConfig, MoEConfig, OptimConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(d_model=256, num_layers=6, num_heads=4, max_seq_len=256,
                          moe=MoEConfig(num_experts=8, top_k=2, every_k_layers=2, router="softmax_topk",
                                        capacity_factor=1.25, load_balance_coef=1e-2, router_z_loss_coef=1e-3)),
        data=DataConfig(dataset="kjv", seq_len=256, global_batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200),
        steps=3000, eval_every=250, log_every=25,
        run_dir="runs/moe_kjv",
    )
