"""Pruning measurements (docs/COMPRESSION.md, "Measured: pruning").

    python benchmarks/prune.py models [--text FILE] [--tokens N] MODEL_DIR...
        per model: size on disk, weight bytes read per decoded token (every layer chunk plus
        the head), perplexity on the first N tokens of the text (default: the shipped held-out
        text), decode cost in CPU milliseconds per token (process time, best of 3 runs of 16
        greedy tokens after a short prompt: on a shared machine wall time says little).
        Run with NUMBA_NUM_THREADS=1 for per-core figures.
    python benchmarks/prune.py layer SRC LAYER [--tokens N]
        relative output error ||(W - W')X^T|| / ||W X^T|| of one layer's linears for each
        method and pattern, on calibration inputs through the dense layers before it, and the
        spread of the input column norms ||x_j|| (what separates Wanda from magnitude).
"""

import argparse
import json
import os
import time

import numpy as np


def models(a):
    import edgellm
    from edgellm import evaluate

    text = evaluate.read_text(a.text or evaluate.heldout_text_path())
    for m in a.model:
        with open(os.path.join(m, "manifest.json")) as f:
            man = json.load(f)
        size = sum(c["size"] for c in man["chunks"])
        layers = sum(c["size"] for c in man["chunks"][1:])
        emb = man["chunks"][0]["tensors"]
        e = emb["output" if "output" in emb else "tok_embeddings"]
        head = int(np.prod(e["shape"])) * {"f16": 2, "int8": 1, "f32": 4}.get(e["encoding"], 1)
        model = edgellm.load(m)
        ppl = evaluate.perplexity(model, text, max_tokens=a.tokens)["perplexity"]
        rt = model.runtime
        ids = model.tokenizer.encode("It is a truth universally acknowledged", add_bos=True)
        best = None
        for _ in range(3):
            rt.reset()
            rt.forward(ids)
            tok, n = ids[-1], 16
            t0 = time.process_time()
            for _ in range(n):
                tok = int(rt.forward([tok])[0].argmax())
            ms = (time.process_time() - t0) / n * 1e3
            best = ms if best is None else min(best, ms)
        print(json.dumps({"model": os.path.basename(os.path.normpath(m)),
                          "size_mb": round(size / 1e6, 2),
                          "weight_mb_per_token": round((layers + head) / 1e6, 2),
                          "ppl": round(ppl, 3), "decode_cpu_ms_per_token": round(best, 2)}),
              flush=True)


def layer(a):
    from edgellm.converters import layerwise, prune

    with layerwise.open_source(a.src) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=a.tokens, seq_len=256)
        for L in layerwise.Walk(source, spec, seqs).layers():
            if L.index < a.layer:
                continue
            for name in ("attn_q", "attn_o", "ffn_up", "ffn_down"):
                W, X, H = L.weights[name], L.inputs(name), L.hessian(name)
                ref = np.linalg.norm(W.astype(np.float64) @ X.T)
                row = {}
                for pat in ("sp50", "sp24"):
                    for m in prune.METHODS:
                        Wp = prune.prune_matrix(m, W, pat, X=X, H=H)
                        row[f"{pat} {m}"] = round(float(
                            np.linalg.norm((W.astype(np.float64) - Wp) @ X.T) / ref), 4)
                # Wanda's score is |w| times these norms: uniform norms give magnitude's mask
                nrm = np.sqrt((X.astype(np.float64) ** 2).sum(axis=0))
                sq = np.sort(nrm ** 2)[::-1]
                row["input_norm_max_over_median"] = round(float(nrm.max() / np.median(nrm)), 2)
                row["top1pct_inputs_share"] = round(float(sq[:max(1, sq.size // 100)].sum()
                                                          / sq.sum()), 3)
                print(json.dumps({"layer": a.layer, "linear": name, **row}), flush=True)
            break


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models")
    m.add_argument("model", nargs="+")
    m.add_argument("--text", default=None)
    m.add_argument("--tokens", type=int, default=1024)
    m.set_defaults(func=models)
    la = sub.add_parser("layer")
    la.add_argument("src")
    la.add_argument("layer", type=int)
    la.add_argument("--tokens", type=int, default=2048)
    la.set_defaults(func=layer)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
