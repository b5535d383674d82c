"""KV cache encodings side by side: error against f32, memory per token, decode speed.

    python benchmarks/kvcache.py [MODEL_DIR ...] [--tokens 300] [--decode 128]
    NUMBA_NUM_THREADS=1 python benchmarks/kvcache.py --kernel

For each model (default: the demo model): a text of --tokens tokens sampled from the model
itself (temperature 1, seed 0, f32 cache) is run teacher-forced with each cache encoding; the
logits at every position are compared with the f32 cache's: max |difference|, that over the
largest |logit|, and how often the top-1 token agrees. Then greedy decode speed with each
encoding after a prompt of half the context, interleaved (ratios in one run are what to read:
timings on a shared machine are indicative). docs/INTERNALS.md ("KV cache") has the figures.
--kernel times the attention kernel alone, one decode query over a full cache, per encoding.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

import edgellm
from edgellm.cli import demo_model_path
from edgellm.runtime import kvcache


def sample_text(model, n, seed=0):
    """n token ids: the model's own continuation of its BOS (temperature 1, window off)."""
    bos = model.tokenizer.bos_id if model.tokenizer.bos_id is not None else 0
    text = [bos]
    while len(text) < n:
        model.complete(text, max_tokens=n - len(text), temperature=1.0, top_k=0, top_p=1.0,
                       min_p=0.0, repetition_penalty=1.0, seed=seed + len(text),
                       context_shift=False)
        text += model.last_stats["token_ids"] or [bos]  # an EOS at once: start again
    return text[:n]


def teacher_forced(path, ids, kv):
    m = edgellm.load(path, kv=kv, n_ctx=len(ids))
    return m.logits(ids)


def errors(path, n):
    ref_model = edgellm.load(path, kv="f32")
    n = min(n, ref_model.n_ctx)
    ids = sample_text(ref_model, n)
    base = teacher_forced(path, ids, "f32")
    top = base.argmax(-1)
    out = {"positions": n}
    for kv in ("f16", "int8"):
        lg = teacher_forced(path, ids, kv)
        d = np.abs(lg - base)
        out[kv] = {"max_abs": float(d.max()), "max_rel": float(d.max() / np.abs(base).max()),
                   "top1_agree": float((lg.argmax(-1) == top).mean())}
    return out


def decode_speed(path, n_decode, reps=3):
    models = {kv: edgellm.load(path, kv=kv) for kv in kvcache.ENCODINGS}
    n_ctx = next(iter(models.values())).n_ctx
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, n_ctx // 2)]
    speeds = {kv: [] for kv in models}
    for m in models.values():
        m.warmup()
    for _ in range(reps):
        for kv, m in models.items():
            m.complete(prompt, max_tokens=min(n_decode, n_ctx - len(prompt) - 1), temperature=0,
                       context_shift=False)
            s = m.last_stats
            speeds[kv].append(s["decode_tokens"] / s["decode_s"])
    return {"n_ctx": n_ctx, "prompt": len(prompt),
            **{kv: round(max(v), 1) for kv, v in speeds.items()}}


def kernel_times(reps=20):
    """Microseconds per attention call (best of reps) for (H, KVH, hd, positions) shapes."""
    from edgellm.runtime import kernels

    rng = np.random.default_rng(0)
    out = {}
    for H, kvh, hd, C in [(4, 2, 64, 512), (9, 3, 64, 2048), (32, 4, 64, 2048)]:
        q = rng.standard_normal((1, H, hd)).astype(np.float32)
        cfg = argparse.Namespace(n_kv_heads=kvh, head_dim=hd, n_layers=1)
        times = {}
        for kv in kvcache.ENCODINGS:
            c = kvcache.KVCache(cfg, C, kv)
            c.store(0, 0, rng.standard_normal((C, kvh, hd)).astype(np.float32),
                    rng.standard_normal((C, kvh, hd)).astype(np.float32))
            kc, vc, ks, vs = c.layer(0)
            kernels.attention(q, kc, vc, C - 1, ks, vs)
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(10):
                    kernels.attention(q, kc, vc, C - 1, ks, vs)
                best = min(best, (time.perf_counter() - t) / 10)
            times[kv] = round(best * 1e6)
        out[f"H{H} KVH{kvh} hd{hd} n{C}"] = times
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help="model directories (default: the demo model)")
    ap.add_argument("--tokens", type=int, default=300, help="teacher-forced positions")
    ap.add_argument("--decode", type=int, default=128, help="tokens decoded per speed run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="time the attention kernel alone")
    a = ap.parse_args()
    if a.kernel:
        for shape, t in kernel_times().items():
            print(f"{shape:24} " + ", ".join(f"{kv} {us} us" for kv, us in t.items()))
        print(f"(load average {os.getloadavg()[0]:.2f}: timings indicative)")
        return
    report = {"load_average": os.getloadavg()[0], "models": {}}
    for path in a.models or [demo_model_path()]:
        cfg = edgellm.load(path).config
        t = time.perf_counter()
        r = {"bytes_per_token": {kv: kvcache.bytes_per_token(cfg, kv) for kv in kvcache.ENCODINGS},
             "error": errors(path, a.tokens), "decode_tokens_per_s": decode_speed(path, a.decode)}
        r["seconds"] = round(time.perf_counter() - t, 1)
        report["models"][path] = r
        if not a.json:
            print(f"{path}: {cfg.n_layers} layers, {cfg.n_kv_heads} kv heads x {cfg.head_dim}")
            e = r["error"]
            print(f"  error vs f32 over {e['positions']} teacher-forced positions:")
            for kv in ("f16", "int8"):
                print(f"    {kv:5} max |dlogit| {e[kv]['max_abs']:.2e} "
                      f"({e[kv]['max_rel']:.1e} of max |logit|), top-1 agreement "
                      f"{100 * e[kv]['top1_agree']:.1f}%")
            print("  bytes per token: " + ", ".join(f"{k} {v}" for k, v in
                                                    r["bytes_per_token"].items()))
            s = r["decode_tokens_per_s"]
            print(f"  decode tokens/s after a {s['prompt']}-token prompt: "
                  + ", ".join(f"{kv} {s[kv]}" for kv in kvcache.ENCODINGS))
    if a.json:
        json.dump(report, sys.stdout, indent=2)
    else:
        print(f"(load average {report['load_average']:.2f}: timings indicative)")


if __name__ == "__main__":
    main()
