"""SIMD dot products for int8 sparse rows (sp24_int8, sp50_int8; docs/FORMAT.md §4.11) against
int8 activations, emitted as LLVM IR with simd.py's building blocks:

    sp24_dot(q, vo, co, h, x4, s4)       2:4 row . activations in act24's planar layout
    sp24_dot_permute(q, vo, co, h, xu, s4)  the same with AVX-512 VBMI, act24's other layout
    sp50_dot(q, vo, co, d, xu, s16)      50% row . activations of act50

Activations are quantized once per call as the dense int8 kernels do (simd.quantize_q8: per
block of 32, scale max|x| / 127), so a sparse int8 row gives the dense int8 kernel's result on
its decoded weights up to float32 summation order.

2:4: a row keeps d/2 values, planar (u[g] the first kept value of group g, u[G + g] the second,
G = d/4 groups) with 4-bit codes, group k in the low nibble of code byte k and group k + G/2 in
the high one. act24 lays the int8 activations out planar too (x4[j G + g] = x[4g + j]), so 32
consecutive groups' four candidate inputs are four 32-byte loads; each code bit is shifted to
its byte's sign bit and picks between two of them (vpblendvb): two bits give the first input,
two the second. The picked bytes meet 32 kept values each in the dense kernel's block product
(vpdpbusd, or vpmaddubsw + vpmaddwd). One 32-byte code load serves 32 groups of each half: a
step is 64 groups, 128 value bytes. A half whose length h = d/8 is not a multiple of 32 ends with
one step over its last 32 groups with the already counted ones zeroed (needs h >= 32: d >= 256;
the caller takes smaller rows elsewhere). 32-bit lane k of a step holds groups 4k..4k+3, inside
one activation block: s4[l] is the scale of lane l = g / 4 (block l / 2). With AVX-512 VBMI
(HAVE_VBMI) sp24_dot_permute picks the inputs with one vpermt2b per 32 groups from activations
in order (codes turned into byte indices by vpmultishiftqb): the blends' 8 selects and 4
loads a half-step become 3 operations; SmolLM2's 2:4 FFN took 3.4-3.5 ms a token against
3.8 with the blends (the dense int8 FFN 4.9).

50%: per block of 64 positions, the next popcount(mask) packed values are loaded (masked: never
past the row) and the 64 mask bits put them in place (AVX-512 VBMI2 vpexpandb on a register:
its memory form, LLVM's masked.expandload, is microcoded on AMD Zen 4 and took ~4 ns a block,
3.4x this kernel's time); the expanded block meets 64 activations, which act50 stores plus 128
so that they are vpdpbusd's unsigned operand (the sum of 128 w is subtracted: AVX-512 has no
byte vpsignb for the dense kernel's abs/sign pair). Only with HAVE_VBMI2 (LLVM would compile
the expand for any CPU, one byte at a time): the caller falls back to the float kernels.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import (F32, I8, I16, I32, I64, _at, _base, _block_dot, _call,
                   _const_vec, _fmuladd, _hsum, _splat, _v, quantize_q8)

# sp50_dot: vpexpandb (simd.HAVE_VBMI2) on 512-bit registers with vpdpbusd (simd.HAVE_AVX512);
# EDGELLM_NO_VBMI2=1 (or EDGELLM_NO_AVX512=1) keeps the float kernels for sp50 (tests run it in a
# subprocess), covered by simd.py's cache stamp, as is this file
HAVE_VBMI2 = simd.HAVE_VBMI2 and simd.HAVE_AVX512
# sp24_dot_permute: vpermt2b and vpmultishiftqb (AVX-512 VBMI) besides; off with the above
HAVE_VBMI = HAVE_VBMI2 and "+avx512vbmi" in simd._FEATS

SP24_MIN_D = 256  # sp24_dot needs d/8 >= 32


def _bit(builder, c, k):
    """<32 x i1>: bit k of each byte of c (vptestmb with AVX-512, a compare elsewhere)."""
    m = builder.and_(c, _const_vec(I8, 32, 1 << k))
    return builder.icmp_unsigned("!=", m, _const_vec(I8, 32, 0))


def _unavailable(builder, have):
    """True (after a trap) where the CPU lacks the AVX-512 instructions of a kernel (`have`
    False): the callers never run it there, yet Numba compiles it into sparse.int8_row, and an
    instruction the target lacks aborts LLVM (AVX2-only x86, aarch64)."""
    if not have:
        _call(builder, "llvm.trap", [], ir.VoidType())
    return not have


def _quad_dot(builder, w, x, avx2):
    """<32 x i8> w, x -> <8 x i32>, lane k = sum of the products of bytes 4k..4k+3 (the SIMD
    block product sums these; simd._block_dot's generic flavor sums bytes k, k+8, k+16, k+24,
    as good for a dense block with one scale but not for lanes of different blocks)."""
    if avx2 and (simd.HAVE_AVX2 or simd.HAVE_DOTPROD):
        return _block_dot(builder, w, x, avx2)
    p = builder.sext(builder.mul(builder.sext(w, _v(I16, 32)), builder.sext(x, _v(I16, 32))),
                     _v(I32, 32))
    for n in (16, 8):
        even = ir.Constant(_v(I32, n), list(range(0, 2 * n, 2)))
        odd = ir.Constant(_v(I32, n), list(range(1, 2 * n, 2)))
        undef = ir.Constant(p.type, ir.Undefined)
        p = builder.add(builder.shuffle_vector(p, undef, even),
                        builder.shuffle_vector(p, undef, odd))
    return p


def _make_sp24_dot(avx2):
    @intrinsic
    def sp24_dot(typingctx, q, vo, co, h, x4, s4):
        """2:4 int8 row (values at byte vo of q, codes at co; h = d/8 >= 32) . int8 activations
        x4 (planar, act24) with lane scales s4; the row scale is the caller's."""
        sig = types.float32(q, types.int64, types.int64, types.int64, x4, s4)

        def codegen(context, builder, sig, args):
            qa, vo, co, h, x4a, s4a = args
            qb = _base(context, builder, sig.args[0], qa)
            xb = _base(context, builder, sig.args[4], x4a)
            sb = _base(context, builder, sig.args[5], s4a)
            G = builder.shl(h, ir.Constant(I64, 1))
            zero8 = _const_vec(I8, 32, 0)

            def step(k0, acc, keep):
                c = _at(builder, qb, builder.add(co, k0), _v(I8, 32))
                for half in range(2):
                    goff = builder.add(k0, h) if half else k0
                    a = [_at(builder, xb, builder.add(builder.mul(G, ir.Constant(I64, j)), goff),
                             _v(I8, 32)) for j in range(4)]
                    sh = 4 * half
                    # first input: i0 = c & 3 in {0, 1, 2}; second: i1 = c >> 2 in {1, 2, 3}
                    xa = builder.select(_bit(builder, c, sh), a[1], a[0])
                    xa = builder.select(_bit(builder, c, sh + 1), a[2], xa)
                    xb_ = builder.select(_bit(builder, c, sh + 2), a[3], a[2])
                    xb_ = builder.select(_bit(builder, c, sh + 3), xb_, a[1])
                    if keep is not None:
                        xa = builder.select(keep, xa, zero8)
                        xb_ = builder.select(keep, xb_, zero8)
                    w0 = _at(builder, qb, builder.add(vo, goff), _v(I8, 32))
                    w1 = _at(builder, qb, builder.add(builder.add(vo, G), goff), _v(I8, 32))
                    p = builder.add(_quad_dot(builder, w0, xa, avx2),
                                    _quad_dot(builder, w1, xb_, avx2))
                    sc = _at(builder, sb, goff, _v(F32, 8), align=4)  # s4[goff / 4 ...]
                    acc = _fmuladd(builder, builder.sitofp(p, _v(F32, 8)), sc, acc)
                return acc

            acc = cgutils.alloca_once_value(builder, _const_vec(F32, 8, 0.0))
            nfull = builder.lshr(h, ir.Constant(I64, 5))
            with cgutils.for_range(builder, nfull) as lp:
                k0 = builder.shl(lp.index, ir.Constant(I64, 5))
                builder.store(step(k0, builder.load(acc), None), acc)
            tail = builder.and_(h, ir.Constant(I64, 31))
            with builder.if_then(builder.icmp_unsigned("!=", tail, ir.Constant(I64, 0))):
                # the last 32 groups of each half, those before the tail zeroed
                first = builder.trunc(builder.sub(ir.Constant(I64, 32), tail), I8)
                keep = builder.icmp_unsigned(">=", ir.Constant(_v(I8, 32), list(range(32))),
                                             _splat(builder, first, 32))
                k0 = builder.sub(h, ir.Constant(I64, 32))
                builder.store(step(k0, builder.load(acc), keep), acc)
            return _hsum(builder, builder.load(acc))

        return sig, codegen

    return sp24_dot


sp24_dot_fast, sp24_dot_generic = _make_sp24_dot(True), _make_sp24_dot(False)


def _dup(builder, a):
    """<n x T> -> <2n x T>: a twice (one 256-bit load broadcast to 512 bits)."""
    n = a.type.count
    return builder.shuffle_vector(a, ir.Constant(a.type, ir.Undefined),
                                  ir.Constant(_v(I32, 2 * n), list(range(n)) * 2))


def _sp24_tail16(builder, qb, xb, sb, vo, co, h, G, tail, acc):
    """sp24_dot_permute's last tail <= 16 groups of each half in one step (rows of 576: h = 72,
    a tail of 8, which two 32-group half-steps took a quarter of the row's time for): the
    last 16 groups of both halves, quarters of the 64 bytes = half 0's first kept values, its
    second, half 1's first, its second; the 16 - tail groups already counted zeroed."""
    c16 = ir.Constant(I64, 16)
    k0 = builder.sub(h, c16)
    g1 = builder.sub(G, c16)  # half 1's last 16 groups; their codes: the same bytes' high nibbles
    c = _at(builder, qb, builder.add(co, k0), _v(I8, 16))
    c = builder.shuffle_vector(c, ir.Constant(c.type, ir.Undefined),
                               ir.Constant(_v(I32, 64), list(range(16)) * 4))
    ctrl = ir.Constant(_v(I8, 64), [8 * (j % 8) + 2 * (j // 16) for j in range(64)])
    base = ir.Constant(_v(I8, 64), [4 * (j % 16) + (64 if j >= 32 else 0) for j in range(64)])
    idx = _call(builder, "llvm.x86.avx512.pmultishift.qb.512", [ctrl, c], _v(I8, 64))
    idx = builder.or_(builder.and_(idx, _const_vec(I8, 64, 3)), base)
    t0 = _at(builder, xb, builder.shl(k0, ir.Constant(I64, 2)), _v(I8, 64))
    t1 = _at(builder, xb, builder.shl(g1, ir.Constant(I64, 2)), _v(I8, 64))
    xs = _call(builder, "llvm.x86.avx512.vpermi2var.qi.512", [t0, idx, t1], _v(I8, 64))
    w = [_at(builder, qb, builder.add(vo, o), _v(I8, 16))
         for o in (k0, builder.add(G, k0), g1, builder.add(G, g1))]
    pair = ir.Constant(_v(I32, 32), list(range(32)))
    w = builder.shuffle_vector(builder.shuffle_vector(w[0], w[1], pair),
                               builder.shuffle_vector(w[2], w[3], pair),
                               ir.Constant(_v(I32, 64), list(range(64))))
    first = builder.trunc(builder.sub(c16, tail), I8)
    keep = builder.icmp_unsigned(">=", ir.Constant(_v(I8, 64), [j % 16 for j in range(64)]),
                                 _splat(builder, first, 64))
    w = builder.select(keep, w, _const_vec(I8, 64, 0))
    dot = _dpbusd512(builder, xs, w)
    s0 = _at(builder, sb, k0, _v(F32, 4), align=4)  # s4[k0 / 4 ...]: lanes of 4 groups
    s1 = _at(builder, sb, g1, _v(F32, 4), align=4)
    sc = builder.shuffle_vector(s0, s1, ir.Constant(_v(I32, 16), [0, 1, 2, 3] * 2
                                                    + [4, 5, 6, 7] * 2))
    builder.store(_fmuladd(builder, builder.sitofp(dot, _v(F32, 16)), sc, builder.load(acc)),
                  acc)


@intrinsic
def sp24_dot_permute(typingctx, q, vo, co, h, xu, s4):
    """sp24_dot with AVX-512 VBMI: activations xu (act24 with permute: natural order, plus 128),
    lane scales s4. Per half-step of 32 groups, vpmultishiftqb puts each kept value's 2-bit
    index in its byte, an and/or makes it the byte index 4 g + i into the 128 activations of
    those groups, and one vpermt2b picks the 64 inputs of the 64 kept values (the first kept of
    the 32 groups, then the second), which meet them in one 512-bit vpdpbusd."""
    sig = types.float32(q, types.int64, types.int64, types.int64, xu, s4)

    def codegen(context, builder, sig, args):
        if _unavailable(builder, HAVE_VBMI):
            return ir.Constant(F32, 0.0)
        qa, vo, co, h, xua, s4a = args
        qb = _base(context, builder, sig.args[0], qa)
        xb = _base(context, builder, sig.args[4], xua)
        sb = _base(context, builder, sig.args[5], s4a)
        G = builder.shl(h, ir.Constant(I64, 1))
        # output byte j < 32: group k0 + j's first index (bits 0-1 of its code nibble), j >= 32:
        # group k0 + j - 32's second (bits 2-3); the high half's nibbles are 4 bits higher.
        # Code byte j % 32 sits in byte j % 8 of the 64-bit lane holding output byte j.
        ctrl = [ir.Constant(_v(I8, 64), [8 * (j % 8) + 4 * half + (2 if j >= 32 else 0)
                                         for j in range(64)]) for half in range(2)]
        base = ir.Constant(_v(I8, 64), [4 * (j % 32) for j in range(64)])
        three = _const_vec(I8, 64, 3)
        zero8 = _const_vec(I8, 64, 0)

        def step(k0, accs, keep):
            c = _dup(builder, _at(builder, qb, builder.add(co, k0), _v(I8, 32)))
            out = []
            for half in range(2):
                goff = builder.add(k0, h) if half else k0
                idx = _call(builder, "llvm.x86.avx512.pmultishift.qb.512", [ctrl[half], c],
                            _v(I8, 64))
                idx = builder.or_(builder.and_(idx, three), base)
                x0 = builder.shl(goff, ir.Constant(I64, 2))
                t0 = _at(builder, xb, x0, _v(I8, 64))
                t1 = _at(builder, xb, builder.add(x0, ir.Constant(I64, 64)), _v(I8, 64))
                xs = _call(builder, "llvm.x86.avx512.vpermi2var.qi.512", [t0, idx, t1],
                           _v(I8, 64))
                w0 = _at(builder, qb, builder.add(vo, goff), _v(I8, 32))
                w1 = _at(builder, qb, builder.add(builder.add(vo, G), goff), _v(I8, 32))
                w = builder.shuffle_vector(w0, w1, ir.Constant(_v(I32, 64), list(range(64))))
                if keep is not None:
                    w = builder.select(keep, w, zero8)
                dot = _dpbusd512(builder, xs, w)
                # lanes l and l + 8 hold the same 4 groups: both take s4 of lane l
                sc = _dup(builder, _at(builder, sb, goff, _v(F32, 8), align=4))
                out.append(_fmuladd(builder, builder.sitofp(dot, _v(F32, 16)), sc, accs[half]))
            return out

        accs = [cgutils.alloca_once_value(builder, _const_vec(F32, 16, 0.0)) for _ in range(2)]

        def run(k0, keep):
            r = step(k0, [builder.load(a) for a in accs], keep)
            for a, v in zip(accs, r):
                builder.store(v, a)

        with cgutils.for_range(builder, builder.lshr(h, ir.Constant(I64, 5))) as lp:
            run(builder.shl(lp.index, ir.Constant(I64, 5)), None)
        tail = builder.and_(h, ir.Constant(I64, 31))
        c16 = ir.Constant(I64, 16)
        with builder.if_then(builder.icmp_unsigned("!=", tail, ir.Constant(I64, 0))):
            with builder.if_else(builder.icmp_unsigned("<=", tail, c16)) as (small, large):
                with small:
                    _sp24_tail16(builder, qb, xb, sb, vo, co, h, G, tail, accs[0])
                with large:
                    # the last 32 groups of each half, those before the tail zeroed (as sp24_dot)
                    first = builder.trunc(builder.sub(ir.Constant(I64, 32), tail), I8)
                    keep = builder.icmp_unsigned(
                        ">=", ir.Constant(_v(I8, 64), [j % 32 for j in range(64)]),
                        _splat(builder, first, 64))
                    run(builder.sub(h, ir.Constant(I64, 32)), keep)
        return _hsum(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1])))

    return sig, codegen


def _dpbusd512(builder, xu, w):
    """<64 x i8> xu (activations + 128, unsigned), w (signed) -> <16 x i32>, lane k = sum of
    the products x w of bytes 4k..4k+3: vpdpbusd(xu, w) - vpdpbusd(128, w) (x + 128 makes
    the unsigned operand vpdpbusd wants without the abs/sign pair, which AVX-512 lacks for
    bytes: vpsignb is AVX2 only)."""
    t = _v(I32, 16)
    z = _const_vec(I32, 16, 0)
    wt = builder.bitcast(w, t)
    dot = _call(builder, "llvm.x86.avx512.vpdpbusd.512", [z, builder.bitcast(xu, t), wt], t)
    c = _call(builder, "llvm.x86.avx512.vpdpbusd.512",
              [z, builder.bitcast(_const_vec(I8, 64, -128), t), wt], t)
    return builder.sub(dot, c)


@intrinsic
def sp50_dot(typingctx, q, vo, co, d, xu, s16):
    """50% int8 row (packed values at byte vo of q, bitmask at co; d positions, d % 32 == 0)
    . activations xu, s16 of act50; the row scale is the caller's."""
    sig = types.float32(q, types.int64, types.int64, types.int64, xu, s16)

    def codegen(context, builder, sig, args):
        if _unavailable(builder, HAVE_VBMI2):
            return ir.Constant(F32, 0.0)
        qa, vo, co, d, xua, s16a = args
        qb = _base(context, builder, sig.args[0], qa)
        xb = _base(context, builder, sig.args[4], xua)
        sb = _base(context, builder, sig.args[5], s16a)
        p = cgutils.alloca_once_value(builder, vo)
        vt = _v(I8, 64)
        mt = _v(ir.IntType(1), 64)
        c6 = ir.Constant(I64, 6)

        def block(b, m, acc):
            # the next popcount(m) values, loaded masked (never past the row: no fault, no
            # padding needed), then vpexpandb from a register (from memory it is microcoded on
            # AMD Zen 4: ~4 ns a block)
            n = _call(builder, "llvm.ctpop.i64", [m], I64)
            off = builder.load(p)
            lm = builder.select(builder.icmp_unsigned("==", n, ir.Constant(I64, 64)),
                                ir.Constant(I64, -1),
                                builder.sub(builder.shl(ir.Constant(I64, 1), n),
                                            ir.Constant(I64, 1)))
            ptr = builder.bitcast(builder.gep(qb, [off]), vt.as_pointer())
            w = _call(builder, "llvm.masked.load.v64i8.p0",
                      [ptr, ir.Constant(I32, 1), builder.bitcast(lm, mt), _const_vec(I8, 64, 0)],
                      vt)
            w = _call(builder, "llvm.x86.avx512.mask.expand.v64i8",
                      [w, _const_vec(I8, 64, 0), builder.bitcast(m, mt)], vt)
            builder.store(builder.add(off, n), p)
            dot = _dpbusd512(builder, _at(builder, xb, builder.shl(b, c6), vt), w)
            s = _at(builder, sb, builder.shl(b, c6), _v(F32, 16), align=4)
            return _fmuladd(builder, builder.sitofp(dot, _v(F32, 16)), s, acc)

        def mask64(b):
            return _at(builder, qb, builder.add(co, builder.shl(b, ir.Constant(I64, 3))), I64)

        zero = _const_vec(F32, 16, 0.0)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]
        nb = builder.lshr(d, c6)
        with cgutils.for_range(builder, builder.lshr(nb, ir.Constant(I64, 1))) as lp:
            b0 = builder.shl(lp.index, ir.Constant(I64, 1))
            for u, acc in enumerate(accs):
                b = builder.add(b0, ir.Constant(I64, u))
                builder.store(block(b, mask64(b), builder.load(acc)), acc)
        odd = builder.icmp_unsigned("!=", builder.and_(nb, ir.Constant(I64, 1)),
                                    ir.Constant(I64, 0))
        with builder.if_then(odd):
            b = builder.sub(nb, ir.Constant(I64, 1))
            builder.store(block(b, mask64(b), builder.load(accs[0])), accs[0])
        half = builder.icmp_unsigned("!=", builder.and_(d, ir.Constant(I64, 32)),
                                     ir.Constant(I64, 0))
        with builder.if_then(half):  # the last 32 positions: a 32-bit mask (act50 pads xu, s16)
            m = builder.zext(_at(builder, qb, builder.add(co, builder.shl(nb, ir.Constant(
                I64, 3))), I32), I64)
            builder.store(block(nb, m, builder.load(accs[1])), accs[1])
        return _hsum(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1])))

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# activations, once per call


@njit(cache=True)
def act24(x, permute):
    """x f32[d] -> (x4 int8[d], s4 f32[d/16]): quantize_q8's int8 activations, laid out planar,
    x4[j G + g] = xq[4g + j] (G = d/4; sp24_dot), or with permute (sp24_dot_permute) in order,
    plus 128 (bits xq ^ 0x80); s4[l] = the scale of the block holding groups 4l..4l+3
    (block l // 2). d % 32 == 0."""
    d = x.shape[0]
    G = d // 4
    xq = np.empty(d, np.int8)
    xs = np.empty(d // 32, np.float32)
    quantize_q8(x, xq, xs)
    x4 = np.empty(d, np.int8)
    if permute:
        for j in range(d):
            x4[j] = xq[j] ^ np.int8(-128)
    else:
        for g in range(G):
            for j in range(4):
                x4[j * G + g] = xq[4 * g + j]
    s4 = np.empty(G // 4, np.float32)
    for lane in range(G // 4):
        s4[lane] = xs[lane >> 1]
    return x4, s4


@njit(cache=True)
def act50(x):
    """x f32[d] -> (xu int8[D], s16 f32[D/4]), D = d rounded up to 64: quantize_q8's int8
    activations plus 128 (bits xq ^ 0x80: sp50_dot's unsigned operand) and s16[l] the scale of
    the block holding bytes 4l..4l+3 (block l // 8); the padding is x = 0, scale 0. d % 32 == 0."""
    d = x.shape[0]
    D = (d + 63) // 64 * 64
    xq = np.empty(d, np.int8)
    xs = np.empty(d // 32, np.float32)
    quantize_q8(x, xq, xs)
    xu = np.full(D, np.int8(-128))
    for j in range(d):
        xu[j] = xq[j] ^ np.int8(-128)
    s16 = np.zeros(D // 4, np.float32)
    for lane in range(d // 4):
        s16[lane] = xs[lane >> 3]
    return xu, s16
