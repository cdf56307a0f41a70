"""Training at 1M tokens per sequence: Ring Attention over every device of the mesh's sequence axis
(zigzag, so causal work is equal per device), full remat and a chunked output loss so that neither the
attention scores nor the 1M x vocab logits are ever materialised.

    python -m transformer.train --config experiments/configs/long_context_1m.py                  # all local devices
    python -m transformer.train --config experiments/configs/long_context_1m.py data.seq_len=131072   # shorter
    launch/local.sh --fake-devices 8 --config experiments/configs/long_context_1m.py \\
        data.seq_len=8192 model.d_model=128 model.num_heads=2 model.dtype=float32 steps=2          # CPU dry run

d_model 512 with head dim 128 is sized for one 80 GB GPU (compiled estimate ~50 GiB of temporaries
per step at 1M tokens; d_model 1024 needs ~90 GiB, so give it a ring of several GPUs).
The KJV corpus (4.3M bytes) holds four such sequences; point data.dataset=npy data.paths=... at a
larger tokenized corpus for real runs. Held-out evaluation is off: the held-out tail is shorter than 1M.
"""

from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(d_model=512, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=1 << 20, position="rope",
                          rope_theta=10_000_000.0, dtype="bfloat16", remat="full", attention_block_size=1024),
        mesh=MeshConfig(data=1, sequence=-1),
        data=DataConfig(dataset="kjv", seq_len=1 << 20, global_batch_size=1),
        optim=OptimConfig(lr=3e-4, warmup_steps=10),
        checkpoint=CheckpointConfig(every_steps=50, keep_last=2),
        steps=100, eval_every=0, log_every=1, loss_chunk_size=65536,
        run_dir="runs/long_context_1m",
    )
