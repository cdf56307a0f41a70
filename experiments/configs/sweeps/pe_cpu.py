"""Positional-encoding extrapolation sweep on 2 CPU cores: byte-level KJV at L=64, five encodings x 3 seeds.

    python experiments/pe_extrapolation.py --preset cpu
    python experiments/pe_extrapolation.py --sweep experiments/configs/sweeps/pe_cpu.py   # the same sweep

To make a new sweep, copy this file, edit it and pass the copy with --sweep; its results go to a folder of
their own. `base` is the config of every perplexity run (L = base.data.seq_len); each encoding column adds
its overrides ("unscaled": without the sqrt(d_model) token-embedding scale); `finetune` overrides the rope
column's config for a fine-tune from its parameters; `passkey` overrides base for one passkey model per
encoding, trained for ALiBi and learned positions after a copy-task stage (`passkey_curriculum`) whose
parameters it starts from. Learned positions get a table as long as the longest evaluated length.
"""

from transformer.config import CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig, OptimConfig

# 150 steps of copying 60 random bytes at L=128 before the passkey task. Pilot runs (seed 0), retrieval at L:
# ALiBi 0.00 after 600 passkey steps from scratch, 1.00 after copying and 400 steps; learned positions 0.08 from
# scratch, 0.8 after copying (600 steps). Copying keeps RoPE from learning the task (0.80 from scratch, 0.00 after
# copying: it learns to copy by relative offset), and sinusoidal learns it from scratch (1.00). NoPE learned it
# neither way (0.03 from scratch, 0.00 after copying and 400 steps).
COPY_STAGE = ("data.dataset=copy", "data.copy_length=60", "steps=150", "checkpoint.every_steps=75")


def get_config() -> dict:
    base = Config(
        model=ModelConfig(d_model=128, num_layers=2, num_heads=4, max_seq_len=64, attention_block_size=256),
        mesh=MeshConfig(data=1),
        data=DataConfig(dataset="kjv", seq_len=64, global_batch_size=8),
        optim=OptimConfig(lr=2e-3, warmup_steps=40),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=1),
        steps=400, eval_every=0, log_every=50, tensorboard=False,
    )
    return dict(
        base=base,
        encodings={
            "sinusoidal": ("model.position=sinusoidal",),
            "learned": ("model.position=learned",),
            "rope": ("model.position=rope",),
            "alibi": ("model.position=alibi",),
            "nope": ("model.position=nope",),
            "sinusoidal, unscaled": ("model.position=sinusoidal", "model.embed_scale=none"),
            "learned, unscaled": ("model.position=learned", "model.embed_scale=none"),
        },
        factors=(1, 2, 4, 8, 16),
        eval_sequences=8,
        rope="rope",
        rope_scalings=("linear", "ntk", "dynamic_ntk", "yarn"),
        sliding_window=True,
        finetune=("data.seq_len=256", "data.global_batch_size=2", "steps=100", "optim.lr=5e-4",
                  "optim.warmup_steps=10", "model.rope_scaling=yarn", "model.rope_scaling_factor=4"),
        finetune_label="rope + yarn fine-tune 4L",
        passkey=("data.dataset=passkey", "data.seq_len=128", "data.global_batch_size=16", "model.max_seq_len=128",
                 "steps=600", "optim.warmup_steps=20", "checkpoint.every_steps=150"),
        passkey_curriculum={"alibi": (COPY_STAGE,), "learned": (COPY_STAGE,)},
        passkey_skip=("sinusoidal, unscaled", "learned, unscaled"),
        passkey_factors=(1, 2, 4),
        passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
        passkey_trials=8,
        seeds=3,
    )
