"""Pruning at conversion: `edgellm convert SRC -o DST --prune {magnitude,wanda,sparsegpt}
--prune-pattern {2:4,0.5}` zeroes half of every linear weight of every layer (attention q, k, v,
o and the FFN's gate, up, down; not the embedding or head) and stores them in the sparse
encodings sp24_* / sp50_* (runtime/encodings.py, docs/FORMAT.md), which the runtime's kernels
read without the pruned half (runtime/kernels/sparse.py).

Methods (each prunes per output row: every row keeps exactly half its weights, in 2:4 every group
of 4 consecutive inputs keeps 2):
    magnitude  keep the largest |W_ij|
    wanda      keep the largest |W_ij| * ||X_j||_2, X the layer input on calibration text
               (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs")
    sparsegpt  choose and prune columns left to right, updating the remaining weights of the row
               with the inverse Hessian of the layer input so that W X changes least (Frantar &
               Alistarh 2023); masks chosen per block of 128 columns (per row: half of each
               block) from w^2 / [H^-1]_jj^2.
Wanda and SparseGPT calibrate on the layer-by-layer pass of converters/layerwise.py: each layer
sees the hidden states the pruned earlier layers produce, and within a layer each linear sees
its input as computed with the linears before it already pruned.

The method functions take arrays, so they can be checked alone against the objective
||W X^T - W' X^T||:
>>> import numpy as np
>>> W = np.array([[1.0, -3.0, 0.5, 2.0]], dtype=np.float32)
>>> magnitude(W, "sp24")
array([[ 0., -3.,  0.,  2.]], dtype=float32)
"""

import logging
import os
from dataclasses import dataclass

import numpy as np

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"2:4": "sp24", "0.5": "sp50", "50%": "sp50"}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
BLOCK = 128  # SparseGPT's column block (the lazy-batch update of the paper)
DAMP = 0.01  # SparseGPT's dampening: this fraction of the mean Hessian diagonal added to it
CALIB_TOKENS = 4096
CALIB_SEQ_LEN = 256


@dataclass
class PruneOptions:
    method: str = "magnitude"
    pattern: str = "sp24"  # sp24 (2:4) or sp50 (unstructured 50% per row)
    calib: str | None = None  # calibration text (wanda, sparsegpt); None: the shipped text
    tokens: int = CALIB_TOKENS
    seq_len: int = CALIB_SEQ_LEN


def parse_pattern(text):
    """"2:4" -> sp24; "0.5" or "50%" -> sp50; anything else is a ConvertError."""
    key = str(text).strip()
    if key not in PATTERNS:
        try:
            if float(key.rstrip("%")) == (50.0 if key.endswith("%") else 0.5):
                key = "0.5"
        except ValueError:
            pass
    if key not in PATTERNS:
        raise ConvertError(f"--prune-pattern {text!r}: supported are 2:4 (two of every four "
                           "weights) and 0.5 (half of each row, unstructured)")
    return PATTERNS[key]


def options(method, pattern="2:4", calib=None, tokens=None):
    """Checked PruneOptions (None when method is None); errors before any work."""
    if method is None:
        return None
    if method not in METHODS:
        raise ConvertError(f"--prune {method!r}: choose one of {', '.join(METHODS)}")
    opt = PruneOptions(method=method, pattern=parse_pattern(pattern), calib=calib)
    if tokens is not None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            raise ConvertError(f"--prune-calib-tokens must be a positive integer, got {tokens!r}")
        opt.tokens = tokens
    return opt


def check_compatible(opt, quant, method="rtn", hot_order=False):
    """What --prune composes with, checked before any work. hot_order: --calib/--predictor,
    whose hot-first neuron order permutes the FFN's d_ff axis (it would break the 2:4 groups of
    a pruned ffn_down, which run along d_ff)."""
    if opt is None:
        return
    if hot_order:
        raise ConvertError("--prune does not compose with --calib/--predictor yet (their "
                           "hot-first neuron order would reorder a pruned ffn_down's columns)")
    if quant not in ("f16", "int8", "int4"):
        raise ConvertError(f"--prune stores the kept weights as f16, int8 or int4; --quant "
                           f"{quant} is not supported with it")
    if method not in (None, "rtn"):
        raise ConvertError(f"--prune does not compose with --method {method} yet (both rewrite "
                           "the weights layer by layer)")


# ---------------------------------------------------------------------------------------------
# Masks and methods (W [out, in] float32; X [N, in]; H [in, in])


def keep_mask(score, pattern):
    """bool [out, in]: True where a weight is kept, the largest scores of each row (sp50: half
    of it; sp24: two of every group of four). Ties go to the lower column."""
    score = np.asarray(score)
    n, d = score.shape
    if pattern == "sp24":
        if d % 4:
            raise ConvertError(f"2:4 pruning needs a row length divisible by 4, got {d}")
        g = score.reshape(n, d // 4, 4)
        drop = np.argsort(g, axis=2, kind="stable")[:, :, :2]
        keep = np.ones(g.shape, dtype=bool)
        np.put_along_axis(keep, drop, False, axis=2)
        return keep.reshape(n, d)
    drop = np.argsort(score, axis=1, kind="stable")[:, :d // 2]
    keep = np.ones((n, d), dtype=bool)
    np.put_along_axis(keep, drop, False, axis=1)
    return keep


def magnitude(W, pattern):
    W = np.asarray(W, dtype=np.float32)
    return np.where(keep_mask(np.abs(W), pattern), W, np.float32(0))


def wanda(W, pattern, X=None, col_norms=None):
    """Score |W_ij| * ||X_j||: X [N, in] the layer inputs, or their column norms given."""
    W = np.asarray(W, dtype=np.float32)
    if col_norms is None:
        col_norms = np.sqrt(np.einsum("ij,ij->j", X, X, dtype=np.float64))
    score = np.abs(W).astype(np.float64) * np.asarray(col_norms, np.float64)[None, :]
    return np.where(keep_mask(score, pattern), W, np.float32(0))


def sparsegpt(W, H, pattern, block=BLOCK, damp=DAMP):
    """SparseGPT on W [out, in] with the input Hessian H = X^T X / N [in, in] (any positive
    scale). Returns the pruned and updated W' (float32), half of each row zero."""
    W = np.array(W, dtype=np.float64)
    n, d = W.shape
    if pattern == "sp24" and d % 4:
        raise ConvertError(f"2:4 pruning needs a row length divisible by 4, got {d}")
    if pattern == "sp50" and d % 2:
        raise ConvertError(f"50% pruning needs an even row length, got {d}")
    block = max(4, block - block % 4)
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0  # inputs that are always zero: their weights go first
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(d)] += damp * np.mean(np.diag(H))
    try:
        # the upper Cholesky factor of H^-1: row i holds the update of the columns after i
        Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    except np.linalg.LinAlgError:
        raise ConvertError("sparsegpt: the calibration Hessian is not positive definite even "
                           "after dampening (too few calibration tokens?)") from None
    keep = np.ones((n, d), dtype=bool)
    for i1 in range(0, d, block):
        i2 = min(d, i1 + block)
        W1 = W[:, i1:i2].copy()
        Hi = Hinv[i1:i2, i1:i2]
        dg = np.diag(Hi)
        Err = np.zeros_like(W1)
        if pattern == "sp50":  # half of each row within the block (i2 - i1 is even)
            keep[:, i1:i2] = keep_mask(W1 ** 2 / dg[None, :] ** 2, "sp50")
        for i in range(i2 - i1):
            if pattern == "sp24" and i % 4 == 0:
                keep[:, i1 + i:i1 + i + 4] = keep_mask(W1[:, i:i + 4] ** 2
                                                       / dg[None, i:i + 4] ** 2, "sp24")
            w = W1[:, i]
            q = np.where(keep[:, i1 + i], w, 0.0)
            err = (w - q) / Hi[i, i]
            W1[:, i:] -= np.outer(err, Hi[i, i:])
            W1[:, i] = q
            Err[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    W[~keep] = 0.0
    return W.astype(np.float32)


def prune_matrix(method, W, pattern, X=None, H=None):
    if method == "magnitude":
        return magnitude(W, pattern)
    if method == "wanda":
        if X is None:
            raise ConvertError("wanda needs the layer inputs")
        return wanda(W, pattern, X)
    if H is None:
        raise ConvertError("sparsegpt needs the layer input Hessian")
    return sparsegpt(W, H, pattern)


def prune_layer(layer, method, pattern, gated=True):
    """Prune every linear of a converters.layerwise.Layer in place (layer.set), in the order the
    layer computes them, so each sees inputs from the linears before it as pruned."""
    for name in LINEARS:
        if name not in layer.weights:
            continue
        W = layer.weights[name]
        if method == "magnitude":
            new = magnitude(W, pattern)
        elif method == "wanda":
            new = wanda(W, pattern, layer.inputs(name))
        else:
            new = sparsegpt(W, layer.hessian(name), pattern)
        layer.set(name, new)


# ---------------------------------------------------------------------------------------------
# The converter's view: a source whose layer linears read pruned


class PrunedSource:
    """Wraps a converter source (converters/sources): read() of a layer's linear weight returns
    it pruned; everything else passes through. Layers are pruned when first read, in order
    (the converter writes layer 0, 1, ...), one layer held at a time."""

    def __init__(self, source, spec, opt, tokenizer_dir=None, progress=False):
        self.source, self.spec, self.opt = source, spec, opt
        self.names = {}  # checkpoint name -> (layer, canonical)
        for i in range(spec.config.n_layers):
            for c, hf in spec.layer_tensors(i).items():
                if c in LINEARS:
                    self.names[hf] = (i, c)
        self._layer, self._weights = None, {}
        self._walk = None
        self.stats = {}  # "layer_000/attn_q" -> fraction of zeros
        self.progress = progress
        self.tokenizer = None  # set by the converter for calibrated methods

    def __getattr__(self, name):
        return getattr(self.source, name)

    def start(self, staging, tokenizer):
        """Calibrated methods: the calibration sequences, tokenized with the tokenizer already
        written to the staging directory (ConvertError on a short text), and the pass."""
        if self.opt.method == "magnitude":
            return
        from edgellm.runtime.tokenizer import Tokenizer

        from . import layerwise

        tok = Tokenizer.load(os.path.dirname(staging.path(tokenizer["file"])),
                             {"tokenizer": tokenizer, "config": self.spec.config.to_dict()})
        seqs = layerwise.sequences(tok, self.spec.config, self.opt.calib, self.opt.tokens,
                                   self.opt.seq_len)
        self._walk = layerwise.Walk(self.source, self.spec, seqs, progress=False)
        self._layers = self._walk.layers()

    def _load(self, i):
        if self._layer == i:
            return
        if self.opt.method == "magnitude":
            names = {c: hf for c, hf in self.spec.layer_tensors(i).items() if c in LINEARS}
            self._weights = {c: magnitude(self.source.read(hf), self.opt.pattern)
                             for c, hf in names.items()}
        else:
            if self._walk is None:
                raise ConvertError(f"--prune {self.opt.method}: calibration not started")
            layer = next(self._layers)
            if layer.index != i:
                raise ConvertError(f"pruning: layer {i} read out of order")
            prune_layer(layer, self.opt.method, self.opt.pattern)
            self._weights = {c: layer.weights[c] for c in LINEARS if c in layer.weights}
        self._layer = i
        for c, w in self._weights.items():
            self.stats[f"layer_{i:03d}/{c}"] = round(float(np.mean(w == 0)), 4)

    def read(self, name, rows=None):
        if name not in self.names:
            return self.source.read(name, rows=rows)
        i, c = self.names[name]
        self._load(i)
        w = self._weights[c]
        return w if rows is None else w[rows[0]:rows[1]]

    def codec(self, dense, d):
        """The sparse codec for a matrix whose dense encoding would be `dense` (f16, int8,
        int4) with rows of length d; int4 whose group does not divide d/2 becomes int8."""
        value = dense.name if dense.name in encodings.SPARSE_VALUES else "f16"
        c = encodings.codec(encodings.sparse_name(self.opt.pattern, value),
                            dense.group_size if value == "int4" else None)
        try:
            c.check(d)
        except Exception:
            c = encodings.codec(encodings.sparse_name(self.opt.pattern, "int8"))
            c.check(d)
        return c

    def report(self):
        zeros = list(self.stats.values())
        return {"method": self.opt.method,
                "pattern": "2:4" if self.opt.pattern == "sp24" else "0.5",
                "calibration_tokens": (self._walk.n_tokens if self._walk is not None else None),
                "mean_zero_fraction": round(float(np.mean(zeros)), 4) if zeros else None}


def encode_ffn(enc, entries, arrays, chunk, names):
    """The converter's FFN for a pruned layer: gate and up rows in sparse bundles, the down
    projection as its own sparse matrix `ffn_down` [d, d_ff] (pruned along d_ff, per output row,
    so its 2:4 groups run along rows as the kernels read them)."""
    from . import quantize

    cfg = enc.spec.config
    d, n = cfg.d_model, cfg.d_ff
    dense, _ = quantize.matrix_codec(enc.quant, enc.group_size, d)
    c = enc.source.codec(dense, d)
    parts = [p for p in enc.spec.arch.ffn_parts if p != "down"]
    b, layout, stats = quantize.encode_bundles(
        lambda part, r0, r1: enc.source.read(names["ffn_" + part], rows=(r0, r1)), parts, c, n,
        d, name=f"{chunk} FFN")
    entries["ffn_bundles"] = {"encoding": "bundle", "shape": list(b.shape), "group_size": None,
                              "parts": layout}
    arrays["ffn_bundles"] = b
    for part, st in stats.items():
        enc._record(f"{chunk}/ffn_bundles.{part}", c.name, st)
    entries["ffn_perm"] = {"encoding": "i32", "shape": [n], "group_size": None}
    arrays["ffn_perm"] = np.arange(n, dtype=np.int32)
    enc.add(entries, arrays, chunk, "ffn_down", names["ffn_down"])
