"""Team decode (runtime/kernels/team.py): a token's layers in one parallel region give bit for
bit the logits of fused.decode_layer (five parallel loops a layer), which tests/test_fused.py
checks against the general path; it finishes whatever number of threads actually runs its
region."""

import numba
import numpy as np
import pytest

import edgellm
import tiny
from edgellm.runtime import threads
from edgellm.runtime.kernels import fused, simd, team

pytestmark = [
    pytest.mark.skipif(not simd.AVAILABLE, reason="the fused call needs the JIT "
                       "(NUMBA_DISABLE_JIT=1 runs the general path only)"),
    pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                       reason="a team needs 2 threads (NUMBA_NUM_THREADS < 2)")]


@pytest.fixture
def two_threads(monkeypatch):
    """Tiny layers on 2 threads (they are decoded on one otherwise: threads.py)."""
    monkeypatch.setattr(threads, "SMALL_LAYER_BYTES", 0)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


def decode(path, kv, name, steps=8, threads=2):
    """Logits of a prefill then greedy decode steps, the kernels that ran the layers, the
    runtime."""
    m = edgellm.load(path, kv=kv, threads=threads)
    rt = m.runtime
    out = [rt.forward(tiny.token_ids(name, 12))[-1].copy()]
    for _ in range(steps):
        out.append(rt.forward([int(np.argmax(out[-1]))])[-1].copy())
    memo = rt._fused_plans[2]
    return np.array(out), {hit[1][0] for hit in memo}, rt


@pytest.mark.parametrize("name,quant,group,kv", [
    ("llama", "int4", 32, "int8"),  # int4 packed 16 rows a group where the CPU has VNNI
    ("mistral", "int4", 64, "f16"),
    ("llama", "int8", 32, "f32"),
    ("qwen2", "int8", 32, "f16"),  # q/k/v biases, tied head
])
def test_team_equals_decode_layer(two_threads, monkeypatch, name, quant, group, kv):
    path = tiny.converted(name, quant, group)
    got, kernels, _ = decode(path, kv, name)
    assert kernels == {team.decode_team}
    monkeypatch.setenv("EDGELLM_NO_TEAM", "1")
    want, kernels, _ = decode(path, kv, name)
    assert kernels == {fused.decode_layer}
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_one_thread_runs_decode_layer(monkeypatch):
    monkeypatch.setattr(threads, "SMALL_LAYER_BYTES", 0)
    before = numba.get_num_threads()
    try:  # the forward pass applies the count asked for at load (threads.apply)
        _, kernels, _ = decode(tiny.converted("llama", "int8"), "f32", "llama", steps=1,
                               threads=1)
    finally:
        numba.set_num_threads(before)
    assert kernels == {fused.decode_layer}


def test_team_finishes_on_fewer_threads(two_threads):
    """Buffers for a team of two, a region run by one thread: it claims every part of every
    layer, waits for none, and the token's result is the same (no thread waits for work nobody
    took)."""
    _, _, rt = decode(tiny.converted("llama", "int4"), "f32", "llama", steps=1)
    runs = rt._fused_plans[4]
    assert list(runs) == [0]  # every layer in one run
    layers = runs[0][1]
    assert len(layers) == 2 and len(layers[0]) == rt.cfg.n_layers  # a list a thread
    bufs = rt._fused_plans[2][0][1][1][1]
    x = np.random.default_rng(0).standard_normal(rt.cfg.d_model).astype(np.float32)
    pos = len(rt.cache.tokens)
    outs = []
    for n in (2, 1):
        numba.set_num_threads(n)
        y = x.copy()
        assert team.decode_team(y, pos, layers, bufs.ctl, *bufs.threads()) == fused.OK
        outs.append(y)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_claims_cover_every_unit_once(T):
    """team._claim in any interleaving of T threads, some never starting: the chunks claimed
    partition the phase's units, as many as _chunks says; each thread takes its own share
    from the front in order, others' from the back."""
    rng = np.random.default_rng(T)
    for n, ub in ((1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (7, 1 << 20), (64, 1 << 20),
                  (100, 1 << 20), (352, 40 << 10), (1000, 1 << 20), (1000, 1 << 10)):
        for absent in range(T):  # threads 0..absent-1 start; the others never run
            starts = max(1, T - absent)
            ctl = np.zeros(team.ctl_len(T), np.int64)
            steps = [0] * T
            got = {t: [] for t in range(T)}
            live = list(range(starts))
            while live:
                t = live[rng.integers(len(live))]
                u0, u1, steps[t] = team._claim(ctl, team.P_FFN, n, ub, T, t, steps[t])
                if u0 < 0:
                    live.remove(t)
                else:
                    got[t].append((u0, u1, steps[t]))
            chunks = sorted(c[:2] for cs in got.values() for c in cs)
            assert len(chunks) == team._chunks(n, T, ub)
            assert [u for a, b in chunks for u in range(a, b)] == list(range(n))
            for t, cs in got.items():
                own = [c[0] for c in cs if c[2] == 0]
                assert own == sorted(own)
                for s in range(1, T):
                    stolen = [c[0] for c in cs if c[2] == s]
                    assert stolen == sorted(stolen, reverse=True)


def test_small_team_layers_use_every_thread(monkeypatch):
    """The small-layer rule (threads.py) is for five wake-ups a layer: layers that all decode
    as teams use the threads asked for; with EDGELLM_NO_TEAM=1 they decode on one."""
    before = numba.get_num_threads()
    path = tiny.converted("llama", "int8")
    try:
        m = edgellm.load(path, threads=2)
        m.runtime.forward(tiny.token_ids("llama", 4))
        m.runtime.forward([5])
        assert {hit[1][0] for hit in m.runtime._fused_plans[2]} == {team.decode_team}
        monkeypatch.setenv("EDGELLM_NO_TEAM", "1")
        m = edgellm.load(path, threads=2)
        m.runtime.forward(tiny.token_ids("llama", 4))
        m.runtime.forward([5])
        assert {hit[0][2] for hit in m.runtime._fused_plans[2]} == {1}  # thread count
    finally:
        numba.set_num_threads(before)
