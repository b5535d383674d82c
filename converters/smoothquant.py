"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"): W8A8 with per-token activation scales, made accurate by moving the
activations' outlier channels into the weights.

A linear's input X has a few channels far larger than the rest on every token; one int8 scale
per token then spends its range on them and rounds the others coarsely. Dividing channel j of X
by s_j and multiplying input column j of the weights by s_j leaves the product unchanged in
float, and with
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max over calibration tokens / weight rows)
the activations' and weights' ranges meet in the middle (alpha = 0.5 by default, the paper's
value for most models). The division is folded exactly into what produces X, as AWQ does
(converters/awq.py):
    attn_norm -> q, k, v        norm weight (and LayerNorm bias) / s
    v -> o                      v rows (and bias) / s, s tied per kv head
    ffn_norm -> gate, up        norm weight (and bias) / s
The down projection's input is not smoothed: the runtime multiplies the FFN's hidden values with
the down columns in float32 (runtime/kernels/ffn.py, also in the per-token mode), so it has no
activation rounding to protect. The weights are then rounded to int8 (per row, as --quant int8)
and the manifest asks the runtime for per-token int8 activations (`activation_quant`,
docs/FORMAT.md §2.7; runtime/kernels/w8a8.py).
"""

import numpy as np

from .awq import KVHeads, _fold_norm, _scale_inputs

MIN_SCALE = 1e-5  # floors for the statistics: a channel never active gets s = 1


def scales(x_max, w_max, alpha):
    """s = x_max^alpha / w_max^(1 - alpha) per input channel (1 where either is ~0)."""
    x_max = np.asarray(x_max, np.float64)
    w_max = np.asarray(w_max, np.float64)
    ok = (x_max > MIN_SCALE) & (w_max > MIN_SCALE)
    s = np.ones_like(x_max)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
    return s.astype(np.float32)


def _x_max(X):
    return np.abs(X).max(axis=0)


def _w_max(weights):
    return np.max([np.abs(w).max(axis=0) for w in weights], axis=0)


def apply(layer, alpha=0.5):
    """Smooth the inputs of q/k/v, o and gate/up of one layerwise.Layer in place (exact in
    float). Returns a report: per group the largest |x| over channels before and after, and the
    ratio of the largest channel maximum to the median one (how "outlier" the input is)."""
    cfg, W = layer.cfg, layer.weights
    report = {}

    def record(key, X, s):
        xm = _x_max(X)
        after = xm / s
        report[key] = {"max_over_median_before": float(xm.max() / max(np.median(xm), 1e-12)),
                       "max_over_median_after": float(after.max()
                                                      / max(np.median(after), 1e-12))}

    qkv = ("attn_q", "attn_k", "attn_v")
    X = layer.inputs("attn_q")
    s = scales(_x_max(X), _w_max([W[n] for n in qkv]), alpha)
    record("qkv", X, s)
    _fold_norm(layer, "attn_norm", s)
    _scale_inputs(layer, qkv, s)

    kv = KVHeads(cfg)  # o's input channel (h, j) is v's output (h // group, j): one s per kv
    X = layer.inputs("attn_o")
    xm = _x_max(X).reshape(kv.KVH, kv.H // kv.KVH, kv.hd).max(axis=1).reshape(-1)
    wm = np.abs(W["attn_o"]).max(axis=0).reshape(kv.KVH, kv.H // kv.KVH, kv.hd).max(axis=1)
    s_v = scales(xm, wm.reshape(-1), alpha)
    s = kv.expand(s_v).astype(np.float32)
    record("o", X, s)
    _scale_inputs(layer, ("attn_o",), s)
    layer.set("attn_v", W["attn_v"] / s_v[:, None])
    if "attn_v.bias" in W:
        layer.set("attn_v.bias", W["attn_v.bias"] / s_v)

    ffn_in = ("ffn_gate", "ffn_up") if cfg.gated_ffn else ("ffn_up",)
    X = layer.inputs(ffn_in[0])
    s = scales(_x_max(X), _w_max([W[n] for n in ffn_in]), alpha)
    record("ffn", X, s)
    _fold_norm(layer, "ffn_norm", s)
    _scale_inputs(layer, ffn_in, s)
    return report

