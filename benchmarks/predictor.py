"""Quality of a model's neuron predictors on held-out text (not a test; nothing is asserted).

For a model converted with `--predictor` (or `--calib` on a SiLU model: magnitude thresholds),
with every FFN computed from only the rows its predictor selects (runtime/predictor.py
PredictedFFN: the other neurons count as zero, computed from the resident bundles, no streaming):

- recall and precision of the truly needed neurons, per layer and averaged over layers, measured
  along the dense model's own trajectory over the text;
- the fraction of neurons predicted vs truly needed;
- perplexity over the text, dense vs predicted (disjoint windows of --ctx tokens);
- greedy top-1 agreement with dense over --gen generated tokens: dense generates greedily from
  each prompt; the predicted model is run over the same tokens (teacher-forced) and its top-1 is
  compared at every generated position; also the length of the identical prefix when the
  predicted model generates on its own.

    python benchmarks/predictor.py MODEL --text ~/.cache/edgellm-demo/text/heldout.txt
    python benchmarks/predictor.py MODEL --text FILE --tokens 8192 --gen 256 --json out.json
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

import edgellm
from edgellm.runtime import format
from edgellm.runtime import predictor as rp

PROMPTS = ["It is a truth universally acknowledged", "Mr. Darcy", "\"My dear,\" said she",
           "The weather was"]


def text_windows(model, text, ctx, max_tokens):
    tok = model.tokenizer
    ids = tok.encode(text, add_bos=False)[:max_tokens]
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    span = ctx - len(bos)
    return [bos + ids[i:i + span] for i in range(0, len(ids), span) if len(ids[i:i + span]) > 1]


def nll(model, windows):
    """Mean negative log-likelihood of every next token in the windows."""
    tot, n = 0.0, 0
    for w in windows:
        logits = model.logits(w)[:-1].astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        tot += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return tot / n


def greedy(model, prompt_ids, n):
    rt = model.runtime
    rt.cache = model.new_cache()
    logits = rt.forward(prompt_ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits[-1]))
        out.append(t)
        if len(prompt_ids) + len(out) >= rt.n_ctx:
            break
        logits = rt.forward([t])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", required=True, help="held-out text (not the calibration text)")
    ap.add_argument("--tokens", type=int, default=8192, help="text tokens to score")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256, help="generated tokens in all")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    model = edgellm.load(a.model)
    cfg, reader, layers = model.config, model.reader, model.runtime.layers
    preds = [rp.Predictor.load(reader, cfg, i) for i in range(cfg.n_layers)]
    if any(p is None for p in preds):
        sys.exit(f"{a.model}: no predictor or threshold in some layers (convert with --predictor)")
    act_t = [float(reader.array(format.layer_chunk(i), rp.ACT_THRESHOLD)[0])
             if reader.has(format.layer_chunk(i), rp.ACT_THRESHOLD) else None
             for i in range(cfg.n_layers)]
    dense = [L.ffn for L in layers]

    def use(kind):
        for i, L in enumerate(layers):
            L.ffn = dense[i] if kind == "dense" else rp.PredictedFFN(
                dense[i], preds[i], check=kind == "observe", act_threshold=act_t[i],
                apply=kind == "predicted")
        return [L.ffn for L in layers]

    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    wins = text_windows(model, text, min(a.ctx, model.n_ctx), a.tokens)
    t0 = time.perf_counter()
    observers = use("observe")
    nll_dense = nll(model, wins)
    per_layer = [o.stats() for o in observers]
    use("predicted")
    nll_pred = nll(model, wins)

    # greedy agreement over a.gen tokens in all, split over the prompts
    per_prompt = math.ceil(a.gen / len(PROMPTS))
    agree = total = 0
    prefixes = []
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        use("dense")
        gen = greedy(model, ids, per_prompt)
        seq = ids + gen
        dense_top = np.argmax(model.logits(seq), axis=1)[len(ids) - 1:-1]
        use("predicted")
        pred_top = np.argmax(model.logits(seq), axis=1)[len(ids) - 1:-1]
        agree += int((pred_top == dense_top).sum())
        total += len(gen)
        own = greedy(model, ids, per_prompt)
        same = next((k for k, (x, y) in enumerate(zip(own, gen)) if x != y), len(gen))
        prefixes.append(same)
    use("dense")

    recall = [s["recall"] for s in per_layer]
    out = {
        "model": os.path.abspath(a.model), "text": os.path.abspath(a.text),
        "scored_tokens": sum(len(w) - 1 for w in wins),
        "recall_per_layer": recall, "recall_mean": float(np.mean(recall)),
        "precision_per_layer": [s["precision"] for s in per_layer],
        "predicted_fraction_per_layer": [s["predicted_fraction"] for s in per_layer],
        "true_fraction_per_layer": [s["true_fraction"] for s in per_layer],
        "predicted_fraction_mean": float(np.mean([s["predicted_fraction"] for s in per_layer])),
        "true_fraction_mean": float(np.mean([s["true_fraction"] for s in per_layer])),
        "perplexity_dense": math.exp(nll_dense), "perplexity_predicted": math.exp(nll_pred),
        "perplexity_increase": math.exp(nll_pred - nll_dense) - 1,
        "greedy_top1_agreement": agree / total, "greedy_tokens": total,
        "identical_prefix_per_prompt": prefixes, "prompts": PROMPTS,
        "predictor": [{"kind": p.kind, "rank": p.rank, "threshold": p.threshold,
                       "top_k": p.top_k, "resident_bytes": p.resident_bytes,
                       "calibration_recall": p.recall} for p in preds],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"recall per layer {', '.join(f'{r:.4f}' for r in recall)}; mean {out['recall_mean']:.4f}")
    print("predicted / truly needed per layer: " + ", ".join(
        f"{s['predicted_fraction']:.3f}/{s['true_fraction']:.3f}" for s in per_layer)
        + f"; mean {out['predicted_fraction_mean']:.3f}/{out['true_fraction_mean']:.3f}")
    print(f"perplexity dense {out['perplexity_dense']:.3f}, predicted "
          f"{out['perplexity_predicted']:.3f} ({100 * out['perplexity_increase']:+.2f}%) over "
          f"{out['scored_tokens']} tokens")
    print(f"greedy top-1 agreement {agree}/{total} = {agree / total:.4f}; identical prefix when "
          f"generating alone: {prefixes} tokens of {per_prompt} per prompt")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
