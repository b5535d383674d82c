"""The public Model: load a converted directory, get logits, generate text.

    >>> model = edgellm.load("path/to/model")                      # doctest: +SKIP
    >>> for piece in model.generate("Once upon a time", max_tokens=20):
    ...     print(piece, end="", flush=True)
"""

import os
import time

from .runtime import format
from .runtime.errors import ContextLengthError, EdgeLLMError
from .runtime.model import Transformer
from .runtime.reader import Reader
from .runtime.threads import set_threads
from .runtime.tokenizer import Tokenizer
from .sampling import Sampler, SamplingParams

DEFAULT_CONTEXT = 4096  # KV cache is allocated up front: cap it unless asked for more


class Model:
    def __init__(self, path, manifest, config, reader, tokenizer, n_ctx):
        self.path = path
        self.manifest = manifest
        self.config = config
        self.reader = reader
        self.tokenizer = tokenizer
        self.chat_template = manifest.get("chat_template")  # Jinja source or None
        self.runtime = Transformer(reader, config, n_ctx=n_ctx)
        self.default_cache = self.runtime.cache
        self.last_stats = None

    @classmethod
    def load(cls, path, verify=False, n_ctx=None, threads=None):
        """Open a model directory. verify=True reads every chunk and checks its sha256.
        n_ctx: context length (default: the model's, capped at 4096). threads: kernel and BLAS
        threads (default: one per core)."""
        path = os.fspath(path)
        set_threads(threads)
        manifest, config = format.read_manifest(path)
        reader = Reader(path, manifest)
        if verify:
            reader.verify()
        tokenizer = Tokenizer.load(path, manifest)
        if n_ctx is not None and n_ctx <= 0:
            raise EdgeLLMError(f"n_ctx must be positive, got {n_ctx}")
        return cls(path, manifest, config, reader, tokenizer,
                   n_ctx or min(config.max_context, DEFAULT_CONTEXT))

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

    def warmup(self):
        """Run the prefill and decode paths once, so that kernel compilation (first run after
        install: Numba compiles and caches them) and page faults do not count in timings."""
        t = time.perf_counter()
        self.runtime.cache = self.default_cache
        self.runtime.reset()
        self.runtime.forward([0, 0])
        self.runtime.forward([0])
        self.runtime.reset()
        self.runtime.timer.parts.clear()
        return time.perf_counter() - t

    def logits(self, ids):
        """float32 logits [len(ids), vocab] for a token sequence, from an empty context."""
        self.runtime.cache = self.default_cache
        self.runtime.reset()
        out = self.runtime.forward(ids, all_logits=True)
        self.runtime.reset()
        return out

    def generate(self, prompt, max_tokens=128, stop=(), params=None, cache=None, **sampling):
        """Yield text pieces as they are produced.

        prompt: a string or a list of token ids. stop: strings that end generation (not
        included in the output). Sampling options: see SamplingParams (temperature=0 is greedy).
        After the generator ends, self.last_stats holds token counts, timings, finish_reason and
        token_ids (the generated ids).
        cache: the KV cache of this conversation (new_cache()); default: the model's own. Its
        keys and values are reused for the prompt's prefix that matches its tokens.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise EdgeLLMError("the prompt is empty")
        if max_tokens < 0:
            raise EdgeLLMError(f"max_tokens must be >= 0, got {max_tokens}")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context holds "
                                     f"{self.n_ctx} (use a shorter prompt or a larger n_ctx)")
        stop = [stop] if isinstance(stop, str) else [s for s in stop if s]
        sampler = Sampler(params or SamplingParams(**sampling))
        rt = self.runtime
        rt.cache = cache if cache is not None else self.default_cache
        # reuse the cached keys/values of the longest common prefix with the previous call (a
        # chat turn only processes its new tokens); at least one token is run to get logits
        reuse = _common_prefix(rt.tokens, ids[:-1])
        rt.rewind(reuse)
        rt.timer.parts.clear()
        generated = []
        stats = {"prompt_tokens": len(ids), "cached_tokens": reuse, "generated_tokens": 0,
                 "token_ids": generated, "finish_reason": "length"}
        self.last_stats = stats

        t0 = time.perf_counter()
        logits = rt.forward(ids[reuse:])[-1]
        stats["prefill_s"] = time.perf_counter() - t0
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
            if n + 1 == max_tokens or rt.pos >= self.n_ctx:
                break
            logits = rt.forward([tok])[-1]
            forwards += 1
        if not hit:
            emit, _, _ = _split_stop(held + stream.flush(), stop, final=True)
            if emit:
                yield emit
        stats["decode_s"] = time.perf_counter() - t1
        stats["decode_tokens"] = forwards
        stats["parts_s"] = dict(rt.timer.parts)

    def complete(self, prompt, **kwargs):
        """Non-streaming generate: the whole generated text."""
        return "".join(self.generate(prompt, **kwargs))


def _common_prefix(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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

