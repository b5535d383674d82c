"""`edgellm eval`: perplexity of a model over a text, in fixed sliding windows, and its speed.

The text is tokenized once (without BOS) into t_0 .. t_{N-1}. Window w runs the model on
prefix + t[b_w : e_w], where prefix is [BOS] when the model's tokenizer adds one (so every window
starts as the model was trained to start) and e_w = min(b_w + ctx - len(prefix), N); windows begin
every `stride` text tokens (b_w = w * stride) until one reaches the end. A window scores only the
tokens the previous window did not (t_i for e_{w-1} <= i < e_w), each predicted from all of its
left context inside the window, so each token is scored once, with at least
ctx - len(prefix) - stride tokens of context once the first window is past. Token t_0 is scored only
after a BOS. Perplexity = exp(mean negative log-likelihood of the scored tokens).

This is the usual strided evaluation (as in Hugging Face's perplexity guide); with stride equal to
ctx it becomes disjoint chunks, with a small stride it approaches full-context scoring.

    >>> r = perplexity(edgellm.load("model"), open("text.txt").read())   # doctest: +SKIP
    >>> r["perplexity"], r["tokens"], r["tokens_per_s"]                  # doctest: +SKIP
"""

import json
import math
import os
import sys
import time

import numpy as np

from .runtime.errors import EdgeLLMError

DEFAULT_CTX = 512
DEFAULT_STRIDE = 256  # half the window: each scored token sees at least 256 tokens of context


def heldout_text_path():
    """The evaluation text shipped with edgellm (see edgellm/data/eval/README.md)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "eval",
                        "devils-dictionary-a-d.txt")


def windows(n_tokens, ctx, stride, prefix=0):
    """The windows over n_tokens text tokens: a list of (begin, end, first_scored) text-token
    indices; the window runs prefix + t[begin:end] and scores t[first_scored:end]."""
    if ctx - prefix < 1:
        raise EdgeLLMError(f"--ctx {ctx} leaves no room for text")
    if not 1 <= stride <= ctx - prefix:
        raise EdgeLLMError(f"--stride must be between 1 and the window's text length "
                           f"{ctx - prefix}, got {stride}")
    out, prev_end, b = [], 0 if prefix else 1, 0
    while True:
        e = min(b + ctx - prefix, n_tokens)
        if e > prev_end:
            out.append((b, e, prev_end))
            prev_end = e
        if e >= n_tokens:
            return out
        b += stride


def score(logits, ids, first, prefix=0):
    """Negative log-likelihoods (float64) of the scored tokens of one window and the model's
    top-1 predictions for them.

    logits: f32[len(window input), V] for the window input prefix + t[b:e] (ids = t[b:e]);
    first: index in ids of the first scored token (first_scored - b)."""
    ids = np.asarray(ids)
    pos = np.arange(first, len(ids)) + prefix - 1  # logits row that predicts ids[i]
    rows = np.asarray(logits[pos], dtype=np.float64)
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
    target = ids[first:]
    nll = lse - rows[np.arange(len(target)), target]
    return nll, rows.argmax(axis=1)


def perplexity(model, text, ctx=None, stride=None, max_tokens=None, progress=False):
    """Perplexity of model over text. Returns a dict: perplexity, nll (mean, nats), tokens (scored),
    windows, ctx, stride, forward_tokens (tokens run through the model), seconds, tokens_per_s
    (forward_tokens / seconds)."""
    ctx = ctx or min(DEFAULT_CTX, model.n_ctx)
    if ctx > model.n_ctx:
        raise EdgeLLMError(f"--ctx {ctx} is larger than the model's context ({model.n_ctx})")
    stride = stride or min(DEFAULT_STRIDE, max(1, ctx // 2))
    tok = model.tokenizer
    prefix = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    ids = tok.encode(text, add_bos=False)
    if max_tokens is not None:
        if max_tokens < 2:
            raise EdgeLLMError(f"--max-tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) + len(prefix) < 2:
        raise EdgeLLMError("the text is too short to score (it needs at least 2 tokens)")
    plan = windows(len(ids), ctx, stride, len(prefix))
    model.warmup()  # kernel compilation is not evaluation time

    from tqdm.auto import tqdm

    nll_sum, n, forwarded = 0.0, 0, 0
    t0 = time.perf_counter()
    for b, e, first in tqdm(plan, desc="eval", unit="window", disable=not progress):
        window = ids[b:e]
        logits = model.logits(prefix + window)
        forwarded += len(prefix) + len(window)
        nll, _ = score(logits, window, first - b, len(prefix))
        nll_sum += float(nll.sum())
        n += len(nll)
    seconds = time.perf_counter() - t0
    mean = nll_sum / n
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": n, "windows": len(plan),
            "ctx": ctx, "stride": stride, "bos": bool(prefix), "forward_tokens": forwarded,
            "seconds": seconds, "tokens_per_s": forwarded / seconds if seconds > 0 else 0.0}


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise EdgeLLMError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path}: cannot read as UTF-8 text ({e})") from None
    if not text.strip():
        raise EdgeLLMError(f"{path}: the text is empty")
    return text


def main(a):
    """The `edgellm eval` command (arguments parsed by edgellm.cli)."""
    from . import load
    from .cli import load_from_args

    path = a.ppl or heldout_text_path()
    text = read_text(path)
    if a.ctx is not None and a.ctx < 2:
        raise EdgeLLMError(f"--ctx must be at least 2, got {a.ctx}")
    model = load(a.model, n_ctx=a.ctx or DEFAULT_CTX, threads=a.threads, **load_from_args(a))
    r = perplexity(model, text, ctx=a.ctx, stride=a.stride, max_tokens=a.max_tokens,
                   progress=not a.json)
    r = {"model": os.path.abspath(a.model), "text": os.path.abspath(path), **r}
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"perplexity {r['perplexity']:.4f}  ({r['tokens']} tokens scored in {r['windows']} "
          f"windows of {r['ctx']} tokens, stride {r['stride']})")
    print(f"speed      {r['tokens_per_s']:.1f} tokens/s ({r['forward_tokens']} tokens run in "
          f"{r['seconds']:.1f} s)", file=sys.stderr)
