"""Portable decode matrix-vector products (T == 1) on weights as stored (reference: linear).

    f16   q uint16 [n, d] (float16 bits)                  out[i] = sum_j f16(q[i, j]) x[j]
    int8  q int8 [n, d], s f32 [n]                        out[i] = s[i] sum_j q[i, j] x[j]
    int4  q uint8 [n, d/2] (Q4_0 nibble order), s uint16 [n, d/g] (float16 bits)

These kernels keep x in float32, so they are exact up to float32 summation order; they are the
fallback when the SIMD kernels (simd.py) are unavailable or the shape does not suit them.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def matvec_f16(q, x, lut, out):
    n, d = q.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(d):
            acc += lut[q[i, j]] * x[j]
        out[i] = acc
    return out


@njit(cache=True, parallel=True)
def matvec_int8(q, s, x, out):
    n, d = q.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for j in range(d):
            acc += np.float32(q[i, j]) * x[j]
        out[i] = acc * s[i]
    return out


@njit(cache=True, parallel=True)
def matvec_int4(q, s, g, x, lut, out):
    n, h = q.shape
    bpg = g // 32  # blocks of 32 per scale group
    for i in prange(n):
        acc = np.float32(0.0)
        for gi in range(s.shape[1]):
            part = np.float32(0.0)
            for b in range(gi * bpg, (gi + 1) * bpg):
                for k in range(16):
                    v = q[i, b * 16 + k]
                    part += (np.float32(v & 15) - 8) * x[b * 32 + k]
                    part += (np.float32(v >> 4) - 8) * x[b * 32 + 16 + k]
            acc += part * lut[s[i, gi]]
        out[i] = acc
    return out
