"""TEAL-style thresholds on the FFN's inputs (`--calib TEXT --sparsity S --sparsity-mode teal`).

Per layer, from the calibration tokens' FFN inputs h (after ffn_norm; converters/calibrate.py
ffn_inputs), two magnitude thresholds for a target sparsity S (TEAL: one per tensor, from the
activation distribution):
- t_in: the S-quantile of |h|, the input of gate and up;
- t_hid: the S-quantile of |act(gate h') (up h')|, the input of down, with h' = h thresholded
  at t_in (the hidden values the runtime will see).

The layer's weights are then stored by input column (docs/FORMAT.md §3.5, runtime/teal.py): the
int8 codes and scales of the bundles' gate, up and down parts, moved, not re-rounded. Needs a
gated FFN in int8 (--quant int8) with down in the bundles.
"""

import numpy as np

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError

SAMPLE = 1 << 22  # values sampled per quantile
BLOCK = 2048  # tokens per matrix product


def check(cfg, entries):
    """Refuse what the TEAL layout cannot hold, naming the reason (before calibrating)."""
    if not cfg.gated_ffn:
        raise ConvertError("--sparsity-mode teal needs a gated FFN (gate and up projections)")
    if cfg.ffn_bias:
        raise ConvertError("--sparsity-mode teal: FFN biases are not supported")
    if "ffn_down" in entries:
        raise ConvertError("--sparsity-mode teal stores W_down by column itself; drop "
                           "--ffn-down matrix")
    parts = entries["ffn_bundles"]["parts"]
    encs = {p["name"]: p["encoding"] for p in parts}
    if encs != {"gate": "int8", "up": "int8", "down": "int8"}:
        raise ConvertError(f"--sparsity-mode teal needs int8 FFN weights (--quant int8); the "
                           f"FFN parts are {encs}")


def _sample(a, k, rng):
    a = np.abs(a).ravel()
    return a if a.size <= k else a[rng.choice(a.size, size=k, replace=False)]


def thresholds(cfg, bundles, layout, H, sparsity, rng):
    """(t_in, t_hid) for layer weights in bundles and its calibration FFN inputs H f32[N, d]."""
    from edgellm.runtime import predictor as rp

    parts = {e["name"]: e for e in layout}
    d = cfg.d_model
    wg = encodings.unpack_bundle_part(bundles, parts["gate"], d)
    wu = encodings.unpack_bundle_part(bundles, parts["up"], d)
    t_in = float(np.quantile(_sample(H, SAMPLE, rng), sparsity))
    per = max(1, SAMPLE * BLOCK // max(1, H.shape[0]))
    sample = []
    for i in range(0, H.shape[0], BLOCK):
        h = H[i:i + BLOCK]
        h = np.where(np.abs(h) > t_in, h, np.float32(0.0))
        v = rp.activation(h @ wg.T, cfg.activation) * (h @ wu.T)
        sample.append(_sample(v, per, rng))
    t_hid = float(np.quantile(np.concatenate(sample), sparsity))
    return t_in, t_hid


def to_columns(arrays, entries, d, t_in, t_hid):
    """Rewrite a layer chunk's arrays and manifest entries from bundles to the TEAL layout."""
    from edgellm.runtime import format, teal

    e = entries.pop("ffn_bundles")
    bundles = arrays.pop("ffn_bundles")
    parts = {p["name"]: p for p in e["parts"]}
    (gq, gs), (uq, us), (dq, ds) = (encodings.bundle_part(bundles, parts[k], d)
                                    for k in ("gate", "up", "down"))
    n = bundles.shape[0]
    cols = np.empty((d, 2 * n), np.int8)
    cols[:, :n] = gq.T
    cols[:, n:] = uq.T
    arrays[teal.IN_COLS] = cols
    arrays[teal.IN_SCALES] = np.concatenate([gs, us]).astype(np.float32)
    arrays[teal.DOWN_COLS] = np.ascontiguousarray(dq)
    arrays[format.scales_name(teal.DOWN_COLS)] = np.ascontiguousarray(ds, dtype=np.float32)
    arrays[teal.THRESHOLD] = np.array([t_in, t_hid], np.float32)
    vec = {"group_size": None}
    entries[teal.IN_COLS] = {"encoding": "i8", "shape": [d, 2 * n], **vec}
    entries[teal.IN_SCALES] = {"encoding": "f32", "shape": [2 * n], **vec}
    entries[teal.DOWN_COLS] = {"encoding": "int8", "shape": [n, d], **vec}
    entries[teal.THRESHOLD] = {"encoding": "f32", "shape": [2], **vec}
