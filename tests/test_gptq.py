"""Calibrated quantization (converters/gptq.py, awq.py, calibquant.py) against direct NumPy
statements of what each promises, on the inputs the layerwise pass gives on tiny checkpoints:

- GPTQ's layer reconstruction error ||X W^T - X Q^T|| is below round-to-nearest's on the same
  layer (int4 and int3, with and without act-order, rows and the down projection by columns), and
  what it returns is exactly what its (q, s) decode to, on the codec's grid;
- AWQ's scaling is exact in float (the layer computes the same before rounding), and its
  activation-weighted error is below RTN's (inputs with outlier channels, as LLMs have, and the
  tiny model's own layer);
- `edgellm convert --method gptq|awq` writes a model that loads, with the method in provenance;
- bad input (group size not dividing, calibration text too short, awq at int3, a method for
  int8, bad dampening) is refused before anything is written.
"""

import os

import numpy as np
import pytest

import edgellm
import tiny
from clirun import edgellm_cli
from edgellm.converters import awq, calibquant, gptq, layerwise
from edgellm.converters.convert import convert
from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError


def _err(X, w, wq):
    d = X.astype(np.float64) @ (w.astype(np.float64) - wq).T
    return float(np.sqrt((d * d).sum()))


def _rtn(c, w, columns=False):
    return awq.round_trip(c, w, columns)


@pytest.fixture(scope="module")
def layer0():
    """Layer 0 of tiny llama_relu (d 128, d_ff 256) with 1024 calibration tokens."""
    with layerwise.open_source(tiny.checkpoint("llama_relu")) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=1024, seq_len=128)
        walk = layerwise.Walk(source, spec, seqs)
        layer = next(walk.layers())
        X = {n: layer.inputs(n).copy() for n in layerwise.LINEARS}
        H = {n: layer.hessian(n).copy() for n in layerwise.LINEARS}
        W = {n: layer.weights[n].copy() for n in layerwise.LINEARS}
        yield X, H, W, spec.config


@pytest.mark.parametrize("quant", ["int4", "int3"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_below_rtn(layer0, quant, act_order):
    X, H, W, _ = layer0
    c = encodings.codec(quant, 32)
    for n in ("attn_q", "attn_o", "ffn_up", "ffn_down"):
        columns = n == "ffn_down"
        wq, (c2, q, s) = gptq.quantize(W[n], H[n], c, act_order=act_order, columns=columns)
        dec = c.dequantize(q, s)
        assert np.array_equal(dec.T if columns else dec, wq)  # stored exactly as returned
        if act_order and not columns:  # static groups: scales by the writer rule on w
            assert np.array_equal(s, c.scales(W[n]))
        e_gptq, e_rtn = _err(X[n], W[n], wq), _err(X[n], W[n], _rtn(c, W[n], columns))
        assert e_gptq < 0.95 * e_rtn, (n, e_gptq, e_rtn)


def test_gptq_dead_inputs_and_groups():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 64)).astype(np.float32)
    X[:, 5] = 0  # an input channel that is never active
    w = rng.standard_normal((32, 64)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / 512
    c = encodings.codec("int4", 64)
    wq, _ = gptq.quantize(w, H, c, act_order=False)
    assert not wq[:, 5].any()
    assert _err(X, w, wq) < _err(X, w, _rtn(c, w))
    with pytest.raises(ConvertError, match="not divisible"):
        gptq.quantize(w[:, :48], H[:48, :48], c)


def _outlier_inputs(n=awq.SEARCH_TOKENS, d=128, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, rng.choice(d, 4, replace=False)] *= 20  # a few salient channels
    return X


def test_awq_scale_lowers_weighted_error():
    X = _outlier_inputs()
    w = np.random.default_rng(1).standard_normal((96, 128)).astype(np.float32) * 0.05
    c = encodings.codec("int4", 32)
    s, errs = awq.search_scale(X, [w], c)
    wq = _rtn(c, w * s) / s
    assert errs[0] == pytest.approx(_err(X, w, _rtn(c, w)) ** 2, rel=1e-3)  # alpha 0 is RTN
    assert _err(X, w, wq) < 0.8 * _err(X, w, _rtn(c, w))


def test_awq_layer_exact_in_float_and_below_rtn(layer0):
    X, _, W, cfg = layer0
    c = encodings.codec("int4", 32)
    with layerwise.open_source(tiny.checkpoint("llama_relu")) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=1024, seq_len=128)
        layer = next(layerwise.Walk(source, spec, seqs).layers())
        before = layer.output().copy()
        awq.apply(layer, c, clip=False)
        after = layer.output()
        assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()  # scaling is exact
        awq_err = rtn_err = 0.0
        for n in layerwise.LINEARS:
            cols = n == "ffn_down"
            Xs, Ws = layer.inputs(n), layer.weights[n]
            awq_err += _err(Xs, Ws, _rtn(c, Ws, cols)) ** 2
            rtn_err += _err(X[n], W[n], _rtn(c, W[n], cols)) ** 2
        assert awq_err < rtn_err


@pytest.mark.parametrize("quant,method", [("int4", "gptq"), ("int4", "awq"), ("int3", "gptq")])
def test_convert_method(tmp_path, quant, method):
    dst = convert(tiny.checkpoint("llama"), tmp_path / "m", quant=quant, method=method,
                  progress=False, method_options={"tokens": 512, "seq_len": 64})
    m = edgellm.load(dst, kv="f32")
    prov = m.manifest["provenance"]["quantization"]
    assert prov["method"] == method and prov["calibrated"]["calibration_tokens"] >= 256
    assert m.manifest["chunks"][1]["tensors"]["attn_q"]["encoding"] == quant
    parts = m.manifest["chunks"][1]["tensors"]["ffn_bundles"]["parts"]
    assert {p["encoding"] for p in parts} == {quant}
    ids = tiny.token_ids("llama", n=16)
    ref = edgellm.load(tiny.converted("llama", "f32"), kv="f32").logits(ids)
    rtn = edgellm.load(tiny.converted("llama", quant) if quant == "int4" else
                       convert(tiny.checkpoint("llama"), tmp_path / "rtn", quant=quant,
                               progress=False), kv="f32").logits(ids)
    got = m.logits(ids)
    # same order of error as round to nearest (random weights: no salient structure to exploit)
    assert np.abs(got - ref).mean() < 1.5 * np.abs(rtn - ref).mean()


def test_bad_input(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    dst = tmp_path / "out"
    cases = [
        (dict(src="llama_odd_heads", quant="int4", group_size=64, method="gptq"), "does not divide"),
        (dict(src="llama", quant="int4", method="gptq", calib=str(short)), "too short"),
        (dict(src="llama", quant="int3", method="awq"), "awq is for int4"),
        (dict(src="llama", quant="int8", method="gptq"), "int4 or int3"),
        (dict(src="llama", quant="int4", method="gptq", method_options={"damp": 0}), "dampening"),
        (dict(src="llama", quant="int4", method="sgd"), "not supported"),
    ]
    for kw, match in cases:
        src = tiny.checkpoint(kw.pop("src"))
        with pytest.raises(ConvertError, match=match):
            convert(src, dst, progress=False, **kw)
        assert not os.path.exists(dst)
    r = edgellm_cli("convert", tiny.checkpoint("llama"), "-o", str(dst), "--quant", "int4",
                    "--method", "gptq", "--calib", str(short))
    assert r.returncode != 0 and "too short" in r.stderr and not os.path.exists(dst)


def test_options_record():
    o = calibquant.options("gptq", "int3", 64, None, {"act_order": False})
    assert o.record()["act_order"] is False and o.group_size == 64
    assert calibquant.options("rtn", "int4", 32) is None
