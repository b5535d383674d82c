"""Rotary position embeddings, HF rotate_half convention (reference: reference.apply_rope)."""

from numba import njit


@njit(cache=True)
def apply_rope(x, cos, sin, positions, out):
    """out[t, h, i] pairs x[t, h, i] with x[t, h, i + hd/2], rotated by position positions[t]."""
    T, H, hd = x.shape
    half = hd // 2
    for t in range(T):
        p = positions[t]
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                a = x[t, h, i]
                b = x[t, h, i + half]
                out[t, h, i] = a * c - b * s
                out[t, h, i + half] = b * c + a * s
    return out
