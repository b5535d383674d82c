"""TEAL-style thresholds on the FFN's inputs (`--calib TEXT --sparsity S --sparsity-mode teal`).

Per layer, from the calibration tokens' FFN inputs h (after ffn_norm; converters/calibrate.py
ffn_inputs), two magnitude thresholds (TEAL: one per tensor, from the activation distribution):
- t_in: the s_in-quantile of |h|, the input of gate and up;
- t_hid: the s_hid-quantile of |act(gate h') (up h')|, the input of down, with h' = h thresholded
  at t_in (the hidden values the runtime will see).

The target sparsity S is of the FFN's weight bytes: gate and up are 2/3 of them, down 1/3, so
(2 s_in + s_hid) / 3 = S. split="error" (the default) chooses s_in per layer, on a grid, as the
one whose FFN output is closest to the dense FFN's (squared error on calibration tokens), s_hid
following (TEAL's allocation of sparsity between a block's projections by output error; on
SmolLM2 at S = 0.4 the held-out perplexity rose 11.8% instead of 13.1%, s_in 0.20-0.35: the
hidden values are cheaper to drop than the inputs). split="uniform": s_in = s_hid = S.
The error is measured with the hidden threshold applied to every token, while decode adds every
hidden value of a token that keeps more than 35% of them (kernels/teal.DENSE_DOWN): S is the
nominal sparsity, the bytes a token skips are fewer (SmolLM2, S = 0.4: 26%).

The layer's weights are then stored by input column (docs/FORMAT.md §3.5, runtime/teal.py): the
int8 codes and scales of the bundles' gate, up and down parts, moved, not re-rounded. Needs a
gated FFN in int8 (--quant int8) with down in the bundles.
"""

import numpy as np

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError

SAMPLE = 1 << 22  # values sampled per quantile
BLOCK = 2048  # tokens per matrix product
SPLIT_TOKENS = 1024  # calibration tokens the split's FFN output error is measured on
SPLIT_STEP = 0.025  # the grid of input sparsities tried per layer
MAX_SPARSITY = 0.95  # of either input
SPLITS = ("error", "uniform")


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


def thresholds(cfg, bundles, layout, H, sparsity, rng, split="error"):
    """(t_in, t_hid, s_in, s_hid) for layer weights in bundles and its calibration FFN inputs
    H f32[N, d]; split: "error" or "uniform" (module docstring)."""
    from edgellm.runtime import predictor as rp

    parts = {e["name"]: e for e in layout}
    d = cfg.d_model
    wg = encodings.unpack_bundle_part(bundles, parts["gate"], d)
    wu = encodings.unpack_bundle_part(bundles, parts["up"], d)

    def hidden(h):
        return rp.activation(h @ wg.T, cfg.activation) * (h @ wu.T)

    def drop(a, t):
        return np.where(np.abs(a) > t, a, np.float32(0.0))

    absh = _sample(H, SAMPLE, rng)
    if split == "uniform":
        t_in = _quantile(absh, sparsity)
        per = max(1, SAMPLE * BLOCK // max(1, H.shape[0]))
        sample = [_sample(hidden(drop(H[i:i + BLOCK], t_in)), per, rng)
                  for i in range(0, H.shape[0], BLOCK)]
        return t_in, _quantile(np.concatenate(sample), sparsity), sparsity, sparsity
    wd = encodings.unpack_bundle_part(bundles, parts["down"], d)  # [n, d]: column i of W_down
    he = H if H.shape[0] <= SPLIT_TOKENS else H[rng.choice(H.shape[0], SPLIT_TOKENS,
                                                           replace=False)]
    want = hidden(he) @ wd
    best = None
    for k in range(int(round(min(1.5 * sparsity, MAX_SPARSITY) / SPLIT_STEP)) + 1):
        s_in = round(k * SPLIT_STEP, 6)
        s_hid = round(3 * sparsity - 2 * s_in, 6)
        if s_hid > MAX_SPARSITY:
            continue
        s_hid = max(0.0, s_hid)
        t_in = _quantile(absh, s_in)
        v = hidden(drop(he, t_in))
        t_hid = _quantile(_sample(v, SAMPLE, rng), s_hid)
        err = float(np.square(drop(v, t_hid) @ wd - want).sum())
        if best is None or err < best[0]:
            best = (err, t_in, t_hid, s_in, s_hid)
    return best[1:]


def _quantile(a, q):
    """The q-quantile of the magnitudes a; -1 (every value kept) for q = 0."""
    return -1.0 if q <= 0 else float(np.quantile(a, q))


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
