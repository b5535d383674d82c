"""Training the neuron predictors and choosing their thresholds (NumPy only).

A low-rank predictor scores every FFN neuron from the FFN input h: s = B·(A·h) + c, A [r, d],
B [n, r], c [n] (runtime/predictor.py evaluates it). It starts from the data-aware truncated SVD
of the true preactivations z = W·h + b over the calibration tokens (the best rank-r linear map
from h to z in the least-squares sense, so "z > 0" is already well predicted), then logistic
regression with Adam sharpens it on the 0/1 target "neuron needed". The selection rule is set
afterwards on held-out calibration tokens: a score threshold for a target recall, or the k
highest scores (top-k) with k the smallest that reaches it.

>>> A, B, c = lowrank_init(w, b, H, rank=64)                      # doctest: +SKIP
>>> A, B, c = fit_logistic(H, Y, A, B, c, epochs=8)                # doctest: +SKIP
>>> t = threshold_for_recall(scores(H_val, A, B, c), Y_val, 0.99)  # doctest: +SKIP
"""

import numpy as np


def default_rank(d_model, d_ff):
    """Rank when none is given: an eighth of d_model, at least 32 (and below d_model)."""
    return int(min(max(32, d_model // 8), d_model, d_ff))


def lowrank_init(w, bias, H, rank):
    """Truncated SVD of z = H·wᵀ + bias weighted by the data: with H1 = [H, 1], W1 = [w, bias]
    and S = H1ᵀH1/N = L·Lᵀ, the top-r left singular vectors U of W1·L span the best rank-r
    approximation of z over these tokens. Returns A = Uᵀw [r, d], B = U [n, r], c = U·Uᵀ·bias,
    all f32 (so B·A·h + c is the projection of z on those r directions)."""
    H = np.asarray(H, dtype=np.float64)
    n, d = w.shape
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    H1 = np.concatenate([H, np.ones((H.shape[0], 1))], axis=1)
    W1 = np.concatenate([np.asarray(w, dtype=np.float64), b[:, None]], axis=1)
    evals, evecs = np.linalg.eigh(H1.T @ H1 / H.shape[0])
    L = evecs * np.sqrt(np.maximum(evals, 0))
    U = np.linalg.svd(W1 @ L, full_matrices=False)[0][:, :rank]
    A1 = U.T @ W1
    return (A1[:, :d].astype(np.float32), U.astype(np.float32),
            (U @ A1[:, d]).astype(np.float32))


def scores(H, A, B, c, block=4096):
    """f32[N, n] = (H·Aᵀ)·Bᵀ + c, in blocks of tokens."""
    out = np.empty((H.shape[0], B.shape[0]), dtype=np.float32)
    for i in range(0, H.shape[0], block):
        out[i:i + block] = (H[i:i + block] @ A.T) @ B.T + c
    return out


def fit_logistic(H, Y, A, B, c, epochs=8, lr=2e-3, batch=256, seed=0):
    """Adam on the mean binary cross-entropy of sigmoid(scores) against Y (bool [N, n]).
    The start is rescaled so that scores have unit spread (the SVD start is in units of z)."""
    rng = np.random.default_rng(seed)
    H = np.ascontiguousarray(H, dtype=np.float32)
    spread = float(np.std(scores(H[:2048], A, B, c))) or 1.0
    params = [A.copy(), B / spread, c / spread]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
    N = H.shape[0]
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(N), max(1, N // batch)):
            A_, B_, c_ = params
            h = H[idx]
            p = h @ A_.T  # [b, r]
            s = p @ B_.T + c_  # [b, n]
            g = (1.0 / (1.0 + np.exp(-s)) - Y[idx]) / len(idx)  # d loss / d s (sum over n)
            grads = [(g @ B_).T @ h, g.T @ p, g.sum(axis=0)]
            step += 1
            for k in range(3):
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                mh = m[k] / (1 - b1 ** step)
                vh = v[k] / (1 - b2 ** step)
                params[k] -= (lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
    return tuple(params)


def threshold_for_recall(s, Y, target):
    """The largest t such that (s > t) keeps at least `target` of the true positives of Y."""
    pos = np.sort(s[Y])
    if pos.size == 0:
        return float(np.max(s))
    k = int(np.floor((1.0 - target) * pos.size))
    return float(np.nextafter(np.float32(pos[min(k, pos.size - 1)]), np.float32(-np.inf)))


def top_k_for_recall(s, Y, target):
    """The smallest k such that the k highest scores of each token keep at least `target` of
    the true positives of Y overall."""
    n = s.shape[1]
    order = np.argsort(-s, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
    hist = np.bincount(rank[Y], minlength=n)
    if hist.sum() == 0:
        return 1
    cum = np.cumsum(hist) / hist.sum()
    return int(min(n, np.searchsorted(cum, target - 1e-12) + 1))


def selection(s, t=None, k=None):
    """bool [N, n]: the neurons selected by threshold t, or by the top k of each row."""
    if k is None:
        return s > t
    out = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(out, np.argpartition(-s, k - 1, axis=1)[:, :k], True, axis=1)
    return out


def quality(sel, Y):
    """Recall, precision and the fractions selected and truly needed (micro averages)."""
    hit, npred, ntrue = int((sel & Y).sum()), int(sel.sum()), int(Y.sum())
    return {"recall": hit / ntrue if ntrue else 1.0,
            "precision": hit / npred if npred else 1.0,
            "predicted_fraction": npred / sel.size, "true_fraction": ntrue / Y.size}
