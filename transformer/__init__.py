"""Sharded JAX/Flax NNX transformer language models.

Tensor names end in a shape suffix (`x_BLD`, `q_BQHW`, `scores_BGRQK`) spelled from this one legend;
each letter has one meaning everywhere in the library:

    B  batch rows                          L  sequence length (tokens of a row)
    Q  query length                        K  key/value length (attention kernels, where Q and K differ)
    S  source length (the encoder output cross-attention reads)
    D  model width (d_model)               F  feed-forward hidden width
    V  vocabulary                          W  head width (model.dim_per_head), J  rotary frequencies (W / 2)
    H  query heads                         G  key/value heads
    R  query heads per key/value head (H / G; GQA groups)
    E  experts                             C  expert capacity (token slots per expert)
    X  routing choices per token (top-k)   A  flattened (token, choice) assignments
    N  stacked layers (scanned parameters, per-layer statistics)
    O  relative-position buckets (rows of T5's bias table, `relative_bias_OH`)
    M  micro-batches (gradient accumulation)
    U  chunks a length is cut into (chunked loss), P  positions per chunk
    Z  examples of an evaluation set (prompts)
    Y  answer tokens of a prompt (passkey digits)
    T  tokens, any leading dims (token-wise functions: MoE routing)

Lower-case suffix letters name a block of the capital one inside a kernel (`q_BqGRW`: a chunk of
queries; `k_BkGW`: a block of keys).
"""
