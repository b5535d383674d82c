"""RMSNorm and LayerNorm over rows (reference: reference.rmsnorm / reference.layernorm)."""

import numpy as np
from numba import njit


@njit(cache=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w; sums in float64."""
    T, d = x.shape
    for t in range(T):
        ss = 0.0
        for j in range(d):
            v = np.float64(x[t, j])
            ss += v * v
        r = np.float32(1.0 / np.sqrt(ss / d + eps))
        for j in range(d):
            out[t, j] = (x[t, j] * r) * w[j]
    return out


@njit(cache=True)
def layernorm(x, w, b, eps, out):
    """out[t] = (x[t] - mean) / sqrt(var + eps) * w + b; biased variance, sums in float64."""
    T, d = x.shape
    for t in range(T):
        s = 0.0
        for j in range(d):
            s += x[t, j]
        mu = s / d
        ss = 0.0
        for j in range(d):
            v = x[t, j] - mu
            ss += v * v
        r = 1.0 / np.sqrt(ss / d + eps)
        for j in range(d):
            out[t, j] = np.float32((x[t, j] - mu) * r) * w[j] + b[j]
    return out
