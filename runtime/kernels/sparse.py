"""Kernels for the sparse encodings sp24_* and sp50_* (runtime/encodings.py, docs/FORMAT.md):
pruned weights stored as half of each row plus 4 bits per group of 4 (2:4) or a bitmask (50%).

A row is read as stored: its d/2 kept values are decoded once into a float32 scratch (f16 by
bit manipulation, int8 times the row scale, int4 nibbles times their group scales), then
    sp24  dot = sum_g V0[g] x[4g + i0(g)] + V1[g] x[4g + i1(g)]: x is laid out planar once per
          call (x4[j, g] = x[4g + j]) so each group's two inputs are picked by compare-and-select
          from contiguous runs, which the compiler vectorizes (no gathers);
    sp50  the row is expanded into a dense float32 scratch by walking its bitmask, then a dense
          dot product.
Both read d/2 values and d/8 code bytes instead of d values, and multiply d (sp24) or d/2 + d
(sp50) times. Activations stay float32 (no int8 quantization), so results equal the NumPy
reference up to float32 summation order.

Rows are addressed as (byte array, byte offset of the values, byte array, byte offset of the
scales) so one code path serves Matrix rows (values q, scales s) and FFN bundle rows (both in
the bundle). Prefill (T > 1) decodes rows into float32 tiles for BLAS (dequant_rows).
"""

import numpy as np
from numba import njit, prange

from .ffn import act

SP24, SP50 = 0, 1
F16, INT8, INT4 = 1, 2, 3  # value encodings (as ffn.ENC_CODES)
PATTERNS = {"sp24": SP24, "sp50": SP50}
VALUES = {"f16": F16, "int8": INT8, "int4": INT4}
TWO_112 = np.float32(2.0**112)  # float16 exponent bias 15 -> float32 bias 127


def codes(c):
    """(pattern code, value code, log2(g / 32)) of a Sparse codec."""
    g = c.group_size or 32
    return PATTERNS[c.pattern], VALUES[c.value.name], int(g // 32).bit_length() - 1


@njit(cache=True, inline="always")
def value_bytes(venc, nv):
    if venc == F16:
        return 2 * nv
    if venc == INT8:
        return nv
    return nv // 2


@njit(cache=True, fastmath=True)
def decode_values(qb, qo, sf, sh, so, venc, gshift, nv, lut, buf):
    """The nv packed values at byte qo of qb -> buf f32[nv]; their scales start at byte so of
    the scale bytes, seen as float32 sf (int8) or as float16 bits sh (int4)."""
    if venc == F16:
        # float16 bits -> float32 bits with the exponent still biased by 15, times 2^112:
        # exact for normal and subnormal halves, and vectorizes (a table lookup would not)
        ub = buf.view(np.uint32)
        for j in range(nv):
            h = np.uint32(qb[qo + 2 * j]) | (np.uint32(qb[qo + 2 * j + 1]) << np.uint32(8))
            ub[j] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000))
                                                                  << np.uint32(16))
        for j in range(nv):
            buf[j] *= TWO_112
    elif venc == INT8:
        sc = sf[so // 4]
        for j in range(nv):
            v = np.int32(qb[qo + j])
            buf[j] = np.float32(v - ((v >> 7) << 8)) * sc  # the byte as int8
    else:
        for b in range(nv // 32):
            sc = lut[sh[so // 2 + ((b * 32) >> (gshift + 5))]]
            for k in range(16):
                v = qb[qo + b * 16 + k]
                buf[b * 32 + k] = (np.float32(v & 15) - np.float32(8.0)) * sc
                buf[b * 32 + 16 + k] = (np.float32(v >> 4) - np.float32(8.0)) * sc


@njit(cache=True, inline="always")
def _pick(c, a0, a1, a2, a3, v0, v1):
    """v0 * x[i0] + v1 * x[i1] for code c = i0 | i1 << 2 (i0 < i1) of one group of 4."""
    i0 = c & 3
    i1 = c >> 2
    xa = a0 if i0 == 0 else (a1 if i0 == 1 else a2)
    xb = a3 if i1 == 3 else (a2 if i1 == 2 else a1)
    return v0 * xa + v1 * xb


@njit(cache=True, fastmath=True)
def dot24(buf, qb, co, G, x4):
    """2:4 row: values buf[:G] (first of each group), buf[G:2G] (second); codes at byte co."""
    h = G // 2
    acc = np.float32(0.0)
    for k in range(h):
        c = qb[co + k]
        acc += _pick(c & 15, x4[0, k], x4[1, k], x4[2, k], x4[3, k], buf[k], buf[G + k])
        acc += _pick(c >> 4, x4[0, h + k], x4[1, h + k], x4[2, h + k], x4[3, h + k],
                     buf[h + k], buf[G + h + k])
    return acc


@njit(cache=True, fastmath=True)
def expand50(buf, qb, co, d, w):
    """50% row: walk the bitmask at byte co, placing the kept values buf in order -> w f32[d]."""
    p = 0
    for k in range(d // 8):
        m = qb[co + k]
        for j in range(8):
            bit = (m >> j) & 1
            w[8 * k + j] = buf[p] if bit else np.float32(0.0)
            p += bit
    return w


@njit(cache=True, fastmath=True)
def _dense_dot(w, x, d):
    acc = np.float32(0.0)
    for j in range(d):
        acc += w[j] * x[j]
    return acc


@njit(cache=True, fastmath=True)
def row_dot(qb, qo, sf, sh, so, pat, venc, gshift, d, x, x4, lut, buf, w):
    """Dot product of one sparse row (values at byte qo of qb, scales at byte so) with x."""
    nv = d // 2
    decode_values(qb, qo, sf, sh, so, venc, gshift, nv, lut, buf)
    co = qo + value_bytes(venc, nv)
    if pat == SP24:
        return dot24(buf, qb, co, d // 4, x4)
    expand50(buf, qb, co, d, w)
    return _dense_dot(w, x, d)


@njit(cache=True)
def planar(x):
    """x f32[d] -> x4 f32[4, d/4] with x4[j, g] = x[4g + j]."""
    G = x.shape[0] // 4
    x4 = np.empty((4, G), dtype=np.float32)
    for g in range(G):
        for j in range(4):
            x4[j, g] = x[4 * g + j]
    return x4


@njit(cache=True, parallel=True)
def matvec(qb, qrow, sf, sh, srow, n, d, pat, venc, gshift, x, lut, out, nchunks):
    """out[i] = row i . x for n sparse rows of length d, row i's values at byte i * qrow of qb
    and its scales at byte i * srow of sb."""
    x4 = planar(x)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        buf = np.empty(d // 2, dtype=np.float32)
        w = np.empty(d, dtype=np.float32)
        for i in range(c * per, min(n, (c + 1) * per)):
            out[i] = row_dot(qb, i * qrow, sf, sh, i * srow, pat, venc, gshift, d, x, x4, lut,
                             buf, w)
    return out


@njit(cache=True, fastmath=True)
def expand_row(qb, qo, sf, sh, so, pat, venc, gshift, d, lut, buf, out):
    """One sparse row decoded to dense float32 out[d]."""
    nv = d // 2
    decode_values(qb, qo, sf, sh, so, venc, gshift, nv, lut, buf)
    co = qo + value_bytes(venc, nv)
    if pat == SP50:
        expand50(buf, qb, co, d, out)
        return
    G = d // 4
    h = G // 2
    out[:] = 0.0
    for k in range(h):
        c = qb[co + k]
        for half in range(2):
            g = k + half * h
            cg = (c >> (4 * half)) & 15
            out[4 * g + (cg & 3)] = buf[g]
            out[4 * g + (cg >> 2)] = buf[G + g]


@njit(cache=True, parallel=True)
def dequant_rows(qb, qrow, qoff, sf, sh, srow, soff, r0, r1, d, pat, venc, gshift, lut, out):
    """Rows r0..r1 (row i at byte i * qrow + qoff, scales at i * srow + soff) -> out f32[r1 - r0, d]."""
    for r in prange(r1 - r0):
        buf = np.empty(d // 2, dtype=np.float32)
        i = r0 + r
        expand_row(qb, i * qrow + qoff, sf, sh, i * srow + soff, pat, venc, gshift, d, lut, buf,
                   out[r])
    return out


@njit(cache=True, parallel=True)
def ffn_hidden(x, bb, sf, sh, stride, gated, kind, gpat, gvenc, gshift, goff, gsoff, upat, uvenc, ushift,
               uoff, usoff, up_bias, has_bias, n, d, lut, hidden, nchunks):
    """hidden[i] = act(gate_i . x) * (up_i . x) (gated), else act(up_i . x + b_i), for bundle rows
    of stride bytes in bb (flat uint8) whose gate and up parts are sparse."""
    x4 = planar(x)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        buf = np.empty(d // 2, dtype=np.float32)
        w = np.empty(d, dtype=np.float32)
        for i in range(c * per, min(n, (c + 1) * per)):
            base = i * stride
            u = row_dot(bb, base + uoff, sf, sh, base + usoff, upat, uvenc, ushift, d, x, x4, lut,
                        buf, w)
            if gated:
                gt = row_dot(bb, base + goff, sf, sh, base + gsoff, gpat, gvenc, gshift, d, x,
                             x4, lut, buf, w)
                hidden[i] = act(gt, kind) * u
            else:
                if has_bias:
                    u += up_bias[i]
                hidden[i] = act(u, kind)
    return hidden


# ---------------------------------------------------------------------------------------------
# Entry points for kernels/__init__.py (linear and ffn route sparse encodings here)


def _flat(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


_NO_SCALES = np.zeros(4, dtype=np.uint8)


def _scale_views(b):
    """A flat byte array as float32 and as uint16 (scales read at byte offsets; they are
    aligned to their size: encodings.bundle_layout, or a scale array of their own)."""
    f = b[:b.size - b.size % 4].view(np.float32)
    h = b[:b.size - b.size % 2].view(np.uint16)
    return f, h


def _matrix_args(m):
    pat, venc, gshift = codes(m.codec)
    q = np.ascontiguousarray(m.q)
    sb, srow = _NO_SCALES, 0
    if m.s is not None:
        s = np.ascontiguousarray(m.s)
        sb, srow = _flat(s), s.strides[0]
    sf, sh = _scale_views(sb)
    return _flat(q), q.shape[1], sf, sh, srow, pat, venc, gshift


def matvec_matrix(m, x, lut, out):
    """out f32[n] = m x for a sparse Matrix m [n, d] and x f32[d]."""
    import numba

    n, d = m.shape
    qb, qrow, sf, sh, srow, pat, venc, gshift = _matrix_args(m)
    return matvec(qb, qrow, sf, sh, srow, n, d, pat, venc, gshift, x, lut, out,
                  max(1, min(numba.get_num_threads(), n)))


def dequant_matrix(m, r0, r1, lut, out):
    """Rows r0..r1 of a sparse Matrix -> out f32[r1 - r0, d]."""
    qb, qrow, sf, sh, srow, pat, venc, gshift = _matrix_args(m)
    return dequant_rows(qb, qrow, 0, sf, sh, srow, 0, r0, r1, m.shape[1], pat, venc, gshift, lut,
                        out)


def is_sparse_layout(layout):
    from ..encodings import SPARSE_NAMES

    return any(e["encoding"] in SPARSE_NAMES for e in layout)


def _part(layout, name, d, stride):
    from .. import encodings
    from ..errors import EdgeLLMError

    for e in layout:
        if e["name"] == name:
            c = encodings.codec(e["encoding"], e["group_size"])
            if not isinstance(c, encodings.Sparse):
                raise EdgeLLMError(f"ffn: a sparse FFN needs every bundle part sparse, "
                                   f"{name} is {e['encoding']}")
            c.check(d)
            end = e["offset"] + c.value_bytes(d) + d // 8
            if c.scale_shape(1, d) is not None:
                end = max(end, e["scale_offset"] + int(np.prod(c.scale_shape(1, d)))
                          * c.scale_dtype().itemsize)
            if end > stride:
                raise EdgeLLMError(f"ffn: bundle part {name!r} ends at byte {end}, past the row "
                                   f"stride {stride} (d = {d})")
            return codes(c) + (e["offset"], e["scale_offset"] or 0, c)
    return None


def ffn(x, bundles, layout, d, kind, gated, up_bias, down, linear, activate, lut):
    """kernels.ffn for bundles with sparse gate/up parts and the down projection as its own
    Matrix `down` [d, n] (any encoding, multiplied by `linear`). x f32[T, d] -> f32[T, d]."""
    import numba

    from ..errors import EdgeLLMError

    n, stride = bundles.shape
    names = {e["name"] for e in layout}
    if down is None or "down" in names:
        raise EdgeLLMError("ffn: sparse bundle parts need the down projection as a separate "
                           "ffn_down matrix (docs/FORMAT.md)")
    up = _part(layout, "up", d, stride)
    gate = _part(layout, "gate", d, stride) if gated else None
    if up is None or (gated and gate is None):
        raise EdgeLLMError("ffn: bundle layout lacks its gate/up parts")
    g = gate or up
    bb = bundles.reshape(-1)
    sf, sh = _scale_views(bb)
    has_bias = up_bias is not None and not gated
    bias = np.asarray(up_bias, np.float32) if has_bias else np.zeros(1, np.float32)
    T = x.shape[0]
    if T == 1:
        hidden = np.empty(n, dtype=np.float32)
        ffn_hidden(x[0], bb, sf, sh, stride, gated, kind, g[0], g[1], g[2], g[3], g[4], up[0], up[1],
                   up[2], up[3], up[4], bias, has_bias, n, d, lut, hidden,
                   max(1, min(numba.get_num_threads(), n)))
        return linear(down, hidden.reshape(1, n))
    # prefill: decode blocks of rows to float32 and multiply with BLAS
    hT = np.empty((n, T), dtype=np.float32)
    xT = np.ascontiguousarray(x.T)
    rows = max(16, (1 << 20) // d)
    tile = np.empty((rows, d), dtype=np.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        t = tile[:r1 - r0]
        u = dequant_rows(bb, stride, up[3], sf, sh, stride, up[4], r0, r1, d, up[0], up[1],
                         up[2], lut, t) @ xT
        if gated:
            gt = dequant_rows(bb, stride, gate[3], sf, sh, stride, gate[4], r0, r1, d, gate[0],
                              gate[1], gate[2], lut, t) @ xT
            hT[r0:r1] = activate(gt) * u
        else:
            if has_bias:
                u += bias[r0:r1, None]
            hT[r0:r1] = activate(u)
    return linear(down, np.ascontiguousarray(hT.T))
