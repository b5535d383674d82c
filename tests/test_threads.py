"""runtime/threads.py: --threads N for Numba and BLAS, fewer threads where they cannot help
(small decoded layers, cores taken by other processes), without changing any result."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import tiny
from threadpoolctl import threadpool_info

import edgellm
from edgellm.runtime import kernels, threads

needs2 = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more threads")


def blas_threads():
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


@pytest.fixture
def two_threads():
    before = numba.get_num_threads()
    threads.set_threads(2)
    yield
    threads.set_threads(before)


def test_openblas_sleeps_at_once_when_edgellm_comes_first():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when numpy loads it: importing edgellm sets it
    first (a child process: this one imported numpy long ago); a user's value wins."""
    code = ("import os, edgellm; import numpy; from edgellm.runtime import threads; "
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], threads.blas_sleeps())")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    cwd = os.path.dirname(os.path.abspath(__file__))  # tests/: the installed edgellm
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=120)
    assert out.stdout.split() == ["4", "True"], out.stderr
    env["OPENBLAS_THREAD_TIMEOUT"] = "20"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=120)
    assert out.stdout.split() == ["20", "False"], out.stderr
    code = "import numpy, edgellm; from edgellm.runtime import threads; print(threads.blas_sleeps())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         timeout=120)
    assert out.stdout.split() == ["False"], out.stderr  # numpy first: too late


def test_free_cores_reads_running_tasks(tmp_path, monkeypatch):
    f = tmp_path / "loadavg"
    monkeypatch.setattr(threads, "LOADAVG", str(f))
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    for running, free in ((1, 2), (2, 1), (9, 1)):  # this thread is one of the running
        f.write_text(f"3.10 2.00 1.50 {running}/300 4242\n")
        assert threads.free_cores() == free
    f.write_text("garbage")
    assert threads.free_cores() == 2  # unknown: every core
    monkeypatch.setattr(threads, "LOADAVG", str(tmp_path / "none"))
    assert threads.free_cores() == 2


def test_small_layers_decode_on_one_thread(monkeypatch, two_threads):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("EDGELLM_FIXED_THREADS", raising=False)
    assert threads.decode_layer_threads(threads.SMALL_LAYER_BYTES - 1) == 1
    assert threads.decode_layer_threads(threads.SMALL_LAYER_BYTES) == 2
    assert threads.decode_layer_threads(1, teams=True) == 2  # one wake-up a token
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")  # spinning waits: waking is cheap
    assert threads.decode_layer_threads(1) == 2
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("EDGELLM_FIXED_THREADS", "1")
    assert threads.decode_layer_threads(1) == 2


def test_layer_bytes_is_the_largest_layer_file():
    """The thread choice reads the manifest, so mapped, in-memory and streamed loads of a
    model agree (test_flash.test_streaming_is_exact compares their logits bit for bit)."""
    path = tiny.converted("llama", "int8")
    m = edgellm.load(path)
    files = [f for f in os.listdir(path) if f.startswith("layer_")]
    want = max(os.path.getsize(os.path.join(path, f)) for f in files)
    assert threads.layer_bytes(m.runtime.reader.manifest) == want > 0


@needs2
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_results_do_not_depend_on_free_cores(quant, monkeypatch, two_threads):
    """adapt() lowers BLAS's thread count for prefill and Numba's for the head only, where the
    results are bit for bit those of any count; decoded layers keep the count asked for (their
    FFN sums partials per thread). Same logits with 1 or 2 cores free, layers on 2 threads."""
    monkeypatch.setattr(threads, "SMALL_LAYER_BYTES", 0)  # tiny layers on 2 threads too
    monkeypatch.delenv("EDGELLM_FIXED_THREADS", raising=False)
    m = edgellm.load(tiny.converted("llama", quant), threads=2)
    rt = m.runtime
    ids = tiny.token_ids("llama", n=40)
    seen = []
    out = {}
    for free in (2, 1):
        monkeypatch.setattr(threads, "free_cores", lambda free=free: free)
        rt.reset()
        logits = [rt.forward(ids, all_logits=True)]
        seen.append((numba.get_num_threads(), blas_threads()))
        for t in (3, 9, 27):
            logits.append(rt.forward([t]))
        out[free] = np.concatenate(logits)
        assert numba.get_num_threads() == 2 and set(blas_threads()) == {2}  # restored
    np.testing.assert_array_equal(out[1], out[2])


@needs2
def test_adapt_lowers_blas_in_prefill_and_numba_in_decode(monkeypatch, two_threads):
    monkeypatch.delenv("EDGELLM_FIXED_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    m = edgellm.load(tiny.converted("llama", "int8"), threads=2)
    inside = []
    layers = m.runtime._layers

    def spy(ids):
        inside.append((ids.size, numba.get_num_threads(), blas_threads()))
        return layers(ids)

    m.runtime._layers = spy
    m.runtime.forward(tiny.token_ids("llama", n=8))
    m.runtime.forward([5])
    assert inside == [(8, 2, [1] * len(blas_threads())), (1, 1, inside[1][2])]
    assert numba.get_num_threads() == 2 and set(blas_threads()) == {2}
    monkeypatch.setenv("EDGELLM_FIXED_THREADS", "1")  # measurements: exactly N
    inside.clear()
    m.runtime.forward([6])
    assert inside[0][1] == 2


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_prefill_last_token_uses_float_activations(quant):
    """A prefill's logits (last token only) equal its all-positions logits' last row up to
    float32 summation order: the head's one-row product takes float activations as the rest of
    prefill does, not decode's int8 blocks (which moved them by ~0.5% of the logit scale)."""
    rt = edgellm.load(tiny.converted("llama", quant)).runtime
    ids = tiny.token_ids("llama", 12)
    rt.reset()
    last = rt.forward(ids)
    rt.reset()
    every = rt.forward(ids, all_logits=True)
    scale = np.abs(every[-1]).max()
    assert np.abs(last[0] - every[-1]).max() <= 1e-5 * scale
    if kernels.quantizes_activations(rt.head, 1):  # SIMD kernels (not the portable ones)
        rt.reset()
        rt.forward(ids[:-1])
        step = rt.forward(ids[-1:])  # a decode step keeps the int8 activation kernels
        assert np.abs(step[0] - every[-1]).max() > 1e-5 * scale
