"""TEAL-style input thresholds (`--sparsity-mode teal`; converters/teal.py, runtime/teal.py,
kernels/teal.py): the layout holds the dense int8 model's codes by input column; the kernel
computes what a NumPy FFN thresholded on its inputs computes (also under NUMBA_DISABLE_JIT=1);
the fused decode equals the general path; prefill stays dense; what cannot be converted or
streamed is refused with a clear message."""

import numpy as np
import pytest

import edgellm
import tiny
from childpytest import no_jit
from edgellm.converters.convert import convert
from edgellm.runtime import encodings, teal
from edgellm.runtime.errors import ConvertError, EdgeLLMError
from edgellm.runtime.kernels import qgemm, simd
from edgellm.runtime.kernels import teal as kt
from edgellm.runtime.kernels.ffn import SILU
from test_predictor import calib_text, calibrated, chunk, ffn_inputs

needs_jit = pytest.mark.skipif(not simd.AVAILABLE, reason="the fused decode runs the SIMD "
                               "kernels (NUMBA_DISABLE_JIT=1 has none)")
SPARSITY = 0.4


def model_path():
    return calibrated("llama", False, quant="int8", sparsity=SPARSITY, sparsity_mode="teal")


def numpy_teal(gate, up, down, h, t_in, t_hid, read_all=True):
    """The thresholded gated SiLU FFN in NumPy, weights f32 [n, d] (down: column i as row i):
    inputs with |h_j| <= t_in and hidden values with |v_i| <= t_hid count as zero, the latter
    (read_all) only for a token that keeps at most DENSE_DOWN of its hidden values (above, the
    kernel reads every down row and adds every hidden value)."""
    h = np.where(np.abs(h) > t_in, h, 0)
    g = h @ gate.T
    v = g / (1 + np.exp(-g)) * (h @ up.T)
    keep = np.abs(v) > t_hid
    if read_all:
        keep |= keep.sum(axis=-1, keepdims=True) > kt.DENSE_DOWN * v.shape[-1]
    return np.where(keep, v, 0) @ down


def weights(f):
    """A TealFFN's weights decoded, f32 [n, d] each (down: column i as row i)."""
    n = f.cfg.d_ff
    w = f.cols.astype(np.float32).T * f.cscale[:, None]  # [2n, d]
    return w[:n], w[n:], f.dq.astype(np.float32) * f.ds[:, None]


def test_layout_holds_the_int8_codes():
    """gate and up by input column and down by column: the plain int8 conversion's codes and
    scales, moved (rows in the calibrated order, ffn_perm), nothing re-rounded."""
    path = model_path()
    plain = edgellm.load(tiny.converted("llama", "int8", ffn_down="bundle"))
    m = edgellm.load(path)
    cfg = m.config
    d, n = cfg.d_model, cfg.d_ff
    for i in range(cfg.n_layers):
        arrays = chunk(path, i)
        assert "ffn_bundles" not in arrays
        perm = arrays["ffn_perm"]
        L = plain.runtime.layers[i].ffn
        parts = {e["name"]: e for e in L.layout}
        (gq, gs), (uq, us), (dq, ds) = (encodings.bundle_part(L.bundles, parts[k], d)
                                        for k in ("gate", "up", "down"))
        cols = arrays[teal.IN_COLS]
        assert cols.dtype == np.int8 and cols.shape == (d, 2 * n)
        assert np.array_equal(cols[:, :n], gq[perm].T)
        assert np.array_equal(cols[:, n:], uq[perm].T)
        assert np.array_equal(arrays[teal.IN_SCALES], np.concatenate([gs[perm], us[perm]]))
        assert np.array_equal(arrays[teal.DOWN_COLS], dq[perm])
        assert np.array_equal(arrays[teal.DOWN_COLS + ".scales"], ds[perm])
        t_in, t_hid = arrays[teal.THRESHOLD]
        assert t_in > 0 and t_hid > 0
    assert m.manifest["calibration"]["sparsity_mode"] == "teal"


def test_kernel_equals_numpy_on_ffn_inputs():
    """Every layer, on real FFN inputs: the kernel equals the NumPy thresholded FFN; around the
    target sparsity of inputs and hidden values is dropped; negative thresholds keep all."""
    m = edgellm.load(model_path(), kv="f32")
    rt = m.runtime
    seen = ffn_inputs(m, tiny.token_ids("llama", 12))
    for i, L in enumerate(rt.layers):
        f = L.ffn
        assert isinstance(f, teal.TealFFN)
        gate, up, down = weights(f)
        H = seen[i]
        t_in, t_hid = f.stored
        f.reset_counts()
        got = np.concatenate([f(h[None]) for h in H])
        want = numpy_teal(gate, up, down, H, t_in, t_hid)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        kin, khid = f.fractions()
        assert 0.3 < kin < 0.9 and 0.3 < khid <= 1, (kin, khid)  # down: all rows above 35%
        f.scale_thresholds(-1.0)
        got = np.concatenate([f(h[None]) for h in H])
        dense = numpy_teal(gate, up, down, H, -1, -1)
        np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
        np.testing.assert_allclose(f.dense(H), dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
        f.scale_thresholds(1.0)


def test_dense_prefill_equals_plain_model(monkeypatch):
    """Prefill is dense by default: the same logits as the plain int8 conversion (prefill there
    decodes the same codes), up to float summation order. Float activations in both (the plain
    model's FFN would take the integer GEMM, TEAL's column layout does not)."""
    monkeypatch.setattr(qgemm, "ENABLED", False)
    ids = tiny.token_ids("llama", 12)
    want = edgellm.load(tiny.converted("llama", "int8", ffn_down="bundle"), kv="f32").runtime.forward(
        ids, all_logits=True)
    got = edgellm.load(model_path(), kv="f32").runtime.forward(ids, all_logits=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_jit
def test_fused_decode_equals_general_path():
    m = edgellm.load(model_path(), kv="f32")
    rt = m.runtime
    ids = tiny.token_ids("llama", 10)

    def run():
        rt.reset()
        out = [rt.forward(ids)]
        for _ in range(6):
            out.append(rt.forward([int(np.argmax(out[-1][-1]))]))
        return np.concatenate(out)

    fused_on = run()
    assert all(p is not None for p in rt._fused_plans[0])  # every layer took the fused call
    rt.fused = False
    general = run()
    np.testing.assert_allclose(fused_on, general, rtol=1e-5, atol=1e-5)
    assert teal.enable(rt, prefill="sparse") == rt.cfg.n_layers
    sparse_prefill = rt.forward(ids, all_logits=True)
    assert np.isfinite(sparse_prefill).all()
    assert all(0 < a < 1 and 0 < b <= 1 for a, b in teal.stats(rt))


def random_ffn(rng, d, n):
    """A random int8 FFN in the kernel's layout: gate|up codes by input column [d, 2n] and their
    scales, down rows [n, d] and scales; and the gate|up weights as float32 rows [2n, d]."""
    cols = rng.integers(-127, 128, (d, 2 * n)).astype(np.int8)
    cs = rng.uniform(0.001, 0.01, 2 * n).astype(np.float32)
    dq = rng.integers(-127, 128, (n, d)).astype(np.int8)
    ds = rng.uniform(0.001, 0.01, n).astype(np.float32)
    return cols, cs, dq, ds, cols.astype(np.float32).T * cs[:, None]


def test_kernel_branches_tiny():
    """The kernel against NumPy, both ways of reading the down rows (again as plain Python in
    test_no_jit_kernel)."""
    rng = np.random.default_rng(3)
    d, n = 32, 48
    cols, cs, dq, ds, w = random_ffn(rng, d, n)
    x = rng.standard_normal(d).astype(np.float32)
    branches = set()
    for t_hid in (0.02, 0.2, 0.5, 1.0, 2.0):
        thr = np.array([0.5, t_hid], np.float32)
        kept = np.zeros(3, np.int64)
        out = kt.ffn_teal(x, cols, cs, dq, ds, thr, SILU, np.empty(2 * n, np.float32),
                          np.empty(n, np.int32), np.empty(n, np.float32),
                          np.empty((2, d), np.float32), kept)
        h = np.where(np.abs(x) > thr[0], x, 0)
        g, u = w[:n] @ h, w[n:] @ h
        v = g / (1 + np.exp(-g)) * u
        nz = (np.abs(v) > thr[1]).sum()
        read_all = nz > kt.DENSE_DOWN * n
        branches.add(bool(read_all))
        if not read_all:  # else every down row is read and every value added
            v = np.where(np.abs(v) > thr[1], v, 0)
        want = v @ (dq.astype(np.float32) * ds[:, None])
        assert np.allclose(out, want, rtol=1e-4, atol=1e-5), (t_hid, out, want)
        assert kept[0] == (np.abs(x) > thr[0]).sum()
        assert kept[2] == (n if read_all else nz)
    assert branches == {True, False}, branches


def test_no_jit_kernel():
    """The kernel as plain Python (NUMBA_DISABLE_JIT=1) against NumPy, in a child process."""
    assert no_jit(__file__, "tiny and not no_jit") == 1


def test_kernel_random_threads_and_groups():
    """Input counts not a multiple of the 4-column group, several partial sums (threads)."""
    rng = np.random.default_rng(0)
    d, n = 64, 96
    cols, cs, dq, ds, w = random_ffn(rng, d, n)
    for t_in, t_hid in ((-1.0, 0.01), (0.3, 0.01), (1.0, 0.05), (10.0, 0.01), (0.3, -1.0),
                        (0.3, 0.2)):
        x = rng.standard_normal(d).astype(np.float32)
        thr = np.array([t_in, t_hid], np.float32)
        for threads in (1, 3):
            out = kt.ffn_teal(x, cols, cs, dq, ds, thr, SILU, np.empty(2 * n, np.float32),
                              np.empty(n, np.int32), np.empty(n, np.float32),
                              np.empty((threads, d), np.float32), np.zeros(3, np.int64))
            want = numpy_teal(w[:n], w[n:], dq.astype(np.float32) * ds[:, None], x, t_in, t_hid)
            # float32 sums in another order, with fused multiply-adds: relative to the scale
            np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_split_by_output_error():
    """converters/teal.thresholds, split="error": per layer the byte-weighted sparsity
    (2 s_in + s_hid) / 3 is the target, the thresholds are the quantiles of those fractions of
    |h| and of the hidden values, and the FFN's output (NumPy) is no further from the dense FFN
    than with the uniform split; "uniform" is s_in = s_hid = S. Real FFN inputs, every layer."""
    from edgellm.converters import teal as ct
    from edgellm.runtime import predictor as rp

    m = edgellm.load(tiny.converted("llama", "int8", ffn_down="bundle"), kv="f32")
    cfg = m.config
    seen = ffn_inputs(m, tiny.token_ids("llama", 48))
    for i, L in enumerate(m.runtime.layers):
        H = seen[i]
        parts = {e["name"]: e for e in L.ffn.layout}
        gate, up, down = (encodings.unpack_bundle_part(L.ffn.bundles, parts[k], cfg.d_model)
                          for k in ("gate", "up", "down"))
        want = numpy_teal(gate, up, down, H, -1, -1)

        def err(t_in, t_hid):
            # the split's measure: the hidden threshold applied to every token
            got = numpy_teal(gate, up, down, H, t_in, t_hid, read_all=False)
            return float(np.square(got - want).sum())

        def hidden(t_in):
            h = np.where(np.abs(H) > t_in, H, 0)
            return rp.activation(h @ gate.T, cfg.activation) * (h @ up.T)

        got = {}
        for split in ct.SPLITS:
            t_in, t_hid, s_in, s_hid = ct.thresholds(cfg, L.ffn.bundles, L.ffn.layout, H,
                                                     SPARSITY, np.random.default_rng(0), split)
            assert (2 * s_in + s_hid) / 3 == pytest.approx(SPARSITY)
            if s_in > 0:
                assert t_in == pytest.approx(np.quantile(np.abs(H), s_in), rel=1e-6)
            else:
                assert t_in < 0
            assert t_hid == pytest.approx(np.quantile(np.abs(hidden(t_in)), s_hid), rel=1e-5)
            got[split] = (err(t_in, t_hid), s_in, s_hid)
        assert got["uniform"][1:] == (SPARSITY, SPARSITY)
        assert got["error"][0] <= got["uniform"][0] * (1 + 1e-4)


def test_refused(tmp_path):
    """teal needs int8 FFN weights with down in the bundles, no predictor; a TEAL model does
    not stream."""
    src = tiny.checkpoint("llama")
    text = calib_text(tiny._root())
    opts = {"tokens": 256, "seq_len": 64, "sparsity": 0.4, "sparsity_mode": "teal"}
    with pytest.raises(ConvertError, match="int8"):
        convert(src, tmp_path / "a", quant="f16", calib=text, calib_options=opts)
    with pytest.raises(ConvertError, match="ffn-down matrix"):
        convert(src, tmp_path / "b", quant="int8", calib=text, calib_options=opts,
                ffn_down="matrix")
    with pytest.raises(ConvertError, match="predictor"):
        convert(src, tmp_path / "c", quant="int8", calib=text, calib_options=opts,
                predictor=True)
    with pytest.raises(ConvertError, match="sparsity mode"):
        convert(src, tmp_path / "d", quant="int8", calib=text,
                calib_options={**opts, "sparsity_mode": "fast"})
    with pytest.raises(ConvertError, match="teal split"):
        convert(src, tmp_path / "e", quant="int8", calib=text,
                calib_options={**opts, "teal_split": "even"})
    for bad in (0.97, 1.0, -0.1):
        with pytest.raises(ConvertError, match="sparsity"):
            convert(src, tmp_path / "f", quant="int8", calib=text,
                    calib_options={**opts, "sparsity": bad})
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c",
                                        tmp_path / "e", tmp_path / "f"))
    with pytest.raises(EdgeLLMError, match="stream"):
        edgellm.load(model_path(), dram_budget="200KB")
