"""FFN row skipping with everything resident (runtime/rowskip.py): the low-rank predictor's
rows give exactly PredictedFFN's output (fused decode and the general path alike); the SiLU
magnitude threshold computes exactly the rows whose |silu(gate h)| is above it, as the FFN kernel
over those rows does; --threads holds in a thread other than the loader's."""

import threading

import numba
import numpy as np
import pytest

import edgellm
import tiny
from edgellm.runtime import kernels, rowskip, threads
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


@needs_jit
def test_silu_threshold_rows():
    path = calibrated("llama", False, quant="int8", sparsity=0.5)
    m = edgellm.load(path)
    rt = m.runtime
    assert rowskip.enable(rt) == rt.cfg.n_layers
    rng = np.random.default_rng(0)
    for L in rt.layers:
        skip, p = L.ffn, L.ffn.predictor
        assert p.kind == "threshold"
        for _ in range(4):
            h = rng.standard_normal((1, rt.cfg.d_model)).astype(np.float32)
            idx = p.active(h[0])
            assert 0 < idx.size < skip.base.bundles.shape[0]
            skip.reset_counts()
            got = skip(h)
            assert skip.sparse["kept"][0] == idx.size  # exactly those rows computed
            b = skip.base
            want = kernels.ffn(h, b.bundles[idx], b.layout, rt.cfg.d_model, rt.cfg.activation,
                               rt.cfg.gated_ffn)
            # same products, summed in other chunks: float32 rounding of the sum only
            assert np.allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


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
