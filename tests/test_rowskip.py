"""FFN row skipping with everything resident (runtime/rowskip.py): the low-rank predictor's
rows give exactly PredictedFFN's output (fused decode and the general path alike); the SiLU
magnitude threshold computes the rows whose |silu(gate h)| is above it, as a NumPy FFN over those
rows does, with the gates stored apart (ffn_gate, runtime/gateapart.py): that layout as written,
validated, computed densely and refused by streaming; --threads holds in a thread other than the
loader's."""

import copy
import dataclasses
import json
import os
import threading

import numba
import numpy as np
import pytest

import edgellm
import tiny
from edgellm.runtime import encodings, format, rowskip, threads
from edgellm.runtime.errors import EdgeLLMError, FormatError
from edgellm.runtime.kernels import simd
from edgellm.runtime.predictor import PredictedFFN, Predictor
from test_predictor import calibrated

needs_jit = pytest.mark.skipif(not simd.AVAILABLE, reason="row skipping runs the SIMD kernels "
                               "(NUMBA_DISABLE_JIT=1 has none)")


def decode(rt, ids, steps):
    rt.reset()
    out = [rt.forward(ids, all_logits=True)]
    for _ in range(steps):
        out.append(rt.forward([int(np.argmax(out[-1][-1]))]))
    return np.concatenate(out)


@needs_jit
def test_predictor_rows_equal_predicted_ffn():
    path = calibrated("llama_relu", True, quant="int8")
    m = edgellm.load(path, kv="f32")
    rt = m.runtime
    ids = tiny.token_ids("llama_relu", 10)
    assert rowskip.enable(rt, prefill="sparse") == rt.cfg.n_layers
    fused_on = decode(rt, ids, 8)
    frac = rowskip.stats(rt)
    rt.fused = False
    general = decode(rt, ids, 8)
    rowskip.disable(rt)
    for i, L in enumerate(rt.layers):
        L.ffn = PredictedFFN(L.ffn, Predictor.load(rt.reader, rt.cfg, i))
    want = decode(rt, ids, 8)
    assert np.array_equal(general, want)
    assert np.array_equal(fused_on, want)
    assert all(0 < f < 1 for f in frac)  # rows were skipped, and some computed


def numpy_ffn(gate, up, down, h, thr=None):
    """The (thresholded) gated SiLU FFN in NumPy, weights f32 [n, d] (down: column i as row i):
    sum over rows i with |silu(g_i)| > thr of silu(g_i) (up_i . h) down_i."""
    g = h @ gate.T
    a = g / (1 + np.exp(-g))
    if thr is not None:
        a = np.where(np.abs(a) > thr, a, 0)
    return (a * (h @ up.T)) @ down, np.abs(g / (1 + np.exp(-g)))


def decoded(ffn, d):
    parts = {e["name"]: encodings.unpack_bundle_part(ffn.bundles, e, d) for e in ffn.layout}
    g = ffn.gate
    return g.codec.dequantize(g.q, g.s), parts["up"], parts["down"]


def test_gate_apart_layout_written():
    """SiLU thresholds without a predictor: the gates leave the bundles for ffn_gate, byte for
    byte (the uncalibrated conversion's gate rows, in the calibrated row order)."""
    path = calibrated("llama", False, quant="int8", sparsity=0.5)
    plain = edgellm.load(tiny.converted("llama", "int8", ffn_down="bundle"))
    m = edgellm.load(path)
    cfg = m.config
    assert json.load(open(os.path.join(path, "manifest.json")))["calibration"]["gate_apart"]
    for i, L in enumerate(m.runtime.layers):
        f, f0 = L.ffn, plain.runtime.layers[i].ffn
        assert [e["name"] for e in f.layout] == ["up", "down"] and f.gate.shape == (cfg.d_ff,
                                                                                  cfg.d_model)
        perm = m.reader.array(format.layer_chunk(i), "ffn_perm")
        e0 = next(e for e in f0.layout if e["name"] == "gate")
        q0, s0 = encodings.bundle_part(f0.bundles, e0, cfg.d_model)
        assert np.array_equal(f.gate.q, q0[perm]) and np.array_equal(f.gate.s, s0[perm])
        for name in ("up", "down"):
            e, e0 = (next(x for x in lay if x["name"] == name) for lay in (f.layout, f0.layout))
            assert all(np.array_equal(a, b[perm]) for a, b in
                       zip(encodings.bundle_part(f.bundles, e, cfg.d_model),
                           encodings.bundle_part(f0.bundles, e0, cfg.d_model)))


@pytest.mark.parametrize("fused_on", [True, False])
def test_gate_apart_dense_equals_bundled(fused_on):
    """Without row skipping a gate-apart model computes every row: the same logits as the
    uncalibrated conversion (decode in the fused call or the general path, and prefill), up to
    float32 summation order (rows are stored in another order). f16, not int8: with int8 the
    next layer quantizes its input to int8 per block, and a last-bit difference from the
    summation order can flip one rounding and move logits by ~1e-2 (seen in CI); f16 keeps the
    comparison at float32 rounding (test_silu_threshold_rows compiles the f16 path anyway)."""
    ids = tiny.token_ids("llama", 12)
    want = decode(edgellm.load(tiny.converted("llama", "f16"), kv="f32").runtime, ids, 6)
    rt = edgellm.load(calibrated("llama", False, quant="f16", sparsity=0.5), kv="f32").runtime
    rt.fused = fused_on
    got = decode(rt, ids, 6)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_jit
@pytest.mark.parametrize("quant", ["f16", "int8"])
def test_silu_threshold_rows(quant):
    """The skipping FFN computes the rows whose |silu(gate h)| is above the threshold, and gives
    the NumPy FFN over those rows (gates from ffn_gate, up and down from the bundles)."""
    path = calibrated("llama", False, quant=quant, sparsity=0.5)
    m = edgellm.load(path)
    rt = m.runtime
    d = rt.cfg.d_model
    assert rowskip.enable(rt) == rt.cfg.n_layers
    rng = np.random.default_rng(0)
    for L in rt.layers:
        skip, p = L.ffn, L.ffn.predictor
        assert p.kind == "threshold" and skip.sparse["mode"] == 3
        gate, up, down = decoded(skip.base, d)
        for _ in range(4):
            h = rng.standard_normal((1, d)).astype(np.float32)
            skip.reset_counts()
            got = skip(h)
            k = int(skip.sparse["kept"][0])
            rows = skip.arrays["rows"][:k]
            _, a = numpy_ffn(gate, up, down, h)
            want_rows = np.flatnonzero(a[0] > p.threshold)
            assert 0 < k < skip.base.bundles.shape[0]
            # f16: float32 activations, the same rows but for ties; int8: the activations are
            # quantized to int8 per block of 32 for the dot products, so rows within the
            # gate's error of the threshold may go either way
            margin = 1e-5 if quant == "f16" else 0.02 * np.abs(a).max()
            assert set(rows) ^ set(want_rows) <= set(np.flatnonzero(np.abs(a[0] - p.threshold)
                                                                   < margin))
            mask = np.zeros(a.shape[1], bool)
            mask[rows] = True
            want = (np.where(mask, (h @ gate.T) / (1 + np.exp(-(h @ gate.T))), 0)
                    * (h @ up.T)) @ down
            tol = 1e-4 if quant == "f16" else 3e-2
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        assert all(0 < f < 1 for f in rowskip.stats(rt) if f is not None)


def test_gate_apart_validation(tmp_path):
    path = calibrated("llama", False, quant="int8", sparsity=0.5)
    man = json.load(open(os.path.join(path, "manifest.json")))
    cfg = edgellm.load(path).config
    chunk = copy.deepcopy(man["chunks"][1])
    fake = str(tmp_path / "m")
    format._check_against_config(fake, chunk, cfg)  # as written: valid
    bad = copy.deepcopy(chunk)
    del bad["tensors"]["ffn_gate"]  # bundles without a gate part and no ffn_gate
    with pytest.raises(FormatError, match="ffn_bundles: bad parts"):
        format._check_against_config(fake, bad, cfg)
    bad = copy.deepcopy(chunk)
    bad["tensors"]["ffn_gate"]["shape"] = [cfg.d_model, cfg.d_ff]
    with pytest.raises(FormatError, match="ffn_gate: shape"):
        format._check_against_config(fake, bad, cfg)
    opt = dataclasses.replace(cfg, gated_ffn=False)
    with pytest.raises(FormatError, match="ffn_gate in a model whose FFN is not gated"):
        format._check_against_config(fake, chunk, opt)


def test_gate_apart_refused_when_streaming():
    path = calibrated("llama", False, quant="int8", sparsity=0.5)
    with pytest.raises(EdgeLLMError, match="gate is stored apart"):
        edgellm.load(path, dram_budget="1MB")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more threads")
def test_threads_hold_in_another_thread():
    """numba.set_num_threads is per thread: threads=1 given at load must hold where the server
    generates (its own thread)."""
    before = numba.get_num_threads()
    try:
        m = edgellm.load(tiny.converted("llama", "int8"), threads=1)
        seen = []

        def work():
            m.runtime.forward([1, 5, 7])
            seen.append(numba.get_num_threads())

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert seen == [1]
    finally:
        threads.set_threads(before)  # the rest of the session as it was
