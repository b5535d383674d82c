"""Quantization methods side by side on one source: perplexity, size, bytes per token, decode
cost and conversion time for f16, int8, int4 RTN/GPTQ/AWQ, int3 RTN/GPTQ, W8A8 (SmoothQuant and
its unsmoothed baseline), low-rank attention, 50% and 2:4 magnitude/Wanda/SparseGPT pruning
with int8 values (and the f32 reference: the source's own weights,
dequantized).

    python benchmarks/quant.py SRC --out /tmp/quant [--max-tokens 8192] [--calib-tokens 8192]
           [--only "int4 GPTQ,int3 RTN"] [--json rows.jsonl]
    python benchmarks/quant.py smollm2 ...   # the SmolLM2-135M GGUF of edgellm.models
    python benchmarks/quant.py demo ...      # the demo model, exported to HF first (int8 weights)

Run with NUMBA_NUM_THREADS=1 (and OMP/OPENBLAS_NUM_THREADS=1) for per-core figures.
Perplexity: edgellm.evaluate on the shipped held-out text (ctx 512, stride 256), which runs the
prefill path (float32 activations into every linear); decode-path perplexity: the first
--decode-tokens tokens fed one at a time through the decode kernels (int8 activations). Bytes per token:
the weights a dense decode step reads (every layer chunk plus the head). Decode: CPU time (process
time) per greedy token, best of 3 runs of 16 tokens after a short prompt (on a shared machine wall
time says little); tok/s = 1000 / ms. Each converted model is kept in --out and reused.
"""

import argparse
import json
import math
import os
import sys
import time

VARIANTS = [  # (name, quant, method, extra convert kwargs); the comparisons that matter first
    ("f32 (reference)", "f32", "rtn", {}), ("int4 RTN", "int4", "rtn", {}),
    ("int4 GPTQ", "int4", "gptq", {}), ("int4 AWQ", "int4", "awq", {}),
    ("int3 RTN", "int3", "rtn", {}), ("int3 GPTQ", "int3", "gptq", {}),
    ("f16", "f16", "rtn", {}), ("int8", "int8", "rtn", {}),
    ("W8A8 per-token", "int8", "w8a8", {}), ("W8A8 SmoothQuant", "int8", "smoothquant", {}),
    ("int8 low-rank 0.5", "int8", "rtn", {"low_rank": 0.5}),
    ("int4 RTN low-rank 0.5", "int4", "rtn", {"low_rank": 0.5}),
    ("int4 GPTQ low-rank 0.5", "int4", "gptq", {"low_rank": 0.5}),
    ("int4 AWQ low-rank 0.5", "int4", "awq", {"low_rank": 0.5}),
    ("W8A8 SmoothQuant low-rank 0.5", "int8", "smoothquant", {"low_rank": 0.5}),
] + [(f"{pat} {m}" if pat == "2:4" else f"50% {m}", "int8", "rtn", {"prune": (m, pat)})
     for pat in ("0.5", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]  # sp50/sp24_int8


def source(arg, out):
    if arg == "smollm2":
        from edgellm.models import smollm2_gguf

        return smollm2_gguf()
    if arg == "demo":
        from edgellm.export import export
        from edgellm.models import demo_model_path

        hf = os.path.join(out, "demo-hf")
        if not os.path.isdir(hf):
            export(demo_model_path(), hf, to="hf", progress=False)
        return hf
    return arg


def weight_bytes(model_dir):
    """(size on disk of the chunks, weight bytes a dense decode step reads)."""
    from edgellm.runtime import format

    m = json.load(open(os.path.join(model_dir, "manifest.json")))
    size = sum(c["size"] for c in m["chunks"])
    layers = sum(c["size"] for c in m["chunks"][1:])
    emb = m["chunks"][0]["tensors"]
    head = "tok_embeddings" if m["config"]["tied_embeddings"] else "output"
    hb = sum(int(math.prod(shape)) * dt.itemsize
             for dt, shape in format.stored_tensors(head, emb[head]).values())
    return size, layers + hb


def decode_cpu_ms(model, n=16, repeats=3):
    """Best CPU milliseconds per greedy decode step (process time)."""
    rt = model.runtime
    ids = model.tokenizer.encode("It is a truth universally acknowledged", add_bos=True)
    best = None
    for _ in range(repeats):
        rt.reset()
        rt.forward(ids)
        tok = ids[-1]
        t0 = time.process_time()
        for _ in range(n):
            tok = int(rt.forward([tok])[0].argmax())
        ms = (time.process_time() - t0) / n * 1e3
        best = ms if best is None else min(best, ms)
    return best


def decode_ppl(model, text, tokens=1024, window=512):
    """Perplexity of the first `tokens` tokens of text fed one token at a time through the decode
    kernels (windows of `window` tokens from an empty cache): the int8 activations of the decode
    path (per block of 32, or per token) are in it; evaluate.perplexity runs the prefill path,
    whose linears take float32 activations."""
    import numpy as np

    ids = model.tokenizer.encode(text, add_bos=True)[:tokens]
    rt, nll, n = model.runtime, 0.0, 0
    for w0 in range(0, len(ids) - 1, window):
        rt.reset()
        for t in range(w0, min(w0 + window, len(ids) - 1)):
            z = rt.forward([ids[t]])[0].astype(np.float64)
            m = z.max()
            nll += m + np.log(np.exp(z - m).sum()) - z[ids[t + 1]]
            n += 1
    return float(np.exp(nll / n))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument("--decode-tokens", type=int, default=1024,
                   help="tokens of the decode-path perplexity (0: skip)")
    p.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    a = p.parse_args()
    import edgellm
    from edgellm import evaluate
    from edgellm.converters.convert import convert
    from edgellm.converters.prune import options as prune_options

    os.makedirs(a.out, exist_ok=True)
    src = source(a.src, a.out)
    text = evaluate.read_text(evaluate.heldout_text_path())
    only = a.only.split(",") if a.only else None
    rows = []
    for name, quant, method, extra in VARIANTS:
        if only and name not in only:
            continue
        tag = "-".join([quant, method] + [f"{k}{'-'.join(v) if isinstance(v, tuple) else v}"
                                          for k, v in sorted(extra.items())])
        dst = os.path.join(a.out, tag)
        t0, c0 = time.perf_counter(), time.process_time()
        if "prune" in extra:  # (method, pattern), the default calibration (4096 tokens)
            extra = dict(extra, prune=prune_options(*extra["prune"]))
        if not os.path.isdir(dst):
            convert(src, dst, quant=quant, group_size=a.group_size, method=method,
                    progress=False, method_options=None if method in ("rtn", "w8a8") else
                    {"tokens": a.calib_tokens}, **extra)
        conv_s, conv_cpu = time.perf_counter() - t0, time.process_time() - c0
        m = edgellm.load(dst)
        r = evaluate.perplexity(m, text, max_tokens=a.max_tokens)
        ms = decode_cpu_ms(m)
        dppl = decode_ppl(m, text, a.decode_tokens) if a.decode_tokens else None
        size, per_tok = weight_bytes(dst)
        row = {"source": a.src, "variant": name, "perplexity": round(r["perplexity"], 3),
               "decode_path_ppl": None if dppl is None else round(dppl, 3),
               "size_MB": round(size / 1e6, 2), "bytes_per_token_MB": round(per_tok / 1e6, 2),
               "decode_cpu_ms": round(ms, 2), "decode_tok_s": round(1e3 / ms, 1),
               "convert_s": round(conv_s, 1), "convert_cpu_s": round(conv_cpu, 1),
               "eval_tokens": r["tokens"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del m
    print("\n| variant | perplexity | decode-path ppl | size MB | weights read per token MB | decode CPU ms/token "
          "(tok/s) | convert s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']} | {r['decode_path_ppl']} | {r['size_MB']} | "
              f"{r['bytes_per_token_MB']} | {r['decode_cpu_ms']} ({r['decode_tok_s']}) | "
              f"{r['convert_s']} |")


if __name__ == "__main__":
    sys.exit(main())
