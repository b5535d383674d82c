"""Dequantize a block of rows into a float32 tile, for prefill (T > 1) through BLAS matmul."""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def dequant_f16(q, r0, r1, lut, out):
    d = q.shape[1]
    for r in prange(r1 - r0):
        for j in range(d):
            out[r, j] = lut[q[r0 + r, j]]
    return out


@njit(cache=True, parallel=True)
def dequant_int8(q, s, r0, r1, out):
    d = q.shape[1]
    for r in prange(r1 - r0):
        sc = s[r0 + r]
        for j in range(d):
            out[r, j] = np.float32(q[r0 + r, j]) * sc
    return out


@njit(cache=True, parallel=True)
def dequant_int4(q, s, g, r0, r1, lut, out):
    h = q.shape[1]
    bpg = g // 32
    for r in prange(r1 - r0):
        i = r0 + r
        for b in range(h // 16):
            sc = lut[s[i, b // bpg]]
            for k in range(16):
                v = q[i, b * 16 + k]
                out[r, b * 32 + k] = (np.float32(v & 15) - 8) * sc
                out[r, b * 32 + 16 + k] = (np.float32(v >> 4) - 8) * sc
    return out
