"""SIMD dot products for int8 sparse rows (sp24_int8, sp50_int8; docs/FORMAT.md §4.11) against
int8 activations, emitted as LLVM IR with simd.py's building blocks:

    sp24_dot(q, vo, co, h, x4, s4)       2:4 row . activations in act24's planar layout
    sp50_dot(q, vo, co, nb, xq, xs)      50% row . activations from simd.quantize_q8

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
one activation block: s4[l] is the scale of lane l = g / 4 (block l / 2).

50%: per block of 32 positions, the 32 mask bits select where the next popcount packed values
go (AVX-512 VBMI2 vpexpandb, via LLVM's masked.expandload); the expanded block meets the
activation block in the dense kernel's block product. Only with HAVE_VBMI2 (LLVM would compile
the expand load for any CPU, one byte at a time): the caller falls back to the float kernels.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import (F32, I8, I16, I32, I64, _at, _base, _block_dot, _block_loop, _call,
                   _const_vec, _fmuladd, _hsum, _splat, _v, quantize_q8)

# vpexpandb: simd.HAVE_VBMI2 (EDGELLM_NO_VBMI2=1 keeps the float kernels for sp50; tests run it in
# a subprocess), covered by simd.py's cache stamp, as is this file
HAVE_VBMI2 = simd.HAVE_VBMI2

SP24_MIN_D = 256  # sp24_dot needs d/8 >= 32


def _bit(builder, c, k):
    """<32 x i1>: bit k of each byte of c (vptestmb with AVX-512, a compare elsewhere)."""
    m = builder.and_(c, _const_vec(I8, 32, 1 << k))
    return builder.icmp_unsigned("!=", m, _const_vec(I8, 32, 0))


def _quad_dot(builder, w, x, avx2):
    """<32 x i8> w, x -> <8 x i32>, lane k = sum of the products of bytes 4k..4k+3 (the SIMD
    block product sums these; simd._block_dot's generic flavor sums bytes k, k+8, k+16, k+24,
    as good for a dense block with one scale but not for lanes of different blocks)."""
    if avx2 and simd.HAVE_AVX2:
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


@intrinsic
def sp50_dot(typingctx, q, vo, co, nb, xq, xs):
    """50% int8 row (packed values at byte vo of q, bitmask at co; nb blocks of 32 positions)
    . int8 activations xq with block scales xs (quantize_q8); the row scale is the caller's."""
    sig = types.float32(q, types.int64, types.int64, types.int64, xq, xs)

    def codegen(context, builder, sig, args):
        qa, vo, co, nb, xqa, xsa = args
        qb = _base(context, builder, sig.args[0], qa)
        xqb = _base(context, builder, sig.args[4], xqa)
        xsb = _base(context, builder, sig.args[5], xsa)
        p = cgutils.alloca_once_value(builder, vo)
        vt = _v(I8, 32)
        mt = _v(ir.IntType(1), 32)

        def body(b, acc):
            m = _at(builder, qb, builder.add(co, builder.shl(b, ir.Constant(I64, 2))), I32)
            off = builder.load(p)
            w = _call(builder, "llvm.masked.expandload.v32i8",
                      [builder.gep(qb, [off]), builder.bitcast(m, mt), ir.Constant(vt, [0] * 32)],
                      vt)
            n = _call(builder, "llvm.ctpop.i32", [m], I32)
            builder.store(builder.add(off, builder.zext(n, I64)), p)
            xv = _at(builder, xqb, builder.shl(b, ir.Constant(I64, 5)), vt)
            d = _block_dot(builder, w, xv, True)
            s = _at(builder, xsb, builder.shl(b, ir.Constant(I64, 2)), F32, align=4)
            return _fmuladd(builder, builder.sitofp(d, _v(F32, 8)), _splat(builder, s, 8), acc)

        return _hsum(builder, _block_loop(builder, nb, body))

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# activations, once per call


@njit(cache=True)
def act24(x):
    """x f32[d] -> (x4 int8[d], s4 f32[d/16]): quantize_q8's int8 activations laid out planar,
    x4[j G + g] = xq[4g + j] (G = d/4), and s4[l] = the scale of the block holding groups
    4l..4l+3 (block l // 2). d % 32 == 0."""
    d = x.shape[0]
    G = d // 4
    xq = np.empty(d, np.int8)
    xs = np.empty(d // 32, np.float32)
    quantize_q8(x, xq, xs)
    x4 = np.empty(d, np.int8)
    for g in range(G):
        for j in range(4):
            x4[j * G + g] = xq[4 * g + j]
    s4 = np.empty(G // 4, np.float32)
    for lane in range(G // 4):
        s4[lane] = xs[lane >> 1]
    return x4, s4


@njit(cache=True)
def act50(x):
    """x f32[d] -> (xq int8[d], xs f32[d/32]) as quantize_q8. d % 32 == 0."""
    d = x.shape[0]
    xq = np.empty(d, np.int8)
    xs = np.empty(d // 32, np.float32)
    quantize_q8(x, xq, xs)
    return xq, xs
