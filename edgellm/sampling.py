"""The one sampler: logits -> next token id.

Order of operations follows llama.cpp's default chain: repetition penalty, then top-k, top-p,
min-p on the tempered distribution, then a draw. temperature == 0 is greedy (argmax after the
repetition penalty).
"""

from dataclasses import dataclass

import numpy as np

from .runtime.errors import EdgeLLMError

BIG = np.finfo(np.float64).max  # penalized logits stay finite, so max - max is 0, not NaN


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repetition_penalty: float = 1.1  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("repeat_last_n", self.repeat_last_n >= 0, "must be >= 0"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise EdgeLLMError(f"{name} {msg}, got {getattr(self, name)!r}")


class Sampler:
    def __init__(self, params=None, **kwargs):
        self.p = params or SamplingParams(**kwargs)
        self.rng = np.random.default_rng(self.p.seed)

    def __call__(self, logits, history=()):
        p = self.p
        logits = np.array(logits, dtype=np.float64).reshape(-1)
        if p.repetition_penalty != 1.0 and p.repeat_last_n and len(history):
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            with np.errstate(over="ignore"):  # a penalty near 0 or huge: clipped, not inf
                logits[recent] = np.clip(np.where(vals > 0, vals / p.repetition_penalty,
                                                  vals * p.repetition_penalty), -BIG, BIG)
        if p.temperature == 0:
            return int(np.argmax(logits))
        order = _top_order(logits, p.top_k)
        with np.errstate(over="ignore"):  # a temperature near 0: others -inf, probability 0
            z = (logits[order] - logits[order[0]]) / p.temperature
        probs = np.exp(z)
        probs /= probs.sum()
        keep = len(probs)
        if p.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (always at least one token)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p) + 1))
        if p.min_p > 0:
            keep = min(keep, int(np.sum(probs >= p.min_p * probs[0])))
        probs = probs[:max(keep, 1)]
        probs /= probs.sum()
        return int(order[self.rng.choice(len(probs), p=probs)])


def _top_order(logits, k):
    """Token ids by decreasing logit, ties by id (a stable sort), only the first k when k > 0.

    Sorting a whole vocabulary (49k for SmolLM2) cost several ms a token; top-k first selects
    the candidates at or above the k-th value (all ties included, so the result equals the
    full stable sort's first k) and sorts only those.
    """
    if not k or k >= logits.size:
        return np.argsort(-logits, kind="stable")
    kth = np.partition(logits, logits.size - k)[logits.size - k]
    idx = np.flatnonzero(logits >= kth)
    return idx[np.argsort(-logits[idx], kind="stable")][:k]
