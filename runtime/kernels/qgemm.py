"""Prefill products of quantized weights with int8-quantized activations: an integer GEMM.

Decode's kernels (qmatvec.py) multiply one row by one token. For prefill (T > 1 tokens) the same
arithmetic runs on tiles of RM weight rows by RN tokens: each load of WIDTH bytes of a weight row
is unpacked once and multiplied with the RN tokens' activations, so a row's bytes and its scales
are reused RN times while they sit in registers, and each token's activations RM times. The
activations are quantized by decode's own quantizer (simd.quantize_act: per block of 32, scale
max|x| / 127, both layouts), once per call.

Per encoding, with xs the activation block scales:
    int4   (nibble - 8) in groups of 32 << gshift, float16 scale per group: unsigned nibbles
           times signed x (simd.pair_layout), minus 8 * sum(x) per block (corr), times ws * xs
    int8   one float32 scale per row: w times x per 4-byte lane (with vpdpbusd x + 128 as
           unsigned bytes times signed w, minus 128 * sum(w), computed once per row load),
           times xs; the row scale at the end
    q8_0   as int8 with a float16 scale per block of 32 (times ws * xs per block)
    q4_1   unsigned codes times x times step * xs, plus min * xs * sum(x) per block
Integer sums per block are exact, and the same on every CPU; the float sums over blocks run in
the register's lanes, then a tree.

One tile (tile_ir), two widths, chosen at import from simd's flags as the decode kernels are:
    512-bit  AVX-512 VNNI (simd.HAVE_AVX512): vpdpbusd on zmm, 4 x 4
    256-bit  with VNNI (AVX-VNNI, or AVX-512 VL with EDGELLM_NO_AVX512=1) vpdpbusd on ymm; AVX2
             without it vpmaddubsw + vpmaddwd (simd._pair_dot / _block_dot); aarch64 with the
             dot product sdot on pairs of 128-bit registers (the same helpers): 2 x 4 (4 x 4
             where AVX-512 VL gives 32 ymm registers)
TILES says where they run; FASTER where use_gemm takes them (not AVX2 without VNNI: measured no
faster than the float tiles + BLAS). d % 64 == 0 (steps of 64 values: a 64-byte load holds 128
4-bit codes, with a last half load when d % 128 == 64, or 64 8-bit codes) and at least RM rows.
use_gemm() is the rule; anything else goes to the float tiles and BLAS (kernels/__init__.py).
tests/test_prefill_gemm.py checks each encoding and width against a NumPy statement of the same
arithmetic, and the 256-bit tiles' instructions for AVX2, AVX-VNNI and aarch64.
"""

import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import rows16, simd
from .simd import (F16, F32, I8, I16, I32, I64, _at, _base, _block_dot, _const_vec, _dpbusd,
                   _dpbusd512, _fmuladd, _hsum, _pair_dot, _pair_x, _store_at, _v, act_buffers,
                   quantize_act)

# the CPU's tiles: register width in bytes, weight rows x tokens per tile (RM * RN accumulators).
# 512-bit: 4 x 4 measured best of 4x4, 4x3, 3x4, 2x8, 6x2 (TinyLlama shapes, 128 tokens: int4
# 93-97 GMAC/s a core, int8 85). 256-bit (AVX2, AVX-VNNI, aarch64's sdot on pairs of 128-bit
# registers): 16 such registers (AVX2, AVX-VNNI; aarch64's 32 q registers) hold 2 x 4
# accumulators and a step's operands (AVX2: 4 x 2, 3 x 4, 2 x 3 within 10%, 3 x 3 spilled to
# 0.4x); AVX-512 VL's 32 (EVEX ymm0-31) 4 x 4 (15-20% faster than 2 x 4 there).
WIDTH, RM, RN = 64, 4, 4
if not simd.HAVE_AVX512:
    WIDTH, RM = 32, (4 if simd._X86 and "+avx512f" in simd._FEATS else 2)
# where the tiles compile and run (the F16C conversion of the scales: every AVX2 CPU has it)
TILES = simd.AVAILABLE and (simd.HAVE_AVX512 or (simd.HAVE_AVX2 and simd.HAVE_F16)
                            or simd.HAVE_DOTPROD)
# where use_gemm takes them: measured faster than the float tiles + BLAS with vpdpbusd (512 and
# 256 bits); on AVX2 without VNNI (vpmaddubsw + vpmaddwd) not (0.96-1.14x end to end: the
# integer sums cost as many instructions as BLAS's float multiply-adds); aarch64's sdot not
# measured (no board here), taken for its 16 multiply-adds an instruction against NEON fmla's 4
# (docs/PERFORMANCE.md, "256-bit tiles")
FASTER = TILES and (simd.HAVE_AVX512 or simd.HAVE_VNNI or simd.HAVE_DOTPROD)
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
    if not (ENABLED and FASTER) or T < MIN_TOKENS or n < RM:
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


def _halfs(builder, sb, off, k, n=None):
    """k float16 at byte off -> <n x float> (default k), zeros past k (the CPU's conversion:
    F16C on x86, which TILES requires, fcvtl on aarch64)."""
    n = n or k
    h = _at(builder, sb, off, _v(I16, k), align=2)
    if k < n:
        h = builder.shuffle_vector(h, _const_vec(I16, k, 0),
                                   ir.Constant(_v(I32, n), list(range(n))))
    return builder.fpext(builder.bitcast(h, _v(F16, n)), _v(F32, n))


def _group_scales(builder, sb, soff, b0, gshift, n, nblocks):
    """float16 scales of int4 blocks b0..b0+n-1 (group of block b at soff + 2 (b >> gshift))
    -> <n x float>; those past the first nblocks 0."""
    h = _const_vec(I16, n, 0)
    for j in range(nblocks):
        b = builder.add(b0, _c(j))
        o = builder.add(soff, builder.shl(builder.lshr(b, gshift), _c(1)))
        h = builder.insert_element(h, _at(builder, sb, o, I16, align=2), ir.Constant(I32, j))
    return builder.fpext(builder.bitcast(h, _v(F16, n)), _v(F32, n))


def _dot_u8s8(builder, acc, u, s):
    """acc + sums of four u8 (u) x s8 (s) products per 32-bit lane: vpdpbusd, 512 or 256 bits."""
    if u.type.count == 64:
        return _dpbusd512(builder, acc, u, s)
    return _dpbusd(builder, acc, u, s)


def _nibble_dot(builder, acc, lo, hi, xlo, xhi):
    """acc + lanes of lo * xlo + hi * xhi (unsigned nibbles times signed activations), lane k
    bytes 4k..4k+3: vpdpbusd (512-bit, or 256-bit with VNNI), else simd._pair_dot (vpmaddubsw +
    vpmaddwd on AVX2, sdot with the dot-product extension; the same integer lanes)."""
    if lo.type.count == 64 or simd.HAVE_VNNI:
        return _dot_u8s8(builder, _dot_u8s8(builder, acc, lo, xlo), hi, xhi)
    return builder.add(acc, _pair_dot(builder, lo, hi, xlo, xhi, True))


def tile_ir(builder, enc, width, rm, rn, qb, qoff, qrow, sb, soff, srow, gshift, nsteps, xb,
            xrows, ob, ooff, ostr_t, ostr_r):
    """The body of a tile as LLVM IR: rm weight rows (values at byte qoff + i qrow of i8* qb,
    scales at soff + i srow of sb) times rn tokens of the quantized activations (xb: i8* bases
    of xq, xp, corr, xs; xrows: each array's byte offsets of the rn tokens' rows) over nsteps
    steps of 64 values, in registers of `width` bytes (64: zmm; 32: ymm, or two NEON q
    registers); the result of row i, token j as float32 at byte ooff + j ostr_t + i ostr_r of
    ob. A load takes `width` bytes of a row: 2 width 4-bit codes (a 64-byte load covers two steps,
    with an odd last step a 32-byte load), or `width` 8-bit codes."""
    W, NL = width, width // 4  # bytes a load, 32-bit lanes a register
    nbl = W // 16  # blocks of 32 a load of 4-bit codes (8-bit codes: half as many)
    zero = _const_vec(F32, NL, 0.0)
    izero = _const_vec(I32, NL, 0)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(rn)] for _ in range(rm)]
    rows = [builder.add(qoff, builder.mul(qrow, _c(i))) for i in range(rm)]
    srows = [builder.add(soff, builder.mul(srow, _c(i))) for i in range(rm)]
    names = ("xq", "xp", "corr", "xs")

    def xload(name, j, off, ty, align=1):
        k = names.index(name)
        return _at(builder, xb[k], builder.add(xrows[k][j], off), ty, align=align)

    def load4(i, k, half):
        """W bytes of 4-bit codes at load k of row i; half: the first 32 only (the rest zero, as
        are the padded activations they would meet)."""
        o = builder.add(rows[i], builder.mul(k, _c(W)))
        if not half:
            return _at(builder, qb, o, _v(I8, W))
        q32 = _at(builder, qb, o, _v(I8, 32))
        return builder.shuffle_vector(q32, _const_vec(I8, 32, 0),
                                      ir.Constant(_v(I32, W), list(range(W))))

    def nibbles(qv):
        return (builder.and_(qv, _const_vec(I8, W, 0x0F)),
                builder.lshr(qv, _const_vec(I8, W, 4)))

    def x4(j, k):
        """Activations of a load's low and high nibbles (pair layout), the blocks' scales."""
        x0 = _pair_x(builder, builder.mul(k, _c(W // 32)))
        xlo = xload("xp", j, x0, _v(I8, W))
        xhi = xload("xp", j, builder.add(x0, _c(64)), _v(I8, W))
        xs = _spread(builder, xload("xs", j, builder.mul(k, _c(4 * nbl)), _v(F32, nbl),
                                    align=4), NL)
        return xlo, xhi, xs

    def corr(j, k):
        return xload("corr", j, builder.mul(k, _c(W)), _v(I32, NL), align=4)

    def step_int4(k, own, half=False):
        nb = nbl // 2 if half else nbl
        w = []
        for i in range(rm):
            lo, hi = nibbles(load4(i, k, half))
            if own:  # a scale per block: float16 in a row
                ws = _halfs(builder, sb, builder.add(srows[i], builder.mul(k, _c(2 * nbl))),
                            nb, nbl)
            else:
                ws = _group_scales(builder, sb, srows[i], builder.mul(k, _c(nbl)), gshift, nbl,
                                   nb)
            w.append((lo, hi, _spread(builder, ws, NL)))
        for j in range(rn):
            xlo, xhi, xs = x4(j, k)
            nc = builder.sub(izero, corr(j, k))  # 8 sum(x) per block: the nibbles' offset
            for i, (lo, hi, ws) in enumerate(w):
                dot = _nibble_dot(builder, nc, lo, hi, xlo, xhi)
                acc = accs[i][j]
                builder.store(_fmuladd(builder, builder.sitofp(dot, _v(F32, NL)),
                                       builder.fmul(ws, xs), builder.load(acc)), acc)

    def step_q41(k, half=False):
        nb = nbl // 2 if half else nbl
        w = []
        for i in range(rm):
            lo, hi = nibbles(load4(i, k, half))
            sm = _halfs(builder, sb, builder.add(srows[i], builder.mul(k, _c(4 * nbl))), 2 * nb,
                        2 * nbl)  # (step, min) per block
            undef = ir.Constant(sm.type, ir.Undefined)
            st, mn = (builder.shuffle_vector(sm, undef, ir.Constant(
                _v(I32, NL), [2 * (j // 4) + m for j in range(NL)])) for m in (0, 1))
            w.append((lo, hi, st, mn))
        for j in range(rn):
            xlo, xhi, xs = x4(j, k)
            # corr holds 8 sum(x) per block: the min term is min * xs * corr / 8
            cs = builder.fmul(builder.sitofp(corr(j, k), _v(F32, NL)),
                              builder.fmul(xs, _const_vec(F32, NL, 0.125)))
            for i, (lo, hi, st, mn) in enumerate(w):
                dot = _nibble_dot(builder, izero, lo, hi, xlo, xhi)
                acc = accs[i][j]
                a = _fmuladd(builder, builder.sitofp(dot, _v(F32, NL)), builder.fmul(st, xs),
                             builder.load(acc))
                builder.store(_fmuladd(builder, cs, mn, a), acc)

    def step_int8(k, scaled):
        nb = W // 32  # blocks a load
        # with vpdpbusd, x + 128 as unsigned bytes times signed w, minus 128 sum(w) per lane
        # (once per row load); else the signed block product (vpmaddubsw of |w| and x signed
        # as w, or sdot): the same integer lanes
        offset = W == 64 or simd.HAVE_VNNI
        w = []
        for i in range(rm):
            wv = _at(builder, qb, builder.add(rows[i], builder.mul(k, _c(W))), _v(I8, W))
            nw = None
            if offset:
                nw = builder.sub(izero, _dot_u8s8(builder, izero, _const_vec(I8, W, -128), wv))
            ws = None
            if scaled:  # q8_0: float16 scales of the load's blocks
                ws = _spread(builder, _halfs(builder, sb, builder.add(
                    srows[i], builder.mul(k, _c(2 * nb))), nb), NL)
            w.append((wv, nw, ws))
        for j in range(rn):
            xv = xload("xq", j, builder.mul(k, _c(W)), _v(I8, W))
            xu = builder.xor(xv, _const_vec(I8, W, -128)) if offset else None
            xs = _spread(builder, xload("xs", j, builder.mul(k, _c(4 * nb)), _v(F32, nb),
                                        align=4), NL)
            for i, (wv, nw, ws) in enumerate(w):
                dot = (_dot_u8s8(builder, nw, xu, wv) if offset
                       else _block_dot(builder, wv, xv, True))
                d = builder.fmul(ws, xs) if scaled else xs
                acc = accs[i][j]
                builder.store(_fmuladd(builder, builder.sitofp(dot, _v(F32, NL)), d,
                                       builder.load(acc)), acc)

    def loop(body, four_bit=True):
        if not four_bit:  # 64 // W loads a step
            with cgutils.for_range(builder, builder.mul(nsteps, _c(64 // W))) as lp:
                body(lp.index)
            return
        if W == 32:  # a load a step
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
    for i in range(rm):
        rs = None
        if enc == INT8:  # the row's float32 scale
            rs = _at(builder, sb, srows[i], F32, align=4)
        for j in range(rn):
            v = _hsum(builder, builder.load(accs[i][j]))
            if rs is not None:
                v = builder.fmul(v, rs)
            o = builder.add(ooff, builder.add(builder.mul(ostr_t, _c(j)),
                                              builder.mul(ostr_r, _c(i))))
            _store_at(builder, ob, o, v, align=4)


def _make_tile(enc):
    @intrinsic
    def tile(typingctx, q, qoff, qrow, s, soff, srow, gshift, nsteps, xq, xp, corr, xs, t0,
             out, ooff, ostr_t, ostr_r):
        """tile_ir's RM rows x RN tokens t0.. of the quantized activations (2-D xq, xp, corr,
        xs, one token a row) in registers of WIDTH bytes."""
        sig = types.void(q, types.int64, types.int64, s, types.int64, types.int64, types.int64,
                         types.int64, xq, xp, corr, xs, types.int64, out, types.int64,
                         types.int64, types.int64)

        def codegen(context, builder, sig, args):
            (qa, qoff, qrow, sa, soff, srow, gshift, nsteps, xqa, xpa, ca, xsa, t0, oa, ooff,
             ostr_t, ostr_r) = args
            xb, xrows = [], []
            for k in (8, 9, 10, 11):
                ary = context.make_array(sig.args[k])(context, builder, args[k])
                stride = cgutils.unpack_tuple(builder, ary.strides)[0]
                xb.append(builder.bitcast(ary.data, I8.as_pointer()))
                # byte offset of token t0 + j's row
                xrows.append([builder.mul(builder.add(t0, _c(j)), stride) for j in range(RN)])
            tile_ir(builder, enc, WIDTH, RM, RN, _base(context, builder, sig.args[0], qa), qoff,
                    qrow, _base(context, builder, sig.args[3], sa), soff, srow, gshift, nsteps,
                    xb, xrows, _base(context, builder, sig.args[13], oa), ooff, ostr_t, ostr_r)
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


@njit(cache=True, parallel=True)
def gemm_packed(pv, poff, vunit, vgroup, ps, soff, sunit, sgroup, gshift, n, d, xq, xs, xp, corr,
                out, ostr_t, ostr_r, nchunks):
    """gemm of int4 rows packed 16 a group (rows16.py: group g's values at byte g vgroup + poff
    of pv, its scales at g sgroup + soff of ps, dot16's units): each group is unpacked to the
    stored layout in a scratch of 16 rows (L1-sized, one per chunk of groups), then multiplied
    by gemm's tiles."""
    Tp = xs.shape[0]
    nb, nsteps = d // 32, d // 64
    h, ng = d // 2, (d // 32) >> gshift
    G = n // rows16.R
    per = (G + nchunks - 1) // nchunks
    for c in prange(nchunks):
        q = np.empty((rows16.R, h), np.uint8)
        s = np.empty((rows16.R, ng), np.uint16)
        for g in range(c * per, min(G, (c + 1) * per)):
            rows16.unpack_group(pv, g * vgroup + poff, vunit, ps, g * sgroup + soff, sunit,
                                gshift, nb, q, s, True)
            for r in range(0, rows16.R, RM):
                oo = (rows16.R * g + r) * ostr_r
                for t0 in range(0, Tp, RN):
                    tile_int4(q, r * h, h, s, r * 2 * ng, 2 * ng, gshift, nsteps, xq, xp, corr,
                              xs, t0, out, oo + t0 * ostr_t, ostr_t, ostr_r)
    return out


def matmul_packed(src, act, part=None):
    """matmul for int4 rows packed 16 a group: a reader.PackedMatrix, or part `part` (its index
    in src.where: 0 gate, 1 up; 0 the up alone without a gate) of a reader.PackedBundles ->
    f32[Tp, n]. use_gemm must have said yes."""
    if part is None:
        pv, ps = src.packed
        n, d = src.shape
        gshift = _gshift(src.codec.group_size)
        addr = (pv, 0, 256 << gshift, pv.strides[0], ps, 0, 2 * rows16.R, ps.strides[0])
    else:
        b, (vo, so) = src.groups, src.where[part]
        n, d = b.shape[0] * rows16.R, src.d
        gshift = _gshift(src.group_size)
        addr = (b, vo, src.unit, b.strides[0], b, so, src.unit, b.strides[0])
    out = np.empty((act.Tp, n), dtype=np.float32)
    gemm_packed(*addr, gshift, n, d, act.xq, act.xs, act.xp, act.corr, out, out.strides[0],
                out.strides[1], numba.get_num_threads())
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
