"""Feed-forward network straight from row-column bundles (reference: reference.ffn).

A bundle row holds one neuron's gate row, up row and down column (OPT: fc1 row, fc2 column), each
in its own encoding at a byte offset (encodings.bundle_layout). Parts are described to the kernels
by small arrays indexed by slot (0 gate, 1 up, 2 down): encoding code, value offset, scale offset
(bytes) and group size.

Decode (T == 1) reads each row once: gate and up dot products, the activation, then the down
column accumulated into a per-chunk partial sum (one chunk per thread), summed at the end.
Prefill (T > 1) dequantizes blocks of rows into float32 tiles and uses BLAS.
"""

import numpy as np
from numba import njit, prange

from .simd import (act_buffers, f16_axpy_fast, f16_axpy_generic, f16_dot_fast, f16_dot_generic,
                   f32_axpy, f32_dot, ld_f32, ld_i8, ld_u16, q4_axpy, q4_dot_fast, q4_dot_generic,
                   prefetch, q8_axpy, q8_dot_fast, q8_dot_generic, q41_axpy, q41_dot_fast,
                   q41_dot_generic, q80_axpy, q80_dot_fast, q80_dot_generic, quantize_act)
from .matvec import int3_code
from .qmatvec import row_dot
from .rows16 import R as _R16
from .rows16 import bundle_dot, bundle_dot2, group_dot, silu_mul16

F32, F16, INT8, INT4, Q8_0, Q4_1, INT3 = 0, 1, 2, 3, 4, 5, 6
INT4R = 7  # int4 packed 16 rows a group (rows16.py): decode's matrices read in memory
NONE = -1  # slot without a part: the down projection is a separate matrix (hidden written out)
ENC_CODES = {"f32": F32, "f16": F16, "int8": INT8, "int4": INT4, "q8_0": Q8_0, "q4_1": Q4_1,
             "int3": INT3}  # int3: portable kernels only (part_dot, part_axpy)
SILU, RELU = 0, 1
ACT_CODES = {"silu": SILU, "relu": RELU}


@njit(cache=True)
def part_dot(row, enc, off, soff, g, d, x, lut):
    """Dot product of one encoded part of a bundle row with x f32[d]."""
    acc = np.float32(0.0)
    if enc == F32:
        w = row.view(np.float32)
        o = off // 4
        for j in range(d):
            acc += w[o + j] * x[j]
    elif enc == F16:
        w = row.view(np.uint16)
        o = off // 2
        for j in range(d):
            acc += lut[w[o + j]] * x[j]
    elif enc == INT8:
        w = row.view(np.int8)
        for j in range(d):
            acc += np.float32(w[off + j]) * x[j]
        acc *= row.view(np.float32)[soff // 4]
    elif enc == Q8_0:
        w = row.view(np.int8)
        sc = row.view(np.uint16)
        for b in range(d // 32):
            part = np.float32(0.0)
            for k in range(32):
                part += np.float32(w[off + b * 32 + k]) * x[b * 32 + k]
            acc += part * lut[sc[soff // 2 + b]]
    elif enc == Q4_1:
        sc = row.view(np.uint16)
        for b in range(d // 32):
            dot = np.float32(0.0)
            xsum = np.float32(0.0)
            for k in range(16):
                v = row[off + b * 16 + k]
                dot += np.float32(v & 15) * x[b * 32 + k] + np.float32(v >> 4) * x[b * 32 + 16 + k]
                xsum += x[b * 32 + k] + x[b * 32 + 16 + k]
            acc += dot * lut[sc[soff // 2 + 2 * b]] + xsum * lut[sc[soff // 2 + 2 * b + 1]]
    elif enc == INT3:
        sc = row.view(np.uint16)
        bpg = g // 32
        for gi in range(d // g):
            part = np.float32(0.0)
            for b in range(gi * bpg, (gi + 1) * bpg):
                for j in range(32):
                    part += (np.float32(int3_code(row, off + b * 12, j)) - 4) * x[b * 32 + j]
            acc += part * lut[sc[soff // 2 + gi]]
    else:
        sc = row.view(np.uint16)
        bpg = g // 32
        for gi in range(d // g):
            part = np.float32(0.0)
            for b in range(gi * bpg, (gi + 1) * bpg):
                for k in range(16):
                    v = row[off + b * 16 + k]
                    part += (np.float32(v & 15) - 8) * x[b * 32 + k]
                    part += (np.float32(v >> 4) - 8) * x[b * 32 + 16 + k]
            acc += part * lut[sc[soff // 2 + gi]]
    return acc


@njit(cache=True)
def part_axpy(row, enc, off, soff, g, d, a, acc, lut):
    """acc f32[d] += a * (one encoded part of a bundle row)."""
    if enc == F32:
        w = row.view(np.float32)
        o = off // 4
        for j in range(d):
            acc[j] += a * w[o + j]
    elif enc == F16:
        w = row.view(np.uint16)
        o = off // 2
        for j in range(d):
            acc[j] += a * lut[w[o + j]]
    elif enc == INT8:
        w = row.view(np.int8)
        a = a * row.view(np.float32)[soff // 4]
        for j in range(d):
            acc[j] += a * np.float32(w[off + j])
    elif enc == Q8_0:
        w = row.view(np.int8)
        sc = row.view(np.uint16)
        for b in range(d // 32):
            ab = a * lut[sc[soff // 2 + b]]
            for k in range(32):
                acc[b * 32 + k] += np.float32(w[off + b * 32 + k]) * ab
    elif enc == Q4_1:
        sc = row.view(np.uint16)
        for b in range(d // 32):
            st = a * lut[sc[soff // 2 + 2 * b]]
            mn = a * lut[sc[soff // 2 + 2 * b + 1]]
            for k in range(16):
                v = row[off + b * 16 + k]
                acc[b * 32 + k] += np.float32(v & 15) * st + mn
                acc[b * 32 + 16 + k] += np.float32(v >> 4) * st + mn
    elif enc == INT3:
        sc = row.view(np.uint16)
        bpg = g // 32
        for b in range(d // 32):
            ab = a * lut[sc[soff // 2 + b // bpg]]
            for j in range(32):
                acc[b * 32 + j] += ab * (np.float32(int3_code(row, off + b * 12, j)) - 4)
    else:
        sc = row.view(np.uint16)
        bpg = g // 32
        for b in range(d // 32):
            ab = a * lut[sc[soff // 2 + b // bpg]]
            for k in range(16):
                v = row[off + b * 16 + k]
                acc[b * 32 + k] += ab * (np.float32(v & 15) - 8)
                acc[b * 32 + 16 + k] += ab * (np.float32(v >> 4) - 8)


@njit(cache=True)
def act(v, kind):
    if kind == SILU:
        return v / (np.float32(1.0) + np.exp(-v))
    return max(v, np.float32(0.0))


@njit(cache=True, parallel=True)
def ffn_decode(x, bundles, encs, offs, soffs, gs, d, kind, gated, up_bias, has_bias, lut, partial,
               hidden):
    """x f32[d] -> sum over rows of h_i * down_i; partial f32[nchunks, d] is scratch. Without
    a down part (encs[2] == NONE) h_i goes to hidden f32[n] instead (and the sum is zero)."""
    n = bundles.shape[0]
    nchunks = partial.shape[0]
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        acc = partial[c]
        acc[:] = 0.0
        for i in range(c * per, min(n, (c + 1) * per)):
            row = bundles[i]
            u = part_dot(row, encs[1], offs[1], soffs[1], gs[1], d, x, lut)
            if gated:
                h = act(part_dot(row, encs[0], offs[0], soffs[0], gs[0], d, x, lut), kind) * u
            else:
                if has_bias:
                    u += up_bias[i]
                h = act(u, kind)
            if encs[2] == NONE:
                hidden[i] = h
            elif h != 0:
                part_axpy(row, encs[2], offs[2], soffs[2], gs[2], d, h, acc, lut)
    out = np.zeros(d, dtype=np.float32)
    for c in range(nchunks):
        for j in range(d):
            out[j] += partial[c, j]
    return out


@njit(cache=True, parallel=True)
def dequant_part_simd(bundles, r0, r1, enc, off, soff, gshift, d, lut, out, fast):
    """As dequant_part, with the SIMD axpys (bit-identical values)."""
    stride = bundles.shape[1]
    for r in prange(r1 - r0):
        o = out[r]
        o[:] = 0.0
        simd_part_axpy(bundles, (r0 + r) * stride, enc, off, soff, gshift, d, np.float32(1.0), o,
                       lut, fast)
    return out


@njit(cache=True, parallel=True)
def dequant_part(bundles, r0, r1, enc, off, soff, g, d, lut, out):
    """Rows r0..r1 of one part -> out f32[r1 - r0, d]."""
    for r in prange(r1 - r0):
        o = out[r]
        o[:] = 0.0
        part_axpy(bundles[r0 + r], enc, off, soff, g, d, np.float32(1.0), o, lut)
    return out


# ---------------------------------------------------------------------------------------------
# SIMD decode (simd.py): int8/int4 parts against int8-quantized activations, float16 in registers


@njit(cache=True, inline="always")
def simd_part_dot(b, base, enc, off, soff, gshift, d, x, xq, xs, xp, corr, lut, fast):
    """Dot product of the part at byte base + off of bundles b with x; no array views."""
    o = base + off
    nv = d // 32
    if enc == F32:
        acc = f32_dot(b, o, nv, x)
        for j in range(nv * 32, d):
            acc += ld_f32(b, o + 4 * j) * x[j]
        return acc
    if enc == F16:
        if fast:
            acc = f16_dot_fast(b, o, nv, x)
        else:
            acc = f16_dot_generic(b, o, nv, x)
        for j in range(nv * 32, d):
            acc += lut[ld_u16(b, o + 2 * j)] * x[j]
        return acc
    if enc == INT8:
        if fast:
            acc = q8_dot_fast(b, o, nv, xq, xs)
        else:
            acc = q8_dot_generic(b, o, nv, xq, xs)
        for j in range(nv * 32, d):
            acc += np.float32(ld_i8(b, o + j)) * x[j]
        return acc * ld_f32(b, base + soff)
    if enc == Q8_0:
        if fast:
            return q80_dot_fast(b, o, b, base + soff, nv, xq, xs, lut)
        return q80_dot_generic(b, o, b, base + soff, nv, xq, xs, lut)
    if enc == Q4_1:
        if fast:
            return q41_dot_fast(b, o, b, base + soff, nv, xp, corr, xs, lut)
        return q41_dot_generic(b, o, b, base + soff, nv, xp, corr, xs, lut)
    if fast:
        return q4_dot_fast(b, o, b, base + soff, gshift, nv, xp, corr, xs, lut)
    return q4_dot_generic(b, o, b, base + soff, gshift, nv, xp, corr, xs, lut)


@njit(cache=True, inline="always")
def simd_part_axpy(b, base, enc, off, soff, gshift, d, a, acc, lut, fast):
    """acc += a * (the part at byte base + off of bundles b); no array views."""
    o = base + off
    nv = d // 32
    if enc == F32:
        f32_axpy(acc, b, o, nv, a)
        for j in range(nv * 32, d):
            acc[j] += a * ld_f32(b, o + 4 * j)
    elif enc == F16:
        if fast:
            f16_axpy_fast(acc, b, o, nv, a)
        else:
            f16_axpy_generic(acc, b, o, nv, a)
        for j in range(nv * 32, d):
            acc[j] += a * lut[ld_u16(b, o + 2 * j)]
    elif enc == INT8:
        a = a * ld_f32(b, base + soff)
        q8_axpy(acc, b, o, nv, a)
        for j in range(nv * 32, d):
            acc[j] += a * np.float32(ld_i8(b, o + j))
    elif enc == Q8_0:
        q80_axpy(acc, b, o, b, base + soff, nv, a, lut)
    elif enc == Q4_1:
        q41_axpy(acc, b, o, b, base + soff, nv, a, lut)
    else:
        q4_axpy(acc, b, o, b, base + soff, gshift, nv, a, lut)


@njit(cache=True, parallel=True)
def ffn_output(hidden, partial, d, dq, ds, denc, dshift, dqrow, dsrow, lut, fast):
    """The FFN's output once its rows are done: with a down matrix of its own (denc != NONE) that
    matrix times the hidden activations, else the sum of the per-thread partial accumulators."""
    if denc != NONE:
        nh = hidden.shape[0]
        hq, hs, hp, hc = act_buffers(nh)
        if denc != F16:
            quantize_act(hidden, hq, hs, hp, hc)
        out = np.empty(d, dtype=np.float32)
        if denc == INT4R:
            for g in prange(d // _R16):
                group_dot(dq, ds, g, dshift, nh // 32, hq, hc, hs, lut, out, _R16 * g, fast)
            return out
        for r in prange(d):
            out[r] = row_dot(dq, r * dqrow, ds, r * dsrow, denc, dshift, nh // 32, hidden, hq, hs,
                             hp, hc, lut, fast)
        return out
    out = np.zeros(d, dtype=np.float32)
    for c in range(partial.shape[0]):
        for j in range(d):
            out[j] += partial[c, j]
    return out


@njit(cache=True, parallel=True)
def ffn_hidden_packed(x, b, offs, soffs, unit, gshift, kind, gated, up_bias, has_bias, lut,
                      hidden, fast):
    """hidden = act(gate x) * (up x), or act(up x + bias), of FFN bundle rows packed 16 a group
    (rows16.pack_bundles: b uint8 [n/16, 16 stride] in units of `unit` bytes; slot 0 gate, 1 up:
    offs, soffs their values' and scales' bytes within a unit)."""
    xq, xs, xp, corr = act_buffers(x.shape[0])
    quantize_act(x, xq, xs, xp, corr)
    up = np.empty(hidden.shape[0], dtype=np.float32)
    for g in prange(b.shape[0]):
        packed_group(g, x.shape[0] // 32, xq, corr, xs, b, offs, soffs, unit, gshift, kind,
                     gated, up_bias, has_bias, lut, hidden, up, fast)
    return hidden


@njit(cache=True, inline="always")
def packed_group(g, nb, xq, corr, xs, b, offs, soffs, unit, gshift, kind, gated, up_bias,
                 has_bias, lut, hidden, up, fast):
    """ffn_hidden_packed's group g: hidden (and up, scratch) rows 16 g .. 16 g + 15."""
    base, r0 = g * b.shape[1], _R16 * g
    if gated:  # pack_bundles puts up right after gate
        bundle_dot2(b, base + offs[0], base + soffs[0], unit, gshift, nb, xq, corr, xs, lut,
                    hidden, up, r0, fast)
        if fast and kind == SILU:
            silu_mul16(hidden, up, r0)
        else:
            for r in range(r0, r0 + _R16):
                hidden[r] = act(hidden[r], kind) * up[r]
    else:
        bundle_dot(b, base + offs[1], base + soffs[1], unit, gshift, nb, xq, corr, xs, lut, up,
                   r0, fast)
        for r in range(r0, r0 + _R16):
            hidden[r] = act(up[r] + up_bias[r] if has_bias else up[r], kind)


@njit(cache=True, parallel=True)
def ffn_decode_simd(x, bundles, encs, offs, soffs, gshifts, d, kind, gated, up_bias, has_bias,
                    lut, partial, hidden, dq, ds, denc, dshift, dqrow, dsrow, fast):
    """As ffn_decode, with the SIMD dot products and axpys; gshifts[slot] = log2(g / 32). With
    denc != NONE the down projection is a matrix of its own (values dq, scales ds, dqrow and
    dsrow bytes per row, encoding denc): multiplied here with the hidden vector, in the same
    call, rather than by a second linear() (fewer calls per layer). encs[1] INT4R: the
    bundles packed 16 rows a group (ffn_hidden_packed; offs[2] their unit's bytes), the down
    projection a matrix."""
    if encs[1] == INT4R:
        ffn_hidden_packed(x, bundles, offs, soffs, offs[2], gshifts[1], kind, gated, up_bias,
                          has_bias, lut, hidden, fast)
        return ffn_output(hidden, partial, d, dq, ds, denc, dshift, dqrow, dsrow, lut, fast)
    n = bundles.shape[0]
    nchunks = partial.shape[0]
    xq, xs, xp, corr = act_buffers(d)
    quantize_act(x, xq, xs, xp, corr)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        acc = partial[c]
        acc[:] = 0.0
        ffn_rows(x, xq, xs, xp, corr, bundles, c * per, min(n, (c + 1) * per), encs, offs, soffs,
                 gshifts, d, kind, gated, up_bias, has_bias, lut, acc, hidden, fast)
    return ffn_output(hidden, partial, d, dq, ds, denc, dshift, dqrow, dsrow, lut, fast)


@njit(cache=True)
def ffn_rows(x, xq, xs, xp, corr, bundles, r0, end, encs, offs, soffs, gshifts, d, kind, gated,
             up_bias, has_bias, lut, acc, hidden, fast):
    """ffn_decode_simd's bundle rows r0 .. end - 1: hidden[i] written (encs[2] NONE) or the down
    column times it added into acc."""
    stride = bundles.shape[1]
    nlines = (stride + 63) // 64
    third = (nlines + 2) // 3
    for i in range(r0, end):
        base = i * stride
        # Parts are read in address order (gate, up, down) and the next row is prefetched a
        # third at a time: on TinyLlama shapes this took a layer from 3.3 to 2.3 ms (1 thread)
        # where the hardware prefetcher alone kept restarting at each row.
        pf = i + 1 < end
        gt = np.float32(0.0)
        if pf:
            for line in range(0, third):
                prefetch(bundles, base + stride + 64 * line)
        if gated:
            gt = simd_part_dot(bundles, base, encs[0], offs[0], soffs[0], gshifts[0], d, x,
                               xq, xs, xp, corr, lut, fast)
        if pf:
            for line in range(third, 2 * third):
                prefetch(bundles, base + stride + 64 * line)
        u = simd_part_dot(bundles, base, encs[1], offs[1], soffs[1], gshifts[1], d, x, xq,
                          xs, xp, corr, lut, fast)
        if gated:
            h = act(gt, kind) * u
        else:
            if has_bias:
                u += up_bias[i]
            h = act(u, kind)
        if pf:
            for line in range(2 * third, nlines):
                prefetch(bundles, base + stride + 64 * line)
        if encs[2] == NONE:
            hidden[i] = h
        elif h != 0:
            simd_part_axpy(bundles, base, encs[2], offs[2], soffs[2], gshifts[2], d, h, acc,
                           lut, fast)
