"""Scalar quantization, CPU reference (numpy). Every step is exact integer or single IEEE
fp32 operation, so the GPU kernels reproduce it bit for bit.

Scales (one per group of elements; groups set by the level's k_scale / v_scale):
    meanabs: amax = max|x| (exact), E = frexp exponent of amax,
             m_i = floor(|x_i| * 2^(20 - E)) summed in int64 (order-free, exact),
             mean = sum // count, code = 8 * floor(log2 mean) + next 3 bits of mean
             (a 1/8-octave log code); stored as uint8 below the tensor's largest code.
    absmax:  the group's max|x| rounded to fp16 (CacheGen).
Step = fp32(alpha * band) * scale; inv = 1 / step (fp32). q = round-half-away(x * inv),
computed as t = trunc(y), q = t + [y >= t + 0.5] - [y <= t - 0.5], so no fused multiply-add
can change a result. |q| > max_q is an escape: the exact element is sent sparse.
Reconstruction: x_hat = fp32(q * step) cast to the tensor dtype (round to nearest even).
"""

from __future__ import annotations

import numpy as np

FRAC_BITS = 20
CODE_ZERO = -8 * 100          # code of an all-zero group: a tiny step, every q is 0
Y_CLAMP = float(1 << 20)


def meanabs_codes(g: np.ndarray) -> np.ndarray:
    """[G, m] float32 -> [G] int64 log2 codes of each row's mean |x|."""
    a = np.abs(g.astype(np.float32))
    amax = a.max(1)
    _, e = np.frexp(amax)
    e = e.astype(np.int64)
    mi = np.floor(np.ldexp(a.astype(np.float64), (FRAC_BITS - e)[:, None])).astype(np.int64)
    mean = np.maximum(mi.sum(1) // a.shape[1], 1)
    _, b = np.frexp(mean.astype(np.float64))
    b = b.astype(np.int64)
    frac = np.where(b >= 4, mean >> np.maximum(b - 4, 0), mean << np.maximum(4 - b, 0)) & 7
    code = 8 * (b - 1 + e - FRAC_BITS) + frac
    return np.where(amax > 0, code, CODE_ZERO)


def decode_codes(code: np.ndarray) -> np.ndarray:
    """int codes -> fp32 scales 2^floor(code/8) * (1 + (code%8 + 0.5)/8)."""
    code = code.astype(np.int64)
    e = np.clip(code >> 3, -100, 100)
    frac = code & 7
    return np.ldexp((1.0 + (frac + 0.5) / 8.0).astype(np.float32), e.astype(np.int32)).astype(np.float32)


def pack_codes(code: np.ndarray) -> tuple[int, bytes]:
    """(base, uint8 offsets below base); offsets saturate at 255 (32 octaves below the top)."""
    base = int(code.max()) if code.size else 0
    rel = np.clip(base - code, 0, 255).astype(np.uint8)
    return base, rel.tobytes()


def unpack_codes(base: int, rel: np.ndarray) -> np.ndarray:
    return base - rel.astype(np.int64)


def absmax_scales(g: np.ndarray) -> np.ndarray:
    """[G, m] -> [G] fp16 absmax (CacheGen), finite, zero kept zero."""
    amax = np.abs(g.astype(np.float32)).max(1)
    return np.minimum(amax, 65504.0).astype(np.float16)


def steps_from_scales(scale: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """fp32 scales -> (step, inv_step) fp32; a zero scale gets step 1."""
    scale = scale.astype(np.float32)
    step = np.float32(alpha) * scale
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / step).astype(np.float32)
    return step, inv


def quantize(x: np.ndarray, inv: np.ndarray, max_q: int) -> tuple[np.ndarray, np.ndarray]:
    """x, inv broadcastable fp32 -> (symbols uint8, escape mask). Symbol = q + max_q; escape = 2*max_q+1."""
    y = (x.astype(np.float32) * inv.astype(np.float32)).astype(np.float32)
    y = np.clip(y, -Y_CLAMP, Y_CLAMP)
    t = np.trunc(y)
    q = t + (y >= t + np.float32(0.5)) - (y <= t - np.float32(0.5))
    q = q.astype(np.int32)
    esc = np.abs(q) > max_q
    sym = np.where(esc, 2 * max_q + 1, q + max_q).astype(np.uint8)
    return sym, esc


def dequantize(sym: np.ndarray, step: np.ndarray, max_q: int) -> np.ndarray:
    """symbols -> fp32 values (escapes come out as 0; the caller scatters exact values)."""
    q = sym.astype(np.int32) - max_q
    q = np.where(sym.astype(np.int32) == 2 * max_q + 1, 0, q)
    return (q.astype(np.float32) * step.astype(np.float32)).astype(np.float32)
