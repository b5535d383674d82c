"""The Hugging Face converter on tiny random checkpoints of every supported variant (tests/tiny.py).

What is checked, from the bottom up:
- f32 conversion stores every source tensor bit for bit under its canonical name (the expected
  names are written out below, independently of converters/arch.py), bundles hold gate/up rows
  and down columns, nothing else is stored;
- edgellm's logits from the converted directory equal an independent NumPy forward pass computed
  straight from the Hugging Face checkpoint (tests/reference.py);
- lossy encodings stay within their codec's per-row error bound, the manifest reports the error it
  measured, and the logits move by no more than the stated bounds;
- config parsing (transformers 4.x and 5.x keys), manifest contents, int4 fallback, destination
  handling.
"""

import json
import os
import shutil

import numpy as np
import pytest

import edgellm
import reference
import tiny
from edgellm.converters import arch, quantize
from edgellm.converters.convert import convert
from edgellm.converters.sources.hf import bf16_to_f32
from edgellm.runtime import encodings, format
from edgellm.runtime.errors import ConvertError
from edgellm.runtime.reader import Reader

VARIANTS = list(tiny.VARIANTS)

# canonical name -> Hugging Face name, written out independently of converters/arch.py
LLAMA_GLOBAL = {"tok_embeddings": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output": "lm_head.weight"}
LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_o": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_o.bias": "self_attn.o_proj.bias",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
OPT_GLOBAL = {"tok_embeddings": "decoder.embed_tokens.weight",
              "pos_embeddings": "decoder.embed_positions.weight",
              "norm.weight": "decoder.final_layer_norm.weight",
              "norm.bias": "decoder.final_layer_norm.bias", "output": "lm_head.weight"}
OPT_LAYER = {
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "ffn_norm.weight": "final_layer_norm.weight", "ffn_norm.bias": "final_layer_norm.bias",
    "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_o": "self_attn.out_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_o.bias": "self_attn.out_proj.bias",
    "up": "fc1.weight", "down": "fc2.weight", "ffn_up.bias": "fc1.bias",
    "ffn_down.bias": "fc2.bias",
}


def source_tensors(name):
    """canonical chunk -> {canonical name: float64 array} from the HF checkpoint."""
    W = reference.load_tensors(tiny.checkpoint(name))
    s = tiny.spec(name)
    if s["model_type"] == "opt":
        pre = "" if s["bare"] else "model."  # opt_bare: saved without the "model." prefix
        g = {k: W.get(v if k == "output" else pre + v) for k, v in OPT_GLOBAL.items()}
        layer = {k: pre + "decoder.layers.{i}." + v for k, v in OPT_LAYER.items()}
    else:
        g = {k: W.get(v) for k, v in LLAMA_GLOBAL.items()}
        layer = {k: "model.layers.{i}." + v for k, v in LLAMA_LAYER.items()}
    out = {format.EMBED_CHUNK: {k: v for k, v in g.items() if v is not None}}
    for i in range(s["layers"]):
        t = {k: W.get(v.format(i=i)) for k, v in layer.items()}
        out[format.layer_chunk(i)] = {k: v for k, v in t.items() if v is not None}
    return out


def open_model(path):
    m, cfg = format.read_manifest(path)
    return m, cfg, Reader(path, m)


def decoded(reader, m):
    """chunk -> {canonical name or bundle part: float64 array} decoded with the runtime codecs."""
    cfg = m["config"]
    out = {}
    for c in m["chunks"]:
        f, t = c["file"], {}
        for name, e in c["tensors"].items():
            if e["encoding"] == "bundle":
                b = reader.array(f, name)
                for p in e["parts"]:
                    t[p["name"]] = encodings.unpack_bundle_part(b, p, cfg["d_model"])
            elif e["encoding"] == "i32":
                t[name] = reader.array(f, name)
            elif len(e["shape"]) == 1:
                t[name] = reader.vector(f, name)
            else:
                t[name] = reader.matrix(f, name).dequantize()
        out[f] = t
    return out


def compare_to_source(name, dec, check):
    src = source_tensors(name)
    for chunk, tensors in src.items():
        got = dec[chunk]
        if chunk != format.EMBED_CHUNK:
            perm = got.pop("ffn_perm")
            assert perm.dtype == np.int32 and (perm == np.arange(perm.size)).all()
        apart = "ffn_down" in got  # the down projection as a matrix of its own, [d, d_ff]
        names = {"down" if k == "ffn_down" else k for k in got}
        assert names == set(tensors), (chunk, sorted(got), sorted(tensors))
        for k, x in tensors.items():
            if k == "down" and apart:
                k = "ffn_down"
            elif k == "down":  # bundle row i holds column i of the [d, d_ff] down matrix
                x = x.T
            check(f"{chunk}/{k}", np.asarray(got[k], np.float64), x)


# ---------------------------------------------------------------------------------------------
# f32: exact


@pytest.mark.parametrize("name", VARIANTS)
def test_f32_stores_every_source_tensor_exactly(name):
    m, cfg, r = open_model(tiny.converted(name, "f32"))

    def exact(key, y, x):
        assert y.shape == x.shape, key
        assert np.array_equal(y, x), key

    compare_to_source(name, decoded(r, m), exact)


@pytest.mark.parametrize("name", VARIANTS)
def test_f32_logits_match_independent_reference(name):
    ids = tiny.token_ids(name, n=16)
    ref = reference.forward(tiny.checkpoint(name), ids)
    # f32 KV cache: the f16 default moves logits by ~6e-4 of their size (INTERNALS.md, KV cache)
    out = edgellm.load(tiny.converted(name, "f32"), kv="f32").logits(ids)
    vocab = tiny.tokenizer_vocab_size(tiny.spec(name)["tokenizer"])
    assert out.shape == ref.shape == (len(ids), vocab)
    # float32 arithmetic against a float64 reference: ~1e-6 relative in practice
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", VARIANTS)
def test_config(name):
    s = tiny.spec(name)
    _, cfg, _ = open_model(tiny.converted(name, "f32"))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (
        s["d"], s["layers"], s["heads"], s["kv"], s["head_dim"], s["d_ff"])
    assert cfg.vocab_size == tiny.tokenizer_vocab_size(s["tokenizer"])
    assert cfg.tied_embeddings == s["tied"]
    assert cfg.activation == s["act"]
    if s["model_type"] == "opt":
        assert (cfg.norm, cfg.positions, cfg.pos_offset, cfg.gated_ffn) == ("layer", "learned", 2,
                                                                              False)
        assert cfg.qkv_bias and cfg.o_bias and cfg.ffn_bias
        assert cfg.max_context == s["max_pos"] and cfg.norm_eps == 1e-5
        return
    assert (cfg.norm, cfg.positions, cfg.gated_ffn, cfg.ffn_bias) == ("rms", "rope", True, False)
    assert cfg.norm_eps == 1e-5 and cfg.rope_theta == s["theta"]
    bias = s["model_type"] == "qwen2" or s["extra"].get("attention_bias", False)
    assert cfg.qkv_bias == bias
    assert cfg.o_bias == (bias and s["model_type"] == "llama")
    rope = dict(s["rope"]) if s["rope"] else None
    if rope and "type" in rope:
        rope["rope_type"] = rope.pop("type")
    assert cfg.rope_scaling == rope
    # mistral's sliding window (256) is below max_position_embeddings (512): context capped
    assert cfg.max_context == (256 if name == "mistral" else s["max_pos"])


def test_manifest_tokenizer_template_special_ids_provenance():
    m, cfg, _ = open_model(tiny.converted("llama", "f32"))
    assert m["tokenizer"] == {"kind": "sentencepiece", "file": "tokenizer.model", "add_bos": True}
    assert m["chat_template"] == tiny.CHAT_TEMPLATE
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, [2])
    p = m["provenance"]
    assert p["source"] == os.path.abspath(tiny.checkpoint("llama"))
    assert {"converter_version", "command", "date"} <= set(p)
    assert p["quantization"]["quant"] == "f32" and p["source_dtypes"] == ["F32"]
    src = tiny.checkpoint("llama")
    with open(os.path.join(src, "tokenizer.model"), "rb") as a, \
            open(os.path.join(tiny.converted("llama", "f32"), "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()

    m, cfg, _ = open_model(tiny.converted("llama_tied", "f32"))
    assert cfg.eos_token_ids == [2, 5]  # from generation_config.json

    m, cfg, _ = open_model(tiny.converted("qwen2", "f32"))  # template from chat_template.jinja
    assert m["tokenizer"] == {"kind": "hf", "file": "tokenizer.json", "add_bos": False}
    assert m["chat_template"] == tiny.CHAT_TEMPLATE and cfg.bos_token_id is None

    m, cfg, _ = open_model(tiny.converted("opt", "f32"))
    assert m["tokenizer"] == {"kind": "hf", "file": "tokenizer.json", "add_bos": True}
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (2, [2])
    m, _, _ = open_model(tiny.converted("mistral", "f32"))
    assert any("sliding_window" in n for n in m["provenance"]["notes"])


@pytest.mark.parametrize("tok_cfg,template,want", [
    ({"add_bos_token": False, "tokenizer_class": "LlamaTokenizerFast"}, True, False),
    ({}, True, True),  # Llama 3 style: the template prepends <|begin_of_text|>
    ({"tokenizer_class": "GPT2Tokenizer"}, False, False),  # SmolLM style: nothing prepended
    ({"tokenizer_class": "LlamaTokenizerFast"}, False, True),  # the class default
])
def test_add_bos_from_the_source_tokenizer(tmp_path, tok_cfg, template, want):
    src = tmp_path / "src"
    shutil.copytree(tiny.checkpoint("llama"), src)
    (src / "tokenizer.model").unlink()
    tok = json.loads(tiny.hf_tokenizer_json())
    if template:
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [], "special_tokens": {}}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    spec = arch.from_hf_dir(src)
    from edgellm.converters.convert import find_tokenizer

    entry, _, _ = find_tokenizer(str(src), spec)
    assert entry == {"kind": "hf", "file": "tokenizer.json", "add_bos": want}


def test_tokenizer_round_trip_through_edgellm():
    model = edgellm.load(tiny.converted("llama", "f16"))
    ids = model.tokenizer.encode("The old fisherman counted seven blue stones.")
    assert ids[0] == 1 and len(ids) > 3
    assert model.tokenizer.decode(ids[1:]) == "The old fisherman counted seven blue stones."


# ---------------------------------------------------------------------------------------------
# Lossy encodings


def row_bound(c, x):
    """Per-row worst-case error of codec c on rows x (the codec's own bound, applied per row)."""
    return np.array([c.max_error_bound(row[None, :]) for row in x])


@pytest.mark.parametrize("name", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("quant,g", [("f16", 32), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantized_tensors_within_codec_bound(name, quant, g):
    path = tiny.converted(name, quant, g)
    m, cfg, r = open_model(path)
    encs = {}
    for c in m["chunks"]:
        for k, e in c["tensors"].items():
            encs[(c["file"], k)] = e
    report = m["provenance"]["quantization"]["tensors"]

    def within(key, y, x):
        chunk, k = key.split("/")
        if x.ndim == 1:
            assert np.array_equal(y, x), key  # vectors stay f32
            return
        e = encs.get((chunk, k)) or encs[(chunk, "ffn_bundles")]
        enc = e["encoding"] if e["encoding"] != "bundle" else e["parts"][0]["encoding"]
        gs = e.get("group_size") if e["encoding"] != "bundle" else e["parts"][0]["group_size"]
        if k == "pos_embeddings":
            assert enc == "f32"
        else:
            assert enc == quant and (gs == g if quant == "int4" else gs is None), key
        codec = encodings.codec(enc, gs)
        x32 = x.astype(np.float32)
        err = np.abs(y - x32).max(axis=1)
        assert (err <= row_bound(codec, x32)).all(), key
        rk = key if e["encoding"] != "bundle" else f"{chunk}/ffn_bundles.{k}"
        assert report[rk]["encoding"] == enc
        assert report[rk]["max_abs_error"] == pytest.approx(float(err.max()), rel=1e-6, abs=1e-12)

    compare_to_source(name, decoded(r, m), within)


# Bounds on the logits' relative RMS error, rms(out - f32) / rms(f32).
# Each quantized matrix perturbs its output by about its relative weight error r (errors in random
# directions); about 16 matrices lie on the path (2 layers x q,k,v,o,gate,up,down, plus embedding
# and head), adding in quadrature: ~4r, times ~1.5 for amplification by attention and the FFN.
# Measured r on these Gaussian weights (rows of 64-128): f16 ~1.5e-4 (relative rounding 2^-12
# times a uniform mantissa); int8 ~0.006 (step max|row|/127 with max ~2.5 sigma, error
# step/sqrt(12)); int4 ~0.08-0.09 (step max|group|/8, groups of 32 or 64). Expected: f16 ~1e-3,
# int8 ~0.03, int4 ~0.4 (measured: f16 5e-4..1e-3, int8 0.014..0.028, int4 0.21..0.42).
# Bounds are ~2-3x the expectation. A layout or scale bug gives logits unrelated to the f32 ones,
# rms error ~1.4 (two independent vectors of equal size), far above every bound.
LOGIT_BOUNDS = {"f16": 3e-3, "int8": 0.08, "int4": 0.8}


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "llama_odd_heads"])
@pytest.mark.parametrize("quant,g", [("f16", 32), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantized_logits_close_to_f32(name, quant, g):
    ids = tiny.token_ids(name, n=24)
    ref = edgellm.load(tiny.converted(name, "f32")).logits(ids)
    out = edgellm.load(tiny.converted(name, quant, g)).logits(ids)
    rel = np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
    assert rel < LOGIT_BOUNDS[quant], rel
    assert rel > 0  # the encoding really was applied (the sources are f32)


@pytest.mark.parametrize("name", ["llama_f16", "llama_bf16"])
def test_f16_from_half_precision_source_is_lossless(name):
    # every bf16 value in f16's normal range (|x| >= 2^-14) has an exact f16 twin (8-bit vs
    # 11-bit significand); below it f16 is subnormal, with spacing 2^-24 (error <= 2^-25)
    m, _, r = open_model(tiny.converted(name, "f16"))

    def check(key, y, x):
        normal = np.abs(x) >= 2.0**-14
        assert np.array_equal(y[normal], x[normal]), key
        assert np.abs(y - x).max() <= 2.0**-25, key

    compare_to_source(name, decoded(r, m), check)


def test_int4_falls_back_to_int8_for_rows_not_divisible_by_the_group():
    # llama_odd_heads: head_dim 24, q_dim 96; attn_o rows have 96 values: 96 % 64 != 0
    m, _, _ = open_model(tiny.converted("llama_odd_heads", "int4", 64))
    fb = m["provenance"]["quantization"]["fallbacks"]
    assert sorted(fb) == ["layer_000.safetensors/attn_o", "layer_001.safetensors/attn_o"]
    layer = m["chunks"][1]["tensors"]
    assert layer["attn_o"]["encoding"] == "int8" and layer["attn_o"]["group_size"] is None
    assert layer["attn_q"] == {"encoding": "int4", "shape": [96, 64], "group_size": 64}
    assert {p["encoding"] for p in layer["ffn_bundles"]["parts"]} == {"int4"}
    m, _, _ = open_model(tiny.converted("llama_odd_heads", "int4", 32))
    assert m["provenance"]["quantization"]["fallbacks"] == {}


def test_int4_embedding():
    m, _, _ = open_model(tiny.converted("llama", "int4", 32))
    e = m["chunks"][0]["tensors"]
    assert e["tok_embeddings"]["encoding"] == e["output"]["encoding"] == "int4"


def test_encode_matrix_in_blocks_equals_one_block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 64)).astype(np.float32)
    for name in ("f16", "int8", "int4"):
        c = encodings.codec(name, 32 if name == "int4" else None)
        q1, s1, st1 = quantize.encode_matrix(lambda a, b: x[a:b], 37, 64, c)
        q2, s2, st2 = quantize.encode_matrix(lambda a, b: x[a:b], 37, 64, c, block_values=5 * 64)
        assert np.array_equal(q1, q2) and (s1 is None or np.array_equal(s1, s2)) and st1 == st2


def test_bf16_widening_is_exact():
    bits = np.array([0x3F80, 0xBF80, 0x4049, 0x0000, 0x8000, 0x7F80, 0x0001], np.uint16)
    want = np.array([1.0, -1.0, 3.140625, 0.0, -0.0, np.inf, 9.18355e-41], np.float32)
    got = bf16_to_f32(bits)
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Config parsing


LLAMA_4X = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 300, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, "tie_word_embeddings": True}


def test_config_transformers_4x_and_5x_agree():
    v5 = {k: v for k, v in LLAMA_4X.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA_4X["rope_scaling"]}
    v5["head_dim"] = 16
    a, b = arch.from_hf_config(LLAMA_4X).config, arch.from_hf_config(v5).config
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"
    # 4.x "type" key, and "default" meaning no scaling
    old = dict(LLAMA_4X, rope_scaling={"type": "linear", "factor": 2.0})
    assert arch.from_hf_config(old).config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = dict(v5, rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    assert arch.from_hf_config(plain).config.rope_scaling is None
    assert arch.from_hf_config(dict(LLAMA_4X, hidden_act="swish")).config.activation == "silu"


def test_spec_names_follow_config_flags():
    spec = arch.from_hf_config(LLAMA_4X)
    assert "output" not in spec.global_tensors()  # tied
    untied = arch.from_hf_config(dict(LLAMA_4X, tie_word_embeddings=False))
    assert untied.global_tensors()["output"] == "lm_head.weight"
    q = arch.from_hf_config(dict(LLAMA_4X, model_type="qwen2"))
    assert "attn_q.bias" in q.layer_tensors(0) and "attn_o.bias" not in q.layer_tensors(0)


# ---------------------------------------------------------------------------------------------
# Destination handling


def test_existing_destination_refused_unless_overwrite(tmp_path):
    src = tiny.checkpoint("llama")
    dst = tmp_path / "out"
    convert(src, dst, quant="int8", progress=False)
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, dst, quant="f32", progress=False)
    assert json.loads((dst / "manifest.json").read_text())["provenance"]["quantization"][
        "quant"] == "int8"
    convert(src, dst, quant="f32", progress=False, overwrite=True)
    assert json.loads((dst / "manifest.json").read_text())["provenance"]["quantization"][
        "quant"] == "f32"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or old directory left
    edgellm.load(dst, verify=True)


def test_overwrite_refuses_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ConvertError, match="not an edgellm model directory"):
        convert(tiny.checkpoint("llama"), tmp_path / "notes", progress=False, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_progress_bar(tmp_path, capsys):
    convert(tiny.checkpoint("opt"), tmp_path / "o", quant="f16", progress=True)
    err = capsys.readouterr().err
    assert "convert" in err and "3/3" in err  # embed + 2 layers


def test_cli_convert(tmp_path, capsys):
    from edgellm.cli import main

    dst = tmp_path / "cli"
    assert main(["convert", tiny.checkpoint("llama"), "-o", str(dst), "--quant", "int4"]) == 0
    m, _ = format.read_manifest(dst)
    assert m["chunks"][1]["tensors"]["attn_q"]["encoding"] == "int4"
    # the default layout, said: the down projection apart (window/naive streaming refuse it)
    assert "ffn_down" in m["chunks"][1]["tensors"]
    assert "FFN down projection: a matrix apart" in capsys.readouterr().out
    assert main(["convert", tiny.checkpoint("llama"), "-o", str(tmp_path / "b"), "--quant",
                 "int4", "--ffn-down", "bundle"]) == 0
    assert "FFN down projection: in the bundle rows" in capsys.readouterr().out
    assert main(["convert", tiny.checkpoint("llama"), "-o", str(dst)]) == 1  # exists: clear error
