"""SIMD building blocks for the decode kernels, emitted as LLVM IR via numba intrinsics.

Plain Numba compiles quantized dot products to 64-bit integer lanes and reaches a fraction of
memory bandwidth (DESIGN.md, "Facts measured"). These intrinsics write the inner loop over one
row directly in LLVM IR, with float32 vector accumulators that stay in registers:

    q4_dot(q, qoff, s, soff, gshift, nb, xp, corr, xs, lut)  int4 row . int8 x (pair layout)
    q8_dot(q, qoff, nb, xq, xs)                              int8 row . int8 x (no row scale)
    f16_dot(q, qoff, nv, x), f32_dot(...)                    float rows . float32 x
    q4_axpy / q8_axpy / f16_axpy / f32_axpy(acc, ..., a)     acc[:32 nb] += a * row
    ld_f32 / ld_i8 / ld_u16(a, off), prefetch(a, off)        scalar loads, cache hint

Rows are addressed by byte offsets into any array (q, s may be the same bundle array); blocks
are 32 values; nb counts blocks (nv: 32-value steps), a row's remainder is the caller's. int4
scales are float16 at soff + 2 (b >> gshift) (group = 32 << gshift). Activations are quantized
once per call (quantize_q8: per block of 32, scale max|x| / 127, like llama.cpp's Q8_0), and
reordered for q4_dot (pair_layout), which multiplies two blocks per step as unsigned nibbles and
subtracts 8 * sum(x) per block.

Each integer dot and float16 kernel has two flavors: "fast" uses vpmaddubsw/vpmaddwd (as
llama.cpp does; byte products summed in pairs into 16 bits, then 32: no overflow since |x| <=
127, |w| <= 128), or vpdpbusd where the CPU has VNNI (HAVE_VNNI: byte products summed in fours
straight into 32 bits), and the CPU's float16 conversion (F16C vcvtph2ps, ARM fcvtl); with
AVX-512 (HAVE_AVX512) q4_dot takes four blocks a step in 512-bit registers. On aarch64 with the
dot-product extension (HAVE_DOTPROD) the fast flavor multiplies with sdot (signed bytes summed in
fours into 32-bit lanes, grouped as vpdpbusd's: the same integer sums). flavour() names the
choice. "generic"
sign-extends and multiplies, and converts float16 with integer bit operations, which LLVM
compiles for any target. The fast flavor emits the generic IR where the CPU lacks the
instructions, so both always compile; the kernels take a `fast` flag and tests run both.
Intrinsics cannot run as Python: without the JIT (NUMBA_DISABLE_JIT=1) the dispatch uses the
portable kernels (AVAILABLE is False).
"""

import os
import platform

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cachestamp

# the features Numba compiles for: the host's as LLVM reads them (/proc/cpuinfo on Linux), or
# NUMBA_CPU_FEATURES where set (scripts/aarch64-check: qemu-user before 8.1 shows the host's
# /proc/cpuinfo, so LLVM sees a generic CPU); NUMBA_CPU_NAME alone (code for another CPU) keeps
# every instruction choice below off. Emitting an instruction the target lacks aborts LLVM.
_FEATURES = (numba.config.CPU_FEATURES if numba.config.CPU_FEATURES is not None
             else llb.get_host_cpu_features().flatten())
_NUMBA_HOST = (numba.config.CPU_FEATURES is not None
               or numba.config.CPU_NAME in (None, "host"))
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
_ARM = platform.machine().lower() in ("aarch64", "arm64")
HAVE_AVX2 = _NUMBA_HOST and _X86 and "+avx2" in _FEATURES.split(",")
HAVE_F16 = _NUMBA_HOST and ((_X86 and "+f16c" in _FEATURES.split(",")) or _ARM)
# vpdpbusd (AVX-512 VNNI with VL, or AVX-VNNI): u8 x s8 products summed in groups of four into
# 32-bit lanes in one instruction, for vpmaddubsw + vpmaddwd (+ vpaddw); EDGELLM_NO_VNNI=1 keeps
# the AVX2 sequence (tests run it in a subprocess)
_FEATS = set(_FEATURES.split(","))
HAVE_VNNI = (HAVE_AVX2 and os.environ.get("EDGELLM_NO_VNNI", "") != "1"
             and ("+avxvnni" in _FEATS or {"+avx512vnni", "+avx512vl"} <= _FEATS))
# vpexpandb (AVX-512 VBMI2 with VL) for the 50% sparse int8 kernel (sparse_simd.py);
# EDGELLM_NO_VBMI2=1 keeps its float fallback
HAVE_VBMI2 = (HAVE_AVX2 and os.environ.get("EDGELLM_NO_VBMI2", "") != "1"
              and {"+avx512vbmi2", "+avx512vl", "+avx512bw"} <= _FEATS)
# 512-bit registers for the int4 dot product (AVX-512 BW + VNNI): four blocks a step, half the
# instructions of the 256-bit sequence; EDGELLM_NO_AVX512=1 keeps the 256-bit one
HAVE_AVX512 = (HAVE_VNNI and os.environ.get("EDGELLM_NO_AVX512", "") != "1"
               and {"+avx512bw", "+avx512vnni", "+avx512f"} <= _FEATS)
# aarch64 dot-product instructions (ARMv8.2 dotprod, /proc/cpuinfo "asimddp": Raspberry Pi 5's
# Cortex-A76, not the Pi 4's A72): sdot sums four s8 x s8 products into each 32-bit lane, as
# vpdpbusd does; EDGELLM_NO_DOTPROD=1 keeps the generic IR
HAVE_DOTPROD = (_NUMBA_HOST and _ARM and os.environ.get("EDGELLM_NO_DOTPROD", "") != "1"
                and "+dotprod" in _FEATS)
# intrinsics cannot run as Python: without the JIT the dispatch uses the portable kernels
AVAILABLE = not numba.config.DISABLE_JIT


def flavour():
    """The instructions the "fast" kernels' integer dot products use on this CPU (the one place
    that names the choice; --stats and the benchmarks print it)."""
    if not AVAILABLE:
        return "portable (no JIT)"
    if HAVE_AVX512:
        return "x86 AVX-512 VNNI"
    if HAVE_VNNI:
        return "x86 AVX2 VNNI"
    if HAVE_AVX2:
        return "x86 AVX2"
    if HAVE_DOTPROD:
        return "aarch64 NEON sdot"
    if _ARM:
        return "aarch64 NEON generic" + (" (the CPU has dotprod, Numba's target does not: "
                                         "set NUMBA_CPU_FEATURES)" if _cpu_dotprod() else "")
    return "generic"


def _cpu_dotprod():
    """Linux's AT_HWCAP says the CPU has the dot-product instructions (HWCAP_ASIMDDP)."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return False
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return bool(getauxval(16) & (1 << 20))


# cached kernels inline this file's IR (and other kernel files'): cachestamp drops their
# cache entries when a file they reach, or one of the choices above, changed
cachestamp.drop_stale(f"vnni={HAVE_VNNI},vbmi2={HAVE_VBMI2},avx512={HAVE_AVX512}"
                      + (f",dotprod={HAVE_DOTPROD}" if _ARM else ""))

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


def _fmuladd(builder, a, b, c):
    return _call(builder, f"llvm.fmuladd.v{a.type.count}f32", [a, b, c], a.type)


def _hsum(builder, v):
    """Sum of a float vector's lanes as a tree of halves (3 adds for 8 lanes, not 7 in a chain)."""
    while v.type.count > 1:
        h = v.type.count // 2
        v = builder.fadd(_slice(builder, v, 0, h), _slice(builder, v, h, h))
    return builder.extract_element(v, ir.Constant(I32, 0))


def _slice(builder, v, start, n):
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                  ir.Constant(_v(I32, n), list(range(start, start + n))))


def _dpbusd(builder, acc, u, s):
    """acc <8 x i32> + sums of four u8 (u) x s8 (s) products per lane: vpdpbusd."""
    t = _v(I32, 8)
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256",
                 [acc, builder.bitcast(u, t), builder.bitcast(s, t)], t)


def _sdot(builder, acc, a, b):
    """acc <8 x i32> + sums of four s8 (a <32 x i8>) x s8 (b) products per lane, lane k bytes
    4k..4k+3 (vpdpbusd's grouping): two sdot on 128-bit halves."""
    halves = []
    for h in range(2):
        halves.append(_call(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8",
                            [_slice(builder, acc, 4 * h, 4), _slice(builder, a, 16 * h, 16),
                             _slice(builder, b, 16 * h, 16)], _v(I32, 4)))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_v(I32, 8), list(range(8))))


def _block_dot(builder, w, x, avx2):
    """<32 x i8> w (|w| <= 128), <32 x i8> x (|x| <= 127) -> <8 x i32> partial sums of w * x
    (fast flavor: lane k bytes 4k..4k+3, sparse_simd relies on it)."""
    if avx2 and HAVE_DOTPROD:
        return _sdot(builder, _const_vec(I32, 8, 0), w, x)
    if avx2 and HAVE_AVX2:
        aw = _call(builder, "llvm.abs.v32i8", [w, ir.Constant(ir.IntType(1), 0)], w.type)
        sx = _call(builder, "llvm.x86.avx2.psign.b", [x, w], w.type)
        if HAVE_VNNI:
            return _dpbusd(builder, _const_vec(I32, 8, 0), aw, sx)
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
    return total


def _pair_dot(builder, lo, hi, xlo, xhi, avx2):
    """Two blocks at once. lo, hi <32 x i8> unsigned nibbles (0..15), xlo, xhi <32 x i8> signed
    activations in the matching order -> <8 x i32>, lane k = sum of elements 4k..4k+3 of
    lo * xlo + hi * xhi (lanes 0-3 the first block, 4-7 the second). vpmaddubsw pair sums are at
    most 2 * 15 * 127 = 3810 and two of them 7620: no 16-bit saturation."""
    if avx2 and HAVE_VNNI:
        return _dpbusd(builder, _dpbusd(builder, _const_vec(I32, 8, 0), lo, xlo), hi, xhi)
    if avx2 and HAVE_DOTPROD:  # nibbles 0..15 are valid s8 operands
        return _sdot(builder, _sdot(builder, _const_vec(I32, 8, 0), lo, xlo), hi, xhi)
    if avx2 and HAVE_AVX2:
        p = builder.add(_call(builder, "llvm.x86.avx2.pmadd.ub.sw", [lo, xlo], _v(I16, 16)),
                        _call(builder, "llvm.x86.avx2.pmadd.ub.sw", [hi, xhi], _v(I16, 16)))
        return _call(builder, "llvm.x86.avx2.pmadd.wd", [p, _const_vec(I16, 16, 1)], _v(I32, 8))
    p = builder.add(builder.mul(builder.zext(lo, _v(I16, 32)), builder.sext(xlo, _v(I16, 32))),
                    builder.mul(builder.zext(hi, _v(I16, 32)), builder.sext(xhi, _v(I16, 32))))
    p = builder.sext(p, _v(I32, 32))
    for n in (16, 8):
        even = ir.Constant(_v(I32, n), list(range(0, 2 * n, 2)))
        odd = ir.Constant(_v(I32, n), list(range(1, 2 * n, 2)))
        undef = ir.Constant(p.type, ir.Undefined)
        p = builder.add(builder.shuffle_vector(p, undef, even),
                        builder.shuffle_vector(p, undef, odd))
    return p


def _scale_pair(builder, sbase, soff, b0, b1, gshift, lut, native):
    """float16 scales of blocks b0, b1 -> <2 x float>."""
    idx = [builder.add(soff, builder.shl(builder.lshr(b, gshift), ir.Constant(I64, 1)))
           for b in (b0, b1)]
    if native and HAVE_F16:
        h = ir.Constant(_v(I16, 2), ir.Undefined)
        for k, o in enumerate(idx):
            h = builder.insert_element(h, _at(builder, sbase, o, I16, align=2),
                                       ir.Constant(I32, k))
        return builder.fpext(builder.bitcast(h, _v(F16, 2)), _v(F32, 2))
    v = ir.Constant(_v(F32, 2), ir.Undefined)
    for k, o in enumerate(idx):
        v = builder.insert_element(v, _lut_scale(builder, sbase, o, lut), ir.Constant(I32, k))
    return v


def _pair_x(builder, p):
    """Byte offset in xp of the activations of pair p's low nibbles (pair_layout): 128 (p >> 1)
    + 32 (p & 1); those of its high nibbles are 64 bytes further."""
    return builder.sub(builder.shl(p, ir.Constant(I64, 6)),
                       builder.shl(builder.and_(p, ir.Constant(I64, 1)), ir.Constant(I64, 5)))


def _dpbusd512(builder, acc, u, s):
    """acc <16 x i32> + sums of four u8 (u <64 x i8>) x s8 (s) products per lane: vpdpbusd zmm."""
    t = _v(I32, 16)
    return _call(builder, "llvm.x86.avx512.vpdpbusd.512",
                 [acc, builder.bitcast(u, t), builder.bitcast(s, t)], t)


def _q4_quads512(builder, qb, qoff, sb, soff, gshift, npairs, xpb, cb, xsb):
    """q4_dot's pairs 0 .. npairs & ~1 two at a time (four blocks, 64 bytes of a row) in 512-bit
    registers -> <8 x float> partial sums (q4_dot's lane order folded). In the pair layout the
    activations of the low (high) nibbles of pairs 2k, 2k + 1 are the 64 bytes at 128k
    (128k + 64), corr of both pairs 64 bytes at 64k. Lanes of the dot product: 4j..4j+3 block
    4k + j. Scales: four float16 at soff + 8k when each block has its
    own (gshift 0), else one per block through b >> gshift."""
    c1 = ir.Constant(I64, 1)
    nquads = builder.lshr(npairs, c1)
    zero = _const_vec(F32, 16, 0.0)
    izero = _const_vec(I32, 16, 0)
    spread = ir.Constant(_v(I32, 16), [j // 4 for j in range(16)])
    result = cgutils.alloca_once_value(builder, zero)

    def step(k, acc, own_scales):
        qv = _at(builder, qb, builder.add(qoff, builder.shl(k, ir.Constant(I64, 6))), _v(I8, 64))
        lo = builder.and_(qv, _const_vec(I8, 64, 0x0F))
        hi = builder.lshr(qv, _const_vec(I8, 64, 4))
        x0 = builder.shl(k, ir.Constant(I64, 7))
        xlo = _at(builder, xpb, x0, _v(I8, 64))
        xhi = _at(builder, xpb, builder.add(x0, ir.Constant(I64, 64)), _v(I8, 64))
        dot = _dpbusd512(builder, _dpbusd512(builder, izero, lo, xlo), hi, xhi)
        dot = builder.sub(dot, _at(builder, cb, builder.shl(k, ir.Constant(I64, 6)), _v(I32, 16),
                                   align=4))
        if own_scales:
            h = _at(builder, sb, builder.add(soff, builder.shl(k, ir.Constant(I64, 3))),
                    _v(I16, 4), align=2)
        else:
            h = ir.Constant(_v(I16, 4), ir.Undefined)
            b0 = builder.shl(k, ir.Constant(I64, 2))
            for j in range(4):
                b = builder.add(b0, ir.Constant(I64, j))
                o = builder.add(soff, builder.shl(builder.lshr(b, gshift), c1))
                h = builder.insert_element(h, _at(builder, sb, o, I16, align=2),
                                           ir.Constant(I32, j))
        ws = builder.fpext(builder.bitcast(h, _v(F16, 4)), _v(F32, 4))
        d4 = builder.fmul(ws, _at(builder, xsb, builder.shl(k, ir.Constant(I64, 4)), _v(F32, 4),
                                  align=4))
        d16 = builder.shuffle_vector(d4, ir.Constant(d4.type, ir.Undefined), spread)
        return _fmuladd(builder, builder.sitofp(dot, _v(F32, 16)), d16, acc)

    def loop(own_scales):
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]
        n2 = builder.lshr(nquads, c1)
        with cgutils.for_range(builder, n2) as lp:
            k0 = builder.shl(lp.index, c1)
            for u, acc in enumerate(accs):
                builder.store(step(builder.add(k0, ir.Constant(I64, u)), builder.load(acc),
                                   own_scales), acc)
        with cgutils.for_range_slice(builder, builder.shl(n2, c1), nquads, c1) as (k, _):
            builder.store(step(k, builder.load(accs[0]), own_scales), accs[0])
        builder.store(builder.fadd(builder.load(accs[0]), builder.load(accs[1])), result)

    own = builder.icmp_unsigned("==", gshift, ir.Constant(I64, 0))
    with builder.if_else(own) as (then, other):
        with then:
            loop(True)
        with other:
            loop(False)
    v = builder.load(result)
    return builder.fadd(_slice(builder, v, 0, 8), _slice(builder, v, 8, 8))


def _make_q4_dot(avx2):
    @intrinsic
    def q4_dot(typingctx, q, qoff, s, soff, gshift, nb, xp, corr, xs, lut):
        """int4 row (nb blocks at byte qoff; float16 scale of block b at soff + 2 (b >> gshift))
        . activations in pair layout (xp, corr, xs: see pair_layout)."""
        sig = types.float32(q, types.int64, s, types.int64, types.int64, types.int64, xp, corr,
                            xs, lut)

        def codegen(context, builder, sig, args):
            qa, qoff, sa, soff, gshift, nb, xpa, corra, xsa, luta = args
            qb = _base(context, builder, sig.args[0], qa)
            sb = _base(context, builder, sig.args[2], sa)
            xpb = _base(context, builder, sig.args[6], xpa)
            cb = _base(context, builder, sig.args[7], corra)
            xsb = _base(context, builder, sig.args[8], xsa)
            lb = _base(context, builder, sig.args[9], luta)
            c5 = ir.Constant(I64, 5)

            def pair(p, qv, b1, acc):
                lo = builder.and_(qv, _const_vec(I8, 32, 0x0F))
                hi = builder.lshr(qv, _const_vec(I8, 32, 4))
                x0 = _pair_x(builder, p)
                xlo = _at(builder, xpb, x0, _v(I8, 32))
                xhi = _at(builder, xpb, builder.add(x0, ir.Constant(I64, 64)), _v(I8, 32))
                dot = builder.sub(_pair_dot(builder, lo, hi, xlo, xhi, avx2),
                                  _at(builder, cb, builder.shl(p, c5), _v(I32, 8), align=4))
                b0 = builder.shl(p, ir.Constant(I64, 1))
                ws = _scale_pair(builder, sb, soff, b0, b1, gshift, lb, avx2)
                d2 = builder.fmul(ws, _at(builder, xsb, builder.shl(p, ir.Constant(I64, 3)),
                                          _v(F32, 2), align=4))
                d8 = builder.shuffle_vector(d2, ir.Constant(d2.type, ir.Undefined),
                                            ir.Constant(_v(I32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
                return _fmuladd(builder, builder.sitofp(dot, _v(F32, 8)), d8, acc)

            def body(p, acc):
                qv = _at(builder, qb, builder.add(qoff, builder.shl(p, c5)), _v(I8, 32))
                b1 = builder.add(builder.shl(p, ir.Constant(I64, 1)), ir.Constant(I64, 1))
                return pair(p, qv, b1, acc)

            npairs = builder.lshr(nb, ir.Constant(I64, 1))
            if avx2 and HAVE_AVX512:  # four blocks a step in 512-bit registers, a pair left
                total = cgutils.alloca_once_value(builder, _q4_quads512(
                    builder, qb, qoff, sb, soff, gshift, npairs, xpb, cb, xsb))
                with cgutils.for_range_slice(builder, builder.and_(npairs, ir.Constant(I64, -2)),
                                             npairs, ir.Constant(I64, 1)) as (p, _):
                    builder.store(body(p, builder.load(total)), total)
            else:
                total = cgutils.alloca_once_value(builder, _block_loop(builder, npairs, body, 2))
            odd = builder.icmp_unsigned("!=", builder.and_(nb, ir.Constant(I64, 1)),
                                        ir.Constant(I64, 0))
            with builder.if_then(odd):  # last block alone: load its 16 bytes only
                q16 = _at(builder, qb, builder.add(qoff, builder.shl(npairs, c5)), _v(I8, 16))
                qv = builder.shuffle_vector(q16, ir.Constant(q16.type, [0] * 16),
                                            ir.Constant(_v(I32, 32), list(range(32))))
                b0 = builder.shl(npairs, ir.Constant(I64, 1))  # its own scale for the empty half
                builder.store(pair(npairs, qv, b0, builder.load(total)), total)
            return _hsum(builder, builder.load(total))

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

            return _hsum(builder, _block_loop(builder, nb, body))

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


def _make_quantize(pairs):
    @intrinsic
    def quantize_blocks(typingctx, x, nb, xq, xs, xp, corr):
        """quantize_q8 of the first nb whole blocks of x (xq, xs), in vector registers; with
        pairs, also their pair_layout (xp, corr). The same float32 operations as quantize_q8
        (max |x|, / 127, 1 / scale, x * (1 / scale) rounded half to even), so the same bits."""
        sig = types.void(x, types.int64, xq, xs, xp, corr)

        def codegen(context, builder, sig, args):
            xa, nb, xqa, xsa, xpa, corra = args
            xb = _base(context, builder, sig.args[0], xa)
            xqb = _base(context, builder, sig.args[2], xqa)
            xsb = _base(context, builder, sig.args[3], xsa)
            xpb = _base(context, builder, sig.args[4], xpa)
            cb = _base(context, builder, sig.args[5], corra)
            c = [ir.Constant(I64, k) for k in range(8)]
            with cgutils.for_range(builder, nb) as lp:
                b = lp.index
                v = _at(builder, xb, builder.shl(b, c[7]), _v(F32, 32), align=4)
                a = _call(builder, "llvm.fabs.v32f32", [v], v.type)
                while a.type.count > 1:  # max of the lanes as a tree
                    h = a.type.count // 2
                    a = _call(builder, f"llvm.maxnum.v{h}f32",
                              [_slice(builder, a, 0, h), _slice(builder, a, h, h)], _v(F32, h))
                amax = builder.extract_element(a, ir.Constant(I32, 0))
                sc = builder.fdiv(amax, ir.Constant(F32, 127.0))
                pos = builder.fcmp_ordered(">", amax, ir.Constant(F32, 0.0))
                inv = builder.select(pos, builder.fdiv(ir.Constant(F32, 1.0), sc),
                                     ir.Constant(F32, 0.0))
                _store_at(builder, xsb, builder.shl(b, c[2]), sc, align=4)
                r = _call(builder, "llvm.roundeven.v32f32",
                          [builder.fmul(v, _splat(builder, inv, 32))], v.type)
                qv = builder.fptosi(r, _v(I8, 32))
                _store_at(builder, xqb, builder.shl(b, c[5]), qv)
                if pairs:
                    # pair_layout: block b is half b & 1 of pair p = b >> 1, whose activations sit
                    # at 128 (p >> 1) + 32 (p & 1); elements 0-15 there, 16-31 64 bytes further
                    p = builder.lshr(b, c[1])
                    e = builder.add(_pair_x(builder, p),
                                    builder.shl(builder.and_(b, c[1]), c[4]))
                    _store_at(builder, xpb, e, _slice(builder, qv, 0, 16))
                    _store_at(builder, xpb, builder.add(e, ir.Constant(I64, 64)),
                              _slice(builder, qv, 16, 16))
                    t = builder.sext(qv, _v(I32, 32))
                    while t.type.count > 1:
                        h = t.type.count // 2
                        t = builder.add(_slice(builder, t, 0, h), _slice(builder, t, h, h))
                    t = builder.mul(builder.extract_element(t, ir.Constant(I32, 0)),
                                    ir.Constant(I32, 8))
                    # corr[8p + 4 (b & 1)] = 8 sum, the other three of its four lanes 0
                    o = builder.shl(b, c[4])
                    _store_at(builder, cb, o, builder.insert_element(
                        _const_vec(I32, 4, 0), t, ir.Constant(I32, 0)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return quantize_blocks


quantize_blocks_pairs, quantize_blocks = _make_quantize(True), _make_quantize(False)


@njit(cache=True)
def act_buffers(d):
    """Scratch for the quantized activations of a row of length d: (xq, xs, xp, corr)."""
    nb = (d + 31) // 32
    nquads = (nb + 3) // 4  # padded to whole quads of blocks (pair_layout)
    return (np.empty(nquads * 128, dtype=np.int8), np.empty(nquads * 4, dtype=np.float32),
            np.empty(nquads * 128, dtype=np.int8), np.empty(nquads * 16, dtype=np.int32))


@njit(cache=True)
def quantize_act(x, xq, xs, xp, corr):
    """Both activation layouts: quantize_q8 (for int8 rows) and pair_layout (for int4 rows)."""
    b0 = 0
    if AVAILABLE:  # whole blocks in vector registers (quantize_blocks_pairs), the same bits
        b0 = x.shape[0] // 32
        quantize_blocks_pairs(x, b0, xq, xs, xp, corr)
    _quantize_q8_from(x, xq, xs, b0)
    pair_layout(xq, xp, corr, b0 >> 1)


@njit(cache=True)
def pair_layout(xq, xp, corr, p0=0):
    """Reorder the int8 activations for q4_dot, which multiplies two blocks per step (four with
    512-bit registers).

    An int4 pair of blocks is 32 bytes: low nibbles are elements 0-15 of each block, high
    nibbles elements 16-31. Pairs 2k and 2k+1 share 128 bytes of xp: xp[128k:128k+32] holds x
    elements 0-15 of block 4k then 0-15 of block 4k+1 (matching pair 2k's low nibbles),
    xp[128k+32:128k+64] the same for pair 2k+1, and 64 bytes further elements 16-31 of the same
    blocks (the high nibbles). So one 64-byte load gives the activations of the low (high)
    nibbles of 64 bytes of a row. q4_dot multiplies unsigned nibbles; corr[8p] and corr[8p+4]
    hold 8 * sum(x) of each block of pair p, subtracted to give sum((nibble - 8) x)."""
    npairs = xp.shape[0] // 64
    for p in range(p0, npairs):  # pairs from p0 (those before it: quantize_blocks_pairs)
        o = 64 * p
        e = 128 * (p >> 1) + 32 * (p & 1)
        for k in range(16):
            xp[e + k] = xq[o + k]
            xp[e + 16 + k] = xq[o + 32 + k]
            xp[e + 64 + k] = xq[o + 16 + k]
            xp[e + 80 + k] = xq[o + 48 + k]
        for k in range(8):
            corr[8 * p + k] = 0
        for half in range(2):
            t = 0
            for k in range(32):
                t += np.int32(xq[o + 32 * half + k])
            corr[8 * p + 4 * half] = 8 * t


@njit(cache=True)
def quantize_q8(x, xq, xs):
    """x f32[d] -> xq int8, xs f32 (see act_buffers; padding zeroed): per block of 32, scale
    max|x| / 127 and values round(x / scale), as llama.cpp's Q8_0 (scale kept in float32).
    Whole blocks in vector registers where the JIT runs (quantize_blocks: 2048 values took
    3.4 us one at a time)."""
    b0 = 0
    if AVAILABLE:
        b0 = x.shape[0] // 32
        quantize_blocks(x, b0, xq, xs, xq, xs)
    _quantize_q8_from(x, xq, xs, b0)


@njit(cache=True)
def _quantize_q8_from(x, xq, xs, b0):
    """quantize_q8 from block b0 on, one value at a time, and the padding."""
    d = x.shape[0]
    nb = (d + 31) // 32
    xq[nb * 32:] = 0
    xs[nb:] = 0
    for b in range(b0, nb):
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


@intrinsic
def prefetch(typingctx, a, off):
    """Hint the CPU to bring the cache line holding byte off of array a into cache."""
    sig = types.void(a, types.int64)

    def codegen(context, builder, sig, args):
        p = builder.gep(_base(context, builder, sig.args[0], args[0]), [args[1]])
        _call(builder, "llvm.prefetch.p0", [p, ir.Constant(I32, 0), ir.Constant(I32, 3),
                                             ir.Constant(I32, 1)], ir.VoidType())
        return context.get_dummy_value()

    return sig, codegen


def _make_load(nbty, irty, align):
    @intrinsic
    def load(typingctx, a, off):
        sig = nbty(a, types.int64)

        def codegen(context, builder, sig, args):
            return _at(builder, _base(context, builder, sig.args[0], args[0]), args[1], irty,
                       align=align)

        return sig, codegen

    return load


# scalar loads at a byte offset of any array: no array views (each costs reference counting)
ld_f32 = _make_load(types.float32, F32, 4)
ld_i8 = _make_load(types.int8, I8, 1)
ld_u16 = _make_load(types.uint16, I16, 2)


@intrinsic
def f32_dot(typingctx, q, qoff, nv, x):
    """sum over the first 32 * nv values of a float32 row (bytes at qoff) times x f32."""
    sig = types.float32(q, types.int64, types.int64, x)

    def codegen(context, builder, sig, args):
        qa, qoff, nv, xa = args
        qb = _base(context, builder, sig.args[0], qa)
        xb = _base(context, builder, sig.args[3], xa)
        acc = cgutils.alloca_once_value(builder, _const_vec(F32, 32, 0.0))
        with cgutils.for_range(builder, nv) as lp:
            off = builder.shl(lp.index, ir.Constant(I64, 7))
            w = _at(builder, qb, builder.add(qoff, off), _v(F32, 32), align=4)
            xv = _at(builder, xb, off, _v(F32, 32), align=4)
            builder.store(_fmuladd(builder, w, xv, builder.load(acc)), acc)
        v = builder.load(acc)
        s = builder.fadd(_slice(builder, v, 0, 16), _slice(builder, v, 16, 16))
        s = builder.fadd(_slice(builder, s, 0, 8), _slice(builder, s, 8, 8))
        return _hsum(builder, s)

    return sig, codegen


@intrinsic
def f32_axpy(typingctx, acc, q, qoff, nv, a):
    """acc[0:32 * nv] += a * (float32 row at qoff)."""
    sig = types.void(acc, q, types.int64, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        acca, qa, qoff, nv, a = args
        ab = _base(context, builder, sig.args[0], acca)
        qb = _base(context, builder, sig.args[1], qa)
        av = _splat(builder, a, 32)
        with cgutils.for_range(builder, nv) as lp:
            off = builder.shl(lp.index, ir.Constant(I64, 7))
            w = _at(builder, qb, builder.add(qoff, off), _v(F32, 32), align=4)
            old = _at(builder, ab, off, _v(F32, 32), align=4)
            _store_at(builder, ab, off, _fmuladd(builder, w, av, old), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# llama.cpp's Q8_0 and Q4_1 blocks (encodings q8_0, q4_1): per block of 32 a float16 scale, and
# for q4_1 a float16 minimum; scales of block b at soff + 2b (q8_0) or (step, min) at soff + 4b.


def _f16_scalar(builder, sbase, off, lut, native):
    """One float16 at byte off of sbase -> float (the CPU's conversion when native)."""
    if native and HAVE_F16:
        h = _at(builder, sbase, off, I16, align=2)
        return builder.fpext(builder.bitcast(h, F16), F32)
    return _lut_scale(builder, sbase, off, lut)


def _make_q80_dot(avx2):
    @intrinsic
    def q80_dot(typingctx, q, qoff, s, soff, nb, xq, xs, lut):
        """q8_0 row (nb blocks of int8 at byte qoff, float16 scales at soff) . int8 x."""
        sig = types.float32(q, types.int64, s, types.int64, types.int64, xq, xs, lut)

        def codegen(context, builder, sig, args):
            qa, qoff, sa, soff, nb, xqa, xsa, luta = args
            qb = _base(context, builder, sig.args[0], qa)
            sb = _base(context, builder, sig.args[2], sa)
            xqb = _base(context, builder, sig.args[5], xqa)
            xsb = _base(context, builder, sig.args[6], xsa)
            lb = _base(context, builder, sig.args[7], luta)

            def body(b, acc):
                w = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 5))),
                        _v(I8, 32))
                xv = _at(builder, xqb, builder.shl(b, ir.Constant(I64, 5)), _v(I8, 32))
                p = _block_dot(builder, w, xv, avx2)
                ws = _f16_scalar(builder, sb, builder.add(soff, builder.shl(b, ir.Constant(I64, 1))),
                                 lb, avx2)
                d = builder.fmul(ws, _at(builder, xsb, builder.shl(b, ir.Constant(I64, 2)), F32,
                                         align=4))
                return _fmuladd(builder, builder.sitofp(p, _v(F32, 8)), _splat(builder, d, 8),
                                acc)

            return _hsum(builder, _block_loop(builder, nb, body))

        return sig, codegen

    return q80_dot


def _make_q41_dot(avx2):
    @intrinsic
    def q41_dot(typingctx, q, qoff, s, soff, nb, xp, corr, xs, lut):
        """q4_1 row (nb blocks at byte qoff; float16 step and min of block b at soff + 4b)
        . activations in pair layout: sum over blocks of step * xs * sum(code * xq)
        + min * xs * sum(xq), the last from corr (8 * sum(xq) per block)."""
        sig = types.float32(q, types.int64, s, types.int64, types.int64, xp, corr, xs, lut)

        def codegen(context, builder, sig, args):
            qa, qoff, sa, soff, nb, xpa, corra, xsa, luta = args
            qb = _base(context, builder, sig.args[0], qa)
            sb = _base(context, builder, sig.args[2], sa)
            xpb = _base(context, builder, sig.args[5], xpa)
            cb = _base(context, builder, sig.args[6], corra)
            xsb = _base(context, builder, sig.args[7], xsa)
            c5 = ir.Constant(I64, 5)

            def pair(p, qv, b1, acc):
                lo = builder.and_(qv, _const_vec(I8, 32, 0x0F))
                hi = builder.lshr(qv, _const_vec(I8, 32, 4))
                x0 = _pair_x(builder, p)
                xlo = _at(builder, xpb, x0, _v(I8, 32))
                xhi = _at(builder, xpb, builder.add(x0, ir.Constant(I64, 64)), _v(I8, 32))
                dot = _pair_dot(builder, lo, hi, xlo, xhi, avx2)
                sums = _at(builder, cb, builder.shl(p, c5), _v(I32, 8), align=4)
                b0 = builder.shl(p, ir.Constant(I64, 1))
                h = ir.Constant(_v(I16, 4), ir.Undefined)
                for k, (b, extra) in enumerate(((b0, 0), (b0, 2), (b1, 0), (b1, 2))):
                    o = builder.add(soff, builder.add(builder.shl(b, ir.Constant(I64, 2)),
                                                      ir.Constant(I64, extra)))
                    h = builder.insert_element(h, _at(builder, sb, o, I16, align=2),
                                               ir.Constant(I32, k))
                sm = _half_to_float(builder, h, avx2)  # step0, min0, step1, min1
                x2 = _at(builder, xsb, builder.shl(p, ir.Constant(I64, 3)), _v(F32, 2), align=4)
                x4 = builder.shuffle_vector(x2, ir.Constant(x2.type, ir.Undefined),
                                            ir.Constant(_v(I32, 4), [0, 0, 1, 1]))
                f = builder.fmul(sm, x4)
                f = builder.fmul(f, ir.Constant(_v(F32, 4), [1.0, 0.125, 1.0, 0.125]))
                d8 = builder.shuffle_vector(f, ir.Constant(f.type, ir.Undefined),
                                            ir.Constant(_v(I32, 8), [0, 0, 0, 0, 2, 2, 2, 2]))
                m8 = builder.shuffle_vector(f, ir.Constant(f.type, ir.Undefined),
                                            ir.Constant(_v(I32, 8), [1, 1, 1, 1, 3, 3, 3, 3]))
                acc = _fmuladd(builder, builder.sitofp(dot, _v(F32, 8)), d8, acc)
                return _fmuladd(builder, builder.sitofp(sums, _v(F32, 8)), m8, acc)

            def body(p, acc):
                qv = _at(builder, qb, builder.add(qoff, builder.shl(p, c5)), _v(I8, 32))
                b1 = builder.add(builder.shl(p, ir.Constant(I64, 1)), ir.Constant(I64, 1))
                return pair(p, qv, b1, acc)

            npairs = builder.lshr(nb, ir.Constant(I64, 1))
            total = cgutils.alloca_once_value(builder, _block_loop(builder, npairs, body, 2))
            odd = builder.icmp_unsigned("!=", builder.and_(nb, ir.Constant(I64, 1)),
                                        ir.Constant(I64, 0))
            with builder.if_then(odd):  # last block alone: its 16 bytes and its own scales
                q16 = _at(builder, qb, builder.add(qoff, builder.shl(npairs, c5)), _v(I8, 16))
                qv = builder.shuffle_vector(q16, ir.Constant(q16.type, [0] * 16),
                                            ir.Constant(_v(I32, 32), list(range(32))))
                b0 = builder.shl(npairs, ir.Constant(I64, 1))
                builder.store(pair(npairs, qv, b0, builder.load(total)), total)
            return _hsum(builder, builder.load(total))

        return sig, codegen

    return q41_dot


q80_dot_fast, q80_dot_generic = _make_q80_dot(True), _make_q80_dot(False)
q41_dot_fast, q41_dot_generic = _make_q41_dot(True), _make_q41_dot(False)


@intrinsic
def q80_axpy(typingctx, acc, q, qoff, s, soff, nb, a, lut):
    """acc[0:32 * nb] += a * (q8_0 row at qoff, scales at soff): per block code * (a * scale),
    so with a = 1 the values are exactly the codec's (one rounding)."""
    sig = types.void(acc, q, types.int64, s, types.int64, types.int64, types.float32, lut)

    def codegen(context, builder, sig, args):
        acca, qa, qoff, sa, soff, nb, a, luta = args
        ab = _base(context, builder, sig.args[0], acca)
        qb = _base(context, builder, sig.args[1], qa)
        sb = _base(context, builder, sig.args[3], sa)
        lb = _base(context, builder, sig.args[7], luta)
        with cgutils.for_range(builder, nb) as lp:
            b = lp.index
            sc = _lut_scale(builder, sb, builder.add(soff, builder.shl(b, ir.Constant(I64, 1))),
                            lb)
            av = _splat(builder, builder.fmul(a, sc), 32)
            w = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 5))),
                    _v(I8, 32))
            w = builder.sitofp(w, _v(F32, 32))
            off = builder.shl(b, ir.Constant(I64, 7))
            old = _at(builder, ab, off, _v(F32, 32), align=4)
            _store_at(builder, ab, off, builder.fadd(old, builder.fmul(w, av)), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q41_axpy(typingctx, acc, q, qoff, s, soff, nb, a, lut):
    """acc[0:32 * nb] += a * (q4_1 row at qoff, (step, min) at soff): per block
    code * (a * step) + a * min, a product then a sum (no fused multiply-add), so with a = 1 the
    values are exactly the codec's and gguf.quants'."""
    sig = types.void(acc, q, types.int64, s, types.int64, types.int64, types.float32, lut)

    def codegen(context, builder, sig, args):
        acca, qa, qoff, sa, soff, nb, a, luta = args
        ab = _base(context, builder, sig.args[0], acca)
        qb = _base(context, builder, sig.args[1], qa)
        sb = _base(context, builder, sig.args[3], sa)
        lb = _base(context, builder, sig.args[7], luta)
        with cgutils.for_range(builder, nb) as lp:
            b = lp.index
            so = builder.add(soff, builder.shl(b, ir.Constant(I64, 2)))
            st = _lut_scale(builder, sb, so, lb)
            mn = _lut_scale(builder, sb, builder.add(so, ir.Constant(I64, 2)), lb)
            sv = _splat(builder, builder.fmul(a, st), 32)
            mv = _splat(builder, builder.fmul(a, mn), 32)
            q16 = _at(builder, qb, builder.add(qoff, builder.shl(b, ir.Constant(I64, 4))),
                      _v(I8, 16))
            lo = builder.and_(q16, _const_vec(I8, 16, 0x0F))
            hi = builder.lshr(q16, _const_vec(I8, 16, 4))
            u = builder.shuffle_vector(lo, hi, ir.Constant(_v(I32, 32), list(range(32))))
            w = builder.uitofp(u, _v(F32, 32))
            off = builder.shl(b, ir.Constant(I64, 7))
            old = _at(builder, ab, off, _v(F32, 32), align=4)
            _store_at(builder, ab, off, builder.fadd(old, builder.fadd(builder.fmul(w, sv), mv)),
                      align=4)
        return context.get_dummy_value()

    return sig, codegen
