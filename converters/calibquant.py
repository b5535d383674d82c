"""Calibrated quantization for `edgellm convert --quant int4|int3 --method gptq|awq`.

rtn (the default) rounds every weight to nearest on its own (converters/quantize.py). gptq and
awq run the layer-by-layer calibration pass (converters/layerwise.py) over the source and
quantize each layer's linears knowing their inputs, before the hidden states move on through the
quantized layer:
- gptq (converters/gptq.py): error-compensating column-by-column rounding, with act-order and
  dampening; the down projection column by column as the FFN bundles store it;
- awq (converters/awq.py): activation-aware scales folded into the norms / v / up, auto-clip,
  then round to nearest;
- smoothquant (converters/smoothquant.py, int8): outlier channels of the activations smoothed
  into the weights, then int8 round to nearest, with per-token int8 activations at run time;
  w8a8: the same per-token int8 activations without smoothing (the baseline; no calibration).
The token embedding and the head are rounded to nearest in every method (as GPTQ and AWQ leave
them to the plain quantizer). Everything that can be refused is refused in prepare(), before
anything is written: the method and quant, group sizes that do not divide a linear's rows, the
calibration text (too short, unreadable).
"""

from dataclasses import asdict, dataclass

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError

METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
QUANTS = ("int4", "int3")  # what gptq and awq quantize to
W8A8 = ("smoothquant", "w8a8")  # int8 weights with per-token int8 activations


@dataclass
class Options:
    method: str = "rtn"
    quant: str = "int4"
    group_size: int = 32
    text: str | None = None  # calibration text (None: the shipped one)
    tokens: int = 8192  # calibration tokens
    seq_len: int = 256
    damp: float = 0.01  # GPTQ: dampening, fraction of the mean Hessian diagonal
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal (static groups)
    clip: bool = True  # AWQ: auto-clip search
    alpha: float = 0.5  # SmoothQuant: migration strength
    low_rank: float | None = None  # fraction of the attention weights kept (converters/lowrank.py)

    def record(self):
        return asdict(self)


def options(method, quant, group_size, text=None, extra=None, low_rank=None):
    """Checked Options, or None for rtn (nothing to calibrate). low_rank: factorize the
    attention projections (converters/lowrank.py), then round to nearest (rtn) or quantize
    the factors and the rest with GPTQ (converters/lowrank.py quantize_layer); AWQ's and
    SmoothQuant's scales are folded first and the scaled weights factorized (lowrank.Walk)."""
    if low_rank is not None:
        from . import lowrank

        lowrank.check(low_rank)
        method = method or "rtn"
        if quant == "keep":
            raise ConvertError("--low-rank needs a --quant to encode the factors (not keep)")
        if method != "rtn":
            _check_method(method, quant)
        try:
            o = Options(method=method, quant=quant, group_size=group_size, text=text,
                        low_rank=float(low_rank), **(extra or {}))
        except TypeError as e:
            raise ConvertError(f"low-rank options: {e}") from None
        _check_values(o)
        if method in ("gptq", "awq"):
            encodings.codec(quant, group_size)  # group size a multiple of 32
        return o
    if method in (None, "rtn"):
        if extra:
            raise ConvertError(f"options {sorted(extra)} need --method gptq or awq")
        return None
    _check_method(method, quant)
    try:
        o = Options(method=method, quant=quant, group_size=group_size, text=text,
                    **(extra or {}))
    except TypeError as e:
        raise ConvertError(f"calibrated quantization options: {e}") from None
    _check_values(o)
    encodings.codec(quant, group_size)  # group size a multiple of 32
    return o


def _check_method(method, quant):
    if method not in METHODS:
        raise ConvertError(f"method {method!r} is not supported (choose one of "
                           f"{', '.join(METHODS)})")
    if method in W8A8:  # f32: smoothing only, no rounding (for tests and inspection)
        if quant not in ("int8", "f32") or (method == "w8a8" and quant != "int8"):
            raise ConvertError(f"--method {method} is W8A8: use --quant int8, not {quant}")
    elif quant not in QUANTS:
        raise ConvertError(f"--method {method} quantizes to {' or '.join(QUANTS)}, not "
                           f"--quant {quant}")
    if method == "awq" and quant != "int4":
        raise ConvertError("--method awq is for int4 (use gptq for int3)")


def _check_values(o):
    if not isinstance(o.alpha, (int, float)) or not 0 <= o.alpha <= 1:
        raise ConvertError(f"SmoothQuant alpha must be in [0, 1], got {o.alpha!r}")
    if not isinstance(o.damp, (int, float)) or not 0 < o.damp < 1:
        raise ConvertError(f"GPTQ dampening must be in (0, 1), got {o.damp!r}")


def check_shapes(o, cfg):
    """GPTQ and AWQ (with --low-rank too): every linear's rows (and the down columns, which the
    bundles quantize along d) must divide into groups, as they fall back to nothing. (W8A8 has
    no groups; a low-rank rtn conversion's matrix_codec falls back to int8.)"""
    if o is None or o.method not in ("gptq", "awq"):
        return
    for what, d in (("d_model (q, k, v, gate, up rows; down columns)", cfg.d_model),
                    ("q_dim = n_heads * head_dim (o rows)", cfg.q_dim)):
        if d % o.group_size:
            raise ConvertError(f"--method {o.method}: group size {o.group_size} does not divide "
                               f"{what} = {d}; choose a group size that does")


def prepare(o, spec, source, tokenizer, path=None, data=None, progress=False):
    """A layerwise.Walk over the source, everything checked (None when o is None). tokenizer:
    the manifest's tokenizer entry, its file at `path` or its bytes `data`."""
    if o is None:
        return None
    if o.low_rank is not None:
        from . import lowrank

        check_shapes(o, spec.config)  # (factors whose rows the group does not divide: int8)
        return lowrank.prepare(o.low_rank, spec, source, tokenizer, path=path, data=data,
                               text=o.text, tokens=o.tokens, progress=progress, quant=o)
    if o.method == "w8a8":  # plain rounding, nothing to calibrate
        return None
    from . import layerwise

    check_shapes(o, spec.config)
    tok = layerwise.load_tokenizer(tokenizer, spec.config, path=path, data=data)
    seqs = layerwise.sequences(tok, spec.config, text=o.text, tokens=o.tokens,
                               seq_len=o.seq_len)
    return layerwise.Walk(source, spec, seqs, progress=progress)


def transform(layer, o, names=None):
    """Quantize the linears of one layerwise.Layer with method o.method; each is set() with its
    encoded form. Returns the layer's report. names: only these linears (in execution order;
    gptq and rtn only: AWQ and SmoothQuant scale whole groups)."""
    from . import awq, gptq, smoothquant

    c = encodings.codec(o.quant, o.group_size)
    partial = names is not None
    if partial and o.method not in ("gptq", "rtn"):
        raise ConvertError(f"{o.method} quantizes whole layers, not some of their linears")
    names = [n for n in names or ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up",
                                  "ffn_down") if n in layer.weights]
    report = {"layer": layer.index}
    if o.method == "awq":
        report["awq"] = awq.apply(layer, c, clip=o.clip)
    elif o.method == "smoothquant":
        report["smoothquant"] = smoothquant.apply(layer, alpha=o.alpha)
    errors = {}
    if not partial or not hasattr(layer, "prequant"):
        layer.prequant = {}  # name -> the float weights just before rounding (for stats)
    for n in names:  # in execution order: each sees the inputs of the quantized ones before it
        w = layer.weights[n]
        columns = n == "ffn_down"
        if o.method == "gptq":
            wq, enc = gptq.quantize(w, layer.hessian(n), c, damp=o.damp,
                                    act_order=o.act_order, columns=columns)
        else:
            src = w.T if columns else w
            q, s = c.quantize(src)
            wq = c.dequantize(q, s)
            wq, enc = (wq.T if columns else wq), (c, q, s)
        X = layer.inputs(n)
        errors[n] = _rel_error(X, w, wq)
        layer.prequant[n] = w
        layer.set(n, wq, encoded=enc)
    report["output_error"] = errors
    return report


def _rel_error(X, w, wq, n=2048):
    """||X (w - wq)^T|| / ||X w^T|| on up to n tokens."""
    import numpy as np

    if X.shape[0] > n:
        X = X[np.linspace(0, X.shape[0] - 1, n).astype(np.int64)]
    num = np.linalg.norm(X @ (w - wq).T)
    den = np.linalg.norm(X @ w.T)
    return float(num / den) if den > 0 else 0.0


def stats(layer, name):
    """The converter's per-tensor record: max |decoded - weights before rounding| (after AWQ's
    scaling and clipping, which move the weights themselves), max |w|, and the relative output
    error ||X (w - wq)^T|| / ||X w^T|| on calibration inputs."""
    import numpy as np

    w, wq = layer.prequant[name], layer.weights[name]
    return {"max_abs_error": float(np.abs(wq - w).max(initial=0)),
            "max_abs": float(np.abs(w).max(initial=0)),
            "output_error": layer.report["output_error"][name]}


def record(o, walk, reports):
    """The manifest's provenance.quantization.calibrated section."""
    import numpy as np

    if walk is None:  # w8a8: no calibration
        return o.record()
    if o.low_rank is not None:
        from . import lowrank

        return {**o.record(), "low_rank": lowrank.record(o.low_rank, walk, reports)}
    return {**o.record(), "calibration_tokens": walk.n_tokens,
            "mean_output_error": float(np.mean([v for r in reports
                                                for v in r["output_error"].values()])),
            "layers": reports}


def layers(walk, o):
    """Yield each layer of walk quantized by o (with layer.report set)."""
    if o.low_rank is not None:  # factorized (layer.lowrank), not quantized here
        yield from walk.layers()
        return
    for layer in walk.layers():
        layer.report = transform(layer, o)
        yield layer


def activation_quant(o):
    """The manifest's top-level `activation_quant` (docs/FORMAT.md §2.7) for options o, or None:
    W8A8 methods at int8 ask for per-token int8 activations."""
    if o is None or o.method not in W8A8 or o.quant != "int8":
        return None
    return {"bits": 8, "granularity": "token"}
