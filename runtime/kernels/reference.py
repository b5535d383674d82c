"""Plain NumPy references for every kernel in runtime/kernels (docs/INTERNALS.md, "Kernel API").

These are the definitions: readable, float32 throughout (float64 only where a sum needs it), and
slow where slowness buys clarity. Each Numba kernel has a test in tests/test_kernels.py comparing
it to the function of the same name here. rope_tables is used as is by the runtime.
"""

import numpy as np

from .. import encodings
from ..errors import EdgeLLMError


def linear(m, x):
    """x f32[T, d] times the encoded matrix m [n, d] transposed -> f32[T, n]."""
    w = m.dequantize()
    return np.asarray(x, dtype=np.float32) @ w.T


def rmsnorm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, per row (Llama RMSNorm)."""
    x = np.asarray(x, dtype=np.float32)
    ms = np.mean(np.square(x.astype(np.float64)), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps).astype(np.float32)) * w


def layernorm(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b, per row (OPT LayerNorm, biased variance)."""
    x = np.asarray(x, dtype=np.float32)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=-1, keepdims=True)
    var = np.mean(np.square(x64 - mu), axis=-1, keepdims=True)
    y = ((x64 - mu) / np.sqrt(var + eps)).astype(np.float32)
    return y * w + b


def rope_inv_freq(head_dim, theta, scaling=None):
    """Inverse frequencies f32[head_dim // 2], with HF's rope_scaling applied.

    Computed in float32 as transformers does, so the tables agree with its to about one ulp.
    """
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                        / np.float32(head_dim)))).astype(np.float32)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = np.float32(scaling["factor"])
        low = np.float32(scaling["low_freq_factor"])
        high = np.float32(scaling["high_freq_factor"])
        old_len = np.float32(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = np.float32(2 * np.pi) / inv
        out = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise EdgeLLMError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


def rope_tables(head_dim, max_pos, theta, scaling=None):
    """(cos, sin) f32[max_pos, head_dim // 2] for positions 0..max_pos-1."""
    if head_dim % 2:
        raise EdgeLLMError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv = rope_inv_freq(head_dim, theta, scaling)
    ang = np.arange(max_pos, dtype=np.float32)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin, positions):
    """Rotate x f32[T, H, hd] (HF rotate_half: element i pairs with i + hd/2); returns a copy."""
    x = np.asarray(x, dtype=np.float32)
    half = x.shape[-1] // 2
    c = cos[positions][:, None, :]  # (T, 1, hd/2)
    s = sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(np.float32)


def attention(q, k_cache, v_cache, start_pos, k_scale=None, v_scale=None):
    """Causal attention of q f32[T, H, hd] over the caches [KVH, C, hd] -> f32[T, H, hd].

    Query t sits at position start_pos + t and sees keys 0..start_pos + t; head h reads kv head
    h // (H // KVH); scores are scaled by 1/sqrt(hd). Caches are float32 or float16, or int8
    with scales f32[KVH, C, nb] (value i of a row = q[i] * scale[i // (hd / nb)]), and mean
    their float32 values.
    """
    k_cache = k_cache.astype(np.float32)
    v_cache = v_cache.astype(np.float32)
    if k_scale is not None:
        blk = k_cache.shape[-1] // k_scale.shape[-1]
        k_cache = k_cache * np.repeat(k_scale, blk, axis=-1)
        v_cache = v_cache * np.repeat(v_scale, blk, axis=-1)
    T, H, hd = q.shape
    kvh = k_cache.shape[0]
    group = H // kvh
    n = start_pos + T
    out = np.empty((T, H, hd), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(hd))
    mask = np.arange(n)[None, :] > (start_pos + np.arange(T))[:, None]  # (T, n) True = hidden
    for h in range(H):
        k = k_cache[h // group, :n]
        v = v_cache[h // group, :n]
        s = (q[:, h, :] @ k.T) * scale
        s[mask] = -np.inf
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ v
    return out


def activate(x, activation):
    if activation == "silu":
        with np.errstate(over="ignore"):  # exp(-x) -> inf for x << 0: silu -> -0, as it should
            return x / (1.0 + np.exp(-x))
    if activation == "relu":
        return np.maximum(x, 0)
    raise EdgeLLMError(f"unknown activation {activation!r} (known: silu, relu)")


def ffn(x, bundles, layout, d, activation, gated, up_bias=None, down=None):
    """Feed-forward over the neurons held in bundle rows -> f32[T, d].

    gated: down^T (act(gate x) * (up x)); otherwise down^T act(up x + up_bias). No down bias.
    down: a Matrix [d, n] holding the down projection when the bundles have no down part.
    """
    x = np.asarray(x, dtype=np.float32)
    parts = {e["name"]: encodings.unpack_bundle_part(bundles, e, d) for e in layout}
    up = x @ parts["up"].T
    if gated:
        h = activate(x @ parts["gate"].T, activation) * up
    else:
        if up_bias is not None:
            up = up + up_bias
        h = activate(up, activation)
    if down is not None:
        return (h @ down.dequantize().T).astype(np.float32)
    return (h @ parts["down"]).astype(np.float32)
