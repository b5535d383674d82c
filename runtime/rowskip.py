"""FFN row skipping with every weight resident: decode reads only the rows a token needs.

Streaming (runtime/streaming.py) skips rows to save memory; this skips them to save time when
the whole model is in memory. A layer whose chunk holds a predictor (converters/calibrate.py,
runtime/predictor.py) gets a SkipFFN over its resident FFN:

- low-rank predictor (ReLU models): scores = B (A h) + bias, the rows above the stored
  threshold are computed, the others count as zero (exactly PredictedFFN's output);
- magnitude threshold (SiLU models, CATS-style, `--sparsity`): every neuron's gate in one
  matvec over a gate matrix (the layer's `ffn_gate`, or a copy of the bundles' gate parts made at
  enable() for a model that stores them inside the bundles: 1/3 of the FFN's bytes more in
  memory), then the up and down parts only of the bundle rows with |act(gate h)| > the stored
  threshold: a skipped row is not read at all.

Both run in one kernel call (kernels/fused.ffn_any), also inside the fused decode layer.
Prefill runs the dense FFN unless prefill="sparse" (token by token through the same kernel: what
a perplexity of the sparse model measures). Top-k predictors are not taken (general path).

>>> n = enable(model.runtime)            # layers that now skip rows  # doctest: +SKIP
>>> stats(model.runtime)                 # fraction of rows computed  # doctest: +SKIP
"""

import numpy as np

from .errors import EdgeLLMError
from .kernels import fused
from .predictor import Predictor


class SkipFFN:
    """A resident FFN (base) computed from the rows a predictor selects; see the module
    docstring. `sparse` is what kernels/fused.plan_ffn reads."""

    def __init__(self, cfg, base, predictor, ffn_cls, prefill="dense"):
        if prefill not in ("dense", "sparse"):
            raise EdgeLLMError(f"prefill must be 'dense' or 'sparse', got {prefill!r}")
        self.cfg, self.base, self.predictor, self.prefill = cfg, base, predictor, prefill
        n = base.bundles.shape[0]
        p = predictor
        if p.kind == "lowrank":
            if getattr(base, "gate", None) is not None:
                raise EdgeLLMError(f"layer {p.layer}: a low-rank predictor over an FFN whose gate "
                                   f"is stored apart (ffn_gate) is not supported")
            if p.top_k is not None:
                raise EdgeLLMError(f"layer {p.layer}: top-k predictors are not supported here")
            if p.a.codec.name != "f16" or p.b.codec.name != "f16":
                raise EdgeLLMError(f"layer {p.layer}: predictor weights must be f16")
            r = p.a.shape[0]
            self.sparse = dict(mode=1, pa=np.ascontiguousarray(p.a.q).view(np.uint16),
                               pb=np.ascontiguousarray(p.b.q.T).view(np.uint16),  # [r, n]
                               pbias=np.ascontiguousarray(p.bias, np.float32),
                               z=np.empty(r, np.float32))
        else:
            self.sparse = dict(mode=3, pa=fused._NO_SPARSE["pa"], pb=fused._NO_SPARSE["pb"],
                               pbias=fused._EMPTY_F32, z=fused._EMPTY_F32, gate=p.gate)
        # NumPy 2 compares float32 scores with a Python float threshold in float32 (NEP 50)
        self.sparse.update(thr=np.float32(p.threshold), scores=np.empty(n, np.float32),
                           rows=np.empty(n, np.int32), kept=np.zeros(2, np.int64))
        self.meta = np.zeros(fused.M_LEN, np.int64)
        self.arrays = fused.plan_ffn(cfg, self, ffn_cls, self.meta)
        if self.arrays is None:
            raise EdgeLLMError(f"layer {p.layer}: the FFN's encoding has no SIMD kernel to skip "
                               f"rows with")
        self.meta.flags.writeable = False
        self.scratch = fused.Scratch(cfg)

    def __call__(self, h):
        h = np.ascontiguousarray(h, dtype=np.float32).reshape(-1, self.cfg.d_model)
        if h.shape[0] > 1 and self.prefill == "dense":
            return self.base(h)
        a, s = self.arrays, self.scratch
        n = a["n"]
        hidden = s.hidden(n if a["dq"] is not fused._EMPTY_U16 else 1)
        out = np.empty_like(h)
        for t in range(h.shape[0]):
            out[t] = fused.ffn_call(h[t], self.meta, a, s.partial(n), hidden)
        if self.base.down_bias is not None:
            out += self.base.down_bias
        return out

    def computed_fraction(self):
        """Rows computed / rows, over the sparse tokens so far (decode, and sparse prefill)."""
        kept, tokens = self.sparse["kept"]
        return kept / (tokens * self.arrays["n"]) if tokens else None

    def reset_counts(self):
        self.sparse["kept"][:] = 0


def enable(rt, prefill="dense"):
    """Put a SkipFFN in every layer of Transformer rt whose chunk has a predictor (a resident
    FFN, nothing streamed). Returns the number of such layers."""
    from .model import ResidentFFN

    if rt.stream is not None:
        raise EdgeLLMError("row skipping with everything resident: this model streams (a DRAM "
                           "budget); the streaming runtime skips rows itself (--mode window)")
    n = 0
    for i, L in enumerate(rt.layers):
        if isinstance(L.ffn, SkipFFN):
            L.ffn = L.ffn.base
        p = Predictor.load(rt.reader, rt.cfg, i)
        if p is None or type(L.ffn) is not ResidentFFN:
            continue
        L.ffn = SkipFFN(rt.cfg, L.ffn, p, ResidentFFN, prefill)
        n += 1
    return n


def disable(rt):
    for L in rt.layers:
        if isinstance(L.ffn, SkipFFN):
            L.ffn = L.ffn.base


def stats(rt):
    """Per layer: fraction of FFN rows computed (None for layers that do not skip)."""
    return [L.ffn.computed_fraction() if isinstance(L.ffn, SkipFFN) else None
            for L in rt.layers]
