"""Low-rank attention with AWQ's and SmoothQuant's scales (`--low-rank F --method awq|smoothquant`,
converters/lowrank.py scale_layer): the scales are folded into the dense layer first, then the
scaled weights are factorized, then the factors and the rest are rounded.

- the claim it rests on, in NumPy: the whitened SVD of W·diag(s) on inputs X·diag(1/s) gives the
  factors of W with right's columns times s (without damping);
- in float the scaled low-rank model is the plain low-rank model (same ranks, the logits within a
  small part of the low-rank error: the damping), while the norms did move;
- on inputs with outlier channels (tests/test_smoothquant.py's checkpoint), SmoothQuant's int8
  low-rank model is closer to its float model than W8A8 without smoothing is to its own, and
  AWQ's int4 low-rank model is closer to the float low-rank model than round to nearest's;
- the method's quant rules still hold with --low-rank.
"""

import json
import os

import numpy as np
import pytest

import edgellm
import tiny
from edgellm.converters import lowrank
from edgellm.converters.convert import convert
from edgellm.runtime.errors import ConvertError
from test_smoothquant import _outlier_checkpoint

OPTS = {"tokens": 512}  # the same calibration for every model compared


def test_scaled_svd_is_the_plain_one_with_right_scaled():
    rng = np.random.default_rng(0)
    n, d, r = 48, 40, 12
    W = rng.standard_normal((n, d))
    X = rng.standard_normal((500, d)) * rng.uniform(0.1, 5, d)
    s = rng.uniform(0.2, 4, d)
    S = lowrank.whitening(X.T @ X / len(X), damp=0)
    left, right = lowrank.factors(*lowrank.svd(W, S), S, r)
    Xs = X / s
    S2 = lowrank.whitening(Xs.T @ Xs / len(X), damp=0)
    ls, rs = lowrank.factors(*lowrank.svd(W * s, S2), S2, r)
    a = left.astype(np.float64) @ right * s  # the plain factors, right's columns times s
    b = ls.astype(np.float64) @ rs
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()
    assert np.abs(W * s - b).max() > 0.1  # a real truncation (the test could fail)


def _logits(path, ids, decode=False):
    m = edgellm.load(path, kv="f32")
    if not decode:
        return m.logits(ids)
    rt = m.runtime
    rt.reset()
    return np.concatenate([rt.forward([t]) for t in ids])


def _ranks(path):
    m = json.load(open(os.path.join(path, "manifest.json")))
    return [{k: v["shape"] for k, v in c["tensors"].items() if k.endswith(".left")}
            for c in m["chunks"][1:]]


def test_smoothed_low_rank_is_the_plain_one_in_float(tmp_path):
    src = tiny.checkpoint("llama")
    ids = tiny.token_ids("llama", 24)
    dense = _logits(convert(src, tmp_path / "d", quant="f32", progress=False), ids)
    plain = convert(src, tmp_path / "lr", quant="f32", low_rank=0.6, progress=False,
                    method_options=OPTS)
    sm = convert(src, tmp_path / "sm", quant="f32", method="smoothquant", low_rank=0.6,
                 progress=False, method_options=OPTS)
    assert _ranks(sm) == _ranks(plain) and any(_ranks(plain))
    a, b = _logits(plain, ids), _logits(sm, ids)
    # the damping (1% of the mean Hessian diagonal) does not scale with s: measured 0.4%
    assert np.abs(a - b).max() < 0.02 * np.abs(a - dense).max()
    n0 = edgellm.load(plain).runtime.layers[0].attn_norm[0]
    n1 = edgellm.load(sm).runtime.layers[0].attn_norm[0]
    assert np.abs(n0 - n1).max() > 0.05  # the scales were folded (the test could fail)


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrs")
    src = _outlier_checkpoint(root / "src")

    def conv(name, quant, method):
        return convert(src, root / name, quant=quant, method=method, low_rank=0.6,
                       progress=False, method_options=OPTS)
    return conv


def test_smoothquant_low_rank_closer_than_w8a8(outliers):
    ids = tiny.token_ids("llama", 16)
    errs = {}
    for method in ("w8a8", "smoothquant"):
        float_model = outliers(f"{method}-f32", "f32", "rtn" if method == "w8a8" else method)
        q = outliers(method, "int8", method)
        assert json.load(open(os.path.join(q, "manifest.json")))["activation_quant"] == \
            {"bits": 8, "granularity": "token"}
        assert any(_ranks(q))
        # decode: every factor's input through the per-token int8 kernels
        errs[method] = float(np.abs(_logits(q, ids, decode=True)
                                    - _logits(float_model, ids)).mean())
    assert errs["smoothquant"] < 0.5 * errs["w8a8"], errs  # measured 0.04 against 0.36


def test_awq_low_rank_closer_than_rtn(outliers):
    ids = tiny.token_ids("llama", 16)
    ref = _logits(outliers("rtn-f32", "f32", "rtn"), ids)
    errs = {}
    for method in ("rtn", "awq"):
        q = outliers(f"{method}-int4", "int4", method)
        assert any(_ranks(q))
        errs[method] = float(np.abs(_logits(q, ids) - ref).mean())
    assert errs["awq"] < 0.8 * errs["rtn"], errs  # measured 0.51 against 0.88


@pytest.mark.parametrize("quant,method,msg", [("int8", "awq", "quantizes to int4"),
                                              ("int3", "awq", "awq is for int4"),
                                              ("int4", "smoothquant", "W8A8"),
                                              ("int4", "w8a8", "W8A8")])
def test_method_rules_hold_with_low_rank(tmp_path, quant, method, msg):
    with pytest.raises(ConvertError, match=msg):
        convert(tiny.checkpoint("llama"), tmp_path / "x", quant=quant, method=method,
                low_rank=0.5, progress=False)
    assert not os.path.exists(tmp_path / "x")
