"""The FFN of a layer whose gate projection is stored apart: `ffn_gate` [d_ff, d], a matrix of
its own, with bundles holding only up and down (docs/FORMAT.md §3.2, §4.5).

The converter writes this layout with SiLU magnitude thresholds (`--sparsity`, CATS-style,
converters/calibrate.py): every neuron's gate is one dense matvec, then only the bundle rows of
the neurons with |silu(gate h)| above the threshold are read (runtime/rowskip.py). Without row
skipping the same kernel computes every row (kernels/fused.ffn_any, mode 3 with a negative
threshold), inside the fused decode layer too. Prefill, and machines without the SIMD kernels,
take the general path here: the gates through kernels.linear, the up and down parts decoded tile
by tile with the reference codec.

    FFN(h) = sum_i act(gate_i . h) (up_i . h) down_i        (docs/FORMAT.md §5.4)
"""

import numpy as np

from . import encodings, kernels
from .kernels import fused

TILE_ROWS = 1024  # bundle rows decoded at a time (general path): bounds its float32 scratch


def ffn(f, h):
    """f: a model.ResidentFFN with f.gate set; h f32[T, d] -> f32[T, d] (no down bias)."""
    cfg = f.cfg
    d = cfg.d_model
    h = np.ascontiguousarray(h, dtype=np.float32).reshape(-1, d)
    if h.shape[0] == 1:
        out = fused.ffn_alone(f, h)
        if out is not None:
            return out
    g = kernels.linear(f.gate, h)  # [T, n]
    u = g / (np.float32(1.0) + np.exp(-g)) if cfg.activation == "silu" else np.maximum(g, 0)
    parts = {e["name"]: e for e in f.layout}
    n = f.bundles.shape[0]
    out = np.zeros((h.shape[0], d), dtype=np.float32)
    for r0 in range(0, n, TILE_ROWS):
        b = f.bundles[r0:r0 + TILE_ROWS]
        up = encodings.unpack_bundle_part(b, parts["up"], d)
        u[:, r0:r0 + b.shape[0]] *= h @ up.T
        if f.down is None:
            out += u[:, r0:r0 + b.shape[0]] @ encodings.unpack_bundle_part(b, parts["down"], d)
    if f.down is not None:
        out = kernels.linear(f.down, u)
    return out


def split_bundles(bundles, layout, d):
    """Bundles with a gate part -> (gate q, gate s, the bundles without it, their layout): the
    bytes move unchanged (the gate part of a row is a row of its codec, §4.5), so nothing is
    re-rounded. gate s is None for codecs without scales."""
    entry = next(e for e in layout if e["name"] == "gate")
    c = encodings.codec(entry["encoding"], entry["group_size"])
    q, s = encodings.bundle_part(bundles, entry, d)
    rest = [(e["name"], encodings.codec(e["encoding"], e["group_size"])) for e in layout
            if e["name"] != "gate"]
    kept = {e["name"]: encodings.bundle_part(bundles, e, d) for e in layout
            if e["name"] != "gate"}
    out, new_layout = encodings.pack_encoded_bundles(kept, rest, d)
    return (np.ascontiguousarray(q, dtype=c.data_dtype()),
            None if s is None else np.ascontiguousarray(s, dtype=c.scale_dtype()), out, new_layout)
