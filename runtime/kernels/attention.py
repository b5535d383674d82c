"""Causal grouped-query attention over a KV cache (reference: reference.attention)."""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, start_pos, out):
    """q f32[T, H, hd], caches f32[KVH, C, hd] -> out f32[T, H, hd].

    One (query, head) pair per parallel iteration: scores in float32, a max-subtracted softmax,
    then the weighted sum of values.
    """
    T, H, hd = q.shape
    group = H // k_cache.shape[0]
    scale = np.float32(1.0 / np.sqrt(hd))
    for th in prange(T * H):
        t = th // H
        h = th - t * H
        kv = h // group
        n = start_pos + t + 1
        s = np.empty(n, dtype=np.float32)
        mx = np.float32(-np.inf)
        for j in range(n):
            acc = np.float32(0.0)
            for i in range(hd):
                acc += q[t, h, i] * k_cache[kv, j, i]
            acc *= scale
            s[j] = acc
            if acc > mx:
                mx = acc
        tot = np.float32(0.0)
        for j in range(n):
            e = np.exp(s[j] - mx)
            s[j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for i in range(hd):
            out[t, h, i] = 0.0
        for j in range(n):
            p = s[j] * inv
            for i in range(hd):
                out[t, h, i] += p * v_cache[kv, j, i]
    return out
