"""Structural compression of an edgellm model directory: drop whole layers, prune FFN neurons.

Both work on a converted model (any encoding) and write a new model directory through
writer.Staging (staged, verified, renamed into place), so they compose with the rest of a recipe
(converters/recipe.py) and with `edgellm convert --drop-layers N --prune-neurons F`.

Layer dropping. Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"):
the block of n consecutive layers l .. l+n-1 whose input x_l and output x_{l+n} (residual stream
before the block and after it) are closest in angular distance d = arccos(cos(x_l, x_{l+n})) / pi
on calibration text changes the representation least, so it is dropped. ShortGPT's block
influence (Men et al. 2024) scores layers one at a time, BI_i = 1 - cos(x_i, x_{i+1}), and drops
the n layers with the lowest BI (not necessarily consecutive). Both average over every
calibration token (Gromov et al. use the last token of each sequence; with a few short sequences
of calibration text the mean over all tokens is the steadier estimate). Dropping a layer deletes
its chunk: the remaining chunks are renumbered and keep their bytes; the manifest's provenance
records which source layers remain (`layer_map`) and the scores.

Neuron pruning. The calibration pass (converters/calibrate.py) measures how often each FFN neuron
is needed on calibration text (ffn_freq) and stores bundle rows hot first. Pruning keeps the
`d_ff'` most frequently needed neurons of every layer (the config's d_ff is one number for all
layers, so every layer keeps the same count) by cutting bundle rows: the rows' bytes are not
touched, so the remaining FFN computes exactly the sum over the kept neurons. A separate
`ffn_down` matrix (GGUF blocks kept, docs/FORMAT.md §3.2) has its kept columns re-encoded in its
own encoding. A predictor, trained for the full layer, is dropped: train it again afterwards
(`--predictor`, or a recipe's `predictor` step).

Low-rank projections (--low-rank: P.left and P.right, converters/lowrank.py) are chunk
tensors like any other: dropping layers copies them, neuron pruning leaves them as they are.
"""

import copy
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from edgellm.runtime import encodings, format
from edgellm.runtime.errors import ConvertError
from edgellm.runtime.lowrank import in_manifest as has_low_rank

from . import calibrate, quantize, writer

log = logging.getLogger(__name__)

METRICS = ("angular", "bi")
NEURON_ALIGN = 32  # kept neurons are rounded to a multiple of this (whole q8_0/int4 blocks of a
# separate ffn_down matrix; tidy rows for the kernels) when d_ff is one
PREDICTOR = ("ffn_pred.a", "ffn_pred.b", "ffn_pred.bias", "ffn_pred.threshold", "ffn_pred.top_k")


def is_model_dir(path):
    return os.path.isfile(os.path.join(os.fspath(path), format.MANIFEST))


# ---------------------------------------------------------------------------------------------
# Scores from hidden states


def _unit_rows(x):
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def angular_distance(a, b):
    """Mean over tokens of arccos(cos(a_t, b_t)) / pi, for hidden states a, b [N, d]."""
    c = np.clip((_unit_rows(a) * _unit_rows(b)).sum(axis=-1), -1.0, 1.0)
    return float(np.mean(np.arccos(c)) / np.pi)


def block_influence(a, b):
    """ShortGPT's BI = 1 - mean over tokens of cos(a_t, b_t) (a: a layer's input, b: output)."""
    return float(1.0 - np.mean((_unit_rows(a) * _unit_rows(b)).sum(axis=-1)))


def layer_scores(states, n, metric="angular"):
    """Scores from the residual stream states x_0 .. x_L (an iterable of [N, d] arrays, x_l the
    input of layer l, x_L the last layer's output), keeping at most n + 1 of them at once.

    angular: [d(x_l, x_{l+n}) for l in 0 .. L-n] (one score per block start);
    bi: [BI(x_i, x_{i+1}) for i in 0 .. L-1] (one score per layer)."""
    check_metric(metric)
    lag = n if metric == "angular" else 1
    f = angular_distance if metric == "angular" else block_influence
    window, out = [], []
    for x in states:
        window.append(_unit_rows(x).astype(np.float32))
        if len(window) > lag:
            out.append(f(window[0], window[-1]))
            window.pop(0)
    return out


def choose_layers(scores, n, metric="angular"):
    """The source layers to drop: the block l .. l+n-1 with the smallest angular distance (the
    first on ties), or the n layers with the lowest block influence."""
    check_metric(metric)
    if metric == "angular":
        l0 = int(np.argmin(scores))
        return list(range(l0, l0 + n))
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:n])


def check_metric(metric):
    if metric not in METRICS:
        raise ConvertError(f"drop metric must be one of {', '.join(METRICS)}, got {metric!r}")


def check_drop(n, n_layers, where="--drop-layers"):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConvertError(f"{where}: the number of layers to drop must be a positive integer, "
                           f"got {n!r}")
    if n >= n_layers:
        raise ConvertError(f"{where}: cannot drop {n} of the model's {n_layers} layers (at least "
                           "one must remain)")


def check_fraction(fraction, where="--prune-neurons"):
    if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
            or not 0 < fraction < 1):
        raise ConvertError(f"{where}: the fraction of FFN neurons to prune must be between 0 and "
                           f"1 (exclusive), got {fraction!r}")


def kept_neurons(d_ff, fraction):
    """Neurons each layer keeps when `fraction` of d_ff is pruned (a multiple of NEURON_ALIGN
    when d_ff is one)."""
    keep = d_ff * (1.0 - fraction)
    if d_ff % NEURON_ALIGN == 0:
        return int(max(NEURON_ALIGN, round(keep / NEURON_ALIGN) * NEURON_ALIGN))
    return int(max(1, round(keep)))


# ---------------------------------------------------------------------------------------------
# Model directory plumbing


def _read(model_dir):
    model_dir = os.fspath(model_dir)
    if not is_model_dir(model_dir):
        raise ConvertError(f"{model_dir}: not an edgellm model directory (no {format.MANIFEST})")
    return format.read_manifest(model_dir)


def _copy_common(model_dir, m, st):
    """Copy the tokenizer and the embedding chunk into the staging directory."""
    st.copy(format.safe_path(model_dir, m["tokenizer"]["file"]), m["tokenizer"]["file"])
    st.copy(format.safe_path(model_dir, format.EMBED_CHUNK), format.EMBED_CHUNK)


def _record(m, step):
    """The manifest's provenance with one more structural step appended."""
    prov = dict(m.get("provenance") or {})
    prov["structural"] = list(prov.get("structural") or []) + [step]
    return prov


def layer_map(m, cfg):
    """Source layer index of every layer (provenance.layer_map, or the identity)."""
    lm = (m.get("provenance") or {}).get("layer_map")
    if isinstance(lm, list) and len(lm) == cfg.n_layers:
        return [int(i) for i in lm]
    return list(range(cfg.n_layers))


# ---------------------------------------------------------------------------------------------
# Layer dropping


def drop_layers(model_dir, dst, drop, overwrite=False, info=None):
    """Write model_dir without the layers `drop` (indices into this model's layers) to dst.
    info: more keys for the provenance record (metric, scores). Returns dst."""
    model_dir = os.fspath(model_dir)
    m, cfg = _read(model_dir)
    drop = sorted(set(int(i) for i in drop))
    if not drop or drop[0] < 0 or drop[-1] >= cfg.n_layers:
        raise ConvertError(f"layers to drop {drop} must be between 0 and {cfg.n_layers - 1}")
    check_drop(len(drop), cfg.n_layers)
    writer.check_destination(dst, overwrite, model_dir)
    kept = [i for i in range(cfg.n_layers) if i not in drop]
    src_map = layer_map(m, cfg)
    out = copy.deepcopy(m)
    out["config"]["n_layers"] = len(kept)
    chunks = [m["chunks"][0]]
    with writer.Staging(dst, overwrite) as st:
        _copy_common(model_dir, m, st)
        for j, i in enumerate(kept):  # the chunk's bytes are unchanged: only its name moves
            st.copy(format.safe_path(model_dir, format.layer_chunk(i)), format.layer_chunk(j))
            chunks.append({**m["chunks"][i + 1], "file": format.layer_chunk(j)})
        out["chunks"] = chunks
        cal = out.get("calibration")
        if isinstance(cal, dict) and isinstance(cal.get("layers"), list):
            recs = [r for r in cal["layers"] if r.get("layer") in kept]
            for r in recs:
                r["source_layer"] = src_map[r["layer"]]
                r["layer"] = kept.index(r["layer"])
            cal["layers"] = recs
        out["provenance"] = _record(m, {"step": "drop_layers", "dropped": drop,
                                        "dropped_source_layers": [src_map[i] for i in drop],
                                        **(info or {})})
        out["provenance"]["layer_map"] = [src_map[i] for i in kept]
        st.write_manifest(out)
        st.commit()
    return dst


def residual_states(model_dir, opts, work=None):
    """Yield the residual stream x_0 .. x_L of the calibration tokens ([N, d] float32 each; x_l
    the input of layer l, x_L the last layer's output), layer by layer, from
    converters/layerwise.py's calibration pass over the weights model_dir holds (exported to a
    float32 Hugging Face directory in a temporary directory, so the pass reads exactly them).
    work: where that directory goes (default: the system's temporary directory; model_dir's
    own parent may be read-only, e.g. the demo model inside an installed package)."""
    from edgellm.export import export

    from . import layerwise

    with tempfile.TemporaryDirectory(prefix="edgellm-layerwise-", dir=work) as tmp:
        hf = os.path.join(tmp, "hf")
        export(model_dir, hf, to="hf", progress=False)
        with layerwise.open_source(hf) as (spec, source, tok):
            seqs = layerwise.sequences(tok, spec.config, text=opts.text, tokens=opts.tokens,
                                       seq_len=opts.seq_len)
            walk = layerwise.Walk(source, spec, seqs)
            for _ in walk.layers():
                yield walk.x  # the input of this layer
            yield walk.x


def drop_scores(model_dir, n, metric, opts):
    """(layers to drop, scores) for dropping n layers of model_dir by metric."""
    _, cfg = _read(model_dir)
    check_drop(n, cfg.n_layers)
    check_metric(metric)
    scores = layer_scores(residual_states(model_dir, opts), n, metric)
    return choose_layers(scores, n, metric), scores


def drop_by_metric(model_dir, dst, n, metric="angular", opts=None, overwrite=False):
    """Measure on calibration text and drop n layers of model_dir into dst. Returns the
    provenance record of the step."""
    t0 = time.perf_counter()
    opts = opts or calibrate.CalibOptions(tokens=4096).check()
    drop, scores = drop_scores(model_dir, n, metric, opts)
    info = {"metric": metric, "n": n, "scores": [round(s, 6) for s in scores],
            "score_meaning": ("angular distance between the inputs of layer l and l+n, per l"
                              if metric == "angular" else
                              "block influence 1 - cos(input, output), per layer"),
            "calibration_text": os.path.basename(opts.text),
            "calibration_tokens_max": opts.tokens,
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("dropping layers %s (%s scores %s)", drop, metric, info["scores"])
    drop_layers(model_dir, dst, drop, overwrite=overwrite, info=info)
    return {"dropped": drop, **info}


# ---------------------------------------------------------------------------------------------
# Neuron pruning


def has_frequencies(m):
    return all("ffn_freq" in c["tensors"] for c in m["chunks"][1:])


def prune_neurons(model_dir, dst, fraction, opts=None, overwrite=False):
    """Write model_dir with `fraction` of every layer's FFN neurons pruned (the least frequently
    needed on the calibration text) to dst. The model is calibrated first (opts: CalibOptions)
    unless its chunks already hold ffn_freq. Returns the provenance record of the step."""
    t0 = time.perf_counter()
    model_dir = os.fspath(model_dir)
    m, cfg = _read(model_dir)
    check_fraction(fraction)
    writer.check_destination(dst, overwrite, model_dir)
    keep = kept_neurons(cfg.d_ff, fraction)
    with writer.Staging(dst, overwrite) as st:
        _copy_common(model_dir, m, st)
        for i in range(cfg.n_layers):
            st.copy(format.safe_path(model_dir, format.layer_chunk(i)), format.layer_chunk(i))
        st.write_manifest(m)  # so that the staged directory reads as a model for calibration
        out = copy.deepcopy(m)
        calibrated = has_frequencies(m)
        if not calibrated:
            opts = opts or calibrate.CalibOptions().check()
            out = calibrate.calibrate(st.tmp, out, cfg, opts, st.write_chunk)
        notes = []
        for i in range(cfg.n_layers):
            out["chunks"][i + 1], note = _prune_chunk(st, out["chunks"][i + 1], cfg, keep)
            if note:
                notes.append(f"layer {i}: {note}")
        out["config"]["d_ff"] = keep
        cal = out.get("calibration")
        if isinstance(cal, dict) and cal.get("predictor"):
            cal["predictor"] = None
            cal["mean_recall"] = None
            notes.append("predictors dropped (trained for the unpruned layers): train them again")
        rec = {"step": "prune_neurons", "fraction": fraction, "d_ff": cfg.d_ff, "kept": keep,
               "criterion": "activation frequency on the calibration text (ffn_freq): the most "
                            "frequently needed neurons are kept",
               "calibrated_here": not calibrated, "notes": notes,
               "seconds": round(time.perf_counter() - t0, 2)}
        out["provenance"] = _record(m, rec)
        st.write_manifest(out)
        st.commit()
    return rec


def _prune_chunk(st, entry, cfg, keep):
    """Rewrite one staged layer chunk keeping its `keep` most frequently needed neurons."""
    from safetensors.numpy import load_file

    path = st.path(entry["file"])
    arrays = load_file(path)
    entries = copy.deepcopy(entry["tensors"])
    freq = arrays["ffn_freq"]
    # rows are hot first after calibration, so this is 0 .. keep-1; with a separate ffn_down
    # the calibration keeps the source order, so pick the rows, in order
    rows = np.sort(np.argsort(-freq, kind="stable")[:keep])
    for name in ("ffn_bundles", "ffn_perm", "ffn_up.bias", "ffn_freq", "ffn_gate"):
        if name in arrays:
            arrays[name] = np.ascontiguousarray(arrays[name][rows])
            entries[name]["shape"][0] = keep
    gate_scales = format.scales_name("ffn_gate")
    if gate_scales in arrays:  # the gate stored apart (calibrate.py): rows as the bundles'
        arrays[gate_scales] = np.ascontiguousarray(arrays[gate_scales][rows])
    note = None
    for name in PREDICTOR:
        entries.pop(name, None)
        arrays.pop(name, None)
    if "ffn_down" in entries:
        note = _prune_down(entries, arrays, rows, cfg.d_model)
    os.remove(path)  # nothing maps the staged file; replace it rather than write over it
    return st.write_chunk(entry["file"], entries, arrays), note


def _prune_down(entries, arrays, rows, d):
    """Keep the columns `rows` of a separate ffn_down matrix [d, d_ff], re-encoded in its own
    encoding when the new width allows it, else f16."""
    e = entries["ffn_down"]
    c = encodings.codec(e["encoding"], e.get("group_size"))
    sname = format.scales_name("ffn_down")
    w = c.dequantize(arrays["ffn_down"], arrays.get(sname))[:, rows]
    n = len(rows)
    note = None
    if hasattr(c, "check"):
        try:
            c.check(n)
        except Exception:
            c, note = encodings.codec("f16"), f"ffn_down: {n} columns do not fill whole blocks of "\
                                               f"{e['encoding']}: f16 instead"
    if c.name in ("f32", "f16"):
        pass
    elif note is None:
        note = f"ffn_down: kept columns re-encoded in {c.name} (re-rounded)"
    q, s, _ = quantize.encode_matrix(lambda r0, r1: w[r0:r1], d, n, c, name="ffn_down")
    arrays.pop(sname, None)
    arrays["ffn_down"] = q
    if s is not None:
        arrays[sname] = s
    entries["ffn_down"] = quantize.entry(c, (d, n))
    return note


def model_bytes(model_dir):
    """Bytes on disk of a model directory's chunks and tokenizer."""
    m, _ = format.read_manifest(model_dir)
    return sum(c["size"] for c in m["chunks"]) + os.path.getsize(
        format.safe_path(model_dir, m["tokenizer"]["file"]))


def copy_model(model_dir, dst, overwrite=False, provenance=None):
    """Copy a model directory to dst (staged, verified), optionally replacing its provenance."""
    m, cfg = _read(model_dir)
    writer.check_destination(dst, overwrite, model_dir)
    with writer.Staging(dst, overwrite) as st:
        _copy_common(model_dir, m, st)
        for i in range(cfg.n_layers):
            st.copy(format.safe_path(model_dir, format.layer_chunk(i)), format.layer_chunk(i))
        if provenance is not None:
            m = {**m, "provenance": provenance}
        st.write_manifest(m)
        st.commit()
    return dst


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# edgellm convert --drop-layers N [--drop-metric M] --prune-neurons F


def convert_structural(src, dst, convert_fn, quant=None, drop_layers=0, drop_metric="angular",
                       prune_fraction=None, predictor=False, calib=None, calib_options=None,
                       overwrite=False, progress=True, command=None, **convert_kw):
    """`edgellm convert` with structural steps: convert src (unless it is already an edgellm
    directory and no quant is asked for; an edgellm directory with a quant is exported to float32
    and converted again), then drop layers, then prune neurons (both measured on the calibration
    text `calib`, default the shipped one, with calib_options), then calibrate when predictor or
    calib is given, each into a work directory next to dst; the result is staged and renamed to
    dst. Returns dst."""
    from .recipe import source_info

    src, dst = os.fspath(src), os.fspath(dst)
    cfg, _ = source_info(src)
    if quant is None and is_model_dir(src) and convert_kw.get("method") not in (None, "rtn"):
        raise ConvertError(f"--method {convert_kw['method']} quantizes: give --quant too")
    if quant is not None and is_model_dir(src) and has_low_rank(_read(src)[0]):
        raise ConvertError(f"{src}: has low-rank projections (--low-rank); --quant {quant} would "
                           "convert it again from a dense export, which multiplies the factors "
                           "back: leave --quant out to keep the model's encodings")
    if drop_layers:
        check_drop(drop_layers, cfg["n_layers"])
        check_metric(drop_metric)
    if prune_fraction is not None:
        check_fraction(prune_fraction)
    final = calibrate.options(predictor, calib, calib_options)
    try:
        opts = calibrate.CalibOptions(text=calib, **{"tokens": 4096, **(calib_options or {})})
    except TypeError as e:
        raise ConvertError(f"calibration options: {e}") from None
    opts.check()
    writer.check_destination(dst, overwrite, src)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".work-", dir=parent)
    try:
        cur = src
        if not is_model_dir(src) or quant is not None:
            cur = os.path.join(work, "converted")
            source = src
            if is_model_dir(src):
                from edgellm.export import export

                source = os.path.join(work, "hf")
                export(src, source, to="hf", progress=False)
            convert_fn(source, cur, quant=quant or "f16", progress=progress, **convert_kw)
        steps = []
        if drop_layers:
            out = os.path.join(work, "dropped")
            steps.append({"step": "drop_layers",
                          **drop_by_metric(cur, out, drop_layers, drop_metric, opts)})
            cur = out
        if prune_fraction is not None:
            out = os.path.join(work, "pruned")
            prune_neurons(cur, out, prune_fraction, opts)
            cur = out
        if final is not None:
            from .recipe import calibrate_model

            out = os.path.join(work, "calibrated")
            calibrate_model(cur, out, final)
            cur = out
        m, _ = format.read_manifest(cur)
        prov = dict(m.get("provenance") or {})
        if command:
            prov["command"] = command
        copy_model(cur, dst, overwrite=overwrite, provenance=prov)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst
