"""The int3 encoding (docs/FORMAT.md §4.10): codec against a direct statement of its layout and
rule, and the kernels (linear decode and prefill, FFN bundles) against the NumPy reference."""

import numpy as np
import pytest

from edgellm.runtime import encodings, kernels
from edgellm.runtime.kernels import reference
from edgellm.runtime.reader import Matrix


def _codes_by_spec(q, d):
    """Codes read bit by bit as FORMAT.md states: value j of run b has its low bits at bits
    2*(j // 8) of byte 12b + j % 8 and its high bit at bit j % 8 of byte 12b + 8 + j // 8."""
    n = q.shape[0]
    out = np.zeros((n, d), np.uint8)
    for r in range(n):
        for j in range(d):
            b, k = divmod(j, 32)
            lo = (int(q[r, 12 * b + k % 8]) >> (2 * (k // 8))) & 3
            hi = (int(q[r, 12 * b + 8 + k // 8]) >> (k % 8)) & 1
            out[r, j] = lo | hi << 2
    return out


@pytest.mark.parametrize("g", [32, 64])
def test_codec_layout_and_rule(g):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    c = encodings.codec("int3", g)
    q, s = c.quantize(x)
    assert q.shape == (5, 48) and q.dtype == np.uint8 and s.shape == (5, 128 // g)
    codes = _codes_by_spec(q, 128)
    assert codes.max() <= 7
    # the writer rule: s = f16(m / -4) with m the largest-magnitude value, codes by rounding
    grp = x.reshape(5, -1, g)
    m = np.take_along_axis(grp, np.abs(grp).argmax(axis=2)[..., None], axis=2)[..., 0]
    assert np.array_equal(s, (m / -4).astype(np.float16))
    s32 = np.repeat(s.astype(np.float32), g, axis=1)
    assert np.array_equal(codes, np.clip(np.rint(x / s32) + 4, 0, 7))
    y = c.dequantize(q, s)
    assert np.array_equal(y, (codes.astype(np.float32) - 4) * s32)
    assert np.abs(y - x).max() <= c.max_error_bound(x)
    assert encodings.nbytes(c, 5, 128) == 5 * (48 + 2 * 128 // g)


@pytest.mark.parametrize("g", [32, 64])
def test_kernels_match_reference(g):
    rng = np.random.default_rng(1)
    n, d = 96, 128
    c = encodings.codec("int3", g)
    q, s = c.quantize(rng.standard_normal((n, d)).astype(np.float32))
    m = Matrix(q=q, s=s, codec=c, shape=(n, d))
    w = c.dequantize(q, s)
    for T in (1, 7):
        x = rng.standard_normal((T, d)).astype(np.float32)
        ref = reference.linear(m, x)
        assert np.allclose(kernels.linear(m, x), ref, rtol=1e-5, atol=1e-4)
        assert np.allclose(ref, x @ w.T, rtol=1e-5, atol=1e-4)
    parts = [("gate", c), ("up", c), ("down", c)]
    vec = {p: rng.standard_normal((64, d)).astype(np.float32) * 0.2 for p, _ in parts}
    b, layout = encodings.pack_bundles(vec, parts, d)
    for T in (1, 5):
        x = rng.standard_normal((T, d)).astype(np.float32)
        want = reference.ffn(x, b, layout, d, "silu", True)
        got = kernels.ffn(x, b, layout, d, "silu", True)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4)
