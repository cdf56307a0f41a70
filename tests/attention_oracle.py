"""The tests' one independent attention oracle: dense float64 NumPy, sharing no code with transformer/."""

import numpy as np


def np_allowed(q_pos, kv_pos, q_seg=None, kv_seg=None, *, causal, window=0, prefix=0):
    """bool BQK from positions: causal (or the key in the prefix), window |dq| < w, equal segments."""
    dq = np.asarray(q_pos, np.int64)[:, :, None] - np.asarray(kv_pos, np.int64)[:, None, :]
    ok = np.ones(dq.shape, bool)
    if causal:
        ok &= (dq >= 0) | (np.asarray(kv_pos)[:, None, :] < prefix)
    if window:
        ok &= np.abs(dq) < window
    if q_seg is not None:
        ok &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    return ok


def np_attention(q, k, v, *, causal, q_pos=None, kv_pos=None, q_seg=None, kv_seg=None, window=0, prefix=0,
                 slopes=None, bias=None, scale=None, cot=None):
    """out BQHW and lse BHQ (a query that sees no key: out 0, lse -inf); with `cot`, also dq, dk, dv of
    sum(out * cot), and with `bias` (BHQK, added to the scaled scores) its gradient d bias BHQK last. Query head
    h reads kv head h // (H / G)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Q, H, W = q.shape
    K, G = k.shape[1], k.shape[2]
    R = H // G
    q_pos = np.tile(np.arange(Q), (B, 1)) if q_pos is None else np.broadcast_to(q_pos, (B, Q))
    kv_pos = np.tile(np.arange(K), (B, 1)) if kv_pos is None else np.broadcast_to(kv_pos, (B, K))
    scale = 1 / np.sqrt(W) if scale is None else scale
    kh, vh = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)
    s = np.einsum("bqhw,bkhw->bhqk", q, kh) * scale
    if slopes is not None:
        dist = np.abs(q_pos[:, :, None] - kv_pos[:, None, :]).astype(np.float64)
        s = s - np.asarray(slopes, np.float64)[None, :, None, None] * dist[:, None]
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    ok = np_allowed(q_pos, kv_pos, q_seg, kv_seg, causal=causal, window=window, prefix=prefix)[:, None]
    s = np.where(ok, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(ok, np.exp(s - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z > 0, z, 1.0)
    out = np.einsum("bhqk,bkhw->bqhw", p, vh)
    lse = np.where(z[..., 0] > 0, m[..., 0] + np.log(np.where(z[..., 0] > 0, z[..., 0], 1.0)), -np.inf)
    if cot is None:
        return out, lse
    cot = np.asarray(cot, np.float64)
    dvh = np.einsum("bhqk,bqhw->bkhw", p, cot)
    dp = np.einsum("bqhw,bkhw->bhqk", cot, vh)
    ds = p * (dp - np.einsum("bqhw,bqhw->bhq", cot, out)[..., None])
    dq = np.einsum("bhqk,bkhw->bqhw", ds, kh) * scale
    dkh = np.einsum("bhqk,bqhw->bkhw", ds, q) * scale
    group = lambda x: x.reshape(B, K, G, R, -1).sum(3)
    return (out, lse, dq, group(dkh), group(dvh)) + ((ds,) if bias is not None else ())
