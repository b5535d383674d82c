"""Portable decode matrix-vector products (T == 1) on weights as stored (reference: linear).

    f16   q uint16 [n, d] (float16 bits)                  out[i] = sum_j f16(q[i, j]) x[j]
    int8  q int8 [n, d], s f32 [n]                        out[i] = s[i] sum_j q[i, j] x[j]
    int4  q uint8 [n, d/2] (Q4_0 nibble order), s uint16 [n, d/g] (float16 bits)
    q8_0  q int8 [n, d], s uint16 [n, d/32]              out[i] = sum_b s[i, b] sum_k q x
    q4_1  q uint8 [n, d/2], s uint16 [n, d/16] (step, min per block of 32)

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


@njit(cache=True, parallel=True)
def matvec_q8_0(q, s, x, lut, out):
    n, d = q.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for b in range(d // 32):
            part = np.float32(0.0)
            for k in range(32):
                part += np.float32(q[i, b * 32 + k]) * x[b * 32 + k]
            acc += part * lut[s[i, b]]
        out[i] = acc
    return out


@njit(cache=True, parallel=True)
def matvec_q4_1(q, s, x, lut, out):
    n, h = q.shape
    for i in prange(n):
        acc = np.float32(0.0)
        for b in range(h // 16):
            dot = np.float32(0.0)
            xsum = np.float32(0.0)
            for k in range(16):
                v = q[i, b * 16 + k]
                x0 = x[b * 32 + k]
                x1 = x[b * 32 + 16 + k]
                dot += np.float32(v & 15) * x0 + np.float32(v >> 4) * x1
                xsum += x0 + x1
            acc += dot * lut[s[i, 2 * b]] + xsum * lut[s[i, 2 * b + 1]]
        out[i] = acc
    return out


@njit(cache=True, inline="always")
def int3_code(q, o, j):
    """Code of value j (0..31) of the int3 run whose 12 bytes start at q[o] (encodings.pack_int3):
    two low bits from byte j % 8, the high bit from byte 8 + j // 8."""
    k = j & 7
    m = j >> 3
    return ((q[o + k] >> (2 * m)) & 3) | (((q[o + 8 + m] >> k) & 1) << 2)


@njit(cache=True, parallel=True)
def matvec_int3(q, s, g, x, lut, out):
    n = q.shape[0]
    bpg = g // 32
    for i in prange(n):
        acc = np.float32(0.0)
        for gi in range(s.shape[1]):
            part = np.float32(0.0)
            for b in range(gi * bpg, (gi + 1) * bpg):
                for j in range(32):
                    part += (np.float32(int3_code(q[i], b * 12, j)) - 4) * x[b * 32 + j]
            acc += part * lut[s[i, gi]]
        out[i] = acc
    return out
