"""Our decoder's parameters as a Hugging Face `transformers` model in memory (for experiments/bench_decode.py).

    model = hf_llama.to_hf(model_cfg, params)       # params: nnx.State / pure dict of the model's nnx.Params
    model.generate(input_ids, do_sample=False, max_new_tokens=64, use_cache=True)

The config and every tensor come from the library's converter (`transformer.hf.configs.hf_config`,
`transformer.hf.weights.export_tensors`; `python -m transformer.convert --to-hf` writes the same to disk). It is
meant for the bench's Llama-style models; other families are compared through `from_pretrained` of an exported
folder (tests/test_hf_convert.py).
"""

from __future__ import annotations

import numpy as np

from transformer.config import ModelConfig
from transformer.hf import configs, weights

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _pure(params) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def to_hf(cfg: ModelConfig, params, *, dtype: str = "float32", device: str = "cpu",
          attn_implementation: str = "sdpa", max_position_embeddings: int = 0):
    """The `transformers` model of cfg's family in eval mode holding our params (every tensor of its state dict
    set: a missing or unexpected name, or a wrong shape, raises)."""
    import torch
    import transformers

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    config = configs.hf_config(cfg)
    config.update(max_position_embeddings=max_position_embeddings or max(cfg.max_seq_len, 8192), pad_token_id=0,
                  bos_token_id=None, eos_token_id=None, use_cache=True)
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = attn_implementation
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    tensors = {name: torch.from_numpy(np.array(array, order="C"))
               for name, array in weights.export_tensors(cfg, _pure(params), np.float32)}
    result = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.eval()
