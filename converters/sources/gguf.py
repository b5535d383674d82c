"""GGUF source (llama.cpp's format): metadata -> Spec, tensors -> float32, vocabulary -> tokenizer.

The file is read with the `gguf` package (GGUFReader, memory-mapped). Its metadata is translated
into the Hugging Face config keys converters/arch.py already understands, and its tensor names
into the checkpoint names of arch.py's table, so a GGUF goes through the same architecture table,
quantizer and writer as a safetensors checkpoint: one writer, one schema.

Tensors are dequantized with the gguf package's own codecs (gguf.quants.dequantize), one tensor
at a time. llama.cpp's converter permutes the rows of Q and K for the `llama` architecture
(interleaved rotary pairs); `unpermute` undoes it so the weights follow Hugging Face's
rotate_half convention, which the runtime uses.

>>> src = GGUFSource("SmolLM2-135M-Instruct.Q4_1.gguf")          # doctest: +SKIP
>>> spec = src.spec()                                              # doctest: +SKIP
>>> q = src.read("model.layers.0.self_attn.q_proj.weight")         # doctest: +SKIP
"""

import json
import os
import struct

import numpy as np

from edgellm.runtime.errors import ConvertError

# GGUF architectures we read; each maps onto an arch.py model_type
ARCHES = {"llama": "llama", "qwen2": "qwen2"}
# tensor types the gguf package dequantizes and we accept (the list)
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# --quant keep: GGUF block types stored as they are (encoding, group size), byte for byte; and the
# encoding every other type is converted to (floats exactly; Q5 and K-quants re-rounded to 8 bits
# per block of 32, a small error next to their own 5-6 bits: measured and recorded per tensor)
KEPT = {"Q8_0": ("q8_0", None), "Q4_0": ("int4", 32), "Q4_1": ("q4_1", None)}
NEAREST = {"F32": "f32", "F16": "f16", "BF16": "f32", "Q5_0": "q8_0", "Q5_1": "q8_0",
           "Q4_K": "q8_0", "Q5_K": "q8_0", "Q6_K": "q8_0"}
# bytes of one block of 32 and where its parts lie: (block bytes, scale bytes, value bytes)
BLOCK_BYTES = {"Q8_0": (34, 2, 32), "Q4_0": (18, 2, 16), "Q4_1": (20, 4, 16)}


def split_blocks(raw, ggml_type):
    """GGUF rows of blocks uint8 [n, nb * block bytes] -> (q, s) of the kept encoding: values of
    a row first, then its per-block float16 numbers (scale; or step and min for Q4_1). Q4_0 and
    Q4_1 pack nibbles as edgellm's int4 does, so the bytes are only regrouped."""
    size, sbytes, vbytes = BLOCK_BYTES[ggml_type]
    n = raw.shape[0]
    b = np.asarray(raw, dtype=np.uint8).reshape(n, -1, size)
    s = np.ascontiguousarray(b[:, :, :sbytes]).view(np.float16).reshape(n, -1)
    q = np.ascontiguousarray(b[:, :, sbytes:]).reshape(n, -1)
    if ggml_type == "Q8_0":
        q = q.view(np.int8)
    return q, s


# GGUF tensor name -> Hugging Face checkpoint name (arch.py's table)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer isolates each digit (\p{N}) first
DIGIT_SPLIT_PRE = ("smollm",)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4


def hf_name(gguf_name):
    """The Hugging Face checkpoint name of a GGUF tensor name, or None."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
    return None


def unpermute(w, n_head):
    """Inverse of llama.cpp's LlamaModel.permute: interleaved rotary pairs -> rotate_half halves.

    permute: w.reshape(n_head, 2, hd//2, *rest).swapaxes(1, 2).reshape(w.shape)
    """
    shape = w.shape
    return np.ascontiguousarray(
        w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


def is_gguf(path):
    """Does path name a file starting with the GGUF magic (or ending in .gguf)?"""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# the kind of value each metadata key the importer reads must hold (a damaged file can put any
# type under any key); matched on the key's end, after the architecture prefix
META_KINDS = {
    "block_count": "count", "context_length": "count", "embedding_length": "count",
    "feed_forward_length": "count", "attention.head_count": "count",
    "attention.head_count_kv": "counts", "attention.key_length": "count",
    "rope.dimension_count": "count", "vocab_size": "count",
    "attention.layer_norm_rms_epsilon": "positive", "rope.freq_base": "positive",
    "rope.scaling.factor": "positive", "rope.scaling.type": "str",
    "general.architecture": "str", "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str",
    "tokenizer.chat_template": "str", "tokenizer.ggml.tokens": "strs",
    "tokenizer.ggml.merges": "strs", "tokenizer.ggml.token_type": "ints",
    "tokenizer.ggml.scores": "numbers", "_token_id": "id", "add_bos_token": "bool",
    "add_space_prefix": "bool",
}


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


META_CHECKS = {
    "count": (lambda v: _int(v) and v > 0, "a positive integer"),
    "counts": (lambda v: _int(v) and v > 0 or isinstance(v, list), "a positive integer"),
    "id": (lambda v: _int(v) and v >= 0, "a token id"),
    "positive": (lambda v: _number(v) and v > 0, "a positive number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, (bool, int)), "true or false"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
             "a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(_int(t) for t in v), "a list of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(_number(t) for t in v),
                "a list of numbers"),
}


def meta_kind(key):
    for k, kind in META_KINDS.items():
        if key == k or key.endswith("." + k) or k.startswith("_") and key.endswith(k):
            return kind
    return None


def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# bytes of each fixed-size GGUF metadata value type (8 is a string, 9 an array)
VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_metadata_extents(path):
    """Walk the metadata section and check that every key, string and array lies inside the file;
    returns what is wrong, or None. gguf.GGUFReader reads values past the end of the file as
    empty arrays without an error, so an array claiming 2**60 numbers makes it loop (almost)
    forever on a 1 KB file; this walk costs one pass over the metadata."""
    import mmap

    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            return "the file is empty"
    with data:
        size = len(data)

        def need(off, n, what):
            if n < 0 or off + n > size:
                raise _Past(f"{what} at byte {off} runs past the end of the file ({size} bytes)")

        def u(fmt, off, what):
            need(off, struct.calcsize(fmt), what)
            return struct.unpack_from(fmt, data, off)[0]

        def value(off, t, key):
            if t in VALUE_BYTES:
                need(off, VALUE_BYTES[t], f"metadata {key}")
                return off + VALUE_BYTES[t]
            if t == 8:
                n = u("<Q", off, f"metadata {key}")
                need(off + 8, n, f"metadata {key}")
                return off + 8 + n
            if t == 9:
                it, n = u("<I", off, f"metadata {key}"), u("<Q", off + 4, f"metadata {key}")
                off += 12
                if it in VALUE_BYTES:
                    need(off, n * VALUE_BYTES[it], f"metadata {key} ({n} values)")
                    return off + n * VALUE_BYTES[it]
                need(off, n * 8, f"metadata {key} ({n} values)")  # strings, arrays: >= 8 bytes
                for _ in range(n):
                    off = value(off, it, key)
                return off
            raise _Past(f"metadata {key} has an unknown value type {t}")

        try:
            n_kv = u("<Q", 16, "the header")
            need(24, n_kv * 12, f"the header ({n_kv} metadata entries)")
            off = 24
            for _ in range(n_kv):
                n = u("<Q", off, "a metadata key")
                need(off + 8, n, "a metadata key")
                key = bytes(data[off + 8:off + 8 + min(n, 200)]).decode("utf-8", "replace")
                off = value(off + 12 + n, u("<I", off + 8 + n, f"metadata {key}"), key)
        except _Past as e:
            return str(e)
    return None


class _Past(Exception):
    pass


def _f32(v):
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): the value the source model's config most likely stated."""
    return float(str(np.float32(v)))


class GGUFSource:
    """A GGUF file seen through Hugging Face checkpoint names (the HFSource interface)."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise ConvertError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConvertError(f"{self.path}: not a GGUF file (bad magic {magic!r})")
        try:
            import gguf
        except ImportError:
            raise ConvertError(f"{self.path}: reading GGUF needs the gguf package "
                               "(pip install 'edgellm[convert]')") from None
        self._gguf = gguf
        bad = check_metadata_extents(self.path)
        if bad:
            raise ConvertError(f"{self.path}: {bad}; truncated or corrupt?")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # ValueError, struct errors, IndexError on truncated files ...
            raise ConvertError(f"{self.path}: cannot read GGUF ({type(e).__name__}: {e}); "
                               "truncated or corrupt?") from None
        size = os.path.getsize(self.path)
        self.tensors = {}  # hf name -> ReaderTensor
        self.gguf_names = {}  # hf name -> gguf name
        for t in self.reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ConvertError(f"{self.path}: tensor {t.name} lies outside the file "
                                   "(truncated?)")
            name = hf_name(t.name)
            if name is not None:
                self.tensors[name] = t
                self.gguf_names[name] = t.name
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHES:
            raise ConvertError(f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                               f"(supported: {', '.join(ARCHES)})")
        self.n_heads = self.n_kv_heads = None
        self._cache = (None, None)

    # -- metadata -----------------------------------------------------------------------------

    def meta(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot read metadata {key} ({e})") from None
        kind = meta_kind(key)
        if kind is not None and not META_CHECKS[kind][0](v):
            raise ConvertError(f"{self.path}: metadata {key} must be {META_CHECKS[kind][1]}, got "
                               f"{_short(v)}")
        return v

    def hf_config(self):
        """The metadata as a Hugging Face config.json dict (for arch.from_hf_config)."""
        a = self.arch
        m = lambda k, default=None: self.meta(f"{a}.{k}", default)  # noqa: E731
        need = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
                "attention.head_count": "num_attention_heads",
                "feed_forward_length": "intermediate_size",
                "context_length": "max_position_embeddings"}
        hf = {"model_type": ARCHES[a]}
        missing = []
        for k, h in need.items():
            v = m(k)
            if v is None:
                missing.append(f"{a}.{k}")
            hf[h] = v
        if missing:
            raise ConvertError(f"{self.path}: missing metadata {', '.join(missing)}")
        hf["num_key_value_heads"] = m("attention.head_count_kv", hf["num_attention_heads"])
        if isinstance(hf["num_key_value_heads"], list):
            raise ConvertError(f"{self.path}: per-layer head counts are not supported")
        emb = self.tensors.get("model.embed_tokens.weight")
        tokens = self.meta("tokenizer.ggml.tokens")
        vocab = m("vocab_size") or (int(emb.shape[1]) if emb is not None else None) or \
            (len(tokens) if tokens else None)
        hf["vocab_size"] = vocab
        hf["rms_norm_eps"] = _f32(m("attention.layer_norm_rms_epsilon", 1e-5))
        hf["rope_theta"] = _f32(m("rope.freq_base", 10000.0))
        key_len = m("attention.key_length")
        if key_len is not None:
            hf["head_dim"] = key_len
        rope_dim = m("rope.dimension_count")
        hd = key_len or (hf["hidden_size"] // hf["num_attention_heads"])
        if rope_dim is not None and rope_dim != hd:
            raise ConvertError(f"{self.path}: partial rotary embeddings ({a}.rope.dimension_count "
                               f"{rope_dim} != head dim {hd}) are not supported")
        kind = m("rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise ConvertError(f"{self.path}: rope scaling {kind!r} is not supported")
            factor = m("rope.scaling.factor")
            if factor is None:
                raise ConvertError(f"{self.path}: linear rope scaling without {a}.rope.scaling."
                                   "factor")
            hf["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        if "rope_freqs.weight" in {t.name for t in self.reader.tensors}:
            raise ConvertError(f"{self.path}: rope_freqs (llama3-style rope scaling stored as a "
                               "tensor) is not supported yet")
        hf["tie_word_embeddings"] = "lm_head.weight" not in self.tensors
        if a == "llama":
            hf["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self.tensors
        bos = self.meta("tokenizer.ggml.bos_token_id")
        hf["bos_token_id"] = int(bos) if bos is not None else None
        hf["eos_token_id"] = self.eos_ids()
        self.n_heads, self.n_kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
        return hf

    def eos_ids(self):
        """EOS and end-of-turn ids (generation stops at either), plus <|im_end|>-style tokens."""
        ids = []
        for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
            v = self.meta(f"tokenizer.ggml.{k}")
            if v is not None:
                ids.append(int(v))
        tokens = self.meta("tokenizer.ggml.tokens") or []
        types = self.meta("tokenizer.ggml.token_type") or []
        for i, (tok, ty) in enumerate(zip(tokens, types)):
            if ty == CONTROL and tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>",
                                         "<end_of_turn>", "<|endoftext|>"):
                ids.append(i)
        return list(dict.fromkeys(ids))

    def spec(self):
        from .. import arch

        try:
            return arch.from_hf_config(self.hf_config())
        except ConvertError as e:
            msg = str(e).replace("config.json: ", "", 1)
            raise ConvertError(f"{self.path}: {msg}") from None

    # -- tensors (HFSource interface) -----------------------------------------------------------

    def has(self, name):
        return name in self.tensors

    def info(self, name):
        t = self.tensors.get(name)
        if t is None:
            raise ConvertError(f"{self.path}: tensor {name!r} (GGUF "
                               f"{self._gguf_name(name)!r}) is missing")
        shape = tuple(int(v) for v in reversed(t.shape))  # GGUF lists dims innermost first
        return self.path, t.tensor_type.name, shape

    def _gguf_name(self, name):
        for g, h in GLOBAL_NAMES.items():
            if h == name:
                return g
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            for g, h in LAYER_NAMES.items():
                if h == rest:
                    return f"blk.{i}.{g}"
        return name

    def check(self, name, shape):
        file, dtype, have = self.info(name)
        if dtype not in TYPES:
            raise ConvertError(f"{file}: tensor {self.gguf_names[name]} has type {dtype}; "
                               f"supported: {', '.join(TYPES)}")
        if tuple(have) != tuple(shape):
            raise ConvertError(f"{file}: tensor {self.gguf_names[name]} has shape {list(have)}, "
                               f"the metadata implies {list(shape)}")

    def dtypes(self):
        return sorted({t.tensor_type.name for t in self.tensors.values()})

    def read(self, name, rows=None):
        """float32 copy of a tensor (dequantized, Q/K rows un-permuted), or rows [r0, r1).

        Row blocks of a 2-D tensor are dequantized alone (GGML blocks never span rows), so the
        embedding is never whole in float32; Q and K (un-permuted as a whole) and tensors read
        whole are cached, one at a time."""
        if rows is not None and len(self.info(name)[2]) == 2 and not self._permuted(name):
            return self._dequantize(name, rows)
        if self._cache[0] != name:
            self._cache = (None, None)
            self._cache = (name, self._dequantize(name))
        w = self._cache[1]
        if rows is not None:
            return w[rows[0]:rows[1]]
        return w

    def keep_encoding(self, name):
        """(encoding, group size, kept) for --quant keep: the GGUF's own blocks when kept."""
        dtype = self.info(name)[1]
        if dtype in KEPT:
            return KEPT[dtype] + (True,)
        if dtype not in NEAREST:
            raise ConvertError(f"{self.path}: tensor {self.gguf_names[name]} has unsupported type "
                               f"{dtype}")
        return NEAREST[dtype], None, False

    def read_kept(self, name, rows=None):
        """(q, s) of a Q8_0/Q4_0/Q4_1 tensor in its kept encoding (encodings.py), rows [r0, r1)
        or all; Q/K rows un-permuted (blocks never span rows, so moving rows is exact)."""
        file, dtype, shape = self.info(name)
        data = np.asarray(self.tensors[name].data)
        permuted = self._permuted(name)
        if rows is not None and not permuted:
            data = data[rows[0]:rows[1]]
        q, s = split_blocks(data.reshape(data.shape[0], -1), dtype)
        if permuted:
            if self.n_heads is None:
                self.hf_config()
            heads = self.n_heads if ".q_proj." in name else self.n_kv_heads
            q, s = unpermute(q, heads), unpermute(s, heads)
            if rows is not None:
                q, s = q[rows[0]:rows[1]], s[rows[0]:rows[1]]
        return q, s

    def _permuted(self, name):
        return self.arch == "llama" and ".self_attn.q_proj." in name or \
            self.arch == "llama" and ".self_attn.k_proj." in name

    def _dequantize(self, name, rows=None):
        file, dtype, shape = self.info(name)
        if dtype not in TYPES:
            raise ConvertError(f"{file}: tensor {self.gguf_names[name]} has unsupported type "
                               f"{dtype}")
        t = self.tensors[name]
        data = np.asarray(t.data)
        if rows is not None:  # data is [rows, bytes (or values) per row]
            data = data[rows[0]:rows[1]]
            shape = (rows[1] - rows[0],) + tuple(shape[1:])
        try:
            w = self._gguf.quants.dequantize(data, t.tensor_type)
        except Exception as e:
            raise ConvertError(f"{file}: cannot dequantize {self.gguf_names[name]} ({e})") from None
        w = np.ascontiguousarray(w, dtype=np.float32).reshape(shape)
        if self.arch == "llama":
            if self.n_heads is None:
                self.hf_config()
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                w = unpermute(w, self.n_heads)
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                w = unpermute(w, self.n_kv_heads)
        return w

    # -- tokenizer ------------------------------------------------------------------------------

    def tokenizer(self):
        """(kind, file name, file bytes, add_bos, chat template) from the GGUF vocabulary:
        `gpt2` -> a byte-level BPE tokenizer.json, `llama` -> a sentencepiece tokenizer.model."""
        model = self.meta("tokenizer.ggml.model")
        template = self.meta("tokenizer.chat_template")
        if model == "llama":
            return ("sentencepiece", "tokenizer.model", self._sentencepiece(),
                    bool(self.meta("tokenizer.ggml.add_bos_token", True)), template)
        if model != "gpt2":
            raise ConvertError(f"{self.path}: tokenizer model {model!r} is not supported yet "
                               "(supported: gpt2 byte-level BPE, llama sentencepiece)")
        tokens = self.meta("tokenizer.ggml.tokens")
        merges = self.meta("tokenizer.ggml.merges")
        types = self.meta("tokenizer.ggml.token_type") or [1] * len(tokens or [])
        if not tokens or merges is None:
            raise ConvertError(f"{self.path}: tokenizer.ggml.tokens/merges missing")
        try:
            tok = build_bpe_tokenizer(tokens, merges, types, self.meta("tokenizer.ggml.pre"))
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot build the tokenizer ({e})") from None
        add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", False))
        return "hf", "tokenizer.json", tok.to_str().encode("utf-8"), add_bos, template

    def _sentencepiece(self):
        tokens = self.meta("tokenizer.ggml.tokens")
        scores = self.meta("tokenizer.ggml.scores")
        types = self.meta("tokenizer.ggml.token_type")
        if not tokens or scores is None or types is None:
            raise ConvertError(f"{self.path}: tokenizer.ggml.tokens/scores/token_type missing")
        ids = {k: self.meta(f"tokenizer.ggml.{k}_token_id")
               for k in ("unknown", "bos", "eos", "padding")}
        try:
            return sentencepiece_model(tokens, scores, types, ids,
                                       bool(self.meta("tokenizer.ggml.add_space_prefix", True)))
        except Exception as e:
            raise ConvertError(f"{self.path}: cannot build the tokenizer ({e})") from None

    def close(self):
        self._cache = (None, None)
        self.reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num, wire, payload):
    key = _varint(num << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 5:
        return key + struct.pack("<f", payload)
    return key + _varint(len(payload)) + payload  # wire 2: bytes


def sentencepiece_model(tokens, scores, types, ids, add_space_prefix):
    """Serialized sentencepiece ModelProto (BPE) for a GGUF `llama` vocabulary, written by hand
    (no protobuf dependency). llama.cpp's SPM tokenizer is sentencepiece's BPE: pieces merged by
    score; GGUF token types use sentencepiece's numbering (1 normal, 2 unknown, 3 control,
    4 user defined, 5 unused, 6 byte). Field numbers: sentencepiece_model.proto."""
    out = bytearray()
    for tok, score, ty in zip(tokens, scores, types):
        ty = int(ty) if int(ty) in (1, 2, 3, 4, 5, 6) else 1
        out += _field(1, 2, _field(1, 2, tok.encode("utf-8")) + _field(2, 5, float(score))
                      + _field(3, 0, ty))
    trainer = _field(3, 0, 2) + _field(4, 0, len(tokens))  # model_type BPE, vocab_size
    trainer += _field(35, 0, int(any(int(t) == 6 for t in types)))  # byte_fallback
    for num, key in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        v = ids.get(key)
        trainer += _field(num, 0, (int(v) if v is not None else -1) & 0xFFFFFFFFFFFFFFFF)
    out += _field(2, 2, trainer)
    norm = _field(1, 2, b"identity") + _field(3, 0, int(add_space_prefix)) \
        + _field(4, 0, 0) + _field(5, 0, 1)
    out += _field(3, 2, norm)
    return bytes(out)


def build_bpe_tokenizer(tokens, merges, types, pre=None):
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF's tokens, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    for p in pairs:  # the tokenizers library panics (uncatchably) on an inconsistent merge
        if len(p) != 2 or p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab:
            raise ValueError(f"merge {' '.join(p)!r} names tokens missing from the vocabulary")
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        # llama.cpp's `smollm` pre-tokenizer splits every number into single digits before the
        # GPT-2 regex, as SmolLM's own tokenizer.json does (Digits then ByteLevel). It matters for
        # whitespace before a digit: "  1" is "  " + "1", not " " + " 1".
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_json(tok):
    return json.loads(tok.to_str())
