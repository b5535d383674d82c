"""The planner: a DRAM budget -> what stays resident and what streams from flash.

The budget covers what the model needs: resident weights (read into memory, not mapped), the
neuron caches, the KV cache, the staging buffers that whole streamed layers are read into, and the
scratch the forward pass uses. The process's own baseline (interpreter, NumPy, Numba and its
compiled kernels) is not in it; benchmarks measure and report that separately.

Always resident: norms and biases, the KV cache, the head (with tied embeddings the embedding
matrix is the head), positional embeddings, predictors, scratch. Untied token embeddings are read
row by row, one row per token. Then, from what is left:

    attention of a layer    resident, or streamed with its layer
    FFN of a layer          dense: resident whole, or streamed whole every token
                            naive: streamed whole every token (the paper's baseline); when a
                            whole layer does not fit, read in chunks of rows through two
                            chunk buffers (sums in another order: not bit-exact)
                            window: a neuron cache per layer (runtime/neuroncache.py), as many
                            rows as the budget allows (hot rows pinned first when calibrated);
                            a cache smaller than a token's active set still works (the rest is
                            read and computed in batches through it) down to MIN_CACHE_ROWS

Layers whose attention (dense/naive: or FFN) streams are read into one of two staging buffers,
the next one read ahead while the current one computes. The plan with the most resident bytes
that fits wins; a budget below the smallest plan is refused with that minimum.
"""

import math
import re
from dataclasses import dataclass, field

from . import format
from .errors import EdgeLLMError
from .flashio import DEPTH

MODES = ("window", "dense", "naive")
DEFAULT_WINDOW = 5  # tokens a neuron stays cached after its last use (the paper's k)
DEFAULT_ACTIVE_FRACTION = 0.25  # when the model states none: per-token active share assumed
PREFILL_TILE = 4 << 20  # kernels.TILE_BYTES: the float32 tile prefill (T > 1) dequantizes into
PREFILL_BLOCK = 256
# smaller prefill blocks a plan falls back to before going token by token, whose decode kernels
# round activations to int8 (logits move by 5e-3 of their scale on the demo, 5e-2 on SmolLM2
# keep). Blocks of 32 and 64 sum in BLAS's order for another block height: logits within 5e-7
# of their scale of the 256-token blocks' (often equal); blocks of 8 moved them by 1e-4
PREFILL_BLOCKS = (PREFILL_BLOCK, 64, 32)
MIN_CACHE_ROWS = 32  # window: smallest neuron cache per layer (below, batches cost more than reads)
MIN_CHUNK_ROWS = 32  # naive: smallest chunk of FFN rows read and computed at once
MAX_CHUNK_BYTES = 1 << 20  # naive: largest chunk (larger ones save few reads, and a cold read
# passes through the page cache: relu-large naive at 50% staged whole 6.3 MB FFN layers and,
# with those pages in flight, its cgroup evicted and re-read its own code, 227 MB a token)
IO_THREAD_BYTES = 48 << 10  # memory an I/O thread holds (stack pages, its malloc arena): demo,
# window, 4 -> 32 threads: +1.0 MB in a memory cgroup, ~37 kB a thread
IO_THREAD_SHARE = 8  # default I/O threads: up to DEPTH, taking at most 1/8 of the budget (on
# this disk threads matter more than cache rows: demo f16 at 75%, window, 10 threads 36 tokens/s,
# 32 threads (uncounted) 120)
MIN_IO_THREADS = 4  # ... and at least this many (a budget near the minimum plans with these)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_budget(value):
    """'800MB', '1.5GB', '512MiB', '2000000' (bytes) or an int -> bytes. KB/MB/GB (and k/m/g)
    are powers of 10, KiB/MiB/GiB powers of 2."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise EdgeLLMError(f"dram budget {value!r}: expected a size such as 800MB, 1.5GB or "
                               "512MiB")
        n = float(m.group(1)) * _UNITS[unit]
    if not n > 0:
        raise EdgeLLMError(f"dram budget must be positive, got {value!r}")
    return int(n)


def human(n):
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Part:
    name: str
    nbytes: int  # DRAM bytes taken
    where: str  # resident | streamed | buffer
    read_per_token: float = 0.0  # expected bytes read from flash per token
    note: str = ""


@dataclass
class Plan:
    mode: str
    budget: int
    n_layers: int
    attn_resident: list  # per layer: bool
    ffn_resident: list  # per layer: bool (dense; window: the cache is resident by nature)
    cache_rows: list  # per layer: neuron cache capacity (window)
    pinned_rows: list  # per layer: hot rows pinned in the cache (window)
    stage_bytes: int  # bytes of each of the two staging buffers (0: nothing streams whole)
    prefill_block: int  # tokens per prefill block (1 when the prefill tile does not fit)
    window: int
    io_threads: int = DEPTH  # the flash reader's threads (counted in the plan)
    ffn_chunk_rows: int = 0  # naive: FFN rows per chunk buffer (0: whole FFN in the staging)
    parts: list = field(default_factory=list)

    @property
    def total(self):
        return sum(p.nbytes for p in self.parts)

    @property
    def read_per_token(self):
        return sum(p.read_per_token for p in self.parts)

    def table(self):
        """The plan as a text table (edgellm plan)."""
        lines = [f"{'part':34} {'DRAM':>11}  {'':9} {'read/token':>11}  note"]
        for p in self.parts:
            r = human(p.read_per_token) if p.read_per_token else "-"
            lines.append(f"{p.name:34} {human(p.nbytes):>11}  {p.where:9} {r:>11}  {p.note}")
        lines.append(f"{'total':34} {human(self.total):>11}  {'':9} "
                     f"{human(self.read_per_token):>11}  budget {human(self.budget)}, "
                     f"mode {self.mode}")
        return "\n".join(lines)

    def to_dict(self):
        return {"mode": self.mode, "budget_bytes": self.budget, "total_bytes": self.total,
                "read_per_token_bytes": self.read_per_token, "window": self.window,
                "prefill_block": self.prefill_block, "stage_bytes": self.stage_bytes,
                "ffn_chunk_rows": self.ffn_chunk_rows, "io_threads": self.io_threads,
                "parts": [p.__dict__ for p in self.parts]}


# ---------------------------------------------------------------------------------------------


def tensor_bytes(chunk, name):
    e = chunk["tensors"].get(name)
    if e is None:
        return 0
    return sum(math.prod(shape) * dt.itemsize
               for dt, shape in format.stored_tensors(name, e).values())


ATTN = ("attn_q", "attn_k", "attn_v", "attn_o")
FFN = ("ffn_bundles", "ffn_down")  # ffn_down: a matrix apart (GGUF kept, --ffn-down matrix)
SMALL = ("attn_norm.weight", "attn_norm.bias", "ffn_norm.weight", "ffn_norm.bias",
         "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_o.bias", "ffn_up.bias",
         "ffn_down.bias")


# per-layer predictor tensors window mode keeps resident (runtime/predictor.py; a threshold
# predictor's gate rows when stored apart): relu-large's low-rank ones are 2.02 MB, which plans
# did not count (its window runs filled their cgroups while the plan said 26.75 of 26.76 MB)
LAYER_PREDICTOR = ("ffn_pred.a", "ffn_pred.b", "ffn_pred.bias", "ffn_pred.threshold",
                   "ffn_pred.top_k", "ffn_act_threshold", "ffn_gate")


@dataclass
class Sizes:
    """What the planner needs to know about a model, in bytes."""

    small: int  # norms and biases of all layers
    attn: list  # per layer
    ffn: list  # per layer (bundles, and the down matrix when stored apart)
    stride: int
    d_ff: int
    head: int  # head (tied: the embedding matrix)
    embed_row: int  # untied: one embedding row (read per token); 0 when tied
    embed_other: int  # final norm, positional embeddings
    predictors: int
    layer_predictors: int = 0  # predictors stored in the layer chunks (window mode loads them)
    down_apart: bool = False  # the down projection is a matrix, not a part of the bundles

    @classmethod
    def of(cls, manifest, cfg):
        chunks = {c["file"]: c for c in manifest["chunks"]}
        e = chunks[format.EMBED_CHUNK]
        layers = [chunks[format.layer_chunk(i)] for i in range(cfg.n_layers)]
        emb = tensor_bytes(e, "tok_embeddings")
        head = emb if cfg.tied_embeddings else tensor_bytes(e, "output")
        stride = layers[0]["tensors"]["ffn_bundles"]["shape"][1]
        pred = chunks.get("predictors.safetensors", {}).get("size", 0)
        return cls(
            small=sum(tensor_bytes(c, n) for c in layers for n in SMALL),
            attn=[sum(tensor_bytes(c, n) for n in ATTN) for c in layers],
            ffn=[sum(tensor_bytes(c, n) for n in FFN) for c in layers],
            stride=stride, d_ff=cfg.d_ff, head=head,
            embed_row=0 if cfg.tied_embeddings else emb // cfg.vocab_size,
            embed_other=tensor_bytes(e, "norm.weight") + tensor_bytes(e, "norm.bias")
            + tensor_bytes(e, "pos_embeddings"),
            predictors=pred,
            layer_predictors=sum(tensor_bytes(c, n) for c in layers for n in LAYER_PREDICTOR),
            down_apart=any("ffn_down" in c["tensors"] for c in layers))


def scratch_bytes(cfg, n_ctx, T):
    """Working memory of a forward pass over T tokens (activations, scores, logits, FFN partial
    sums; T > 1 adds the prefill tile). An estimate with headroom, not a ledger."""
    d, f = cfg.d_model, cfg.d_ff
    per_token = 4 * (12 * d + 3 * cfg.q_dim + 4 * cfg.kv_dim + 2 * f)
    attn = 4 * 2 * cfg.n_heads * n_ctx * min(T, 16)
    out = T * per_token + attn + 2 * 4 * cfg.vocab_size + 8 * 4 * d + (64 << 10)
    if T > 1:
        out += PREFILL_TILE
    return out


def kv_bytes(cfg, n_ctx, kv=None):
    from .kvcache import DEFAULT, KVCache

    return KVCache(cfg, n_ctx, kv or DEFAULT).nbytes()  # zero pages: nothing is touched here


# memory a loaded tokenizer holds per byte of its file (after memory.trim): SmolLM2's 1.6 MB
# tokenizer.json (Hugging Face tokenizers, 49k-token BPE) 8.1x; a 32k sentencepiece model 1.8x
TOKENIZER_FACTOR = {"hf": 10, "sentencepiece": 2}


def tokenizer_bytes(model_dir, manifest):
    """Estimated memory of the model's loaded tokenizer (0 when its file cannot be stat'ed)."""
    import os

    spec = manifest.get("tokenizer") or {}
    try:
        size = os.path.getsize(format.safe_path(model_dir, spec["file"]))
    except (OSError, KeyError, TypeError, EdgeLLMError):
        return 0
    return size * TOKENIZER_FACTOR.get(spec.get("kind"), 10)


def cache_row_overhead(stride):
    return stride + 4 + 8  # buffer row, ids, last_used


def make_plan(manifest, cfg, budget, mode="dense", n_ctx=None, kv=None, window=None,
              active_fraction=None, hot_rows=None, io_threads=None):
    """The plan for `budget` bytes. active_fraction: share of FFN neurons a token needs (from
    calibration; window mode's minimum cache and read estimate). hot_rows: per layer, neurons
    calibration marks hot (pinned first, up to half a layer's cache)."""
    if mode not in MODES:
        raise EdgeLLMError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    n_ctx = n_ctx or cfg.max_context
    window = window or DEFAULT_WINDOW
    if io_threads is None:  # as many reads in flight as a small share of the budget allows
        auto = min(DEPTH, max(MIN_IO_THREADS, budget // IO_THREAD_SHARE // IO_THREAD_BYTES))
        kw = dict(n_ctx=n_ctx, kv=kv, window=window, active_fraction=active_fraction,
                  hot_rows=hot_rows)
        try:
            return make_plan(manifest, cfg, budget, mode, io_threads=auto, **kw)
        except EdgeLLMError:
            if auto == MIN_IO_THREADS:
                raise
            return make_plan(manifest, cfg, budget, mode, io_threads=MIN_IO_THREADS, **kw)
    s = Sizes.of(manifest, cfg)
    if s.down_apart and mode != "dense":
        # window and naive read neurons (rows of the bundles); a down matrix holds a neuron as a
        # column spread over every row (quantized along d_ff), which no row read can fetch
        raise EdgeLLMError(
            f"{mode} mode reads FFN neurons as rows of the bundles, but this model stores the "
            "FFN down projection as a matrix apart (GGUF weights kept, or --ffn-down matrix): "
            "use --mode dense, or reconvert with --ffn-down bundle (and --quant) to stream "
            "neurons")
    L = cfg.n_layers
    a_frac = active_fraction if active_fraction is not None else DEFAULT_ACTIVE_FRACTION
    fracs = list(a_frac) if isinstance(a_frac, (list, tuple)) else [a_frac] * L
    # one token's worth of rows per layer is what reuse needs; less still runs (batches)
    want_rows = [max(1, math.ceil(fr * s.d_ff)) for fr in fracs]
    min_rows = [min(s.d_ff, MIN_CACHE_ROWS, w) for w in want_rows]
    row_cost = cache_row_overhead(s.stride)
    slot_bytes = 4 * s.d_ff  # NeuronCache.slot

    fixed = [
        Part("norms and biases", s.small + s.embed_other, "resident"),
        Part("head" + (" (tied embeddings)" if cfg.tied_embeddings else ""), s.head, "resident"),
        Part("KV cache", kv_bytes(cfg, n_ctx, kv), "buffer", note=f"{n_ctx} positions"),
        Part(f"I/O threads ({io_threads})", io_threads * IO_THREAD_BYTES,
             "buffer", note="stacks and allocator arenas of the flash reader's threads"),
    ]
    if s.embed_row:
        fixed.append(Part("token embedding rows", s.embed_row, "streamed", s.embed_row,
                          "one row per token"))
    if s.predictors:
        fixed.append(Part("predictors", s.predictors, "resident"))
    if s.layer_predictors and mode == "window":
        fixed.append(Part("predictors (in the layer chunks)", s.layer_predictors, "resident"))
    fixed_total = sum(p.nbytes for p in fixed)
    scratch1 = scratch_bytes(cfg, n_ctx, 1)
    scratches = [(scratch_bytes(cfg, n_ctx, b), b) for b in PREFILL_BLOCKS] + [(scratch1, 1)]

    def stage(n_attn_res, n_ffn_res, chunked=False):
        """Bytes of one staging buffer: the largest streamed (attention + whole FFN) of a layer."""
        out = 0
        for i in range(L):
            b = (0 if i < n_attn_res else s.attn[i] + 8 * 64)  # + alignment of 8 tensors
            if mode != "window" and not chunked and (mode == "naive" or i >= n_ffn_res):
                b += s.ffn[i] + 3 * 64  # + alignment of the bundles, down and its scales
            out = max(out, b)
        return out

    def cost(a, f, rows, chunk=0):
        res = sum(s.attn[:a])
        if mode == "dense":
            res += sum(s.ffn[:f])
        if mode == "window":
            res += sum(rows) * row_cost + L * slot_bytes
        return fixed_total + res + 2 * stage(a, f, chunk > 0) + 2 * chunk * s.stride

    def share(extra):
        """Cache rows per layer: the minimum plus `extra` rows shared in proportion to each
        layer's active fraction (layers that need more neurons per token get more cache)."""
        rows = list(min_rows)
        for _ in range(3):  # what a full layer cannot take goes to the others
            open_ = [i for i in range(L) if rows[i] < s.d_ff]
            if extra <= 0 or not open_:
                break
            w = sum(fracs[i] for i in open_) or 1.0
            given = 0
            for i in open_:
                add = min(s.d_ff - rows[i], int(extra * fracs[i] / w))
                rows[i] += add
                given += add
            extra -= given
            if given == 0:
                break
        return rows

    def search(chunked):
        best = None
        for a in range(L, -1, -1):
            for f in ((range(L, -1, -1)) if mode == "dense" else (0,)):
                base = cost(a, f, min_rows if mode == "window" else [0] * L,
                            MIN_CHUNK_ROWS if chunked else 0)
                for sc, block in scratches:
                    if base + sc > budget:
                        continue
                    rows, chunk = [0] * L, 0
                    if mode == "window":
                        rows = share((budget - base - sc) // row_cost)
                    if chunked:  # the chunk buffers take what is left, up to a limit
                        chunk = min(s.d_ff, max(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // s.stride),
                                    MIN_CHUNK_ROWS + (budget - base - sc) // (2 * s.stride))
                    key = (sum(s.attn[:a]) + (sum(s.ffn[:f]) if mode == "dense" else 0)
                           + sum(rows) * s.stride, block, chunk)
                    if best is None or key > best[0]:
                        best = (key, a, f, rows, block, sc, chunk)
                    if mode != "window":
                        break  # the prefill tile when it fits; window: the prefill scratch
                        # (~17 MB for relu-large) only when it leaves as many cache rows
                        # (else at 75% of relu-large the caches were smaller than at 50%)
        return best

    best = search(False)
    if mode == "naive":  # the paper's baseline reads a token's FFN rows and nothing else: read
        # them in chunks when a whole layer does not fit, or when two chunk buffers instead of
        # two whole-layer staging buffers leave room for more resident attention
        chunked = search(True)
        if best is None or (chunked is not None and chunked[0][0] > best[0][0]):
            best = chunked
    minimum = min(cost(a, f, min_rows if mode == "window" else [0] * L,
                       MIN_CHUNK_ROWS if mode == "naive" else 0)
                  for a in range(L + 1) for f in range(L + 1)) + scratch1
    if best is None:
        raise EdgeLLMError(
            f"a DRAM budget of {human(budget)} cannot run this model in {mode} mode: the "
            f"minimum is {human(minimum)} ({minimum} bytes: norms, head, KV cache for {n_ctx} "
            f"positions, I/O threads, scratch and two staging buffers"
            + (f", and {sum(min_rows)} cached neurons" if mode == "window" else "")
            + (f", and two chunks of {MIN_CHUNK_ROWS} FFN rows" if mode == "naive" else "")
            + "); a shorter context (--ctx) lowers it")
    _, a, f, rows, block, sc, chunk = best

    attn_res = [i < a for i in range(L)]
    ffn_res = [mode == "dense" and i < f for i in range(L)]
    pinned = [0] * L
    if mode == "window" and hot_rows is not None:
        pinned = [min(int(h), r // 2) for h, r in zip(hot_rows, rows)]
    st = stage(a, f, chunk > 0)
    plan = Plan(mode, budget, L, attn_res, ffn_res, rows,
                pinned, st, block, window, io_threads, chunk)
    plan.parts = list(fixed)
    n_sa = L - a
    if a:
        plan.parts.append(Part(f"attention, {a} layers", sum(s.attn[:a]), "resident"))
    if n_sa:
        plan.parts.append(Part(f"attention, {n_sa} layers", 0, "streamed", sum(s.attn[a:]),
                               "whole layer, read ahead"))
    if mode == "dense":
        if f:
            plan.parts.append(Part(f"FFN, {f} layers", sum(s.ffn[:f]), "resident"))
        if L - f:
            plan.parts.append(Part(f"FFN, {L - f} layers", 0, "streamed", sum(s.ffn[f:]),
                                   "all neurons every token"))
    elif mode == "naive":
        plan.parts.append(Part(f"FFN, {L} layers", 0, "streamed", sum(s.ffn),
                               "all neurons every token (naive)"
                               + (f", in chunks of {chunk} rows" if chunk else "")))
        if chunk:
            plan.parts.append(Part("FFN chunk buffers (2)", 2 * chunk * s.stride, "buffer"))
    else:
        est = sum(fracs) * s.d_ff * s.stride
        short = sum(r < w for r, w in zip(rows, want_rows))
        plan.parts.append(Part(f"neuron caches, {min(rows)}..{max(rows)} rows per layer",
                               sum(rows) * row_cost + L * slot_bytes,
                               "buffer", est,
                               f"window k={window}; read/token at most {sum(fracs) / L:.0%} of rows"
                               + (" (assumed)" if active_fraction is None else "")
                               + (f"; {short} layers cache less than a token's active set"
                                  if short else "")
                               + (f", {sum(pinned)} pinned" if sum(pinned) else "")))
    if st:
        plan.parts.append(Part("staging buffers (2)", 2 * st, "buffer"))
    plan.parts.append(Part("scratch" + (f" (prefill in blocks of {block})" if block > 1
                                        else " (token by token)"), sc, "buffer"))
    return plan


def minimum_budget(manifest, cfg, mode="dense", n_ctx=None, **kw):
    """The smallest budget make_plan accepts (found from its refusal message's figure)."""
    try:
        make_plan(manifest, cfg, 1, mode, n_ctx, **kw)
    except EdgeLLMError as e:
        m = re.search(r"\((\d+) bytes", str(e))
        if m is None:  # refused whatever the budget (a mode the model cannot run in)
            raise
        return int(m.group(1))
    return 1
