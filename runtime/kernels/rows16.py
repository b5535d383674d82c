"""int4 matrices with 16 rows interleaved: the layout decode reads where the CPU has AVX-512 VNNI.

The stored int4 layout (docs/FORMAT.md) keeps each row whole: q4_dot multiplies one row at a
time with the activations in the register's lanes, so every 64 bytes of weights cost the loads
of their activations, a spread of four block scales over 16 lanes and, per row, a horizontal
sum. That measured 23-27 GB/s on one core with the matrix in cache (int8: 39-44), below the
memory's bandwidth: int4 decode was bound by instructions, not bytes.

Here the lanes are rows. Rows 16G .. 16G+15 (a group) are stored block by block: for block b
of 32 values, four 64-byte vectors c = 0..3 whose 32-bit lane r holds bytes 4c..4c+3 of row
16G + r's block b (Q4_0 order: low nibbles elements 4c..4c+3, high nibbles 16 + 4c..). One
vpdpbusd multiplies 16 rows' low nibbles with four activations broadcast from memory; a block
takes eight, one float16 -> float32 conversion of 16 rows' scales (stored beside each other,
per group of 32 << gshift values), a multiply and a fused multiply-add, and a row's sum never
leaves its lane. The integer sums are q4_dot's (nibbles times int8 activations minus 8 times the
block's sum); only the order of the float sums over blocks differs.

The layout lives in memory only: `pack` makes it when a resident model loads (runtime/reader.py),
`unpack` gives back the stored rows where a kernel reads rows (prefill, the float path).
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import (F16, F32, I8, I16, I32, I64, _at, _base, _call, _const_vec, _dpbusd512,
                   _fmuladd, _slice, _splat, _store_at, _v, act_buffers, quantize_act)

R = 16  # rows a group
# where matrices are packed: vpdpbusd on 512-bit registers with float16 conversion;
# EDGELLM_NO_ROWS16=1 keeps the stored rows (the way back, and the tests' reference)
ENABLED = (simd.AVAILABLE and simd.HAVE_AVX512 and simd.HAVE_VNNI and simd.HAVE_F16
           and os.environ.get("EDGELLM_NO_ROWS16", "") != "1")


def packable(n, d, group_size):
    """Whether an int4 matrix of n rows by d values (group_size values a scale: 32 << k, the
    kernels' gshift) can be packed."""
    k = group_size // 32
    return (n % R == 0 and d % 32 == 0 and group_size % 32 == 0 and k & (k - 1) == 0
            and d % group_size == 0)


def pack(q, s):
    """Stored int4 rows q uint8 [n, d/2] with float16 scales s [n, d/g] -> (values uint8
    [n/16, 8 d], scales uint16 [n/16, 16 d/g]) in the layout above."""
    n, h = q.shape
    nb, ng = h // 16, s.shape[1]
    pv = q.reshape(n // R, R, nb, 4, 4).transpose(0, 2, 3, 1, 4).reshape(n // R, nb * 4 * R * 4)
    ps = s.view(np.uint16).reshape(n // R, R, ng).transpose(0, 2, 1).reshape(n // R, ng * R)
    return np.ascontiguousarray(pv), np.ascontiguousarray(ps)


def unpack(pv, ps, rows=None):
    """pack's inverse: (q uint8 [n, d/2], s float16 [n, d/g]); rows (a slice of groups' rows,
    multiples of 16) limits it to those rows."""
    G, nbytes = pv.shape
    g0, g1 = (0, G) if rows is None else (rows.start // R, rows.stop // R)
    nb, ng = nbytes // (4 * R * 4), ps.shape[1] // R
    q = pv[g0:g1].reshape(g1 - g0, nb, 4, R, 4).transpose(0, 3, 1, 2, 4)
    s = ps[g0:g1].reshape(g1 - g0, ng, R).transpose(0, 2, 1)
    return (np.ascontiguousarray(q.reshape((g1 - g0) * R, nb * 16)),
            np.ascontiguousarray(s.reshape((g1 - g0) * R, ng)).view(np.float16))


def _dot_codegen(nparts):
    """dot16's code for nparts sets of rows (see dot16, dot16x2)."""

    def codegen(context, builder, sig, args):
        pva, poff, vunit, psa, soff, sunit, gshift, nb, xqa, corra, xsa = args[:11]
        ooff = args[-1]
        pb = _base(context, builder, sig.args[0], pva)
        sb = _base(context, builder, sig.args[3], psa)
        xb = _base(context, builder, sig.args[8], xqa)
        cb = _base(context, builder, sig.args[9], corra)
        sxb = _base(context, builder, sig.args[10], xsa)
        obs = [_base(context, builder, sig.args[11 + p], args[11 + p])
               for p in range(nparts)]
        c = [ir.Constant(I64, k) for k in range(9)]
        zero = _const_vec(F32, 16, 0.0)
        izero = _const_vec(I32, 16, 0)
        pstride = builder.shl(ir.Constant(I64, 256), gshift)

        def x4(off):  # four activations broadcast to every lane
            return builder.bitcast(_splat(builder, _at(builder, xb, off, I32), 16),
                                   _v(I8, 64))

        def block(b, accs):
            unit = builder.lshr(b, gshift)
            first = builder.shl(unit, gshift)
            base = builder.add(builder.add(poff, builder.mul(unit, vunit)),
                               builder.shl(builder.sub(b, first), c[8]))
            so = builder.add(soff, builder.mul(unit, sunit))
            x0 = builder.shl(b, c[5])
            cor = builder.sub(ir.Constant(I32, 0),
                              _at(builder, cb, builder.shl(b, c[4]), I32, align=4))
            xl = [x4(builder.add(x0, ir.Constant(I64, 4 * k))) for k in range(4)]
            xh = [x4(builder.add(x0, ir.Constant(I64, 16 + 4 * k))) for k in range(4)]
            xsc = _splat(builder, _at(builder, sxb, builder.shl(b, c[2]), F32, align=4), 16)
            out = []
            for p, acc in enumerate(accs):
                pbase = builder.add(base, builder.mul(pstride, ir.Constant(I64, p)))
                lo_acc, hi_acc = _splat(builder, cor, 16), izero
                for k in range(4):
                    w = _at(builder, pb, builder.add(pbase, ir.Constant(I64, 64 * k)),
                            _v(I8, 64))
                    lo = builder.and_(w, _const_vec(I8, 64, 0x0F))
                    hi = builder.lshr(w, _const_vec(I8, 64, 4))
                    lo_acc = _dpbusd512(builder, lo_acc, lo, xl[k])
                    hi_acc = _dpbusd512(builder, hi_acc, hi, xh[k])
                dot = builder.sitofp(builder.add(lo_acc, hi_acc), _v(F32, 16))
                h = _at(builder, sb, builder.add(so, ir.Constant(I64, 2 * R * p)),
                        _v(I16, 16), align=2)
                ws = builder.fpext(builder.bitcast(h, _v(F16, 16)), _v(F32, 16))
                out.append(_fmuladd(builder, dot, builder.fmul(ws, xsc), acc))
            return out

        chains = [[cgutils.alloca_once_value(builder, zero) for _ in range(nparts)]
                  for _ in range(2)]

        def step(b, chain):
            for a, v in zip(chain, block(b, [builder.load(a) for a in chain])):
                builder.store(v, a)

        half = builder.lshr(nb, c[1])
        with cgutils.for_range(builder, half) as lp:
            b0 = builder.shl(lp.index, c[1])
            for u, chain in enumerate(chains):
                step(builder.add(b0, ir.Constant(I64, u)), chain)
        odd = builder.icmp_unsigned("!=", builder.and_(nb, c[1]), c[0])
        with builder.if_then(odd):
            step(builder.sub(nb, c[1]), chains[0])
        for p in range(nparts):
            total = builder.fadd(builder.load(chains[0][p]), builder.load(chains[1][p]))
            _store_at(builder, obs[p], builder.shl(ooff, c[2]), total, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def dot16(typingctx, pv, poff, vunit, ps, soff, sunit, gshift, nb, xq, corr, xs, out, ooff):
    """16 rows of a group . activations (xq int8 by block of 32, corr[4b] = 8 sum of block b,
    xs scales: simd.quantize_act) -> out[ooff:ooff + 16]. The rows' blocks come in units of
    2^gshift blocks (one scale group): unit k's values at byte poff + k vunit of pv (256 bytes
    a block), its 16 float16 scales at byte soff + k sunit of ps."""
    i64 = types.int64
    return (types.void(pv, i64, i64, ps, i64, i64, i64, i64, xq, corr, xs, out, i64),
            _dot_codegen(1))


@intrinsic
def dot16x2(typingctx, pv, poff, vunit, ps, soff, sunit, gshift, nb, xq, corr, xs, out1, out2,
            ooff):
    """dot16 of two sets of rows (an FFN's gate -> out1, up -> out2) in one pass over their
    units: the second's values 256 << gshift bytes after the first's, its scales 32 bytes after
    (rows16.pack_bundles)."""
    i64 = types.int64
    return (types.void(pv, i64, i64, ps, i64, i64, i64, i64, xq, corr, xs, out1, out2, i64),
            _dot_codegen(2))


def _exp16(builder, x):
    """exp of <16 x float> lanes: 2^k e^r, k = round(x log2 e), |r| <= ln 2 / 2, e^r by Cephes'
    expf polynomial (within 2 ulp of the C library's expf; x clamped to +-88.38, where float32's
    exp overflows)."""
    f16 = _v(F32, 16)

    def k(v):
        return _const_vec(F32, 16, v)

    x = _call(builder, "llvm.minnum.v16f32", [x, k(88.3762626647949)], f16)
    x = _call(builder, "llvm.maxnum.v16f32", [x, k(-88.3762626647949)], f16)
    fx = _call(builder, "llvm.roundeven.v16f32", [builder.fmul(x, k(1.44269504088896341))], f16)
    r = _fmuladd(builder, fx, k(-0.693359375), x)
    r = _fmuladd(builder, fx, k(2.12194440e-4), r)
    p = k(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
              5.0000001201e-1):
        p = _fmuladd(builder, p, r, k(c))
    p = _fmuladd(builder, p, builder.fmul(r, r), builder.fadd(r, k(1.0)))
    e = builder.shl(builder.add(builder.fptosi(fx, _v(I32, 16)), _const_vec(I32, 16, 127)),
                    _const_vec(I32, 16, 23))
    return builder.fmul(p, builder.bitcast(e, f16))


@intrinsic
def silu_mul16(typingctx, g, u, off):
    """g[off:off + 16] = silu(g) * u over 16 lanes at once (scalar silu costs an expf call a
    neuron: ~0.1 ms of a TinyLlama layer's 0.5)."""
    sig = types.void(g, u, types.int64)

    def codegen(context, builder, sig, args):
        ga, ua, off = args
        gb = _base(context, builder, sig.args[0], ga)
        ub = _base(context, builder, sig.args[1], ua)
        at = builder.shl(off, ir.Constant(I64, 2))
        gv = _at(builder, gb, at, _v(F32, 16), align=4)
        e = _exp16(builder, builder.fsub(_const_vec(F32, 16, 0.0), gv))
        h = builder.fdiv(gv, builder.fadd(_const_vec(F32, 16, 1.0), e))
        _store_at(builder, gb, at, builder.fmul(h, _at(builder, ub, at, _v(F32, 16), align=4)),
                  align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def dot16_generic(pv, poff, vunit, ps, soff, sunit, gshift, nb, xq, corr, xs, lut, out,
                  ooff):
    """dot16 in plain Numba (pv, ps flat; poff, vunit in bytes, soff, sunit in scales): the same
    integer sums, the float sums per block in the same two chains."""
    for r in range(R):
        acc = np.zeros(2, dtype=np.float32)
        for b in range(nb):
            t = -corr[4 * b]
            unit = b >> gshift
            base = poff + unit * vunit + 256 * (b - (unit << gshift))
            for k in range(4):
                for j in range(4):
                    w = np.int32(pv[base + 64 * k + 4 * r + j])
                    t += (w & 15) * np.int32(xq[32 * b + 4 * k + j])
                    t += ((w >> 4) & 15) * np.int32(xq[32 * b + 16 + 4 * k + j])
            sw = lut[np.int64(ps[soff + unit * sunit + r])]
            acc[b & 1] += np.float32(t) * (sw * xs[b])
        out[ooff + r] = acc[0] + acc[1]


@njit(cache=True, inline="always")
def group_dot(pv, ps, g, gshift, nb, xq, corr, xs, lut, out, ooff, fast):
    """Rows 16 g .. 16 g + 15 of a packed matrix (pv, ps: pack) . activations -> out[ooff:].
    Compiles for any array types (a kernel that also takes other encodings passes its own)."""
    prow, srow = pv.size // pv.shape[0], ps.size // ps.shape[0]
    if fast:
        dot16(pv, g * prow, 256 << gshift, ps, g * 2 * srow, 2 * R, gshift, nb, xq, corr, xs,
              out, ooff)
    else:
        dot16_generic(pv.reshape(pv.size), g * prow, 256 << gshift, ps.reshape(ps.size),
                      g * srow, R, gshift, nb, xq, corr, xs, lut, out, ooff)


@njit(cache=True, parallel=True)
def matvec(pv, ps, gshift, x, lut, out, fast):
    """Packed int4 matrix (pv, ps: pack) times x f32[d] -> out f32[16 * groups]."""
    nb = x.shape[0] // 32
    xq, xs, xp, corr = act_buffers(x.shape[0])
    quantize_act(x, xq, xs, xp, corr)
    for g in prange(pv.shape[0]):
        group_dot(pv, ps, g, gshift, nb, xq, corr, xs, lut, out, R * g, fast)
    return out


@njit(cache=True, parallel=True)
def matvec3(gshift, p1, s1, p2, s2, p3, s3, x, lut, o1, o2, o3, fast):
    """o1, o2, o3 = three packed matrices (one group size) times x, in one parallel loop (q, k
    and v: as qmatvec.matvec3)."""
    nb = x.shape[0] // 32
    xq, xs, xp, corr = act_buffers(x.shape[0])
    quantize_act(x, xq, xs, xp, corr)
    n1, n2, n3 = p1.shape[0], p2.shape[0], p3.shape[0]
    for g in prange(n1 + n2 + n3):
        if g < n1:
            group_dot(p1, s1, g, gshift, nb, xq, corr, xs, lut, o1, R * g, fast)
        elif g < n1 + n2:
            group_dot(p2, s2, g - n1, gshift, nb, xq, corr, xs, lut, o2, R * (g - n1), fast)
        else:
            i = g - n1 - n2
            group_dot(p3, s3, i, gshift, nb, xq, corr, xs, lut, o3, R * i, fast)


@intrinsic
def unpack_values(typingctx, pv, poff, vunit, ps, soff, sunit, gshift, nb, q, s):
    """A packed group (dot16's addressing) back as 16 stored rows: values q uint8 [16, 16 nb],
    scales s uint16 [16, nb >> gshift]. Per block its four vectors are transposed by 32-bit
    lanes in registers (rows 4j..4j+3 at once), a row's 16 bytes stored where the row keeps
    them; a unit's 16 scales loaded at once and stored one a row."""
    sig = types.void(pv, types.int64, types.int64, ps, types.int64, types.int64, types.int64,
                     types.int64, q, s)

    def codegen(context, builder, sig, args):
        pva, poff, vunit, psa, soff, sunit, gshift, nb, qa, sa = args
        pb = _base(context, builder, sig.args[0], pva)
        qb = _base(context, builder, sig.args[8], qa)
        c = [ir.Constant(I64, k) for k in range(9)]
        h = builder.shl(nb, c[4])  # bytes a row
        sb = _base(context, builder, sig.args[3], psa)
        ob = _base(context, builder, sig.args[9], sa)
        nu = builder.lshr(nb, gshift)
        srow = builder.shl(nu, c[1])  # scale bytes a row
        with cgutils.for_range(builder, nu) as lp:
            u = lp.index
            v = _at(builder, sb, builder.add(soff, builder.mul(u, sunit)), _v(I16, 16), align=2)
            for r in range(R):
                at = builder.add(builder.mul(ir.Constant(I64, r), srow), builder.shl(u, c[1]))
                _store_at(builder, ob, at, builder.extract_element(v, ir.Constant(I32, r)),
                          align=2)
        i32x16 = _v(I32, 16)
        with cgutils.for_range(builder, nb) as lp:
            b = lp.index
            unit = builder.lshr(b, gshift)
            base = builder.add(builder.add(poff, builder.mul(unit, vunit)),
                               builder.shl(builder.sub(b, builder.shl(unit, gshift)), c[8]))
            v = [_at(builder, pb, builder.add(base, ir.Constant(I64, 64 * k)), i32x16)
                 for k in range(4)]
            for j in range(4):  # rows 4j .. 4j + 3
                lo = builder.shuffle_vector(v[0], v[1], ir.Constant(
                    _v(I32, 8), [x for i in range(4) for x in (4 * j + i, 16 + 4 * j + i)]))
                hi = builder.shuffle_vector(v[2], v[3], ir.Constant(
                    _v(I32, 8), [x for i in range(4) for x in (4 * j + i, 16 + 4 * j + i)]))
                pick = [x for i in range(4) for x in (2 * i, 2 * i + 1, 8 + 2 * i, 9 + 2 * i)]
                out = builder.shuffle_vector(lo, hi, ir.Constant(i32x16, pick))
                for i in range(4):
                    row = builder.mul(ir.Constant(I64, 4 * j + i), h)
                    _store_at(builder, qb, builder.add(row, builder.shl(b, c[4])),
                              _slice(builder, out, 4 * i, 4))
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def unpack_group(pv, poff, vunit, ps, soff, sunit, gshift, nb, q, s, fast):
    """One packed group's rows back in the stored layout, for prefill's tiles (qgemm): values at
    byte poff of pv, scales at byte soff of ps, dot16's units -> q uint8 [16, 16 nb], s uint16
    [16, nb >> gshift]."""
    if fast:
        unpack_values(pv, poff, vunit, ps, soff, sunit, gshift, nb, q, s)
        return
    w = pv.reshape(pv.size).view(np.uint32)
    q4 = q.reshape(q.size).view(np.uint32)
    for b in range(nb):
        unit = b >> gshift
        at = (poff + unit * vunit + 256 * (b - (unit << gshift))) // 4
        for k in range(4):
            for r in range(R):
                q4[r * 4 * nb + 4 * b + k] = w[at + 16 * k + r]
    s16 = ps.reshape(ps.size).view(np.uint16)
    for u in range(nb >> gshift):
        at = (soff + u * sunit) // 2
        for r in range(R):
            s[r, u] = s16[at + r]


# ---------------------------------------------------------------------------------------------
# FFN bundle rows (gate and up parts of one neuron a row) packed the same way, 16 neurons a group


def pack_bundles(bundles, parts, d, group_size):
    """Bundle rows uint8 [n, stride] with int4 parts of d values (group_size a scale) at
    (value offset, scale offset) pairs `parts` (gate and up, or up alone) -> (uint8
    [n/16, 16 stride], unit bytes, the parts' (value, scale) offsets within a unit).

    One stream a layer: a group of 16 rows is a run of units, one per scale group, each the
    parts' values of its 2^gshift blocks (pack's layout) one after another, then the parts'
    16 scales; a group's bytes past its units are zero."""
    n, stride = bundles.shape
    k = group_size // 32  # blocks a unit
    nu = d // group_size
    packed = [pack(np.ascontiguousarray(bundles[:, o:o + d // 2]),
                   np.ascontiguousarray(bundles[:, so:so + 2 * nu]).view(np.uint16))
              for o, so in parts]
    unit = len(parts) * (256 * k + 2 * R)
    out = np.zeros((n // R, R * stride), np.uint8)
    units = out[:, :nu * unit].reshape(n // R, nu, unit)
    where = []
    for i, (pv, ps) in enumerate(packed):
        vo, so = i * 256 * k, len(parts) * 256 * k + i * 2 * R
        units[:, :, vo:vo + 256 * k] = pv.reshape(n // R, nu, 256 * k)
        units[:, :, so:so + 2 * R] = ps.view(np.uint8).reshape(n // R, nu, 2 * R)
        where.append((vo, so))
    return out, unit, where


def unpack_bundles(groups, unit, where, parts, stride, d, group_size):
    """pack_bundles' inverse: bundle rows uint8 [n, stride] (bytes outside the parts zero)."""
    G = groups.shape[0]
    k, nu = group_size // 32, d // group_size
    units = groups[:, :nu * unit].reshape(G, nu, unit)
    rows = np.zeros((G * R, stride), np.uint8)
    for (vo, so), (o, sto) in zip(where, parts):
        pv = units[:, :, vo:vo + 256 * k].reshape(G, nu * 256 * k)
        ps = np.ascontiguousarray(units[:, :, so:so + 2 * R]).view(np.uint16).reshape(G, nu * R)
        q, s = unpack(np.ascontiguousarray(pv), ps)
        rows[:, o:o + d // 2] = q
        rows[:, sto:sto + 2 * nu] = s.view(np.uint8)
    return rows


@njit(cache=True, inline="always")
def bundle_dot2(b, off, soff, unit, gshift, nb, xq, corr, xs, lut, out1, out2, ooff, fast):
    """The gate (out1) and up (out2) rows of a packed bundle group (pack_bundles: its first
    unit's gate values at byte off of b, gate scales at byte soff; unit bytes a unit), in one
    pass over its units."""
    if fast:
        dot16x2(b, off, unit, b, soff, unit, gshift, nb, xq, corr, xs, out1, out2, ooff)
    else:
        flat = b.reshape(b.size)
        f16 = flat.view(np.uint16)
        dot16_generic(flat, off, unit, f16, soff // 2, unit // 2, gshift, nb, xq, corr, xs, lut,
                      out1, ooff)
        dot16_generic(flat, off + (256 << gshift), unit, f16, soff // 2 + R, unit // 2, gshift,
                      nb, xq, corr, xs, lut, out2, ooff)


@njit(cache=True, inline="always")
def bundle_dot(b, poff, soff, unit, gshift, nb, xq, corr, xs, lut, out, ooff, fast):
    """One part of a packed bundle group (up alone: no gate)."""
    if fast:
        dot16(b, poff, unit, b, soff, unit, gshift, nb, xq, corr, xs, out, ooff)
    else:
        flat = b.reshape(b.size)
        dot16_generic(flat, poff, unit, flat.view(np.uint16), soff // 2, unit // 2, gshift, nb,
                      xq, corr, xs, lut, out, ooff)
