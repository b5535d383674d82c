"""The KV cache: keys and values of the tokens run so far, per layer.

One KVCache per conversation; the Transformer runs against whichever cache it is given, so one
loaded model can serve several conversations (each keeps its own cache). The buffers are
allocated once, for n_ctx positions.
"""

import numpy as np


class KVCache:
    def __init__(self, cfg, n_ctx):
        self.n_ctx = n_ctx
        shape = (cfg.n_kv_heads, n_ctx, cfg.head_dim)  # per layer
        self.k = [np.zeros(shape, np.float32) for _ in range(cfg.n_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(cfg.n_layers)]
        self.tokens = []  # token ids whose keys and values are cached (len == pos)

    @property
    def pos(self):
        return len(self.tokens)

    def reset(self):
        self.tokens = []

    def rewind(self, n):
        """Keep only the first n cached tokens (their keys and values stay valid)."""
        del self.tokens[n:]

    def store(self, layer, p0, k, v):
        """Write k, v f32[T, KVH, hd] at positions p0.. of a layer."""
        T = k.shape[0]
        self.k[layer][:, p0:p0 + T] = k.transpose(1, 0, 2)
        self.v[layer][:, p0:p0 + T] = v.transpose(1, 0, 2)

    def layer(self, layer):
        """(keys, values) of a layer as the attention kernel reads them: f32[KVH, n_ctx, hd]."""
        return self.k[layer], self.v[layer]

    def state(self):
        """The cached tokens and their keys and values as plain arrays (for session files):
        {"tokens": int32[pos], "k.{layer}": [KVH, pos, hd], "v.{layer}": ...}."""
        n = self.pos
        out = {"tokens": np.asarray(self.tokens, np.int32)}
        for i in range(len(self.k)):
            out[f"k.{i}"] = self.k[i][:, :n]
            out[f"v.{i}"] = self.v[i][:, :n]
        return out

    def load_state(self, state):
        """Restore what state() returned (shapes are checked by the caller's file reader)."""
        tokens = [int(t) for t in state["tokens"]]
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} cached tokens exceed the context of {self.n_ctx}")
        n = len(tokens)
        for i in range(len(self.k)):
            self.k[i][:, :n] = state[f"k.{i}"]
            self.v[i][:, :n] = state[f"v.{i}"]
        self.tokens = tokens

    def nbytes(self):
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
