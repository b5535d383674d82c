"""Fused decode (runtime/kernels/fused.py): one kernel call per layer gives bit for bit the
logits of the general path (a wrapper call per operation), which tests/test_kernels.py and the
model tests check against the NumPy reference, transformers and llama.cpp; layers it does not
take run the general path; the float16 KV-cache store equals NumPy's conversion."""

import numba
import numpy as np
import pytest

import edgellm
import tiny
from edgellm.runtime import kernels
from edgellm.runtime import threads as thread_rules
from edgellm.runtime.errors import EdgeLLMError
from edgellm.runtime.kernels import fused, simd, team

pytestmark = pytest.mark.skipif(not simd.AVAILABLE, reason="the fused call needs the JIT "
                                "(NUMBA_DISABLE_JIT=1 runs the general path only)")


def decode_logits(model, ids, steps, fused_on):
    """Logits of a prefill of ids then `steps` greedy decode steps, each f32[V]."""
    rt = model.runtime
    rt.fused = fused_on
    rt.reset()
    out = [rt.forward(ids)[-1].copy()]
    for _ in range(steps):
        out.append(rt.forward([int(np.argmax(out[-1]))])[-1].copy())
    return np.array(out)


def check_equal(path, kv, name, steps=10):
    m = edgellm.load(path, kv=kv)
    ids = tiny.token_ids(name, 12)
    general = decode_logits(m, ids, steps, False)
    got = decode_logits(m, ids, steps, True)
    plans = m.runtime._fused_plans[0]
    assert plans is not None and all(p is not None for p in plans), "a layer was not fused"
    assert np.array_equal(got.view(np.uint32), general.view(np.uint32))
    return m


@pytest.mark.parametrize("name,quant,kv", [
    ("llama", "int4", "int8"),
    ("llama_relu", "int8", "f32"),
    ("qwen2", "int8", "f16"),  # q/k/v biases, tied head
])
def test_fused_equals_general_path(name, quant, kv):
    check_equal(tiny.converted(name, quant), kv, name)


def test_fused_generic_mode(monkeypatch):
    """The target-independent flavour of the SIMD kernels (what a CPU without AVX2 runs)."""
    monkeypatch.setattr(kernels, "MODE", "generic")
    check_equal(tiny.converted("llama", "int4"), "f16", "llama", steps=4)


@pytest.mark.parametrize("qtype", ["Q4_1"])
def test_fused_gguf_keep(tmp_path, qtype):
    """--quant keep: q4_1 / q8_0 matrices and the down projection as a matrix of its own."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf_from_hf

    from edgellm.converters.convert import convert

    src = write_gguf_from_hf("llama", tmp_path / "q.gguf", getattr(gguf.GGMLQuantizationType,
                                                                   qtype))
    m = check_equal(convert(src, tmp_path / "keep", quant="keep", progress=False), "f16",
                    "llama", steps=6)
    assert m.runtime.layers[0].ffn.down is not None


@pytest.mark.parametrize("name,quant", [
    ("opt", "int8"),  # layer norm, learned positions
    ("llama", "f32"),  # f32 weights: BLAS, not the SIMD kernels
])
def test_layers_not_fused_run_the_general_path(name, quant):
    m = edgellm.load(tiny.converted(name, quant))
    ids = tiny.token_ids(name, 8)
    a = decode_logits(m, ids, 3, False)
    b = decode_logits(m, ids, 3, True)
    assert all(p is None for p in m.runtime._fused_plans[0])
    assert np.array_equal(a, b)


def test_f16_store_equals_numpy():
    """The cache's float16 bits equal NumPy's astype (round to nearest even) over normal,
    subnormal, halfway and boundary values; values past float16's range are refused."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= 65504)]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)].astype(np.float32)
    mid = (h[:-1] + h[1:]) / 2  # halfway between neighbours (ties to even), and just beside
    x = np.concatenate([x, h, mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf),
                        np.float32([0.0, -0.0, 65504, -65504, 2.0 ** -25, 2.0 ** -26,
                                    6.1e-5, 5.96e-8])]).astype(np.float32)
    c = np.zeros((1, x.size, 1), dtype=np.uint16)
    assert fused.store_f16(x.reshape(-1, 1, 1), 0, c)
    assert np.array_equal(c.ravel(), x.astype(np.float16).view(np.uint16))
    assert not fused.store_f16(np.float32([1.0, 65520.0]).reshape(2, 1, 1), 0, c)


@pytest.mark.parametrize("threads", [1, 2])
def test_f16_overflow_is_a_clear_error(threads, monkeypatch):
    """A key or value past float16's range: the same message as the general path's store
    (decode_layer on 1 thread; on 2, tiny layers taken as large ones, the team: team.py)."""
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("NUMBA_NUM_THREADS < 2")
    monkeypatch.setattr(thread_rules, "SMALL_LAYER_BYTES", 0)
    before = numba.get_num_threads()
    m = edgellm.load(tiny.converted("llama", "int8"), kv="f16", threads=threads)
    rt = m.runtime
    rt.reset()
    rt.forward(tiny.token_ids("llama", 4))
    rt.forward([5])  # a decode step: the layers' plans are made
    plans, _, memo = rt._fused_plans[:3]
    assert memo[0][1][0] is (fused.decode_layer if threads == 1 else team.decode_team)
    arrays = plans[0][1]
    big = arrays["anorm"] * np.float32(1e8)  # q, k, v far out of range
    big.flags.writeable = arrays["anorm"].flags.writeable  # the same compiled signature
    arrays["anorm"] = big
    memo[0] = None
    try:
        with pytest.raises(EdgeLLMError, match="float16 range"):
            rt.forward([5])
    finally:
        numba.set_num_threads(before)
