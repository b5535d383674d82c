"""FFN row skipping with everything resident (runtime/rowskip.py): quality and speed together,
against the dense model in the same process (a script, not a test; nothing is asserted).

For a model with predictors (ReLU: `--predictor`), magnitude thresholds (SiLU: `--calib ...
--sparsity S`) or TEAL input thresholds (`--sparsity-mode teal`, runtime/teal.py; give
--dense-model, the same weights converted without calibration, for the dense FFN and decode):

- quality: perplexity over --tokens of --text in disjoint windows of --ctx, dense vs sparse (the
  sparse model runs every position through the skipping FFN); top-1 agreement with dense at
  every position of those windows (teacher-forced);
- rows computed per token (fraction of d_ff, mean over layers; the predictor's rows, or the
  rows above the threshold; TEAL: the fraction of the FFN's weight bytes read, (2 x inputs
  kept + down rows read) / 3, both also reported);
- FFN time: every layer's FFN inputs recorded during a decode, then the dense kernel and the
  skipping kernel (predictor included) run on them alternately, --repeats times; medians;
- decode time per token (fused decode, greedy, --gen tokens): a dense and a sparse runtime
  (--dense-model: another model's) decode in turn, --repeats times; medians.

--clock cpu times in the main thread's CPU time (with --threads 1 the kernels run in the calling
thread: other processes' load is left out); wall is wall time.

    python benchmarks/sparse.py MODEL --text ~/.cache/edgellm-demo/text/heldout.txt --threads 1
"""

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

import edgellm
from edgellm.runtime import rowskip, teal
from edgellm.runtime.kernels import fused
from edgellm.runtime.model import ResidentFFN


def windows(model, text, ctx, n_tokens):
    tok = model.tokenizer
    ids = tok.encode(text, add_bos=False)[:n_tokens]
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    step = ctx - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids) - 1, step) if len(ids[i:i + step]) > 1]


def logits_over(rt, wins):
    out = []
    for w in wins:
        rt.reset()
        out.append(rt.forward(w, all_logits=True))
    return out


def ppl(wins, logits):
    nll, n = 0.0, 0
    for w, lg in zip(wins, logits):
        lg = lg[:-1].astype(np.float64)
        m = lg.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1)))
        tgt = np.asarray(w[1:])
        nll += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
        n += len(tgt)
    return math.exp(nll / n)


def decode_ms(rts, prompt, n, clock):
    """ms per greedy decode step of each runtime in rts (each with its own cache), stepped in
    turn token by token."""
    toks, tot = [], [0.0] * len(rts)
    for rt in rts:
        rt.reset()
        toks.append(int(np.argmax(rt.forward(prompt)[-1])))
    for _ in range(n):
        for k, rt in enumerate(rts):
            t = clock()
            toks[k] = int(np.argmax(rt.forward([toks[k]])[-1]))
            tot[k] += clock() - t
    return [x / n * 1e3 for x in tot]


def ffn_times(rt, dense_rt, prompt, n, repeats, clock):
    """Record each layer's FFN inputs over n decode steps, then time dense vs skipping kernels
    on them (ms per token, all layers). The dense kernel: the skipping FFN's base, or (TEAL)
    dense_rt's FFN of the same layer."""
    rec = [[] for _ in rt.layers]
    saved = [L.ffn for L in rt.layers]

    class Rec:
        def __init__(self, i, f):
            self.i, self.f = i, f

        def __call__(self, h):
            if h.shape[0] == 1:
                rec[self.i].append(np.array(h[0]))
            return self.f(h)

    for i, L in enumerate(rt.layers):
        L.ffn = Rec(i, L.ffn)
    rt.fused = False
    decode_ms([rt], prompt, n, time.perf_counter)
    rt.fused = True
    for L, f in zip(rt.layers, saved):
        L.ffn = f
    calls = []
    for i, L in enumerate(rt.layers):
        skip = L.ffn
        if isinstance(skip, teal.TealFFN):
            meta_s = np.zeros(fused.M_LEN, np.int64)
            a = fused.plan_ffn(rt.cfg, skip, ResidentFFN, meta_s)
            base = dense_rt.layers[i].ffn
        else:
            a, meta_s, base = skip.arrays, skip.meta, skip.base
        meta_d = np.zeros(fused.M_LEN, np.int64)
        dense = fused.plan_ffn(rt.cfg, base, ResidentFFN, meta_d)
        meta_d.flags.writeable = False
        s = fused.Scratch(rt.cfg)
        for meta, arr, key in ((meta_d, dense, "dense"), (meta_s, a, "sparse")):
            hid = s.hidden(arr["n"] if arr["dq"] is not fused._EMPTY_U16 else 1)
            calls.append((key, i, meta, arr, s, hid))
    for k, i, meta, a, s, hid in calls:  # compiles (the first timed pass held one)
        fused.ffn_call(rec[i][0], meta, a, s.partial(a["n"]), hid)
    times = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for key in ("dense", "sparse"):
            tot = 0.0
            # token by token, every layer in turn, as a decode reads them: a model larger than
            # the caches comes from memory (layer by layer over all tokens would time cached
            # weights)
            for tk in range(n):
                for k, i, meta, a, s, hid in calls:
                    if k != key:
                        continue
                    part = s.partial(a["n"])
                    t = clock()
                    fused.ffn_call(rec[i][tk], meta, a, part, hid)
                    tot += clock() - t
            times[key].append(tot / n * 1e3)
    return times


def scale(rt, s, shift=0.0, s_hid=None):
    """Thresholds of the SiLU layers times s, of the low-rank predictors plus shift (their
    plans made again); TEAL's hidden thresholds times s_hid (default s)."""
    if s == 1.0 and shift == 0.0 and s_hid is None:
        return
    for L in rt.layers:
        f = L.ffn
        if isinstance(f, teal.TealFFN):
            f.scale_thresholds(s, s_hid)  # the kernel reads f.thr: nothing to plan again
        if isinstance(f, rowskip.SkipFFN):
            t = f.sparse["thr"] * s if f.sparse["mode"] == 3 else f.sparse["thr"] + shift
            f.sparse["thr"] = f.arrays["thr"] = np.float32(t)
            L.ffn = rowskip.SkipFFN.__new__(rowskip.SkipFFN)  # a new object: re-planned
            L.ffn.__dict__.update(f.__dict__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text for perplexity")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--thr-scale", type=float, default=1.0,
                    help="SiLU: multiply the stored thresholds by this (a sparsity sweep without "
                         "calibrating again)")
    ap.add_argument("--teal-hidden-scale", type=float, default=None,
                    help="TEAL: multiply the stored hidden (down input) thresholds by this "
                         "instead (-1: keep every hidden value, thresholds on the FFN input only)")
    ap.add_argument("--pred-shift", type=float, default=0.0,
                    help="ReLU: add this to the low-rank predictors' score thresholds (fewer rows "
                         "computed for a positive shift, at a cost in recall)")
    ap.add_argument("--dense-model", help="time dense decode on this model instead (e.g. the "
                    "same weights converted without calibration: bundles holding the gates)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    model = edgellm.load(args.model, threads=args.threads, kv="f32")
    rt = model.runtime
    wins = windows(model, open(args.text, encoding="utf-8").read(), args.ctx, args.tokens)
    dense_logits = logits_over(rt, wins)
    n_teal = teal.enable(rt, prefill="sparse")
    n_layers = n_teal or rowskip.enable(rt, prefill="sparse")
    if not n_layers:
        raise SystemExit(f"{args.model}: no layer has a predictor or threshold")
    if n_teal and not args.dense_model:
        raise SystemExit(f"{args.model}: TEAL thresholds: give --dense-model (the same weights "
                         f"converted without calibration) for the dense kernels")
    scale(rt, args.thr_scale, args.pred_shift, args.teal_hidden_scale)
    sparse_logits = logits_over(rt, wins)
    if n_teal:
        kept = [f for f in teal.stats(rt) if f is not None]
        frac = [(2 * a + b) / 3 for a, b in kept]
    else:
        kept = None
        frac = [f for f in rowskip.stats(rt) if f is not None]
    agree = np.mean(np.concatenate([a.argmax(1) == b.argmax(1)
                                    for a, b in zip(dense_logits, sparse_logits)]))
    p_dense, p_sparse = ppl(wins, dense_logits), ppl(wins, sparse_logits)
    prompt = wins[0][:64]
    # a second runtime over the same mapped weights, dense; the two decode in turn, a whole run
    # each (token by token in step, their caches and buffers evicted each other's: the demo's
    # dense token went from 0.47 to 0.72 ms)
    dense_rt = edgellm.load(args.dense_model or args.model, threads=args.threads,
                            kv="f32").runtime
    ffn = ffn_times(rt, dense_rt, prompt, args.gen, args.repeats, clock)
    dec = {"dense": [], "sparse": []}
    decode_ms([dense_rt, rt], prompt, 2, clock)  # compiles (the first run timed a compile)
    for _ in range(args.repeats):
        dec["dense"] += decode_ms([dense_rt], prompt, args.gen, clock)
        dec["sparse"] += decode_ms([rt], prompt, args.gen, clock)
    med = {k: {p: statistics.median(v[p]) for p in v} for k, v in (("ffn", ffn),
                                                                      ("decode", dec))}
    out = {"model": args.model, "dense_model": args.dense_model, "threads": args.threads, "clock": args.clock,
           "thr_scale": args.thr_scale, "pred_shift": args.pred_shift,
           "teal_hidden_scale": args.teal_hidden_scale,
           "tokens": sum(len(w) - 1 for w in wins), "layers_skipping": n_layers,
           "rows_computed_fraction": float(np.mean(frac)),
           "rows_computed_by_layer": [round(float(f), 4) for f in frac],
           "teal_inputs_kept": float(np.mean([a for a, _ in kept])) if kept else None,
           "teal_down_rows_read": float(np.mean([b for _, b in kept])) if kept else None,
           "ppl_dense": p_dense, "ppl_sparse": p_sparse,
           "ppl_change_pct": 100 * (p_sparse / p_dense - 1), "top1_agreement": float(agree),
           "ffn_ms_per_token": med["ffn"],
           "ffn_speedup": med["ffn"]["dense"] / med["ffn"]["sparse"],
           "decode_ms_per_token": med["decode"],
           "decode_speedup": med["decode"]["dense"] / med["decode"]["sparse"],
           "ffn_ms_all": ffn, "decode_ms_all": dec}
    print(f"| model | rows computed | ppl dense -> sparse | top-1 agreement | FFN ms/token dense "
          f"/ sparse (x) | decode ms/token dense / sparse (x) |\n|---|---|---|---|---|---|\n"
          f"| {args.model} | {out['rows_computed_fraction']:.1%} | {p_dense:.3f} -> "
          f"{p_sparse:.3f} ({out['ppl_change_pct']:+.2f}%) | {agree:.2%} | "
          f"{med['ffn']['dense']:.2f} / {med['ffn']['sparse']:.2f} ({out['ffn_speedup']:.2f}x) | "
          f"{med['decode']['dense']:.2f} / {med['decode']['sparse']:.2f} "
          f"({out['decode_speedup']:.2f}x) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
