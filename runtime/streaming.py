"""Running a model under a DRAM budget: the resident parts read into memory, the rest streamed.

Stream.build(reader, cfg, plan, ...) makes the object a Transformer runs with (Transformer(...,
stream=)): it hands out the layers (Stream.layer) and, for each layer during a forward pass,
the layer with its streamed weights in place (Stream.enter).

Where weights live under a budget (docs/INTERNALS.md, "Streaming"):
- Resident parts (plan) are read once, through the FlashReader, into arrays this module
  allocates and counts (Stream.allocated). Nothing is mapped: mapped pages would be memory the
  ledger does not see, and a memory cgroup could drop and silently re-read them.
- Layers whose attention (dense/naive: or whole FFN) streams are read into one of two staging
  buffers; entering a layer waits for its read and starts the next streamed layer's read into the
  other buffer, so I/O overlaps compute (after the last layer, the first one of the next token).
- Naive mode when a layer's whole FFN does not fit the budget: a ChunkedFFN reads its rows in
  chunks through two buffers, the next chunk read while the current one computes.
- Window mode: each layer's FFN is a WindowFFN over a NeuronCache; the predictor says which
  neurons a token needs, only the missing rows are read, and the FFN is computed from the cache's
  rows (all of them: rows cached for recent tokens are computed too, which costs a little compute
  and no accuracy; a ReLU neuron that is not active contributes zero).
"""

import resource
import time

import numpy as np

from . import encodings, format, kernels
from .errors import EdgeLLMError
from .flashio import FlashReader, row_requests, split_request
from .neuroncache import NeuronCache
from .reader import Matrix, load_matrix

GAP_BYTES = 4096  # window reads join runs of missing rows separated by at most this many bytes
# of unwanted rows (read and dropped): demo model f16, cold, 50% budget: 0 -> 31,530 reads,
# 25 tokens/s; 4096 -> 13,827 reads (+38% bytes), 34 tokens/s; 8192 -> 6,965 reads, slower
HOT_FREQ = 0.2  # calibrated activation frequency from which a neuron is pinned (when room)
ALIGN = 64


class MemorySource:
    """Reads tensors into memory through the FlashReader; looks like a Reader to the Transformer
    and the predictors (array, matrix, vector, entry, has)."""

    def __init__(self, reader, flash):
        self.reader, self.flash = reader, flash
        self.model_dir, self.manifest, self.chunks = reader.model_dir, reader.manifest, \
            reader.chunks
        self._extents = {}
        self.allocated = {}  # what -> bytes
        self.streamed_rows = set()  # (file, name) of matrices read row by row

    def extents(self, file):
        if file not in self._extents:
            path = format.safe_path(self.model_dir, file)
            self._extents[file] = (path, format.check_chunk(path, self.chunks[file]))
        return self._extents[file]

    def extent(self, file, stored_name):
        path, ext = self.extents(file)
        dtype, shape, b, e = ext[stored_name]
        return path, dtype, shape, b, e

    def entry(self, file, name):
        return self.reader.entry(file, name)

    def has(self, file, name):
        return file in self.chunks and self.reader.has(file, name)

    def array(self, file, stored_name, what="resident"):
        path, dtype, shape, b, e = self.extent(file, stored_name)
        out = np.empty(shape, dtype=dtype)
        self.flash.read_into(path, b, out)
        self.allocated[what] = self.allocated.get(what, 0) + out.nbytes
        return out

    def matrix(self, file, name):
        entry = self.entry(file, name)
        c = encodings.codec(entry["encoding"], entry.get("group_size"))
        if (file, name) in self.streamed_rows:
            return RowStreamedMatrix(self, file, name, c, tuple(entry["shape"]))
        return load_matrix(self, file, name)

    def vector(self, file, name):
        return np.asarray(self.array(file, name), dtype=np.float32)


class RowStreamedMatrix:
    """An encoded matrix of which only dequantize(rows) is used (untied token embeddings): each
    call reads just those rows."""

    def __init__(self, src, file, name, codec, shape):
        self.src, self.codec, self.shape = src, codec, shape
        self.q_ext = src.extent(file, name)
        self.s_ext = (src.extent(file, format.scales_name(name))
                      if codec.scale_shape(*shape) is not None else None)

    def _rows(self, ext, rows):
        path, dtype, shape, b, _ = ext
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype=dtype)
        view = out.reshape(len(rows), -1).view(np.uint8)
        uniq = np.unique(rows)
        tmp = np.empty((uniq.size, row_bytes), np.uint8)
        self.src.flash.read(row_requests(path, b, row_bytes, uniq, tmp, np.arange(uniq.size)))
        view[:] = tmp[np.searchsorted(uniq, rows)]
        return out

    def dequantize(self, rows=None):
        if rows is None:
            raise EdgeLLMError("a row-streamed matrix is read by rows only")
        rows = np.asarray(rows, dtype=np.int64)
        q = self._rows(self.q_ext, rows)
        s = None if self.s_ext is None else self._rows(self.s_ext, rows)
        return self.codec.dequantize(q, s)


# ---------------------------------------------------------------------------------------------


class Stats:
    """Counters of one forward step (a token, or a prefill block)."""

    KEYS = ("tokens", "bytes_read", "reads", "neurons_loaded", "neurons_active", "hits",
            "neurons_computed", "io_s", "mem_s", "wall_s")

    def __init__(self):
        for k in self.KEYS:
            setattr(self, k, 0)

    def as_dict(self):
        d = {k: getattr(self, k) for k in self.KEYS}
        d["compute_s"] = max(0.0, self.wall_s - self.io_s - self.mem_s)
        return d


class StagedLayer:
    """Where the streamed tensors of one layer go in a staging buffer."""

    def __init__(self, src, i, names):
        self.file = format.layer_chunk(i)
        self.items = []  # (stored name, path, file offset, buffer offset, dtype, shape)
        off = 0
        for name in names:
            path, dtype, shape, b, e = src.extent(self.file, name)
            self.items.append((name, path, b, off, dtype, shape))
            off += (e - b + ALIGN - 1) // ALIGN * ALIGN
        self.nbytes = off

    def views(self, buf):
        return {name: buf[o:o + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
                for name, _, _, o, dtype, shape in self.items}

    def requests(self, buf):
        reqs = []
        for name, path, b, o, dtype, shape in self.items:
            n = int(np.prod(shape)) * dtype.itemsize
            reqs += split_request(path, b, buf[o:o + n])
        return reqs


class Stream:
    def __init__(self, reader, cfg, plan, io_threads=None, cold=False, predictors=None,
                 oracle=False):
        self.cfg, self.plan = cfg, plan
        self.flash = FlashReader(io_threads or plan.io_threads, cold)
        self.src = MemorySource(reader, flash=self.flash)
        if not cfg.tied_embeddings:
            self.src.streamed_rows.add((format.EMBED_CHUNK, "tok_embeddings"))
        self.prefill_block = plan.prefill_block
        self.window = plan.window
        self.step = 0
        self.cur = None  # Stats of the running step
        self.history = []  # Stats per finished step
        self.decode_from = 0  # first decode step in history (mark_decode)
        self._reader = reader  # the mapped reader: only the test oracle reads through it
        self._predictors = predictors  # callable layer -> predictor, or None
        self.oracle = oracle
        self.ffns = []  # window FFNs (naive in chunks: ChunkedFFNs)
        self.chunk_bufs = []  # naive in chunks: the two chunk buffers all layers share
        L = cfg.n_layers
        self.staged = [None] * L
        self.stage_bufs = []
        self.pending = None  # (layer, buffer index, futures) of the read ahead
        self._views = {}  # (layer, buffer index) -> Layer

    def build_layers(self, tf):
        cfg, plan, src = self.cfg, self.plan, self.src
        layers = []
        for i in range(cfg.n_layers):
            f = format.layer_chunk(i)
            if src.has(f, "ffn_gate"):
                raise EdgeLLMError(f"{f}: the FFN gate is stored apart (ffn_gate, written with "
                                   "SiLU thresholds); streaming under a DRAM budget does not "
                                   "take this layout yet: run it resident, or reconvert without "
                                   "--sparsity")
            names = []
            if not plan.attn_resident[i]:
                for n in ("attn_q", "attn_k", "attn_v", "attn_o"):
                    names += list(format.stored_tensors(n, src.entry(f, n)))
            full_ffn_streams = ((plan.mode == "naive" and not plan.ffn_chunk_rows)
                                or (plan.mode == "dense" and not plan.ffn_resident[i]))
            if full_ffn_streams:
                names.append("ffn_bundles")
                if src.has(f, "ffn_down"):  # dense mode only (the planner refuses the others)
                    names += list(format.stored_tensors("ffn_down", src.entry(f, "ffn_down")))
            if names:
                self.staged[i] = StagedLayer(src, i, names)
            layers.append(self._layer(tf, i))
        need = max([s.nbytes for s in self.staged if s is not None], default=0)
        self.stage_bufs = [np.zeros(need, np.uint8) for _ in range(2)] if need else []
        if need:
            src.allocated["staging"] = 2 * need
        return layers

    def _layer(self, tf, i):
        from .model import Layer, ResidentFFN

        cfg, plan, src = self.cfg, self.plan, self.src
        f = format.layer_chunk(i)
        mats = {n: (src.matrix(f, n) if plan.attn_resident[i] else None)
                for n in ("attn_q", "attn_k", "attn_v", "attn_o")}
        up_bias, down_bias = tf._opt(f, "ffn_up.bias"), tf._opt(f, "ffn_down.bias")
        layout = src.entry(f, "ffn_bundles")["parts"]
        if plan.mode == "window":
            ffn = self._window_ffn(i, layout, up_bias, down_bias)
        elif plan.mode == "naive" and plan.ffn_chunk_rows:
            ffn = self._chunked_ffn(i, layout, up_bias, down_bias)
        elif plan.mode == "dense" and plan.ffn_resident[i]:
            ffn = ResidentFFN(cfg, src.array(f, "ffn_bundles"), layout, up_bias, down_bias,
                              src.matrix(f, "ffn_down") if src.has(f, "ffn_down") else None)
        else:
            ffn = None  # set by enter() from the staging buffer
        self._layout = layout
        return Layer(attn_norm=tf._norm(f, "attn_norm"), q=mats["attn_q"], k=mats["attn_k"],
                     v=mats["attn_v"], o=mats["attn_o"], q_bias=tf._opt(f, "attn_q.bias"),
                     k_bias=tf._opt(f, "attn_k.bias"), v_bias=tf._opt(f, "attn_v.bias"),
                     o_bias=tf._opt(f, "attn_o.bias"), ffn_norm=tf._norm(f, "ffn_norm"), ffn=ffn)

    def _window_ffn(self, i, layout, up_bias, down_bias):
        cfg, plan, src = self.cfg, self.plan, self.src
        f = format.layer_chunk(i)
        if self.oracle:
            pred = OraclePredictor(self._reader, cfg, i)
        else:
            pred = self._predictors(i) if self._predictors else None
        if pred is None:
            raise EdgeLLMError(f"window mode needs a predictor or threshold for layer {i}; this "
                               "model has none (convert with --predictor, or use --mode dense)")
        path, dtype, shape, b, e = src.extent(f, "ffn_bundles")
        cache = NeuronCache(cfg.d_ff, plan.cache_rows[i], shape[1])
        src.allocated["neuron caches"] = src.allocated.get("neuron caches", 0) + cache.nbytes
        w = WindowFFN(self, i, cache, pred, path, b, layout, up_bias, down_bias)
        if plan.pinned_rows[i]:
            ids = self._hottest(i, plan.pinned_rows[i])
            rows = cache.pin(ids)
            self.flash.read_rows(path, b, shape[1], ids, cache.buf, int(rows[0]))
        self.ffns.append(w)
        return w

    def _hottest(self, i, n):
        """The n most frequently needed neurons of layer i (calibration's ffn_freq), sorted: the
        rows are not all hot first (co-activation order after the hottest, calibrate.py)."""
        f = format.layer_chunk(i)
        if not self.src.has(f, "ffn_freq"):
            return np.arange(n, dtype=np.int32)
        freq = self.src.vector(f, "ffn_freq")
        return np.sort(np.argsort(-freq, kind="stable")[:n]).astype(np.int32)

    def _chunked_ffn(self, i, layout, up_bias, down_bias):
        path, dtype, shape, b, e = self.src.extent(format.layer_chunk(i), "ffn_bundles")
        if not self.chunk_bufs:
            self.chunk_bufs = [np.zeros((self.plan.ffn_chunk_rows, shape[1]), np.uint8)
                               for _ in range(2)]
            self.src.allocated["FFN chunk buffers"] = 2 * self.chunk_bufs[0].nbytes
        w = ChunkedFFN(self, path, b, shape[0], layout, up_bias, down_bias)
        self.ffns.append(w)
        return w

    # -----------------------------------------------------------------------------------------
    # the forward pass calls these

    def begin(self, T):
        self.step += 1
        self.cur = Stats()
        self.cur.tokens = T
        self._t0 = time.perf_counter()
        self._b0 = self.flash.bytes_read
        self._r0 = self.flash.reads

    def end(self):
        s = self.cur
        s.wall_s = time.perf_counter() - self._t0
        s.bytes_read = self.flash.bytes_read - self._b0
        s.reads = self.flash.reads - self._r0
        self.history.append(s)
        self.cur = None

    def abort(self):
        """A step failed (an I/O error): finish in-flight reads, forget what they were for."""
        if self.pending is not None:
            try:
                self.flash.wait(self.pending[2])
            except EdgeLLMError:
                pass
        self.pending = None
        self.cur = None

    def enter(self, i, L):
        """Layer i ready to compute: streamed weights read (waiting if they are being read
        ahead), and the read of the next streamed layer started."""
        st = self.staged[i]
        if st is None:
            return L
        t = time.perf_counter()
        p, self.pending = self.pending, None
        if p is not None:
            self.flash.wait(p[2])  # a failed read raises here (the caller then calls abort)
        if p is not None and p[0] == i:
            b = p[1]
        else:  # nothing read ahead for this layer (first step, or after a failure)
            b = 0 if p is None else 1 - p[1]
            self.flash.read(st.requests(self.stage_bufs[b]))
        nxt = self._next_streamed(i)  # i itself when it is the only streamed layer
        self.pending = (nxt, 1 - b, self.flash.submit(self.staged[nxt].requests(
            self.stage_bufs[1 - b])))
        if self.cur is not None:
            self.cur.io_s += time.perf_counter() - t
            if L.ffn is None:
                self.cur.neurons_loaded += self.cfg.d_ff
        return self._staged_layer(i, b, L)

    def _next_streamed(self, i):
        L = self.cfg.n_layers
        for k in range(1, L + 1):
            j = (i + k) % L
            if self.staged[j] is not None:
                return j
        return None

    def _staged_layer(self, i, b, L):
        key = (i, b)
        if key not in self._views:
            from dataclasses import replace

            from .model import ResidentFFN

            v = self.staged[i].views(self.stage_bufs[b])
            f = format.layer_chunk(i)
            def matrix(n):
                e = self.src.entry(f, n)
                c = encodings.codec(e["encoding"], e.get("group_size"))
                return Matrix(v[n], v.get(format.scales_name(n)), c, tuple(e["shape"]))

            upd = {attr: matrix(n) for n, attr in (("attn_q", "q"), ("attn_k", "k"),
                                                   ("attn_v", "v"), ("attn_o", "o")) if n in v}
            if "ffn_bundles" in v:
                upd["ffn"] = ResidentFFN(self.cfg, v["ffn_bundles"], self._layout,
                                         self._opt_bias(i, "ffn_up.bias"),
                                         self._opt_bias(i, "ffn_down.bias"),
                                         matrix("ffn_down") if "ffn_down" in v else None)
            self._views[key] = replace(L, **upd)
        return self._views[key]

    def _opt_bias(self, i, name):
        f = format.layer_chunk(i)
        if not self.src.has(f, name):
            return None
        if not hasattr(self, "_bias"):
            self._bias = {}
        if (i, name) not in self._bias:
            self._bias[(i, name)] = self.src.vector(f, name)
        return self._bias[(i, name)]

    # -----------------------------------------------------------------------------------------

    def reset_caches(self):
        """Empty the neuron caches (pinned rows stay) and the staging state."""
        self.abort()
        for w in self.ffns:
            if isinstance(w, WindowFFN):
                w.cache.evict_unpinned()

    def reset_stats(self):
        self.history = []
        self.decode_from = 0

    def mark_decode(self):
        """Steps from here on are decode steps (one token each); the ones before, the prompt."""
        self.decode_from = len(self.history)

    @property
    def allocated_bytes(self):
        return sum(self.src.allocated.values())

    def summary(self, budget=None):
        """Flash statistics since reset_stats (the --stats-json keys). Totals cover every step;
        tokens, tokens_per_s and the per-token figures cover the decode steps (all steps when
        mark_decode was not called)."""
        steps = [s.as_dict() for s in self.history]
        dec = steps[self.decode_from:] or steps

        def total(rows, k):
            return sum(r[k] for r in rows)

        n = max(total(dec, "tokens"), 1)
        active = total(dec, "neurons_active")
        wall = total(dec, "wall_s")
        return {
            "mode": self.plan.mode, "tokens": total(dec, "tokens"),
            "tokens_per_s": total(dec, "tokens") / wall if wall else 0.0,
            "prompt_tokens": total(steps[:self.decode_from], "tokens"),
            "bytes_read": total(steps, "bytes_read"), "reads": total(steps, "reads"),
            "bytes_read_per_token": total(dec, "bytes_read") / n,
            "neurons_loaded_per_token": total(dec, "neurons_loaded") / n,
            "neurons_active_per_token": active / n if self.plan.mode == "window" else None,
            "hit_rate": total(dec, "hits") / active if active else None,
            "io_s": total(steps, "io_s"), "compute_s": total(steps, "compute_s"),
            "mem_s": total(steps, "mem_s"), "wall_s": total(steps, "wall_s"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dram_budget_bytes": budget if budget is not None else self.plan.budget,
            "allocated_bytes": self.allocated_bytes, "plan_bytes": self.plan.total,
            "per_step": steps, "decode_from_step": self.decode_from,
        }

    def close(self):
        self.abort()
        self.flash.close()


# ---------------------------------------------------------------------------------------------


class WindowFFN:
    """One layer's FFN from its neuron cache (see the module docstring)."""

    def __init__(self, stream, layer, cache, predictor, path, base, layout, up_bias, down_bias):
        self.stream, self.layer, self.cache, self.predictor = stream, layer, cache, predictor
        self.path, self.base, self.layout = path, base, layout
        self.up_bias, self.down_bias = up_bias, down_bias
        self.cfg = stream.cfg

    def _compute(self, h, r0, r1):
        c, cfg = self.cache, self.cfg
        bias = None
        if self.up_bias is not None and not cfg.gated_ffn:
            bias = self.up_bias[c.ids[r0:r1]]
        return kernels.ffn(h, c.buf[r0:r1], self.layout, cfg.d_model, cfg.activation,
                           cfg.gated_ffn, bias)

    def _load(self, neurons, step, s):
        """Insert and read rows for neurons (they fit)."""
        c = self.cache
        n0 = c.n
        rows = c.insert(neurons, step)
        t = time.perf_counter()
        try:  # the rows are appended in order: they land in consecutive cache rows
            self.stream.flash.read_rows(self.path, self.base, c.stride, neurons, c.buf,
                                        int(rows[0]) if rows.size else 0,
                                        max_gap=GAP_BYTES // c.stride)
        except BaseException:
            c.drop_tail(n0)
            raise
        if s is not None:
            s.io_s += time.perf_counter() - t
            s.neurons_loaded += neurons.size

    def __call__(self, h):
        c, s = self.cache, self.stream.cur
        step = self.stream.step
        if h.shape[0] == 1:
            active = self.predictor.active(h[0])
        else:
            active = np.unique(np.concatenate([self.predictor.active(r) for r in h]))
        active = np.asarray(active, dtype=np.int32)
        tp = time.perf_counter()
        # rows stay while there is room; when the missing do not fit, the least recently used go
        missing = c.prepare(active, step)
        if s is not None:
            s.mem_s += time.perf_counter() - tp
            s.neurons_active += active.size
            s.hits += active.size - missing.size
        if missing.size <= c.capacity - c.n:
            self._load(missing, step, s)
            out = self._compute(h, 0, c.n)
            if s is not None:
                s.neurons_computed += c.n
        else:
            # more needed than fits: compute what is cached, then the rest in batches that
            # replace the unpinned rows (each row is computed once)
            out = self._compute(h, 0, c.n)
            done = c.n
            todo = missing
            while todo.size:
                c.evict_unpinned()
                batch, todo = todo[:c.capacity - c.n], todo[c.capacity - c.n:]
                r0 = c.n
                self._load(batch, step, s)
                out += self._compute(h, r0, c.n)
                done += batch.size
            if s is not None:
                s.neurons_computed += done
        if self.down_bias is not None:
            out += self.down_bias
        return out


class ChunkedFFN:
    """One layer's FFN read whole every token (naive) through the stream's two chunk buffers:
    chunk j+1 is read while chunk j computes; the output is the sum of the chunks' FFNs."""

    def __init__(self, stream, path, base, n, layout, up_bias, down_bias):
        self.stream, self.path, self.base, self.n = stream, path, base, n
        self.layout, self.up_bias, self.down_bias = layout, up_bias, down_bias
        self.cfg = stream.cfg

    def _submit(self, j, r0, r1):
        buf = self.stream.chunk_bufs[j % 2]
        stride = buf.shape[1]
        return self.stream.flash.submit(split_request(self.path, self.base + r0 * stride,
                                                      buf[:r1 - r0].reshape(-1)))

    def __call__(self, h):
        cfg, s, flash = self.cfg, self.stream.cur, self.stream.flash
        R = self.stream.chunk_bufs[0].shape[0]
        chunks = [(r0, min(self.n, r0 + R)) for r0 in range(0, self.n, R)]
        pending = self._submit(0, *chunks[0])
        out = None
        try:
            for j, (r0, r1) in enumerate(chunks):
                t = time.perf_counter()
                p, pending = pending, None
                flash.wait(p)
                if j + 1 < len(chunks):  # the other buffer's chunk is computed: reuse it
                    pending = self._submit(j + 1, *chunks[j + 1])
                if s is not None:
                    s.io_s += time.perf_counter() - t
                bias = None
                if self.up_bias is not None and not cfg.gated_ffn:
                    bias = self.up_bias[r0:r1]
                part = kernels.ffn(h, self.stream.chunk_bufs[j % 2][:r1 - r0], self.layout,
                                   cfg.d_model, cfg.activation, cfg.gated_ffn, bias)
                out = part if out is None else out + part
        finally:
            if pending is not None:  # an error: let the read in flight finish first
                try:
                    flash.wait(pending)
                except EdgeLLMError:
                    pass
        if s is not None:
            s.neurons_loaded += self.n
        if self.down_bias is not None:
            out += self.down_bias
        return out


class OraclePredictor:
    """The true active set of a ReLU model, from all of a layer's gate (OPT: up) rows decoded
    through the mapped reader. For tests and measurements of the cache only: it reads every row,
    outside the flash reader's counts and outside the budget."""

    def __init__(self, reader, cfg, layer):
        from .predictor import decoded_part, needed

        if cfg.activation != "relu":
            raise EdgeLLMError("the oracle predictor needs a ReLU model")
        f = format.layer_chunk(layer)
        self.cfg = cfg
        self.w = decoded_part(cfg, reader.array(f, "ffn_bundles"),
                              reader.entry(f, "ffn_bundles")["parts"])
        self.bias = reader.vector(f, "ffn_up.bias") if reader.has(f, "ffn_up.bias") else None
        self._needed = needed

    def active(self, h):
        # (an oracle for tests and measurements: it reads every up row, so it saves no I/O)
        z = np.einsum("nd,d->n", self.w, np.asarray(h, np.float32).reshape(-1))
        if self.bias is not None and not self.cfg.gated_ffn:
            z += self.bias
        return np.flatnonzero(self._needed(self.cfg, z[None])[0]).astype(np.int32)


def calibration_hints(src, cfg):
    """(active fraction, hot rows) per layer from calibration, or (None, None). The fraction is
    the predictor's predicted fraction (manifest calibration record) when there is one, else the
    mean activation frequency (ffn_freq)."""
    freqs = []
    for i in range(cfg.n_layers):
        f = format.layer_chunk(i)
        if not src.has(f, "ffn_freq"):
            return None, None
        freqs.append(src.vector(f, "ffn_freq"))
    frac = [float(x.mean()) for x in freqs]
    layers = (src.manifest.get("calibration") or {}).get("layers") or []
    pred = [r.get("predicted_fraction") for r in layers if isinstance(r, dict)]
    if len(pred) == len(frac) and all(isinstance(p, (int, float)) for p in pred):
        frac = [max(a, float(b)) for a, b in zip(frac, pred)]
    return frac, [int((x >= HOT_FREQ).sum()) for x in freqs]


def has_predictors(src, cfg):
    f = format.layer_chunk(0)
    return src.has(f, "ffn_pred.a") or src.has(f, "ffn_act_threshold")


def open_stream(reader, cfg, dram_budget, mode=None, n_ctx=None, kv=None, window=None,
                io_threads=None, cold=False, oracle=False, plan_only=False):
    """Plan a budget and build the Stream a Transformer runs with. dram_budget None (with a
    mode): as much resident as the mode allows."""
    from . import plan as planner

    budget = planner.parse_budget(dram_budget) if dram_budget is not None else 1 << 62
    probe = MemorySource(reader, FlashReader(1))
    try:
        pred = has_predictors(probe, cfg)
        if mode is None:
            mode = "window" if pred else "dense"
        if mode == "window" and not (pred or oracle):
            raise EdgeLLMError("window mode needs activation predictors or thresholds, and this "
                               "model has none (convert with --predictor --calib FILE.txt), or "
                               "use --mode dense")
        frac, hot = calibration_hints(probe, cfg) if mode == "window" else (None, None)
    finally:
        probe.flash.close()
    p = planner.make_plan(reader.manifest, cfg, budget, mode, n_ctx=n_ctx, kv=kv,
                          window=window, active_fraction=frac, hot_rows=hot,
                          io_threads=io_threads)
    if plan_only:
        return p

    def load_predictor(i):
        from .predictor import Predictor

        return Predictor.load(stream.src, cfg, i)

    stream = Stream(reader, cfg, p, io_threads=io_threads, cold=cold,
                    predictors=load_predictor, oracle=oracle)
    return stream
