"""T5-style span corruption on the KJV (CPU, minutes): an encoder-decoder with T5's relative position bias; 15% of
each window's tokens corrupted in spans of mean length 3, each span replaced by a sentinel in the encoder input and
spelled out after its sentinel in the decoder's target. The encoder and the decoder each have the depth of
kjv_objectives_decoder.py's model.

    python -m transformer.train --config experiments/configs/kjv_objectives_t5.py
    python -m transformer.evaluate run_dir=runs/kjv_objectives/t5 eval_batches=16   # span-corruption loss
    python -m transformer.generate run_dir=runs/kjv_objectives/t5 source="In the beginning God created the heaven" temperature=0
"""

from kjv_objectives_decoder import config, model


def get_config():
    return config("t5", model(architecture="encoder_decoder", position="t5_bias"))
