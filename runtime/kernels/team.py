"""Decode of a token's layers by a team of threads in one parallel region.

fused.decode_layer forks and joins Numba's threads five times a layer (q/k/v, attention, o, the
FFN's rows, its down matrix). Numba's OpenMP workers wait passively (kernels/__init__.py): each
fork wakes a sleeping thread, and on a virtual machine whose idle vCPUs halt at once (this one:
guest halt polling off, docs/PERFORMANCE.md) every wake is an exit to the hypervisor, 45-80 us:
110 a TinyLlama token. decode_team runs a run of layers (every layer of a uniformly quantized
model) as one parallel region, one wake a token: each thread runs every layer's phases in order
and waits between them by spinning on a counter.

Each phase's units (rows, groups of 16 rows, heads) split in one share of contiguous units per
thread, claimed in chunks (at most CHUNKS a share, of at least CHUNK_BYTES): a thread takes its
own share's chunks from the front, then the other shares' from the back (_claim), so each core
streams its own rows in order (session 7's team took 32 KB chunks alternately and measured
slower: the cores' streams interleaved), no core idles while rows are left (waits: 3.4-5.0 ms of
both threads' time a TinyLlama int4 token with one part a thread, 0.55-0.7 with 32 chunks a
share), and a thread that starts late, or not at all, finds its share taken. Steps that write
shared state once (rotary and the KV-cache store) are one-part phases; steps that only read it
(the norms, the activations' quantization, the residual additions) run in every thread into its
own buffers, which saves a wait each. Each layer has its own shared buffers and counters, and
each thread its own copy of the residual stream: a thread may be layers ahead of a late one,
which still reads the outputs of the layer it is in.

Waits spin on an atomic load without the pause instruction, then yield: on this KVM guest a
loop of pauses exits to the hypervisor (pause-loop exiting; session 7 measured a token 42 ms
with pause, 35 without).

Every output element is computed by the same unit kernel as decode_layer's (fused.unit_dot,
ffn.packed_group, ffn.ffn_rows, attention.attend), whichever thread takes it, and the residual
updates are decode_layer's float operations in its order: the result is bit for bit
decode_layer's (tests/test_team.py). Taken: dense layers whose FFN down projection is a matrix
(packed or not); the rest run decode_layer (team_ok).
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.typed import List

from . import fused as _fu
from . import sparse as _sp
from .attention import attend
from .ffn import INT4R, NONE, ffn_rows, packed_group
from .norms import rmsnorm
from .simd import act_buffers, quantize_act

F16 = _fu.F16
P_QKV, P_ROPE, P_ATT, P_O, P_FFN, P_DOWN, NPHASES = range(7)
LINE = 8  # int64s a cache line: every counter on a line of its own
CHUNKS = 32  # chunks a thread's share of a phase is claimed in, at most,
CHUNK_BYTES = 64 << 10  # and of at least these many weight bytes (~3 us of a core's stream):
# a claim and its count each move a cache line between the cores
SPINS = 20000  # looks at the counter before a waiting thread yields its core


def ctl_len(T):
    """int64s of a layer's counters for T threads: a line per phase (the done count; rope's
    claim beside it), a line per phase and thread (the claims on that thread's share), a line
    for the return code (rc_at)."""
    return (NPHASES * (T + 1) + 1) * LINE


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
    """libc's sched_yield: the core to whatever else is runnable (the thread waited for, when
    the machine is busy)."""
    sig = types.int32()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(ir.IntType(32), []), "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


@intrinsic
def atomic_cas(typingctx, a, i, old, new):
    """a[i] = new if a[i] == old, atomically (a int64[:]); True when it was."""
    sig = types.boolean(a, types.int64, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        res = builder.cmpxchg(_slot(context, builder, sig.args[0], args[0], args[1]), args[2],
                              args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


@njit(cache=True)
def rc_at(T):
    return NPHASES * (T + 1) * LINE


@njit(cache=True)
def _done(ctl, p):
    atomic_add(ctl, LINE * p, 1)


@njit(cache=True)
def _wait(ctl, p, n):
    """Until n chunks of phase p are done: spin (no pause: see the module docstring), then
    yield the core between looks."""
    k = 0
    while atomic_load(ctl, LINE * p) < n:
        if k < SPINS:
            k += 1
        else:
            sched_yield()


@njit(cache=True)
def _share(n, T, r, ub):
    """Thread r's share of a phase's n units of ub bytes each, [lo, hi), and its count of
    chunks."""
    lo, hi = r * n // T, (r + 1) * n // T
    return lo, hi, min(CHUNKS, hi - lo, max(1, (hi - lo) * ub // CHUNK_BYTES))


@njit(cache=True)
def _chunks(n, T, ub):
    """Chunks of a phase of n units: what its wait counts to."""
    c = 0
    for r in range(T):
        c += _share(n, T, r, ub)[2]
    return c


@njit(cache=True)
def _bytes(a, n):
    """Bytes a unit of array a's n units."""
    return a.size * a.itemsize // max(1, n)


@njit(cache=True)
def _claim(ctl, p, n, ub, T, t, s):
    """The next chunk of phase p (n units of ub bytes) for thread t: (first unit, end, s). Step
    s = 0 takes chunks from the front of t's own share, s = 1.. from the back of thread (t + s)
    % T's (work a late thread has not begun), so each core walks its rows in order and no core
    idles while rows are left. (-1, -1, T) when none is left. A share's claims are one word,
    front count in the low half and back count in the high half, moved by compare-and-swap."""
    while s < T:
        r = (t + s) % T
        lo, hi, C = _share(n, T, r, ub)
        at = LINE * (NPHASES + p * T + r)
        while True:
            w = atomic_load(ctl, at)
            front, back = w & 0xFFFFFFFF, w >> 32
            if front + back >= C:
                break
            k = front if s == 0 else C - 1 - back
            if atomic_cas(ctl, at, w, w + (1 if s == 0 else 1 << 32)):
                return lo + k * (hi - lo) // C, lo + (k + 1) * (hi - lo) // C, s
        s += 1
    return -1, -1, T


@njit(cache=True)
def _norm_act(x, w, eps, h, xq, xs, xp, corr, quantize):
    """h = rmsnorm(x) (h may be x) and, if asked, its int8 forms."""
    d = x.shape[0]
    rmsnorm(x.reshape(1, d), w, eps, h.reshape(1, d))
    if quantize:
        quantize_act(h, xq, xs, xp, corr)


@njit(cache=True)
def _matrix(ctl, p, T, t, meta, m, w, s, x, acts, lut, out, fast):
    """Phase p, out = a matrix (its encoding, group shift, row and scale bytes at meta[m:m + 4])
    times x, in chunks: x quantized by thread t into its own acts; returns the chunks' count."""
    enc, gsh, qrow, srow = meta[m], meta[m + 1], meta[m + 2], meta[m + 3]
    xq, xs, xp, corr = acts[0][t], acts[1][t], acts[2][t], acts[3][t]
    if enc != F16:
        quantize_act(x, xq, xs, xp, corr)
    n = _fu.units(enc, out.shape[0])
    ub = _bytes(w, n)
    u0, u1, st = _claim(ctl, p, n, ub, T, t, 0)
    while u0 >= 0:
        for u in range(u0, u1):
            _fu.unit_dot(enc, gsh, qrow, srow, w, s, u, x, xq, xs, xp, corr, lut, out, 0, fast)
        _done(ctl, p)
        u0, u1, st = _claim(ctl, p, n, ub, T, t, st)
    return _chunks(n, T, ub)


@njit(cache=True)
def _residual(x, y, bias, has_bias):
    """x += y (+ bias): decode_layer's residual, x + (y + bias), in a thread's own copy."""
    if has_bias:
        for j in range(x.shape[0]):
            x[j] += y[j] + bias[j]
    else:
        for j in range(x.shape[0]):
            x[j] += y[j]


@njit(cache=True)
def _member(t, T, x, pos, ctl, th, ax, aa, ah, up, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk,
            wv, sv, bq, bk, bv, wo, so, bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab,
            gshifts, up_bias, down_bias, dq, ds, hidden, qkv, rot, att, obuf, posarr, f):
    """Thread t's run through one layer's phases; x is the thread's own copy of the residual
    stream, updated in place. False when the KV store failed (ctl[rc_at(T)] says why)."""
    d = x.shape[0]
    H, kvh, hd = meta[_fu.M_H], meta[_fu.M_KVH], meta[_fu.M_HD]
    nq, nk = H * hd, kvh * hd
    fast = meta[_fu.M_FAST] != 0
    h = th[t]
    xq, xs, xp, corr = ax[0][t], ax[1][t], ax[2][t], ax[3][t]

    enc, gsh, qrow, srow = (meta[_fu.M_QENC], meta[_fu.M_QSHIFT], meta[_fu.M_QROW],
                            meta[_fu.M_QSROW])
    _norm_act(x, anorm, eps, h, xq, xs, xp, corr, enc != F16)
    uq, uk = _fu.units(enc, nq), _fu.units(enc, nk)
    n = uq + 2 * uk
    ub = _bytes(wq, uq)
    u0, u1, st = _claim(ctl, P_QKV, n, ub, T, t, 0)
    while u0 >= 0:
        for u in range(u0, u1):
            if u < uq:
                _fu.unit_dot(enc, gsh, qrow, srow, wq, sq, u, h, xq, xs, xp, corr, lut, qkv, 0,
                             fast)
            elif u < uq + uk:
                _fu.unit_dot(enc, gsh, qrow, srow, wk, sk, u - uq, h, xq, xs, xp, corr, lut, qkv,
                             nq, fast)
            else:
                _fu.unit_dot(enc, gsh, qrow, srow, wv, sv, u - uq - uk, h, xq, xs, xp, corr, lut,
                             qkv, nq + nk, fast)
        _done(ctl, P_QKV)
        u0, u1, st = _claim(ctl, P_QKV, n, ub, T, t, st)
    _wait(ctl, P_QKV, _chunks(n, T, ub))

    rc = rc_at(T)
    if atomic_add(ctl, LINE * P_ROPE + 1, 1) == 0:  # the first thread here
        if not _fu.rope_store(meta, qkv, bq, bk, bv, pos, cos, sin, posarr, rot, kc, vc, ksc,
                              vsc, kvlut, blk):
            ctl[rc] = _fu.F16_RANGE
        _done(ctl, P_ROPE)
    _wait(ctl, P_ROPE, 1)
    if atomic_load(ctl, rc) != _fu.OK:
        return False

    qr = rot[:nq].reshape(1, H, hd)
    a3 = att.reshape(1, H, hd)
    ub = 2 * (pos + 1) * hd * kc.itemsize  # a head's keys and values so far
    u0, u1, st = _claim(ctl, P_ATT, kvh, ub, T, t, 0)
    while u0 >= 0:
        for u in range(u0, u1):
            attend(u, qr, kc, vc, ksc, vsc, kvlut, meta[_fu.M_SIMD], pos, a3)
        _done(ctl, P_ATT)
        u0, u1, st = _claim(ctl, P_ATT, kvh, ub, T, t, st)
    _wait(ctl, P_ATT, _chunks(kvh, T, ub))

    _wait(ctl, P_O, _matrix(ctl, P_O, T, t, meta, _fu.M_OENC, wo, so, att, aa, lut, obuf, fast))
    _residual(x, obuf, bo, meta[_fu.M_O_BIAS])

    _norm_act(x, fnorm, eps, h, xq, xs, xp, corr, True)
    kind, gated = meta[_fu.M_KIND], meta[_fu.M_GATED] != 0
    has_bias = meta[_fu.M_UP_BIAS] != 0
    packed = tab[0, 1] == INT4R
    n = bundles.shape[0]
    ub = _bytes(bundles, n)
    r0, r1, st = _claim(ctl, P_FFN, n, ub, T, t, 0)
    while r0 >= 0:
        if packed:
            for g in range(r0, r1):
                packed_group(g, d // 32, xq, corr, xs, bundles, tab[1], tab[2], tab[1, 2],
                             gshifts[1], kind, gated, up_bias, has_bias, lut, hidden, up[t],
                             fast)
        else:
            ffn_rows(h, xq, xs, xp, corr, bundles, r0, r1, tab[0], tab[1], tab[2], gshifts, d,
                     kind, gated, up_bias, has_bias, lut, f, hidden, fast)
        _done(ctl, P_FFN)
        r0, r1, st = _claim(ctl, P_FFN, n, ub, T, t, st)
    _wait(ctl, P_FFN, _chunks(n, T, ub))

    _wait(ctl, P_DOWN, _matrix(ctl, P_DOWN, T, t, meta, _fu.M_DENC, dq, ds, hidden, ah, lut, f,
                               fast))
    _residual(x, f, down_bias, meta[_fu.M_DOWN_BIAS])
    return True


@njit(cache=True)
def _run(t, T, x, pos, layers, ctl, xt, th, ax, aa, ah, up):
    """Thread t through every layer of the run, on its own copy of the residual stream."""
    xs = xt[t]
    for j in range(x.shape[0]):
        xs[j] = x[j]
    mine = layers[t]
    for i in range(len(mine)):
        if not _member(t, T, xs, pos, ctl[i], th, ax, aa, ah, up, *mine[i]):
            return


# prange only: with parallel=True each array expression here (ctl[:] = 0, x[:] = xt[0]) becomes
# a parallel loop of its own, a wake of the other thread each (measured: 170 us a layer call)
@njit(cache=True, parallel=dict(comprehension=False, reduction=False, inplace_binop=False,
                                setitem=False, numpy=False, stencil=False, fusion=False))
def decode_team(x, pos, layers, ctl, xt, th, ax, aa, ah, up):
    """fused.decode_layer for a run of team_ok layers in one parallel region of th.shape[0]
    threads (layers: for each thread a typed List of the layers' arguments, Team.layer; ctl: a
    row of counters a layer; xt, th, ax, aa, ah, up: each thread's own buffers, Team); x f32[d]
    is updated in place, bit for bit as decode_layer does it layer after layer. Returns OK or
    the first layer's error."""
    T = th.shape[0]
    for i in range(ctl.shape[0]):
        for j in range(ctl.shape[1]):
            ctl[i, j] = 0
    for t in prange(T):
        _run(t, T, x, pos, layers, ctl, xt, th, ax, aa, ah, up)
    for i in range(ctl.shape[0]):
        # an atomic load: a plain one was compiled as the 0 stored above (LLVM does not see the
        # region's threads write ctl), and the error went unreported
        rc = atomic_load(ctl[i], rc_at(T))
        if rc != _fu.OK:
            return rc
    for j in range(x.shape[0]):
        x[j] = xt[0, j]
    return _fu.OK


def layer_lists(run, T):
    """decode_team's `layers` for a run of layers' argument tuples: a typed List a thread, each
    unboxing its own reference counts for the arrays (one shared list, bumped by both threads
    at each layer, had 44% of SmolLM2's perf samples in NRT_incref / NRT_decref). Built by
    cached functions: numba.typed.List(run) compiles its methods for the item type in every
    process (0.8 s for SmolLM2, all of it in the first decoded token), these load in ~15 ms."""
    lists = []
    for _ in range(T):
        lst = _list_of(run[0])
        for item in run[1:]:
            _append(lst, item)
        lists.append(lst)
    return tuple(lists)


@njit(cache=True)
def _list_of(item):
    lst = List()
    lst.append(item)
    return lst


@njit(cache=True)
def _append(lst, item):
    lst.append(item)


def team_ok(meta, a):
    """Whether decode_team takes a planned layer (fused.plan_layer's meta and arrays):
    dense q/k/v and o of any SIMD encoding, an FFN of every row with its down projection a
    matrix (not pruned, no row skipping, no TEAL)."""
    return (meta[_fu.M_QENC] < _sp.FUSED and meta[_fu.M_OENC] < _sp.FUSED
            and meta[_fu.M_SPARSE] == 0 and meta[_fu.M_DENC] != NONE
            and a["tab"][0, 1] < _sp.FUSED)


def enabled():
    """Whether teams are used (EDGELLM_NO_TEAM=1 keeps decode_layer: comparisons, debugging)."""
    return os.environ.get("EDGELLM_NO_TEAM", "") != "1"


class Team:
    """decode_team's buffers for T threads (Scratch.team): each thread's own (its copy of the
    residual stream, the normed input and its int8 forms, the FFN's up values; FFNs of n rows)
    and each layer's shared ones (q/k/v, attention, o and FFN outputs, counters). A layer's
    shared buffers are its own: a thread may run layers ahead of a late one, which still reads
    the outputs of the layer it is in."""

    def __init__(self, T, cfg, n):
        d, nq, nk, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, \
            cfg.n_layers

        def rows(length):
            return tuple(np.stack([b] * T) for b in act_buffers(length))

        self.xt = np.empty((T, d), np.float32)
        self.h = np.empty((T, d), np.float32)
        self.ax, self.aa, self.ah = rows(d), rows(nq), rows(n)
        self.up = np.empty((T, n), np.float32)
        self.hidden = np.empty((L, n), np.float32)
        self.qkv = np.empty((L, nq + 2 * nk), np.float32)
        self.rot = np.empty((L, nq + nk), np.float32)
        self.att = np.empty((L, nq), np.float32)
        self.obuf = np.empty((L, d), np.float32)
        self.posarr = np.zeros((L, 1), np.int64)
        self.f = np.empty((L, d), np.float32)
        self.ctl = np.zeros((L, ctl_len(T)), np.int64)

    def layer(self, i):
        """Layer i's shared buffers, the end of its arguments to decode_team."""
        return (self.hidden[i], self.qkv[i], self.rot[i], self.att[i], self.obuf[i],
                self.posarr[i], self.f[i])

    def threads(self):
        return self.xt, self.h, self.ax, self.aa, self.ah, self.up
