"""Pruning measurements (docs/COMPRESSION.md, "Measured: pruning").

    python benchmarks/prune.py models [--text FILE] [--tokens N] MODEL_DIR...
        per model: size on disk, weight bytes read per decoded token (every layer chunk plus
        the head), perplexity on the first N tokens of the text (default: the shipped held-out
        text; --tokens 0: none), decode cost in CPU milliseconds per token (process time of 16
        greedy tokens after a short prompt, median and minimum of --repeats rounds that take
        the models in turn: on a shared machine wall time says little, and side by side a
        burst of load elsewhere touches every model alike). Run with NUMBA_NUM_THREADS=1 for
        per-core figures.
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
    """Perplexity per model, then decode timing rounds over all models in turn (side by side:
    a burst of load elsewhere touches every model alike); medians and minima of the rounds."""
    import edgellm
    from edgellm import evaluate

    text = evaluate.read_text(a.text or evaluate.heldout_text_path())
    rows, loaded = [], []
    for m in a.model:
        with open(os.path.join(m, "manifest.json")) as f:
            man = json.load(f)
        size = sum(c["size"] for c in man["chunks"])
        layers = sum(c["size"] for c in man["chunks"][1:])
        emb = man["chunks"][0]["tensors"]
        e = emb["output" if "output" in emb else "tok_embeddings"]
        head = int(np.prod(e["shape"])) * {"f16": 2, "int8": 1, "f32": 4}.get(e["encoding"], 1)
        model = edgellm.load(m)
        row = {"model": os.path.basename(os.path.normpath(m)), "size_mb": round(size / 1e6, 2),
               "weight_mb_per_token": round((layers + head) / 1e6, 2)}
        if a.tokens:
            row["ppl"] = round(evaluate.perplexity(model, text, max_tokens=a.tokens)["perplexity"],
                               3)
        rows.append(row)
        loaded.append(model)
    ids = loaded[0].tokenizer.encode("It is a truth universally acknowledged", add_bos=True)
    times = [[] for _ in loaded]
    for _ in range(a.repeats):
        for k, model in enumerate(loaded):
            rt = model.runtime
            rt.reset()
            rt.forward(ids)
            tok, n = ids[-1], 16
            t0 = time.process_time()
            for _ in range(n):
                tok = int(rt.forward([tok])[0].argmax())
            times[k].append((time.process_time() - t0) / n * 1e3)
    for row, t in zip(rows, times):
        row["decode_cpu_ms_per_token"] = round(float(np.median(t)), 2)
        row["decode_cpu_ms_min"] = round(float(np.min(t)), 2)
        print(json.dumps(row), flush=True)


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
    m.add_argument("--repeats", type=int, default=7)
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
