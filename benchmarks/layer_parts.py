"""Where a decoded token's time goes, part by part, dense and with resident row skipping
(runtime/rowskip.py): a script, not a test.

The fused decode (kernels/fused.decode_layer: one Numba call a layer) is replaced for the run by a
copy that reads the CPU's cycle counter between its parts (norms, q/k/v, rope + KV store,
attention, o, the FFN's predictor and rows), so the parts are timed inside the call with nothing
added around them; the call's time from Python minus its parts is the call's dispatch (Numba
unboxing ~50 arguments). The rest of the token: the final norm and head (timed from Python, with
their wrappers) and the forward pass's own Python (embedding, checks). Medians over --gen tokens
of the per-token sums; wall time (cycle counter and perf_counter: on a loaded machine run it at
1 thread and read the medians).

    NUMBA_NUM_THREADS=1 python benchmarks/layer_parts.py MODEL [--gen 64] [--sparse]
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

import edgellm
from edgellm.runtime import kernels, rowskip
from edgellm.runtime.kernels import fused
from edgellm.runtime.kernels.attention import attention
from edgellm.runtime.kernels.ffn import ffn_decode_simd
from edgellm.runtime.kernels.norms import rmsnorm
from edgellm.runtime.kernels.rope import apply_rope

PARTS = ("attn norm", "q,k,v", "rope + KV store", "attention", "o + residual", "ffn norm",
         "FFN predictor", "FFN rows (+ down)", "FFN residual")


@intrinsic
def cycles(typingctx):
    sig = types.int64()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])

    return sig, codegen


@njit
def layer_parts(x, pos, blk, meta, eps, anorm, fnorm, wq, sq, wk, sk, wv, sv, bq, bk, bv, wo, so,
                bo, cos, sin, kc, vc, ksc, vsc, kvlut, lut, bundles, tab, gshifts, up_bias,
                down_bias, dq, ds, partial, hidden, h, qkv, rot, att, obuf, posarr, pa, pb,
                pbias, thr, z, scores, rows, kept, gq, gs, gvals, tl, t):
    """fused.decode_layer for the layers the profile meets (int8/int4 q, k, v, o; float32 KV
    cache; FFN dense or over a low-rank predictor's rows), t[part] += cycles."""
    d = x.shape[0]
    H, kvh, hd = meta[fused.M_H], meta[fused.M_KVH], meta[fused.M_HD]
    nq, nk = H * hd, kvh * hd
    fast = meta[fused.M_FAST] != 0
    x2 = x.reshape(1, d)
    h2 = h.reshape(1, d)
    c0 = cycles()
    rmsnorm(x2, anorm, eps, h2)
    c1 = cycles()
    t[0] += c1 - c0
    q = qkv[:nq]
    k = qkv[nq:nq + nk]
    v = qkv[nq + nk:nq + 2 * nk]
    fused.qkv_proj(meta, wq, sq, wk, sk, wv, sv, h, lut, q, k, v, fast)
    c2 = cycles()
    t[1] += c2 - c1
    posarr[0] = pos
    qr = rot[:nq].reshape(1, H, hd)
    kr = rot[nq:nq + nk].reshape(1, kvh, hd)
    apply_rope(q.reshape(1, H, hd), cos, sin, posarr, qr)
    apply_rope(k.reshape(1, kvh, hd), cos, sin, posarr, kr)
    v3 = v.reshape(1, kvh, hd)
    for j in range(kvh):
        for i in range(hd):
            kc[j, pos, i] = kr[0, j, i]
            vc[j, pos, i] = v3[0, j, i]
    c3 = cycles()
    t[2] += c3 - c2
    a3 = att.reshape(1, H, hd)
    attention(qr, kc, vc, ksc, vsc, kvlut, meta[fused.M_SIMD], pos, a3)
    c4 = cycles()
    t[3] += c4 - c3
    fused.matvec1(meta[fused.M_OENC], meta[fused.M_OSHIFT], meta[fused.M_OROW],
                  meta[fused.M_OSROW], wo, so, att, lut, obuf, fast)
    x += obuf
    c5 = cycles()
    t[4] += c5 - c4
    rmsnorm(x2, fnorm, eps, h2)
    c6 = cycles()
    t[5] += c6 - c5
    mode = meta[fused.M_SPARSE]
    if mode == 0:
        c7 = c6
        f = ffn_decode_simd(h, bundles, tab[0], tab[1], tab[2], gshifts, d, meta[fused.M_KIND],
                            meta[fused.M_GATED] != 0, up_bias, meta[fused.M_UP_BIAS] != 0, lut,
                            partial, hidden, dq, ds, meta[fused.M_DENC], meta[fused.M_DSHIFT],
                            meta[fused.M_DROW], meta[fused.M_DSROW], fast)
    else:
        kept[1] += 1
        nrows = fused.predict_rows(h, pa, pb, pbias, thr, lut, z, scores, rows, fast)
        c7 = cycles()
        f = fused.ffn_decode_sparse(h, bundles, rows, nrows, True, thr, gvals, False, tab[0],
                                    tab[1], tab[2], gshifts, d, meta[fused.M_KIND],
                                    meta[fused.M_GATED] != 0, up_bias, meta[fused.M_UP_BIAS] != 0,
                                    lut, partial, hidden, dq, ds, meta[fused.M_DENC],
                                    meta[fused.M_DSHIFT], meta[fused.M_DROW],
                                    meta[fused.M_DSROW], fast, kept)
    c8 = cycles()
    t[6] += c7 - c6
    t[7] += c8 - c7
    x += f
    t[8] += cycles() - c8
    return fused.OK


def cycles_per_second():
    @njit
    def read():
        return cycles()

    read()
    c0, t0 = read(), time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        pass
    return (read() - c0) / (time.perf_counter() - t0)


def profile(rt, prompt, n):
    """Per-token medians (ms) of each part, of the layer calls' dispatch, the head and the rest."""
    hz = cycles_per_second()
    t = np.zeros(len(PARTS), np.int64)
    acc = {"calls": 0.0, "head": 0.0, "matvec": 0.0}
    real, real_matvec = fused.decode_layer, kernels._matvec

    def timed_layer(*a):
        s = time.perf_counter()
        r = layer_parts(*a, t)
        acc["calls"] += time.perf_counter() - s
        return r

    def matvec(*a):  # the head's kernel (the layers' matvecs are inside the fused calls)
        s = time.perf_counter()
        r = real_matvec(*a)
        acc["matvec"] += time.perf_counter() - s
        return r

    logits_of = rt._logits

    def head(*a):
        s = time.perf_counter()
        r = logits_of(*a)
        acc["head"] += time.perf_counter() - s
        return r

    rows = {k: [] for k in PARTS + ("layer calls' dispatch", "final norm + head",
                                    "(of which the head's matvec kernel)",
                                    "forward's Python (embed, checks)", "whole token")}
    fused.decode_layer = timed_layer
    kernels._matvec = matvec
    rt._logits = head
    # the parts are decode_layer's: no team (kernels/team.py), no call prepared before the swap
    os.environ["EDGELLM_NO_TEAM"] = "1"
    if rt._fused_plans is not None:
        rt._fused_plans[2][:] = [None] * len(rt._fused_plans[2])
    try:
        rt.reset()
        tok = int(np.argmax(rt.forward(prompt)[-1]))
        for step in range(n + 4):
            t[:] = 0
            acc["calls"] = acc["head"] = acc["matvec"] = 0.0
            s = time.perf_counter()
            tok = int(np.argmax(rt.forward([tok])[-1]))
            whole = time.perf_counter() - s
            if step < 4:  # compiles, warms
                continue
            parts = t / hz
            for k, v in zip(PARTS, parts):
                rows[k].append(v)
            rows["layer calls' dispatch"].append(acc["calls"] - parts.sum())
            rows["final norm + head"].append(acc["head"])
            rows["(of which the head's matvec kernel)"].append(acc["matvec"])
            rows["forward's Python (embed, checks)"].append(whole - acc["calls"] - acc["head"])
            rows["whole token"].append(whole)
    finally:
        fused.decode_layer = real
        kernels._matvec = real_matvec
        del rt._logits
    return {k: statistics.median(v) * 1e3 for k, v in rows.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded and profiled")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = edgellm.load(args.model, threads=1, kv="f32")
    rt = model.runtime
    prompt = list(range(5, 5 + args.prompt))
    runs = {"dense": [], "sparse": []}
    for _ in range(args.repeats):
        rowskip.disable(rt)
        runs["dense"].append(profile(rt, prompt, args.gen))
        if rowskip.enable(rt):
            runs["sparse"].append(profile(rt, prompt, args.gen))
    med = {k: {p: statistics.median(r[p] for r in v) for p in v[0]} for k, v in runs.items() if v}
    keys = list(med["dense"])
    print("| part | " + " | ".join(f"{k} ms" for k in med) + " |")
    print("|---|" + "---|" * len(med))
    for p in keys:
        print(f"| {p} | " + " | ".join(f"{med[k][p]:.4f}" for k in med) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "median": med, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
