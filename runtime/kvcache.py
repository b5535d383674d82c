"""The KV cache: keys and values of the tokens run so far, per layer, and the sliding window.

One KVCache per conversation; the Transformer runs against whichever cache it is given, so one
loaded model can serve several conversations (each keeps its own cache). The buffers are
allocated once, for n_ctx positions, in one of three encodings (docs/INTERNALS.md, "KV cache"):

    f32   k, v float32 [KVH, n_ctx, hd]
    f16   k, v float16 [KVH, n_ctx, hd]                                   (default)
    int8  k, v int8    [KVH, n_ctx, hd], k_scale, v_scale float32 [KVH, n_ctx, hd / block]
          a scale per block of 32 values along head_dim (the whole row when head_dim is not
          a multiple of 32): x = q * scale, scale = max|x| / 127 (encodings.Int8 on blocks)

The attention kernel reads every encoding as stored. Keys are stored rotated (RoPE applied).

Sliding window (StreamingLLM, Xiao et al. 2023): shift() drops a block of tokens after the first
`sinks` ones and moves the rest down, re-rotating the moved keys to their new positions. The
cache then holds a window of a longer conversation: tokens[:sinks], then n_dropped tokens it no
longer holds, then tokens[sinks:]. match() reuses keys and values only where they belong to that
conversation; the dropped tokens are remembered as a count and a hash, so memory stays bounded
however long the conversation runs.
"""

import numpy as np

from . import encodings
from .errors import EdgeLLMError
from .kernels.attention import store_int8

ENCODINGS = ("f32", "f16", "int8")
DEFAULT = "f16"  # half the memory of f32 at ~1e-3 relative error, same decode speed (INTERNALS.md)
_DTYPES = {"f32": np.float32, "f16": np.float16, "int8": np.int8}


def check_encoding(kv):
    if kv not in ENCODINGS:
        raise EdgeLLMError(f"unknown KV cache encoding kv={kv!r} (known: {', '.join(ENCODINGS)})")
    return kv


# polynomial hash of the dropped tokens modulo the Mersenne prime 2^61 - 1: extendable one shift
# at a time, O(1) state; two different sequences of n tokens collide with probability ~ n / 2^61
_P = (1 << 61) - 1
_B = 0x5BD1E995


def _hash(ids, h=0):
    for t in ids:
        h = (h * _B + int(t) + 1) % _P
    return h


def _common_prefix(a, b):
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def int8_block(head_dim):
    """Values per int8 scale: blocks of 32 as llama.cpp's Q8_0 (per-row scales lost 2% top-1
    agreement on SmolLM2-135M, blocks of 32 1%: docs/INTERNALS.md), else the whole row."""
    return 32 if head_dim % 32 == 0 else head_dim


def bytes_per_token(cfg, kv):
    """Cache bytes one token takes over all layers (keys, values and their scales)."""
    check_encoding(kv)
    row = cfg.head_dim * np.dtype(_DTYPES[kv]).itemsize
    if kv == "int8":
        row += 4 * (cfg.head_dim // int8_block(cfg.head_dim))
    return 2 * cfg.n_layers * cfg.n_kv_heads * row


class KVCache:
    def __init__(self, cfg, n_ctx, kv=DEFAULT):
        self.kv = check_encoding(kv)
        self.n_ctx = n_ctx
        self.head_dim = cfg.head_dim
        shape = (cfg.n_kv_heads, n_ctx, cfg.head_dim)  # per layer
        dt = _DTYPES[kv]
        self.k = [np.zeros(shape, dt) for _ in range(cfg.n_layers)]
        self.v = [np.zeros(shape, dt) for _ in range(cfg.n_layers)]
        if kv == "int8":
            self.block = int8_block(cfg.head_dim)
            sshape = shape[:2] + (cfg.head_dim // self.block,)
            self.k_scale = [np.zeros(sshape, np.float32) for _ in range(cfg.n_layers)]
            self.v_scale = [np.zeros(sshape, np.float32) for _ in range(cfg.n_layers)]
        else:
            self.k_scale = self.v_scale = [None] * cfg.n_layers
        self.tokens = []  # token ids whose keys and values are cached (len == pos)
        self.sinks = 0  # tokens kept at the start by the shifts (0: never shifted)
        self.n_dropped = 0  # tokens the shifts removed after the sinks
        self.dropped_hash = 0  # _hash of those tokens, in conversation order

    @property
    def pos(self):
        return len(self.tokens)

    def reset(self):
        self.tokens = []
        self._forget_window()

    def _forget_window(self):
        self.sinks = self.n_dropped = self.dropped_hash = 0

    def rewind(self, n):
        """Keep only the first n cached tokens (their keys and values stay valid)."""
        del self.tokens[n:]
        if n < self.sinks:  # what is left is a plain prefix of the conversation again
            self._forget_window()

    def match(self, ids):
        """Rewind to the longest prefix of ids whose keys and values are cached at the positions
        ids would have here, and return how many of ids that covers (they need not be run).

        After a shift, the cached tokens after the sinks stand for a later part of the
        conversation: they are reused only when ids continues that same conversation (same
        sinks, same dropped tokens); otherwise at most the sinks remain, as a plain prefix."""
        ids = [int(t) for t in ids]
        s, nd = self.sinks, self.n_dropped
        if nd:
            kept_from = s + nd  # index in ids of tokens[s]
            if (len(ids) >= kept_from and ids[:s] == self.tokens[:s]
                    and _hash(ids[s:kept_from]) == self.dropped_hash):
                m = kept_from + _common_prefix(self.tokens[s:], ids[kept_from:])
                self.rewind(m - nd)
                return m
            m = _common_prefix(self.tokens[:s], ids)
            self._forget_window()
        else:
            m = _common_prefix(self.tokens, ids)
        self.rewind(m)
        return m

    # -----------------------------------------------------------------------------------------
    # storage

    def store(self, layer, p0, k, v):
        """Write k, v f32[T, KVH, hd] at positions p0.. of a layer."""
        T = k.shape[0]
        if self.kv == "int8":  # a kernel: the codec's dozen NumPy calls cost 36 us a token
            for cache, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                store_int8(np.ascontiguousarray(x, dtype=np.float32), p0, self.block,
                           cache[layer], scale[layer])
            return
        for cache, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self._encode(x.transpose(1, 0, 2))
            cache[layer][:, p0:p0 + T] = q
            if s is not None:
                scale[layer][:, p0:p0 + T] = s

    def _encode(self, x):
        """f32[KVH, T, hd] -> (values in the cache dtype, scales f32[KVH, T, nb] or None)."""
        if self.kv == "f32":
            return x, None
        rows = x.reshape(-1, x.shape[-1])
        if self.kv == "f16":
            try:
                return encodings.codec("f16").quantize(rows)[0].reshape(x.shape), None
            except EdgeLLMError:
                raise EdgeLLMError("a key or value is out of float16 range; use the f32 or "
                                   "int8 KV cache (kv='f32', --kv f32)") from None
        q, s = encodings.codec("int8").quantize(rows.reshape(-1, self.block))
        return q.reshape(x.shape), s.reshape(x.shape[:2] + (x.shape[2] // self.block,))

    def _decode(self, q, s):
        """Inverse of _encode for a slice of the cache: f32[KVH, n, hd]."""
        if s is None:
            return q.astype(np.float32)
        return q.astype(np.float32) * np.repeat(s, q.shape[-1] // s.shape[-1], axis=-1)

    def layer(self, layer):
        """(k, v, k_scale, v_scale) of a layer as the attention kernel reads them: values
        [KVH, n_ctx, hd] in the cache's dtype, scales f32[KVH, n_ctx, nb] (int8) or None."""
        return self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer]

    def nbytes(self):
        arrays = self.k + self.v + [a for a in self.k_scale + self.v_scale if a is not None]
        return sum(a.nbytes for a in arrays)

    # -----------------------------------------------------------------------------------------
    # sliding window

    def shift(self, n_drop, sinks, rotate):
        """Drop the n_drop cached tokens after the first `sinks` and move the later ones down
        by n_drop positions. rotate(keys f32[KVH, n, hd], delta) -> the keys rotated back by
        delta positions (RoPE keys are stored rotated: R(-delta) R(p) = R(p - delta)).

        A cache shifted before keeps its own number of sinks (the bookkeeping of the dropped
        tokens assumes every drop happens at the same place)."""
        if self.n_dropped:
            sinks = self.sinks
        p = self.pos
        if n_drop <= 0 or sinks < 0 or sinks + n_drop > p:
            raise EdgeLLMError(f"cannot drop {n_drop} tokens after {sinks} sinks from "
                               f"{p} cached tokens")
        a, b, end = sinks, sinks + n_drop, p - n_drop  # [a, b) goes; [b, p) moves to [a, end)
        for i in range(len(self.k)):
            # numpy copies overlapping slices through a temporary
            self.v[i][:, a:end] = self.v[i][:, b:p]
            if self.v_scale[i] is not None:
                self.v_scale[i][:, a:end] = self.v_scale[i][:, b:p]
            keys = self._decode(self.k[i][:, b:p],
                                None if self.k_scale[i] is None else self.k_scale[i][:, b:p])
            q, s = self._encode(np.ascontiguousarray(rotate(keys, n_drop), dtype=np.float32))
            self.k[i][:, a:end] = q
            if s is not None:
                self.k_scale[i][:, a:end] = s
        self.dropped_hash = _hash(self.tokens[a:b], self.dropped_hash)
        self.n_dropped += n_drop
        del self.tokens[a:b]
        self.sinks = sinks

    # -----------------------------------------------------------------------------------------
    # sessions

    def state(self):
        """The cached tokens, the window bookkeeping and the keys and values as plain arrays (for
        session files): {"tokens": int32[pos], "window": int64[3] (sinks, n_dropped, dropped_hash),
        "k.{layer}": [KVH, pos, hd] in the cache's dtype (float32, float16 or int8), "v.{layer}",
        and for int8 "k_scale.{layer}", "v_scale.{layer}": float32[KVH, pos, nb]}."""
        n = self.pos
        out = {"tokens": np.asarray(self.tokens, np.int32),
               "window": np.asarray([self.sinks, self.n_dropped, self.dropped_hash], np.int64)}
        for i in range(len(self.k)):
            out[f"k.{i}"] = self.k[i][:, :n]
            out[f"v.{i}"] = self.v[i][:, :n]
            if self.kv == "int8":
                out[f"k_scale.{i}"] = self.k_scale[i][:, :n]
                out[f"v_scale.{i}"] = self.v_scale[i][:, :n]
        return out

    def load_state(self, state):
        """Restore what state() returned, from a cache of any encoding (values are converted
        to this cache's encoding when they differ). Shapes are checked by the caller's reader."""
        tokens = [int(t) for t in state["tokens"]]
        if len(tokens) > self.n_ctx:
            raise EdgeLLMError(f"{len(tokens)} cached tokens exceed the context of {self.n_ctx}")
        n = len(tokens)
        for i in range(len(self.k)):
            for name, cache, scale in (("k", self.k, self.k_scale), ("v", self.v, self.v_scale)):
                q, s = state[f"{name}.{i}"], state.get(f"{name}_scale.{i}")
                if q.dtype == cache[i].dtype and (s is None) == (scale[i] is None):
                    cache[i][:, :n] = q
                    if s is not None:
                        scale[i][:, :n] = s
                else:
                    q2, s2 = self._encode(self._decode(np.asarray(q), s))
                    cache[i][:, :n] = q2
                    if s2 is not None:
                        scale[i][:, :n] = s2
        self.tokens = tokens
        w = [int(x) for x in state["window"]] if "window" in state else [0, 0, 0]
        self.sinks, self.n_dropped, self.dropped_hash = w
