"""The forward pass: prefill (matrix-matrix, in blocks) and decode (one token at a time).

One code path for every architecture: the differences (norm kind, activation, gated FFN, rotary or
learned positions, biases, tied head) are ModelConfig values. Weights come from the Reader; the
math is in runtime/kernels.
"""

import time
from dataclasses import dataclass

import numba
import numpy as np

from . import format, gateapart, kernels, teal, threads
from . import lowrank
from .kernels import fused, rows16, team, w8a8
from .predictor import Predictor
from .reader import Matrix
from .errors import ContextLengthError, EdgeLLMError
from .kvcache import DEFAULT as DEFAULT_KV
from .kvcache import KVCache

PREFILL_BLOCK = 256  # tokens per prefill block: weights are dequantized once per block, so
# larger blocks amortize that (TinyLlama int4, 256-token prompt: 64 -> 256 gave ~1.5x, measured)


@dataclass
class Layer:
    attn_norm: tuple  # (weight, bias or None)
    q: object  # reader.Matrix
    k: object
    v: object
    o: object
    q_bias: np.ndarray | None
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    o_bias: np.ndarray | None
    ffn_norm: tuple
    ffn: object  # h f32[T, d] -> f32[T, d]: ResidentFFN, or a streaming one (flash)


class ResidentFFN:
    """The feed-forward block computed from its row-column bundles as mapped from the chunk."""

    def __init__(self, cfg, bundles, layout, up_bias, down_bias, down=None, gate=None):
        self.cfg, self._bundles, self.layout = cfg, bundles, layout
        self.up_bias, self.down_bias = up_bias, down_bias
        self.down = down  # Matrix [d, d_ff] when the bundles hold no down part (GGUF kept)
        self.gate = gate  # Matrix [d_ff, d] when the bundles hold no gate part (runtime/gateapart)
        self.packed = None  # reader.PackedBundles: gate/up packed for decode (pack)

    @property
    def bundles(self):
        """The bundle rows (a copy, made per call, where pack() packed them)."""
        return self._bundles if self.packed is None else self.packed.rows()

    def pack(self, reader, file):
        """Pack int4 gate and up parts 16 rows a group for decode (kernels/rows16.py), in place
        where the reader read the chunk into memory; needs the down projection as a matrix and
        the parts of one group size. Decode then reads them through fused.plan_ffn."""
        parts = {e["name"]: e for e in self.layout}
        names = ("gate", "up") if self.cfg.gated_ffn else ("up",)
        if set(parts) != set(names) or self.down is None or self.gate is not None:
            return
        es = [parts[k] for k in names]
        if {(e["encoding"], e["group_size"]) for e in es} != {("int4", es[0]["group_size"])}:
            return
        self.packed = reader.pack_bundles(file, "ffn_bundles",
                                          [(e["offset"], e["scale_offset"]) for e in es],
                                          self.cfg.d_model, es[0]["group_size"])
        if self.packed is not None:
            self._bundles = None

    def __call__(self, h):
        cfg = self.cfg
        f = fused.ffn_alone(self, h) if self.packed is not None and h.shape[0] == 1 else None
        if f is not None:
            if self.down_bias is not None:
                f += self.down_bias
            return f
        if self.gate is not None:
            f = gateapart.ffn(self, h)
            if self.down_bias is not None:
                f += self.down_bias
            return f
        f = kernels.ffn(h, self._bundles, self.layout, cfg.d_model, cfg.activation,
                        cfg.gated_ffn, self.up_bias, self.down, packed=self.packed)
        if self.down_bias is not None:
            f += self.down_bias
        return f


class Timer:
    """Seconds spent per part of the forward pass (for --stats)."""

    def __init__(self):
        self.parts = {}

    def add(self, part, t0):
        t1 = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + (t1 - t0)
        return t1


class Transformer:
    def __init__(self, reader, cfg, n_ctx=None, kv=DEFAULT_KV, stream=None):
        """stream: a runtime.streaming.Stream (DRAM budget): weights come from its memory
        source and streamed layers are entered through it; None: everything mapped."""
        self.stream = stream
        if stream is not None:
            reader = stream.src
        self.reader, self.cfg = reader, cfg
        # per-token int8 activations (W8A8, SmoothQuant; kernels/w8a8.py): the linears' kernels
        self.act_token = w8a8.mode(getattr(reader, "manifest", None) or {})
        if self.act_token is None:
            raise EdgeLLMError("activation_quant in the manifest asks for an activation "
                               "quantization this edgellm does not implement; upgrade edgellm")
        self.ops = w8a8 if self.act_token else kernels
        if stream is not None and lowrank.in_manifest(reader.manifest):
            raise EdgeLLMError("a model with low-rank projections (converters/lowrank.py) "
                               "cannot stream under a DRAM budget yet; load it resident")
        if stream is not None:
            teal.refuse_streaming(reader.manifest)
        self.prefill_block = stream.prefill_block if stream is not None else PREFILL_BLOCK
        self.n_ctx = min(cfg.max_context, n_ctx or cfg.max_context)
        self.kv = kv  # KV cache encoding of new caches (kvcache.ENCODINGS)
        self.timer = Timer()
        E = format.EMBED_CHUNK
        self.embed = reader.matrix(E, "tok_embeddings")
        self.pos_embed = reader.vector(E, "pos_embeddings") if cfg.positions == "learned" else None
        self.norm = self._norm(E, "norm")
        self.head = self.embed if cfg.tied_embeddings else reader.matrix(E, "output")
        if stream is not None:
            self.layers = stream.build_layers(self)
        else:
            self.layers = [self._layer(format.layer_chunk(i)) for i in range(cfg.n_layers)]
        if cfg.positions == "rope":
            self.cos, self.sin = kernels.rope_tables(cfg.head_dim, self.n_ctx, cfg.rope_theta,
                                                     cfg.rope_scaling)
        self.cache = self.new_cache()  # the cache forward() runs against; callers may swap it
        # decode each layer in one call where it can (kernels/fused.py: per-block activations)
        self.fused = not self.act_token
        if stream is None and not self.act_token:
            self._pack()
        self._fused_plans = None  # per layer: decode_layer's arguments, or None (general path)

    def _norm(self, file, name):
        w = self.reader.vector(file, name + ".weight")
        b = self.reader.vector(file, name + ".bias") if self.cfg.norm == "layer" else None
        return w, b

    def _opt(self, file, name):
        return self.reader.vector(file, name) if self.reader.has(file, name) else None

    def _layer(self, f):
        r = self.reader
        if teal.has_teal(r, f):  # weights by input column, TEAL thresholds (runtime/teal.py)
            if self.act_token:
                raise EdgeLLMError("TEAL thresholds with per-token int8 activations (W8A8) are "
                                   "not supported")
            ffn = teal.TealFFN.load(r, self.cfg, f, self._opt(f, "ffn_down.bias"))
        else:
            entry = r.entry(f, "ffn_bundles")
            resident = ResidentFFN(self.cfg, r.array(f, "ffn_bundles"), entry["parts"],
                                   self._opt(f, "ffn_up.bias"), self._opt(f, "ffn_down.bias"),
                                   r.matrix(f, "ffn_down") if r.has(f, "ffn_down") else None,
                                   r.matrix(f, "ffn_gate") if r.has(f, "ffn_gate") else None)
            ffn = w8a8.TokenFFN(resident) if self.act_token else resident
        return Layer(
            attn_norm=self._norm(f, "attn_norm"),
            q=lowrank.projection(r, f, "attn_q"), k=lowrank.projection(r, f, "attn_k"),
            v=lowrank.projection(r, f, "attn_v"), o=lowrank.projection(r, f, "attn_o"),
            q_bias=self._opt(f, "attn_q.bias"), k_bias=self._opt(f, "attn_k.bias"),
            v_bias=self._opt(f, "attn_v.bias"), o_bias=self._opt(f, "attn_o.bias"),
            ffn_norm=self._norm(f, "ffn_norm"),
            ffn=ffn,
        )

    def _pack(self):
        """int4 matrices in the layout decode reads 16 rows at a time (kernels/rows16.py), in
        place where the reader read the chunks into memory (Reader.pack: otherwise unchanged).
        q, k and v all or none (one kernel call takes the three)."""
        pack = getattr(self.reader, "pack", None)
        if pack is None or not rows16.ENABLED:
            return

        def takes(m):
            return (type(m) is Matrix and m.codec.name == "int4"
                    and rows16.packable(*m.shape, m.codec.group_size))

        for i, L in enumerate(self.layers):
            f = format.layer_chunk(i)
            if all(takes(m) for m in (L.q, L.k, L.v)):
                L.q, L.k, L.v = (pack(f, n) for n in ("attn_q", "attn_k", "attn_v"))
            if takes(L.o):
                L.o = pack(f, "attn_o")
            # not where a predictor may turn on row skipping (it reads neurons as rows)
            if (type(L.ffn) is ResidentFFN and L.ffn.gate is None and takes(L.ffn.down)
                    and Predictor.load(self.reader, self.cfg, i) is None):
                L.ffn.down = pack(f, "ffn_down")
                L.ffn.pack(self.reader, f)
        if not self.cfg.tied_embeddings and takes(self.head):
            self.head = pack(format.EMBED_CHUNK, "output")

    # -----------------------------------------------------------------------------------------

    def new_cache(self):
        return KVCache(self.cfg, self.n_ctx, self.kv)

    @property
    def tokens(self):
        return self.cache.tokens

    @property
    def pos(self):
        return self.cache.pos

    def reset(self):
        self.cache.reset()

    def rewind(self, n):
        """Keep only the first n cached tokens (their keys and values stay valid)."""
        self.cache.rewind(n)

    def shift(self, n_drop, sinks):
        """Sliding window: drop n_drop cached tokens after the first `sinks`, move the rest down
        (KVCache.shift). Only rotary positions can move: learned absolute positions are baked
        into the hidden states of every later layer."""
        if self.cfg.positions != "rope":
            raise EdgeLLMError(f"the context window cannot slide on this model: its positions "
                               f"are {self.cfg.positions} absolute embeddings, not rotary")
        self.cache.shift(n_drop, sinks, self._rotate_back)

    def _rotate_back(self, keys, delta):
        """RoPE-rotated keys f32[KVH, n, hd] rotated by -delta positions: cos(-a) = cos(a),
        sin(-a) = -sin(a), so row delta of the tables with the sine negated."""
        flat = keys.reshape(-1, 1, keys.shape[-1])
        out = kernels.apply_rope(flat, self.cos[delta:delta + 1], -self.sin[delta:delta + 1],
                                 np.zeros(flat.shape[0], np.int64))
        return out.reshape(keys.shape)

    def apply_norm(self, x, norm):
        w, b = norm
        if b is None:
            return kernels.rmsnorm(x, w, self.cfg.norm_eps)
        return kernels.layernorm(x, w, b, self.cfg.norm_eps)

    def forward(self, ids, all_logits=False):
        """Run tokens ids (appended after the cached ones). Returns logits f32[T, V] for every
        new token when all_logits, else f32[1, V] for the last one."""
        threads.apply()  # --threads in whichever thread runs this (runtime/threads.py)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EdgeLLMError("forward needs at least one token")
        if self.pos + ids.size > self.n_ctx:
            raise ContextLengthError(
                f"{self.pos + ids.size} tokens do not fit in the context of {self.n_ctx} tokens")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise EdgeLLMError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        out = []
        step = self.prefill_block
        # no more threads than cores free now, where results do not depend on it (threads.py)
        restore = threads.adapt(blas=ids.size > 1)
        try:
            for b in range(0, ids.size, step):
                block = ids[b:b + step]
                last = b + step >= ids.size
                x = self._block(block)
                if all_logits or last:
                    # a prefill's last token: float activations through the head, as every
                    # other prefill product (decode's kernels round them to int8 blocks)
                    out.append(self._logits(x if all_logits else x[-1:], ids.size > 1))
        finally:
            threads.restore(restore)
        return np.concatenate(out, axis=0)

    def _block(self, ids):
        """Hidden states f32[T, d] after all layers for a block of new tokens."""
        if self.stream is None:
            return self._layers(ids)
        self.stream.begin(ids.size)
        try:
            x = self._layers(ids)
        except BaseException:
            self.stream.abort()  # e.g. a failed read: the model stays usable
            raise
        self.stream.end()
        return x

    def _layers(self, ids):
        cfg, T, p0 = self.cfg, ids.size, self.pos
        t = time.perf_counter()
        x = self.embed.dequantize(ids)
        if self.pos_embed is not None:
            x += self.pos_embed[p0 + cfg.pos_offset + np.arange(T)]
        positions = np.arange(p0, p0 + T, dtype=np.int64)
        t = self.timer.add("embed", t)
        plans = self._fused_layers() if T == 1 and self.fused and self.stream is None else None
        # decoded layers: one thread for a small model, else the count asked for (threads.py)
        restore = threads.narrow_for_layers(self, self._teams(plans)) if T == 1 else 0
        try:
            i = 0
            while i < len(self.layers):
                L = self.layers[i]
                if plans is not None and self._fused_plan(i, L) is not None:
                    x, i = self._fused_layers_from(i, x, p0)
                    t = self.timer.add("layer", t)
                    continue
                if self.stream is not None:
                    L = self.stream.enter(i, L)  # its streamed weights in place
                x = self._attention(i, L, x, positions)
                t = self.timer.add("attention", t)
                x = x + L.ffn(self.apply_norm(x, L.ffn_norm))
                t = self.timer.add("ffn", t)
                i += 1
        finally:
            if restore:
                numba.set_num_threads(restore)
        self.cache.tokens.extend(int(i) for i in ids)
        return x

    def _fused_layers(self):
        """decode_layer's arguments per layer, prepared once (None: that layer runs the general
        path); none at all when the cache's encoding is not one the fused call writes."""
        if not fused.takes_cache(self.cache.kv):
            return None
        if self._fused_plans is None:
            n = len(self.layers)
            self._fused_plans = ([None] * n, fused.Scratch(self.cfg), [None] * n, [None] * n, {})
        return self._fused_plans[0]

    def _fused_plan(self, i, L):
        """Layer i's plan, made again when the layer or its FFN was replaced (e.g. a predicted
        FFN put in for a measurement)."""
        plans, _, memo, made_for, _ = self._fused_plans
        if made_for[i] is None or made_for[i][0] is not L or made_for[i][1] is not L.ffn:
            plans[i] = fused.plan_layer(self.cfg, L, ResidentFFN)
            memo[i] = None
            made_for[i] = (L, L.ffn, plans[i] is not None and team.team_ok(*plans[i]))
        return plans[i]

    def _teams(self, plans):
        """True when every layer decodes as a team on more than one thread (kernels/team.py:
        one wake-up a token, and the same result on any thread count)."""
        if plans is None or not team.enabled():
            return False
        made_for = self._fused_plans[3]
        for i, L in enumerate(self.layers):
            self._fused_plan(i, L)
            if not made_for[i][2]:
                return False
        return True

    def _call(self, i, T):
        """Planned layer i's (kernel, arguments) against the cache (fused.layer_args) on T
        threads, kept until the cache or the thread count changes."""
        plans, scratch, memo, _, _ = self._fused_plans
        kc, vc, ks, vs = self.cache.layer(i)
        hit = memo[i]
        if hit is None or hit[0][0] is not kc or hit[0][1] is not vc or hit[0][2] != T:
            hit = memo[i] = ((kc, vc, T), fused.layer_args(
                i, plans[i], scratch, self.cfg.norm_eps, kc, vc, ks, vs, self.cos, self.sin,
                getattr(self.cache, "block", 0)))
        return hit[1]

    def _fused_layers_from(self, i, x, p0):
        """One decoded token through planned layer i in one kernel call, and through the
        planned layers after it that decode as the same team in that call too (one parallel
        region for them all: kernels/team.py). x f32[1, d]; returns (x, the next layer)."""
        _, scratch, _, _, runs = self._fused_plans
        xb = scratch.x
        if x is not scratch.x2:
            xb[:] = x[0]
        T = numba.get_num_threads()
        kernel, args = self._call(i, T)
        if kernel is not team.decode_team:
            rc = kernel(xb, p0, *args)
            j = i + 1
        else:
            layer, bufs, typ = args
            run = [layer]
            j = i + 1
            while j < len(self.layers) and self._fused_plan(j, self.layers[j]) is not None:
                kernel, args = self._call(j, T)
                if kernel is not team.decode_team or args[1] is not bufs or args[2] != typ:
                    break
                run.append(args[0])
                j += 1
            hit = runs.get(i)
            if hit is None or len(hit[0]) != len(run) or any(
                    a is not b for a, b in zip(hit[0], run)):
                hit = runs[i] = (run, team.layer_lists(run, T))
            rc = team.decode_team(xb, p0, hit[1], bufs.ctl[i:j], *bufs.threads())
        if rc != fused.OK:
            raise EdgeLLMError("a key or value is out of float16 range; use the f32 or int8 KV "
                               "cache (kv='f32', --kv f32)")
        return scratch.x2, j

    def _attention(self, i, L, x, positions):
        cfg, T, p0 = self.cfg, x.shape[0], self.pos
        h = self.apply_norm(x, L.attn_norm)
        q, k, v = lowrank.linear_many(self.ops, (L.q, L.k, L.v), h,
                                      (L.q_bias, L.k_bias, L.v_bias))
        q = q.reshape(T, cfg.n_heads, cfg.head_dim)
        k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.positions == "rope":
            q = kernels.apply_rope(q, self.cos, self.sin, positions)
            k = kernels.apply_rope(k, self.cos, self.sin, positions)
        self.cache.store(i, p0, k, v)
        kc, vc, ks, vs = self.cache.layer(i)
        a = kernels.attention(q, kc, vc, p0, ks, vs)
        return x + _linear(L.o, a.reshape(T, cfg.q_dim), L.o_bias, self.ops)

    def _logits(self, x, float_act=False):
        t = time.perf_counter()
        h = self.apply_norm(x, self.norm)
        logits = kernels.linear(self.head, h, float_act)
        self.timer.add("head", t)
        return logits


def _linear(m, x, bias, ops=kernels):
    y = lowrank.linear(ops, m, x)
    if bias is not None:
        y += bias
    return y
