"""Positional-encoding extrapolation sweep on one GPU: byte-level KJV at L=512 with a d_model 512, 8-layer model,
five encodings, evaluated up to 16L; passkey models trained at 512 (ALiBi and learned after a copy-task stage) and tested up to 8L.

    python experiments/pe_extrapolation.py --preset gpu
    python experiments/pe_extrapolation.py --preset gpu --seeds 3   # with error bars

To make a new sweep, copy this file, edit it and pass the copy with --sweep (see pe_cpu.py for the fields).
"""

from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig

COPY_STAGE = ("data.dataset=copy", "data.copy_length=255", "steps=500", "optim.warmup_steps=50")  # see pe_cpu.py


def get_config() -> dict:
    base = Config(
        model=ModelConfig(d_model=512, num_layers=8, num_heads=8, max_seq_len=512, attention_block_size=512),
        mesh=MeshConfig(data=1),
        data=DataConfig(dataset="kjv", seq_len=512, global_batch_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=200),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=1),
        steps=3000, eval_every=0, log_every=100, tensorboard=False,
    )
    return dict(
        base=base,
        encodings={p: (f"model.position={p}",) for p in ("sinusoidal", "learned", "rope", "alibi", "nope")},
        factors=(1, 2, 4, 8, 16),
        eval_sequences=16,
        rope="rope",
        rope_scalings=("linear", "ntk", "dynamic_ntk", "yarn"),
        sliding_window=True,
        finetune=("data.seq_len=2048", "data.global_batch_size=8", "steps=300", "optim.lr=2.5e-4",
                  "optim.warmup_steps=30", "model.rope_scaling=yarn", "model.rope_scaling_factor=4"),
        finetune_label="rope + yarn fine-tune 4L",
        passkey=("data.dataset=passkey", "data.seq_len=512", "data.global_batch_size=32", "steps=2000",
                 "optim.warmup_steps=200"),
        passkey_curriculum={"alibi": (COPY_STAGE,), "learned": (COPY_STAGE,)},
        passkey_factors=(1, 2, 4, 8),
        passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
        passkey_trials=20,
        seeds=1,
    )
