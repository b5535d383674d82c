"""Prefill products of quantized weights with int8-quantized activations: an integer GEMM.

Decode's kernels (qmatvec.py) multiply one row by one token. For prefill (T > 1 tokens) the same
arithmetic runs on tiles of RM weight rows by RN tokens: each 64-byte step of a weight row is
loaded and unpacked once and multiplied with the RN tokens' activations (vpdpbusd on 512-bit
registers), so a row's bytes and its scales are reused RN times while they sit in registers,
and each token's activations RM times. The activations are quantized by decode's own quantizer
(simd.quantize_act: per block of 32, scale max|x| / 127, both layouts), once per call.

Per encoding, with xs the activation block scales:
    int4   (nibble - 8) in groups of 32 << gshift, float16 scale per group: unsigned nibbles
           times signed x (simd.pair_layout), minus 8 * sum(x) per block (corr), times ws * xs
    int8   one float32 scale per row: x + 128 as unsigned bytes times signed w, minus
           128 * sum(w) per 4-byte lane (computed once per row step), times xs; the row scale
           at the end
    q8_0   as int8 with a float16 scale per block of 32 (times ws * xs per block)
    q4_1   unsigned codes times x times step * xs, plus min * xs * sum(x) per block
Integer sums per block are exact; the float sums over blocks run in 16 lanes, then a tree.

The tiles need AVX-512 VNNI (simd.HAVE_AVX512); d % 64 == 0 (steps of 64 bytes: 128 values of
4-bit codes, with a last half step when d % 128 == 64, or 64 of 8-bit codes) and at least RM rows. use_gemm() is the rule; anything else
goes to the float tiles and BLAS (kernels/__init__.py). tests/test_prefill_gemm.py checks each
encoding against a NumPy statement of the same arithmetic.
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import (F16, F32, I8, I16, I32, I64, _at, _base, _const_vec, _dpbusd512, _fmuladd,
                   _hsum, _store_at, _v, act_buffers, quantize_act)

# weight rows x tokens per tile (RM * RN 512-bit accumulators); 4 x 4 measured best of 4x4, 4x3,
# 3x4, 2x8, 6x2 (TinyLlama shapes, 128 tokens: int4 93-97 GMAC/s a core, int8 85)
RM, RN = 4, 4
INT8, INT4, Q8_0, Q4_1 = 2, 3, 4, 5  # ffn.ENC_CODES / qmatvec's codes
CODES = {"int8": INT8, "int4": INT4, "q8_0": Q8_0, "q4_1": Q4_1}
# 4-bit rows step 128 values (64 bytes) at a time, with a last half step of 64 when d % 128 = 64
# (SmolLM2's 576); 8-bit rows 64
MIN_TOKENS = 2  # decode (T == 1) keeps its matrix-vector kernels
# EDGELLM_NO_GEMM=1: prefill through the float tiles and BLAS everywhere (float32 activations:
# the reference the tests compare against, and a way back should the GEMM misbehave)
ENABLED = os.environ.get("EDGELLM_NO_GEMM", "") != "1"


def use_gemm(name, group_size, n, d, T):
    """True when a product of T tokens with an n x d matrix of encoding name runs here; the one
    place that decides between this and the float tiles + BLAS (measured in docs/PERFORMANCE.md,
    "Prefill"). float16/float32 weights stay with BLAS (nothing to gain from int8 there)."""
    if not (ENABLED and simd.HAVE_AVX512 and simd.AVAILABLE) or T < MIN_TOKENS or n < RM:
        return False
    code = CODES.get(name)
    if code is None:
        return False
    if code == INT4:
        g = group_size or 0
        if g % 32 or (g // 32) & (g // 32 - 1):
            return False
    return d % 64 == 0


# ---------------------------------------------------------------------------------------------
# the tile intrinsics


def _c(k):
    return ir.Constant(I64, k)


def _spread(builder, v, n):
    """<k x float> -> <n x float>, each lane repeated n / k times (a block's scale to its lanes)."""
    k = v.type.count
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                  ir.Constant(_v(I32, n), [j // (n // k) for j in range(n)]))


def _halfs(builder, sb, off, k):
    """k float16 at byte off -> <k x float> (the CPU's conversion: AVX-512 implies F16C)."""
    h = _at(builder, sb, off, _v(I16, k), align=2)
    return builder.fpext(builder.bitcast(h, _v(F16, k)), _v(F32, k))


def _group_scales(builder, sb, soff, k, gshift, nblocks=4):
    """float16 scales of int4 blocks 4k..4k+3 (group of block b at soff + 2 (b >> gshift));
    those past the first nblocks 0."""
    h = _const_vec(I16, 4, 0)
    for j in range(nblocks):
        b = builder.add(builder.shl(k, _c(2)), _c(j))
        o = builder.add(soff, builder.shl(builder.lshr(b, gshift), _c(1)))
        h = builder.insert_element(h, _at(builder, sb, o, I16, align=2), ir.Constant(I32, j))
    return builder.fpext(builder.bitcast(h, _v(F16, 4)), _v(F32, 4))


def _make_tile(enc):
    @intrinsic
    def tile(typingctx, q, qoff, qrow, s, soff, srow, gshift, nsteps, xq, xp, corr, xs, t0,
             out, ooff, ostr_t, ostr_r):
        """RM rows (values at byte qoff + i qrow of q, scales at soff + i srow of s) times the
        RN tokens t0.. of the quantized activations (2-D xq, xp, corr, xs, one token a row)
        over nsteps steps of 64 values (8-bit codes: one 64-byte load each; 4-bit codes: two
        steps a 64-byte load, and an odd last one a 32-byte load); the result of row i, token t0 + j as float32 at byte
        ooff + j ostr_t + i ostr_r of out."""
        sig = types.void(q, types.int64, types.int64, s, types.int64, types.int64, types.int64,
                         types.int64, xq, xp, corr, xs, types.int64, out, types.int64,
                         types.int64, types.int64)

        def codegen(context, builder, sig, args):
            (qa, qoff, qrow, sa, soff, srow, gshift, nsteps, xqa, xpa, ca, xsa, t0, oa, ooff,
             ostr_t, ostr_r) = args
            qb = _base(context, builder, sig.args[0], qa)
            sb = _base(context, builder, sig.args[3], sa)
            arrays = {}
            for name, k in (("xq", 8), ("xp", 9), ("corr", 10), ("xs", 11)):
                ary = context.make_array(sig.args[k])(context, builder, args[k])
                stride = cgutils.unpack_tuple(builder, ary.strides)[0]
                base = builder.bitcast(ary.data, I8.as_pointer())
                # byte offset of token t0 + j's row
                arrays[name] = (base, [builder.mul(builder.add(t0, _c(j)), stride)
                                       for j in range(RN)])
            ob = _base(context, builder, sig.args[13], oa)
            zero = _const_vec(F32, 16, 0.0)
            izero = _const_vec(I32, 16, 0)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(RN)]
                    for _ in range(RM)]
            rows = [builder.add(qoff, builder.mul(qrow, _c(i))) for i in range(RM)]
            srows = [builder.add(soff, builder.mul(srow, _c(i))) for i in range(RM)]

            def xload(name, j, off, ty, align=1):
                base, rowoff = arrays[name]
                return _at(builder, base, builder.add(rowoff[j], off), ty, align=align)

            def load4(i, k, half):
                """64 bytes of 4-bit codes at step k of row i; half: the first 32 only (the
                rest zero, as are the padded activations they would meet)."""
                o = builder.add(rows[i], builder.shl(k, _c(6)))
                if not half:
                    return _at(builder, qb, o, _v(I8, 64))
                q32 = _at(builder, qb, o, _v(I8, 32))
                return builder.shuffle_vector(q32, _const_vec(I8, 32, 0),
                                              ir.Constant(_v(I32, 64), list(range(64))))

            def halfs_padded(off, k, n):
                """k float16 at byte off, widened with zeros to n lanes."""
                h = _at(builder, sb, off, _v(I16, k), align=2)
                if k < n:
                    h = builder.shuffle_vector(h, _const_vec(I16, k, 0),
                                               ir.Constant(_v(I32, n), list(range(n))))
                return builder.fpext(builder.bitcast(h, _v(F16, n)), _v(F32, n))

            def step_int4(k, own, half=False):
                w = []
                for i in range(RM):
                    qv = load4(i, k, half)
                    lo = builder.and_(qv, _const_vec(I8, 64, 0x0F))
                    hi = builder.lshr(qv, _const_vec(I8, 64, 4))
                    if own:  # a scale per block: four float16 in a row
                        ws = halfs_padded(builder.add(srows[i], builder.shl(k, _c(3))),
                                          2 if half else 4, 4)
                    else:
                        ws = _group_scales(builder, sb, srows[i], k, gshift, 2 if half else 4)
                    w.append((lo, hi, _spread(builder, ws, 16)))
                for j in range(RN):
                    x0 = builder.shl(k, _c(7))
                    xlo = xload("xp", j, x0, _v(I8, 64))
                    xhi = xload("xp", j, builder.add(x0, _c(64)), _v(I8, 64))
                    nc = builder.sub(izero, xload("corr", j, builder.shl(k, _c(6)), _v(I32, 16),
                                                  align=4))
                    x16 = _spread(builder, xload("xs", j, builder.shl(k, _c(4)), _v(F32, 4),
                                                 align=4), 16)
                    for i, (lo, hi, ws) in enumerate(w):
                        dot = _dpbusd512(builder, _dpbusd512(builder, nc, lo, xlo), hi, xhi)
                        acc = accs[i][j]
                        builder.store(_fmuladd(builder, builder.sitofp(dot, _v(F32, 16)),
                                               builder.fmul(ws, x16), builder.load(acc)), acc)

            def step_q41(k, half=False):
                w = []
                for i in range(RM):
                    qv = load4(i, k, half)
                    lo = builder.and_(qv, _const_vec(I8, 64, 0x0F))
                    hi = builder.lshr(qv, _const_vec(I8, 64, 4))
                    sm = halfs_padded(builder.add(srows[i], builder.shl(k, _c(4))),
                                      4 if half else 8, 8)
                    undef = ir.Constant(sm.type, ir.Undefined)
                    st = builder.shuffle_vector(sm, undef, ir.Constant(_v(I32, 16),
                                                                       [2 * (j // 4) for j in range(16)]))
                    mn = builder.shuffle_vector(sm, undef, ir.Constant(_v(I32, 16),
                                                                       [2 * (j // 4) + 1 for j in range(16)]))
                    w.append((lo, hi, st, mn))
                for j in range(RN):
                    x0 = builder.shl(k, _c(7))
                    xlo = xload("xp", j, x0, _v(I8, 64))
                    xhi = xload("xp", j, builder.add(x0, _c(64)), _v(I8, 64))
                    x16 = _spread(builder, xload("xs", j, builder.shl(k, _c(4)), _v(F32, 4),
                                                 align=4), 16)
                    # corr holds 8 sum(x) per block: the min term is min * xs * corr / 8
                    cs = builder.fmul(builder.sitofp(xload("corr", j, builder.shl(k, _c(6)),
                                                           _v(I32, 16), align=4), _v(F32, 16)),
                                      builder.fmul(x16, _const_vec(F32, 16, 0.125)))
                    for i, (lo, hi, st, mn) in enumerate(w):
                        dot = _dpbusd512(builder, _dpbusd512(builder, izero, lo, xlo), hi, xhi)
                        acc = accs[i][j]
                        a = _fmuladd(builder, builder.sitofp(dot, _v(F32, 16)),
                                     builder.fmul(st, x16), builder.load(acc))
                        builder.store(_fmuladd(builder, cs, mn, a), acc)

            def step_int8(k, scaled):
                w = []
                for i in range(RM):
                    wv = _at(builder, qb, builder.add(rows[i], builder.shl(k, _c(6))), _v(I8, 64))
                    # 128 sum(w) per lane, subtracted from the products with x + 128
                    nw = builder.sub(izero, _dpbusd512(builder, izero,
                                                       _const_vec(I8, 64, -128), wv))
                    ws = None
                    if scaled:  # q8_0: float16 scales of blocks 2k, 2k + 1
                        ws = _spread(builder, _halfs(builder, sb, builder.add(
                            srows[i], builder.shl(k, _c(2))), 2), 16)
                    w.append((wv, nw, ws))
                for j in range(RN):
                    xu = builder.xor(xload("xq", j, builder.shl(k, _c(6)), _v(I8, 64)),
                                     _const_vec(I8, 64, -128))
                    x16 = _spread(builder, xload("xs", j, builder.shl(k, _c(3)), _v(F32, 2),
                                                 align=4), 16)
                    for i, (wv, nw, ws) in enumerate(w):
                        dot = _dpbusd512(builder, nw, xu, wv)
                        d16 = builder.fmul(ws, x16) if scaled else x16
                        acc = accs[i][j]
                        builder.store(_fmuladd(builder, builder.sitofp(dot, _v(F32, 16)), d16,
                                               builder.load(acc)), acc)

            def loop(body, four_bit=True):
                if not four_bit:
                    with cgutils.for_range(builder, nsteps) as lp:
                        body(lp.index)
                    return
                with cgutils.for_range(builder, builder.lshr(nsteps, _c(1))) as lp:
                    body(lp.index)
                odd = builder.icmp_unsigned("!=", builder.and_(nsteps, _c(1)), _c(0))
                with builder.if_then(odd):
                    body(builder.lshr(nsteps, _c(1)), True)

            if enc == INT4:
                own = builder.icmp_unsigned("==", gshift, _c(0))
                with builder.if_else(own) as (then, other):
                    with then:
                        loop(lambda k, half=False: step_int4(k, True, half))
                    with other:
                        loop(lambda k, half=False: step_int4(k, False, half))
            elif enc == Q4_1:
                loop(step_q41)
            else:
                loop(lambda k: step_int8(k, enc == Q8_0), False)
            for i in range(RM):
                rs = None
                if enc == INT8:  # the row's float32 scale
                    rs = _at(builder, sb, srows[i], F32, align=4)
                for j in range(RN):
                    v = _hsum(builder, builder.load(accs[i][j]))
                    if rs is not None:
                        v = builder.fmul(v, rs)
                    o = builder.add(ooff, builder.add(builder.mul(ostr_t, _c(j)),
                                                      builder.mul(ostr_r, _c(i))))
                    _store_at(builder, ob, o, v, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


tile_int8, tile_int4 = _make_tile(INT8), _make_tile(INT4)
tile_q8_0, tile_q4_1 = _make_tile(Q8_0), _make_tile(Q4_1)


# ---------------------------------------------------------------------------------------------
# drivers


class Activations:
    """x f32[T, d] quantized once (simd.quantize_act per token), padded with zero tokens to a
    multiple of RN: xq, xs (blocks of 32), xp, corr (pair layout). Reused by every matrix that
    multiplies the same x (q, k, v; gate and up)."""

    def __init__(self, x):
        T, d = x.shape
        self.T, self.d = T, d
        self.Tp = -(-T // RN) * RN
        self.xq, self.xs, self.xp, self.corr = quantize_rows(x, self.Tp)


@njit(cache=True, parallel=True)
def quantize_rows(x, Tp):
    T, d = x.shape
    q0, s0, p0, c0 = act_buffers(d)
    xq = np.zeros((Tp, q0.shape[0]), dtype=np.int8)
    xs = np.zeros((Tp, s0.shape[0]), dtype=np.float32)
    xp = np.zeros((Tp, p0.shape[0]), dtype=np.int8)
    corr = np.zeros((Tp, c0.shape[0]), dtype=np.int32)
    for t in prange(T):
        quantize_act(x[t], xq[t], xs[t], xp[t], corr[t])
    return xq, xs, xp, corr


@njit(cache=True, parallel=True)
def gemm(enc, q, qoff, qrow, s, soff, srow, gshift, n, d, xq, xs, xp, corr, out, ostr_t,
         ostr_r):
    """Rows 0..n of a matrix (row r's values at byte qoff + r qrow of q, its scales at
    soff + r srow of s) times every token of the activations -> out (row r, token t at byte
    r ostr_r + t ostr_t). n >= RM: the last tile overlaps the one before (same values)."""
    Tp = xs.shape[0]
    nsteps = d // 64
    for ti in prange((n + RM - 1) // RM):
        r = min(ti * RM, n - RM)
        qo, so, oo = qoff + r * qrow, soff + r * srow, r * ostr_r
        for t0 in range(0, Tp, RN):
            o = oo + t0 * ostr_t
            if enc == INT4:
                tile_int4(q, qo, qrow, s, so, srow, gshift, nsteps, xq, xp, corr, xs, t0, out,
                          o, ostr_t, ostr_r)
            elif enc == INT8:
                tile_int8(q, qo, qrow, s, so, srow, gshift, nsteps, xq, xp, corr, xs, t0, out,
                          o, ostr_t, ostr_r)
            elif enc == Q8_0:
                tile_q8_0(q, qo, qrow, s, so, srow, gshift, nsteps, xq, xp, corr, xs, t0, out,
                          o, ostr_t, ostr_r)
            else:
                tile_q4_1(q, qo, qrow, s, so, srow, gshift, nsteps, xq, xp, corr, xs, t0, out,
                          o, ostr_t, ostr_r)
    return out


def _gshift(group_size):
    return int(group_size // 32).bit_length() - 1


def matmul(m, act, out=None):
    """Matrix m [n, d] (reader.Matrix; use_gemm said yes) times the quantized activations ->
    f32[Tp, n] (tokens past act.T are padding: slice them off)."""
    n, d = m.shape
    name = m.codec.name
    if out is None:
        out = np.empty((act.Tp, n), dtype=np.float32)
    s = m.s.view(np.uint16) if m.s.dtype == np.float16 else m.s
    gshift = _gshift(m.codec.group_size) if name == "int4" else 0
    gemm(CODES[name], m.q, 0, m.q.strides[0], s, 0, s.strides[0], gshift, n, d, act.xq, act.xs,
         act.xp, act.corr, out, out.strides[0], out.strides[1])
    return out


def matmul_part(bundles, enc, off, soff, gshift, n, d, act, tokens_first=False):
    """One part of FFN bundle rows uint8[n, stride] (values at byte off of each row, scales at
    soff) times the activations -> f32[n, Tp] (by neuron, as the FFN's float tiles' products),
    or f32[Tp, n] with tokens_first."""
    stride = bundles.shape[1]
    if tokens_first:
        out = np.empty((act.Tp, n), dtype=np.float32)
        ostr_t, ostr_r = out.strides
    else:
        out = np.empty((n, act.Tp), dtype=np.float32)
        ostr_r, ostr_t = out.strides
    gemm(enc, bundles, off, stride, bundles, soff, stride, gshift, n, d, act.xq, act.xs,
         act.xp, act.corr, out, ostr_t, ostr_r)
    return out
