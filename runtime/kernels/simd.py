"""SIMD building blocks for the decode kernels, emitted as LLVM IR via numba intrinsics.

Plain Numba compiles quantized dot products to 64-bit integer lanes and reaches a fraction of
memory bandwidth (DESIGN.md, "Facts measured"). These intrinsics write the inner loops of one row
directly in LLVM IR, with an 8 x float32 vector accumulator that stays in a register:

    q4_dot(q, qoff, s, soff, gshift, nb, xq, xs, lut)     int4 row (Q4_0 nibbles) . int8 blocks
    q8_dot(q, qoff, nb, xq, xs)                           int8 row . int8 blocks (no row scale)
    f16_dot(q, qoff, nv, x)                               float16 row . float32, 32 per step
    q4_axpy / q8_axpy / f16_axpy(acc, ..., a)             acc[:] += a * row (FFN down, tiles)

q, s are arrays of any dtype addressed by byte offsets (qoff, soff); blocks are 32 values; xq/xs
are the activations quantized per block of 32 (see quantize_q8), lut the float16 -> float32
table used for scales. Rows shorter than a whole number of blocks are finished by the caller.

Two flavors of each integer dot: "avx2" uses vpsignb/vpabsb/vpmaddubsw/vpmaddwd as llama.cpp does
(products of bytes summed in pairs into 16 and then 32 bits; no overflow since |x| <= 127 and
|w| <= 128); "generic" sign-extends and multiplies, which LLVM compiles for any target (ARM NEON
included). The avx2 flavor falls back to the generic IR on a CPU without AVX2, so both always
compile. The float16 kernels use LLVM's half -> float conversion (vcvtph2ps with F16C, fcvtl on
ARM) and are only used where the CPU has it (HAVE_F16).
"""

import platform

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_FEATURES = llb.get_host_cpu_features().flatten()
_NUMBA_HOST = (numba.config.CPU_NAME in (None, "host")
               and not numba.config.CPU_FEATURES)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_ARM = platform.machine().lower() in ("aarch64", "arm64")
HAVE_AVX2 = _NUMBA_HOST and _X86 and "+avx2" in _FEATURES.split(",")
HAVE_F16 = _NUMBA_HOST and ((_X86 and "+f16c" in _FEATURES.split(",")) or _ARM)
# intrinsics cannot run as Python: without the JIT the dispatch uses the portable kernels
AVAILABLE = not numba.config.DISABLE_JIT

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32, F16 = ir.FloatType(), ir.HalfType()


def _v(t, n):
    return ir.VectorType(t, n)


def _splat(builder, val, n):
    vt = _v(val.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(_v(I32, n), [0] * n))


def _const_vec(t, n, val):
    return ir.Constant(_v(t, n), [val] * n)


def _call(builder, name, args, retty):
    fnty = ir.FunctionType(retty, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def _base(context, builder, aryty, ary):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(a.data, I8.as_pointer())


def _at(builder, base, off, ty, align=1):
    p = builder.gep(base, [off])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=align)


def _store_at(builder, base, off, val, align=1):
    p = builder.gep(base, [off])
    builder.store(val, builder.bitcast(p, val.type.as_pointer()), align=align)


def _mul(builder, a, b):
    return builder.mul(a, b)


def _fmuladd(builder, a, b, c):
    return _call(builder, f"llvm.fmuladd.v{a.type.count}f32", [a, b, c], a.type)


def _hsum(builder, v):
    total = builder.extract_element(v, ir.Constant(I32, 0))
    for i in range(1, v.type.count):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(I32, i)))
    return total


def _slice(builder, v, start, n):
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                  ir.Constant(_v(I32, n), list(range(start, start + n))))


def _block_dot(builder, w, x, avx2):
    """<32 x i8> w (|w| <= 128), <32 x i8> x (|x| <= 127) -> <8 x i32> partial sums of w * x."""
    if avx2 and HAVE_AVX2:
        aw = _call(builder, "llvm.abs.v32i8", [w, ir.Constant(ir.IntType(1), 0)], w.type)
        sx = _call(builder, "llvm.x86.avx2.psign.b", [x, w], w.type)
        p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", [aw, sx], _v(I16, 16))
        return _call(builder, "llvm.x86.avx2.pmadd.wd", [p16, _const_vec(I16, 16, 1)],
                     _v(I32, 8))
    p = builder.mul(builder.sext(w, _v(I16, 32)), builder.sext(x, _v(I16, 32)))
    p = builder.sext(p, _v(I32, 32))
    s = builder.add(_slice(builder, p, 0, 16), _slice(builder, p, 16, 16))
    return builder.add(_slice(builder, s, 0, 8), _slice(builder, s, 8, 8))


def _unpack_q4(builder, q16):
    """<16 x i8> Q4_0 bytes -> <32 x i8> signed values (nibble - 8), in element order."""
    lo = builder.and_(q16, _const_vec(I8, 16, 0x0F))
    hi = builder.lshr(q16, _const_vec(I8, 16, 4))
    u = builder.shuffle_vector(lo, hi, ir.Constant(_v(I32, 32), list(range(32))))
    return builder.sub(u, _const_vec(I8, 32, 8))


def _half_to_float(builder, h, native):
    """<n x i16> float16 bits -> <n x float>: the CPU's conversion when native (and HAVE_F16),
    else integer bit manipulation (exact for every pattern: subnormals via a multiply by 2^112,
    inf and nan kept)."""
    n = h.type.count
    if native and HAVE_F16:
        return builder.fpext(builder.bitcast(h, _v(F16, n)), _v(F32, n))
    h32 = builder.zext(h, _v(I32, n))
    sign = builder.shl(builder.and_(h32, _const_vec(I32, n, 0x8000)), _const_vec(I32, n, 16))
    mag = builder.shl(builder.and_(h32, _const_vec(I32, n, 0x7FFF)), _const_vec(I32, n, 13))
    f = builder.fmul(builder.bitcast(mag, _v(F32, n)), _const_vec(F32, n, 2.0 ** 112))
    infnan = builder.icmp_unsigned("==", builder.and_(h32, _const_vec(I32, n, 0x7C00)),
                                   _const_vec(I32, n, 0x7C00))
    bits = builder.select(infnan, builder.or_(mag, _const_vec(I32, n, 0x7F800000)),
                          builder.bitcast(f, _v(I32, n)))
    return builder.bitcast(builder.or_(bits, sign), _v(F32, n))


def _lut_scale(builder, sbase, soff, lut):
    h = _at(builder, sbase, soff, I16, align=2)
    idx = builder.zext(h, I64)
    return _at(builder, lut, builder.mul(idx, ir.Constant(I64, 4)), F32, align=4)


def _block_loop(builder, nb, body, unroll=4):
    """Sum over blocks b < nb of body(b, acc) -> acc, with `unroll` independent <8 x float>
    accumulators (one chain of fused multiply-adds would be bound by its latency)."""
    zero = _const_vec(F32, 8, 0.0)
    accs = [cgutils.alloca_once_value(builder, zero) for _ in range(unroll)]
    nmain = builder.udiv(nb, ir.Constant(I64, unroll))
    with cgutils.for_range(builder, nmain) as lp:
        base = builder.mul(lp.index, ir.Constant(I64, unroll))
        for u, acc in enumerate(accs):
            b = builder.add(base, ir.Constant(I64, u))
            builder.store(body(b, builder.load(acc)), acc)
    with cgutils.for_range_slice(builder, builder.mul(nmain, ir.Constant(I64, unroll)), nb,
                                 ir.Constant(I64, 1)) as (b, _):
        builder.store(body(b, builder.load(accs[0])), accs[0])
    total = builder.load(accs[0])
    for acc in accs[1:]:
        total = builder.fadd(total, builder.load(acc))
    return _hsum(builder, total)


def _make_q4_dot(avx2):
    @intrinsic
    def q4_dot(typingctx, q, qoff, s, soff, gshift, nb, xq, xs, lut):
        """int4 row (nb blocks at byte qoff; float16 scale of block b at soff + 2 (b >> gshift))
        . int8 activations xq with block scales xs."""
        sig = types.float32(q, types.int64, s, types.int64, types.int64, types.int64, xq, xs, lut)

        def codegen(context, builder, sig, args):
            qa, qoff, sa, soff, gshift, nb, xqa, xsa, luta = args
            qb = _base(context, builder, sig.args[0], qa)
            sb = _base(context, builder, sig.args[2], sa)
            xqb = _base(context, builder, sig.args[6], xqa)
            xsb = _base(context, builder, sig.args[7], xsa)
            lb = _base(context, builder, sig.args[8], luta)

            def body(b, acc):
                sidx = builder.shl(builder.lshr(b, gshift), ir.Constant(I64, 1))
                sc = _lut_scale(builder, sb, builder.add(soff, sidx), lb)
                q16 = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 4))),
                          _v(I8, 16))
                xv = _at(builder, xqb, builder.shl(b, ir.Constant(I64, 5)), _v(I8, 32))
                p = _block_dot(builder, _unpack_q4(builder, q16), xv, avx2)
                d = builder.fmul(sc, _at(builder, xsb, builder.shl(b, ir.Constant(I64, 2)),
                                         F32, align=4))
                return _fmuladd(builder, builder.sitofp(p, _v(F32, 8)), _splat(builder, d, 8),
                                acc)

            return _block_loop(builder, nb, body)

        return sig, codegen

    return q4_dot


def _make_q8_dot(avx2):
    @intrinsic
    def q8_dot(typingctx, q, qoff, nb, xq, xs):
        """int8 row (nb blocks at byte qoff) . int8 activations; the row scale is the caller's."""
        sig = types.float32(q, types.int64, types.int64, xq, xs)

        def codegen(context, builder, sig, args):
            qa, qoff, nb, xqa, xsa = args
            qb = _base(context, builder, sig.args[0], qa)
            xqb = _base(context, builder, sig.args[3], xqa)
            xsb = _base(context, builder, sig.args[4], xsa)

            def body(b, acc):
                w = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 5))),
                        _v(I8, 32))
                xv = _at(builder, xqb, builder.shl(b, ir.Constant(I64, 5)), _v(I8, 32))
                p = _block_dot(builder, w, xv, avx2)
                d = _at(builder, xsb, builder.shl(b, ir.Constant(I64, 2)), F32, align=4)
                return _fmuladd(builder, builder.sitofp(p, _v(F32, 8)), _splat(builder, d, 8),
                                acc)

            return _block_loop(builder, nb, body)

        return sig, codegen

    return q8_dot


q4_dot_fast, q4_dot_generic = _make_q4_dot(True), _make_q4_dot(False)
q8_dot_fast, q8_dot_generic = _make_q8_dot(True), _make_q8_dot(False)


def _make_f16_dot(native):
    @intrinsic
    def f16_dot(typingctx, q, qoff, nv, x):
        """sum over the first 32 * nv values of f16 row (bytes at qoff) times x f32."""
        sig = types.float32(q, types.int64, types.int64, x)

        def codegen(context, builder, sig, args):
            qa, qoff, nv, xa = args
            qb = _base(context, builder, sig.args[0], qa)
            xb = _base(context, builder, sig.args[3], xa)
            acc = cgutils.alloca_once_value(builder, _const_vec(F32, 32, 0.0))
            with cgutils.for_range(builder, nv) as lp:
                j = lp.index
                h = _at(builder, qb, builder.add(qoff, builder.shl(j, ir.Constant(I64, 6))),
                        _v(I16, 32))
                w = _half_to_float(builder, h, native)
                xv = _at(builder, xb, builder.shl(j, ir.Constant(I64, 7)), _v(F32, 32), align=4)
                builder.store(_fmuladd(builder, w, xv, builder.load(acc)), acc)
            v = builder.load(acc)
            s = builder.fadd(_slice(builder, v, 0, 16), _slice(builder, v, 16, 16))
            s = builder.fadd(_slice(builder, s, 0, 8), _slice(builder, s, 8, 8))
            return _hsum(builder, s)

        return sig, codegen

    return f16_dot


f16_dot_fast, f16_dot_generic = _make_f16_dot(True), _make_f16_dot(False)


@intrinsic
def q4_axpy(typingctx, acc, q, qoff, s, soff, gshift, nb, a, lut):
    """acc[0:32 * nb] += a * (int4 row at qoff; scales as in q4_dot)."""
    sig = types.void(acc, q, types.int64, s, types.int64, types.int64, types.int64,
                     types.float32, lut)

    def codegen(context, builder, sig, args):
        acca, qa, qoff, sa, soff, gshift, nb, a, luta = args
        ab = _base(context, builder, sig.args[0], acca)
        qb = _base(context, builder, sig.args[1], qa)
        sb = _base(context, builder, sig.args[3], sa)
        lb = _base(context, builder, sig.args[8], luta)
        with cgutils.for_range(builder, nb) as lp:
            b = lp.index
            sidx = builder.shl(builder.lshr(b, gshift), ir.Constant(I64, 1))
            sc = _lut_scale(builder, sb, builder.add(soff, sidx), lb)
            av = _splat(builder, builder.fmul(a, sc), 32)
            q16 = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 4))),
                      _v(I8, 16))
            w = builder.sitofp(_unpack_q4(builder, q16), _v(F32, 32))
            off = builder.shl(b, ir.Constant(I64, 7))
            old = _at(builder, ab, off, _v(F32, 32), align=4)
            _store_at(builder, ab, off, _fmuladd(builder, w, av, old), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q8_axpy(typingctx, acc, q, qoff, nb, a):
    """acc[0:32 * nb] += a * (int8 row at qoff)."""
    sig = types.void(acc, q, types.int64, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        acca, qa, qoff, nb, a = args
        ab = _base(context, builder, sig.args[0], acca)
        qb = _base(context, builder, sig.args[1], qa)
        av = _splat(builder, a, 32)
        with cgutils.for_range(builder, nb) as lp:
            b = lp.index
            w = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 5))),
                    _v(I8, 32))
            w = builder.sitofp(w, _v(F32, 32))
            off = builder.shl(b, ir.Constant(I64, 7))
            old = _at(builder, ab, off, _v(F32, 32), align=4)
            _store_at(builder, ab, off, _fmuladd(builder, w, av, old), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _make_f16_axpy(native):
    @intrinsic
    def f16_axpy(typingctx, acc, q, qoff, nv, a):
        """acc[0:32 * nv] += a * (float16 row at qoff)."""
        sig = types.void(acc, q, types.int64, types.int64, types.float32)

        def codegen(context, builder, sig, args):
            acca, qa, qoff, nv, a = args
            ab = _base(context, builder, sig.args[0], acca)
            qb = _base(context, builder, sig.args[1], qa)
            av = _splat(builder, a, 32)
            with cgutils.for_range(builder, nv) as lp:
                j = lp.index
                h = _at(builder, qb, builder.add(qoff, builder.shl(j, ir.Constant(I64, 6))),
                        _v(I16, 32))
                w = _half_to_float(builder, h, native)
                off = builder.shl(j, ir.Constant(I64, 7))
                old = _at(builder, ab, off, _v(F32, 32), align=4)
                _store_at(builder, ab, off, _fmuladd(builder, w, av, old), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return f16_axpy


f16_axpy_fast, f16_axpy_generic = _make_f16_axpy(True), _make_f16_axpy(False)


@njit(cache=True)
def quantize_q8(x, xq, xs):
    """x f32[d] -> xq int8[>= ceil(d/32)*32] (zero padded), xs f32[ceil(d/32)]: per block of 32,
    scale max|x| / 127 and values round(x / scale), as llama.cpp's Q8_0 (scale kept in float32)."""
    d = x.shape[0]
    nb = (d + 31) // 32
    for b in range(nb):
        j0 = b * 32
        j1 = min(d, j0 + 32)
        amax = np.float32(0.0)
        for j in range(j0, j1):
            amax = max(amax, abs(x[j]))
        sc = amax / np.float32(127.0)
        inv = np.float32(1.0) / sc if amax > 0 else np.float32(0.0)
        xs[b] = sc
        for j in range(j0, j1):
            xq[j] = np.int8(np.rint(x[j] * inv))
        for j in range(j1, j0 + 32):
            xq[j] = 0
