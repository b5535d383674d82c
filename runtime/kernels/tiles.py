"""Dequantize a block of rows into a float32 tile, for prefill (T > 1) through BLAS matmul."""

import numpy as np
from numba import njit, prange

from .matvec import int3_code
from .simd import f16_axpy_fast, f16_axpy_generic, q4_axpy, q8_axpy, q41_axpy, q80_axpy


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


@njit(cache=True, parallel=True)
def dequant_int3(q, s, g, r0, r1, lut, out):
    nb = q.shape[1] // 12
    bpg = g // 32
    for r in prange(r1 - r0):
        i = r0 + r
        for b in range(nb):
            sc = lut[s[i, b // bpg]]
            for j in range(32):
                out[r, b * 32 + j] = (np.float32(int3_code(q[i], b * 12, j)) - 4) * sc
    return out


# SIMD versions (simd.py): each row is an axpy with a = 1 into a zeroed tile row, so the values
# are bit-identical to the codecs' dequantize ((nibble - 8) * s and q * s, one rounding each).


@njit(cache=True, parallel=True)
def dequant_int4_simd(q, s, gshift, r0, r1, lut, out):
    h = q.shape[1]
    nb = 2 * h // 32
    srow = 2 * s.shape[1]
    for r in prange(r1 - r0):
        row = out[r]
        row[:] = 0.0
        q4_axpy(row, q, (r0 + r) * h, s, (r0 + r) * srow, gshift, nb, np.float32(1.0), lut)
    return out


@njit(cache=True, parallel=True)
def dequant_int8_simd(q, s, r0, r1, out):
    d = q.shape[1]
    nb = d // 32
    for r in prange(r1 - r0):
        i = r0 + r
        row = out[r]
        row[:] = 0.0
        q8_axpy(row, q, i * d, nb, s[i])
        for j in range(nb * 32, d):
            row[j] = np.float32(q[i, j]) * s[i]
    return out


@njit(cache=True, parallel=True)
def dequant_f16_simd(q, r0, r1, lut, out, fast):
    d = q.shape[1]
    nv = d // 32
    for r in prange(r1 - r0):
        i = r0 + r
        row = out[r]
        row[:] = 0.0
        if fast:
            f16_axpy_fast(row, q, 2 * i * d, nv, np.float32(1.0))
        else:
            f16_axpy_generic(row, q, 2 * i * d, nv, np.float32(1.0))
        for j in range(nv * 32, d):
            row[j] = lut[q[i, j]]
    return out


# q8_0 and q4_1: the values are exactly the codecs' (and gguf.quants.dequantize's for a GGUF's
# blocks): code * scale, and code * step + min as a product then a sum (no fused multiply-add).


@njit(cache=True, parallel=True)
def dequant_q8_0(q, s, r0, r1, lut, out):
    d = q.shape[1]
    for r in prange(r1 - r0):
        i = r0 + r
        for b in range(d // 32):
            sc = lut[s[i, b]]
            for k in range(32):
                out[r, b * 32 + k] = np.float32(q[i, b * 32 + k]) * sc
    return out


@njit(cache=True, parallel=True)
def dequant_q4_1(q, s, r0, r1, lut, out):
    h = q.shape[1]
    for r in prange(r1 - r0):
        i = r0 + r
        for b in range(h // 16):
            st = lut[s[i, 2 * b]]
            mn = lut[s[i, 2 * b + 1]]
            for k in range(16):
                v = q[i, b * 16 + k]
                out[r, b * 32 + k] = np.float32(v & 15) * st + mn
                out[r, b * 32 + 16 + k] = np.float32(v >> 4) * st + mn
    return out


@njit(cache=True, parallel=True)
def dequant_q8_0_simd(q, s, r0, r1, lut, out):
    d = q.shape[1]
    nb = d // 32
    for r in prange(r1 - r0):
        row = out[r]
        row[:] = 0.0
        q80_axpy(row, q, (r0 + r) * d, s, (r0 + r) * 2 * nb, nb, np.float32(1.0), lut)
    return out


@njit(cache=True, parallel=True)
def dequant_q4_1_simd(q, s, r0, r1, lut, out):
    h = q.shape[1]
    nb = 2 * h // 32
    for r in prange(r1 - r0):
        row = out[r]
        row[:] = 0.0
        q41_axpy(row, q, (r0 + r) * h, s, (r0 + r) * 4 * nb, nb, np.float32(1.0), lut)
    return out
