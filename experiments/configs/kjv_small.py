"""A 6-layer, 10M-parameter byte-level RoPE decoder on the King James Bible (GQA, SwiGLU, RMSNorm).

    python -m transformer.train --config experiments/configs/kjv_small.py
    python -m transformer.train --config experiments/configs/kjv_small.py mesh.fsdp=-1 mesh.data=1   # FSDP
    python -m transformer.evaluate run_dir=runs/kjv_small lengths=512,1024,2048,4096

Held-out loss is logged every 500 steps; the evaluate command measures extrapolation past the
training length of 512.
"""

from transformer.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2, max_seq_len=512,
                          position="rope", activation="swiglu", norm="rmsnorm"),
        data=DataConfig(dataset="kjv", seq_len=512, global_batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=3),
        steps=5000, eval_every=500, eval_batches=8, log_every=50,
        run_dir="runs/kjv_small",
    )
