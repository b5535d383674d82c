"""Decode of one layer by a team of threads in one parallel region.

fused.decode_layer forks and joins Numba's threads five times a layer (q/k/v, attention, o, the
FFN's rows, its down matrix): 110 hand-offs a TinyLlama token. Numba's OpenMP workers wait
passively (kernels/__init__.py), and each fork/join cost ~45 us on this 2-vCPU guest even idle
(a parallel call with no work, measured): ~5 ms of a 25 ms token. Here the whole layer is one
parallel region: every thread runs the same sequence of phases and takes the work of each phase
in chunks of rows through an atomic counter, then waits, spinning briefly, until the phase's
chunks are all done (its done counter). One fork/join a layer is left.

Claiming makes it safe whatever the scheduler does: a thread that starts late (a wake-up takes
tens of microseconds) finds chunks already taken and joins in on what is left; a thread that
never starts leaves all the work to the others, never a wait for work nobody took. Waits are
only for chunks another thread has taken and is computing. Single steps (norms, rotary, the
cache store, activation quantization, residuals) are one-chunk phases.

Waits spin on an atomic load without the pause instruction, then yield: on this KVM guest a
loop of pauses exits to the hypervisor (pause-loop exiting), which deschedules the vCPU: with
pause a TinyLlama int4 token took 42 ms on 2 threads against 37 for decode_layer, without it 35
(measured side by side, quiet machine). llama.cpp's barriers spin with pause: likely why its
2-thread decode of SmolLM2 runs at half its 1-thread speed here.

Each phase calls the same row kernels as decode_layer (row_dot, ffn_rows, attend, rope_store),
and every output element is written by one row computation whichever thread takes it, so the
result is bit for bit decode_layer's (tests/test_team.py): where the FFN's down columns are in
the bundles, its rows are split in one chunk per thread, each summed into its own partial row,
as ffn_decode_simd does. Taken: dense layers; pruned or row-skipping ones run decode_layer.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import fused as _fu
from . import sparse as _sp
from .attention import attend
from .ffn import NONE, ffn_rows
from .norms import rmsnorm
from .qmatvec import row_dot
from .simd import act_buffers, quantize_act

F16 = _fu.F16
(P_NORM, P_QKV, P_ROPE, P_ATT, P_OACT, P_O, P_FNORM, P_FFN, P_HACT, P_DOWN, P_RES,
 NPHASES) = range(12)
RC = 2 * NPHASES  # ctl[2p]: chunks of phase p taken, ctl[2p + 1]: done; ctl[RC]: return code
CTL_LEN = RC + 1
CHUNK_BYTES = 32 << 10  # weight bytes a chunk: ~2 us of work, ~50 ns to take (32-512 KB: within 3%)
SPINS = 20000  # looks before a waiting thread yields its core (tens of microseconds)

I64 = ir.IntType(64)


def _slot(context, builder, aryty, ary, i):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.gep(builder.bitcast(a.data, I64.as_pointer()), [i])


@intrinsic
def atomic_add(typingctx, a, i, v):
    """a[i] += v atomically (a int64[:]); returns the value before."""
    sig = types.int64(a, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig.args[0], args[0], args[1]),
                                  args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, a, i):
    """a[i] read atomically, ordered before the loads that follow (acquire)."""
    sig = types.int64(a, types.int64)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1]),
                                   "acquire", 8)

    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """libc's sched_yield: the core goes to whatever else is runnable (the thread waited for,
    when the machine is busy)."""
    sig = types.int32()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(ir.IntType(32), []), "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


@njit(cache=True)
def _take(ctl, p):
    return atomic_add(ctl, 2 * p, 1)


@njit(cache=True)
def _done(ctl, p):
    atomic_add(ctl, 2 * p + 1, 1)


@njit(cache=True)
def _wait(ctl, p, n):
    """Until n chunks of phase p are done: spin, then yield the core between looks."""
    k = 0
    while atomic_load(ctl, 2 * p + 1) < n:
        if k < SPINS:  # no pause instruction: see the module docstring
            k += 1
        else:
            sched_yield()


@njit(cache=True)
def _per(row_bytes):
    return max(1, CHUNK_BYTES // max(1, row_bytes))


@njit(cache=True)
def _work(x, pos, ctl, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk, wv, sv, bq, bk, bv, wo, so,
          bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab, gshifts, up_bias, down_bias,
          dq, ds, partial, hidden, h, qkv, rot, att, obuf, posarr, hx, ha, hh, f):
    """One thread's part of decode_layer_team: every phase in order, taking chunks."""
    d = x.shape[0]
    H, kvh, hd = meta[_fu.M_H], meta[_fu.M_KVH], meta[_fu.M_HD]
    nq, nk = H * hd, kvh * hd
    n = bundles.shape[0]
    fast = meta[_fu.M_FAST] != 0
    x2 = x.reshape(1, d)
    h2 = h.reshape(1, d)
    xq, xs, xp, corr = hx
    aq, as_, ap, ac = ha
    hq, hs, hp, hc = hh

    if _take(ctl, P_NORM) == 0:
        rmsnorm(x2, anorm, eps, h2)
        if meta[_fu.M_QENC] != F16:
            quantize_act(h, xq, xs, xp, corr)
        _done(ctl, P_NORM)
    _wait(ctl, P_NORM, 1)

    enc, gsh, qrow, srow = (meta[_fu.M_QENC], meta[_fu.M_QSHIFT], meta[_fu.M_QROW],
                            meta[_fu.M_QSROW])
    per = _per(qrow)
    nc = (nq + 2 * nk + per - 1) // per
    c = _take(ctl, P_QKV)
    while c < nc:
        for r in range(c * per, min(nq + 2 * nk, (c + 1) * per)):
            if r < nq:
                w, s, i = wq, sq, r
            elif r < nq + nk:
                w, s, i = wk, sk, r - nq
            else:
                w, s, i = wv, sv, r - nq - nk
            qkv[r] = row_dot(w, i * qrow, s, i * srow, enc, gsh, d // 32, h, xq, xs, xp, corr,
                             lut, fast)
        _done(ctl, P_QKV)
        c = _take(ctl, P_QKV)
    _wait(ctl, P_QKV, nc)

    if _take(ctl, P_ROPE) == 0:
        if not _fu.rope_store(qkv, meta[_fu.M_QKV_BIAS] != 0, bq, bk, bv, H, kvh, hd, pos, cos,
                              sin, posarr, rot, kc, vc, ksc, vsc, kvlut, blk):
            ctl[RC] = _fu.F16_RANGE
        _done(ctl, P_ROPE)
    _wait(ctl, P_ROPE, 1)
    if atomic_load(ctl, RC) != _fu.OK:
        return

    qr = rot[:nq].reshape(1, H, hd)
    a3 = att.reshape(1, H, hd)
    c = _take(ctl, P_ATT)
    while c < kvh:
        attend(c, qr, kc, vc, ksc, vsc, kvlut, meta[_fu.M_SIMD], pos, a3)
        _done(ctl, P_ATT)
        c = _take(ctl, P_ATT)
    _wait(ctl, P_ATT, kvh)

    enc, gsh, qrow, srow = (meta[_fu.M_OENC], meta[_fu.M_OSHIFT], meta[_fu.M_OROW],
                            meta[_fu.M_OSROW])
    if _take(ctl, P_OACT) == 0:
        if enc != F16:
            quantize_act(att, aq, as_, ap, ac)
        _done(ctl, P_OACT)
    _wait(ctl, P_OACT, 1)
    per = _per(qrow)
    nc = (d + per - 1) // per
    c = _take(ctl, P_O)
    while c < nc:
        for r in range(c * per, min(d, (c + 1) * per)):
            obuf[r] = row_dot(wo, r * qrow, so, r * srow, enc, gsh, nq // 32, att, aq, as_, ap,
                              ac, lut, fast)
        _done(ctl, P_O)
        c = _take(ctl, P_O)
    _wait(ctl, P_O, nc)

    if _take(ctl, P_FNORM) == 0:
        if meta[_fu.M_O_BIAS]:
            obuf += bo
        x += obuf
        rmsnorm(x2, fnorm, eps, h2)
        quantize_act(h, xq, xs, xp, corr)
        _done(ctl, P_FNORM)
    _wait(ctl, P_FNORM, 1)

    denc, gsh, qrow, srow = (meta[_fu.M_DENC], meta[_fu.M_DSHIFT], meta[_fu.M_DROW],
                             meta[_fu.M_DSROW])
    if denc != NONE:  # rows to hidden, then the down matrix
        per = _per(bundles.shape[1])
        nc = (n + per - 1) // per
    else:  # down columns in the bundles: one partial sum per chunk, as ffn_decode_simd's
        nc = partial.shape[0]
        per = (n + nc - 1) // nc
    c = _take(ctl, P_FFN)
    while c < nc:
        acc = partial[c] if denc == NONE else f
        acc[:] = 0.0
        # small chunks: a row prefetches the next one even past its chunk (another thread's)
        ffn_rows(h, xq, xs, xp, corr, bundles, c * per, min(n, (c + 1) * per), n, tab[0],
                 tab[1], tab[2], gshifts, d, meta[_fu.M_KIND], meta[_fu.M_GATED] != 0, up_bias,
                 meta[_fu.M_UP_BIAS] != 0, lut, acc, hidden, fast)
        _done(ctl, P_FFN)
        c = _take(ctl, P_FFN)
    _wait(ctl, P_FFN, nc)

    if _take(ctl, P_HACT) == 0:
        if denc == NONE:  # the partial sums added in ffn_output's order
            f[:] = 0.0
            for k in range(nc):
                for j in range(d):
                    f[j] += partial[k, j]
        elif denc != F16:
            quantize_act(hidden, hq, hs, hp, hc)
        _done(ctl, P_HACT)
    _wait(ctl, P_HACT, 1)
    per = _per(qrow)
    nc = (d + per - 1) // per if denc != NONE else 0
    c = _take(ctl, P_DOWN)
    while c < nc:
        for r in range(c * per, min(d, (c + 1) * per)):
            f[r] = row_dot(dq, r * qrow, ds, r * srow, denc, gsh, n // 32, hidden, hq, hs, hp,
                           hc, lut, fast)
        _done(ctl, P_DOWN)
        c = _take(ctl, P_DOWN)
    _wait(ctl, P_DOWN, nc)

    if _take(ctl, P_RES) == 0:
        if meta[_fu.M_DOWN_BIAS]:
            f += down_bias
        x += f


@njit(cache=True, parallel=True)
def decode_layer_team(x, pos, ctl, nw, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk, wv, sv, bq,
                      bk, bv, wo, so, bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab,
                      gshifts, up_bias, down_bias, dq, ds, partial, hidden, h, qkv, rot, att,
                      obuf, posarr, pa, pb, pbias, thr, z, scores, rows, kept, gq, gs, gvals,
                      tl):
    """fused.decode_layer (same arguments, after pos: ctl int64[CTL_LEN] scratch and nw, the
    threads in use: Numba's count read inside would keep this from its cache) for a layer that
    `takes` takes, in one parallel region; returns OK or F16_RANGE."""
    d = x.shape[0]
    hx = act_buffers(d)
    ha = act_buffers(meta[_fu.M_H] * meta[_fu.M_HD])
    hh = act_buffers(hidden.shape[0])
    f = np.empty(d, dtype=np.float32)
    ctl[:] = 0
    for w in prange(nw):
        _work(x, pos, ctl, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk, wv, sv, bq, bk, bv, wo,
              so, bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab, gshifts, up_bias,
              down_bias, dq, ds, partial, hidden, h, qkv, rot, att, obuf, posarr, hx, ha, hh,
              f)
    return ctl[RC]


def takes(plan):
    """True when decode_layer_team takes a fused.plan_layer plan: a dense layer (no row
    skipping, no pruned matrices)."""
    meta, a = plan
    return (meta[_fu.M_SPARSE] == 0 and meta[_fu.M_QENC] < _sp.FUSED
            and meta[_fu.M_OENC] < _sp.FUSED and a["tab"][0, 1] < _sp.FUSED)
