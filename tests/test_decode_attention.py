"""The decode kernel against the float64 NumPy oracle: few queries over a cache with empty slots, any block
size (including lengths that are not a multiple of it), windows, ALiBi and GQA."""

import numpy as np
import pytest

from attention_oracle import np_attention
from transformer.inference.cache import EMPTY
from transformer.inference.decode_attention import decode_attention
from transformer.ops.mask import AttentionMask
from transformer.ops.positions import alibi_slopes


@pytest.mark.parametrize("K,block,Q", [(20, 8, 1), (24, 8, 3), (7, 8, 1), (37, 5, 2)])
@pytest.mark.parametrize("window,alibi", [(0, False), (4, False), (0, True)])
def test_decode_attention_matches_the_oracle(K, block, Q, window, alibi):
    rng = np.random.default_rng(K * block + Q)
    q = rng.normal(size=(2, Q, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, K, 2, 8)).astype(np.float32) for _ in range(2))
    q_pos = np.tile(np.arange(K - Q, K), (2, 1))
    kv_pos = np.tile(np.arange(K), (2, 1))
    kv_pos[1, K - 3:] = EMPTY  # row 1's last slots are empty
    slopes = alibi_slopes(4) if alibi else None
    mask = AttentionMask(causal=True, sliding_window=window, alibi_slopes=slopes)
    out, lse = decode_attention(q, k, v, mask, q_positions_BQ=q_pos, kv_positions_BK=kv_pos, block_size=block,
                                return_lse=True)
    want, want_lse = np_attention(q, k, v, causal=True, q_pos=q_pos, kv_pos=kv_pos, window=window, slopes=slopes)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
