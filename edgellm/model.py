"""The public Model: load a converted directory, get logits, generate text.

    >>> model = edgellm.load("path/to/model")                      # doctest: +SKIP
    >>> for piece in model.generate("Once upon a time", max_tokens=20):
    ...     print(piece, end="", flush=True)
"""

import os
import threading
import time
import warnings

from .runtime import format, kvcache
from .runtime.errors import ContextLengthError, EdgeLLMError
from .runtime.model import Transformer
from .runtime.reader import Reader, choose_mapped, weight_bytes
from .runtime.threads import set_threads
from .runtime.tokenizer import Tokenizer
from .sampling import Sampler, SamplingParams

DEFAULT_CONTEXT = 4096  # KV cache is allocated up front: cap it unless asked for more
NOTICE_AFTER = 2.0  # seconds of warmup() before its notice: compiling, not a warm cache
SINKS = 4  # first tokens the sliding window always keeps (StreamingLLM: 4 sinks suffice)


class Model:
    def __init__(self, path, manifest, config, reader, tokenizer, n_ctx, kv=kvcache.DEFAULT,
                 stream=None, why=""):
        """Use Model.load. why: why the weights are read or mapped (reader.choose_mapped)."""
        self.path = path
        self.manifest = manifest
        self.config = config
        self.reader = reader
        self.tokenizer = tokenizer
        self.chat_template = manifest.get("chat_template")  # Jinja source or None
        self.runtime = Transformer(reader, config, n_ctx=n_ctx, kv=kv, stream=stream)
        self.stream = stream  # runtime.streaming.Stream under a DRAM budget, else None
        self.plan = stream.plan if stream is not None else None
        self.default_cache = self.runtime.cache
        self.last_stats = None
        # how the weights are held: {"load": "read" | "mapped" | "streamed", "bytes", "why"}
        self.weights = {"load": "streamed" if stream is not None else
                        "mapped" if reader.mapped else "read",
                        "bytes": weight_bytes(manifest), "why": why}

    @classmethod
    def load(cls, path, verify=False, n_ctx=None, threads=None, kv=kvcache.DEFAULT,
             dram_budget=None, mode=None, window=None, io_threads=None, cold=False,
             oracle=False, mmap="auto"):
        """Open a model directory. verify=True reads every chunk and checks its sha256.
        n_ctx: context length (default: the model's, capped at 4096). threads: kernel and BLAS
        threads (default: one per core). kv: KV cache encoding, "f16" (default), "f32" or
        "int8" (docs/INTERNALS.md, "KV cache": memory and measured error of each).
        dram_budget: bytes or a size such as "800MB": weights stream from flash to stay within
        it (runtime/plan.py); mode: "window" (default when the model has predictors), "dense"
        or "naive"; window: tokens a neuron stays cached; io_threads: parallel reads (default
        up to 32, their memory at most 1/8 of the budget); cold: drop read pages from the page
        cache; oracle: window mode with the true active set of a ReLU model (measurements only;
        docs/INTERNALS.md, "Streaming"). mmap: "auto" (default) reads the chunks into memory
        when the weights take at most half the available memory and maps them otherwise
        (runtime/reader.py, choose_mapped); True maps, False reads. Read: a private copy, faster
        decode (huge pages), and no file change on disk can reach it; mapped: processes share
        the page cache, and a file truncated by another process kills this one with SIGBUS.
        Under a DRAM budget the stream decides (resident parts are read, the rest streamed).
        self.weights says which was chosen and why."""
        path = os.fspath(path)
        set_threads(threads)
        manifest, config = format.read_manifest(path)
        nbytes = weight_bytes(manifest)
        if dram_budget is not None or mode is not None:  # the budget decides, not the rule
            mapped = True if mmap == "auto" else choose_mapped(mmap, nbytes)[0]
            why = "streamed under a DRAM budget"
        else:
            mapped, why = choose_mapped(mmap, nbytes)
        reader = Reader(path, manifest, mapped=mapped)
        if verify:
            reader.verify()
        tokenizer = Tokenizer.load(path, manifest)
        if n_ctx is not None and n_ctx <= 0:
            raise EdgeLLMError(f"n_ctx must be positive, got {n_ctx}")
        kvcache.check_encoding(kv)
        if n_ctx is not None and n_ctx > config.max_context:
            warnings.warn(f"n_ctx {n_ctx} is above {path}'s trained context of "
                          f"{config.max_context} tokens: using {config.max_context}")
        n_ctx = n_ctx or min(config.max_context, DEFAULT_CONTEXT)
        stream = None
        if dram_budget is not None or mode is not None:
            from .runtime import teal
            from .runtime.streaming import open_stream

            teal.refuse_streaming(manifest)

            stream = open_stream(reader, config, dram_budget, mode, n_ctx=n_ctx, kv=kv,
                                 window=window, io_threads=io_threads, cold=cold, oracle=oracle)
        return cls(path, manifest, config, reader, tokenizer, n_ctx, kv, stream, why)

    @property
    def n_ctx(self):
        return self.runtime.n_ctx

    def template(self):
        """The model's ChatTemplate (its own Jinja template, or the plain fallback)."""
        from .template import ChatTemplate

        tok = self.tokenizer
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos_ids = self.config.eos_token_ids or sorted(tok.eos_ids)  # the model's own first
        eos = tok.decode([eos_ids[0]]) if eos_ids else ""
        return ChatTemplate(self.chat_template, bos_token=bos, eos_token=eos)

    def new_cache(self):
        """A KV cache for one more conversation (pass it to generate(cache=...)). Each holds
        n_ctx positions of keys and values for every layer (cache.nbytes())."""
        return self.runtime.new_cache()

    def warmup(self, notice=None):
        """Run the prefill and decode paths once, so that kernel compilation (first run after
        install: Numba compiles and caches them, a minute or two) and page faults do not count
        in timings. notice: called once, from another thread, if this is still running after
        NOTICE_AFTER seconds (to tell a waiting user why). Returns the seconds it took."""
        timer = threading.Timer(NOTICE_AFTER, notice) if notice is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            return self._warmup()
        finally:
            if timer is not None:
                timer.cancel()

    def _warmup(self):
        t = time.perf_counter()
        self.runtime.cache = self.default_cache
        self.runtime.reset()
        self.runtime.forward([0, 0])
        self.runtime.forward([0])
        self.runtime.reset()
        self.runtime.timer.parts.clear()
        if self.stream is not None:
            self.stream.reset_caches()
        return time.perf_counter() - t

    def check_files(self):
        """A FormatError when a chunk file the runtime may read again changed on disk since the
        model was loaded: mapped chunks (their pages may be read again), streamed layers, and
        chunks not read yet. Chunks read into memory cannot change under the model (skipped)."""
        self.reader.check_unchanged()

    def logits(self, ids):
        """float32 logits [len(ids), vocab] for a token sequence, from an empty context."""
        self.check_files()
        self.runtime.cache = self.default_cache
        self.runtime.reset()
        out = self.runtime.forward(ids, all_logits=True)
        self.runtime.reset()
        return out

    def generate(self, prompt, max_tokens=128, stop=(), params=None, cache=None,
                 context_shift=None, sinks=SINKS, shift_size=None, **sampling):
        """Yield text pieces as they are produced.

        prompt: a string or a list of token ids. stop: strings that end generation (not
        included in the output). Sampling options: see SamplingParams (temperature=0 is greedy).
        After the generator ends, self.last_stats holds token counts, timings, finish_reason,
        token_ids (the generated ids), shifts (context shifts done) and context_full (True when
        generation ended because the context was full).
        cache: the KV cache of this conversation (new_cache()); default: the model's own. Its
        keys and values are reused for the prompt's prefix that matches its conversation.
        context_shift: when the context is full, drop shift_size tokens (default a quarter of
        the context) after the first `sinks` and go on (StreamingLLM sliding window); False:
        stop with finish_reason "length". None (default): on for rotary-position models, off
        for learned positions (OPT), which cannot shift (True there is an error).
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise EdgeLLMError("the prompt is empty")
        if max_tokens < 0:
            raise EdgeLLMError(f"max_tokens must be >= 0, got {max_tokens}")
        shift = self._window(context_shift, sinks, shift_size)
        self.check_files()  # a chunk changed on disk: an error, not wrong weights
        stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        sampler = Sampler(params or SamplingParams(**sampling))
        rt = self.runtime
        rt.cache = cache if cache is not None else self.default_cache
        # reuse the cached keys/values of the longest common prefix with the previous call (a
        # chat turn only processes its new tokens); at least one token is run to get logits
        reuse = rt.cache.match(ids[:-1])
        new = len(ids) - reuse
        keep = rt.cache.sinks if rt.cache.n_dropped else sinks  # a shifted cache keeps its own
        if rt.pos + new >= self.n_ctx:  # the prompt must leave room for one generated token
            if not shift or keep + new >= self.n_ctx:
                raise ContextLengthError(
                    f"the prompt has {len(ids)} tokens ({new} not cached); the context holds "
                    f"{self.n_ctx} (use a shorter prompt or a larger n_ctx)")
        rt.timer.parts.clear()
        if self.stream is not None:
            self.stream.reset_stats()
        generated = []
        stats = {"prompt_tokens": len(ids), "cached_tokens": reuse, "generated_tokens": 0,
                 "token_ids": generated, "finish_reason": "length", "shifts": 0,
                 "context_full": False}
        self.last_stats = stats
        if shift:
            while rt.pos + new >= self.n_ctx:
                rt.shift(min(shift, rt.pos - keep), keep)
                stats["shifts"] += 1

        t0 = time.perf_counter()
        logits = rt.forward(ids[reuse:])[-1]
        stats["prefill_s"] = time.perf_counter() - t0
        if self.stream is not None:
            self.stream.mark_decode()
        history = list(ids)
        stream = self.tokenizer.streamer(ids)
        held, hit, forwards = "", False, 0  # held: text that could be the start of a stop string
        t1 = time.perf_counter()
        for n in range(max_tokens):
            tok = sampler(logits, history)
            if tok in self.tokenizer.eos_ids:
                stats["finish_reason"] = "stop"
                break
            history.append(tok)
            generated.append(tok)
            stats["generated_tokens"] = n + 1
            emit, held, hit = _split_stop(held + stream.push(tok), stop)
            if emit:
                yield emit
            if hit:
                stats["finish_reason"] = "stop"
                break
            if n + 1 == max_tokens:
                break
            if rt.pos >= self.n_ctx:
                if not shift:
                    stats["context_full"] = True
                    break
                rt.shift(min(shift, rt.pos - keep), keep)
                stats["shifts"] += 1
            logits = rt.forward([tok])[-1]
            forwards += 1
        if not hit:
            emit, _, _ = _split_stop(held + stream.flush(), stop, final=True)
            if emit:
                yield emit
        stats["decode_s"] = time.perf_counter() - t1
        stats["decode_tokens"] = forwards
        stats["parts_s"] = dict(rt.timer.parts)
        if self.stream is not None:
            stats["flash"] = self.stream.summary()

    def _window(self, context_shift, sinks, shift_size):
        """Tokens dropped per shift when the context may slide, else None."""
        rope = self.config.positions == "rope"
        if context_shift is None:
            context_shift = rope
        if not context_shift:
            return None
        if not rope:
            raise EdgeLLMError(
                f"context shift needs rotary position embeddings; this model uses "
                f"{self.config.positions} absolute positions ({self.config.arch}), which cannot "
                f"be moved: turn it off (context_shift=False, --no-context-shift)")
        size = shift_size if shift_size is not None else self.n_ctx // 4
        if sinks < 0 or size < 1 or sinks + size >= self.n_ctx:
            raise EdgeLLMError(f"sliding window: need sinks >= 0 and shift_size >= 1 with "
                               f"sinks + shift_size < n_ctx ({self.n_ctx}); got sinks={sinks}, "
                               f"shift_size={size}")
        return size

    def complete(self, prompt, **kwargs):
        """Non-streaming generate: the whole generated text."""
        return "".join(self.generate(prompt, **kwargs))


def _split_stop(text, stop, final=False):
    """Split text into (safe to emit, held back, stop found).

    Text up to a stop string is emitted and generation ends; otherwise, the tail that could be the
    beginning of a stop string is held back (unless final).
    """
    if not stop:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    if final:
        return text, "", False
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


def stats_summary(stats):
    """Tokens/s for prefill and decode from Model.last_stats."""
    n = stats["prompt_tokens"] - stats.get("cached_tokens", 0)  # tokens the prefill ran
    prefill = n / stats["prefill_s"] if stats.get("prefill_s") else 0.0
    n = stats.get("decode_tokens", 0)  # forward passes after the prefill
    decode = n / stats["decode_s"] if stats.get("decode_s") and n else 0.0
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}

