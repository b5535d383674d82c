"""Causal grouped-query attention over a KV cache (reference: reference.attention).

The cache is read as stored: float32, float16 (as uint16) or int8 with float32 scales per block
of head_dim (kvcache.py). No dequantized copy of the cache is made: a float16 row is converted
when it is read, once, into a float32 scratch row that all the query heads sharing its kv head
use; int8 rows are multiplied as they are, block by block, each block's sum times its scale.
Which encoding a call runs is decided when Numba compiles it (lut / scales None or not: Numba
prunes the branches on None arguments), so the float32 path is the same code as before.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import config
from numba.extending import intrinsic

from .simd import f16_axpy_fast, f16_axpy_generic, f16_dot_fast, f16_dot_generic

# float16 caches with up to this many query heads per kv head multiply the stored rows directly
# (the conversion repeated per head); larger groups convert each row once into a float32 row.
# Single thread, 2048 positions, hd 64 (benchmarks/kvcache.py --kernel): group 3 direct 226 us,
# converted 311 us, f32 210 us; group 8 direct 3171 us, converted 1756 us, f32 2022 us.
F16_DIRECT_GROUP = 4


@njit(inline="always")
def _f16_row(c, kv, j, lut, simd, row):
    """row f32[hd] = float16 row (kv, j) of c (uint16 bits [KVH, C, hd]), converted 32 values
    at a time by the CPU (simd 2) or integer SIMD (simd 1) as row += 1 * c[kv, j], the tail and
    simd 0 (no JIT) through the table."""
    hd = row.size
    nv = hd // 32 if simd else 0
    if nv:
        for i in range(32 * nv):
            row[i] = 0.0
        off = 2 * (kv * c.shape[1] + j) * hd  # bytes
        if simd == 2:
            f16_axpy_fast(row, c, off, nv, np.float32(1.0))
        else:
            f16_axpy_generic(row, c, off, nv, np.float32(1.0))
    for i in range(32 * nv, hd):
        row[i] = lut[c[kv, j, i]]


@njit(inline="always")
def _f16_direct_scores(q, t, h0, group, c, kv, n, simd, scale, s):
    """s[g, j] = q[t, h0 + g] . c[kv, j] * scale, float16 rows read in SIMD registers."""
    nv = q.shape[2] // 32
    stride = 2 * c.shape[2]  # bytes per row
    base = kv * c.shape[1] * stride
    for g in range(group):
        x = q[t, h0 + g]
        for j in range(n):
            if simd == 2:
                s[g, j] = f16_dot_fast(c, base + j * stride, nv, x) * scale
            else:
                s[g, j] = f16_dot_generic(c, base + j * stride, nv, x) * scale


@njit(inline="always")
def _f16_direct_values(o, s, c, kv, n, simd):
    """o[g] += s[g, j] * c[kv, j] over j < n, float16 rows read in SIMD registers."""
    nv = o.shape[1] // 32
    stride = 2 * c.shape[2]
    base = kv * c.shape[1] * stride
    for g in range(o.shape[0]):
        acc = o[g]
        for j in range(n):
            if simd == 2:
                f16_axpy_fast(acc, c, base + j * stride, nv, s[g, j])
            else:
                f16_axpy_generic(acc, c, base + j * stride, nv, s[g, j])


if config.DISABLE_JIT:  # an intrinsic has no Python body
    def _f32_from_bits(i):
        return np.int32(i).view(np.float32)
else:
    @intrinsic
    def _f32_from_bits(typingctx, i):
        """The float32 whose bits are the int32 i (LLVM bitcast)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen


# fastmath without reassociation: the reduction's two steps (ln 2 in two parts) must stay apart
_EXP_FLAGS = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@njit(cache=True, fastmath=_EXP_FLAGS)
def _exp_shifted(s, g, n, mx):
    """s[g, :n] = exp(s[g, :n] - mx) for scores <= mx, in float32 with no call inside, so that
    the loop runs in vector registers (Numba has no vector exp without Intel's SVML; libm's expf
    one value at a time took 7 ns a value, this 0.3 ns, measured; the softmax was a fifth of the
    attention's time). Cephes' expf: x = k ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, so
    that k ln 2 is exact), exp(r) by a degree-7 polynomial, 2^k built in the exponent bits.
    Relative error the same as libm's on these inputs (3.9e-6 for scores of std 30, measured:
    that of rounding s - mx to float32); differences under -87.3 give exp(-87.3) ~ 1e-38, not
    less, which a softmax cannot tell from 0."""
    for j in range(n):
        x = max(s[g, j] - mx, np.float32(-87.33654))
        k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
        r = x - k * np.float32(0.693359375)
        r = r - k * np.float32(-2.12194440e-4)
        p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        y = p * (r * r) + r + np.float32(1.0)
        s[g, j] = y * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _score(q, t, h0, group, row, scale, s, j):
    """s[g, j] = q[t, h0 + g] . row * scale for the group's query heads."""
    for g in range(group):
        acc = np.float32(0.0)
        for i in range(row.size):
            acc += q[t, h0 + g, i] * row[i]
        s[g, j] = acc * scale


@njit(inline="always")
def _accumulate(o, s, j, row):
    """o[g] += s[g, j] * row for the group's query heads."""
    for g in range(o.shape[0]):
        p = s[g, j]
        for i in range(row.size):
            o[g, i] += p * row[i]


# fastmath lets LLVM reorder the float32 sums over head_dim into SIMD lanes (the strict order
# ran 3x slower than NumPy at 2000 positions); the test bounds the difference.
@njit(cache=True, parallel=True, fastmath=True)
def attention(q, k_cache, v_cache, k_scale, v_scale, lut, simd, start_pos, out):
    """q f32[T, H, hd], caches [KVH, C, hd] -> out f32[T, H, hd].

    Caches: float32 (lut and scales None), uint16 float16 bits (lut = F16_TO_F32, scales None;
    simd: 0 table, 1 generic SIMD, 2 the CPU's conversion; see F16_DIRECT_GROUP) or int8 (scales f32[KVH, C, hd / block], lut None). One (query, kv
    head) pair per parallel iteration: the query heads that share a kv head are scored
    together, so each cached key and value row is read once for all of them. Scores are
    float32, the softmax subtracts the row maximum.
    """
    for tk in prange(q.shape[0] * k_cache.shape[0]):
        attend(tk, q, k_cache, v_cache, k_scale, v_scale, lut, simd, start_pos, out)
    return out


@njit(cache=True, fastmath=True)
def attend(tk, q, k_cache, v_cache, k_scale, v_scale, lut, simd, start_pos, out):
    """attention's iteration tk: query t = tk // KVH against kv head tk % KVH (its
    group of query heads), into out (also one unit of the team decode, kernels/team.py)."""
    T, H, hd = q.shape
    kvh = k_cache.shape[0]
    group = H // kvh
    scale = np.float32(1.0 / np.sqrt(hd))
    nb = k_scale.shape[2] if k_scale is not None else 1  # int8 blocks per row
    blk = hd // nb
    direct = simd != 0 and hd % 32 == 0 and group <= F16_DIRECT_GROUP
    t = tk // kvh
    kv = tk - t * kvh
    h0 = kv * group
    n = start_pos + t + 1
    s = np.empty((group, n), dtype=np.float32)
    row = np.empty(hd, dtype=np.float32)
    if lut is not None and direct:
        _f16_direct_scores(q, t, h0, group, k_cache, kv, n, simd, scale, s)
    for j in range(n):
        if lut is not None:
            if not direct:
                _f16_row(k_cache, kv, j, lut, simd, row)
                _score(q, t, h0, group, row, scale, s, j)
        elif k_scale is not None:  # int8: a dot product per block, times its scale
            for g in range(group):
                acc = np.float32(0.0)
                for b in range(nb):
                    o0 = b * blk
                    part = np.float32(0.0)
                    for i in range(blk):
                        part += q[t, h0 + g, o0 + i] * np.float32(k_cache[kv, j, o0 + i])
                    acc += part * k_scale[kv, j, b]
                s[g, j] = acc * scale
        else:  # float32: read in place (a row view would cost reference counting)
            for g in range(group):
                acc = np.float32(0.0)
                for i in range(hd):
                    acc += q[t, h0 + g, i] * k_cache[kv, j, i]
                s[g, j] = acc * scale
    for g in range(group):
        mx = s[g, 0]
        for j in range(1, n):
            mx = max(mx, s[g, j])
        _exp_shifted(s, g, n, mx)
        tot = np.float32(0.0)
        for j in range(n):
            tot += s[g, j]
        inv = np.float32(1.0) / tot
        for j in range(n):
            s[g, j] *= inv
    o = np.zeros((group, hd), dtype=np.float32)
    if lut is not None and direct:
        _f16_direct_values(o, s, v_cache, kv, n, simd)
    for j in range(n):
        if lut is not None:
            if not direct:
                _f16_row(v_cache, kv, j, lut, simd, row)
                _accumulate(o, s, j, row)
        elif v_scale is not None:
            for g in range(group):
                for b in range(nb):
                    o0 = b * blk
                    p = s[g, j] * v_scale[kv, j, b]
                    for i in range(blk):
                        o[g, o0 + i] += p * np.float32(v_cache[kv, j, o0 + i])
        else:
            for g in range(group):
                p = s[g, j]
                for i in range(hd):
                    o[g, i] += p * v_cache[kv, j, i]
    for g in range(group):
        for i in range(hd):
            out[t, h0 + g, i] = o[g, i]


@njit(cache=True)
def store_int8(x, p0, blk, q, s):
    """Encode x f32[T, KVH, hd] into the int8 cache q [KVH, C, hd] and its scales
    s f32[KVH, C, hd / blk] at positions p0..p0+T: per block of blk values, scale max|x| / 127
    and q = round-half-even(x / scale), as encodings.Int8 does for each block (its reference)."""
    T, kvh, hd = x.shape
    for t in range(T):
        for h in range(kvh):
            for b in range(hd // blk):
                o0 = b * blk
                m = np.float32(0.0)
                for i in range(blk):
                    m = max(m, abs(x[t, h, o0 + i]))
                sc = np.float32(m / np.float32(127.0))
                inv = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
                s[h, p0 + t, b] = sc
                for i in range(blk):
                    v = np.rint(x[t, h, o0 + i] * inv)
                    q[h, p0 + t, o0 + i] = np.int8(min(max(v, -127.0), 127.0))
