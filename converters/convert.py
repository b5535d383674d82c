"""`edgellm convert`: a Hugging Face checkpoint directory, a GGUF file or an ONNX decoder export
-> an edgellm model directory (format v1). GGUF sources: converters/sources/gguf.py; ONNX:
converters/sources/onnx.py.

Order of work, so that nothing is written for a conversion that cannot succeed:
1. check everything: quantization options, config.json (converters/arch.py), every tensor's
   presence, shape and dtype in the safetensors headers, tokenizer files, the destination;
2. stream: embed.safetensors, then one layer at a time (peak RAM: one layer plus a block of
   embedding rows), each chunk encoded and written to a staging directory;
3. copy the tokenizer, write manifest.json, verify the staged directory with the runtime's reader,
   and rename it into place (converters/writer.py).

>>> convert("hf/TinyLlama-1.1B", "models/tinyllama-int4", quant="int4")  # doctest: +SKIP
'models/tinyllama-int4'
"""

import datetime
import glob
import logging
import os

import numpy as np

from edgellm.runtime import encodings, format
from edgellm.runtime.errors import ConvertError

from . import arch, calibquant, calibrate, quantize, structural, writer
from . import prune as pruning
from .sources import gguf as gguf_source
from .sources import onnx as onnx_source
from .sources.hf import HFSource

log = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"


def converter_version():
    try:
        from importlib.metadata import version

        return version("edgellm")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template


def _is_sentencepiece(path):
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
        return True
    except Exception:  # e.g. Llama 3's tiktoken file, also named tokenizer.model
        return False


def find_tokenizer(src, spec):
    """{"kind", "file", "add_bos"} for the manifest plus the source path of the file."""
    tok_cfg = arch.read_json(os.path.join(src, TOKENIZER_CONFIG), required=False) or {}
    sp = os.path.join(src, "tokenizer.model")
    js = os.path.join(src, "tokenizer.json")
    if os.path.isfile(sp) and _is_sentencepiece(sp):
        kind, path = "sentencepiece", sp
    elif os.path.isfile(js):
        kind, path = "hf", js
    elif os.path.isfile(sp):
        raise ConvertError(f"{sp}: not a sentencepiece model, and there is no tokenizer.json")
    else:
        raise ConvertError(f"{src}: no tokenizer file (tokenizer.model or tokenizer.json)")
    add_bos = _add_bos(tok_cfg, kind, path, spec) and spec.config.bos_token_id is not None
    return {"kind": kind, "file": os.path.basename(path), "add_bos": add_bos}, path, tok_cfg


def _add_bos(tok_cfg, kind, path, spec):
    """Does the source tokenizer prepend BOS? Its own setting first (add_bos_token), then what a
    tokenizer.json's TemplateProcessing does, then the defaults of the tokenizer class and model.
    """
    v = tok_cfg.get("add_bos_token")
    if isinstance(v, bool):
        return v
    if kind == "hf":
        t = _template_starts_with_special(path)
        if t is not None:
            return t
        cls = tok_cfg.get("tokenizer_class") or ""
        if cls.startswith("GPT2") and spec.model_type != "opt":
            return False  # GPT2Tokenizer's add_bos_token defaults to false (e.g. SmolLM)
    return spec.arch.add_bos[spec.model_type]


def _template_starts_with_special(path):
    """True/False when tokenizer.json's post-processor is a TemplateProcessing (possibly inside
    a Sequence) whose single-sequence template does / does not begin with a special token; None
    when there is no template."""
    tok = arch.read_json(path)
    pp = tok.get("post_processor") if isinstance(tok, dict) else None
    procs = pp.get("processors", []) if isinstance(pp, dict) and pp.get("type") == "Sequence" \
        else [pp]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return None


def find_chat_template(src, tok_cfg):
    """The chat template: chat_template.jinja (newer transformers), chat_template.json, or the
    chat_template key of tokenizer_config.json (a string, or a list of named templates)."""
    jinja = os.path.join(src, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{jinja}: cannot read ({e})") from None
    cj = arch.read_json(os.path.join(src, "chat_template.json"), required=False)
    tmpl = cj.get("chat_template") if isinstance(cj, dict) else tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default", next(iter(named.values()), None))
    if tmpl is not None and not isinstance(tmpl, str):
        raise ConvertError(f"{os.path.join(src, TOKENIZER_CONFIG)}: chat_template must be a "
                           "string")
    return tmpl


# ---------------------------------------------------------------------------------------------
# Chunks


def _is_vector(canonical):
    return canonical.endswith((".weight", ".bias"))


class _Encoder:
    """Encodes canonical tensors from the source, collecting the quantization report."""

    def __init__(self, source, spec, quant, group_size):
        self.source, self.spec = source, spec
        self.quant, self.group_size = quant, group_size
        self.errors = {}  # "chunk/tensor" -> {encoding, max_abs_error, max_abs}
        self.fallbacks = {}  # "chunk/tensor" -> reason
        self.layer = None  # a layerwise.Layer quantized by calibquant: its weights, as encoded
        self.down_matrix = False  # --ffn-down matrix: W_down as a matrix of its own (§3.2)

    def vector(self, hf_name):
        return np.ascontiguousarray(self.source.read(hf_name), dtype=np.float32)

    def add(self, entries, arrays, chunk, canonical, hf_name):
        """Encode one canonical tensor into entries/arrays."""
        shape = self.spec.shape(canonical)
        if _is_vector(canonical):
            entries[canonical] = quantize.vector_entry(shape)
            arrays[canonical] = (self.vector(hf_name) if self.layer is None
                                 else self.layer.weights[canonical])
            return
        n, d = shape
        if canonical == "pos_embeddings":
            c, note = encodings.codec("f32"), None
        elif self.quant == quantize.KEEP:
            return self._add_kept(entries, arrays, chunk, canonical, hf_name, n, d)
        else:
            c, note = quantize.matrix_codec(self.quant, self.group_size, d)
            if isinstance(self.source, pruning.PrunedSource) and canonical in pruning.LINEARS:
                c = self.source.codec(c, d)
        key = f"{chunk}/{canonical}"
        if note:
            self.fallbacks[key] = note
            log.info("%s: %s", key, note)
        if self.layer is not None and canonical in getattr(self.layer, "lowrank", {}):
            return self._add_lowrank(entries, arrays, chunk, canonical)
        if self.layer is not None and canonical in self.layer.encoded:  # --method gptq, awq
            c, q, s = self.layer.encoded[canonical]
            stats = calibquant.stats(self.layer, canonical)
        else:
            q, s, stats = quantize.encode_matrix(
                lambda r0, r1: self.source.read(hf_name, rows=(r0, r1)), n, d, c, name=hf_name)
        entries[canonical] = quantize.entry(c, shape)
        arrays[canonical] = q
        if s is not None:
            arrays[format.scales_name(canonical)] = s
        self._record(key, c.name, stats)

    def _add_lowrank(self, entries, arrays, chunk, canonical):
        """A projection factorized by converters/lowrank.py: its two factors (FORMAT.md §3.4),
        each encoded like any matrix of --quant (or as GPTQ encoded them: lowrank_encoded)."""
        done = getattr(self.layer, "lowrank_encoded", {}).get(canonical)
        for k, (part, w) in enumerate(zip((".left", ".right"), self.layer.lowrank[canonical])):
            n, d = w.shape
            c, note = quantize.matrix_codec(self.quant, self.group_size, d)
            key = f"{chunk}/{canonical}{part}"
            if note:
                self.fallbacks[key] = note
            if done is not None:  # w holds the decoded values of these codes
                c, q, s, stats = done[k]
            else:
                q, s, stats = quantize.encode_matrix(lambda r0, r1: w[r0:r1], n, d, c, name=key)
            entries[canonical + part] = quantize.entry(c, (n, d))
            arrays[canonical + part] = q
            if s is not None:
                arrays[format.scales_name(canonical + part)] = s
            self._record(key, c.name, stats)

    def _keep_codec(self, hf_name):
        enc, g, kept = self.source.keep_encoding(hf_name)
        return encodings.codec(enc, g), kept

    def _kept_matrix(self, hf_name, n, d, c, key):
        """A GGUF tensor in its kept encoding (blocks regrouped, not re-rounded); the error
        recorded is measured against gguf's own dequantization, so it shows 0 when exact."""
        q = np.empty(c.data_shape(n, d), dtype=c.data_dtype())
        s = np.empty(c.scale_shape(n, d), dtype=c.scale_dtype())
        err = peak = 0.0
        step = max(1, quantize.BLOCK_VALUES // max(d, 1))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            q[r0:r1], s[r0:r1] = self.source.read_kept(hf_name, rows=(r0, r1))
            x = self.source.read(hf_name, rows=(r0, r1))
            err = max(err, float(np.abs(c.dequantize(q[r0:r1], s[r0:r1]) - x).max(initial=0)))
            peak = max(peak, float(np.abs(x).max(initial=0)))
        self._record(key, c.name, {"max_abs_error": err, "max_abs": peak})
        return q, s

    def _encoded(self, hf_name, n, d, key, read_rows=None):
        """(codec, q, s) of a matrix under --quant keep: kept blocks, or the nearest encoding."""
        c, kept = self._keep_codec(hf_name)
        if kept:
            return (c,) + self._kept_matrix(hf_name, n, d, c, key)
        if c.name == "q8_0" and d % encodings.GGML_BLOCK:
            c = encodings.codec("f32")
        self.fallbacks[key] = f"GGUF type {self.source.info(hf_name)[1]} -> {c.name}"
        read_rows = read_rows or (lambda r0, r1: self.source.read(hf_name, rows=(r0, r1)))
        q, s, stats = quantize.encode_matrix(read_rows, n, d, c, name=hf_name)
        self._record(key, c.name, stats)
        return c, q, s

    def _add_kept(self, entries, arrays, chunk, canonical, hf_name, n, d):
        c, q, s = self._encoded(hf_name, n, d, f"{chunk}/{canonical}")
        entries[canonical] = quantize.entry(c, (n, d))
        arrays[canonical] = q
        if s is not None:
            arrays[format.scales_name(canonical)] = s

    def kept_bundles(self, entries, arrays, chunk, names):
        """--quant keep: gate and up rows in their GGUF blocks; the down projection, whose
        blocks run along d_ff rather than along a column, becomes a matrix of its own
        (`ffn_down`, docs/FORMAT.md) when kept, else its columns join the bundles."""
        cfg = self.spec.config
        d, n = cfg.d_model, cfg.d_ff
        separate = self._keep_codec(names["ffn_down"])[1]
        parts, encoded = [], {}
        for p in self.spec.arch.ffn_parts:
            if p == "down" and separate:
                continue
            key = f"{chunk}/ffn_bundles.{p}"
            if p == "down":
                down = self.source.read(names["ffn_down"])
                c, q, s = self._encoded(names["ffn_down"], n, d, key,
                                        lambda r0, r1: down[:, r0:r1].T)
                del down
            else:
                c, q, s = self._encoded(names["ffn_" + p], n, d, key)
            parts.append((p, c))
            encoded[p] = (q, s)
        b, layout = encodings.pack_encoded_bundles(encoded, parts, d)
        del encoded
        entries["ffn_bundles"] = {"encoding": "bundle", "shape": list(b.shape),
                                  "group_size": None, "parts": layout}
        arrays["ffn_bundles"] = b
        # identity: the columns of a separate ffn_down are in source order too
        entries["ffn_perm"] = {"encoding": "i32", "shape": [n], "group_size": None}
        arrays["ffn_perm"] = np.arange(n, dtype=np.int32)
        if separate:
            self._add_kept(entries, arrays, chunk, "ffn_down", names["ffn_down"], d, n)

    def bundles(self, entries, arrays, chunk, names):
        cfg = self.spec.config
        d = cfg.d_model
        if self.layer is not None and "ffn_up" in self.layer.encoded:  # --method gptq, awq:
            # the parts as calibquant encoded them (a low-rank layer's FFN is read as usual)
            parts = [(p, self.layer.encoded["ffn_" + p][0]) for p in self.spec.arch.ffn_parts]
            b, layout = encodings.pack_encoded_bundles(
                {p: self.layer.encoded["ffn_" + p][1:] for p, _ in parts}, parts, d)
            for p, c in parts:
                self._record(f"{chunk}/ffn_bundles.{p}", c.name,
                             calibquant.stats(self.layer, "ffn_" + p))
            return self._bundle_entries(entries, arrays, b, layout)
        # gate/up (fc1) rows are read a block at a time; down (fc2) is [d, d_ff] and bundle row i
        # holds its column i, so it is read whole and sliced. With down_matrix it is written as
        # the matrix `ffn_down` instead, quantized along d_ff: decode then multiplies it as a
        # matvec against int8-quantized hidden activations (docs/FORMAT.md §3.2)
        parts = [p for p in self.spec.arch.ffn_parts if not (self.down_matrix and p == "down")]
        down = None if self.down_matrix else self.source.read(names["ffn_down"])

        def read_rows(part, r0, r1):
            if part == "down":
                return down[:, r0:r1].T
            return self.source.read(names["ffn_" + part], rows=(r0, r1))

        c, note = quantize.bundle_codec(self.quant, self.group_size, d)
        key = f"{chunk}/ffn_bundles"
        if note:
            self.fallbacks[key] = note
            log.info("%s: %s", key, note)
        b, layout, stats = quantize.encode_bundles(read_rows, parts, c, cfg.d_ff, d,
                                                   name=f"{chunk} FFN")
        del down
        for part, st in stats.items():
            self._record(f"{key}.{part}", c.name, st)
        self._bundle_entries(entries, arrays, b, layout)
        if self.down_matrix:
            self.add(entries, arrays, chunk, "ffn_down", names["ffn_down"])

    def _bundle_entries(self, entries, arrays, b, layout):
        cfg = self.spec.config
        entries["ffn_bundles"] = {"encoding": "bundle", "shape": list(b.shape),
                                  "group_size": None, "parts": layout}
        arrays["ffn_bundles"] = b
        perm = np.arange(cfg.d_ff, dtype=np.int32)  # identity: no hot-first reordering yet
        entries["ffn_perm"] = {"encoding": "i32", "shape": [cfg.d_ff], "group_size": None}
        arrays["ffn_perm"] = perm

    def _record(self, key, enc, stats):
        self.errors[key] = {"encoding": enc, **stats}
        log.debug("%-32s %-5s max|w| %.4g  max|err| %.3g", key, enc, stats["max_abs"],
                  stats["max_abs_error"])

    def embed_chunk(self):
        entries, arrays = {}, {}
        for canonical, hf in self.spec.global_tensors().items():
            self.add(entries, arrays, format.EMBED_CHUNK, canonical, hf)
        return entries, arrays

    def layer_chunk(self, i, layer=None):
        """Layer i from the source, or from `layer` (a layerwise.Layer that calibquant
        quantized: its vectors and encoded matrices as they are)."""
        self.layer = layer
        try:
            return self._layer_chunk(i)
        finally:
            self.layer = None

    def _layer_chunk(self, i):
        chunk = format.layer_chunk(i)
        names = self.spec.layer_tensors(i)
        entries, arrays = {}, {}
        for canonical, hf in names.items():
            if canonical in ("ffn_gate", "ffn_up", "ffn_down"):
                continue
            self.add(entries, arrays, chunk, canonical, hf)
        if self.quant == quantize.KEEP:
            self.kept_bundles(entries, arrays, chunk, names)
        elif isinstance(self.source, pruning.PrunedSource):
            pruning.encode_ffn(self, entries, arrays, chunk, names)
        else:
            self.bundles(entries, arrays, chunk, names)
        return entries, arrays


# ---------------------------------------------------------------------------------------------


def convert(src, dst, quant="f16", group_size=32, progress=True, overwrite=False, command=None,
            predictor=False, calib=None, calib_options=None, drop_layers=0,
            drop_metric="angular", prune_neurons=None, method="rtn", method_options=None, prune=None,
            ffn_down="auto", low_rank=None):
    """Convert the Hugging Face model directory src into the edgellm model directory dst.

    quant: f32 | f16 | int8 | int4 (int4 uses groups of group_size values per scale; a matrix
    whose row length is not a multiple falls back to int8, recorded in the manifest), or keep
    (GGUF sources only: Q8_0, Q4_0, Q4_1 tensors stored as they are, other types in the nearest
    encoding, see sources/gguf.py).
    overwrite: replace an existing dst (only an edgellm model directory), after the new one has
    been verified. Returns dst. Raises ConvertError (before writing anything) for an unsupported
    or incomplete source.
    calib: a text file to calibrate on (activation frequencies, hot-first neuron order, SiLU
    thresholds); predictor=True also trains low-rank neuron predictors (on the shipped calibration
    text when calib is None); calib_options: more calibrate.CalibOptions fields as a dict.
    drop_layers, drop_metric, prune_neurons: structural compression (converters/structural.py):
    drop this many layers chosen by angular distance or block influence ("bi"), prune this
    fraction of every layer's FFN neurons; src may then also be an edgellm model directory
    (quant=None keeps its encodings).
    method: rtn (round to nearest, the default), or gptq / awq for quant int4 (gptq also int3):
    calibrated quantization on the calib text (default: the shipped one), converters/calibquant.py;
    method_options: more calibquant.Options fields as a dict (tokens, seq_len, damp, act_order,
    clip).
    prune: a prune.PruneOptions (prune.options()): magnitude / Wanda / SparseGPT pruning of every
    layer's linears to 2:4 or 50%, stored in the sparse encodings (converters/prune.py).
    ffn_down: "bundle" stores each neuron's down column in its bundle row, which window and naive
    streaming read; "matrix" stores W_down as a matrix of its own (`ffn_down`, docs/FORMAT.md
    §3.2): decode multiplies it with int8 activations, 1.5-2x faster than adding down columns
    (docs/PERFORMANCE.md); dense streaming takes it, window and naive refuse it. Written by the
    plain quantizer (--method rtn, no pruning or structural steps) of a Hugging Face checkpoint,
    an ONNX export or a GGUF file re-quantized. "auto" (default): matrix where it can be written
    and no calibration is asked for (predictors and thresholds serve the neuron-reading modes),
    else bundle.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    structural_op = drop_layers or prune_neurons is not None or structural.is_model_dir(src)
    ffn_down = _ffn_down_layout(ffn_down, src, quant, method, prune, structural_op,
                                calibrated=bool(predictor) or calib is not None)
    if structural_op:
        if low_rank is not None:
            raise ConvertError("--low-rank takes a Hugging Face or GGUF source, without "
                               "--drop-layers/--prune-neurons")
        if quant is not None:
            quantize.check_quant(quant, group_size)
        return structural.convert_structural(
            src, dst, convert, quant=quant, drop_layers=drop_layers, drop_metric=drop_metric,
            prune_fraction=prune_neurons, predictor=predictor, calib=calib,
            calib_options=calib_options, overwrite=overwrite, progress=progress, command=command,
            group_size=group_size, method=method, method_options=method_options,
            ffn_down="bundle")  # its steps re-encode a down matrix's kept columns (re-rounded)
    quant = quant or "f16"
    quantize.check_quant(quant, group_size)
    cq = calibquant.options(method, quant, group_size, calib, method_options, low_rank)
    pruning.check_compatible(prune, quant, method, hot_order=predictor or calib is not None)
    calib = calibrate.options(predictor, calib, calib_options)
    if gguf_source.is_gguf(src):
        return _convert_gguf(src, dst, quant, group_size, progress, overwrite, command, calib, cq,
                             prune, ffn_down)
    onnx_file = onnx_source.find_onnx(src)
    if onnx_file is not None and quant != quantize.KEEP:
        return _convert_onnx(onnx_file, dst, quant, group_size, progress, overwrite, command,
                             calib, cq, prune, ffn_down)
    if quant == quantize.KEEP:
        raise ConvertError(f"{src}: --quant keep stores a GGUF file's quantized blocks as they "
                           "are; this source is not a GGUF file (choose f32, f16, int8 or int4)")
    spec = arch.from_hf_dir(src)
    with HFSource(src, optional_prefixes=arch.OPTIONAL_PREFIXES) as source:
        _check_tensors(source, spec)
        tokenizer, tok_path, tok_cfg = find_tokenizer(src, spec)
        chat_template = find_chat_template(src, tok_cfg)
        writer.check_destination(dst, overwrite, src)
        walk = calibquant.prepare(cq, spec, source, tokenizer, path=tok_path, progress=progress)
        _write(src, dst, spec, source, tokenizer,
               lambda st: st.copy(tok_path, tokenizer["file"]), chat_template, quant,
               group_size, progress, overwrite, command, calib=calib, walk=walk, cq=cq, prune=prune,
               ffn_down=ffn_down)
    return dst


FFN_DOWN = ("auto", "bundle", "matrix")


def _ffn_down_layout(ffn_down, src, quant, method, prune, structural_op, calibrated):
    """"bundle" or "matrix" for convert(ffn_down=...): the matrix is written by the plain quantizer
    of a Hugging Face checkpoint, an ONNX export or a re-quantized GGUF file; the other paths
    encode the down projection themselves (kept GGUF blocks choose on their own)."""
    if ffn_down not in FFN_DOWN:
        raise ConvertError(f"ffn_down must be one of {', '.join(FFN_DOWN)}, got {ffn_down!r}")
    if ffn_down == "bundle":
        return ffn_down
    other = ("--quant keep (it stores ffn_down as a matrix when it keeps a GGUF file's blocks)"
             if quant == quantize.KEEP else
             "--drop-layers, --prune-neurons or an edgellm source" if structural_op else
             f"--method {method}" if method not in (None, "rtn") else
             "--prune" if prune is not None else None)
    if other is None and not gguf_source.is_gguf(src) and onnx_source.find_onnx(src) is None \
            and not glob.glob(os.path.join(glob.escape(src), "*.safetensors")):
        other = "a source that is not a Hugging Face checkpoint, a GGUF file or an ONNX export"
    if ffn_down == "auto":
        return "bundle" if other is not None or calibrated else "matrix"
    if other is not None:
        raise ConvertError(f"{src}: --ffn-down matrix is written by the plain quantizer (--method "
                           f"rtn) of a Hugging Face checkpoint, GGUF file or ONNX export; not "
                           f"with {other}")
    return ffn_down


def ffn_down_note(dst):
    """One line for the user on where the converted model keeps its FFN down projection."""
    m, _ = format.read_manifest(dst)
    layers = [c["tensors"] for c in m["chunks"] if "ffn_bundles" in c["tensors"]]
    if layers and "ffn_down" in layers[0]:
        return ("FFN down projection: a matrix apart (the fast resident layout; dense streaming "
                "takes it, --mode window/naive need --ffn-down bundle)")
    return "FFN down projection: in the bundle rows (--mode window/naive can stream neurons)"


def _convert_gguf(src, dst, quant, group_size, progress, overwrite, command, calib=None,
                  cq=None, prune=None, ffn_down="bundle"):
    """A GGUF file: same table, quantizer and writer; tokenizer.json built from its vocabulary."""
    with gguf_source.GGUFSource(src) as source:
        spec = source.spec()
        _check_tensors(source, spec)
        kind, file, data, add_bos, chat_template = source.tokenizer()
        tokenizer = {"kind": kind, "file": file,
                     "add_bos": bool(add_bos and spec.config.bos_token_id is not None)}
        writer.check_destination(dst, overwrite, src)
        walk = calibquant.prepare(cq, spec, source, tokenizer, data=data, progress=progress)

        def write_tokenizer(st):
            with open(st.path(file), "wb") as f:
                f.write(data)

        _write(source.path, dst, spec, source, tokenizer, write_tokenizer, chat_template, quant,
               group_size, progress, overwrite, command,
               extra={"source_format": "gguf", "source_architecture": source.arch},
               calib=calib, walk=walk, cq=cq, prune=prune, ffn_down=ffn_down)
    return dst


def _convert_onnx(src, dst, quant, group_size, progress, overwrite, command, calib=None,
                  cq=None, prune=None, ffn_down="bundle"):
    """An ONNX decoder export (sources/onnx.py): config.json and the tokenizer files lie next to
    the .onnx file, as optimum writes them; the weights come from the graph's initializers."""
    folder = os.path.dirname(os.path.abspath(src))
    spec = arch.from_hf_dir(folder)
    with onnx_source.ONNXSource(src, spec) as source:
        _check_tensors(source, spec)
        tokenizer, tok_path, tok_cfg = find_tokenizer(folder, spec)
        chat_template = find_chat_template(folder, tok_cfg)
        writer.check_destination(dst, overwrite, src)
        walk = calibquant.prepare(cq, spec, source, tokenizer, path=tok_path, progress=progress)
        _write(source.path, dst, spec, source, tokenizer,
               lambda st: st.copy(tok_path, tokenizer["file"]), chat_template, quant,
               group_size, progress, overwrite, command, extra={"source_format": "onnx"},
               calib=calib, walk=walk, cq=cq, prune=prune, ffn_down=ffn_down)
    return dst


def _check_tensors(source, spec):
    """Everything the conversion will read must exist with the right shape, before we write."""
    for canonical, name in spec.global_tensors().items():
        source.check(name, spec.shape(canonical))
    for i in range(spec.config.n_layers):
        for canonical, name in spec.layer_tensors(i).items():
            source.check(name, spec.shape(canonical))


def _write(src, dst, spec, source, tokenizer, write_tokenizer, chat_template, quant, group_size,
           progress, overwrite, command, extra=None, calib=None, walk=None, cq=None,
           prune=None, ffn_down="bundle"):
    """Stream the chunks into a staging directory, add tokenizer and manifest, verify, rename.
    walk: a layerwise.Walk over the source for calibquant (cq) to quantize layer by layer."""
    cfg = spec.config
    layers = calibquant.layers(walk, cq) if walk is not None else None
    reports = []
    for note in spec.notes:
        log.info("%s", note)
    if prune is not None:  # layer linears read pruned (converters/prune.py)
        source = pruning.PrunedSource(source, spec, prune, progress=progress)

    enc = _Encoder(source, spec, quant, group_size)
    enc.down_matrix = ffn_down == "matrix"
    from tqdm.auto import tqdm

    chunks = []
    with writer.Staging(dst, overwrite) as st, \
            tqdm(total=cfg.n_layers + 1, desc="convert", unit="chunk",
                 disable=not progress) as bar:
        write_tokenizer(st)
        if prune is not None:
            source.start(st, tokenizer)
        entries, arrays = enc.embed_chunk()
        chunks.append(st.write_chunk(format.EMBED_CHUNK, entries, arrays))
        del entries, arrays
        bar.update(1)
        for i in range(cfg.n_layers):
            layer = next(layers) if layers is not None else None
            entries, arrays = enc.layer_chunk(i, layer)
            if layer is not None:
                reports.append(layer.report)
            del layer
            chunks.append(st.write_chunk(format.layer_chunk(i), entries, arrays))
            del entries, arrays
            bar.update(1)
        calibration = None
        if calib is not None:  # measures the staged model, rewrites its layer chunks
            chunks, calibration = calibrate.run(st, cfg, tokenizer, chunks, calib, progress)
        provenance = {
            "source": os.path.abspath(src),
            "source_model_type": spec.model_type,
            "source_dtypes": source.dtypes(),
            **(extra or {}),
            "converter_version": converter_version(),
            "command": command or _command(src, dst, quant, group_size, cq),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "notes": list(spec.notes),
            "quantization": {"quant": quant,
                             "group_size": group_size if quant in quantize.GROUPED else None,
                             "method": "rtn" if cq is None else cq.method,
                             **({} if cq is None else {"calibrated": calibquant.record(
                                 cq, walk, reports)}),
                             **({} if prune is None else {"pruning": source.report()}),
                             "fallbacks": enc.fallbacks,
                             "tensors": enc.errors},
        }
        st.write_manifest({
            "format": format.FORMAT_NAME,
            "version": format.VERSION,
            "config": cfg.to_dict(),
            "tokenizer": tokenizer,
            "chat_template": chat_template,
            "chunks": chunks,
            "provenance": provenance,
            **({"calibration": calibration} if calibration else {}),
            **({"activation_quant": calibquant.activation_quant(cq)}
               if calibquant.activation_quant(cq) else {}),
        })
        st.commit()
    worst = max(enc.errors.items(), key=lambda kv: kv[1]["max_abs_error"], default=None)
    if worst is not None and worst[1]["max_abs_error"] > 0:
        log.info("largest quantization error: %s %.3g (max|w| %.3g)", worst[0],
                 worst[1]["max_abs_error"], worst[1]["max_abs"])


def _command(src, dst, quant, group_size, cq=None):
    cmd = f"edgellm convert {src} -o {dst} --quant {quant}"
    cmd += f" --group-size {group_size}" if quant in quantize.GROUPED else ""
    return cmd + (f" --method {cq.method}" if cq is not None else "")
