"""The decoder of the three-objective comparison on the KJV (CPU, minutes): next-token prediction with the same
width, depth, batch, windows and steps as kjv_objectives_mlm.py (encoder, masked LM) and kjv_objectives_t5.py
(encoder-decoder, span corruption).

    python -m transformer.train --config experiments/configs/kjv_objectives_decoder.py
    python -m transformer.evaluate run_dir=runs/kjv_objectives/decoder eval_batches=16
"""

from transformer.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig


def model(**changes) -> ModelConfig:
    """The shared model: d_model 128, 4 heads (2 kv heads), SwiGLU, RMSNorm, RoPE; 384 ids (bytes, PAD, BOS, EOS,
    MASK and the T5 sentinels from the top)."""
    return ModelConfig(vocab_size=384, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=128,
                       attention_block_size=64, **changes)


def config(name: str, model_cfg: ModelConfig) -> Config:
    return Config(model=model_cfg, data=DataConfig(dataset="kjv", seq_len=128, global_batch_size=16),
                  optim=OptimConfig(lr=2e-3, warmup_steps=30), steps=600, eval_every=200, eval_batches=8,
                  log_every=20, checkpoint=CheckpointConfig(every_steps=200), run_dir=f"runs/kjv_objectives/{name}")


def get_config() -> Config:
    return config("decoder", model())
