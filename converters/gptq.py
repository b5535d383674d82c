"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a linear layer's weights column by column (input channel by
input channel), each time spreading the rounding error over the columns not yet quantized so as
to minimise the layer's output error ||W X^T - Q X^T||^2 on calibration inputs X. Only the
Hessian H = X^T X / N of the inputs is needed.

The grid is the codec's own (runtime/encodings.py: int4 or int3, group-wise, f16 scales with the
writer rule s = m / -ZERO), so what GPTQ chooses is stored exactly:
- a matrix [out, in] stored by rows (attention projections, gate and up rows): groups of g input
  columns share a scale per output row. Without act-order a group's scales are set from the
  (already error-updated) weights when GPTQ reaches the group; with act-order the columns are
  visited by decreasing H diagonal and the scales are fixed up front from the original weights
  ("static groups"), since the format's groups are contiguous runs of a row.
- the down projection as the FFN bundles store it (`columns=True`): each input column (one
  neuron's down column, length d) is a row of the codec on its own, with its own d/g scales, set
  when GPTQ reaches it.
Dampening adds `damp` times the mean diagonal to H's diagonal; input channels never active
(H_ii = 0) get their weights zeroed, as in the paper's reference code.

    wq, (codec, q, s) = gptq.quantize(w, H, codec)            # rows: q, s encode wq
    wq, (codec, q, s) = gptq.quantize(w_down, H, codec, columns=True)   # q, s encode wq.T
"""

import numpy as np

from edgellm.runtime.errors import ConvertError

BLOCK = 128  # columns per lazy batch update (the paper's B)


def check_group(codec, d, what):
    if d % codec.group_size:
        raise ConvertError(f"{what}: row length {d} is not divisible by the {codec.name} group "
                           f"size {codec.group_size}")


def _hinv_upper(H, damp, dead):
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), H dampened."""
    H = H.copy()
    H[dead, dead] = 1.0
    H[np.diag_indices_from(H)] += damp * float(np.mean(np.diag(H)))
    try:
        Linv = np.linalg.inv(np.linalg.cholesky(H))
    except np.linalg.LinAlgError:
        raise ConvertError("GPTQ: the calibration Hessian is not positive definite even after "
                           f"dampening {damp}; raise the dampening or give more calibration "
                           "text") from None
    Hinv = Linv.T @ Linv
    return np.linalg.cholesky(Hinv).T


def quantize(w, H, codec, damp=0.01, act_order=True, columns=False, block=BLOCK):
    """GPTQ on w f32 [out, in] with input Hessian H [in, in]; codec: encodings.Int4 / Int3.
    Returns (the quantized weights f32 [out, in], (codec, q, s)): rows mode, q and s encode the
    returned matrix; columns mode, its transpose (one codec row per input column)."""
    W = np.array(w, dtype=np.float64)
    out_dim, n = W.shape
    check_group(codec, n if not columns else out_dim, "GPTQ")
    if H.shape != (n, n):
        raise ConvertError(f"GPTQ: Hessian of shape {list(H.shape)} for a [{out_dim}, {n}] matrix")
    if not damp > 0:
        raise ConvertError(f"GPTQ: dampening must be > 0, got {damp!r}")
    dead = np.diag(H) == 0
    W[:, dead] = 0
    g = codec.group_size
    Z = float(codec.ZERO)
    block = -(-block // g) * g  # whole groups per block (a group's scales are set at its start)
    if columns:
        s_all = np.zeros((n, out_dim // g), dtype=np.float16)
    else:
        s_all = codec.scales(W.astype(np.float32)) if act_order else \
            np.zeros((out_dim, n // g), dtype=np.float16)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W = W[:, perm]
    Hp = H[np.ix_(perm, perm)]
    U = _hinv_upper(Hp, damp, dead[perm])
    Q = np.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        W1 = W[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            w_col = W1[:, i]
            if columns:
                wc = w_col.astype(np.float32)[None, :]
                s = codec.scales(wc)
                s_all[col] = s[0]
                sc = np.repeat(s[0].astype(np.float32), g)
            else:
                if not act_order and col % g == 0:  # a new group: scales from current weights
                    s_all[:, col // g] = codec.scales(W1[:, i:i + g].astype(np.float32))[:, 0]
                sc = s_all[:, col // g].astype(np.float32)
            inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc != 0)
            code = np.clip(np.rint(w_col.astype(np.float32) * inv) + Z, 0, 2 * Z - 1)
            q = ((code - Z) * sc).astype(np.float64)
            Q[:, i1 + i] = q
            e = (w_col - q) / U1[i, i]
            W1[:, i:] -= np.outer(e, U1[i, i:])
            Err[:, i] = e
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    inv_perm = np.argsort(perm)
    Q = np.ascontiguousarray(Q[:, inv_perm], dtype=np.float32)
    if columns:
        QT = np.ascontiguousarray(Q.T)
        return Q, (codec, codec.pack(codec.codes(QT, s_all)), s_all)
    return Q, (codec, codec.pack(codec.codes(Q, s_all)), s_all)
