"""Per-token int8 activations (W8A8, SmoothQuant's scheme) for models whose manifest asks for
them (`activation_quant: {bits: 8, granularity: "token"}`, docs/FORMAT.md §2.7).

The runtime's default int8 path is already W8A8 at decode, with a finer activation scale: the
input of every int8/int4 linear is quantized per block of 32 values (simd.quantize_q8, as
llama.cpp's Q8_0), so an outlier channel only coarsens its own block. Per-token scales (one
max|x|/127 for the whole input vector) are what SmoothQuant assumes and what integer GEMM
hardware wants; an outlier channel then coarsens every channel, which smoothing repairs.

What this mode computes, for every linear of the layers (q, k, v, o, and the FFN's gate/up rows;
not the head, not the embedding):
    xq = rint(x / sx), sx = max|x| / 127 per token;   y = sx * sw * sum_j xq_j * wq_j
- decode (one token), int8 weights: the integer dot products of simd.q8_dot with the token's
  scale in every block slot, so it is exactly that sum (int32 per block of 32, summed in f32);
- prefill, and other encodings: the linear of the dequantized activations xq * sx, which equals
  the same sum up to float32 rounding.
The FFN's hidden values meet the down columns in float32, as in the default int8 path (the
bundle kernel's axpy). The fused decode call (kernels/fused.py) quantizes per block, so a model
in this mode runs the per-operation path (runtime/model.py).

Reference: quantize_rows is the NumPy statement; tests/test_smoothquant.py checks the kernels
against it.
"""

import numpy as np
from numba import njit, prange

from .ffn import ACT_CODES, act
from .simd import act_buffers, ld_f32, q8_axpy, q8_dot_fast, q8_dot_generic

GRANULARITIES = ("token",)


def mode(manifest):
    """True when the manifest asks for per-token int8 activations; raises on a value this
    runtime does not know (FormatError from the caller's context)."""
    aq = manifest.get("activation_quant")
    if aq is None:
        return False
    if (not isinstance(aq, dict) or aq.get("bits") != 8
            or aq.get("granularity") not in GRANULARITIES):
        return None  # unknown: the caller refuses
    return True


def quantize_rows(x):
    """NumPy: per-token symmetric int8 round trip of x f32[T, d] (what every linear's input
    becomes in this mode)."""
    x = np.asarray(x, np.float32)
    sc = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), sc, out=np.zeros_like(sc), where=sc > 0)
    return (np.rint(x * inv) * sc).astype(np.float32)


@njit(cache=True)
def quantize_token(x, xq, xs):
    """x f32[d] -> xq int8 (padding zeroed), xs f32: every block slot holds the token's scale
    max|x| / 127 (the layout simd.q8_dot reads; act_buffers)."""
    d = x.shape[0]
    amax = np.float32(0.0)
    for j in range(d):
        amax = max(amax, abs(x[j]))
    sc = amax / np.float32(127.0)
    inv = np.float32(1.0) / sc if amax > 0 else np.float32(0.0)
    for j in range(d):
        xq[j] = np.int8(np.rint(x[j] * inv))
    xq[d:] = 0
    xs[:] = sc
    return sc


@njit(cache=True, parallel=True)
def matvec_int8(q, s, x, out, fast):
    """q int8 [n, d], s f32[n], x f32[d] -> out f32[n] with x quantized per token."""
    n, d = q.shape
    nb = d // 32
    xq, xs, _, _ = act_buffers(d)
    sc = quantize_token(x, xq, xs)
    for i in prange(n):
        if fast:
            v = q8_dot_fast(q, i * d, nb, xq, xs)
        else:
            v = q8_dot_generic(q, i * d, nb, xq, xs)
        for j in range(nb * 32, d):  # tail: the same integer products
            v += np.float32(q[i, j]) * np.float32(xq[j]) * sc
        out[i] = v * s[i]
    return out


@njit(cache=True, parallel=True)
def ffn_decode_int8(x, bundles, offs, soffs, d, kind, gated, up_bias, has_bias, partial, fast):
    """FFN of int8 bundle rows (gate, up, down parts all int8; d a multiple of 32) with x
    quantized per token for the gate/up products; h_i * down_i accumulated in float32
    (simd.q8_axpy), per-thread partial sums."""
    n = bundles.shape[0]
    nchunks = partial.shape[0]
    stride = bundles.shape[1]
    nb = d // 32
    xq, xs, _, _ = act_buffers(d)
    quantize_token(x, xq, xs)
    per = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        acc = partial[c]
        acc[:] = 0.0
        for i in range(c * per, min(n, (c + 1) * per)):
            base = i * stride
            if fast:
                u = q8_dot_fast(bundles, base + offs[1], nb, xq, xs)
            else:
                u = q8_dot_generic(bundles, base + offs[1], nb, xq, xs)
            u *= ld_f32(bundles, base + soffs[1])
            if gated:
                if fast:
                    g = q8_dot_fast(bundles, base + offs[0], nb, xq, xs)
                else:
                    g = q8_dot_generic(bundles, base + offs[0], nb, xq, xs)
                h = act(g * ld_f32(bundles, base + soffs[0]), kind) * u
            else:
                if has_bias:
                    u += up_bias[i]
                h = act(u, kind)
            if h != 0:
                q8_axpy(acc, bundles, base + offs[2], nb, h * ld_f32(bundles, base + soffs[2]))
    out = np.zeros(d, dtype=np.float32)
    for c in range(nchunks):
        for j in range(d):
            out[j] += partial[c, j]
    return out


# ---------------------------------------------------------------------------------------------
# Python entry points (the kernel API of kernels/__init__.py, per-token flavour)


def _int8_decode_ok(m, T):
    from . import _simd_ok

    return T == 1 and m.codec.name == "int8" and _simd_ok(m)


def linear(m, x):
    """kernels.linear(m, x) with x quantized per token."""
    from . import MODE, _as_rows, _check_matrix
    from . import linear as float_linear

    n, d = m.shape
    x = _as_rows(x, d, "linear")
    if _int8_decode_ok(m, x.shape[0]):
        _check_matrix(m)
        out = np.empty((1, n), dtype=np.float32)
        matvec_int8(m.q, m.s, x[0], out[0], MODE == "fast")
        return out
    # float32 activations in prefill too (not the integer GEMM's blocks of 32: quantized twice)
    return float_linear(m, quantize_rows(x), float_act=x.shape[0] > 1)


def linear_many(ms, x, biases=None):
    outs = [linear(m, x) for m in ms]
    for y, b in zip(outs, biases or [None] * len(ms)):
        if b is not None:
            y += b
    return outs


def _int8_layout(layout, gated):
    """(offs, soffs) int64[3] when every part is int8 with gate (if gated), up and down parts;
    else None."""
    by = {e["name"]: e for e in layout}
    need = ("gate", "up", "down") if gated else ("up", "down")
    if set(by) != set(need) or any(by[p]["encoding"] != "int8" for p in need):
        return None
    offs = np.zeros(3, dtype=np.int64)
    soffs = np.zeros(3, dtype=np.int64)
    for i, p in enumerate(("gate", "up", "down")):
        if p in by:
            offs[i], soffs[i] = by[p]["offset"], by[p]["scale_offset"]
    return offs, soffs


def ffn(x, bundles, layout, d, activation, gated, up_bias=None, down=None):
    """kernels.ffn with the gate/up inputs quantized per token."""
    import numba

    from . import MODE, _as_rows
    from . import ffn as float_ffn

    x = _as_rows(x, d, "ffn")
    tab = _int8_layout(layout, gated) if down is None and d % 32 == 0 else None
    if (x.shape[0] != 1 or tab is None or MODE == "portable"
            or activation not in ACT_CODES):
        return float_ffn(quantize_rows(x), bundles, layout, d, activation, gated, up_bias, down,
                         float_act=x.shape[0] > 1)
    bundles = np.ascontiguousarray(bundles)
    n = bundles.shape[0]
    # the parts must lie inside a row: the shared check of the default kernels
    from . import _part_table_cached

    _part_table_cached(layout, gated, d, bundles, False)
    has_bias = up_bias is not None and not gated
    bias = np.asarray(up_bias, np.float32) if has_bias else np.zeros(1, np.float32)
    partial = np.empty((max(1, min(numba.get_num_threads(), n)), d), dtype=np.float32)
    out = ffn_decode_int8(x[0], bundles, tab[0], tab[1], d, ACT_CODES[activation], gated,
                          bias, has_bias, partial, MODE == "fast")
    return out[None, :]


class TokenFFN:
    """runtime/model.py's ResidentFFN with per-token int8 activations."""

    def __init__(self, resident):
        self.resident = resident
        self.__dict__.update(resident.__dict__)

    def __call__(self, h):
        cfg = self.cfg
        if getattr(self, "gate", None) is not None:  # gate rows stored apart (gateapart.py):
            return self.resident(quantize_rows(h))  # its kernels, on the rounded inputs
        f = ffn(h, self.resident.bundles, self.layout, cfg.d_model, cfg.activation,
                cfg.gated_ffn, self.up_bias, self.down)
        if self.down_bias is not None:
            f += self.down_bias
        return f
