"""Position encodings as pure functions: RoPE (with context-extension scalings), sinusoidal, ALiBi.

RoPE frequencies are computed in float64 NumPy at trace time (they depend only on static
hyper-parameters) and returned as float32, so every scaling rule is exact and testable.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _yarn_inv_freq(head_dim, theta, factor, original_max_len, beta_fast, beta_slow):
    """YaRN (Peng et al. 2023): interpolate dims that rotate < beta_slow times over the original context,
    keep dims that rotate > beta_fast times, linear ramp in between."""

    def correction_dim(num_rotations):
        return head_dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp
    inv_freq = _base_inv_freq(head_dim, theta)
    return inv_freq / factor * ramp + inv_freq * extrapolate


def _llama3_inv_freq(head_dim, theta, factor, original_max_len, low_freq_factor, high_freq_factor):
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, smooth blend in between."""
    inv_freq = _base_inv_freq(head_dim, theta)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


def yarn_mscale_factor(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 mscale ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rotation_scale(factor: float, mscale: float = 0.0, mscale_all_dim: float = 0.0) -> float:
    """YaRN's scale of the rotated q and k: yarn_mscale_factor(factor, 1), or with both of DeepSeek's mscale and
    mscale_all_dim the ratio of their factors (as transformers computes attention_factor)."""
    if mscale and mscale_all_dim:
        return yarn_mscale_factor(factor, mscale) / yarn_mscale_factor(factor, mscale_all_dim)
    return yarn_mscale_factor(factor, 1.0)


def rope_inv_freq(head_dim: int, *, theta: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                  original_max_len: int | None = None, seq_len: int | None = None, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  yarn_mscale: float = 0.0, yarn_mscale_all_dim: float = 0.0) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies (head_dim // 2,) float32 and the attention scale `mscale` for q and k.

    scaling: "none"; "linear" (position interpolation, inv_freq / factor); "ntk" (NTK-aware,
    theta * factor ** (d / (d - 2))); "dynamic_ntk" (NTK with factor grown from the current `seq_len`,
    identity while seq_len <= original_max_len); "yarn" (ramp between beta_fast and beta_slow rotations,
    mscale = `yarn_rotation_scale`: 0.1 ln(factor) + 1, or DeepSeek's ratio); "llama3" (wavelength bands from
    low/high_freq_factor).
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE head_dim={head_dim!r} must be a positive even integer")
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"unknown RoPE scaling {scaling!r}; choose one of {', '.join(map(repr, ROPE_SCALINGS))}")
    if not theta > 0:
        raise ValueError(f"RoPE theta={theta!r} must be > 0")
    if not factor >= 1.0:
        raise ValueError(f"RoPE scaling factor={factor!r} must be >= 1")
    needs_original = scaling in ("dynamic_ntk", "yarn", "llama3")
    if needs_original and (original_max_len is None or original_max_len <= 0):
        raise ValueError(f"RoPE scaling {scaling!r} needs original_max_len > 0, got {original_max_len!r}")
    d = head_dim
    mscale = 1.0
    if scaling == "none":
        inv_freq = _base_inv_freq(d, theta)
    elif scaling == "linear":
        inv_freq = _base_inv_freq(d, theta) / factor
    elif scaling == "ntk":
        inv_freq = _base_inv_freq(d, theta * factor ** (d / (d - 2))) if d > 2 else _base_inv_freq(d, theta)
    elif scaling == "dynamic_ntk":
        if seq_len is None or seq_len <= 0:
            raise ValueError(f"RoPE scaling 'dynamic_ntk' needs the current seq_len > 0, got {seq_len!r}")
        base = theta
        if seq_len > original_max_len and d > 2:
            base = theta * (factor * seq_len / original_max_len - (factor - 1)) ** (d / (d - 2))
        inv_freq = _base_inv_freq(d, base)
    elif scaling == "yarn":
        if not beta_fast > beta_slow > 0:
            raise ValueError(f"YaRN needs beta_fast > beta_slow > 0, got beta_fast={beta_fast}, beta_slow={beta_slow}")
        inv_freq = _yarn_inv_freq(d, theta, factor, original_max_len, beta_fast, beta_slow)
        mscale = yarn_rotation_scale(factor, yarn_mscale, yarn_mscale_all_dim)
    else:
        if not high_freq_factor > low_freq_factor > 0:
            raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor > 0, got "
                             f"low_freq_factor={low_freq_factor}, high_freq_factor={high_freq_factor}")
        inv_freq = _llama3_inv_freq(d, theta, factor, original_max_len, low_freq_factor, high_freq_factor)
    return inv_freq.astype(np.float32), float(mscale)


def apply_rope(x_BLHW, positions_BL, inv_freq, mscale: float = 1.0):
    """Rotate pairs (i, i + W/2) of the last axis by angle position * inv_freq[i] (rotate-half convention).
    inv_freq is (J,), or (B, J) for per-row frequencies."""
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    half = inv_freq.shape[-1]
    if x_BLHW.ndim != 4 or x_BLHW.shape[-1] != 2 * half:
        raise ValueError(f"apply_rope: x shape {tuple(x_BLHW.shape)} must be (B, L, H, {2 * half}) "
                         f"for {half} inverse frequencies")
    if tuple(positions_BL.shape) != tuple(x_BLHW.shape[:2]):
        raise ValueError(f"apply_rope: positions shape {tuple(positions_BL.shape)} must equal "
                         f"x's (B, L) = {tuple(x_BLHW.shape[:2])}")
    if inv_freq.ndim == 2:  # per-row frequencies (dynamic NTK at each row's length): (B, J)
        inv_freq = inv_freq[:, None, :]
    angle_BLJ = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    cos_BL1J = jnp.cos(angle_BLJ)[:, :, None, :] * mscale
    sin_BL1J = jnp.sin(angle_BLJ)[:, :, None, :] * mscale
    x = x_BLHW.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos_BL1J - x2 * sin_BL1J, x2 * cos_BL1J + x1 * sin_BL1J], axis=-1)
    return out.astype(x_BLHW.dtype)


def dynamic_ntk_inv_freq_BJ(head_dim: int, theta: float, factor: float, original_max_len: int, seq_len_B):
    """Dynamic NTK frequencies (as `rope_inv_freq`'s "dynamic_ntk") for a traced per-row current length,
    in float32; the training forward uses it too, so decode and the full forward rotate identically."""
    seq_len_B = jnp.asarray(seq_len_B, jnp.float32)
    d = head_dim
    grown_B = theta * (factor * seq_len_B / original_max_len - (factor - 1)) ** (d / (d - 2)) if d > 2 else theta
    base_B = jnp.where(seq_len_B > original_max_len, grown_B, theta)
    exponent_J = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    return 1.0 / base_B[:, None] ** exponent_J


def sinusoidal_embedding(positions_BL, d_model: int):
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)); float32 BLD."""
    if not isinstance(d_model, (int, np.integer)) or d_model <= 0 or d_model % 2:
        raise ValueError(f"sinusoidal_embedding: d_model={d_model!r} must be a positive even integer")
    inv_freq = jnp.asarray(_base_inv_freq(d_model, 10000.0), jnp.float32)
    angle_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.stack([jnp.sin(angle_BLF), jnp.cos(angle_BLF)], axis=-1)
    return emb.reshape(*positions_BL.shape, d_model)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022): geometric 2^(-8/n) for n a power of two; otherwise the slopes
    of the closest smaller power of two n' followed by every other slope of 2n'."""
    if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads={num_heads!r} must be a positive integer")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    def slopes(n):
        if n & (n - 1) == 0:
            return power_of_two(n)
        closest = 1 << (n.bit_length() - 1)
        return power_of_two(closest) + slopes(2 * closest)[0::2][: n - closest]

    return np.asarray(slopes(int(num_heads)), dtype=np.float32)
