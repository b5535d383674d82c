"""Each kernel of runtime/kernels against its NumPy twin in runtime/kernels/reference.py.

Tolerances. The kernels and the references add the same float32 products in different orders,
so the error is float32 rounding of a sum: per output, |out - ref| <= RTOL * sum_j |w_j x_j|
with RTOL = 2e-5, a few times sqrt(d) * 2^-24 for d <= 4096 (the probabilistic size of
recursive float32 summation; the worst-case bound d * 2^-24 would hide real bugs). Kernels that
quantize the activations to int8 (blocks of 32, scale max|x| / 127, as llama.cpp's Q8_0) add at
most sum_j |w_j| * scale_block(j) / 2; the tests compute that bound exactly and allow it in full.
"""

import numpy as np
import pytest

from childpytest import no_jit, pytest_child, python_child
from edgellm.runtime import encodings, kernels
from edgellm.runtime.kernels import reference as ref
from edgellm.runtime.kernels import simd
from edgellm.runtime.reader import Matrix

RTOL = 2e-5
MODES = ["fast", "generic", "portable"] if simd.AVAILABLE else ["portable"]
# decode (T == 1) and prefill (T > 1, dequantized tiles) in every kernel mode
T_MODES = [(T, m) for T in (1, 4) for m in MODES]


@pytest.fixture
def set_mode(monkeypatch):
    def set_(mode):
        monkeypatch.setattr(kernels, "MODE", mode)
    return set_


def make_matrix(rng, enc, n, d, g=32, readonly=False):
    c = encodings.codec(enc, g if enc == "int4" else None)
    w = rng.standard_normal((n, d)).astype(np.float32)
    q, s = c.quantize(w)
    if readonly:  # weights from the reader are read-only views of an mmap
        q.flags.writeable = False
        if s is not None:
            s.flags.writeable = False
    return Matrix(q, s, c, (n, d))


def act_quant_bound(w_abs, x):
    """Largest change of w @ x when x is quantized to int8 per block of 32 (round to nearest)."""
    d = x.shape[-1]
    nb = -(-d // 32)
    xp = np.zeros(x.shape[:-1] + (nb * 32,))
    xp[..., :d] = np.abs(x)
    step = xp.reshape(x.shape[:-1] + (nb, 32)).max(axis=-1) / 127.0
    half = np.repeat(step, 32, axis=-1)[..., :d] / 2
    return half @ w_abs.T


def assert_linear_close(m, x, out):
    w = m.dequantize().astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    allowed = RTOL * scale + 1e-30
    if kernels.quantizes_activations(m, x.shape[0]):
        allowed = allowed + act_quant_bound(np.abs(w), x.astype(np.float64)) * 1.001
    expected = ref.linear(m, x)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert np.all(np.abs(expected - exact) <= RTOL * scale + 1e-30)  # the reference itself
    err = np.abs(out - exact)
    assert np.all(err <= allowed), f"max excess {(err - allowed).max()}"


SHAPES_ANY = [(1, 32), (5, 37), (17, 100), (33, 96), (130, 256)]  # f32/f16/int8: any d
SHAPES_32 = [(1, 32), (3, 64), (33, 96), (130, 256), (7, 2048)]  # int4: d multiple of g


def linear_cases():
    for enc in ("f32", "f16", "int8"):
        for n, d in SHAPES_ANY:
            yield enc, n, d, 32
    for g in (32, 64):
        for n, d in SHAPES_32:
            if d % g == 0:
                yield "int4", n, d, g
    for enc in ("q8_0", "q4_1"):  # llama.cpp's blocks of 32 (kept from a GGUF)
        for n, d in SHAPES_32 + [(5, 96), (9, 1536)]:  # odd and even counts of blocks
            yield enc, n, d, 32


@pytest.mark.parametrize("T,mode", T_MODES)
@pytest.mark.parametrize("enc,n,d,g", list(linear_cases()))
def test_linear(enc, n, d, g, T, mode, set_mode):
    set_mode(mode)
    rng = np.random.default_rng(n * 1000 + d + T)
    m = make_matrix(rng, enc, n, d, g, readonly=True)
    x = rng.standard_normal((T, d)).astype(np.float32)
    assert_linear_close(m, x, kernels.linear(m, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("g", [32, 64, 128])
def test_linear_int4_block_counts(g, mode, set_mode):
    """Decode of int4 rows of 1 to 13 blocks of 32 (and 66): the fast kernel takes four blocks a
    step in 512-bit registers where the CPU has AVX-512 (simd.HAVE_AVX512), then a pair of
    blocks, then a block alone; every mix of those, scales per block (g 32) or shared."""
    set_mode(mode)
    rng = np.random.default_rng(g)
    for nb in list(range(1, 14)) + [66]:
        if (32 * nb) % g:
            continue
        m = make_matrix(rng, "int4", 5, 32 * nb, g, readonly=True)
        x = rng.standard_normal((1, 32 * nb)).astype(np.float32)
        assert_linear_close(m, x, kernels.linear(m, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("enc,g", [("f16", 32), ("int8", 32), ("int4", 32), ("int4", 64),
                                   ("q8_0", 32), ("q4_1", 32)])
def test_linear_prefill_many_tiles(enc, g, mode, set_mode, monkeypatch):
    set_mode(mode)
    monkeypatch.setattr(kernels, "TILE_BYTES", 64 * 4 * 16)  # 16 rows per tile of width 64
    rng = np.random.default_rng(7)
    for d in {"f16": (128, 100), "int8": (128, 100), "int4": (128,)}.get(enc, (128, 96)):
        m = make_matrix(rng, enc, 70, d, g)
        x = rng.standard_normal((9, d)).astype(np.float32)
        assert_linear_close(m, x, kernels.linear(m, x))
        # tiles are the codec's own dequantization, bit for bit
        w = kernels._dequant_rows(m, 0, 70, np.empty((70, d), np.float32))
        assert np.array_equal(w, m.dequantize())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("enc,g", [("q4_1", 32), ("q8_0", 32), ("int4", 64), ("int8", 32),
                                   ("f16", 32), ("f32", 32)])
def test_linear_many(enc, g, mode, set_mode):
    """q, k, v in one call (decode: activations quantized once, one parallel loop): each output
    as linear() gives it, biases added; prefill and mixed encodings fall back to linear()."""
    set_mode(mode)
    rng = np.random.default_rng(len(enc) + g)
    ms = [make_matrix(rng, enc, n, 128, g, readonly=True) for n in (96, 32, 32)]
    biases = [rng.standard_normal(n).astype(np.float32) for n in (96, 32, 32)]
    for T in (1, 3):
        x = rng.standard_normal((T, 128)).astype(np.float32)
        outs = kernels.linear_many(ms, x, biases)
        for m, b, y in zip(ms, biases, outs):
            assert y.shape == (T, m.shape[0])
            assert_linear_close(m, x, y - b)
            assert np.array_equal(y, kernels.linear(m, x) + b)
    mixed = [ms[0], make_matrix(rng, "int8", 32, 128), ms[2]]
    for m, y in zip(mixed, kernels.linear_many(mixed, x[:1])):
        assert np.array_equal(y, kernels.linear(m, x[:1]))


def test_linear_tiny(set_mode):
    rng = np.random.default_rng(1)
    for mode in MODES:
        set_mode(mode)
        for enc in encodings.NAMES:
            if enc in encodings.SPARSE_NAMES:  # need pruned rows: tests/test_prune.py
                continue
            m = make_matrix(rng, enc, 3, 64)
            for T in (1, 2):
                x = rng.standard_normal((T, 64)).astype(np.float32)
                assert_linear_close(m, x, kernels.linear(m, x))


def test_linear_int4_group_not_power_of_two(set_mode):
    """g = 96 is valid int4 but not a SIMD shape: the portable kernel takes it, exactly."""
    rng = np.random.default_rng(96)
    m = make_matrix(rng, "int4", 5, 192, 96)
    x = rng.standard_normal((1, 192)).astype(np.float32)
    assert not kernels.quantizes_activations(m, 1)
    assert_linear_close(m, x, kernels.linear(m, x))


@pytest.mark.parametrize("mode", MODES)
def test_linear_f16_special_values(mode, set_mode):
    """Subnormal, largest, signed-zero float16 weights convert exactly in every mode."""
    set_mode(mode)
    vals = np.array([2.0**-24, -(2.0**-24), 3 * 2.0**-20, 65504.0, -65504.0, -0.0, 0.0, 1.0],
                    dtype=np.float16)
    rng = np.random.default_rng(16)
    q = rng.choice(vals, size=(9, 64)).astype(np.float16)
    m = Matrix(q, None, encodings.codec("f16"), (9, 64))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert_linear_close(m, x, kernels.linear(m, x))


def test_linear_rejects_bad_shape():
    rng = np.random.default_rng(0)
    m = make_matrix(rng, "int8", 4, 32)
    with pytest.raises(Exception, match="32"):
        kernels.linear(m, np.zeros((1, 31), np.float32))


# ---------------------------------------------------------------------------------------------
# norms


@pytest.mark.parametrize("T,d", [(1, 8), (3, 100), (5, 2048)])
def test_norms(T, d):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((T, d)) * 3 + 0.5).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    # the normalized values are O(1); float32 rounding of x * r * w is a few ulp: 1e-6 abs/rel
    np.testing.assert_allclose(kernels.rmsnorm(x, w, 1e-5), ref.rmsnorm(x, w, 1e-5),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernels.layernorm(x, w, b, 1e-5), ref.layernorm(x, w, b, 1e-5),
                               rtol=1e-5, atol=1e-6)


def test_norms_tiny():
    test_norms(2, 16)


# ---------------------------------------------------------------------------------------------
# rope


SCALINGS = [None, {"rope_type": "linear", "factor": 4.0},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("T,start", [(1, 0), (1, 37), (6, 0), (6, 90)])
def test_rope(scaling, T, start):
    rng = np.random.default_rng(T + start)
    hd, H = 16, 3
    cos, sin = kernels.rope_tables(hd, 128, 10000.0, scaling)
    assert cos.shape == sin.shape == (128, hd // 2) and cos.dtype == np.float32
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    pos = np.arange(start, start + T, dtype=np.int64)
    out = kernels.apply_rope(x, cos, sin, pos)
    # identical float32 operations in the same order: exact up to fused multiply-add, 1e-6
    np.testing.assert_allclose(out, ref.apply_rope(x, cos, sin, pos), rtol=1e-6, atol=1e-6)
    # a rotation keeps each pair's norm
    half = hd // 2
    np.testing.assert_allclose(out[..., :half] ** 2 + out[..., half:] ** 2,
                               x[..., :half] ** 2 + x[..., half:] ** 2, rtol=1e-5, atol=1e-6)


def test_rope_tables_formula():
    cos, sin = kernels.rope_tables(8, 5, 10000.0, None)
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    ang = np.arange(5)[:, None] * inv
    np.testing.assert_allclose(cos, np.cos(ang), atol=2e-6)
    np.testing.assert_allclose(sin, np.sin(ang), atol=2e-6)
    lin_cos, _ = kernels.rope_tables(8, 5, 10000.0, {"type": "linear", "factor": 2.0})
    np.testing.assert_allclose(lin_cos, np.cos(ang / 2), atol=2e-6)


def test_rope_llama3_matches_transformers():
    pytest.importorskip("torch")
    rif = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig
    scaling = SCALINGS[2]
    try:
        cfg = LlamaConfig(rope_theta=500000.0, hidden_size=64, num_attention_heads=2,
                          head_dim=32, max_position_embeddings=256, rope_scaling=dict(scaling))
        inv, _ = rif.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    except Exception as e:  # the config protocol changes between transformers versions
        pytest.skip(f"transformers rope init not callable here: {e}")
    np.testing.assert_allclose(ref.rope_inv_freq(32, 500000.0, scaling), inv.numpy(),
                               rtol=1e-6)


def test_rope_rejects_unknown_scaling():
    with pytest.raises(Exception, match="yarn"):
        kernels.rope_tables(8, 4, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_rope_tiny():
    test_rope(SCALINGS[2], 2, 3)


# ---------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("T,start", [(1, 0), (1, 20), (5, 0), (5, 11)])
def test_attention(ratio, T, start):
    rng = np.random.default_rng(ratio * 100 + T + start)
    kvh, hd, C = 2, 16, 40
    H = kvh * ratio
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k = rng.standard_normal((kvh, C, hd)).astype(np.float32)
    v = rng.standard_normal((kvh, C, hd)).astype(np.float32)
    k[:, start + T:] = np.nan  # beyond the block: must never be read
    v[:, start + T:] = np.nan
    out = kernels.attention(q, k, v, start)
    # softmax weights sum to 1 and |v| = O(1); float32 sums over <= 40 keys: 1e-5 abs
    np.testing.assert_allclose(out, ref.attention(q, k, v, start), rtol=1e-5, atol=1e-5)


def test_attention_tiny():
    test_attention(3, 2, 1)


# ---------------------------------------------------------------------------------------------
# ffn


def make_bundles(rng, d, n, encs, gated, g=32):
    names = ["gate", "up", "down"] if gated else ["up", "down"]
    if isinstance(encs, str):
        encs = [encs] * len(names)
    parts = [(nm, encodings.codec(e, g if e == "int4" else None)) for nm, e in zip(names, encs)]
    vecs = {nm: (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32) for nm in names}
    bundles, layout = encodings.pack_bundles(vecs, parts, d)
    return bundles, layout


def ffn_allowed(x, bundles, layout, d, activation, gated, up_bias, down=None):
    """Bound on |kernel - exact|: float32 summation, plus activation quantization when used.

    First-stage errors (gate/up dot products, bounded as in assert_linear_close) pass through the
    activation (|silu'| <= 1.1, |relu'| <= 1) and the product with up, then through down. A
    separate down Matrix (no down part in the bundles) multiplies the hidden vector as linear()
    does, quantizing it when linear() would."""
    parts = {e["name"]: encodings.unpack_bundle_part(bundles, e, d).astype(np.float64)
             for e in layout}
    x64 = x.astype(np.float64)
    quant = kernels.ffn_quantizes_activations(layout, x.shape[0])

    def first(name):
        w = parts[name]
        val = x64 @ w.T
        err = RTOL * (np.abs(x64) @ np.abs(w).T)
        if quant.get(name):
            err += act_quant_bound(np.abs(w), x64) * 1.001
        return val, err

    u, eu = first("up")
    if gated:
        gt, eg = first("gate")
        a = ref.activate(gt, activation)
        h = a * u
        eh = 1.1 * eg * (np.abs(u) + eu) + np.abs(a) * eu
    else:
        if up_bias is not None:
            u = u + up_bias
        h = ref.activate(u, activation)
        eh = 1.1 * eu
    if down is not None:
        dm = down.dequantize().astype(np.float64).T  # [n, d] like a down part
        exact = h @ dm
        allowed = eh @ np.abs(dm) + RTOL * ((np.abs(h) + eh) @ np.abs(dm)) + 1e-30
        if kernels.quantizes_activations(down, x.shape[0]):
            allowed = allowed + act_quant_bound(np.abs(dm).T, np.abs(h) + eh) * 1.001
        return exact, allowed
    down = parts["down"]
    exact = h @ down
    allowed = (eh @ np.abs(down) + RTOL * ((np.abs(h) + eh) @ np.abs(down))) + 1e-30
    return exact, allowed


def check_ffn(rng, d, n, encs, gated, activation, T, g=32, bias=False):
    bundles, layout = make_bundles(rng, d, n, encs, gated, g)
    up_bias = rng.standard_normal(n).astype(np.float32) * 0.1 if bias else None
    x = rng.standard_normal((T, d)).astype(np.float32)
    out = kernels.ffn(x, bundles, layout, d, activation, gated, up_bias)
    expected = ref.ffn(x, bundles, layout, d, activation, gated, up_bias)
    exact, allowed = ffn_allowed(x, bundles, layout, d, activation, gated, up_bias)
    assert out.shape == (T, d) and out.dtype == np.float32
    assert np.all(np.abs(expected - exact) <= allowed)
    err = np.abs(out - exact)
    assert np.all(err <= allowed), f"max excess {(err - allowed).max()}"


FFN_ENCS = ["f32", "f16", "int8", "int4", ["int4", "int8", "f16"], "q8_0", "q4_1",
            ["q4_1", "q8_0", "int8"]]
BLOCKED = ("int4", "q8_0", "q4_1")  # row length a multiple of 32


@pytest.mark.parametrize("T,mode", T_MODES)
@pytest.mark.parametrize("encs", FFN_ENCS, ids=str)
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (False, "relu", True),
                                                   (False, "relu", False), (True, "relu", False)])
def test_ffn(encs, gated, activation, bias, T, mode, set_mode):
    set_mode(mode)
    rng = np.random.default_rng(T)
    blocked = any(e in BLOCKED for e in ([encs] if isinstance(encs, str) else encs))
    sizes = [(64, 1), (96, 37), (256, 300)] + ([(100, 7)] if not blocked else [])
    for d, n in sizes:
        e = encs if isinstance(encs, str) or gated else encs[1:]
        check_ffn(rng, d, n, e, gated, activation, T, bias=bias)


@pytest.mark.parametrize("T,mode", T_MODES)
@pytest.mark.parametrize("enc", ["q4_1", "q8_0", "int4"])
def test_ffn_separate_down(enc, T, mode, set_mode):
    """Bundles of gate and up only, the down projection a Matrix [d, n] of its own (a GGUF kept
    as is): against the exact product, and the NumPy reference."""
    set_mode(mode)
    rng = np.random.default_rng(T + 40)
    for d, n in [(64, 32), (96, 96), (256, 320)]:  # the down rows have n values: blocks of 32
        bundles, layout = make_bundles(rng, d, n, enc, True)
        bundles = np.ascontiguousarray(bundles)
        gate_up = [e for e in layout if e["name"] != "down"]
        parts = [(e["name"], encodings.codec(e["encoding"], e["group_size"])) for e in gate_up]
        encoded = {e["name"]: encodings.bundle_part(bundles, e, d) for e in gate_up}
        bundles, layout = encodings.pack_encoded_bundles(encoded, parts, d)
        down = make_matrix(rng, enc, d, n, readonly=True)
        x = rng.standard_normal((T, d)).astype(np.float32)
        out = kernels.ffn(x, bundles, layout, d, "silu", True, None, down)
        expected = ref.ffn(x, bundles, layout, d, "silu", True, None, down)
        exact, allowed = ffn_allowed(x, bundles, layout, d, "silu", True, None, down)
        assert out.shape == (T, d) and out.dtype == np.float32
        assert np.all(np.abs(expected - exact) <= allowed)
        err = np.abs(out - exact)
        assert np.all(err <= allowed), f"max excess {(err - allowed).max()}"
    with pytest.raises(Exception, match="down"):  # neither a down part nor a matrix
        kernels.ffn(x, bundles, layout, d, "silu", True)


@pytest.mark.parametrize("T,mode", T_MODES)
@pytest.mark.parametrize("g", [64, 96])
def test_ffn_int4_groups(T, mode, g, set_mode):
    set_mode(mode)
    rng = np.random.default_rng(g)
    check_ffn(rng, 192, 50, "int4", True, "silu", T, g=g)


@pytest.mark.parametrize("mode", MODES)
def test_ffn_many_tiles(mode, set_mode, monkeypatch):
    set_mode(mode)
    monkeypatch.setattr(kernels, "TILE_BYTES", 64 * 4 * 3 * 16)
    rng = np.random.default_rng(5)
    check_ffn(rng, 64, 70, "int4", True, "silu", 4)


@pytest.mark.parametrize("mode", MODES)
def test_ffn_readonly_bundles(mode, set_mode):
    """Bundles from the reader are read-only views of an mmap."""
    set_mode(mode)
    rng = np.random.default_rng(11)
    bundles, layout = make_bundles(rng, 64, 9, "int4", True)
    bundles.flags.writeable = False
    x = rng.standard_normal((1, 64)).astype(np.float32)
    out = kernels.ffn(x, bundles, layout, 64, "silu", True)
    exact, allowed = ffn_allowed(x, bundles, layout, 64, "silu", True, None)
    assert np.all(np.abs(out - exact) <= allowed)


def test_ffn_rejects_layout_past_stride():
    rng = np.random.default_rng(12)
    bundles, layout = make_bundles(rng, 64, 3, "int8", True)
    with pytest.raises(Exception, match="stride"):
        kernels.ffn(np.ones((1, 64), np.float32), bundles[:, :64], layout, 64, "silu", True)


def test_linear_rejects_inconsistent_matrix():
    rng = np.random.default_rng(13)
    m = make_matrix(rng, "int4", 4, 64)
    bad = Matrix(m.q, m.s[:, :1], m.codec, m.shape)
    with pytest.raises(Exception, match="scales"):
        kernels.linear(bad, np.ones((1, 64), np.float32))


def test_ffn_empty_rows():
    rng = np.random.default_rng(2)
    bundles, layout = make_bundles(rng, 32, 1, "int8", True)
    bundles = bundles[:0]  # a neuron cache holding no rows yet
    out = kernels.ffn(np.ones((1, 32), np.float32), bundles, layout, 32, "silu", True)
    assert np.array_equal(out, np.zeros((1, 32), np.float32))


def test_ffn_tiny(set_mode):
    rng = np.random.default_rng(3)
    for mode in MODES:
        set_mode(mode)
        for encs in FFN_ENCS:
            for T in (1, 2):
                check_ffn(rng, 64, 5, encs, True, "silu", T)
        check_ffn(rng, 32, 4, "int4", False, "relu", 1, bias=True)


# ---------------------------------------------------------------------------------------------
# the same kernels as plain Python


def test_no_jit_subset():
    """The *_tiny tests again with NUMBA_DISABLE_JIT=1 (this test's name must not match 'tiny')."""
    assert no_jit(__file__, "tiny and not no_jit") == 5


@pytest.mark.slow
@pytest.mark.parametrize("switch,flag,tests", [
    # int4 (the pair dot products of int4 and q4_1) and int8 (the block dot of int8 and q8_0)
    ("EDGELLM_NO_VNNI", "HAVE_VNNI", "test_linear[ and -1-fast and (int4- or int8-) and not many"),
    # the 256-bit int4 sequence with vpdpbusd (a CPU with AVX-VNNI but no AVX-512)
    ("EDGELLM_NO_AVX512", "HAVE_AVX512", "(test_linear[ and -1-fast and int4- and not many) or "
                                         "test_linear_int4_block_counts[ and fast")],
    ids=["no-vnni", "no-avx512"])
def test_fast_kernels_without(switch, flag, tests, tmp_path):
    """Where the CPU has VNNI the fast flavor multiplies with vpdpbusd, and with AVX-512 the int4
    rows four blocks at a time in 512-bit registers; the sequences they replace (what a CPU
    without them runs) again against the exact products, in a process with the switch set and
    its own Numba cache (this one's cached code is compiled with VNNI and AVX-512)."""
    if not getattr(simd, flag):
        pytest.skip(f"this CPU lacks what {flag} needs: the tests above already run without it")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), switch: "1"}
    pytest_child(__file__, tests, timeout=900, **env)
    check = python_child(f"from edgellm.runtime.kernels import simd; print(simd.{flag})", **env)
    assert check.stdout.strip() == "False", check.stderr[-2000:]
