"""int4 rows packed 16 a group for decode (runtime/kernels/rows16.py, Reader.pack).

The kernels multiply int4 weights with int8 activations (per block of 32, as every decode kernel
here), so the reference multiplies the dequantized weights with the activations' int8 round trip
in float64: the integer sums are exact, only the float32 sums over blocks differ, bounded by
RTOL * sum_j |w_j x_j| as in test_kernels.py. A packed model is checked against the same model
mapped (its stored rows, never packed).
"""


import numpy as np
import pytest

import edgellm
import tiny
from childpytest import no_jit, python_child
from edgellm.runtime import encodings, format
from edgellm.runtime.kernels import rows16, simd
from edgellm.runtime.kernels.halfs import F16_TO_F32 as LUT
from edgellm.runtime.reader import PackedMatrix

RTOL = 2e-5
# the intrinsics need AVX-512 VNNI (where models are packed); the plain-Numba flavour runs anywhere
FLAVOURS = [True, False] if rows16.ENABLED else [False]
needs_packing = pytest.mark.skipif(not rows16.ENABLED, reason="matrices are packed only where "
                                   "the CPU has AVX-512 VNNI (and EDGELLM_NO_ROWS16 is unset)")


def int4(rng, n, d, g):
    c = encodings.codec("int4", g)
    q, s = c.quantize(rng.standard_normal((n, d)).astype(np.float32))
    return q, s, c.dequantize(q, s).astype(np.float64)


def act_round_trip(x):
    """x through the kernels' int8 activations (simd.quantize_q8's arithmetic), in float64."""
    b = x.reshape(-1, 32)
    sc = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), sc, out=np.zeros_like(sc), where=sc > 0)
    return (np.rint(b * inv) * sc).astype(np.float64).reshape(-1)


def assert_close(out, w, x):
    xr = act_round_trip(x)
    exact = w @ xr
    err = np.abs(out.astype(np.float64) - exact)
    allowed = RTOL * (np.abs(w) @ np.abs(xr)) + 1e-30
    assert np.all(err <= allowed), f"max excess {(err - allowed).max()}"
    return exact


@pytest.mark.parametrize("n,d,g", [(16, 32, 32), (48, 96, 32), (32, 256, 64), (64, 512, 128)])
def test_pack_round_trip(n, d, g):
    q, s, _ = int4(np.random.default_rng(n + d), n, d, g)
    pv, ps = rows16.pack(q, s)
    assert pv.nbytes == q.nbytes and ps.nbytes == s.nbytes  # the same memory, rewritten
    q2, s2 = rows16.unpack(pv, ps)
    assert np.array_equal(q2, q) and np.array_equal(s2.view(np.uint16), s.view(np.uint16))
    q3, s3 = rows16.unpack(pv, ps, slice(16, n))
    assert np.array_equal(q3, q[16:]) and np.array_equal(s3, s[16:])


@pytest.mark.parametrize("fast", [True, False] if simd.AVAILABLE else [False])
@pytest.mark.parametrize("g", [32, 64])
def test_unpack_group(fast, g):
    """prefill's unpacking of one group (in registers, or four bytes at a time) gives its
    stored rows."""
    q, s, _ = int4(np.random.default_rng(g), 48, 256, g)
    pv, ps = rows16.pack(q, s)
    gshift = (g // 32).bit_length() - 1
    for grp in range(3):
        q1, s1 = np.zeros((16, 128), np.uint8), np.zeros((16, 256 // g), np.uint16)
        rows16.unpack_group(pv, grp * pv.strides[0], 256 << gshift, ps, grp * ps.strides[0], 32,
                            gshift, 8, q1, s1, fast)
        assert np.array_equal(q1, q[16 * grp:16 * grp + 16])
        assert np.array_equal(s1, s[16 * grp:16 * grp + 16].view(np.uint16))


@pytest.mark.parametrize("fast", FLAVOURS)
@pytest.mark.parametrize("n,d,g", [(16, 32, 32), (48, 96, 32), (32, 256, 64), (64, 2048, 32),
                                   (32, 512, 128)])
def test_matvec(fast, n, d, g):
    rng = np.random.default_rng(n * d)
    q, s, w = int4(rng, n, d, g)
    pv, ps = rows16.pack(q, s)
    x = rng.standard_normal(d).astype(np.float32)
    gshift = (g // 32).bit_length() - 1
    out = rows16.matvec(pv, ps, gshift, x, LUT, np.full(n, np.nan, np.float32), fast)
    assert_close(out, w, x)


@pytest.mark.parametrize("fast", FLAVOURS)
def test_matvec3(fast):
    rng = np.random.default_rng(3)
    mats = [int4(rng, n, 128, 32) for n in (64, 16, 32)]
    packed = [rows16.pack(q, s) for q, s, _ in mats]
    x = rng.standard_normal(128).astype(np.float32)
    outs = [np.full(m[0].shape[0], np.nan, np.float32) for m in mats]
    rows16.matvec3(0, *packed[0], *packed[1], *packed[2], x, LUT, *outs, fast)
    for out, (_, _, w) in zip(outs, mats):
        assert_close(out, w, x)


def bundles(rng, n, d, g, parts):
    """Bundle rows holding int4 `parts` (gate, up) as the converter writes them, a few bytes of
    padding after; -> (rows, [(value offset, scale offset)], [dequantized weights])."""
    h, sb = d // 2, 2 * (d // g)
    stride = len(parts) * (h + sb) + 16
    rows = np.zeros((n, stride), np.uint8)
    where, ws = [], []
    for i, _ in enumerate(parts):
        q, s, w = int4(rng, n, d, g)
        o = i * (h + sb)
        rows[:, o:o + h] = q
        rows[:, o + h:o + h + sb] = s.view(np.uint8)
        where.append((o, o + h))
        ws.append(w)
    return rows, where, ws


@pytest.mark.parametrize("parts", [("gate", "up"), ("up",)])
@pytest.mark.parametrize("g", [32, 64])
def test_bundles_round_trip(parts, g):
    rows, where, _ = bundles(np.random.default_rng(g), 32, 128, g, parts)
    groups, unit, inside = rows16.pack_bundles(rows, where, 128, g)
    assert groups.nbytes == rows.nbytes
    back = rows16.unpack_bundles(groups, unit, inside, where, rows.shape[1], 128, g)
    assert np.array_equal(back, rows)


@pytest.mark.parametrize("fast", FLAVOURS)
@pytest.mark.parametrize("kind,gated,g", [("silu", True, 32), ("relu", True, 64),
                                          ("relu", False, 32)])
def test_ffn_hidden(fast, kind, gated, g):
    """hidden = act(gate x) * (up x) (or act(up x + bias)) from packed bundles, against the
    dequantized weights; the error of gate and up carried through the activation."""
    from edgellm.runtime.kernels.ffn import ACT_CODES, ffn_hidden_packed

    rng = np.random.default_rng(7)
    n, d = 64, 256
    rows, where, ws = bundles(rng, n, d, g, ("gate", "up") if gated else ("up",))
    groups, unit, inside = rows16.pack_bundles(rows, where, d, g)
    offs, soffs = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for slot, (vo, so) in zip((0, 1) if gated else (1,), inside):
        offs[slot], soffs[slot] = vo, so
    x = rng.standard_normal(d).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    hidden = np.full(n, np.nan, np.float32)
    ffn_hidden_packed(x, groups, offs, soffs, unit, (g // 32).bit_length() - 1, ACT_CODES[kind],
                      gated, bias, not gated, LUT, hidden, fast)
    xr = act_round_trip(x)
    u = ws[-1] @ xr + (0 if gated else bias)
    eu = RTOL * (np.abs(ws[-1]) @ np.abs(xr))
    if gated:
        a = ws[0] @ xr
        ea = RTOL * (np.abs(ws[0]) @ np.abs(xr))
        act = a / (1 + np.exp(-a)) if kind == "silu" else np.maximum(a, 0)
        want, allowed = act * u, 1.1 * ea * np.abs(u) + np.abs(act) * eu
    else:
        want, allowed = np.maximum(u, 0), eu
    err = np.abs(hidden - want)
    assert np.all(err <= allowed + 1e-6 * np.abs(want) + 1e-30), f"max {err.max()}"


@needs_packing
def test_silu_lanes():
    """silu over 16 lanes (Cephes' expf polynomial) against float64, over the range a hidden
    value takes and past where float32's exp overflows."""
    from numba import njit

    @njit
    def run(g, u):
        for o in range(0, g.shape[0], 16):
            rows16.silu_mul16(g, u, o)

    rng = np.random.default_rng(0)
    g = np.concatenate([rng.standard_normal(4096) * 8, np.linspace(-100, 100, 512)])
    g = g.astype(np.float32)
    u = rng.standard_normal(g.size).astype(np.float32)
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    out = g.copy()
    run(out, u)
    assert np.all(np.abs(out - want) <= 1e-6 * np.abs(want) + 1e-30 + (np.abs(g) > 80) * 1e-30)


def test_plain_numba_flavour_without_the_jit():
    """The plain-Numba flavour (dot16_generic) as Python (NUMBA_DISABLE_JIT=1)."""
    assert no_jit(__file__, "test_matvec and 16-32-32 or test_ffn_hidden and silu") == 2


# ---------------------------------------------------------------------------------------------
# models: packed at a resident load, against the same model mapped (its stored rows)


def decode(m, ids, n=6):
    """Prefill logits of ids, then n greedy steps' logits and tokens (float32 KV cache)."""
    rt = m.runtime
    first = rt.forward(ids, all_logits=True)
    steps, toks = [], []
    lg = first
    for _ in range(n):
        toks.append(int(np.argmax(lg[-1])))
        lg = rt.forward([toks[-1]])
        steps.append(lg[-1])
    return first, np.array(steps), toks


@needs_packing
@pytest.mark.parametrize("name,g", [("llama", 32), ("mistral", 64), ("opt", 32), ("qwen2", 32)])
def test_packed_model_decodes_as_mapped(name, g):
    path = tiny.converted(name, "int4", g)
    ids = tiny.token_ids(name)
    packed = edgellm.load(path, kv="f32")
    L = packed.runtime.layers[0]
    assert isinstance(L.q, PackedMatrix) and isinstance(L.ffn.down, PackedMatrix)
    assert L.ffn.packed is not None
    mapped = edgellm.load(path, kv="f32", mmap=True)
    assert not isinstance(mapped.runtime.layers[0].q, PackedMatrix)
    p_first, p_steps, p_toks = decode(packed, ids)
    m_first, m_steps, m_toks = decode(mapped, ids)
    # prefill unpacks each group for the same tiles: the same bits
    assert np.array_equal(p_first, m_first)
    assert p_toks == m_toks
    # the first decoded token meets the same cache: its logits differ by float32 sums' order.
    # Later ones meet caches that differ so, and an activation that lands on an int8 rounding
    # boundary then moves by a whole step (0.06 of 7 seen): not compared.
    assert np.abs(p_steps[0] - m_steps[0]).max() <= 1e-5 * np.abs(m_steps[0]).max()


@needs_packing
def test_reader_gives_the_stored_rows_of_packed_tensors():
    """After packing, the reader's arrays of a packed tensor are the file's bytes (a copy)."""
    path = tiny.converted("llama", "int4", 32)
    m = edgellm.load(path)
    r = m.runtime.reader
    assert not r.mapped and isinstance(m.runtime.layers[0].q, PackedMatrix)
    fresh = edgellm.load(path, mmap=True).runtime.reader
    f = format.layer_chunk(0)
    for name in ("attn_q", "attn_q.scales", "ffn_down", "ffn_bundles"):
        assert np.array_equal(r.array(f, name), fresh.array(f, name)), name
    assert np.array_equal(r.matrix(f, "attn_o").dequantize(),
                          fresh.matrix(f, "attn_o").dequantize())


@needs_packing
def test_no_packing_when_asked():
    r = python_child(
        "import edgellm, tiny\n"
        "from edgellm.runtime.reader import PackedMatrix\n"
        "m = edgellm.load(tiny.converted('llama', 'int4', 32))\n"
        "L = m.runtime.layers[0]\n"
        "print(isinstance(L.q, PackedMatrix), L.ffn.packed is None)\n",
        EDGELLM_NO_ROWS16="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["False", "True"]
