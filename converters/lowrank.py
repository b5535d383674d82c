"""Low-rank factorization of the attention projections (`edgellm convert --low-rank F`), in the
style of SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression") and ASVD (Yuan et al. 2023): the SVD is taken of the weights
as the calibration activations see them, not of the bare weights.

For a projection W [n, d] with inputs X (Hessian H = XᵀX / N, from converters/layerwise.py),
whitening with the Cholesky factor S (S Sᵀ = H + damping) makes the output error a Frobenius
norm: ||(W − W′)Xᵀ||² / N = ||(W − W′) S||². The SVD W S = U Σ Vᵀ truncated to rank r is then
the best rank-r W′ for the calibration inputs, and its error is the sum of the dropped σᵢ².
Stored as left = U_r Σ_r^½ [n, r] and right = Σ_r^½ V_rᵀ S⁻¹ [r, d] (docs/FORMAT.md §3.4), each
quantized like any matrix of the model (--quant).

Ranks (per layer, per projection): F is the fraction of the attention projections' weights kept.
Each layer gets F times its q, k, v, o weights; within the layer, ranks grow in steps (32, or 8
for projections narrower than 128) by a greedy choice of the largest drop of relative output
error (dropped σ² over all σ²) per weight added, and a projection whose factors would hold as
many weights as the matrix stays dense. q, k, v are factorized on the layer's input; o on the
attention output of the already factorized q, k, v (sequential, as the calibration pass goes).

With --method gptq (quantize_layer), the factors are then quantized with GPTQ, still layer by
layer: right [r, d] on the projection's input Hessian H, left [n, r] on the Hessian of its own
input z = right_q x, i.e. right_q H right_qᵀ (so left compensates right's rounding), in the
order the layer computes (q, k, v, then o on the attention output of the quantized q, k, v);
the projections left dense and the FFN go through calibquant.transform's GPTQ as without
--low-rank. A factor whose row length the group size does not divide falls back to int8 (as
quantize.matrix_codec does), rounded to nearest.
"""

import numpy as np

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError

from . import layerwise

PROJ = ("attn_q", "attn_k", "attn_v", "attn_o")
DAMP = 0.01  # of the mean Hessian diagonal (H is singular for channels never active)


def check(fraction):
    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
            or not 0 < fraction < 1):
        raise ConvertError(f"--low-rank must be a fraction in (0, 1) of the attention weights "
                           f"to keep, got {fraction!r}")
    return float(fraction)


def whitening(H, damp=DAMP):
    """Lower Cholesky factor S of H + damp * mean(diag H) * I (f64)."""
    H = np.array(H, dtype=np.float64)
    H[np.diag_indices_from(H)] += damp * max(float(np.mean(np.diag(H))), 1e-12)
    try:
        return np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        raise ConvertError("low-rank: the calibration Hessian is not positive definite; give "
                           "more calibration text") from None


def svd(w, S):
    """(U, σ, Vᵀ) of W S."""
    return np.linalg.svd(np.asarray(w, np.float64) @ S, full_matrices=False)


def factors(U, sig, Vt, S, r):
    """left [n, r], right [r, d] (f32) of the rank-r truncation, W′ = left · right."""
    root = np.sqrt(sig[:r])
    left = U[:, :r] * root[None, :]
    # right = diag(root) V_rᵀ S⁻¹, i.e. solve Sᵀ rightᵀ = V_r diag(root)
    right = np.linalg.solve(S.T, (Vt[:r].T * root[None, :])).T
    return left.astype(np.float32), right.astype(np.float32)


def rel_error(sig, r):
    """Relative output error² of the rank-r truncation: dropped σ² over all σ²."""
    e = sig.astype(np.float64) ** 2
    tot = e.sum()
    return float(e[r:].sum() / tot) if tot > 0 else 0.0


def plan(shapes, spectra, fraction):
    """Ranks {name: r, or None for dense} for matrices shapes {name: (n, d)} with spectra
    {name: σ}, keeping at most fraction of their weights. Raises ConvertError when even the
    smallest ranks do not fit."""
    budget = fraction * sum(n * d for n, d in shapes.values())
    step = {k: 32 if min(n, d) >= 128 else 8 for k, (n, d) in shapes.items()}
    rank = {k: min(step[k], min(n, d)) for k, (n, d) in shapes.items()}

    def cost(k, r):
        n, d = shapes[k]
        return n * d if r is None else r * (n + d)

    used = sum(cost(k, r) for k, r in rank.items())
    if used > budget:
        raise ConvertError(f"--low-rank {fraction}: even rank {min(step.values())} for every "
                           f"projection keeps more than that; choose a larger fraction")
    while True:
        best = None
        for k, r in rank.items():
            if r is None:
                continue
            n, d = shapes[k]
            nr = r + step[k]
            nr = None if nr >= min(n, d) or nr * (n + d) >= n * d else nr
            add = cost(k, nr) - cost(k, r)
            gain = rel_error(spectra[k], r) - (0.0 if nr is None else rel_error(spectra[k], nr))
            if used + add <= budget and add > 0 and (best is None or gain / add > best[0]):
                best = (gain / add, k, nr, add)
        if best is None:
            return rank
        _, k, nr, add = best
        rank[k], used = nr, used + add


class Walk:
    """The calibration pass that factorizes each layer's projections (see the module doc), then
    quantizes them and the rest of the layer with GPTQ when quant (calibquant.Options) asks."""

    def __init__(self, walk, fraction, quant=None):
        self.walk, self.fraction, self.quant = walk, fraction, quant

    def layers(self):
        method = self.quant.method if self.quant is not None else "rtn"
        for layer in self.walk.layers():
            layer.lowrank = {}
            scaled = scale_layer(layer, self.quant) if method in ("awq", "smoothquant") else None
            layer.report = apply(layer, self.fraction)
            if method == "gptq":
                layer.report.update(quantize_layer(layer, self.quant))
            elif scaled is not None:
                layer.report[method] = scaled
                layer.report.update(round_rest(layer, self.quant))
            yield layer


def scale_layer(layer, o):
    """AWQ's or SmoothQuant's scales folded into the dense layer (norms, v, up), before the
    factorization: the whitened SVD of the scaled W s on the scaled inputs X / s is the SVD of
    W on X (the whitening factor of diag(1/s) H diag(1/s) is diag(1/s) S), so the factors come
    out as those of W with right's columns times s, up to the damping; the factors, not W s,
    are then rounded (AWQ's search and SmoothQuant's weight maxima still look at W s). AWQ's
    clipping waits until the ranks are known (round_rest). Returns the method's report."""
    from . import awq, smoothquant

    if o.method == "awq":
        return awq.apply(layer, encodings.codec(o.quant, o.group_size), clip=False)
    return smoothquant.apply(layer, alpha=o.alpha)


def round_rest(layer, o):
    """After scale_layer and apply: AWQ's clipping of the linears left dense, then every linear
    left dense rounded to nearest (calibquant.transform); the converter rounds the factors."""
    from dataclasses import replace

    from . import awq, calibquant

    if o.method == "awq" and o.clip:
        awq.clip_weights(layer, encodings.codec(o.quant, o.group_size), skip=layer.lowrank)
    rest = [n for group in LINEARS for n in group
            if n in layer.weights and n not in layer.lowrank]
    return {"output_error": calibquant.transform(layer, replace(o, method="rtn"),
                                                 names=rest)["output_error"]}


LINEARS = (("attn_q", "attn_k", "attn_v"), ("attn_o",), ("ffn_gate", "ffn_up", "ffn_down"))


def quantize_layer(layer, o):
    """GPTQ of a factorized layer (module doc): layer.lowrank[name] becomes the quantized
    factors, layer.lowrank_encoded[name] their ((codec, q, s, stats), ...) for the converter, every other linear set() with its encoding by calibquant.transform. Returns
    {"output_error": {name: ||X (W - W_q)ᵀ|| / ||X Wᵀ||}} (W: the float weights, W = left ·
    right for a factorized projection)."""
    from . import calibquant

    layer.lowrank_encoded, layer.prequant = {}, {}
    errors = {}
    for group in LINEARS:
        for n in group:
            if n in layer.lowrank:
                errors[n] = _gptq_factors(layer, n, o)
        rest = [n for n in group if n in layer.weights and n not in layer.lowrank]
        if rest:
            errors.update(calibquant.transform(layer, o, names=rest)["output_error"])
    return {"output_error": errors}


def _gptq_factors(layer, name, o):
    from . import calibquant

    left, right = layer.lowrank[name]
    w = layer.weights[name]  # left · right in float
    H = layer.hessian(name)
    rq, enc_r = quantize_factor(right, H, o)
    r64 = rq.astype(np.float64)
    lq, enc_l = quantize_factor(left, r64 @ H @ r64.T, o)
    err = calibquant._rel_error(layer.inputs(name), w, lq @ rq)
    layer.lowrank[name] = (lq, rq)
    # (codec, q, s, the converter's per-tensor record: as calibquant.stats, against the factor
    # before rounding)
    layer.lowrank_encoded[name] = tuple(
        (*enc, {"max_abs_error": float(np.abs(fq - f).max(initial=0)),
                "max_abs": float(np.abs(f).max(initial=0))})
        for enc, fq, f in ((enc_l, lq, left), (enc_r, rq, right)))
    layer.prequant[name] = w
    layer.set(name, lq @ rq)
    return err


def quantize_factor(w, H, o):
    """(w quantized, (codec, q, s)): GPTQ with the input Hessian H when o.quant's group size
    divides w's rows, else int8 rounded to nearest (quantize.matrix_codec's fallback)."""
    from . import gptq, quantize

    c, _ = quantize.matrix_codec(o.quant, o.group_size, w.shape[1])
    if c.name == o.quant:
        return gptq.quantize(w, H, c, damp=o.damp, act_order=o.act_order)
    q, s = c.quantize(np.asarray(w, np.float32))
    return c.dequantize(q, s), (c, q, s)


def apply(layer, fraction):
    """Factorize layer's projections in place: layer.lowrank[name] = (left, right) and the
    layer's weights set to left · right (so later inputs see them). Returns the layer's report."""
    W = layer.weights
    S = {"qkv": whitening(layer.hessian("attn_q")), "o": whitening(layer.hessian("attn_o"))}
    dec = {n: svd(W[n], S["o" if n == "attn_o" else "qkv"]) for n in PROJ}
    ranks = plan({n: W[n].shape for n in PROJ}, {n: dec[n][1] for n in PROJ}, fraction)
    report = {"layer": layer.index, "ranks": {}, "rel_output_error": {}}
    for n in PROJ:
        if n == "attn_o" and ranks[n] is not None:  # o's input after q, k, v were factorized
            S["o"] = whitening(layer.hessian("attn_o"))
            dec[n] = svd(W[n], S["o"])
        r = ranks[n]
        report["ranks"][n] = r
        if r is None:
            report["rel_output_error"][n] = 0.0
            continue
        U, sig, Vt = dec[n]
        left, right = factors(U, sig, Vt, S["o" if n == "attn_o" else "qkv"], r)
        report["rel_output_error"][n] = float(np.sqrt(rel_error(sig, r)))
        layer.lowrank[n] = (left, right)
        layer.set(n, left @ right)
    return report


def prepare(fraction, spec, source, tokenizer, path=None, data=None, text=None, tokens=4096,
            progress=False, quant=None):
    """A Walk over the source (everything checked first); quant: calibquant.Options of a
    method applied after the factorization (gptq), or None (the converter rounds to nearest)."""
    check(fraction)
    tok = layerwise.load_tokenizer(tokenizer, spec.config, path=path, data=data)
    seqs = layerwise.sequences(tok, spec.config, text=text, tokens=tokens)
    return Walk(layerwise.Walk(source, spec, seqs, progress=progress), fraction, quant)


def record(fraction, walk, reports):
    """provenance.low_rank."""
    return {"fraction": fraction, "method": "svd-llm whitening (Cholesky of X^T X)",
            "calibration_tokens": walk.walk.n_tokens, "damp": DAMP, "layers": reports}
