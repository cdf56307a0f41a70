"""A translation-style seq2seq model (CPU, minutes): an encoder-decoder trained to reverse 24 random bytes
(data.dataset=reverse; `sort` and `copy` work the same way, `pairs` reads a JSONL of {"source", "target"}).

    python -m transformer.train --config experiments/configs/reverse_t5.py
    python -m transformer.evaluate run_dir=runs/reverse_t5
    python -m transformer.generate run_dir=runs/reverse_t5 source="abcdefghijklmnopqrstuvwx" temperature=0
"""

from transformer.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(architecture="encoder_decoder", position="t5_bias", vocab_size=259, d_model=128,
                          num_layers=2, num_heads=4, max_seq_len=32, attention_block_size=32),
        data=DataConfig(dataset="reverse", copy_length=24, seq_len=32, global_batch_size=32),
        optim=OptimConfig(lr=2e-3, warmup_steps=30), steps=500, eval_every=250, eval_batches=4, log_every=25,
        checkpoint=CheckpointConfig(every_steps=250), run_dir="runs/reverse_t5")
