"""SmoothQuant W8A8 (converters/smoothquant.py, runtime/kernels/w8a8.py) against direct NumPy
statements:

- smoothing is an exact float transform: a model converted with `--quant f32 --method
  smoothquant` gives the same logits as the plain f32 conversion (weights moved, outputs not);
- on inputs with outlier channels, smoothing lowers the error that per-token int8 activations
  add to a layer's outputs (layer level), and the W8A8 model it writes is closer to the float
  model than the unsmoothed per-token W8A8 model (end to end, through the runtime's kernels);
- the per-token kernels (decode matvec and FFN on int8 bundles; prefill) equal NumPy's
  per-token int8 arithmetic;
- bad input is refused before any work.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import edgellm
import tiny
from edgellm.converters import layerwise, smoothquant
from edgellm.converters.convert import convert
from edgellm.runtime import encodings, kernels
from edgellm.runtime.errors import ConvertError, EdgeLLMError
from edgellm.runtime.kernels import w8a8
from edgellm.runtime.reader import Matrix

OUTLIERS = (5, 23, 40)  # channels of d = 64 made 30x larger at every linear's input


def _np_token_q(x):
    """Independent statement: int8 codes and the per-token scale."""
    x = np.asarray(x, np.float64)
    sc = np.abs(x).max(axis=1, keepdims=True) / 127
    return np.rint(x / np.where(sc > 0, sc, 1)).astype(np.int64), sc


def _outlier_checkpoint(root):
    """tiny llama with outlier input channels: norm weights x30 on OUTLIERS, the columns they
    feed / 30 (the same float model, LLM-like activations)."""
    path = tiny.build("llama", root)
    f = os.path.join(path, "model.safetensors")
    w = load_file(f)
    for k in list(w):
        if k.endswith("input_layernorm.weight") or k.endswith("post_attention_layernorm.weight"):
            w[k] = w[k].copy()
            w[k][list(OUTLIERS)] *= 30
            p = k.rsplit(".", 2)[0]
            feeds = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
                     if "input_layernorm" in k else ("mlp.gate_proj", "mlp.up_proj"))
            for m in feeds:
                name = f"{p}.{m}.weight"
                w[name] = w[name].copy()
                w[name][:, list(OUTLIERS)] /= 30
    save_file(w, f)
    return path


@pytest.fixture(scope="module")
def outlier_src(tmp_path_factory):
    return _outlier_checkpoint(tmp_path_factory.mktemp("sq"))


def _logits(path, ids):
    return edgellm.load(path, kv="f32").logits(ids)


def test_smoothing_is_exact_in_float(tmp_path, outlier_src):
    ids = tiny.token_ids("llama", 24)
    ref = convert(outlier_src, tmp_path / "f32", quant="f32", progress=False)
    sm = convert(outlier_src, tmp_path / "sm", quant="f32", method="smoothquant",
                 progress=False, method_options={"tokens": 512})
    a, b = _logits(ref, ids), _logits(sm, ids)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    # the weights did move (the test could fail), and no activation quantization was asked for
    man = json.load(open(os.path.join(sm, "manifest.json")))
    assert "activation_quant" not in man
    r0 = edgellm.load(ref).runtime.layers[0].attn_norm[0]
    r1 = edgellm.load(sm).runtime.layers[0].attn_norm[0]
    assert np.abs(r0 - r1).max() > 0.1


def test_smoothing_lowers_token_quant_error(outlier_src):
    """Layer level: ||Q_tok(X) W^T - X W^T|| with and without the smoothing of apply()."""
    with layerwise.open_source(outlier_src) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=512, seq_len=128)
        layer = next(layerwise.Walk(source, spec, seqs).layers())
        before = {n: (layer.inputs(n).copy(), layer.weights[n].copy())
                  for n in ("attn_q", "ffn_up")}
        ref = {n: X @ W.T for n, (X, W) in before.items()}
        report = smoothquant.apply(layer, alpha=0.5)
        for n, (X, W) in before.items():
            Xs, Ws = layer.inputs(n), layer.weights[n]
            np.testing.assert_allclose(Xs @ Ws.T, ref[n], rtol=1e-4, atol=1e-4)  # exact
            e0 = np.linalg.norm(w8a8.quantize_rows(X) @ W.T - ref[n])
            e1 = np.linalg.norm(w8a8.quantize_rows(Xs) @ Ws.T - ref[n])
            assert e1 < 0.5 * e0, (n, e0, e1)
    assert report["qkv"]["max_over_median_before"] > 10
    assert report["qkv"]["max_over_median_after"] < report["qkv"]["max_over_median_before"] / 3


def test_w8a8_model_closer_with_smoothing(tmp_path, outlier_src):
    """End to end through the runtime's per-token kernels (decode and prefill)."""
    ids = tiny.token_ids("llama", 16)
    ref = _logits(convert(outlier_src, tmp_path / "f32", quant="f32", progress=False), ids)
    plain = convert(outlier_src, tmp_path / "w8a8", quant="int8", method="w8a8", progress=False)
    sm = convert(outlier_src, tmp_path / "sq", quant="int8", method="smoothquant",
                 progress=False, method_options={"tokens": 512})
    man = json.load(open(os.path.join(sm, "manifest.json")))
    assert man["activation_quant"] == {"bits": 8, "granularity": "token"}
    errs = {}
    for name, path in (("plain", plain), ("sq", sm)):
        m = edgellm.load(path, kv="f32")
        assert m.runtime.act_token and not m.runtime.fused
        pre = m.logits(ids)  # prefill
        rt = m.runtime
        rt.reset()
        dec = np.concatenate([rt.forward([t]) for t in ids])  # decode, one token at a time
        # the layers are per-token in both; the head is not in the per-token mode: its input is
        # quantized per block of 32 at decode and not at all in prefill (as in the default int8
        # path), which moves these logits by ~0.5% of their range (measured 0.04 of 7.3)
        np.testing.assert_allclose(dec, pre, rtol=1e-3, atol=2e-2 * np.abs(pre).max())
        errs[name] = float(np.abs(dec - ref).mean())
    assert errs["sq"] < 0.7 * errs["plain"], errs


@pytest.mark.parametrize("d", [96, 80])  # 80: a tail of 16 values after the SIMD blocks
def test_matvec_matches_numpy(d):
    rng = np.random.default_rng(d)
    n = 40
    c = encodings.codec("int8")
    q, s = c.quantize(rng.standard_normal((n, d)).astype(np.float32))
    m = Matrix(q, s, c, (n, d))
    x = rng.standard_normal((1, d)).astype(np.float32)
    x[0, 7] = 25.0  # an outlier channel
    xq, sx = _np_token_q(x)
    want = (xq @ q.astype(np.int64).T) * sx * s[None, :].astype(np.float64)
    got = w8a8.linear(m, x)  # decode kernel
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    X = rng.standard_normal((5, d)).astype(np.float32)
    xq, sx = _np_token_q(X)
    want = (xq @ q.astype(np.int64).T) * sx * s[None, :].astype(np.float64)
    np.testing.assert_allclose(w8a8.linear(m, X), want, rtol=1e-4, atol=1e-4)  # prefill


@pytest.mark.parametrize("gated", [True, False])
def test_ffn_matches_numpy(gated):
    rng = np.random.default_rng(3)
    d, n = 64, 96
    c = encodings.codec("int8")
    vec = {p: rng.standard_normal((n, d)).astype(np.float32) / 8 for p in ("gate", "up", "down")}
    names = ("gate", "up", "down") if gated else ("up", "down")
    b, layout = encodings.pack_bundles({p: vec[p] for p in names}, [(p, c) for p in names], d)
    dec = {p: c.dequantize(*c.quantize(vec[p])).astype(np.float64) for p in names}
    bias = rng.standard_normal(n).astype(np.float32) if not gated else None
    act = "silu" if gated else "relu"
    X = rng.standard_normal((3, d)).astype(np.float32)
    xq, sx = _np_token_q(X)
    xd = xq * sx  # what the gate/up rows meet
    u = xd @ dec["up"].T
    if gated:
        g = xd @ dec["gate"].T
        h = g / (1 + np.exp(-g)) * u
    else:
        h = np.maximum(u + bias, 0)
    want = h @ dec["down"]  # hidden values meet the down columns in float
    for t in range(3):  # decode
        got = w8a8.ffn(X[t:t + 1], b, layout, d, act, gated, bias)
        np.testing.assert_allclose(got[0], want[t], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w8a8.ffn(X, b, layout, d, act, gated, bias), want,
                               rtol=1e-4, atol=1e-4)  # prefill
    # and it is not the default per-block path (the test could tell them apart)
    assert not np.allclose(kernels.ffn(X[:1], b, layout, d, act, gated, bias)[0], want[0],
                           rtol=1e-6, atol=1e-7)


def test_bad_input(tmp_path):
    src = tiny.checkpoint("llama")
    for kw, msg in (({"quant": "int4", "method": "smoothquant"}, "W8A8"),
                    ({"quant": "f32", "method": "w8a8"}, "W8A8"),
                    ({"quant": "int8", "method": "smoothquant",
                      "method_options": {"alpha": 1.5}}, "alpha")):
        with pytest.raises(ConvertError, match=msg):
            convert(src, tmp_path / "x", progress=False, **kw)
        assert not os.path.exists(tmp_path / "x")
    # a manifest asking for an activation quantization this runtime does not know
    dst = convert(src, tmp_path / "m", quant="int8", method="w8a8", progress=False)
    p = os.path.join(dst, "manifest.json")
    man = json.load(open(p))
    man["activation_quant"] = {"bits": 4, "granularity": "token"}
    json.dump(man, open(p, "w"))
    with pytest.raises(EdgeLLMError, match="activation_quant"):
        edgellm.load(dst)
