"""AWQ-style activation-aware scaling (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration").

Weights that meet large activations matter more. For a group of linears sharing an input X,
multiplying input channel j of their weights by s_j and dividing X's channel j by s_j leaves the
float outputs unchanged, but moves rounding error away from the salient channels. The division
is folded into what produces X, exactly:
    attn_norm -> q, k, v        norm weight (and LayerNorm bias) / s
    v -> o                      v rows (and bias) / s, per kv head (shared by its query heads)
    ffn_norm -> gate, up        norm weight (and bias) / s
    up -> down                  up rows (and bias) / s: down's input act(gate)*up (gated), or
                                relu(up + b) (ReLU is positively homogeneous), scales by 1/s
s = mean|X_j|^alpha, normalised, with alpha in [0, 1] searched on a grid to minimise the group's
output error sum_k ||X W_k^T - X (Q(W_k s) / s)^T||^2 where Q is the codec's round trip (RTN).
After scaling, each weight's (except q and k) max |w| per group is clipped by a searched ratio
(AWQ's auto-clip) when that lowers the same error. The result is then quantized by round to nearest.
"""

import numpy as np

GRID = 20  # alpha in {0, 1/GRID, ..., (GRID - 1)/GRID}
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # max-|w| shrink ratios tried per group
SEARCH_TOKENS = 1024  # tokens used for the searches (a fixed, evenly spaced subset)


def _subset(X, n=SEARCH_TOKENS):
    if X.shape[0] <= n:
        return X
    return X[np.linspace(0, X.shape[0] - 1, n).astype(np.int64)]


def round_trip(codec, w, columns=False):
    """Q(w): the codec's encode/decode (columns: w's columns are the codec rows, as the FFN
    bundles store the down projection)."""
    if columns:
        return np.ascontiguousarray(codec.dequantize(*codec.quantize(
            np.ascontiguousarray(w.T))).T)
    return codec.dequantize(*codec.quantize(w))


def output_error(X, w, wq):
    d = X @ (w - wq).T
    return float(np.einsum("ij,ij->", d, d, dtype=np.float64))


def search_scale(X, weights, codec, columns=(), expand=None):
    """(s f32 [in], errors by alpha) for linears `weights` (list of [out, in]) sharing inputs X
    [N, in]. columns: indices of weights quantized by columns. expand(s_small) -> s: when the
    scale has fewer free values than channels (per kv head), the search runs on s_small."""
    X = _subset(X).astype(np.float32)
    stat = np.abs(X).mean(axis=0).astype(np.float64)
    if expand is not None:
        stat = expand.reduce(stat)
    stat = np.maximum(stat, 1e-8)
    best, best_s, errors = None, None, []
    for i in range(GRID):
        a = i / GRID
        s = stat ** a
        s = s / np.sqrt(s.max() * s.min())
        full = expand.expand(s) if expand is not None else s
        full = full.astype(np.float32)
        err = 0.0
        for k, w in enumerate(weights):
            wq = round_trip(codec, w * full[None, :], columns=k in columns) / full[None, :]
            err += output_error(X, w, wq)
        errors.append(err)
        if best is None or err < best:
            best, best_s = err, full
    return best_s, errors


def search_clip(X, w, codec, columns=False):
    """w with each group's values clipped at ratio r * max|w| of the group, r searched per
    output row (per column when `columns`) from CLIP_GRID to minimise that row's output error."""
    X = _subset(X).astype(np.float32)
    if columns:  # the codec's rows are w's columns: clip along them, judge on w's outputs
        return search_clip_columns(X, w, codec)
    n, d = w.shape
    g = codec.group_size
    wg = w.reshape(n, d // g, g)
    peak = np.abs(wg).max(axis=2, keepdims=True)
    best = np.full(n, np.inf)
    out = w.copy()
    Y = X @ w.T
    for r in CLIP_GRID:
        wc = np.clip(wg, -peak * r, peak * r).reshape(n, d)
        wq = round_trip(codec, wc)
        e = ((X @ wq.T - Y) ** 2).sum(axis=0)  # per output row
        better = e < best
        out[better] = wc[better]
        best[better] = e[better]
    return out


def search_clip_columns(X, w, codec):
    """search_clip for a matrix quantized by columns: each input column j of w [out, in] is a
    codec row; its clip ratio is chosen for the error it alone adds, ||x_j||^2 ||dq_j||^2."""
    out_dim, n = w.shape
    g = codec.group_size
    wt = np.ascontiguousarray(w.T)  # [in, out]: codec rows
    wg = wt.reshape(n, out_dim // g, g)
    peak = np.abs(wg).max(axis=2, keepdims=True)
    xn = (X.astype(np.float64) ** 2).sum(axis=0)  # [in]
    best = np.full(n, np.inf)
    res = wt.copy()
    for r in CLIP_GRID:
        wc = np.clip(wg, -peak * r, peak * r).reshape(n, out_dim)
        wq = codec.dequantize(*codec.quantize(wc))
        e = xn * ((wq - wt) ** 2).sum(axis=1)
        better = e < best
        res[better] = wc[better]
        best[better] = e[better]
    return np.ascontiguousarray(res.T)


class KVHeads:
    """Scales of o's input channels tied per kv head: query head h reads kv head h // group, so
    channel (h, j) of o's input is channel (h // group, j) of v's output."""

    def __init__(self, cfg):
        self.H, self.KVH, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def reduce(self, stat):
        return stat.reshape(self.KVH, self.H // self.KVH, self.hd).mean(axis=1).reshape(-1)

    def pick(self, s):
        """The kv-head values of an expanded scale (inverse of expand)."""
        return s.reshape(self.KVH, self.H // self.KVH, self.hd)[:, 0].reshape(-1)

    def expand(self, s):
        return np.repeat(s.reshape(self.KVH, 1, self.hd), self.H // self.KVH,
                         axis=1).reshape(-1)


def _fold_norm(layer, norm, s):
    W = layer.weights
    layer.set(norm + ".weight", W[norm + ".weight"] / s)
    if norm + ".bias" in W:
        layer.set(norm + ".bias", W[norm + ".bias"] / s)


def _scale_inputs(layer, names, s):
    for n in names:
        layer.set(n, layer.weights[n] * s[None, :])


def apply(layer, codec, clip=True):
    """Scale (and clip) the weights of one layerwise.Layer in place, AWQ-style, for `codec`.
    Returns a report {group: best alpha index and error ratio vs alpha = 0}."""
    cfg, W = layer.cfg, layer.weights
    report = {}

    def group(key, names, columns=(), expand=None):
        X = layer.inputs(names[0])
        s, errs = search_scale(X, [W[n] for n in names], codec, columns, expand)
        report[key] = {"alpha": errs.index(min(errs)) / GRID,
                       "error_vs_unscaled": min(errs) / errs[0] if errs[0] > 0 else 1.0}
        return s

    qkv = ("attn_q", "attn_k", "attn_v")
    s = group("qkv", qkv)
    _fold_norm(layer, "attn_norm", s)
    _scale_inputs(layer, qkv, s)

    kv = KVHeads(cfg)
    s = group("o", ("attn_o",), expand=kv)
    _scale_inputs(layer, ("attn_o",), s)
    s_v = kv.pick(s)
    layer.set("attn_v", W["attn_v"] / s_v[:, None])
    if "attn_v.bias" in W:
        layer.set("attn_v.bias", W["attn_v.bias"] / s_v)

    ffn_in = ("ffn_gate", "ffn_up") if cfg.gated_ffn else ("ffn_up",)
    s = group("ffn", ffn_in)
    _fold_norm(layer, "ffn_norm", s)
    _scale_inputs(layer, ffn_in, s)

    if cfg.gated_ffn or cfg.activation == "relu":
        s = group("down", ("ffn_down",), columns=(0,))
        _scale_inputs(layer, ("ffn_down",), s)
        layer.set("ffn_up", W["ffn_up"] / s[:, None])
        if "ffn_up.bias" in W:
            layer.set("ffn_up.bias", W["ffn_up.bias"] / s)

    if clip:
        clip_weights(layer, codec)
    return report


def clip_weights(layer, codec, skip=()):
    """AWQ's auto-clip of the layer's linears except q and k (as AWQ's reference: attention
    scores are sensitive to clipping) and those in skip (low-rank factorized projections, whose
    factors are what gets rounded)."""
    ffn_in = ("ffn_gate", "ffn_up") if layer.cfg.gated_ffn else ("ffn_up",)
    for n in ("attn_v", "attn_o") + ffn_in + ("ffn_down",):
        if n not in skip:
            layer.set(n, search_clip(layer.inputs(n), layer.weights[n], codec,
                                     columns=n == "ffn_down"))
