"""`edgellm export`: an edgellm model directory -> a GGUF file (llama.cpp, ollama) or a Hugging
Face directory (transformers).

GGUF (`--to gguf`), architectures llama/mistral (GGUF `llama`) and qwen2 (GGUF `qwen2`):
- metadata from the ModelConfig; Q and K rows permuted back to llama.cpp's interleaved rotary
  convention for `llama` (llama.cpp's convert_hf_to_gguf.py does the same; the GGUF importer
  undoes it);
- tensor types: f32 -> F32 and f16 -> F16 as they are; int4 (Q4_0 convention, groups of 32, 64
  or 128) -> Q4_0 exactly (each block of 32 takes its group's float16 scale and the same nibbles);
  int8 (per-row float32 scale) -> Q8_0 with the same int8 values and the row's scale rounded to
  float16 in every block (stated re-rounding: each value moves by at most 2^-11 of its row's
  largest magnitude; the largest change per tensor is reported). ffn_down is stored one column
  per neuron (quantized along d_model) while GGML quantizes its rows (along d_ff): it is written
  dequantized, F16 when it was f16, else F32 (exact, larger). --quant keep's q8_0 and q4_1
  (and its ffn_down, kept as a matrix of its own) are llama.cpp's blocks: written byte for byte.
  Anything else (a row length that is not a multiple of 32, an encoding with no GGML twin) is
  written dequantized as F32 (exact);
- tokenizer: `gpt2` byte-level BPE from tokenizer.json (tokens, merges, token types, the
  pre-tokenizer llama.cpp knows it by), `llama` sentencepiece from tokenizer.model (pieces, scores,
  types); special token ids; the chat template.

Hugging Face (`--to hf`), every architecture edgellm runs (llama, mistral, qwen2, opt):
config.json (built for converters/arch.py, and checked by parsing it back to the same
ModelConfig), model.safetensors (weights dequantized to float32: exactly the values edgellm
computes with), generation_config.json, the tokenizer file, tokenizer_config.json and
chat_template.jinja.

Low-rank projections (--low-rank: two factors left [n, r] and right [r, d], docs/FORMAT.md
§3.4) have no twin in either format: every target (ONNX too) gets their product, float32.

Both are written to a temporary sibling and renamed into place when complete.

>>> export("models/smollm2", "smollm2.gguf", to="gguf")     # doctest: +SKIP
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from .runtime import encodings, format, lowrank
from .runtime.errors import EdgeLLMError
from .runtime.reader import Reader

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}
QK_BLOCK = 32  # values per Q8_0 / Q4_0 block


class ExportError(EdgeLLMError):
    pass


# ---------------------------------------------------------------------------------------------
# Reading the model back as named tensors


class _Model:
    """The model directory's tensors in canonical names: (q, s, codec) per matrix (FFN parts
    unbundled into gate/up/down in original neuron order), float32 per vector."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.manifest, self.config = format.read_manifest(self.path)
        self.reader = Reader(self.path, self.manifest)

    def chunk(self, i=None):
        return format.EMBED_CHUNK if i is None else format.layer_chunk(i)

    def names(self, i=None):
        return list(self.manifest["chunks"][0 if i is None else i + 1]["tensors"])

    def vector(self, name, i=None):
        return self.reader.vector(self.chunk(i), name)

    def has(self, name, i=None):
        return self.reader.has(self.chunk(i), name) or self.factored(name, i)

    def factored(self, name, i=None):
        """The projection is stored as two factors, name.left [n, r] and name.right [r, d]
        (--low-rank, docs/FORMAT.md §3.4)."""
        return i is not None and self.reader.has(self.chunk(i), name + ".left")

    def down_is_matrix(self, i):
        """--quant keep stores ffn_down as its own [d, d_ff] matrix (docs/FORMAT.md)."""
        return self.reader.has(self.chunk(i), "ffn_down")

    def matrix(self, name, i=None):
        """(q, s, codec) of a stored matrix; FFN parts as ffn_gate/ffn_up [d_ff, d] and ffn_down
        as its transpose [d_ff, d] (rows = neurons, as in the bundle) unless down_is_matrix."""
        f = self.chunk(i)
        if self.factored(name, i):
            # no export target holds two factors: their product left · right in float32 (the
            # runtime computes left · (right · x): the same up to float rounding)
            p = lowrank.projection(self.reader, f, name)
            left, right = p.left, p.right
            w = left.codec.dequantize(left.q, left.s).astype(np.float64) @ \
                right.codec.dequantize(right.q, right.s)
            return w.astype(np.float32), None, encodings.codec("f32")
        if not name.startswith("ffn_") or name == "ffn_down" and self.down_is_matrix(i):
            m = self.reader.matrix(f, name)
            return m.q, m.s, m.codec
        if name == "ffn_gate" and self.reader.has(f, "ffn_gate"):  # stored apart, in row order
            m = self.reader.matrix(f, name)
            order = np.argsort(self.reader.array(f, "ffn_perm"))
            return m.q[order], None if m.s is None else m.s[order], m.codec
        part = name[len("ffn_"):]
        entry = self.reader.entry(f, "ffn_bundles")
        layout = {p["name"]: p for p in entry["parts"]}
        bundles = self.reader.array(f, "ffn_bundles")
        q, s = encodings.bundle_part(bundles, layout[part], self.config.d_model)
        order = np.argsort(self.reader.array(f, "ffn_perm"))  # bundle rows -> original neurons
        p = layout[part]
        return q[order], None if s is None else s[order], \
            encodings.codec(p["encoding"], p["group_size"])

    def dense(self, name, i=None):
        """float32 matrix in the checkpoint's layout (ffn_down as [d, d_ff])."""
        q, s, c = self.matrix(name, i)
        w = c.dequantize(q, s)
        if name == "ffn_down" and not self.down_is_matrix(i):
            w = w.T
        return np.ascontiguousarray(w, dtype=np.float32)

    def tokenizer_path(self):
        return format.safe_path(self.path, self.manifest["tokenizer"]["file"])


def _is_vector(canonical):
    """Norm weights and biases (f32 vectors) end in .weight/.bias; matrices do not."""
    return canonical.endswith((".weight", ".bias"))


def _permute(x, n_head):
    """llama.cpp's LlamaModel.permute (rows of Q or K, or their biases): rotate_half halves ->
    interleaved rotary pairs. Rows move whole, so quantized rows and their scales move along."""
    return np.ascontiguousarray(
        x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2)
        .reshape(x.shape))


def _check_destination(out, overwrite, is_dir):
    out = os.path.abspath(out)
    if os.path.lexists(out):
        if not overwrite:
            raise ExportError(f"{out}: already exists (choose another output or pass --force)")
        if is_dir != os.path.isdir(out) or os.path.islink(out):
            raise ExportError(f"{out}: exists and is not a {'directory' if is_dir else 'file'}; "
                              "refusing to replace it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out


def export(model_dir, out, to="gguf", overwrite=False, progress=True, report=None):
    """Export model_dir as a GGUF file (to="gguf") or a Hugging Face directory (to="hf").
    Returns the output path. report: a dict to fill with, per exported tensor, its type and the
    largest absolute change of a value (0 when exact); with progress, the largest is printed."""
    if to == "onnx":  # edgellm/export_onnx.py: a graph onnxruntime runs, weights as stored
        from .export_onnx import export_onnx

        return export_onnx(model_dir, out, overwrite=overwrite, progress=progress, report=report)
    if to not in ("gguf", "hf"):
        raise ExportError(f"unknown export target {to!r} (choose gguf, hf or onnx)")
    m = _Model(model_dir)
    fn = _export_gguf if to == "gguf" else _export_hf
    path, rep = fn(m, out, overwrite, progress)
    if report is not None:
        report.update(rep)
    if progress:
        name, worst = max(rep["tensors"].items(), key=lambda kv: kv[1]["max_abs_change"])
        print(f"largest change of a weight: {worst['max_abs_change']:.3g} ({name}, "
              f"{worst['type']})" if worst["max_abs_change"] else "all weights exported exactly",
              file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_tensor(q, s, c, gguf):
    """(data, raw_dtype or None, max abs change) for one matrix in GGML's nearest exact type."""
    n, d = q.shape[0], (q.shape[1] * 2 if c.name in ("int4", "q4_1") else q.shape[1])
    T = gguf.GGMLQuantizationType
    if c.name == "q8_0":  # --quant keep: llama.cpp's own blocks, byte for byte
        blocks = np.empty((n, d // QK_BLOCK, 2 + QK_BLOCK), np.uint8)
        blocks[:, :, :2] = np.asarray(s, np.float16).view(np.uint8).reshape(n, -1, 2)
        blocks[:, :, 2:] = np.asarray(q, np.int8).view(np.uint8).reshape(n, -1, QK_BLOCK)
        return blocks.reshape(n, -1), T.Q8_0, 0.0
    if c.name == "q4_1":  # step and minimum per block, then the nibbles (same order as Q4_0)
        blocks = np.empty((n, d // QK_BLOCK, 4 + QK_BLOCK // 2), np.uint8)
        blocks[:, :, :4] = np.asarray(s, np.float16).view(np.uint8).reshape(n, -1, 4)
        blocks[:, :, 4:] = np.asarray(q, np.uint8).reshape(n, -1, QK_BLOCK // 2)
        return blocks.reshape(n, -1), T.Q4_1, 0.0
    if c.name == "f32":
        return np.ascontiguousarray(q, dtype=np.float32), None, 0.0
    if c.name == "f16":
        return np.ascontiguousarray(q, dtype=np.float16), None, 0.0
    if c.name == "int8" and d % QK_BLOCK == 0 and np.all(np.abs(s) <= 65504):
        s16 = np.asarray(s, np.float32).astype(np.float16)
        blocks = np.empty((n, d // QK_BLOCK, 2 + QK_BLOCK), np.uint8)
        blocks[:, :, :2] = s16.view(np.uint8).reshape(n, 1, 2)
        blocks[:, :, 2:] = np.asarray(q, np.int8).view(np.uint8).reshape(n, -1, QK_BLOCK)
        err = float(np.max(np.abs(np.abs(q).max(axis=1) * (s16.astype(np.float32) - s)),
                           initial=0.0))
        return blocks.reshape(n, -1), T.Q8_0, err
    if c.name == "int4" and c.group_size % QK_BLOCK == 0:
        per = c.group_size // QK_BLOCK  # blocks per group: each takes the group's scale
        scales = np.repeat(np.asarray(s, np.float16), per, axis=1)  # [n, d/32]
        blocks = np.empty((n, d // QK_BLOCK, 2 + QK_BLOCK // 2), np.uint8)
        blocks[:, :, :2] = scales.view(np.uint8).reshape(n, -1, 2)
        blocks[:, :, 2:] = np.asarray(q, np.uint8).reshape(n, -1, QK_BLOCK // 2)
        return blocks.reshape(n, -1), T.Q4_0, 0.0  # same nibble order as Q4_0: exact
    # no exact GGML twin: the dequantized values, exactly, as F32
    return np.ascontiguousarray(c.dequantize(q, s), dtype=np.float32), None, 0.0


GGUF_LAYER = {"attn_norm.weight": "attn_norm.weight", "attn_q": "attn_q.weight",
              "attn_k": "attn_k.weight", "attn_v": "attn_v.weight",
              "attn_o": "attn_output.weight", "attn_q.bias": "attn_q.bias",
              "attn_k.bias": "attn_k.bias", "attn_v.bias": "attn_v.bias",
              "attn_o.bias": "attn_output.bias", "ffn_norm.weight": "ffn_norm.weight",
              "ffn_gate": "ffn_gate.weight", "ffn_up": "ffn_up.weight",
              "ffn_down": "ffn_down.weight"}
GGUF_GLOBAL = {"tok_embeddings": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output": "output.weight"}


def _check_gguf_supported(m):
    c = m.config
    where = f"{m.path}: cannot export to GGUF:"
    if c.arch not in GGUF_ARCH:
        raise ExportError(f"{where} architecture {c.arch!r} is not supported (supported: "
                          f"{', '.join(sorted(GGUF_ARCH))}; use --to hf)")
    if c.positions != "rope" or c.norm != "rms" or not c.gated_ffn or c.ffn_bias:
        raise ExportError(f"{where} only rotary, RMS-norm, gated-FFN models map onto GGUF's "
                          f"{GGUF_ARCH[c.arch]} architecture")
    if c.activation != "silu":
        raise ExportError(f"{where} activation {c.activation!r}: llama.cpp's {GGUF_ARCH[c.arch]} "
                          "architecture uses SiLU (use --to hf)")
    if c.o_bias and GGUF_ARCH[c.arch] == "qwen2" or c.qkv_bias and c.arch == "mistral":
        raise ExportError(f"{where} attention biases this architecture does not have")
    if c.rope_scaling is not None:
        kind = c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
        if kind != "linear":
            raise ExportError(f"{where} rope scaling {kind!r} (only linear maps onto GGUF "
                              "metadata; use --to hf)")


def _export_gguf(m, out, overwrite, progress):
    try:
        import gguf
    except ImportError:
        raise ExportError("exporting GGUF needs the gguf package (pip install "
                          "'edgellm[convert]')") from None
    _check_gguf_supported(m)
    out = _check_destination(out, overwrite, is_dir=False)
    c = m.config
    arch = GGUF_ARCH[c.arch]
    report = {"format": "gguf", "tensors": {}}
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.basename(os.path.normpath(m.path)))
        w.add_block_count(c.n_layers)
        w.add_context_length(c.max_context)
        w.add_embedding_length(c.d_model)
        w.add_feed_forward_length(c.d_ff)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_rope_freq_base(float(c.rope_theta))
        w.add_layer_norm_rms_eps(float(c.norm_eps))
        w.add_vocab_size(c.vocab_size)
        if c.rope_scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
        _gguf_tokenizer(m, w, gguf)
        if m.manifest.get("chat_template"):
            w.add_chat_template(m.manifest["chat_template"])

        from tqdm.auto import tqdm

        def add(gname, name, i=None):
            if _is_vector(name):
                x = m.vector(name, i)
                if arch == "llama" and name in ("attn_q.bias", "attn_k.bias"):
                    x = _permute(x, c.n_heads if name == "attn_q.bias" else c.n_kv_heads)
                w.add_tensor(gname, x)
                report["tensors"][gname] = {"type": "F32", "max_abs_change": 0.0}
                return
            q, s, codec = m.matrix(name, i)
            if arch == "llama" and name in ("attn_q", "attn_k"):
                heads = c.n_heads if name == "attn_q" else c.n_kv_heads
                q = _permute(q, heads)
                s = None if s is None else _permute(s, heads)
            if name == "ffn_down" and not m.down_is_matrix(i):  # neuron rows; GGUF: [d, d_ff]
                q, s, codec = _dense_down(q, s, codec)
            data, raw, err = _gguf_tensor(q, s, codec, gguf)
            if raw is None:
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, data, raw_dtype=raw)
            report["tensors"][gname] = {"type": raw.name if raw is not None else
                                        data.dtype.name.upper().replace("FLOAT", "F"),
                                        "max_abs_change": err}

        with tqdm(total=c.n_layers + 1, desc="export", unit="chunk", disable=not progress) as bar:
            for name, gname in GGUF_GLOBAL.items():
                if m.has(name):
                    add(gname, name)
            bar.update(1)
            for i in range(c.n_layers):
                for name, gname in GGUF_LAYER.items():
                    if name in ("ffn_gate", "ffn_up", "ffn_down") or m.has(name, i):
                        add(f"blk.{i}.{gname}", name, i)
                bar.update(1)
        types = {v["type"] for v in report["tensors"].values() if v["type"] != "F32"}
        ft = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}
        w.add_file_type(next((ft[t] for t in ("Q4_0", "Q4_1", "Q8_0", "F16") if t in types),
                             gguf.LlamaFileType.ALL_F32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out, report


def _dense_down(q, s, codec):
    """ffn_down is bundled as one column per neuron (quantized along d); GGUF wants [d, d_ff]
    rows quantized along d_ff, which is a different rounding: write it as float. f16 stays f16
    (exact); other encodings are written as F32 values (exact)."""
    w = codec.dequantize(q, s).T
    if codec.name == "f16":
        return np.ascontiguousarray(w.astype(np.float16)), None, encodings.codec("f16")
    return np.ascontiguousarray(w, dtype=np.float32), None, encodings.codec("f32")


# GPT-2 regex alone, or SmolLM's digit split before it: the pre-tokenizers llama.cpp calls
# `gpt-2` and `smollm`
def _bpe_pre(tok_json):
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    return None


def _gguf_tokenizer(m, w, gguf):
    c, tok_spec = m.config, m.manifest["tokenizer"]
    path = m.tokenizer_path()
    V = c.vocab_size
    T = gguf.TokenType
    if tok_spec["kind"] == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        n = sp.get_piece_size()
        if n > V:
            raise ExportError(f"{path}: {n} pieces, more than the model's vocabulary {V}")
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [float(sp.get_score(i)) for i in range(n)]
        types = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                 T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL
                 for i in range(n)]
        tokens += [f"[PAD{i}]" for i in range(n, V)]
        scores += [-1000.0] * (V - n)
        types += [T.UNUSED] * (V - n)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        if sp.unk_id() >= 0:
            w.add_unk_token_id(sp.unk_id())
        # add_space_prefix: sentencepiece's default (add_dummy_prefix), which edgellm's own
        # sentencepiece models and the GGUF importer keep
    else:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise ExportError(f"{path}: only byte-level BPE tokenizers map onto GGUF's gpt2 "
                              "tokenizer")
        vocab = dict(model["vocab"])
        special = {}
        for a in tj.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
            special[a["id"]] = a.get("special", False)
        n = max(vocab.values()) + 1
        if n > V:
            raise ExportError(f"{path}: token ids up to {n - 1}, beyond the model's vocabulary "
                              f"{V}")
        tokens = [f"[PAD{i}]" for i in range(V)]
        types = [T.UNUSED] * V
        for t, i in vocab.items():
            tokens[i] = t
            types[i] = T.NORMAL if i not in special else \
                T.CONTROL if special[i] else T.USER_DEFINED
        merges = [" ".join(p) if isinstance(p, list) else p for p in model.get("merges", [])]
        pre = _bpe_pre(tj)
        if pre is None:
            raise ExportError(f"{path}: its pre-tokenizer has no llama.cpp equivalent we know "
                              "(known: GPT-2 byte-level, SmolLM digits + byte-level)")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_ids:
        w.add_eos_token_id(c.eos_token_ids[0])
        # end-of-turn: llama.cpp stops at eos and eot; a second stop id (e.g. <|im_end|> after
        # <|endoftext|>) goes there
        if len(c.eos_token_ids) > 1:
            w.add_eot_token_id(c.eos_token_ids[1])
    w.add_add_bos_token(bool(tok_spec.get("add_bos")))
    w.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_config(c):
    """config.json for a ModelConfig (transformers 4.x keys, which 5.x reads too)."""
    if c.arch not in HF_ARCHITECTURES:
        raise ExportError(f"architecture {c.arch!r} has no Hugging Face export")
    common = dict(architectures=[HF_ARCHITECTURES[c.arch]], model_type=c.arch,
                  hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, vocab_size=c.vocab_size,
                  tie_word_embeddings=c.tied_embeddings, bos_token_id=c.bos_token_id,
                  eos_token_id=(c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else
                                list(c.eos_token_ids) or None),
                  torch_dtype="float32")
    if c.arch == "opt":
        return dict(common, ffn_dim=c.d_ff, max_position_embeddings=c.max_context,
                    do_layer_norm_before=True, word_embed_proj_dim=c.d_model,
                    enable_bias=c.qkv_bias, activation_function=c.activation,
                    layer_norm_elementwise_affine=True, dropout=0.0, attention_dropout=0.0)
    cfg = dict(common, intermediate_size=c.d_ff, num_key_value_heads=c.n_kv_heads,
               head_dim=c.head_dim, max_position_embeddings=c.max_context,
               rms_norm_eps=c.norm_eps, hidden_act=c.activation, rope_theta=c.rope_theta,
               rope_scaling=c.rope_scaling)
    if c.arch == "llama":
        cfg.update(attention_bias=c.qkv_bias, mlp_bias=False)
    elif c.arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    elif c.arch == "mistral":
        cfg.update(sliding_window=None)  # edgellm capped the context at the window: exact
    return cfg


def _export_hf(m, out, overwrite, progress):
    from safetensors.numpy import save_file

    from .converters import arch

    c = m.config
    cfg = hf_config(c)
    # the names come from the converter's architecture table, read in reverse; parsing the
    # config back must give the same model
    spec = arch.from_hf_config(cfg)
    back = spec.config.to_dict()
    if back != c.to_dict() | {"eos_token_ids": back["eos_token_ids"]} or \
            set(back["eos_token_ids"]) != set(c.eos_token_ids):
        raise ExportError(f"{m.path}: the Hugging Face config would not describe the same model "
                          f"({back} != {c.to_dict()})")
    out = _check_destination(out, overwrite, is_dir=True)
    report = {"format": "hf", "tensors": {}}
    with _hf_directory(m, cfg, out) as tmp:
        tensors = {}
        for name, hf in spec.global_tensors().items():
            tensors[hf] = m.vector(name) if _is_vector(name) or name == "pos_embeddings" \
                else m.dense(name)
        for i in range(c.n_layers):
            for name, hf in spec.layer_tensors(i).items():
                tensors[hf] = m.vector(name, i) if _is_vector(name) else m.dense(name, i)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        report["tensors"] = {k: {"type": "F32", "max_abs_change": 0.0} for k in tensors}
    return out, report


@contextlib.contextmanager
def _hf_directory(m, cfg, out):
    """A directory laid out as Hugging Face tools expect, built in a staging directory beside
    out: the caller writes the weights into the yielded path; config.json, generation_config.json
    and the tokenizer are added, then it replaces out. Nothing is left behind on failure."""
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        yield tmp
        _write_json(os.path.join(tmp, "config.json"), cfg)
        _hf_extras(m, tmp)
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hf_extras(m, dst):
    """generation_config.json and the tokenizer files, as transformers and optimum look for them
    next to config.json."""
    c = m.config
    _write_json(os.path.join(dst, "generation_config.json"),
                {"bos_token_id": c.bos_token_id,
                 "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else
                 (c.eos_token_ids[0] if c.eos_token_ids else None)})
    _hf_tokenizer(m, dst)


def _hf_tokenizer(m, dst):
    spec, c = m.manifest["tokenizer"], m.config
    src = m.tokenizer_path()
    from .runtime.tokenizer import Tokenizer

    tok = Tokenizer.load(m.path, m.manifest)
    if spec["kind"] == "hf" and tok.add_bos:
        # edgellm prepends BOS itself (manifest add_bos); a fast tokenizer does it through its
        # post-processor, so give the exported tokenizer.json one when it has none
        with open(src, encoding="utf-8") as f:
            tj = json.load(f)
        if not tj.get("post_processor"):
            bos = tok.decode([tok.bos_id])
            tj["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
        with open(os.path.join(dst, spec["file"]), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
    else:
        shutil.copyfile(src, os.path.join(dst, spec["file"]))
    name = lambda i: tok.token_text(i) if i is not None else None  # noqa: E731
    cfg = {"model_max_length": c.max_context, "add_bos_token": bool(tok.add_bos),
           "add_eos_token": False, "bos_token": name(tok.bos_id),
           "eos_token": name(c.eos_token_ids[0]) if c.eos_token_ids else None,
           "clean_up_tokenization_spaces": False}
    if spec["kind"] == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=src)
        cfg.update(tokenizer_class="LlamaTokenizer", legacy=True,
                   unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None)
    else:
        cfg.update(tokenizer_class="PreTrainedTokenizerFast")
    template = m.manifest.get("chat_template")
    if template:
        cfg["chat_template"] = template
        with open(os.path.join(dst, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
    _write_json(os.path.join(dst, "tokenizer_config.json"), cfg)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
