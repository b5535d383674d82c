"""Tiny random Hugging Face checkpoints for tests (a helper module, not tests).

Each variant is a directory transformers can load (config.json with architectures/model_type,
safetensors weights under the Hugging Face names, a tokenizer): written with NumPy only, so the
converter's tests need no torch. Dimensions are tiny but multiples of 64 (int4 groups of 32 and 64
apply); weights are scaled so activations stay O(1) and logits O(1-10).

The tokenizers are trained here, deterministically, on text generated below from word lists (our
own text; no licence question): a sentencepiece model (Llama-style, ids unk 0, bos 1, eos 2) and a
byte-level BPE tokenizer.json (OPT/Qwen-style, specials <s> <pad> </s> <unk> = 0..3). Both are
built once per process.

    path = tiny.checkpoint("llama")          # cached per process, do not modify
    path = tiny.build("llama", tmp_path)     # a fresh private copy
    model_dir = tiny.converted("llama", "int4", 32)
"""

import atexit
import io
import json
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np

# ---------------------------------------------------------------------------------------------
# Variants. Keys: model_type, d, layers, heads, kv, head_dim (None: d // heads), d_ff, act,
# tied, style (4: transformers 4.x config keys, 5: 5.x rope_parameters), theta, rope (scaling dict
# or None), dtype (F32 | F16 | BF16), shards, tokenizer (sp | hf), max_pos, extra (config keys).

BASE = dict(model_type="llama", d=64, layers=2, heads=4, kv=2, head_dim=None, d_ff=128,
            act="silu", tied=False, style=4, theta=10000.0, rope=None, dtype="F32", shards=1,
            tokenizer="sp", max_pos=256, extra={}, bare=False)

VARIANTS = {
    "llama": dict(),
    "llama_tied": dict(tied=True, style=5, theta=500000.0, head_dim=16),
    "llama_rope_llama3": dict(style=5, max_pos=128, rope={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama_rope_linear": dict(style=4, rope={"type": "linear", "factor": 4.0}),
    "llama_relu": dict(d=128, heads=4, kv=4, d_ff=256, act="relu"),
    "llama_attn_bias": dict(extra={"attention_bias": True}),
    "llama_odd_heads": dict(heads=4, kv=2, head_dim=24),  # q_dim 96: int4 g64 falls back to int8
    "mistral": dict(model_type="mistral", style=5, max_pos=512,
                    extra={"sliding_window": 256}),
    "qwen2": dict(model_type="qwen2", style=5, tied=True, tokenizer="hf", theta=1000000.0,
                  extra={"use_sliding_window": False, "sliding_window": None}),
    "opt": dict(model_type="opt", d=64, heads=4, kv=4, d_ff=256, act="relu", tied=True,
                tokenizer="hf", max_pos=64),
    "opt_bare": dict(model_type="opt", d=64, heads=4, kv=4, d_ff=128, act="relu", tied=True,
                     tokenizer="hf", max_pos=64, bare=True),
    "llama_bf16": dict(dtype="BF16"),
    "llama_f16": dict(dtype="F16", tied=True),
    "llama_sharded": dict(shards=3, style=5),
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM"}
TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def spec(name):
    s = dict(BASE)
    s.update(VARIANTS[name])
    s["name"] = name
    s["head_dim"] = s["head_dim"] or s["d"] // s["heads"]
    return s


# ---------------------------------------------------------------------------------------------
# Text and tokenizers

_WORDS = {
    "subj": ["the old fisherman", "a small robot", "my grandmother", "the river", "every child",
             "the quiet engineer", "a brown fox", "the baker", "our teacher", "the night train"],
    "verb": ["carried", "painted", "found", "remembered", "counted", "followed", "built",
             "watched", "answered", "collected"],
    "obj": ["seven blue stones", "the morning light", "a letter from the north", "warm bread",
            "the last question", "three paper boats", "a quiet song", "the broken clock",
            "forty tiny lamps", "the map of the valley"],
    "tail": ["before the rain came.", "and smiled.", "while the city slept.", "without a word.",
             "in the garden by the sea.", "because it was Tuesday.", "under the bright moon.",
             "with great care.", "as the bells rang twice.", "near the wooden bridge."],
}


def corpus(n=400, seed=0):
    """Deterministic sentences (about 20 KB) for training the test tokenizers."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        parts = [_WORDS[k][rng.integers(len(_WORDS[k]))] for k in ("subj", "verb", "obj", "tail")]
        s = " ".join(parts)
        lines.append(s[0].upper() + s[1:])
    lines += ["Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.", "Punctuation, quotes \"like this\"; "
              "and (brackets) - dashes!", "Hello, world? Yes: hello world."]
    return lines


_CACHE = {}


def sentencepiece_model(vocab_size=320):
    """Bytes of a sentencepiece BPE model (unk 0, bos 1, eos 2), trained once per process."""
    key = ("sp", vocab_size)
    if key not in _CACHE:
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, num_threads=1,
            shuffle_input_sentence=False, minloglevel=2)
        _CACHE[key] = buf.getvalue()
    return _CACHE[key]


def hf_tokenizer_json(vocab_size=320):
    """Text of a byte-level BPE tokenizer.json (<s> <pad> </s> <unk> = 0..3), trained once."""
    key = ("hf", vocab_size)
    if key not in _CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus(), trainer=trainer)
        _CACHE[key] = tok.to_str()
    return _CACHE[key]


def tokenizer_vocab_size(kind):
    if kind == "sp":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_proto=sentencepiece_model()).get_piece_size()
    from tokenizers import Tokenizer

    return Tokenizer.from_str(hf_tokenizer_json()).get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------
# safetensors writing (our own, so BF16 and streaming are possible)


def to_bf16_bits(x):
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def encode_as(x, dtype):
    """(raw array to store, float32 values it represents) for dtype F32 | F16 | BF16."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x, x
    if dtype == "F16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    b = to_bf16_bits(x)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


def safetensors_header(entries):
    """entries: list of (name, dtype name, shape). Returns (header bytes incl. length, offsets)."""
    size = {"F32": 4, "F16": 2, "BF16": 2}
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * size[dt]
        meta[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(meta, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h, off


def write_safetensors(path, tensors, dtype):
    """tensors: dict name -> float32 array, stored as dtype. Returns the float32 values stored."""
    raws, values = {}, {}
    for k, v in tensors.items():
        raws[k], values[k] = encode_as(v, dtype)
    header, _ = safetensors_header([(k, dtype, r.shape) for k, r in raws.items()])
    with open(path, "wb") as f:
        f.write(header)
        for r in raws.values():
            f.write(np.ascontiguousarray(r).tobytes())
    return values


# ---------------------------------------------------------------------------------------------
# Weights


def hf_weights(s, seed=0):
    """dict HF tensor name -> float32 array for a variant spec."""
    rng = np.random.default_rng(seed)
    d, hd, f, V = s["d"], s["head_dim"], s["d_ff"], s["vocab"]
    qd, kvd = s["heads"] * hd, s["kv"] * hd

    def w(n, k):  # [n, k], fan-in scaled so x -> w x keeps O(1) activations
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def vec(n, scale=0.1, base=0.0):
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    out = {}
    if s["model_type"] == "opt":
        p = "model.decoder." if not s["bare"] else "decoder."
        out[p + "embed_tokens.weight"] = w(V, d) * 2  # std 2/sqrt(d): tied logits ~ N(0, 4)
        out[p + "embed_positions.weight"] = w(s["max_pos"] + 2, d) * 2
        for i in range(s["layers"]):
            L = f"{p}layers.{i}."
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                out[L + ln + ".weight"] = vec(d, base=1.0)
                out[L + ln + ".bias"] = vec(d)
            for m in ("q", "k", "v"):
                out[L + f"self_attn.{m}_proj.weight"] = w(d, d)
                out[L + f"self_attn.{m}_proj.bias"] = vec(d)
            out[L + "self_attn.out_proj.weight"] = w(d, d)
            out[L + "self_attn.out_proj.bias"] = vec(d)
            out[L + "fc1.weight"] = w(f, d)
            out[L + "fc1.bias"] = vec(f)
            out[L + "fc2.weight"] = w(d, f)
            out[L + "fc2.bias"] = vec(d)
        out[p + "final_layer_norm.weight"] = vec(d, base=1.0)
        out[p + "final_layer_norm.bias"] = vec(d)
        return out
    bias = s["model_type"] == "qwen2" or s["extra"].get("attention_bias", False)
    out["model.embed_tokens.weight"] = w(V, d) * 2
    for i in range(s["layers"]):
        L = f"model.layers.{i}."
        out[L + "input_layernorm.weight"] = vec(d, base=1.0)
        out[L + "self_attn.q_proj.weight"] = w(qd, d)
        out[L + "self_attn.k_proj.weight"] = w(kvd, d)
        out[L + "self_attn.v_proj.weight"] = w(kvd, d)
        out[L + "self_attn.o_proj.weight"] = w(d, qd)
        if bias:
            out[L + "self_attn.q_proj.bias"] = vec(qd)
            out[L + "self_attn.k_proj.bias"] = vec(kvd)
            out[L + "self_attn.v_proj.bias"] = vec(kvd)
            if s["model_type"] == "llama":
                out[L + "self_attn.o_proj.bias"] = vec(d)
        out[L + "post_attention_layernorm.weight"] = vec(d, base=1.0)
        out[L + "mlp.gate_proj.weight"] = w(f, d)
        out[L + "mlp.up_proj.weight"] = w(f, d)
        out[L + "mlp.down_proj.weight"] = w(d, f)
    out["model.norm.weight"] = vec(d, base=1.0)
    if not s["tied"]:
        out["lm_head.weight"] = w(V, d) * 2
    return out


def hf_config(s):
    c = {"architectures": [ARCHITECTURES[s["model_type"]]], "model_type": s["model_type"],
         "hidden_size": s["d"], "num_hidden_layers": s["layers"],
         "num_attention_heads": s["heads"], "vocab_size": s["vocab"],
         "max_position_embeddings": s["max_pos"], "tie_word_embeddings": s["tied"],
         "bos_token_id": s["bos"], "eos_token_id": s["eos"], "use_cache": True}
    if s["model_type"] == "opt":
        c.update(ffn_dim=s["d_ff"], activation_function=s["act"], do_layer_norm_before=True,
                 word_embed_proj_dim=s["d"], enable_bias=True, pad_token_id=1,
                 layer_norm_elementwise_affine=True, dropout=0.0, attention_dropout=0.0)
    else:
        c.update(intermediate_size=s["d_ff"], hidden_act=s["act"], rms_norm_eps=1e-5,
                 num_key_value_heads=s["kv"])
        if VARIANTS[s["name"]].get("head_dim"):
            c["head_dim"] = s["head_dim"]
        if s["style"] == 4:
            c["rope_theta"] = s["theta"]
            c["rope_scaling"] = s["rope"]
        else:
            c["rope_parameters"] = {"rope_theta": s["theta"], "rope_type": "default",
                                    **(s["rope"] or {})}
    c.update(s["extra"])
    if s["style"] == 4:
        c.update(torch_dtype=TORCH_DTYPE[s["dtype"]], transformers_version="4.46.0")
    else:
        c.update(dtype=TORCH_DTYPE[s["dtype"]], transformers_version="5.0.0")
    return c


def build(name, root, seed=None):
    """Write variant `name` into root/name; returns its path. The weights' seed defaults to one
    derived from the name, so every variant is a different model."""
    s = spec(name)
    seed = zlib.crc32(name.encode()) if seed is None else seed
    path = os.path.join(os.fspath(root), name)
    os.makedirs(path, exist_ok=True)
    tok_cfg = {"add_bos_token": s["model_type"] != "qwen2", "model_max_length": s["max_pos"]}
    if s["tokenizer"] == "sp":
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(sentencepiece_model())
        s.update(vocab=tokenizer_vocab_size("sp"), bos=1, eos=2)
        tok_cfg.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(hf_tokenizer_json())
        s.update(vocab=tokenizer_vocab_size("hf"), bos=2, eos=2)  # OPT: </s> is bos and eos
        if s["model_type"] == "qwen2":
            s.update(bos=None)
        tok_cfg.update(eos_token="</s>", pad_token="<pad>")
    if s["model_type"] == "qwen2":
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATE)
    else:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    _write_json(os.path.join(path, "tokenizer_config.json"), tok_cfg)
    if name == "llama_tied":  # several eos ids, from generation_config.json
        _write_json(os.path.join(path, "generation_config.json"),
                    {"bos_token_id": 1, "eos_token_id": [2, 5]})
    _write_json(os.path.join(path, "config.json"), hf_config(s))

    weights = hf_weights(s, seed)
    if s["shards"] == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), weights, s["dtype"])
    else:
        names = list(weights)
        groups = np.array_split(np.arange(len(names)), s["shards"])
        weight_map, total = {}, 0
        for k, idx in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{s['shards']:05d}.safetensors"
            part = {names[j]: weights[names[j]] for j in idx}
            write_safetensors(os.path.join(path, file), part, s["dtype"])
            weight_map.update({n: file for n in part})
            total += sum(v.nbytes for v in part.values())
        _write_json(os.path.join(path, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    return path


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Per-process caches: build each variant, and each conversion, once per test session.

_ROOT = None


def _root():
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="edgellm-tiny-")
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def checkpoint(name):
    """Path of variant `name`, built once per process. Treat it as read-only."""
    key = ("ckpt", name)
    if key not in _CACHE:
        _CACHE[key] = build(name, os.path.join(_root(), "hf"))
    return _CACHE[key]


def converted(name, quant="f32", group_size=32, ffn_down="auto"):
    """Path of variant `name` converted with (quant, group_size, ffn_down), once per process.
    Read-only. The converter's default ffn_down (auto) writes the down projection as a matrix;
    "bundle" for tests of what reads neurons as bundle rows (window and naive streaming)."""
    key = ("conv", name, quant, group_size, ffn_down)
    if key not in _CACHE:
        from edgellm.converters.convert import convert

        dst = os.path.join(_root(), "out", f"{name}-{quant}-g{group_size}-{ffn_down}")
        _CACHE[key] = convert(checkpoint(name), dst, quant=quant, group_size=group_size,
                              progress=False, ffn_down=ffn_down)
    return _CACHE[key]


def token_ids(name, n=12, seed=1):
    """A fixed prompt of n token ids for a variant (BOS first when it has one)."""
    s = spec(name)
    V = tokenizer_vocab_size(s["tokenizer"])
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, V, size=n).tolist()
    return ([1] if s["tokenizer"] == "sp" else [2]) + ids[1:]
