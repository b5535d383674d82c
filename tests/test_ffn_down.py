"""`edgellm convert --ffn-down matrix` (the default where it can be written: `auto`): the FFN down
projection written as a matrix of its own (docs/FORMAT.md §3.2) instead of a column in every
bundle row. Checked against the source weights (the stored matrix is the codec's own rounding of
W_down), against the plain NumPy forward pass of tests/reference.py run on the weights the model
holds, against the bundle layout, and fused decode against the general path, bit for bit; and
which layout `auto` picks."""

import json
import os

import numpy as np
import pytest

import edgellm
import reference
import tiny
from edgellm.converters.convert import convert
from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError, EdgeLLMError
from edgellm.runtime.kernels import qgemm, simd

_MODELS = {}
# enough layers that streaming them one at a time takes less memory than holding them all
tiny.VARIANTS.setdefault("llama_5layers", dict(layers=5))


def matrix_model(name, quant):
    """variant `name` converted with --ffn-down matrix, once per process (read-only)."""
    key = (name, quant)
    if key not in _MODELS:
        dst = os.path.join(tiny._root(), "out", f"{name}-{quant}-down-matrix")
        _MODELS[key] = convert(tiny.checkpoint(name), dst, quant=quant, progress=False,
                               ffn_down="matrix")
    return _MODELS[key]


def held_weights(rt, src):
    """The source checkpoint's tensors with every matrix replaced by what the model holds,
    decoded (float64): the exact weights the edgellm forward pass multiplies with."""
    W = reference.load_tensors(src)
    W["model.embed_tokens.weight"] = rt.embed.dequantize().astype(np.float64)
    if "lm_head.weight" in W:
        W["lm_head.weight"] = rt.head.dequantize().astype(np.float64)
    d = rt.cfg.d_model
    for i, L in enumerate(rt.layers):
        p = f"model.layers.{i}."
        for name, m in (("self_attn.q_proj", L.q), ("self_attn.k_proj", L.k),
                        ("self_attn.v_proj", L.v), ("self_attn.o_proj", L.o)):
            W[p + name + ".weight"] = m.dequantize().astype(np.float64)
        parts = {e["name"]: e for e in L.ffn.layout}
        assert sorted(parts) == ["gate", "up"]  # no down column in the bundles
        for part in ("gate", "up"):
            W[p + f"mlp.{part}_proj.weight"] = encodings.unpack_bundle_part(
                L.ffn.bundles, parts[part], d).astype(np.float64)
        W[p + "mlp.down_proj.weight"] = L.ffn.down.dequantize().astype(np.float64)
    return W


@pytest.mark.parametrize("quant", ["f16", "int8", "int4"])
def test_down_matrix_is_the_codecs_rounding_of_w_down(quant):
    src = tiny.checkpoint("llama")
    rt = edgellm.load(matrix_model("llama", quant)).runtime
    W = reference.load_tensors(src)
    c = encodings.codec(quant, 32 if quant == "int4" else None)
    for i, L in enumerate(rt.layers):
        w = W[f"model.layers.{i}.mlp.down_proj.weight"].astype(np.float32)
        assert L.ffn.down is not None and L.ffn.down.shape == w.shape
        assert L.ffn.down.codec.name == quant
        q, s = c.quantize(w)  # quantized along d_ff, the matrix's rows
        assert np.array_equal(L.ffn.down.q.view(np.uint8), q.view(np.uint8))
        if s is not None:
            assert np.array_equal(L.ffn.down.s.view(np.uint8), s.view(np.uint8))


@pytest.mark.parametrize("quant", ["f16", "int8", "int4"])
def test_prefill_matches_numpy_forward_on_held_weights(quant, monkeypatch):
    """Prefill (float32 tiles, no activation quantization) against the float64 NumPy forward on
    the very weights the model holds: float32 rounding apart, the same function. (int8/int4
    differed by ~0.5% of the logit scale until the last token's head product, a one-row matvec,
    stopped going through decode's int8 activation blocks: model.forward's float_act.) The
    integer GEMM (int8 activation blocks) is off here: tests/test_prefill_gemm.py checks it."""
    monkeypatch.setattr(qgemm, "ENABLED", False)
    src = tiny.checkpoint("llama")
    rt = edgellm.load(matrix_model("llama", quant), kv="f32").runtime  # no cache rounding
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    ids = tiny.token_ids("llama", 12)
    expected = reference._llama(c, held_weights(rt, src), np.asarray(ids))[-1:]
    rt.reset()
    got = rt.forward(ids)
    scale = np.abs(expected).max()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * scale


@pytest.mark.skipif(not simd.AVAILABLE, reason="the SIMD kernels need the JIT")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_fused_decode_equals_general_path(quant):
    from test_fused import check_equal

    m = check_equal(matrix_model("llama", quant), "f16", "llama", steps=6)
    assert m.runtime.layers[0].ffn.down is not None


def test_f16_layouts_compute_the_same_model():
    """At f16 the down column and the down row hold the same float16 values: both layouts give
    the same logits, up to the order of float32 sums."""
    ids = tiny.token_ids("llama", 10)
    out = []
    for path in (tiny.converted("llama", "f16", ffn_down="bundle"), matrix_model("llama", "f16")):
        rt = edgellm.load(path).runtime
        rt.reset()
        seq = [rt.forward(ids)[-1].copy()]
        for _ in range(4):
            seq.append(rt.forward([int(np.argmax(seq[-1]))])[-1].copy())
        out.append(np.array(seq))
    assert np.abs(out[0] - out[1]).max() <= 1e-4 * np.abs(out[0]).max()


def test_neuron_streaming_refuses_the_matrix_layout():
    """A neuron is a row of the bundles but a column of the down matrix: naive mode (and
    window, which also needs predictors) refuses the layout, naming the way out."""
    with pytest.raises(EdgeLLMError, match="--mode dense.*--ffn-down bundle"):
        edgellm.load(matrix_model("llama", "int8"), dram_budget=10 ** 9, mode="naive")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_dense_streaming_of_the_matrix_layout_is_exact(quant):
    """Under any budget down to the minimum, dense mode streams the down matrix with its layer
    (or keeps it resident) and gives the mapped model's logits and tokens, bit for bit."""
    from edgellm.runtime import format
    from edgellm.runtime import plan as planner

    path = matrix_model("llama_5layers", quant)
    manifest, cfg = format.read_manifest(path)
    ids = tiny.token_ids("llama_5layers")

    def run(m):
        m.runtime.prefill_block = 1  # budgeted runs prefill token by token
        logits = m.logits(ids)
        m.complete(ids, max_tokens=8, temperature=0, repetition_penalty=1.0)
        return logits, list(m.last_stats["token_ids"])

    # mapped: the stored rows (a model read into memory may decode from int4 rows packed 16 at
    # a time, kernels/rows16.py, whose float sums run in another order)
    ref = run(edgellm.load(path, n_ctx=64, mmap=True))
    low = planner.minimum_budget(manifest, cfg, "dense", n_ctx=64)
    for budget in (low, low * 3, 10**9):
        m = edgellm.load(path, n_ctx=64, dram_budget=budget, mode="dense")
        if budget == low:  # every FFN streams, its down matrix with it
            assert not any(m.plan.ffn_resident) and m.plan.stage_bytes
        got = run(m)
        assert np.array_equal(got[0], ref[0]) and got[1] == ref[1]
        assert m.stream.allocated_bytes <= budget


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="gptq", quant="int4"), "--method gptq"),
    (dict(prune_neurons=0.25), "--prune-neurons"),
    (dict(ffn_down="column"), "auto, bundle, matrix"),
])
def test_refused_combinations(tmp_path, kwargs, match):
    args = dict(quant="int8", ffn_down="matrix")
    args.update(kwargs)
    with pytest.raises(ConvertError, match=match):
        convert(tiny.checkpoint("llama"), tmp_path / "out", progress=False, **args)
    assert not (tmp_path / "out").exists()


def down_layout(path):
    """"matrix" or "bundle": where a converted model keeps its FFN down projection."""
    with open(os.path.join(path, "manifest.json")) as f:
        layer = json.load(f)["chunks"][1]["tensors"]
    parts = [p["name"] for p in layer["ffn_bundles"]["parts"]]
    assert ("ffn_down" in layer) != ("down" in parts)
    return "matrix" if "ffn_down" in layer else "bundle"


@pytest.mark.parametrize("kwargs,want", [
    (dict(), "matrix"),  # the plain quantizer, no calibration: the fast resident layout
    (dict(calib=tiny.__file__), "bundle"),  # calibration serves the neuron-reading modes
    (dict(prune_neurons=0.25), "bundle"),  # structural steps: bundles (re-encoding re-rounds)
    (dict(ffn_down="bundle"), "bundle"),
])
def test_auto_layout(tmp_path, kwargs, want):
    args = dict(quant="int8")
    args.update(kwargs)
    out = convert(tiny.checkpoint("llama"), tmp_path / "out", progress=False, **args)
    assert down_layout(out) == want


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_requantized_gguf_writes_the_matrix(tmp_path, quant):
    """A GGUF file re-quantized (not kept) gets the matrix layout too, with the logits of the same
    conversion from the Hugging Face checkpoint it was written from (the same float weights)."""
    from test_gguf import write_gguf_from_hf

    src = write_gguf_from_hf("llama", tmp_path / "llama.gguf")
    got = convert(src, tmp_path / "out", quant=quant, progress=False)
    assert down_layout(got) == "matrix"
    ids = tiny.token_ids("llama", n=12)
    a = edgellm.load(got).logits(ids)
    b = edgellm.load(matrix_model("llama", quant)).logits(ids)
    assert np.abs(a - b).max() <= 1e-5 * float(np.abs(b).max())
