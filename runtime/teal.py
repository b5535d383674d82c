"""The FFN of a layer converted with TEAL-style input thresholds (`edgellm convert --calib TEXT
--sparsity S --sparsity-mode teal`, converters/teal.py; docs/FORMAT.md §3.5).

The weights an FFN input feeds are stored by input column, so a zeroed input skips a contiguous
run of bytes:

- ffn_in_cols i8 [d, 2 d_ff]: row j holds column j of W_gate then column j of W_up (their int8
  codes, the dense int8 model's), ffn_in_scales f32 [2 d_ff] their per-neuron scales;
- ffn_down_cols int8 [d_ff, d]: row i is column i of W_down (the bundles' down parts);
- ffn_teal_threshold f32 [2]: t_in on |h| (the FFN input after ffn_norm) and t_hid on
  |act(gate h) (up h)| (the down projection's input), set by calibration for a target sparsity.

Decode (one token) keeps only inputs strictly above the thresholds (kernels/teal.py), also
inside the fused decode layer (kernels/fused.py, sparse mode 4); where more than
kernels/teal.DENSE_DOWN of a token's hidden values pass, every down row is read and every hidden
value added (dropping some would save no reads). Prefill computes the dense FFN
from the same weights unless prefill="sparse" (token by token through the kernel: what a
perplexity of the sparse model measures).

>>> enable(model.runtime, prefill="sparse")   # layers with thresholds  # doctest: +SKIP
>>> stats(model.runtime)                      # per layer (inputs kept, down rows read)  # doctest: +SKIP
"""

import os

import numba
import numpy as np

from .errors import EdgeLLMError, FormatError
from .kernels import teal as kt
from .kernels.ffn import ACT_CODES

IN_COLS, IN_SCALES, DOWN_COLS, THRESHOLD = ("ffn_in_cols", "ffn_in_scales", "ffn_down_cols",
                                            "ffn_teal_threshold")
TILE = 64  # input columns dequantized at a time (dense path): bounds its float32 scratch


def has_teal(reader, file):
    return reader.has(file, IN_COLS)


def refuse_streaming(manifest):
    if any(IN_COLS in c["tensors"] for c in manifest["chunks"]):
        raise EdgeLLMError("a model with TEAL thresholds (--sparsity-mode teal) cannot stream "
                           "under a DRAM budget or --mode; load it resident")


def _ro(a, dtype):
    a = np.ascontiguousarray(a, dtype=dtype).view()
    a.flags.writeable = False  # one Numba type whether the weights are mapped or not
    return a


class TealFFN:
    """h f32[T, d] -> f32[T, d] from the column-stored weights; see the module docstring."""

    teal = True  # kernels/fused.plan_ffn asks self.plan()

    def __init__(self, cfg, cols, cscale, dq, ds, thresholds, down_bias=None, prefill="dense"):
        if not cfg.gated_ffn:
            raise EdgeLLMError("TEAL thresholds need a gated FFN")
        d, n = cfg.d_model, cfg.d_ff
        if cols.shape != (d, 2 * n) or cscale.shape != (2 * n,) or dq.shape != (n, d) \
                or ds.shape != (n,) or np.shape(thresholds) != (2,):
            raise EdgeLLMError(f"TEAL FFN: shapes {cols.shape}, {cscale.shape}, {dq.shape}, "
                               f"{ds.shape}, {np.shape(thresholds)} do not fit d = {d}, "
                               f"d_ff = {n}")
        self.cfg, self.prefill = cfg, prefill
        self.cols, self.cscale = _ro(cols, np.int8), _ro(cscale, np.float32)
        self.dq, self.ds = _ro(dq, np.int8), _ro(ds, np.float32)
        self.stored = np.array(thresholds, dtype=np.float32)  # as calibrated
        self.thr = self.stored.copy()  # what the kernel reads (scale_thresholds, dense())
        self.down_bias = down_bias
        self.kind = ACT_CODES[cfg.activation]
        self.acc = np.empty(2 * n, np.float32)
        self.rows = np.empty(max(d, n), np.int32)
        self.hid = np.empty(n, np.float32)
        self.kept = np.zeros(3, np.int64)  # input columns read, tokens, down rows read

    @classmethod
    def load(cls, reader, cfg, file, down_bias=None, prefill="dense"):
        down = reader.matrix(file, DOWN_COLS)
        if down.codec.name != "int8":
            raise FormatError(os.path.join(reader.model_dir, file),
                              f"{DOWN_COLS} must be int8, got {down.codec.name}")
        if not np.isfinite(reader.array(file, THRESHOLD)).all():
            raise FormatError(os.path.join(reader.model_dir, file),
                              f"{THRESHOLD} must hold finite numbers")
        return cls(cfg, reader.array(file, IN_COLS), reader.vector(file, IN_SCALES), down.q,
                   down.s, reader.vector(file, THRESHOLD), down_bias, prefill)

    @property
    def tuple(self):
        """The kernel's arrays in kernels/fused's order (tl)."""
        return (self.cols, self.cscale, self.dq, self.ds, self.thr, self.acc, self.rows,
                self.hid, self.kept)

    def __call__(self, h):
        d = self.cfg.d_model
        h = np.ascontiguousarray(h, dtype=np.float32).reshape(-1, d)
        if h.shape[0] > 1 and self.prefill == "dense":
            out = self.dense(h)
        else:
            partial = np.empty((max(1, min(numba.get_num_threads(), self.cfg.d_ff)), d),
                               np.float32)
            out = np.empty_like(h)
            for t in range(h.shape[0]):
                out[t] = kt.ffn_teal(h[t], self.cols, self.cscale, self.dq, self.ds, self.thr,
                                     self.kind, self.acc, self.rows, self.hid, partial, self.kept)
        if self.down_bias is not None:
            out += self.down_bias
        return out

    def dense(self, h):
        """Every input kept (NumPy, tile by tile of input columns; no down bias)."""
        n = self.cfg.d_ff
        gu = np.zeros((h.shape[0], 2 * n), np.float32)
        for j in range(0, h.shape[1], TILE):
            gu += h[:, j:j + TILE] @ self.cols[j:j + TILE].astype(np.float32)
        gu *= self.cscale
        g, u = gu[:, :n], gu[:, n:]
        if self.cfg.activation == "silu":
            v = g / (np.float32(1.0) + np.exp(-g)) * u
        else:
            v = np.maximum(g, 0) * u
        out = np.zeros((h.shape[0], h.shape[1]), np.float32)
        v *= self.ds
        for i in range(0, n, TILE * 8):
            out += v[:, i:i + TILE * 8] @ self.dq[i:i + TILE * 8].astype(np.float32)
        return out

    def plan(self, meta):
        """kernels/fused: (meta filled, arrays) for ffn_any / decode_layer in sparse mode 4."""
        from .kernels import fused

        return fused.plan_teal(self.cfg, self, meta)

    def scale_thresholds(self, s, s_hid=None):
        """Thresholds = s x the stored ones, the hidden one s_hid x (default s; negative keeps
        every hidden value): a sweep without converting again."""
        self.thr[0] = self.stored[0] * np.float32(s)
        self.thr[1] = self.stored[1] * np.float32(s if s_hid is None else s_hid)

    def fractions(self):
        """(input columns kept, down rows read) as fractions, over the sparse tokens so far (down
        reads every row when many hidden values are kept: kernels/teal.DENSE_DOWN)."""
        cols, tokens, rows = (int(v) for v in self.kept)
        if not tokens:
            return None
        return cols / (tokens * self.cfg.d_model), rows / (tokens * self.cfg.d_ff)

    def computed_fraction(self):
        """Bytes of FFN weights read / all of them (gate and up are 2/3, down 1/3)."""
        f = self.fractions()
        return None if f is None else (2 * f[0] + f[1]) / 3

    def reset_counts(self):
        self.kept[:] = 0


def enable(rt, prefill="dense"):
    """Set the prefill mode of every TEAL layer of Transformer rt; returns how many there are."""
    if prefill not in ("dense", "sparse"):
        raise EdgeLLMError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
    n = 0
    for L in rt.layers:
        if isinstance(L.ffn, TealFFN):
            L.ffn.prefill = prefill
            n += 1
    return n


def stats(rt):
    """Per layer: (input columns kept, down rows read) fractions (None for other layers)."""
    return [L.ffn.fractions() if isinstance(L.ffn, TealFFN) else None for L in rt.layers]
