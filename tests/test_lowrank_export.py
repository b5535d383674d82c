"""Models with low-rank attention projections (--low-rank, FORMAT.md §3.4: P.left and P.right)
through the steps that read a model back: `edgellm export` (Hugging Face, GGUF, ONNX: each gets
the product left · right), layer dropping, and a recipe that puts `lowrank` before drop_layers,
prune_neurons and predictor. References: tests/reference.py (a NumPy forward pass of the
exported checkpoint, no edgellm code), the factors multiplied here in NumPy, llama.cpp's gguf
dequantization, onnxruntime."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import edgellm
import reference
import tiny
from edgellm.converters import calibrate, recipe, structural
from edgellm.converters.convert import convert
from edgellm.export import export
from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError
from edgellm.runtime.kernels import qgemm
from test_recipe import FAST  # the recipe settings that keep a test fast

TOL = 1e-4  # same weights, float32 summation order only (left · (right · x) vs (left · right) x)
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_o": "self_attn.o_proj"}


@pytest.fixture(autouse=True)
def float_prefill(monkeypatch):
    """The exported model runs with float32 activations (onnxruntime, transformers, the NumPy
    reference): edgellm's side too, prefill's integer GEMM off (it quantizes activations to int8
    blocks, ~2% of the logit scale; tests/test_prefill_gemm.py checks it on its own)."""
    monkeypatch.setattr(qgemm, "ENABLED", False)


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """{quant: low-rank model dir} for f32 and int8 factors of tiny llama."""
    root = tmp_path_factory.mktemp("lrx")
    return {q: convert(tiny.checkpoint("llama"), root / q, quant=q, low_rank=0.6,
                       progress=False, method_options={"tokens": 512})
            for q in ("f32", "int8")}


def _factors(model_dir):
    """{(layer, projection): left · right} in float64, dequantized here from the chunk files."""
    man = json.load(open(os.path.join(model_dir, "manifest.json")))
    out = {}
    for i, c in enumerate(man["chunks"][1:]):
        t = load_file(os.path.join(model_dir, c["file"]))
        for p in HF:
            if p + ".left" not in c["tensors"]:
                continue
            lr = []
            for part in (".left", ".right"):
                x = t[p + part].astype(np.float64)
                if c["tensors"][p + part]["encoding"] == "int8":  # per-row scale (FORMAT.md)
                    x = x * t[format.scales_name(p + part)].astype(np.float64).reshape(-1, 1)
                lr.append(x)
            out[i, p] = lr[0] @ lr[1]
    assert out, "the conversion factorized nothing: the tests would not test it"
    return out


def _logits(model_dir, ids):
    return edgellm.load(model_dir, kv="f32").logits(ids)


@pytest.mark.parametrize("quant", ["f32", "int8"])
def test_hf_export_holds_the_product(tmp_path, lowrank, quant):
    src = lowrank[quant]
    out = export(src, tmp_path / "hf", to="hf", progress=False)
    w = load_file(os.path.join(out, "model.safetensors"))
    for (i, p), want in _factors(src).items():
        got = w[f"model.layers.{i}.{HF[p]}.weight"]
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (i, p)
    ids = tiny.token_ids("llama", 12)
    want = reference.forward(out, ids)
    got = _logits(src, ids)
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))
    # the export is the factorized model, not the source it came from (the test could fail)
    assert np.abs(reference.forward(tiny.checkpoint("llama"), ids) - want).max() > 100 * TOL


def test_gguf_export_round_trips(tmp_path, lowrank):
    gguf = pytest.importorskip("gguf")
    from edgellm.converters.sources.gguf import unpermute

    src = lowrank["f32"]
    report = {}
    out = export(src, tmp_path / "m.gguf", to="gguf", progress=False, report=report)
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    cfg = edgellm.load(src).config
    for (i, p), want in _factors(src).items():
        name = f"blk.{i}.{'attn_output' if p == 'attn_o' else p}.weight"
        assert report["tensors"][name]["type"] == "F32"
        got = np.asarray(t[name].data, np.float64).reshape(want.shape)
        if p in ("attn_q", "attn_k"):  # llama.cpp's interleaved rotary rows
            got = unpermute(got, cfg.n_heads if p == "attn_q" else cfg.n_kv_heads)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (i, p)
    back = convert(out, tmp_path / "back", quant="f32", progress=False)
    ids = tiny.token_ids("llama", 12)
    a, b = _logits(back, ids), _logits(src, ids)
    assert np.abs(a - b).max() <= TOL * max(1.0, float(np.abs(b).max()))


def test_onnx_export_runs_like_edgellm(tmp_path, lowrank):
    pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime)")
    from edgellm.export_onnx import OnnxRunner

    src = lowrank["int8"]
    out = export(src, tmp_path / "o", to="onnx", progress=False)
    ids = tiny.token_ids("llama", 12)
    want = edgellm.load(src, kv="f32").runtime.forward(ids, all_logits=True)
    got = OnnxRunner(out, threads=1).forward(ids)
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))


def _without_layer(hf_dir, drop, dst):
    """A copy of HF checkpoint hf_dir without layer `drop` (later layers renumbered)."""
    shutil.copytree(hf_dir, dst)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    w = load_file(os.path.join(dst, "model.safetensors"))
    out = {}
    for k, v in w.items():
        parts = k.split(".")
        if parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            if i == drop:
                continue
            parts[2] = str(i - (i > drop))
        out[".".join(parts)] = v
    save_file(out, os.path.join(dst, "model.safetensors"))
    cfg["num_hidden_layers"] -= 1
    json.dump(cfg, open(cfg_path, "w"))
    return dst


def test_drop_layers_keeps_the_factors(tmp_path, lowrank):
    src = lowrank["int8"]
    hf = export(src, tmp_path / "hf", to="hf", progress=False)
    # by the metric: its calibration pass reads the model through a float32 export
    info = structural.drop_by_metric(src, tmp_path / "d", 1, "angular",
                                     calibrate.CalibOptions(tokens=512).check())
    drop = info["dropped"][0]
    man = json.load(open(tmp_path / "d" / "manifest.json"))
    kept = [k for k in range(2) if k != drop][0]
    src_man = json.load(open(os.path.join(src, "manifest.json")))
    assert man["chunks"][1]["tensors"] == src_man["chunks"][kept + 1]["tensors"]
    assert any(k.endswith(".left") for k in man["chunks"][1]["tensors"])
    ref = _without_layer(hf, drop, tmp_path / "ref")
    ids = tiny.token_ids("llama", 12)
    want = reference.forward(ref, ids)
    assert np.abs(_logits(tmp_path / "d", ids) - want).max() <= \
        TOL * max(1.0, float(np.abs(want).max()))


def test_convert_drop_layers_keeps_the_factors(tmp_path, lowrank):
    """`edgellm convert LOWRANK -o DST --drop-layers 1` (no --quant: the model's encodings);
    with a --quant it would convert a dense export again: refused, nothing written."""
    src = lowrank["int8"]
    with pytest.raises(ConvertError, match="multiplies the factors back"):
        convert(src, tmp_path / "q", quant="int8", drop_layers=1, progress=False)
    assert not os.path.exists(tmp_path / "q")
    out = convert(src, tmp_path / "d", quant=None, drop_layers=1, progress=False,
                  calib_options={"tokens": 512})
    layer = json.load(open(os.path.join(out, "manifest.json")))["chunks"][1]["tensors"]
    assert any(k.endswith(".left") for k in layer)


def test_recipe_steps_after_lowrank(tmp_path):
    body = FAST + """
[[step]]
kind = "lowrank"
fraction = 0.6
quant = "int8"

[[step]]
kind = "drop_layers"
n = 1

[[step]]
kind = "prune_neurons"
fraction = 0.5

[[step]]
kind = "predictor"
"""
    path = tmp_path / "r.toml"
    path.write_text(body)
    report = recipe.run(tiny.checkpoint("llama"), tmp_path / "out", str(path), progress=False)
    assert [r["kind"] for r in report] == ["lowrank", "drop_layers", "prune_neurons",
                                           "predictor"]
    assert all(np.isfinite(r["perplexity"]) for r in report)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    layer = m["chunks"][1]["tensors"]
    assert m["config"]["n_layers"] == 1 and m["config"]["d_ff"] == 64
    assert any(k.endswith(".left") for k in layer) and "ffn_pred.a" in layer
    # the lowrank step's factors of the kept layer went through unchanged
    ranks = report[0]["info"]["ranks"][m["provenance"]["layer_map"][0]]
    for p, r in ranks.items():
        assert (p + ".left" in layer) == (r is not None)
        if r is not None:
            assert layer[p + ".left"]["shape"][1] == r
    ids = tiny.token_ids("llama", 8)
    assert np.isfinite(edgellm.load(tmp_path / "out").logits(ids)).all()
    assert sorted(os.listdir(tmp_path)) == ["out", "r.toml"]


@pytest.mark.parametrize("kind", ["quantize", "prune", "lowrank"])
def test_steps_that_would_multiply_the_factors_back_refused(tmp_path, kind):
    opts = {"quantize": 'quant = "int8"', "prune": 'method = "magnitude"',
            "lowrank": "fraction = 0.5"}[kind]
    path = tmp_path / "r.toml"
    path.write_text(f'[[step]]\nkind = "lowrank"\nfraction = 0.6\n[[step]]\nkind = "{kind}"\n'
                    f"{opts}\n")
    with pytest.raises(ConvertError,
                       match=rf"step 2 \({kind}\): comes after step 1 \(lowrank\).*multiplies "
                             "the factors back"):
        recipe.run(tiny.checkpoint("llama"), tmp_path / "out", str(path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["r.toml"]
