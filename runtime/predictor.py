"""Which FFN neurons a token needs, decided before any of their rows is read.

The converter calibrates these (converters/calibrate.py, converters/predictor.py) and stores them
in the layer chunks (docs/FORMAT.md §3.3). Two kinds:

- low-rank predictor (ReLU models; SiLU models trained for top-k): scores = B·(A·h) + bias with
  A f16[r, d], B f16[d_ff, r]. A neuron is needed when its score is above the stored threshold,
  or (top-k) when it is among the top_k highest scores. Resident cost: (d + d_ff)·r halves.
- magnitude threshold (SiLU models, CATS-style): a neuron is needed when |act(gate_i·h)| > t.
  This computes every neuron's gate dot product, so the gate rows of all neurons must be resident
  (needs_gate_rows; resident_bytes counts them), and the up/down parts of only the needed ones
  are read. The converter stores them apart (`ffn_gate`) with the threshold; for an older model
  the gate parts are copied out of the bundles.

Indices are bundle rows (hot first), the rows the FFN reads. h is the FFN input after its norm.

>>> p = Predictor.load(reader, cfg, layer=0)                         # doctest: +SKIP
>>> rows = p.active(h)              # sorted int32 bundle-row indices  # doctest: +SKIP
"""

import os

import numpy as np

from . import encodings, format, kernels
from .errors import EdgeLLMError, FormatError
from .reader import Matrix

# tensor names in a layer chunk (docs/FORMAT.md §3.3)
FREQ = "ffn_freq"
PRED_A, PRED_B, PRED_BIAS = "ffn_pred.a", "ffn_pred.b", "ffn_pred.bias"
PRED_THRESHOLD, PRED_TOP_K = "ffn_pred.threshold", "ffn_pred.top_k"
ACT_THRESHOLD = "ffn_act_threshold"
GATE = "ffn_gate"  # the gate projection as a matrix of its own (written with the threshold)


class Predictor:
    """kind "lowrank" or "threshold"; see the module docstring."""

    def __init__(self, kind, layer, d_ff, *, a=None, b=None, bias=None, threshold=None,
                 top_k=None, gate=None, activation="relu", meta=None):
        self.kind, self.layer, self.d_ff = kind, layer, d_ff
        self.a, self.b, self.bias = a, b, bias  # Matrix [r, d], Matrix [d_ff, r], f32[d_ff]
        self.threshold, self.top_k = threshold, top_k
        self.gate, self.activation = gate, activation  # threshold kind: Matrix [d_ff, d]
        self.meta = dict(meta or {})  # this layer's calibration record from the manifest
        self.recall = self.meta.get("recall")  # measured by the converter on held-out calib text
        self.rank = a.shape[0] if a is not None else None
        self.needs_gate_rows = kind == "threshold"
        self.resident_bytes = sum(x.nbytes for x in (a, b, bias, gate) if x is not None)

    @classmethod
    def load(cls, reader, cfg, layer):
        """The predictor stored for this layer, or None when the model has none."""
        file = format.layer_chunk(layer)
        path = os.path.join(reader.model_dir, file)
        meta = _layer_meta(reader.manifest, layer)
        if reader.has(file, PRED_A):
            bias = reader.vector(file, PRED_BIAS)
            threshold = top_k = None
            if reader.has(file, PRED_TOP_K):
                top_k = int(reader.array(file, PRED_TOP_K)[0])
                if not 1 <= top_k <= cfg.d_ff:
                    raise FormatError(path, f"{PRED_TOP_K} is {top_k}, must be in 1..{cfg.d_ff}")
            else:
                threshold = float(reader.array(file, PRED_THRESHOLD)[0])
                if not np.isfinite(threshold):
                    raise FormatError(path, f"{PRED_THRESHOLD} is not a finite number")
            return cls("lowrank", layer, cfg.d_ff, a=reader.matrix(file, PRED_A),
                       b=reader.matrix(file, PRED_B), bias=bias, threshold=threshold,
                       top_k=top_k, meta=meta)
        if reader.has(file, ACT_THRESHOLD):
            t = float(reader.array(file, ACT_THRESHOLD)[0])
            if not (np.isfinite(t) and t >= 0):
                raise FormatError(path, f"{ACT_THRESHOLD} must be a finite number >= 0")
            if not cfg.gated_ffn:
                raise FormatError(path, f"{ACT_THRESHOLD} needs a gated FFN")
            if reader.has(file, GATE):  # stored apart (docs/FORMAT.md §3.2): no copy
                gate = reader.matrix(file, GATE)
            else:
                entry = reader.entry(file, "ffn_bundles")
                gate = resident_part(reader.array(file, "ffn_bundles"), entry["parts"], "gate",
                                     cfg.d_model)
            return cls("threshold", layer, cfg.d_ff, threshold=t, gate=gate,
                       activation=cfg.activation, meta=meta)
        return None

    def scores(self, h):
        """f32[d_ff]: the predictor's score per bundle row (threshold kind: |act(gate·h)|)."""
        h = np.asarray(h, dtype=np.float32).reshape(1, -1)
        if self.kind == "threshold":
            return np.abs(activation(kernels.linear(self.gate, h)[0], self.activation))
        s = kernels.linear(self.b, kernels.linear(self.a, h))[0]
        s += self.bias
        return s

    def active(self, h):
        """Sorted int32 bundle-row indices of the neurons this token needs (h: f32[d])."""
        s = self.scores(h)
        if self.top_k is not None:
            if self.top_k >= s.size:
                return np.arange(s.size, dtype=np.int32)
            idx = np.argpartition(s, s.size - self.top_k)[s.size - self.top_k:]
            return np.sort(idx).astype(np.int32)
        return np.flatnonzero(s > self.threshold).astype(np.int32)


def _layer_meta(manifest, layer):
    layers = (manifest.get("calibration") or {}).get("layers") or []
    return layers[layer] if layer < len(layers) and isinstance(layers[layer], dict) else {}


def resident_part(bundles, layout, name, d):
    """One part (e.g. "gate") of every bundle row copied out as a contiguous Matrix [n, d]."""
    entry = next((e for e in layout if e["name"] == name), None)
    if entry is None:
        raise EdgeLLMError(f"the FFN bundles have no {name!r} part")
    q, s = encodings.bundle_part(bundles, entry, d)
    c = encodings.codec(entry["encoding"], entry["group_size"])
    return Matrix(np.ascontiguousarray(q), None if s is None else np.ascontiguousarray(s), c,
                  (bundles.shape[0], d))


# ---------------------------------------------------------------------------------------------
# The truth a predictor is measured against (shared by the converter and the measurements)


def activation(z, kind):
    if kind == "relu":
        return np.maximum(z, 0)
    return z / (1 + np.exp(-z))


def decoded_part(cfg, bundles, layout):
    """f32[n, d]: the part whose dot product with h the activation is applied to (gate; up for
    OPT), decoded from bundle rows with the reference codec."""
    part = "gate" if cfg.gated_ffn else "up"
    entry = next(e for e in layout if e["name"] == part)
    return encodings.unpack_bundle_part(bundles, entry, cfg.d_model)


def preactivations(cfg, w, h, up_bias=None):
    """z f32[T, n] = gate_i·h (gated) or up_i·h + b_i (OPT), with w = decoded_part(...)."""
    z = np.asarray(h, dtype=np.float32).reshape(-1, cfg.d_model) @ w.T
    if up_bias is not None and not cfg.gated_ffn:
        z += up_bias
    return z


def needed(cfg, z, act_threshold=None):
    """bool[T, n]: neurons whose output is not (treated as) zero. ReLU: z > 0. SiLU: |silu(z)| >
    act_threshold (every neuron when there is no threshold)."""
    if cfg.activation == "relu":
        return z > 0
    if act_threshold is None:
        return np.ones(z.shape, dtype=bool)
    return np.abs(activation(z, cfg.activation)) > act_threshold


class PredictedFFN:
    """A ResidentFFN computed from the predicted rows only (the others count as zero), with
    counts of predicted and (check=True) truly needed neurons. For measuring a predictor's
    effect on quality without the streaming runtime; the output for a set of rows is exactly what
    the FFN kernel gives on those rows. apply=False only counts and returns the dense output (to
    measure recall along the dense model's own trajectory)."""

    def __init__(self, ffn, predictor, check=False, act_threshold=None, apply=True):
        if getattr(ffn, "gate", None) is not None:
            raise EdgeLLMError("PredictedFFN reads bundles with a gate part; this layer stores its "
                               "gate apart (ffn_gate): use runtime/rowskip.py")
        self.ffn, self.predictor, self.check, self.apply = ffn, predictor, check, apply
        self.act_threshold = act_threshold
        self.w = decoded_part(ffn.cfg, ffn.bundles, ffn.layout) if check else None
        self.tokens = self.predicted = self.true = self.hit = 0

    def __call__(self, h):
        f, cfg = self.ffn, self.ffn.cfg
        h = np.asarray(h, dtype=np.float32).reshape(-1, cfg.d_model)
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            idx = self.predictor.active(h[t])
            if self.apply:
                bias = None if f.up_bias is None else f.up_bias[idx]
                out[t] = kernels.ffn(h[t:t + 1], f.bundles[idx], f.layout, cfg.d_model,
                                     cfg.activation, cfg.gated_ffn, bias)[0]
            self.tokens += 1
            self.predicted += idx.size
            if self.check:
                truth = needed(cfg, preactivations(cfg, self.w, h[t], f.up_bias),
                               self.act_threshold)[0]
                self.true += int(truth.sum())
                self.hit += int(truth[idx].sum())
        if not self.apply:
            return f(h)
        if f.down_bias is not None:
            out += f.down_bias
        return out

    def stats(self):
        n = max(self.tokens, 1) * self.predictor.d_ff
        return {"tokens": self.tokens, "predicted_fraction": self.predicted / n,
                "true_fraction": self.true / n if self.check else None,
                "recall": self.hit / self.true if self.check and self.true else None,
                "precision": self.hit / self.predicted if self.check and self.predicted else None}
