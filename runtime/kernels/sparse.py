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

int8 values at decode (T == 1) in the fast and generic kernel modes take sparse_simd.py's
kernels instead (simd_int8 says when: sp24 rows of d >= 256, sp50 rows with AVX-512 VBMI2):
activations quantized to int8 once per call as the dense int8 kernels do, integer products of
the kept values only, the row after next prefetched (ahead). They give the dense int8 kernel's result on the decoded weights (up to
float32 summation order), and run inside fused.decode_layer too (fused_enc, fused_table).

A set of rows is passed as 2-D views (rows()): the packed values [n, V] (also as int8), the codes
[n, d/8], the int8 row scales f32 [n] and the int4 group scales (float16 bits) [n, d/2/g], so one
code path serves Matrix rows (values q, scales s) and FFN bundle parts (all inside the bundle
rows). Prefill (T > 1) decodes rows into float32 tiles for BLAS (dequant_rows).
"""

import numpy as np
from numba import njit, prange

from .ffn import act
from .simd import ld_f32, prefetch
from .sparse_simd import (HAVE_VBMI, HAVE_VBMI2, SP24_MIN_D, act24, act50, sp24_dot_fast,
                          sp24_dot_generic, sp24_dot_permute, sp50_dot)

SP24, SP50 = 0, 1
F16, INT8, INT4 = 1, 2, 3  # value encodings (as ffn.ENC_CODES)
PATTERNS = {"sp24": SP24, "sp50": SP50}
VALUES = {"f16": F16, "int8": INT8, "int4": INT4}
TWO_112 = np.float32(2.0**112)  # float16 exponent bias 15 -> float32 bias 127
# reassociation lets the compiler vectorize the sums; no nnan/ninf, so x * 0.0 stays a product
# (it would otherwise fold the 0/1 masks below into selects of loads, i.e. gathers)
FM = {"reassoc", "contract", "arcp", "nsz"}


@njit(cache=True, fastmath=FM)
def decode_values(vrow, vi8, shrow, sc, venc, gshift, nv, lut, buf, ubuf):
    """One row's nv packed values (bytes vrow, the same as int8 vi8) -> buf f32[nv]; ubuf is
    buf's memory as uint32. sc: the int8 row scale; shrow: the int4 group scales."""
    if venc == F16:
        # float16 bits -> float32 bits with the exponent still biased by 15, times 2^112:
        # exact for normal and subnormal halves, and vectorizes (a table lookup would not)
        for j in range(nv):
            h = np.uint32(vrow[2 * j]) | (np.uint32(vrow[2 * j + 1]) << np.uint32(8))
            ubuf[j] = (((h & np.uint32(0x7FFF)) << np.uint32(13))
                       | ((h & np.uint32(0x8000)) << np.uint32(16)))
        for j in range(nv):
            buf[j] *= TWO_112
    elif venc == INT8:
        for j in range(nv):
            buf[j] = np.float32(vi8[j]) * sc
    else:
        for b in range(nv // 32):
            s4 = lut[shrow[(b * 32) >> (gshift + 5)]]
            for k in range(16):
                v = vrow[b * 16 + k]
                buf[b * 32 + k] = (np.float32(v & 15) - np.float32(8.0)) * s4
                buf[b * 32 + 16 + k] = (np.float32(v >> 4) - np.float32(8.0)) * s4


@njit(cache=True, fastmath=FM, inline="always")
def _pair(c, g, x4):
    """(x[4g + i0], x[4g + i1]) for the group's code c = i0 | i1 << 2, as sums of the four
    inputs times 0/1 (selects of loads would become gathers; products of masks vectorize)."""
    i0 = c & 3
    i1 = (c >> 2) & 3
    a0, a1, a2, a3 = x4[0, g], x4[1, g], x4[2, g], x4[3, g]
    xa = a0 * np.float32(i0 == 0) + a1 * np.float32(i0 == 1) + a2 * np.float32(i0 == 2)
    xb = a1 * np.float32(i1 == 1) + a2 * np.float32(i1 == 2) + a3 * np.float32(i1 == 3)
    return xa, xb


@njit(cache=True, fastmath=FM)
def dot24(vals, crow, G, x4):
    """2:4 row: values vals[:G] (first of each group), vals[G:2G] (second), codes crow. vals is
    f32, or int8 read in place (times the row scale by the caller)."""
    h = G // 2
    acc = np.float32(0.0)
    for half in range(2):
        sh = 4 * half
        for k in range(h):
            g = half * h + k
            xa, xb = _pair(np.int32(crow[k]) >> sh, g, x4)
            acc += np.float32(vals[g]) * xa + np.float32(vals[G + g]) * xb
    return acc


@njit(cache=True, fastmath=FM)
def dot50(buf, crow, d, x):
    """50% row: walk the bitmask crow, taking the kept values buf in order."""
    p = 0
    last = d // 2 - 1
    acc = np.float32(0.0)
    for k in range(d // 8):
        m = np.int32(crow[k])
        for j in range(8):
            bit = (m >> j) & 1
            acc += x[8 * k + j] * buf[min(p, last)] * np.float32(bit)
            p += bit
    return acc


@njit(cache=True, fastmath=FM)
def row_dot(i, vals, vi8, codes, sf, sh, pat, venc, gshift, d, x, x4, lut, buf, ubuf):
    """Dot product of sparse row i with x (x4: x laid out planar, see planar())."""
    sc = sf[i] if venc == INT8 else np.float32(1.0)
    if pat == SP24 and venc == INT8:
        return dot24(vi8[i], codes[i], d // 4, x4) * sc
    decode_values(vals[i], vi8[i], sh[i], sc, venc, gshift, d // 2, lut, buf, ubuf)
    if pat == SP24:
        return dot24(buf, codes[i], d // 4, x4)
    return dot50(buf, codes[i], d, x)


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
def matvec(vals, vi8, codes, sf, sh, pat, venc, gshift, d, x, lut, out, nchunks):
    """out[i] = row i . x for the n sparse rows of length d given as rows() views."""
    n = out.shape[0]
    x4 = planar(x)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        buf = np.empty(d // 2, dtype=np.float32)
        ubuf = buf.view(np.uint32)
        for i in range(c * per, min(n, (c + 1) * per)):
            out[i] = row_dot(i, vals, vi8, codes, sf, sh, pat, venc, gshift, d, x, x4, lut, buf,
                             ubuf)
    return out


@njit(cache=True, parallel=True)
def dequant_rows(vals, vi8, codes, sf, sh, pat, venc, gshift, d, r0, r1, lut, out):
    """Rows r0..r1 decoded to dense float32 out[r1 - r0, d]."""
    G = d // 4
    h = G // 2
    for r in prange(r1 - r0):
        i = r0 + r
        buf = np.empty(d // 2, dtype=np.float32)
        sc = sf[i] if venc == INT8 else np.float32(1.0)
        decode_values(vals[i], vi8[i], sh[i], sc, venc, gshift, d // 2, lut, buf,
                      buf.view(np.uint32))
        o = out[r]
        o[:] = 0.0
        crow = codes[i]
        if pat == SP50:
            p = 0
            for k in range(d // 8):
                m = np.int32(crow[k])
                for j in range(8):
                    if (m >> j) & 1:
                        o[8 * k + j] = buf[p]
                        p += 1
        else:
            for k in range(h):
                for half in range(2):
                    g = k + half * h
                    cg = (np.int32(crow[k]) >> (4 * half)) & 15
                    o[4 * g + (cg & 3)] = buf[g]
                    o[4 * g + (cg >> 2)] = buf[G + g]
    return out


@njit(cache=True, parallel=True)
def ffn_hidden(x, gate, up, gated, kind, up_bias, has_bias, d, lut, hidden, nchunks):
    """hidden[i] = act(gate_i . x) * (up_i . x) (gated), else act(up_i . x + b_i); gate and up
    are (vals, vi8, codes, sf, sh, pat, venc, gshift) tuples of sparse rows."""
    n = hidden.shape[0]
    x4 = planar(x)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        buf = np.empty(d // 2, dtype=np.float32)
        ubuf = buf.view(np.uint32)
        for i in range(c * per, min(n, (c + 1) * per)):
            u = row_dot(i, up[0], up[1], up[2], up[3], up[4], up[5], up[6], up[7], d, x, x4, lut,
                        buf, ubuf)
            if gated:
                gt = row_dot(i, gate[0], gate[1], gate[2], gate[3], gate[4], gate[5], gate[6],
                             gate[7], d, x, x4, lut, buf, ubuf)
                hidden[i] = act(gt, kind) * u
            else:
                if has_bias:
                    u += up_bias[i]
                hidden[i] = act(u, kind)
    return hidden


# ---------------------------------------------------------------------------------------------
# int8 values against int8 activations (sparse_simd.py): decode in the fast/generic modes


def simd_int8(pat, venc, d, mode):
    """True when int8 sparse rows of length d run sparse_simd's kernels in kernel mode `mode`."""
    if venc != INT8 or mode == "portable" or d % 32:
        return False
    if pat == SP24:
        return d >= SP24_MIN_D
    return mode == "fast" and HAVE_VBMI2


@njit(cache=True, inline="always")
def int8_row(vals, o, pat, d, xa, xb, fast):
    """Row at byte o of vals (values, then codes) . the activations of act24 / act50 (xa, xb),
    without the row scale."""
    if pat == SP24:
        if fast and HAVE_VBMI:
            return sp24_dot_permute(vals, o, o + d // 2, d // 8, xa, xb)
        if fast:
            return sp24_dot_fast(vals, o, o + d // 2, d // 8, xa, xb)
        return sp24_dot_generic(vals, o, o + d // 2, d // 8, xa, xb)
    return sp50_dot(vals, o, o + d // 2, d, xa, xb)


AHEAD = 2  # rows


@njit(cache=True, inline="always")
def ahead(vals, i, n, stride):
    """Prefetch row i + AHEAD of n rows of stride bytes. A 50% row's value loads wait on its
    mask (their offsets are popcounts): from DRAM, a 576 x 1536 matvec took 66 us without,
    43 us with (dense int8 39-44 us)."""
    if i + AHEAD < n:
        o = (i + AHEAD) * stride
        for line in range(o >> 6, ((o + stride - 1) >> 6) + 1):
            prefetch(vals, line << 6)


@njit(cache=True)
def act_int8(x, pat, fast):
    if pat == SP24:
        return act24(x, fast and HAVE_VBMI)
    return act50(x)


@njit(cache=True, parallel=True)
def matvec_int8(vals, stride, sf, pat, d, x, out, fast):
    """out[i] = (row i . x) * sf[i] for int8 sparse rows: row i at byte i * stride of vals; sf
    f32[n] read by byte offset (fused.decode_layer compiles this call for the scale arrays of
    every encoding, though only sparse layers take it)."""
    xa, xb = act_int8(x, pat, fast)
    n = out.shape[0]
    for i in prange(n):
        ahead(vals, i, n, stride)
        out[i] = int8_row(vals, i * stride, pat, d, xa, xb, fast) * ld_f32(sf, 4 * i)
    return out


@njit(cache=True, parallel=True)
def ffn_hidden_int8(x, b, goff, gsoff, uoff, usoff, pat, gated, kind, up_bias, has_bias, d,
                    hidden, fast):
    """ffn_hidden for int8 sparse gate/up parts of one pattern in bundle rows b uint8[n, stride]
    (values at byte offset goff / uoff of a row, f32 row scales at gsoff / usoff)."""
    xa, xb = act_int8(x, pat, fast)
    stride = b.shape[1]
    n = hidden.shape[0]
    for i in prange(n):
        ahead(b, i, n, stride)
        o = i * stride
        u = int8_row(b, o + uoff, pat, d, xa, xb, fast) * ld_f32(b, o + usoff)
        if gated:
            gt = int8_row(b, o + goff, pat, d, xa, xb, fast) * ld_f32(b, o + gsoff)
            hidden[i] = act(gt, kind) * u
        else:
            if has_bias:
                u += up_bias[i]
            hidden[i] = act(u, kind)
    return hidden


# The fused decode call (fused.py) takes layers of int8 sparse matrices and bundle parts as
# encoding codes FUSED + pattern in its meta and part table (dense codes are below 8).
FUSED = 16


def fused_enc(m, mode):
    """fused.py's (code, 0, bytes per row, 0) of a Matrix these kernels take at decode, else
    None (a dense matrix, or a sparse one the int8 kernels do not take)."""
    from ..encodings import SPARSE_NAMES

    c = getattr(m, "codec", None)
    if c is None or c.name not in SPARSE_NAMES or not m.q.flags.c_contiguous:
        return None
    pat, venc, _ = codes(c)
    if not simd_int8(pat, venc, m.shape[1], mode):
        return None
    return FUSED + pat, 0, m.q.strides[0], 0


def fused_table(layout, gated, d, bundles, down, mode):
    """fused.py's part table (encs, offs, soffs, gs by slot gate, up, down) for int8 sparse
    gate/up parts of one pattern with a separate down matrix that fused_enc takes, else None."""
    if down is None or fused_enc(down, mode) is None:
        return None
    names = [e["name"] for e in layout]
    if sorted(names) != (["gate", "up"] if gated else ["up"]):
        return None
    tab = np.zeros((4, 3), dtype=np.int64)
    tab[0, 2] = -1  # ffn.NONE: the down projection is the matrix
    for slot, name in enumerate(("gate", "up")):
        v = _part(layout, name if gated else "up", d, bundles)  # checks the part's bounds
        if not simd_int8(v[5], v[6], d, mode):
            return None
        e = layout[names.index(name if gated else "up")]
        tab[0, slot], tab[1, slot], tab[2, slot] = FUSED + v[5], e["offset"], e["scale_offset"]
    if tab[0, 0] != tab[0, 1]:
        return None
    tab.flags.writeable = False  # as kernels._part_table_cached's (one compiled type)
    return tab


@njit(cache=True, parallel=True)
def matvec3_int8(code, row, q1, s1, q2, s2, q3, s3, x, o1, o2, o3, fast):
    """matvec_int8 for three matrices (q, k, v) of one pattern (code: fused_enc's), rows of row
    bytes, with the activations quantized once."""
    pat = code - FUSED
    d = x.shape[0]
    xa, xb = act_int8(x, pat, fast)
    n1, n2, n3 = o1.shape[0], o2.shape[0], o3.shape[0]
    for r in prange(n1 + n2 + n3):
        if r < n1:
            ahead(q1, r, n1, row)
            o1[r] = int8_row(q1, r * row, pat, d, xa, xb, fast) * ld_f32(s1, 4 * r)
        elif r < n1 + n2:
            i = r - n1
            ahead(q2, i, n2, row)
            o2[i] = int8_row(q2, i * row, pat, d, xa, xb, fast) * ld_f32(s2, 4 * i)
        else:
            i = r - n1 - n2
            ahead(q3, i, n3, row)
            o3[i] = int8_row(q3, i * row, pat, d, xa, xb, fast) * ld_f32(s3, 4 * i)


@njit(cache=True)
def fused_ffn(x, bundles, tab, d, kind, gated, up_bias, has_bias, hidden, dq, ds, dcode, drow,
              fast):
    """The FFN of fused.decode_layer for fused_table's parts, then the down matrix (values dq,
    row scales ds, code and row bytes from fused_enc) times the hidden activations."""
    pat = tab[0, 1] - FUSED
    ffn_hidden_int8(x, bundles, tab[1, 0], tab[2, 0], tab[1, 1], tab[2, 1], pat, gated, kind,
                    up_bias, has_bias, d, hidden, fast)
    out = np.empty(dq.shape[0], dtype=np.float32)
    return matvec_int8(dq, drow, ds, dcode - FUSED, hidden.shape[0], hidden, out, fast)


def _mode():
    from .. import kernels

    return kernels.MODE


# ---------------------------------------------------------------------------------------------
# Entry points for kernels/__init__.py (linear and ffn route sparse encodings here)

def _views(c, block, voff, d, soff=None, scales=None):
    pat, venc, gshift = codes(c)
    vb = c.value_bytes(d)
    vals = block[:, voff:voff + vb]
    vi8 = vals.view(np.int8)
    cod = block[:, voff + vb:voff + vb + d // 8]
    n = block.shape[0]
    sf = sh = None
    if venc == INT8:
        sf = (np.ascontiguousarray(scales, dtype=np.float32).reshape(n) if scales is not None
              else np.ascontiguousarray(block[:, soff:soff + 4]).view(np.float32).reshape(n))
    elif venc == INT4:
        k = d // 2 // c.group_size
        sh = (np.ascontiguousarray(scales).view(np.uint16).reshape(n, k) if scales is not None
              else np.ascontiguousarray(block[:, soff:soff + 2 * k]).view(np.uint16))
    if venc != INT8:
        sf = np.zeros(n, dtype=np.float32)
    if venc != INT4:
        sh = np.zeros((n, 1), dtype=np.uint16)
    return vals, vi8, cod, sf, sh, pat, venc, gshift


def codes(c):
    """(pattern code, value code, log2(g / 32)) of a Sparse codec."""
    g = c.group_size or 32
    return PATTERNS[c.pattern], VALUES[c.value.name], int(g // 32).bit_length() - 1


def _matrix_views(m):
    n, d = m.shape
    return _views(m.codec, np.ascontiguousarray(m.q), 0, d, scales=m.s)


def matvec_matrix(m, x, lut, out):
    """out f32[n] = m x for a sparse Matrix m [n, d] and x f32[d]."""
    import numba

    n, d = m.shape
    v = _matrix_views(m)
    mode = _mode()
    if simd_int8(v[5], v[6], d, mode):
        return matvec_int8(v[0], v[0].strides[0], v[3], v[5], d, x, out, mode == "fast")
    return matvec(*v, d, x, lut, out, max(1, min(numba.get_num_threads(), n)))


def dequant_matrix(m, r0, r1, lut, out):
    """Rows r0..r1 of a sparse Matrix -> out f32[r1 - r0, d]."""
    return dequant_rows(*_matrix_views(m), m.shape[1], r0, r1, lut, out)


def is_sparse_layout(layout):
    from ..encodings import SPARSE_NAMES

    return any(e["encoding"] in SPARSE_NAMES for e in layout)


def _part(layout, name, d, bundles):
    from .. import encodings
    from ..errors import EdgeLLMError

    stride = bundles.shape[1]
    for e in layout:
        if e["name"] == name:
            c = encodings.codec(e["encoding"], e["group_size"])
            if not isinstance(c, encodings.Sparse):
                raise EdgeLLMError(f"ffn: a sparse FFN needs every bundle part sparse, "
                                   f"{name} is {e['encoding']}")
            c.check(d)
            end = e["offset"] + c.value_bytes(d) + d // 8
            if c.scale_shape(1, d) is not None:
                end = max(end, (e["scale_offset"] or 0) + int(np.prod(c.scale_shape(1, d)))
                          * c.scale_dtype().itemsize)
            if end > stride:
                raise EdgeLLMError(f"ffn: bundle part {name!r} ends at byte {end}, past the row "
                                   f"stride {stride} (d = {d})")
            return _views(c, bundles, e["offset"], d, soff=e["scale_offset"])
    return None


def ffn(x, bundles, layout, d, kind, gated, up_bias, down, linear, activate, lut):
    """kernels.ffn for bundles with sparse gate/up parts and the down projection as its own
    Matrix `down` [d, n] (any encoding, multiplied by `linear`). x f32[T, d] -> f32[T, d]."""
    import numba

    from ..errors import EdgeLLMError

    n = bundles.shape[0]
    names = {e["name"] for e in layout}
    if down is None or "down" in names:
        raise EdgeLLMError("ffn: sparse bundle parts need the down projection as a separate "
                           "ffn_down matrix (docs/FORMAT.md)")
    up = _part(layout, "up", d, bundles)
    gate = _part(layout, "gate", d, bundles) if gated else None
    if up is None or (gated and gate is None):
        raise EdgeLLMError("ffn: bundle layout lacks its gate/up parts")
    has_bias = up_bias is not None and not gated
    bias = np.asarray(up_bias, np.float32) if has_bias else np.zeros(1, np.float32)
    T = x.shape[0]
    if T == 1:
        hidden = np.empty(n, dtype=np.float32)
        mode = _mode()
        g = gate or up
        if g[5] == up[5] and g[6] == up[6] and simd_int8(up[5], up[6], d, mode):
            off = {e["name"]: (e["offset"], e["scale_offset"]) for e in layout}
            go, gso = off["gate"] if gated else off["up"]
            ffn_hidden_int8(x[0], bundles, go, gso, *off["up"], up[5], gated, kind, bias,
                            has_bias, d, hidden, mode == "fast")
            return linear(down, hidden.reshape(1, n))
        ffn_hidden(x[0], gate or up, up, gated, kind, bias, has_bias, d, lut, hidden,
                   max(1, min(numba.get_num_threads(), n)))
        return linear(down, hidden.reshape(1, n))
    # prefill: decode blocks of rows to float32 and multiply with BLAS
    hT = np.empty((n, T), dtype=np.float32)
    xT = np.ascontiguousarray(x.T)
    step = max(16, (1 << 20) // d)
    tile = np.empty((step, d), dtype=np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        t = tile[:r1 - r0]
        u = dequant_rows(*up, d, r0, r1, lut, t) @ xT
        if gated:
            hT[r0:r1] = activate(dequant_rows(*gate, d, r0, r1, lut, t) @ xT) * u
        else:
            if has_bias:
                u += bias[r0:r1, None]
            hT[r0:r1] = activate(u)
    return linear(down, np.ascontiguousarray(hT.T))
