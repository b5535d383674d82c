"""Decode (one token) of a whole layer in one Numba call: few calls per layer.

A 30-layer model such as SmolLM2-135M paid ~10 Python wrapper calls per layer (norms, q/k/v,
rope, the KV-cache store, attention, o, FFN), each with its checks and small allocations: 2.7 to
6 ms of a 20-45 ms token (docs/PERFORMANCE.md). decode_layer runs

    rmsnorm -> q, k, v (one matvec3) -> biases -> rope -> KV-cache store -> attention
    -> o (+ bias) -> residual -> rmsnorm -> FFN (ffn_decode_simd, down inside) (+ bias) -> residual

inside one compiled function, calling the very kernels the general path calls (rmsnorm,
matvec3, apply_rope, store_int8, attention, ffn_decode_simd; the o projection through
qmatvec.row_dot, which the per-encoding matvecs are made of), in the same order, on buffers
allocated once. So the result is bit for bit the general path's (tests/test_fused.py), and the
Python left per layer is one call with its arguments prepared once per model.

The layer's own parallel loops (q/k/v, attention, o, FFN rows, FFN down) are separate
fork/joins of Numba's threads, five per layer: on more than one thread, layers that
kernels/team.py takes run as one parallel region instead (layer_args picks the kernel).

Layers the fused call does not take (layer norm, learned positions, a part the SIMD kernels do
not take, f32 weights, a streamed or predicted FFN, d or q_dim not a multiple of 32) run the
general path; `plan_layer` says which.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd as _simd
from . import sparse as _sp
from .attention import attention, store_int8
from .ffn import (ACT_CODES, ENC_CODES, INT4R, NONE, act, ffn_decode_simd, ffn_output,
                  simd_part_axpy, simd_part_dot)
from .halfs import F16_TO_F32 as _LUT
from .norms import rmsnorm
from .qmatvec import f16_row, matvec3, row_dot
from . import rows16
from .rope import apply_rope
from .simd import (_at, _base, _fmuladd, _half_to_float, _splat, _store_at, act_buffers,
                   prefetch, quantize_act)
from .teal import ffn_teal

F16 = ENC_CODES["f16"]

# meta: the layer's integers in one array (fewer arguments to type-check per call)
(M_QENC, M_QSHIFT, M_QROW, M_QSROW, M_OENC, M_OSHIFT, M_OROW, M_OSROW, M_QKV_BIAS, M_O_BIAS,
 M_H, M_KVH, M_HD, M_KIND, M_GATED, M_UP_BIAS, M_DENC, M_DSHIFT, M_DROW, M_DSROW, M_DOWN_BIAS,
 M_SIMD, M_FAST, M_SPARSE, M_GENC, M_GSHIFT, M_GROW, M_GSROW, M_LEN) = range(29)

OK, F16_RANGE = 0, 1  # decode_layer's return codes


@intrinsic
def f16_bits(typingctx, v):
    """float32 -> its float16 bits, rounded to nearest even (LLVM fptrunc: the CPU's F16C
    conversion here, IEEE as NumPy's astype)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(cache=True, parallel=True)
def matvec1(enc, gshift, qrow, srow, q, s, x, lut, out, fast):
    """out = M x for one matrix of a SIMD encoding with rows of d = 32 nb values (the same
    row_dot calls and activation quantization as qmatvec's per-encoding matvecs)."""
    xq, xs, xp, corr = act_buffers(x.shape[0])
    if enc != F16:
        quantize_act(x, xq, xs, xp, corr)
    for u in prange(units(enc, out.shape[0])):
        unit_dot(enc, gshift, qrow, srow, q, s, u, x, xq, xs, xp, corr, lut, out, 0, fast)
    return out


@njit(cache=True, inline="always")
def units(enc, n):
    """A matrix of n rows in the units unit_dot takes: groups of 16 rows (INT4R) or rows."""
    return n // rows16.R if enc == INT4R else n


@njit(cache=True, inline="always")
def unit_dot(enc, gshift, qrow, srow, q, s, u, x, xq, xs, xp, corr, lut, out, o0, fast):
    """Unit u of a matrix (matvec1's arguments) times x into out[o0 + its rows]."""
    nb = x.shape[0] // 32
    if enc == INT4R:
        rows16.group_dot(q, s, u, gshift, nb, xq, corr, xs, lut, out, o0 + rows16.R * u, fast)
    else:
        out[o0 + u] = row_dot(q, u * qrow, s, u * srow, enc, gshift, nb, x, xq, xs, xp, corr,
                              lut, fast)


@njit(cache=True)
def qkv_proj(meta, wq, sq, wk, sk, wv, sv, h, lut, q, k, v, fast):
    """q, k, v = the layer's three projections of h, in one parallel loop, by encoding."""
    if meta[M_QENC] >= _sp.FUSED:  # pruned int8 (kernels/sparse.py)
        _sp.matvec3_int8(meta[M_QENC], meta[M_QROW], wq, sq, wk, sk, wv, sv, h, q, k, v, fast)
    elif meta[M_QENC] == INT4R:
        rows16.matvec3(meta[M_QSHIFT], wq, sq, wk, sk, wv, sv, h, lut, q, k, v, fast)
    else:
        matvec3(meta[M_QENC], meta[M_QSHIFT], meta[M_QROW], meta[M_QSROW], wq, sq, wk, sk, wv,
                sv, h, lut, q, k, v, fast)


@njit(cache=True)
def store_f16(x, p0, c):
    """x f32[T, KVH, hd] -> float16 bits into c uint16 [KVH, C, hd] at positions p0..; False
    when a value is out of float16 range (as encodings.F16.quantize refuses it)."""
    T, kvh, hd = x.shape
    for t in range(T):
        for h in range(kvh):
            for i in range(hd):
                v = x[t, h, i]
                if abs(v) > 65504:
                    return False
                c[h, p0 + t, i] = f16_bits(v)
    return True


@njit(cache=True)
def decode_layer(x, pos, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk, wv, sv, bq, bk, bv, wo, so,
                 bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab, gshifts, up_bias,
                 down_bias, dq, ds, partial, hidden, h, qkv, rot, att, obuf, posarr, pa, pb,
                 pbias, thr, z, scores, rows, kept, gq, gs, gvals, tl):
    """One decoded token through one layer; x f32[d] (the residual stream) is updated in place.

    Caches as the attention kernel reads them: float32 (kvlut, ksc, vsc None), float16 bits
    (kvlut the table) or int8 (ksc, vsc the scales; blk values per scale). Returns OK or
    F16_RANGE."""
    d = x.shape[0]
    H, kvh, hd = meta[M_H], meta[M_KVH], meta[M_HD]
    nq, nk = H * hd, kvh * hd
    fast = meta[M_FAST] != 0
    x2 = x.reshape(1, d)
    h2 = h.reshape(1, d)
    rmsnorm(x2, anorm, eps, h2)
    qkv_proj(meta, wq, sq, wk, sk, wv, sv, h, lut, qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:], fast)
    if not rope_store(meta, qkv, bq, bk, bv, pos, cos, sin, posarr, rot, kc, vc, ksc, vsc,
                      kvlut, blk):
        return F16_RANGE
    qr = rot[:nq].reshape(1, H, hd)
    a3 = att.reshape(1, H, hd)
    attention(qr, kc, vc, ksc, vsc, kvlut, meta[M_SIMD], pos, a3)
    if meta[M_OENC] >= _sp.FUSED:
        _sp.matvec_int8(wo, meta[M_OROW], so, meta[M_OENC] - _sp.FUSED, nq, att, obuf, fast)
    else:
        matvec1(meta[M_OENC], meta[M_OSHIFT], meta[M_OROW], meta[M_OSROW], wo, so, att, lut,
                obuf, fast)
    if meta[M_O_BIAS]:
        obuf += bo
    x += obuf
    rmsnorm(x2, fnorm, eps, h2)
    f = ffn_any(h, d, meta, bundles, tab, gshifts, up_bias, lut, partial, hidden, dq, ds, pa, pb,
                pbias, thr, z, scores, rows, kept, gq, gs, gvals, tl)
    if meta[M_DOWN_BIAS]:
        f += down_bias
    x += f
    return OK


@njit(cache=True)
def rope_store(meta, qkv, bq, bk, bv, pos, cos, sin, posarr, rot, kc, vc, ksc, vsc, kvlut, blk):
    """q, k, v (in qkv) plus their biases, q and k rotated into rot, k and v stored in the
    caches at pos; False when a value is out of float16 range for a float16 cache."""
    H, kvh, hd = meta[M_H], meta[M_KVH], meta[M_HD]
    nq, nk = H * hd, kvh * hd
    q = qkv[:nq]
    k = qkv[nq:nq + nk]
    v = qkv[nq + nk:nq + 2 * nk]
    if meta[M_QKV_BIAS]:
        q += bq
        k += bk
        v += bv
    posarr[0] = pos
    qr = rot[:nq].reshape(1, H, hd)
    kr = rot[nq:nq + nk].reshape(1, kvh, hd)
    apply_rope(q.reshape(1, H, hd), cos, sin, posarr, qr)
    apply_rope(k.reshape(1, kvh, hd), cos, sin, posarr, kr)
    v3 = v.reshape(1, kvh, hd)
    if ksc is not None:  # int8 cache
        store_int8(kr, pos, blk, kc, ksc)
        store_int8(v3, pos, blk, vc, vsc)
    elif kvlut is not None:  # float16 bits
        if not store_f16(kr, pos, kc) or not store_f16(v3, pos, vc):
            return False
    else:
        for j in range(kvh):
            for i in range(hd):
                kc[j, pos, i] = kr[0, j, i]
                vc[j, pos, i] = v3[0, j, i]
    return True


# ---------------------------------------------------------------------------------------------
# FFN row skipping with everything resident (runtime/rowskip.py): only the rows a token needs


PRED_BLOCK = 64  # scores a step of _pred_blocks (four 512-bit registers)


def _make_pred_blocks(native):
    @intrinsic
    def pred_blocks(typingctx, pbt, z, pbias, thr, scores, rows):
        """For the first n // 64 blocks of 64 scores: scores = bias + sum_j z[j] B^T[j] (B^T
        float16 bits [r, n]) with the block in registers over all r (the same fused
        multiply-adds in the same order as r axpys over the scores), stored; the indices of
        the scores > thr appended to rows in order (a bit mask walked with cttz). Returns
        their count."""
        sig = types.int64(pbt, z, pbias, types.float32, scores, rows)

        def codegen(context, builder, sig, args):
            pa, za, ba, thr, sa, ra = args
            B = PRED_BLOCK
            vf = ir.VectorType(ir.FloatType(), B)
            i64 = ir.IntType(64)
            pb = _base(context, builder, sig.args[0], pa)
            zb = _base(context, builder, sig.args[1], za)
            bb = _base(context, builder, sig.args[2], ba)
            sb = _base(context, builder, sig.args[4], sa)
            rb = _base(context, builder, sig.args[5], ra)
            shape = context.make_array(sig.args[0])(context, builder, pa).shape
            r = builder.extract_value(shape, 0)
            n = builder.extract_value(shape, 1)
            acc = cgutils.alloca_once(builder, vf)
            m = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
            bits = cgutils.alloca_once(builder, i64)
            thrv = _splat(builder, thr, B)
            nblk = builder.udiv(n, ir.Constant(i64, B))
            with cgutils.for_range(builder, nblk) as blk:
                off = builder.mul(blk.index, ir.Constant(i64, B))
                off4 = builder.shl(off, ir.Constant(i64, 2))
                builder.store(_at(builder, bb, off4, vf, align=4), acc)
                with cgutils.for_range(builder, r) as lp:
                    j = lp.index
                    zj = _at(builder, zb, builder.shl(j, ir.Constant(i64, 2)), ir.FloatType(),
                             align=4)
                    o = builder.shl(builder.add(builder.mul(j, n), off), ir.Constant(i64, 1))
                    w = _half_to_float(builder, _at(builder, pb, o, ir.VectorType(ir.IntType(16),
                                                                                  B)), native)
                    builder.store(_fmuladd(builder, w, _splat(builder, zj, B),
                                           builder.load(acc)), acc)
                s = builder.load(acc)
                _store_at(builder, sb, off4, s, align=4)
                mask = builder.bitcast(builder.fcmp_ordered(">", s, thrv), i64)
                builder.store(mask, bits)
                cnt = builder.call(cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64"), [mask])
                cttz = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
                off32 = builder.trunc(off, ir.IntType(32))
                with cgutils.for_range(builder, cnt):
                    b = builder.load(bits)
                    k = builder.call(cttz, [b, ir.Constant(ir.IntType(1), 1)])
                    mi = builder.load(m)
                    _store_at(builder, rb, builder.shl(mi, ir.Constant(i64, 2)),
                              builder.add(off32, builder.trunc(k, ir.IntType(32))), align=4)
                    builder.store(builder.add(mi, ir.Constant(i64, 1)), m)
                    builder.store(builder.and_(b, builder.sub(b, ir.Constant(i64, 1))), bits)
            return builder.load(m)

        return sig, codegen

    return pred_blocks


_pred_blocks_fast, _pred_blocks_generic = _make_pred_blocks(True), _make_pred_blocks(False)


@njit(cache=True)
def predict_rows(x, pa, pbt, pbias, thr, lut, z, scores, rows, fast):
    """Low-rank predictor (runtime/predictor.py): scores = B (A x) + bias, float16 A [r, d] and
    B transposed, [r, d_ff], as bits; rows int32[d_ff] gets the sorted bundle rows with score >
    thr. Returns their count. B's product runs along d_ff, 64 scores at a time held in
    registers over all r (r axpys over the whole score vector stored and reloaded it r times:
    demo, r = 32, d_ff = 1024, 4.5 -> 1 us a layer), the rows picked from the blocks' compare
    masks. The scores equal kernels.linear's up to float32 summation order."""
    for i in range(pa.shape[0]):
        z[i] = f16_row(pa, i, x, lut, fast)
    n = pbt.shape[1]
    if fast:
        m = _pred_blocks_fast(pbt, z, pbias, thr, scores, rows)
    else:
        m = _pred_blocks_generic(pbt, z, pbias, thr, scores, rows)
    for i in range(n // PRED_BLOCK * PRED_BLOCK, n):  # the tail, as the blocks
        s = pbias[i]
        for j in range(pbt.shape[0]):
            s += z[j] * lut[pbt[j, i]]
        scores[i] = s
        if s > thr:
            rows[m] = i
            m += 1
    return m


@njit(cache=True, parallel=True)
def ffn_decode_sparse(x, bundles, rows, nrows, listed, thr, gvals, pregated, encs, offs, soffs,
                      gshifts, d, kind, gated, up_bias, has_bias, lut, partial, hidden, dq, ds,
                      denc, dshift, dqrow, dsrow, fast, kept):
    """ffn_decode_simd over some rows only. listed: bundle rows rows[:nrows] (a predictor's), the
    sum chunked as ffn_decode_simd chunks bundles[rows[:nrows]], so the result is exactly
    kernels.ffn on those rows. Otherwise a SiLU magnitude threshold (CATS): every row's gate,
    and up and down only for the rows with |act(gate x)| > thr (thr < 0: every row). pregated:
    the gates are gvals[i] (computed beforehand from a gate matrix of their own, the bundles hold
    no gate part or it is not read), so a skipped row's bytes are not read at all; else each
    row's gate comes from its bundle. partial f32[threads, d]; kept[0] += the rows computed."""
    n = bundles.shape[0]
    stride = bundles.shape[1]
    nlines = (stride + 63) // 64
    third = (nlines + 2) // 3
    xq, xs, xp, corr = act_buffers(d)
    quantize_act(x, xq, xs, xp, corr)
    if pregated and not listed:  # the rows to read, known before any is read
        m = 0
        for i in range(n):
            if abs(act(gvals[i], kind)) > thr:
                rows[m] = i
                m += 1
        listed = True
    else:
        m = nrows if listed else n
    nchunks = max(1, min(m, partial.shape[0]))  # partial: one row per thread
    if denc != NONE:
        hidden[:] = 0.0
    per = (m + nchunks - 1) // nchunks
    counts = np.zeros(nchunks, dtype=np.int64)
    for c in prange(nchunks):
        acc = partial[c]
        acc[:] = 0.0
        end = min(m, (c + 1) * per)
        for k in range(c * per, end):
            i = rows[k] if listed else k
            base = i * stride
            # the next row to compute is prefetched a third at a time, between this row's parts,
            # as ffn_decode_simd does (all of it at once, or none, ran at half its speed)
            pf = k + 1 < end
            nxt = ((rows[k + 1] if listed else k + 1) * stride) if pf else 0
            if pf:
                for line in range(0, third):
                    prefetch(bundles, nxt + 64 * line)
            gt = np.float32(0.0)
            if pregated:
                gt = gvals[i]
            elif gated:
                gt = simd_part_dot(bundles, base, encs[0], offs[0], soffs[0], gshifts[0], d, x,
                                   xq, xs, xp, corr, lut, fast)
                if not listed and abs(act(gt, kind)) <= thr:
                    if pf:
                        for line in range(third, nlines):
                            prefetch(bundles, nxt + 64 * line)
                    continue
            if pf:
                for line in range(third, 2 * third):
                    prefetch(bundles, nxt + 64 * line)
            u = simd_part_dot(bundles, base, encs[1], offs[1], soffs[1], gshifts[1], d, x, xq,
                              xs, xp, corr, lut, fast)
            if gated:
                h = act(gt, kind) * u
            else:
                if has_bias:
                    u += up_bias[i]
                h = act(u, kind)
                if not listed and abs(h) <= thr:
                    if pf:
                        for line in range(2 * third, nlines):
                            prefetch(bundles, nxt + 64 * line)
                    continue
            if pf:
                for line in range(2 * third, nlines):
                    prefetch(bundles, nxt + 64 * line)
            counts[c] += 1
            if denc != NONE:
                hidden[i] = h
            elif h != 0:
                simd_part_axpy(bundles, base, encs[2], offs[2], soffs[2], gshifts[2], d, h, acc,
                               lut, fast)
    kept[0] += counts.sum()
    return ffn_output(hidden, partial, d, dq, ds, denc, dshift, dqrow, dsrow, lut, fast)


@njit(cache=True)
def ffn_any(h, d, meta, bundles, tab, gshifts, up_bias, lut, partial, hidden, dq, ds, pa, pb,
            pbias, thr, z, scores, rows, kept, gq, gs, gvals, tl):
    """The FFN of a layer, dense (meta[M_SPARSE] 0), over a low-rank predictor's rows (1), with a
    magnitude threshold on gates read from the bundles (2), or on gates from a gate matrix of
    their own (3: gq, gs; thr < 0 computes every row), or TEAL input thresholds over weights
    stored by input column (4: the arrays in tl, runtime/teal.py): decode_layer's FFN, also
    called alone (rowskip.py, gateapart.py)."""
    fast = meta[M_FAST] != 0
    mode = meta[M_SPARSE]
    if mode == 4:
        return ffn_teal(h, tl[0], tl[1], tl[2], tl[3], tl[4], meta[M_KIND], tl[5], tl[6], tl[7],
                        partial, tl[8])
    if mode == 0:
        if tab[0, 1] >= _sp.FUSED:  # pruned int8 parts and down (kernels/sparse.py)
            return _sp.fused_ffn(h, bundles, tab, d, meta[M_KIND], meta[M_GATED] != 0, up_bias,
                                 meta[M_UP_BIAS] != 0, hidden, dq, ds, meta[M_DENC],
                                 meta[M_DROW], fast)
        return ffn_decode_simd(h, bundles, tab[0], tab[1], tab[2], gshifts, d, meta[M_KIND],
                               meta[M_GATED] != 0, up_bias, meta[M_UP_BIAS] != 0, lut, partial,
                               hidden, dq, ds, meta[M_DENC], meta[M_DSHIFT], meta[M_DROW],
                               meta[M_DSROW], fast)
    kept[1] += 1  # tokens
    nrows = 0
    if mode == 1:
        nrows = predict_rows(h, pa, pb, pbias, thr, lut, z, scores, rows, fast)
    elif mode == 3:
        matvec1(meta[M_GENC], meta[M_GSHIFT], meta[M_GROW], meta[M_GSROW], gq, gs, h, lut, gvals,
                fast)
    return ffn_decode_sparse(h, bundles, rows, nrows, mode == 1, thr, gvals, mode == 3, tab[0],
                             tab[1], tab[2], gshifts, d, meta[M_KIND], meta[M_GATED] != 0,
                             up_bias, meta[M_UP_BIAS] != 0, lut, partial, hidden, dq, ds,
                             meta[M_DENC], meta[M_DSHIFT], meta[M_DROW], meta[M_DSROW], fast,
                             kept)


# ---------------------------------------------------------------------------------------------
# the Python side: arguments prepared once per layer, scratch once per model


_EMPTY_F32 = np.zeros(1, dtype=np.float32)
_EMPTY_U16 = np.zeros(1, dtype=np.uint16)


def _bits(a):
    """Numba takes no float16 arrays: float16 values and scales go as their bits."""
    if a is None:
        return _EMPTY_U16
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _enc(m):
    """(encoding code, int4 group shift, bytes per row of values, of scales) of a Matrix; for
    one packed for decode (reader.PackedMatrix) INT4R and bytes per group of 16 rows."""
    from .qmatvec import group_shift

    c = m.codec
    gshift = group_shift(c.group_size) if c.name == "int4" else 0
    packed = getattr(m, "packed", None)
    if packed is not None:
        return INT4R, gshift, packed[0].strides[0], packed[1].strides[0]
    return ENC_CODES[c.name], gshift, m.q.strides[0], 0 if m.s is None else m.s.strides[0]


def _arrays(m):
    """A matrix's (values, scales) as the kernels take them: packed ones as packed."""
    packed = getattr(m, "packed", None)
    return packed if packed is not None else (_bits(m.q), _bits(m.s))


def _vec(b, size):
    return _EMPTY_F32 if b is None else np.ascontiguousarray(b, dtype=np.float32).reshape(size)


_NO_SPARSE = dict(pa=np.zeros((1, 1), np.uint16), pb=np.zeros((1, 1), np.uint16),
                  pbias=_EMPTY_F32, thr=np.float32(0.0), z=_EMPTY_F32, scores=_EMPTY_F32,
                  rows=np.zeros(1, np.int32), kept=np.zeros(2, np.int64))
# no gate matrix (int8 shaped, as most gate matrices are: one compiled decode_layer for both)
_NO_GATE = dict(gq=np.zeros((1, 1), np.int8), gs=_EMPTY_F32, gvals=_EMPTY_F32)


def _ro(a):
    a.flags.writeable = False
    return a


# no TEAL FFN: runtime/teal.TealFFN.tuple's types (one compiled decode_layer for both)
_NO_TEAL = (_ro(np.zeros((1, 1), np.int8)), _ro(np.zeros(1, np.float32)),
            _ro(np.zeros((1, 1), np.int8)), _ro(np.zeros(1, np.float32)), np.zeros(2, np.float32),
            np.zeros(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32),
            np.zeros(3, np.int64))
_TEAL_BUNDLES = _ro(np.zeros((1, 1), np.uint8))  # bundles as mapped ones are typed


def plan_teal(cfg, f, meta):
    """plan_ffn for a runtime/teal.TealFFN f: sparse mode 4, its arrays in tl."""
    from .. import kernels as K

    meta[M_SPARSE] = 4
    meta[M_KIND] = ACT_CODES[cfg.activation]
    meta[M_GATED] = 1
    meta[M_DENC] = NONE
    meta[M_DOWN_BIAS] = f.down_bias is not None
    meta[M_SIMD] = {"fast": 2, "generic": 1}.get(K.MODE, 0)
    meta[M_FAST] = K.MODE == "fast"
    arrays = dict(bundles=_TEAL_BUNDLES, tab=_ro(np.zeros((4, 3), np.int64)),
                  gshifts=np.zeros(3, np.int64), up_bias=_EMPTY_F32,
                  down_bias=_vec(f.down_bias, cfg.d_model), dq=_EMPTY_U16, ds=_EMPTY_U16,
                  n=cfg.d_ff, tl=f.tuple, **_NO_SPARSE)
    arrays.update(_NO_GATE)
    return arrays


def plan_ffn(cfg, f, ffn_cls, meta):
    """The FFN's arrays for ffn_any / decode_layer (its integers written into meta), or None
    when the SIMD kernels do not take it. f: a ffn_cls (model.ResidentFFN), or a row-skipping
    FFN over one (rowskip.SkipFFN: f.base, f.sparse). A gate matrix of its own (base.gate, or
    sparse["gate"]: a copy of the bundles' gates) makes it mode 3."""
    from .. import kernels as K

    if getattr(f, "teal", False):  # input thresholds, weights by column (runtime/teal.py)
        return f.plan(meta) if K.MODE != "portable" else None
    d = cfg.d_model
    sparse = getattr(f, "sparse", None)
    base = f.base if sparse is not None else f
    if type(base) is not ffn_cls or K.MODE == "portable" or d % 32:
        return None
    packed = base.packed
    if packed is not None:
        return None if sparse is not None else _plan_packed(cfg, base, packed, meta)
    if (not K._ffn_simd_ok(base.layout) or base.bundles.dtype != np.uint8
            or base.bundles.ndim != 2):
        return None
    bundles = np.ascontiguousarray(base.bundles)
    n = bundles.shape[0]
    down = base.down
    gate = sparse.get("gate") if sparse is not None else None
    gate = getattr(base, "gate", None) if gate is None else gate
    pruned = _sp.is_sparse_layout(base.layout)
    if pruned:  # int8 sparse parts and down, every row (kernels/sparse.py)
        tab = _sp.fused_table(base.layout, cfg.gated_ffn, d, bundles, down, K.MODE)
        if tab is None or sparse is not None or gate is not None or down.shape != (d, n):
            return None
        K._check_matrix(down)
        meta[M_DENC], meta[M_DSHIFT], meta[M_DROW], meta[M_DSROW] = _sp.fused_enc(down, K.MODE)
    elif down is not None:
        if not (n % 32 == 0 and down.codec.name != "f32" and K._simd_ok(down)
                and down.shape == (d, n)):
            return None
        K._check_matrix(down)
        meta[M_DENC], meta[M_DSHIFT], meta[M_DROW], meta[M_DSROW] = _enc(down)
    else:
        meta[M_DENC] = NONE
    # with a gate matrix the bundles' gate part, if any, is not read
    if not pruned:
        tab = K._part_table_cached(base.layout, cfg.gated_ffn and gate is None, d, bundles,
                                   down is not None)
    has_up_bias = _ffn_meta(cfg, base, meta)
    dq, ds = _arrays(down) if down is not None else (_EMPTY_U16, _EMPTY_U16)
    arrays = dict(
        bundles=bundles, tab=tab, gshifts=K._group_shifts(tab),
        up_bias=_vec(base.up_bias, n) if has_up_bias else _EMPTY_F32,
        down_bias=_vec(base.down_bias, d), dq=dq, ds=ds, n=n, tl=_NO_TEAL, **_NO_SPARSE)
    arrays.update(_NO_GATE)
    if sparse is not None:
        meta[M_SPARSE] = sparse["mode"]
        arrays.update({k: sparse[k] for k in _NO_SPARSE})
    if gate is not None:
        if not (cfg.gated_ffn and gate.shape == (n, d) and gate.codec.name != "f32"
                and K._simd_ok(gate)):
            return None
        K._check_matrix(gate)
        meta[M_GENC], meta[M_GSHIFT], meta[M_GROW], meta[M_GSROW] = _enc(gate)
        arrays.update(gq=_bits(gate.q), gs=_bits(gate.s) if gate.s is not None else _EMPTY_F32,
                      gvals=np.empty(n, np.float32))
        if meta[M_SPARSE] == 0:  # the gate matrix alone: every row (a negative threshold)
            meta[M_SPARSE] = 3
            arrays["thr"] = np.float32(-1.0)
            arrays["rows"] = np.empty(n, np.int32)
    return arrays


def _ffn_meta(cfg, base, meta):
    """The FFN's activation, biases and kernel flavour into meta; True when up has a bias."""
    from .. import kernels as K

    meta[M_KIND] = ACT_CODES[cfg.activation]
    meta[M_GATED] = bool(cfg.gated_ffn)
    has_up_bias = base.up_bias is not None and not cfg.gated_ffn
    meta[M_UP_BIAS] = has_up_bias
    meta[M_DOWN_BIAS] = base.down_bias is not None
    meta[M_SIMD] = {"fast": 2, "generic": 1}.get(K.MODE, 0)
    meta[M_FAST] = K.MODE == "fast"
    return has_up_bias


def _plan_packed(cfg, base, packed, meta):
    """plan_ffn for gate/up packed 16 rows a group (reader.PackedBundles; ffn_hidden_packed)
    with the down projection a matrix."""
    from .. import kernels as K
    from .qmatvec import group_shift

    down = base.down
    K._check_matrix(down)
    meta[M_DENC], meta[M_DSHIFT], meta[M_DROW], meta[M_DSROW] = _enc(down)
    n = packed.groups.shape[0] * rows16.R
    tab = np.zeros((4, 3), np.int64)
    tab[0] = (INT4R, INT4R, NONE)
    for slot, (vo, so) in zip((0, 1) if cfg.gated_ffn else (1,), packed.where):
        tab[1, slot], tab[2, slot], tab[3, slot] = vo, so, packed.group_size
    tab[1, 2] = packed.unit  # no down part: its slot holds the unit's bytes
    gshift = group_shift(packed.group_size)
    has_up_bias = _ffn_meta(cfg, base, meta)
    dq, ds = _arrays(down)
    arrays = dict(bundles=packed.groups, tab=_ro(tab), gshifts=np.array([gshift] * 3),
                  up_bias=_vec(base.up_bias, n) if has_up_bias else _EMPTY_F32,
                  down_bias=_vec(base.down_bias, cfg.d_model), dq=dq, ds=ds, n=n, tl=_NO_TEAL,
                  **_NO_SPARSE)
    arrays.update(_NO_GATE)
    return arrays


def ffn_alone(f, h):
    """The FFN f (no down bias) of one token h f32[1, d] through ffn_any, planned once per FFN
    (a gate matrix's FFN, a packed one outside decode_layer); None where plan_ffn does not take
    it."""
    plan = getattr(f, "_fused", False)
    if plan is False:
        meta = np.zeros(M_LEN, np.int64)
        a = plan_ffn(f.cfg, f, type(f), meta)
        meta.flags.writeable = False
        plan = f._fused = None if a is None else (meta, a, Scratch(f.cfg))
    if plan is None:
        return None
    meta, a, s = plan
    n = a["n"] if a["dq"] is not _EMPTY_U16 else 1
    return ffn_call(h[0], meta, a, s.partial(a["n"]), s.hidden(n)).reshape(1, -1)


def ffn_call(h, meta, a, partial, hidden):
    """ffn_any for one token h f32[d] with plan_ffn's arrays a (no down bias added)."""
    return ffn_any(h, h.shape[0], meta, a["bundles"], a["tab"], a["gshifts"], a["up_bias"], _LUT,
                   partial, hidden, a["dq"], a["ds"], a["pa"], a["pb"], a["pbias"], a["thr"],
                   a["z"], a["scores"], a["rows"], a["kept"], a["gq"], a["gs"], a["gvals"],
                   a["tl"])


def plan_layer(cfg, L, ffn_cls):
    """(meta, arrays) for decode_layer, or None when the layer needs the general path (see the
    module docstring). ffn_cls: the resident FFN class (model.ResidentFFN); a streamed or
    predicted FFN is not fused (a row-skipping one over a resident FFN is: plan_ffn)."""
    from .. import kernels as K

    d = cfg.d_model
    if K.MODE == "portable" or cfg.norm != "rms" or cfg.positions != "rope" or d % 32:
        return None
    if not all(hasattr(m, "codec") for m in (L.q, L.k, L.v, L.o)):
        return None  # a low-rank projection (runtime/lowrank.py): the per-operation path
    qkv = (L.q, L.k, L.v)
    names = {(m.codec.name, m.codec.group_size, m.shape[1]) for m in qkv}
    pruned = [_sp.fused_enc(m, K.MODE) for m in qkv + (L.o,)]  # int8 sparse, else None
    if any(e is not None for e in pruned):
        if len(names) != 1 or None in pruned:
            return None
    elif (len(names) != 1 or L.q.codec.name == "f32" or L.o.codec.name == "f32"
            or L.o.shape[1] % 32 or not all(K._simd_ok(m) for m in qkv + (L.o,))):
        return None
    meta = np.zeros(M_LEN, dtype=np.int64)
    arrays = plan_ffn(cfg, L.ffn, ffn_cls, meta)
    if arrays is None:
        return None
    for m in qkv + (L.o,):
        K._check_matrix(m)
    meta[M_QENC], meta[M_QSHIFT], meta[M_QROW], meta[M_QSROW] = pruned[0] or _enc(L.q)
    meta[M_OENC], meta[M_OSHIFT], meta[M_OROW], meta[M_OSROW] = pruned[3] or _enc(L.o)
    biases = (L.q_bias, L.k_bias, L.v_bias)
    meta[M_QKV_BIAS] = any(b is not None for b in biases)
    meta[M_O_BIAS] = L.o_bias is not None
    meta[M_H], meta[M_KVH], meta[M_HD] = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    meta.flags.writeable = False
    if meta[M_QKV_BIAS]:
        bq, bk, bv = (np.zeros(m.shape[0], np.float32) if b is None else _vec(b, m.shape[0])
                      for m, b in zip(qkv, biases))
    else:
        bq = bk = bv = _EMPTY_F32
    arrays.update(
        anorm=_vec(L.attn_norm[0], d), fnorm=_vec(L.ffn_norm[0], d),
        bq=bq, bk=bk, bv=bv, bo=_vec(L.o_bias, d))
    for name, m in (("q", L.q), ("k", L.k), ("v", L.v), ("o", L.o)):
        arrays["w" + name], arrays["s" + name] = _arrays(m)
    return meta, arrays


class Scratch:
    """decode_layer's buffers for one model, allocated once (partial sums: per thread count)."""

    def __init__(self, cfg):
        d, nq, nk = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.h = np.empty(d, np.float32)
        self.qkv = np.empty(nq + 2 * nk, np.float32)
        self.rot = np.empty(nq + nk, np.float32)
        self.att = np.empty(nq, np.float32)
        self.obuf = np.empty(d, np.float32)
        self._hidden = np.empty(0, np.float32)
        self.posarr = np.zeros(1, np.int64)
        self.x = np.empty(d, np.float32)  # the residual stream through fused layers
        self.x2 = self.x.reshape(1, d)
        self._partial = {}
        self._team = {}
        self.cfg, self.d = cfg, d

    def hidden(self, n):
        if self._hidden.size < n:
            self._hidden = np.empty(n, np.float32)
        return self._hidden[:n]

    def team(self, T, n):
        """team.decode_team's buffers for T threads and FFNs of n rows."""
        from .team import Team

        t = self._team.get((T, n))
        if t is None:
            t = self._team[(T, n)] = Team(T, self.cfg, n)
        return t

    def partial(self, n):
        k = max(1, min(numba.get_num_threads(), n))
        p = self._partial.get(k)
        if p is None:
            p = self._partial[k] = np.empty((k, self.d), np.float32)
        return p


def layer_args(i, plan, scratch, eps, kc, vc, ksc, vsc, cos, sin, block):
    """(kernel, arguments) for planned layer i against its caches, built once per cache and
    thread count, so a token's Python per layer is at most one call. On more than one thread,
    where team.team_ok takes the layer (EDGELLM_NO_TEAM=1 keeps decode_layer): team.decode_team,
    (the layer's arguments, its Team, their Numba type), for the caller to run with the layers
    after it that share the team and the type; else decode_layer and its arguments after
    (x, pos)."""
    from . import team

    meta, a = plan
    kvlut = None
    if kc.dtype == np.float16:
        kc, vc, kvlut = kc.view(np.uint16), vc.view(np.uint16), _LUT
    n = a["n"]
    T = numba.get_num_threads()
    head = (block, meta, eps, a["anorm"], a["fnorm"], a["wq"], a["sq"], a["wk"], a["sk"],
            a["wv"], a["sv"], a["bq"], a["bk"], a["bv"], a["wo"], a["so"], a["bo"], cos, sin, kc,
            vc, ksc, vsc, kvlut, _LUT, a["bundles"], a["tab"], a["gshifts"], a["up_bias"],
            a["down_bias"], a["dq"], a["ds"])
    if T > 1 and team.team_ok(meta, a) and team.enabled():
        bufs = scratch.team(T, n)
        args = head + bufs.layer(i)
        return team.decode_team, (args, bufs, numba.typeof(args))
    hidden = scratch.hidden(n if a["dq"] is not _EMPTY_U16 else 1)
    return decode_layer, head + (
        scratch.partial(n), hidden, scratch.h, scratch.qkv, scratch.rot, scratch.att,
        scratch.obuf, scratch.posarr, a["pa"], a["pb"], a["pbias"], a["thr"], a["z"],
        a["scores"], a["rows"], a["kept"], a["gq"], a["gs"], a["gvals"], a["tl"])


def takes_cache(kv):
    """float16 caches are written with the CPU's conversion (f16_bits): only where it has one."""
    return kv != "f16" or _simd.HAVE_F16
