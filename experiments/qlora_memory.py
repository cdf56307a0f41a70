"""Compiled train-step memory of a LoRA fine-tune with a float or an int8 base (lora.quantize_base), with and
without rematerialisation: XLA's memory_analysis on this machine's backend, nothing is run.

    python experiments/qlora_memory.py                 # d_model 512, 4 layers, rank 8 on attention and MLP
    python experiments/qlora_memory.py model.num_layers=8 ...   # any config override

Arguments hold the state (the frozen base, adapters, their AdamW moments) and the batch; temp is the step's
working memory. With model.remat=none the backward keeps a float copy of every dequantized weight, which is why
`lora.quantize_base=int8` requires a remat policy.
"""

import dataclasses
import sys

from transformer import aot, sharding
from transformer.config import config_from_args

BASE = ["--preset", "tiny", "checkpoint.init_from=unused", "model.d_model=512", "model.num_layers=4",
        "model.num_heads=8", "model.d_ff=2048", "data.seq_len=128", "data.global_batch_size=4", "mesh.data=1",
        "lora.rank=8", "lora.targets=attention,mlp", "model.remat=dots_saveable"]


def main(overrides: list[str]) -> None:
    for quantize, remat in (("none", "none"), ("int8", "none"), ("none", "dots_saveable"), ("int8", "dots_saveable")):
        cfg = config_from_args([*BASE, *overrides, f"lora.quantize_base={quantize}"])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))  # int8 + none: refused
        compiled, _ = aot.compile_train_step(cfg, sharding.make_mesh(cfg.mesh))  # by validate, measured anyway
        memory = compiled.memory_analysis()
        print(f"lora.quantize_base={quantize:4} model.remat={remat:13} arguments "
              f"{memory.argument_size_in_bytes / 2**20:7.2f} MiB  temp {memory.temp_size_in_bytes / 2**20:7.2f} MiB",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
