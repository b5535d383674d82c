"""Causal grouped-query attention over a KV cache (reference: reference.attention).

The cache is read as stored: float32, float16 (as uint16, converted through the F16_TO_F32
table) or int8 with one float32 scale per (head, position). No dequantized copy is made: an int8
key's scale multiplies its dot product once, an int8 value's scale folds into its softmax weight.
Which encoding a call runs is decided when Numba compiles it (lut / scales None or not: Numba
prunes the branches on None arguments), so the float32 path is the same code as before.
"""

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _elem(c, lut, kv, j, i):
    if lut is None:
        return np.float32(c[kv, j, i])
    return lut[c[kv, j, i]]


# fastmath lets LLVM reorder the float32 sums over head_dim into SIMD lanes (the strict order
# ran 3x slower than NumPy at 2000 positions); the test bounds the difference.
@njit(cache=True, parallel=True, fastmath=True)
def attention(q, k_cache, v_cache, k_scale, v_scale, lut, start_pos, out):
    """q f32[T, H, hd], caches [KVH, C, hd] -> out f32[T, H, hd].

    Caches: float32 (lut and scales None), uint16 float16 bits (lut = F16_TO_F32, scales None)
    or int8 (scales f32[KVH, C], lut None). One (query, kv head) pair per parallel iteration:
    the query heads that share a kv head are scored together, so each cached key and value row
    is read once for all of them. Scores are float32, the softmax subtracts the row maximum.
    """
    T, H, hd = q.shape
    kvh = k_cache.shape[0]
    group = H // kvh
    scale = np.float32(1.0 / np.sqrt(hd))
    for tk in prange(T * kvh):
        t = tk // kvh
        kv = tk - t * kvh
        h0 = kv * group
        n = start_pos + t + 1
        s = np.empty((group, n), dtype=np.float32)
        for j in range(n):
            ks = scale
            if k_scale is not None:
                ks = scale * k_scale[kv, j]
            for g in range(group):
                acc = np.float32(0.0)
                for i in range(hd):
                    acc += q[t, h0 + g, i] * _elem(k_cache, lut, kv, j, i)
                s[g, j] = acc * ks
        for g in range(group):
            mx = s[g, 0]
            for j in range(1, n):
                mx = max(mx, s[g, j])
            tot = np.float32(0.0)
            for j in range(n):
                e = np.exp(s[g, j] - mx)
                s[g, j] = e
                tot += e
            inv = np.float32(1.0) / tot
            for j in range(n):
                s[g, j] *= inv
        o = np.zeros((group, hd), dtype=np.float32)
        for j in range(n):
            vs = np.float32(1.0)
            if v_scale is not None:
                vs = v_scale[kv, j]
            for g in range(group):
                p = s[g, j] * vs
                for i in range(hd):
                    o[g, i] += p * _elem(v_cache, lut, kv, j, i)
        for g in range(group):
            for i in range(hd):
                out[t, h0 + g, i] = o[g, i]
    return out
