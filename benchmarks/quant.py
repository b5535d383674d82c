"""Quantization methods side by side on one source: perplexity, size, bytes per token, decode
speed and conversion time for f16, int8, int4 RTN/GPTQ/AWQ, int3 RTN/GPTQ (and the f32
reference: the source's own weights, dequantized).

    python benchmarks/quant.py SRC --out /tmp/quant [--max-tokens 8192] [--calib-tokens 8192]
    python benchmarks/quant.py smollm2 ...   # the SmolLM2-135M GGUF of edgellm.models
    python benchmarks/quant.py demo ...      # the demo model, exported to HF first (int8 weights)

Perplexity: edgellm.evaluate on the shipped held-out text (ctx 512, stride 256). Bytes per token:
the weights a dense decode step reads (every layer chunk plus the head). Decode tokens/s: 64
greedy tokens after a short prompt, one run: indicative on a shared machine.
"""

import argparse
import json
import os
import sys
import time

VARIANTS = [  # (name, quant, method); the comparisons that matter first
    ("f32 (reference)", "f32", "rtn"), ("int4 RTN", "int4", "rtn"), ("int4 GPTQ", "int4", "gptq"),
    ("int4 AWQ", "int4", "awq"), ("int3 RTN", "int3", "rtn"), ("int3 GPTQ", "int3", "gptq"),
    ("f16", "f16", "rtn"), ("int8", "int8", "rtn"),
]


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
    m = json.load(open(os.path.join(model_dir, "manifest.json")))
    size = sum(c["size"] for c in m["chunks"])
    layers = sum(c["size"] for c in m["chunks"][1:])
    emb = m["chunks"][0]["tensors"]
    head = "tok_embeddings" if m["config"]["tied_embeddings"] else "output"
    e = emb[head]
    from edgellm.runtime import format

    hb = sum(int(__import__("math").prod(shape)) * dt.itemsize
             for dt, shape in format.stored_tensors(head, e).values())
    return size, layers + hb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated variant names")
    a = p.parse_args()
    import edgellm
    from edgellm import evaluate
    from edgellm.converters.convert import convert
    from edgellm.sampling import SamplingParams

    os.makedirs(a.out, exist_ok=True)
    src = source(a.src, a.out)
    text = open(evaluate.heldout_text_path(), encoding="utf-8").read()
    rows = []
    for name, quant, method in VARIANTS:
        if a.only and name not in a.only.split(","):
            continue
        dst = os.path.join(a.out, f"{quant}-{method}")
        t0 = time.perf_counter()
        if not os.path.isdir(dst):
            convert(src, dst, quant=quant, group_size=a.group_size, method=method,
                    progress=False, method_options=None if method == "rtn" else
                    {"tokens": a.calib_tokens})
        conv_s = time.perf_counter() - t0
        m = edgellm.load(dst)
        r = evaluate.perplexity(m, text, max_tokens=a.max_tokens)
        m.complete("The meaning of life is", max_tokens=64,
                   params=SamplingParams(temperature=0.0, repetition_penalty=1.0))
        st = m.last_stats
        size, per_tok = weight_bytes(dst)
        row = {"variant": name, "perplexity": round(r["perplexity"], 3),
               "size_MB": round(size / 1e6, 2), "bytes_per_token_MB": round(per_tok / 1e6, 2),
               "decode_tok_s": round(st.get("decode_tokens", 0) / max(st["decode_s"], 1e-9), 1),
               "convert_s": round(conv_s, 1), "eval_tokens": r["tokens"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del m
    print("\n| variant | perplexity | size MB | weights read per token MB | decode tok/s | "
          "convert s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']} | {r['size_MB']} | "
              f"{r['bytes_per_token_MB']} | {r['decode_tok_s']} | {r['convert_s']} |")


if __name__ == "__main__":
    sys.exit(main())
