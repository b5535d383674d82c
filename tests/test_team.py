"""A layer decoded by a team of threads in one parallel region (runtime/kernels/team.py) gives
bit for bit fused.decode_layer's result (which tests/test_fused.py checks against the general
path, and that against NumPy, transformers and llama.cpp), whichever thread takes which chunk:
on 1 and 2 threads, and when one worker does all the work before another starts."""

import numba
import numpy as np
import pytest

import edgellm
import tiny
from edgellm.runtime import kernels
from edgellm.runtime.kernels import fused, simd, team

pytestmark = [
    pytest.mark.skipif(not simd.AVAILABLE, reason="the fused call needs the JIT "
                       "(NUMBA_DISABLE_JIT=1 runs the general path only)"),
    pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more threads"),
]


@pytest.fixture
def two_threads(monkeypatch):
    """2 threads in every layer (the tiny models' layers would decode on one: threads.py)."""
    monkeypatch.setenv("EDGELLM_FIXED_THREADS", "1")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


def decode_logits(model, ids, steps):
    rt = model.runtime
    rt._fused_plans = None  # plans and their team choice made again
    rt.reset()
    out = [rt.forward(ids)[-1].copy()]
    for _ in range(steps):
        out.append(rt.forward([int(np.argmax(out[-1]))])[-1].copy())
    return np.array(out)


def both_ways(monkeypatch, path, kv, name, steps=8):
    """Logits with the team call, then with decode_layer only; and the team calls made."""
    m = edgellm.load(path, kv=kv)
    calls = []
    real = team.decode_layer_team

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(team, "decode_layer_team", counted)
    ids = tiny.token_ids(name, 12)
    got = decode_logits(m, ids, steps)
    with monkeypatch.context() as mp:
        mp.setattr(team, "takes", lambda plan: False)
        want = decode_logits(m, ids, steps)
    return got, want, len(calls), m.config.n_layers


def same(a, b):
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name,quant,kv", [
    ("llama", "int4", "int8"),
    ("llama_relu", "int8", "f32"),
    ("qwen2", "int8", "f16"),  # q/k/v biases, tied head
])
def test_team_equals_decode_layer(monkeypatch, two_threads, name, quant, kv):
    got, want, calls, n_layers = both_ways(monkeypatch, tiny.converted(name, quant), kv, name)
    assert calls == 8 * n_layers  # every decoded layer of every step
    assert same(got, want)


def test_team_generic_mode(monkeypatch, two_threads):
    """The target-independent flavour of the SIMD kernels (a CPU without AVX2)."""
    monkeypatch.setattr(kernels, "MODE", "generic")
    got, want, calls, _ = both_ways(monkeypatch, tiny.converted("llama", "int4"), "f16", "llama",
                                    steps=4)
    assert calls > 0
    assert same(got, want)


def test_down_matrix(monkeypatch, two_threads, tmp_path):
    """The down projection as a matrix of its own (the tiny models keep it in the bundles)."""
    from edgellm.converters.convert import convert

    path = convert(tiny.checkpoint("llama"), tmp_path / "m", quant="int4", ffn_down="matrix",
                   progress=False)
    got, want, calls, n_layers = both_ways(monkeypatch, path, "int8", "llama", steps=4)
    assert calls == 4 * n_layers
    assert same(got, want)


def test_one_thread_runs_decode_layer(monkeypatch):
    monkeypatch.setenv("EDGELLM_FIXED_THREADS", "1")
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        got, want, calls, _ = both_ways(monkeypatch, tiny.converted("llama", "int4"), "f32",
                                        "llama", steps=2)
    finally:
        numba.set_num_threads(before)
    assert calls == 0
    assert same(got, want)


def layer_call(name="llama", quant="int4"):
    """A decoded model's first layer: (its decode_layer arguments, x, the position)."""
    m = edgellm.load(tiny.converted(name, quant), kv="f32")
    rt = m.runtime
    rt.reset()
    rt.forward(tiny.token_ids(name, 6))
    rt.forward([7])
    args = rt._fused_plans[2][0][1]
    x = np.random.default_rng(0).standard_normal(m.config.d_model).astype(np.float32)
    return args, x, rt.pos


@pytest.mark.parametrize("threads", [1, 2])
def test_team_call_equals_decode_layer(threads):
    args, x, pos = layer_call()
    want = x.copy()
    assert fused.decode_layer(want, pos, *args) == fused.OK
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        got = x.copy()
        ctl = np.zeros(team.CTL_LEN, np.int64)
        assert team.decode_layer_team(got, pos, ctl, threads, *args) == fused.OK
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_late_worker_finds_nothing_to_do():
    """A worker that starts after another did every phase takes no chunk and changes nothing;
    the first one, alone, did the whole layer."""
    args, x, pos = layer_call()
    want = x.copy()
    fused.decode_layer(want, pos, *args)
    meta, hidden = args[1], args[33]
    d, nq = x.size, meta[fused.M_H] * meta[fused.M_HD]
    assert meta[fused.M_DENC] == fused.NONE  # down in the bundles: partial sums
    buffers = (simd.act_buffers(d), simd.act_buffers(nq), simd.act_buffers(hidden.size),
               np.empty(d, np.float32))
    work_args = args[:40] + buffers  # _work's: no sparsity
    ctl = np.zeros(team.CTL_LEN, np.int64)
    got = x.copy()
    team._work(got, pos, ctl, *work_args)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    done = ctl[1:team.RC:2].copy()
    team._work(got, pos, ctl, *work_args)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(ctl[1:team.RC:2], done)

