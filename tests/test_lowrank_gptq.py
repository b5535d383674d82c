"""`--low-rank F --method gptq` (converters/lowrank.py quantize_layer): the attention projections
are factorized first, then the factors and the rest of the layer quantized with GPTQ. Checked
against direct NumPy statements on a tiny checkpoint's first layer:

- the float factors approximate the original within the rank's error: the relative output
  error on the calibration inputs is the best rank-r one, sqrt(dropped σ² / all σ²) of the
  whitened weights, computed here with NumPy's own Cholesky and SVD;
- the GPTQ-quantized factors' output error is no worse than rounding the same factors to
  nearest (the codec's RTN), layer output for layer output;
- end to end, the converted model runs and stays close to the float low-rank model.
"""

import json
import os

import numpy as np
import pytest

import edgellm
import tiny
from edgellm.converters import calibquant, layerwise, lowrank
from edgellm.converters.convert import convert
from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError


def _first_layer():
    with layerwise.open_source(tiny.checkpoint("llama_relu")) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=1024, seq_len=128)
        return next(layerwise.Walk(source, spec, seqs).layers())


def _rel(X, w, w2):
    X = X.astype(np.float64)
    return np.linalg.norm(X @ (w.astype(np.float64) - w2).T) / np.linalg.norm(X @ w.T)


def _rtn(w, c):
    q, s = c.quantize(np.asarray(w, np.float32))
    return c.dequantize(q, s).astype(np.float64)


@pytest.mark.parametrize("name", ["attn_q", "attn_v"])
def test_gptq_factors_beat_rtn_of_the_same_factors(name):
    layer = _first_layer()
    X = layer.inputs(name).copy()
    W = layer.weights[name].astype(np.float64)
    r = 32  # a multiple of the int4 group: both factors are int4
    # the best rank-r output error, from NumPy directly (H of the inputs, damped as the module)
    H = X.astype(np.float64).T @ X / X.shape[0]
    H[np.diag_indices_from(H)] += lowrank.DAMP * np.mean(np.diag(H))
    sig = np.linalg.svd(W @ np.linalg.cholesky(H), compute_uv=False)
    best = np.sqrt((sig[r:] ** 2).sum() / (sig ** 2).sum())
    U, s, Vt = lowrank.svd(W, lowrank.whitening(layer.hessian(name)))
    left, right = lowrank.factors(U, s, Vt, lowrank.whitening(layer.hessian(name)), r)
    e_float = _rel(X, W, left.astype(np.float64) @ right)
    assert best > 0.01 and e_float <= 1.05 * best  # (the damping moves it a little)
    c = encodings.codec("int4", 32)
    e_rtn = _rel(X, W, _rtn(left, c) @ _rtn(right, c))
    o = calibquant.Options(method="gptq", quant="int4", group_size=32)
    layer.lowrank = {name: (left, right)}
    layer.set(name, left @ right)
    rep = lowrank.quantize_layer(layer, o)
    lq, rq = layer.lowrank[name]
    e_gptq = _rel(X, W, lq.astype(np.float64) @ rq)
    assert e_gptq <= e_rtn, (e_gptq, e_rtn)
    # the rounding's own share, against the float product (GPTQ's objective)
    LR = left.astype(np.float64) @ right
    q_gptq = _rel(X, LR, lq.astype(np.float64) @ rq)
    q_rtn = _rel(X, LR, _rtn(left, c) @ _rtn(right, c))
    assert q_gptq < 0.95 * q_rtn, (q_gptq, q_rtn)
    # the layer holds the quantized product; the stored codes decode to the factors
    np.testing.assert_allclose(layer.weights[name], lq @ rq, rtol=1e-5, atol=1e-6)
    for f, (codec, q, sc, _) in zip((lq, rq), layer.lowrank_encoded[name]):
        assert codec.name == "int4"
        np.testing.assert_allclose(codec.dequantize(q, sc), f, rtol=0, atol=1e-6)
    # every other linear went through GPTQ as without --low-rank (encoded, error reported)
    others = [n for n in ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up",
                          "ffn_down")
              if n in layer.weights and n != name]
    assert all(n in layer.encoded for n in others)
    assert set(rep["output_error"]) == set(others) | {name}


def test_convert_low_rank_gptq(tmp_path):
    src = tiny.checkpoint("llama")
    kw = dict(low_rank=0.6, progress=False, method_options={"tokens": 512})
    f32 = convert(src, tmp_path / "f32", quant="f32", **kw)
    g = convert(src, tmp_path / "g", quant="int4", method="gptq", **kw)
    m = json.load(open(os.path.join(g, "manifest.json")))
    t = [c["tensors"] for c in m["chunks"][1:]]
    fac = [(n, e["encoding"]) for ts in t for n, e in ts.items() if n.endswith((".left", ".right"))]
    assert fac and all(enc in ("int4", "int8") for _, enc in fac)
    assert any(enc == "int4" for _, enc in fac)
    rec = m["provenance"]["quantization"]["calibrated"]
    assert rec["method"] == "gptq" and rec["low_rank"]["fraction"] == 0.6
    ids = tiny.token_ids("llama", 12)

    def logits(d):
        return edgellm.load(d, kv="f32").logits(ids).astype(np.float64)

    def rel_rms(a, b):
        return np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())

    # int4 moves this tiny random model's logits a lot (~0.3 relative RMS for plain int4 RTN
    # or GPTQ of the dense model), so the yardstick is the dense model's own int4 rounding
    yard = rel_rms(logits(convert(src, tmp_path / "r4", quant="int4", progress=False)),
                   logits(convert(src, tmp_path / "d32", quant="f32", progress=False)))
    assert rel_rms(logits(g), logits(f32)) < 1.5 * yard


def test_low_rank_with_int8_gptq_refused(tmp_path):
    # (awq and smoothquant with --low-rank: tests/test_lowrank_scaled.py)
    src = tiny.checkpoint("llama")
    for kw, msg in (({"quant": "int8", "method": "gptq"}, "int4 or int3"),):
        with pytest.raises(ConvertError, match=msg):
            convert(src, tmp_path / "x", progress=False, low_rank=0.5, **kw)
        assert not os.path.exists(tmp_path / "x")
