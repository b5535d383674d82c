"""Fast decode matrix-vector products (T == 1) built on the SIMD intrinsics of simd.py.

int8 and int4 weights are multiplied with the activations quantized to int8 per block of 32
(simd.quantize_q8), integer products summed in SIMD lanes, one float multiply-add per block; this
adds a bounded error (tests/test_kernels.py states it). float16 weights are converted in SIMD
registers and multiplied with float32 activations (no extra error). Weights are read as stored:
q C-contiguous, rows addressed by byte offsets. `fast` selects the flavor of the intrinsics
(simd.py: AVX2 integer dot products and the CPU's float16 conversion, or the generic IR); both
are tested.
"""

import numpy as np
from numba import njit, prange

from .simd import (act_buffers, f16_dot_fast, f16_dot_generic, ld_f32, q4_dot_fast,
                   q4_dot_generic, q8_dot_fast, q8_dot_generic, q41_dot_fast, q41_dot_generic,
                   q80_dot_fast, q80_dot_generic, quantize_act, quantize_q8)


@njit(cache=True)
def group_shift(g):
    """log2(g / 32): blocks of 32 per scale group as a shift (g must be 32 * 2^k)."""
    k = 0
    while (32 << k) < g:
        k += 1
    return k


@njit(cache=True, parallel=True)
def matvec_int4(q, s, g, x, lut, out, fast):
    """q uint8 [n, d/2] (Q4_0 order), s uint16 [n, d/g] (float16 bits), x f32[d] -> out f32[n]."""
    n, h = q.shape
    d = 2 * h
    nb = d // 32
    xq, xs, xp, corr = act_buffers(d)
    quantize_act(x, xq, xs, xp, corr)
    gshift = group_shift(g)
    srow = 2 * s.shape[1]
    for i in prange(n):
        if fast:
            out[i] = q4_dot_fast(q, i * h, s, i * srow, gshift, nb, xp, corr, xs, lut)
        else:
            out[i] = q4_dot_generic(q, i * h, s, i * srow, gshift, nb, xp, corr, xs, lut)
    return out


@njit(cache=True, parallel=True)
def matvec_int8(q, s, x, out, fast):
    """q int8 [n, d], s f32[n], x f32[d] -> out f32[n]; a tail of d % 32 values in float32."""
    n, d = q.shape
    nb = d // 32
    xq, xs, _, _ = act_buffers(d)
    quantize_q8(x, xq, xs)
    for i in prange(n):
        if fast:
            v = q8_dot_fast(q, i * d, nb, xq, xs)
        else:
            v = q8_dot_generic(q, i * d, nb, xq, xs)
        for j in range(nb * 32, d):
            v += np.float32(q[i, j]) * x[j]
        out[i] = v * s[i]
    return out


@njit(cache=True, inline="always")
def f16_row(q, i, x, lut, fast):
    """Row i of q uint16 [n, d] (float16 bits) dot x f32[d]; a tail of d % 32 through lut."""
    d = q.shape[1]
    nv = d // 32
    if fast:
        v = f16_dot_fast(q, i * 2 * d, nv, x)
    else:
        v = f16_dot_generic(q, i * 2 * d, nv, x)
    for j in range(nv * 32, d):
        v += lut[q[i, j]] * x[j]
    return v


@njit(cache=True, parallel=True)
def matvec_f16(q, x, lut, out, fast):
    """q uint16 [n, d] (float16 bits), x f32[d] -> out f32[n]."""
    for i in prange(q.shape[0]):
        out[i] = f16_row(q, i, x, lut, fast)
    return out


@njit(cache=True, parallel=True)
def matvec_q8_0(q, s, x, lut, out, fast):
    """q int8 [n, d], s uint16 [n, d/32] (float16 bits), x f32[d] -> out f32[n]."""
    n, d = q.shape
    nb = d // 32
    xq, xs, _, _ = act_buffers(d)
    quantize_q8(x, xq, xs)
    for i in prange(n):
        if fast:
            out[i] = q80_dot_fast(q, i * d, s, i * 2 * nb, nb, xq, xs, lut)
        else:
            out[i] = q80_dot_generic(q, i * d, s, i * 2 * nb, nb, xq, xs, lut)
    return out


@njit(cache=True, parallel=True)
def matvec_q4_1(q, s, x, lut, out, fast):
    """q uint8 [n, d/2] (Q4_0 nibble order), s uint16 [n, d/16] ((step, min) float16 bits per
    block), x f32[d] -> out f32[n]."""
    n, h = q.shape
    d = 2 * h
    nb = d // 32
    xq, xs, xp, corr = act_buffers(d)
    quantize_act(x, xq, xs, xp, corr)
    for i in prange(n):
        if fast:
            out[i] = q41_dot_fast(q, i * h, s, i * 4 * nb, nb, xp, corr, xs, lut)
        else:
            out[i] = q41_dot_generic(q, i * h, s, i * 4 * nb, nb, xp, corr, xs, lut)
    return out


# ---------------------------------------------------------------------------------------------
# Several matrices of one encoding against the same x in one call (decode): the activations are
# quantized once and one parallel loop covers all rows. SmolLM2's 30 layers make per-call costs
# count (a call, its checks, a fork/join of the threads): q, k and v go through here together,
# and the FFN's separate down projection runs inside the FFN kernel (ffn.py).

F16, INT8, INT4, Q8_0, Q4_1 = 1, 2, 3, 4, 5  # ffn.ENC_CODES


@njit(cache=True, inline="always")
def row_dot(q, qo, s, so, enc, gshift, nb, xf, xq, xs, xp, corr, lut, fast):
    """Dot product of one encoded row (values at byte qo of q, scales at byte so of s; nb blocks
    of 32, no tail) with x: xf f32, or its int8 forms for integer encodings."""
    if enc == F16:
        if fast:
            return f16_dot_fast(q, qo, nb, xf)
        return f16_dot_generic(q, qo, nb, xf)
    if enc == INT8:
        if fast:
            v = q8_dot_fast(q, qo, nb, xq, xs)
        else:
            v = q8_dot_generic(q, qo, nb, xq, xs)
        return v * ld_f32(s, so)
    if enc == INT4:
        if fast:
            return q4_dot_fast(q, qo, s, so, gshift, nb, xp, corr, xs, lut)
        return q4_dot_generic(q, qo, s, so, gshift, nb, xp, corr, xs, lut)
    if enc == Q8_0:
        if fast:
            return q80_dot_fast(q, qo, s, so, nb, xq, xs, lut)
        return q80_dot_generic(q, qo, s, so, nb, xq, xs, lut)
    if fast:
        return q41_dot_fast(q, qo, s, so, nb, xp, corr, xs, lut)
    return q41_dot_generic(q, qo, s, so, nb, xp, corr, xs, lut)


@njit(cache=True, parallel=True)
def matvec3(enc, gshift, qrow, srow, q1, s1, q2, s2, q3, s3, x, lut, o1, o2, o3, fast):
    """o1 = M1 x, o2 = M2 x, o3 = M3 x for three matrices of one encoding with rows of d = 32 nb
    values (qrow, srow: bytes of values and of scales per row)."""
    d = x.shape[0]
    nb = d // 32
    xq, xs, xp, corr = act_buffers(d)
    if enc != F16:
        quantize_act(x, xq, xs, xp, corr)
    n1, n2, n3 = o1.shape[0], o2.shape[0], o3.shape[0]
    for r in prange(n1 + n2 + n3):
        if r < n1:
            o1[r] = row_dot(q1, r * qrow, s1, r * srow, enc, gshift, nb, x, xq, xs, xp, corr,
                            lut, fast)
        elif r < n1 + n2:
            i = r - n1
            o2[i] = row_dot(q2, i * qrow, s2, i * srow, enc, gshift, nb, x, xq, xs, xp, corr,
                            lut, fast)
        else:
            i = r - n1 - n2
            o3[i] = row_dot(q3, i * qrow, s3, i * srow, enc, gshift, nb, x, xq, xs, xp, corr,
                            lut, fast)
