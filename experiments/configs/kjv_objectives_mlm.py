"""BERT-style masked language model on the KJV (CPU, minutes): a bidirectional encoder; 15% of each window's tokens
selected (80% MASK, 10% a random byte, 10% kept) from the step index, the loss on the selected tokens only, the
documents inside a window kept apart by segment ids. Same model and budget as kjv_objectives_decoder.py.

    python -m transformer.train --config experiments/configs/kjv_objectives_mlm.py
    python -m transformer.evaluate run_dir=runs/kjv_objectives/mlm eval_batches=16   # masked-token accuracy
"""

from kjv_objectives_decoder import config, model


def get_config():
    return config("mlm", model(architecture="encoder"))
