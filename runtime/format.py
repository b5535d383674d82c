"""The edgellm on-disk format, version 1: manifest schema, chunk naming and validation.

docs/FORMAT.md is the prose spec; this module is its one executable definition, used by the
writer (converters/writer.py) and the reader (runtime/reader.py). Nothing is trusted before it is
checked: a bad manifest, a truncated chunk or a chunk header that disagrees with the manifest is a
FormatError naming the file.
"""

import json
import os
import struct

import numpy as np

from . import encodings
from .config import ModelConfig
from .errors import EdgeLLMError, FormatError

FORMAT_NAME = "edgellm"
VERSION = 1
MANIFEST = "manifest.json"
EMBED_CHUNK = "embed.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # same bound the safetensors library uses

# safetensors dtype names <-> numpy
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I32": np.int32}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}

RAW_ENCODINGS = ("i32", "i8")  # stored as-is, no codec (e.g. the neuron permutation; i8: the
# int8 codes of TEAL's input columns, §3.5)
TOKENIZER_KINDS = ("sentencepiece", "hf")


def layer_chunk(i):
    return f"layer_{i:03d}.safetensors"


def scales_name(name):
    return name + ".scales"


# ---------------------------------------------------------------------------------------------
# What a tensor entry in the manifest says it stores


def stored_tensors(name, entry):
    """The safetensors tensors (name -> (numpy dtype, shape)) that a manifest tensor entry implies."""
    enc, shape = entry["encoding"], tuple(entry["shape"])
    if enc == "i32":
        return {name: (np.dtype(np.int32), shape)}
    if enc == "i8":
        return {name: (np.dtype(np.int8), shape)}
    if enc == "bundle":
        return {name: (np.dtype(np.uint8), shape)}
    c = encodings.codec(enc, entry.get("group_size"))
    if len(shape) == 1:
        if enc not in ("f32", "f16"):
            raise EdgeLLMError(f"vector {name} must be f32 or f16, got {enc}")
        return {name: (c.data_dtype(), shape)}
    n, d = shape
    if enc == "int4" and entry.get("group_size") is None:
        raise EdgeLLMError("int4 needs a group_size")
    if hasattr(c, "check"):  # int4, q8_0, q4_1: whole blocks per row
        c.check(d)
    out = {name: (c.data_dtype(), tuple(c.data_shape(n, d)))}
    if c.scale_shape(n, d) is not None:
        out[scales_name(name)] = (c.scale_dtype(), tuple(c.scale_shape(n, d)))
    return out


# ---------------------------------------------------------------------------------------------
# Paths


def safe_path(model_dir, file_name, manifest_path=None):
    """Resolve a file named by the manifest, refusing anything that leaves the model directory."""
    where = manifest_path or os.path.join(model_dir, MANIFEST)
    if (not isinstance(file_name, str) or not file_name or "/" in file_name or "\\" in file_name
            or file_name in (".", "..") or "\x00" in file_name):
        raise FormatError(where, f"file name {file_name!r} must be a plain name inside the model "
                                 "directory")
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(root, file_name))
    if os.path.dirname(path) != root:
        raise FormatError(where, f"file {file_name!r} points outside the model directory")
    return path


# ---------------------------------------------------------------------------------------------
# Manifest


def read_manifest(model_dir):
    """Read and validate manifest.json; returns (manifest dict, ModelConfig)."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FormatError(model_dir, "not a model directory (convert a model with `edgellm "
                                     "convert SRC -o DIR`)")
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FormatError(path, "missing: this is not an edgellm model directory")
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"not valid JSON ({e})") from None
    cfg = validate_manifest(m, model_dir, path)
    return m, cfg


def validate_manifest(m, model_dir, path):
    """Check the manifest's structure (not the chunk files). Returns the ModelConfig."""
    if not isinstance(m, dict):
        raise FormatError(path, "manifest must be a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise FormatError(path, f"format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("version") != VERSION:
        raise FormatError(path, f"format version {m.get('version')!r} is not supported by this "
                                f"edgellm (it reads version {VERSION}); upgrade edgellm or "
                                "reconvert the model")
    cfg = ModelConfig.from_dict(m.get("config"), path)

    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("kind") not in TOKENIZER_KINDS:
        raise FormatError(path, f"tokenizer must be an object with kind in {TOKENIZER_KINDS}")
    tok_path = safe_path(model_dir, tok.get("file"), path)
    if not os.path.isfile(tok_path):
        raise FormatError(tok_path, "tokenizer file named in the manifest is missing")
    tmpl = m.get("chat_template")
    if tmpl is not None and not isinstance(tmpl, str):
        raise FormatError(path, "chat_template must be a string or null")

    chunks = m.get("chunks")
    # the count first: n_layers comes from the file, and a list of a billion names is an OOM
    if not isinstance(chunks, list) or len(chunks) != cfg.n_layers + 1 or \
            [c.get("file") if isinstance(c, dict) else None for c in chunks] != \
            [EMBED_CHUNK] + [layer_chunk(i) for i in range(cfg.n_layers)]:
        raise FormatError(path, f"chunks must list {EMBED_CHUNK} then {cfg.n_layers} layer chunks "
                                "in order")
    for c in chunks:
        safe_path(model_dir, c["file"], path)
        if not isinstance(c.get("size"), int) or c["size"] < 8:
            raise FormatError(path, f"chunk {c['file']}: size must be an integer >= 8")
        sha = c.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
            raise FormatError(path, f"chunk {c['file']}: sha256 must be 64 lowercase hex digits")
        tensors = c.get("tensors")
        if not isinstance(tensors, dict) or not tensors:
            raise FormatError(path, f"chunk {c['file']}: tensors must be a non-empty object")
        for name, entry in tensors.items():
            _check_entry(path, c["file"], name, entry)
    for c in chunks:
        _check_against_config(path, c, cfg)
    return cfg


def _check_entry(path, chunk, name, entry):
    where = f"chunk {chunk}, tensor {name}"
    if not isinstance(entry, dict):
        raise FormatError(path, f"{where}: entry must be an object")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise FormatError(path, f"{where}: shape must be 1 or 2 positive integers")
    enc = entry.get("encoding")
    if enc == "bundle":
        parts = entry.get("parts")
        if not isinstance(parts, list) or not parts:
            raise FormatError(path, f"{where}: bundle needs a list of parts")
        for p in parts:
            if not isinstance(p, dict) or p.get("encoding") not in encodings.NAMES:
                raise FormatError(path, f"{where}: bad bundle part {p!r}")
        return
    if enc not in encodings.NAMES and enc not in RAW_ENCODINGS:
        raise FormatError(path, f"{where}: unknown encoding {enc!r}")
    try:
        stored_tensors(name, entry)
    except EdgeLLMError as e:
        raise FormatError(path, f"{where}: {e}") from None


def expected_tensors(cfg, file):
    """{name: (allowed encodings, shape)} every chunk of a model with this config must hold.
    A shape of None is checked elsewhere (bundles); a leading None means "at least"."""
    d, vec = cfg.d_model, ("f32",)
    mat = encodings.NAMES
    if file == EMBED_CHUNK:
        out = {"tok_embeddings": (mat, [cfg.vocab_size, d]), "norm.weight": (vec, [d])}
        if cfg.norm == "layer":
            out["norm.bias"] = (vec, [d])
        if not cfg.tied_embeddings:
            out["output"] = (mat, [cfg.vocab_size, d])
        if cfg.positions == "learned":
            out["pos_embeddings"] = (vec, [cfg.max_context + cfg.pos_offset, d])
        return out
    out = {"attn_q": (mat, [cfg.q_dim, d]), "attn_k": (mat, [cfg.kv_dim, d]),
           "attn_v": (mat, [cfg.kv_dim, d]), "attn_o": (mat, [d, cfg.q_dim]),
           "ffn_bundles": (("bundle",), None), "ffn_perm": (("i32",), [cfg.d_ff])}
    for norm in ("attn_norm", "ffn_norm"):
        out[norm + ".weight"] = (vec, [d])
        if cfg.norm == "layer":
            out[norm + ".bias"] = (vec, [d])
    if cfg.qkv_bias:
        out.update({"attn_q.bias": (vec, [cfg.q_dim]), "attn_k.bias": (vec, [cfg.kv_dim]),
                    "attn_v.bias": (vec, [cfg.kv_dim])})
    if cfg.o_bias:
        out["attn_o.bias"] = (vec, [d])
    if cfg.ffn_bias:
        out.update({"ffn_up.bias": (vec, [cfg.d_ff]), "ffn_down.bias": (vec, [d])})
    return out


def calibration_tensors(path, cfg, file, tensors):
    """The optional calibration tensors (docs/FORMAT.md §3.3) present in a layer chunk:
    {name: (allowed encodings, shape)}. A predictor comes whole (a, b, bias and one of threshold
    or top_k) or not at all."""
    if file == EMBED_CHUNK:
        return {}
    d, n = cfg.d_model, cfg.d_ff
    pred = ("ffn_pred.a", "ffn_pred.b", "ffn_pred.bias")
    has = [k in tensors for k in pred]
    select = [k for k in ("ffn_pred.threshold", "ffn_pred.top_k") if k in tensors]
    if (any(has) or select) and not (all(has) and len(select) == 1):
        raise FormatError(path, f"chunk {file}: an FFN predictor needs {', '.join(pred)} and "
                                "exactly one of ffn_pred.threshold, ffn_pred.top_k")
    out = {"ffn_freq": (("f32",), [n]), "ffn_act_threshold": (("f32",), [1])}
    if all(has):
        shape = tensors["ffn_pred.a"].get("shape")
        r = shape[0] if isinstance(shape, list) and shape else None
        out.update({"ffn_pred.a": (encodings.NAMES, [r, d]),
                    "ffn_pred.b": (encodings.NAMES, [n, r]),
                    "ffn_pred.bias": (("f32",), [n]), "ffn_pred.threshold": (("f32",), [1]),
                    "ffn_pred.top_k": (("i32",), [1])})
    return {k: v for k, v in out.items() if k in tensors}


LOWRANK = ("attn_q", "attn_k", "attn_v", "attn_o")  # projections that may be stored as factors


def lowrank_tensors(path, file, tensors, want):
    """Attention projections stored as two factors (docs/FORMAT.md §3.4): P [n, d] replaced by
    P.left [n, r] and P.right [r, d], 1 <= r <= min(n, d). Removes P from want; returns the
    factors' {name: (allowed encodings, shape)}."""
    out = {}
    for p in LOWRANK:
        if p + ".left" not in tensors and p + ".right" not in tensors:
            continue
        encs, (n, d) = want.pop(p)
        e = tensors.get(p + ".right") or tensors[p + ".left"]
        shape = e.get("shape") if isinstance(e, dict) else None
        r = (shape[0] if p + ".right" in tensors else shape[1]) \
            if isinstance(shape, list) and len(shape) == 2 else None
        if not isinstance(r, int) or not 1 <= r <= min(n, d):
            raise FormatError(path, f"chunk {file}: low-rank {p} has rank {r!r}; it must be an "
                                    f"integer in 1 … {min(n, d)}")
        out[p + ".left"] = (encs, [n, r])
        out[p + ".right"] = (encs, [r, d])
    return out


def bundle_parts(cfg):
    return ("gate", "up", "down") if cfg.gated_ffn else ("up", "down")


def _check_against_config(path, chunk, cfg):
    file, tensors = chunk["file"], chunk["tensors"]
    want = expected_tensors(cfg, file)
    want.update(calibration_tensors(path, cfg, file, tensors))
    if file != EMBED_CHUNK and "ffn_down" in tensors:  # down as a matrix, not in the bundles
        want["ffn_down"] = (encodings.NAMES, [cfg.d_model, cfg.d_ff])
    if file != EMBED_CHUNK:
        want.update(lowrank_tensors(path, file, tensors, want))
    if file != EMBED_CHUNK and "ffn_gate" in tensors:  # the gate apart (runtime/gateapart.py)
        if not cfg.gated_ffn:
            raise FormatError(path, f"chunk {file}: ffn_gate in a model whose FFN is not gated")
        want["ffn_gate"] = (encodings.NAMES, [cfg.d_ff, cfg.d_model])
    if file != EMBED_CHUNK and "ffn_in_cols" in tensors:  # TEAL (§3.5): no bundles
        if not cfg.gated_ffn:
            raise FormatError(path, f"chunk {file}: ffn_in_cols in a model whose FFN is not gated")
        d, n = cfg.d_model, cfg.d_ff
        del want["ffn_bundles"]
        want.update({"ffn_in_cols": (("i8",), [d, 2 * n]), "ffn_in_scales": (("f32",), [2 * n]),
                     "ffn_down_cols": (("int8",), [n, d]),
                     "ffn_teal_threshold": (("f32",), [2])})
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise FormatError(path, f"chunk {file}: tensors do not match the config (missing "
                                f"{missing}, unexpected {extra})")
    for name, (encs, shape) in want.items():
        e = tensors[name]
        if e["encoding"] not in encs:
            raise FormatError(path, f"chunk {file}, tensor {name}: encoding {e['encoding']!r} not "
                                    f"allowed here (allowed: {', '.join(encs)})")
        if shape is not None and e["shape"] != shape:
            raise FormatError(path, f"chunk {file}, tensor {name}: shape {e['shape']} does not "
                                    f"match the config ({shape})")
    if "ffn_bundles" in tensors:
        e = tensors["ffn_bundles"]
        try:
            parts = [(p["name"], encodings.codec(p["encoding"], p.get("group_size")))
                     for p in e["parts"]]
            names = bundle_parts(cfg)
            if "ffn_down" in tensors:
                names = names[:-1]
            if "ffn_gate" in tensors:
                names = names[1:]
            if tuple(n for n, _ in parts) != names:
                raise EdgeLLMError(f"parts must be {names}")
            for _, c in parts:
                if c.group_size and cfg.d_model % c.group_size:
                    raise EdgeLLMError(f"group size {c.group_size} does not divide d_model")
            layout, stride = encodings.bundle_layout(parts, cfg.d_model)
        except (EdgeLLMError, KeyError, TypeError) as err:
            raise FormatError(path, f"chunk {file}, ffn_bundles: bad parts ({err})") from None
        if e["parts"] != layout or e["shape"] != [cfg.d_ff, stride]:
            raise FormatError(path, f"chunk {file}, ffn_bundles: layout or shape disagrees with "
                                    "the bundle layout of docs/FORMAT.md")


# ---------------------------------------------------------------------------------------------
# Chunk files


def read_header(path):
    """Parse a safetensors header. Returns (header dict without __metadata__, data start offset)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(path, "truncated: no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(path, f"truncated or corrupt: header length {n} does not fit in "
                                        f"the file ({size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(path, "corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(path, "corrupt safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + n


def check_chunk(path, chunk_entry):
    """Check a chunk file against its manifest entry: size, every tensor's dtype, shape and extent.

    Returns {tensor name: (numpy dtype, shape, absolute begin, absolute end)}.
    """
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size is None:
        raise FormatError(path, "chunk file is missing")
    if size != chunk_entry["size"]:
        raise FormatError(path, f"size is {size} bytes, the manifest says {chunk_entry['size']} "
                                "(truncated or replaced file)")
    header, start = read_header(path)
    expected = {}
    for name, entry in chunk_entry["tensors"].items():
        expected.update(stored_tensors(name, entry))
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise FormatError(path, f"header disagrees with the manifest (missing {missing}, "
                                f"unexpected {extra})")
    out = {}
    for name, (dtype, shape) in expected.items():
        h = header[name]
        try:
            hd = np.dtype(ST_DTYPES[h["dtype"]])
            hshape = tuple(h["shape"])
            b, e = (int(v) for v in h["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity in JSON
            raise FormatError(path, f"tensor {name}: corrupt header entry") from None
        if hd != dtype or hshape != shape:
            raise FormatError(path, f"tensor {name}: header says {h['dtype']} {list(hshape)}, the "
                                    f"manifest implies {ST_NAMES[dtype]} {list(shape)}")
        if not 0 <= b <= e or e - b != int(np.prod(shape)) * dtype.itemsize or start + e > size:
            raise FormatError(path, f"tensor {name}: data offsets {b}..{e} are inconsistent or "
                                    "outside the file")
        out[name] = (dtype, shape, start + b, start + e)
    return out
