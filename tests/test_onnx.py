"""ONNX interop (converters/sources/onnx.py, edgellm/export_onnx.py), against onnxruntime.

Export (`edgellm export MODEL --to onnx`), tiny models and the demo model: onnxruntime's logits on
the exported graph equal edgellm's, for a whole prompt and token by token through the graph's KV
cache (present.* fed back as past_key_values.*). The weights are the stored ones, so only float32
summation order differs: tolerance 1e-4 absolute on logits of magnitude ~10 (observed ~6e-6). The
graph really holds the quantized weights: MatMulNBits' B and scales decoded by a NumPy statement of
its convention ((code - 8) · scale, codes low nibble first) equal edgellm's decoded matrices; int8
weights are int8 initializers behind DequantizeLinear.

Import (`edgellm convert model.onnx`): tiny transformers models exported by torch.onnx.export
(the TorchScript exporter optimum uses: anonymous transposed MatMul weights), with names, and with
every initializer and node name stripped and the weights in external data (the graph tracer
alone). The converted model's logits equal onnxruntime's on the same file (1e-4, float32
summation order), and its chunks equal, byte for byte, those converted from the Hugging Face
checkpoint the ONNX was exported from (same weights, same quantizer).

Bad input: an existing output, a graph that does not match config.json, an already quantized
graph: a clear error naming the file, nothing written.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

import edgellm
import tiny
from edgellm.export import ExportError
from edgellm.runtime.errors import ConvertError
from edgellm.runtime.kernels import qgemm

onnx = pytest.importorskip("onnx", reason="needs the [onnx] extra (onnx, onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime)")

from edgellm.export_onnx import OnnxRunner, export_onnx  # noqa: E402

TOL = 1e-4  # same weights: float32 summation order only (observed <= 1e-5)
DEMO = os.path.join(os.path.dirname(edgellm.__file__), "data", "demo")


@pytest.fixture(autouse=True)
def float_prefill(monkeypatch):
    """The exported model runs with float32 activations (onnxruntime, transformers, the NumPy
    reference): edgellm's side too, prefill's integer GEMM off (it quantizes activations to int8
    blocks, ~2% of the logit scale; tests/test_prefill_gemm.py checks it on its own)."""
    monkeypatch.setattr(qgemm, "ENABLED", False)


def _edge_logits(path, ids):
    m = edgellm.load(path, kv="f32")
    return m.runtime.forward(ids, all_logits=True)


def _check_runs_like_edgellm(out, src, ids):
    ref = _edge_logits(src, ids)
    r = OnnxRunner(out, threads=1)
    full = r.forward(ids)
    assert np.abs(full - ref).max() < TOL
    r.reset()  # prompt in two pieces, then one token at a time through the KV cache
    k = len(ids) // 2
    steps = [r.forward(ids[:k])] + [r.forward([t]) for t in ids[k:]]
    assert np.abs(np.concatenate(steps) - ref).max() < TOL


EXPORTS = [("llama", "f32"), ("llama", "int8"), ("llama", "int4"), ("llama_tied", "f16"),
           ("qwen2", "int4"), ("opt", "int8"), ("llama_odd_heads", "int4"), ("llama", "int3")]


@pytest.mark.parametrize("name,quant", EXPORTS)
def test_export_logits_match(tmp_path, name, quant):
    src = tiny.converted(name, quant)
    report = {}
    out = export_onnx(src, tmp_path / "o", progress=False, report=report)
    assert sorted(os.listdir(out)) == sorted(
        ["model.onnx", "model.onnx_data", "config.json", "generation_config.json",
         "tokenizer_config.json", "chat_template.jinja",
         edgellm.load(src).manifest["tokenizer"]["file"]])
    _check_runs_like_edgellm(out, src, tiny.token_ids(name))
    kinds = set(report["tensors"].values())
    if quant == "int4":
        assert "MatMulNBits int4 g32" in kinds
    if quant == "int8":
        assert "DequantizeLinear int8 (axis 0) + MatMul" in kinds
    if quant == "int3":  # no ONNX twin: the decoded values, exactly, and said so
        assert "float32 (decoded from int3: no exact ONNX twin)" in kinds


def _initializers(path):
    m = onnx.load(os.path.join(path, "model.onnx"))  # with its external data
    return m, {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("ffn_down", ["auto", "bundle"])
def test_export_keeps_quantized_weights(tmp_path, ffn_down):
    """MatMulNBits B/scales decode (NumPy, its documented convention) to edgellm's weights."""
    from edgellm.export import _Model

    src = tiny.converted("llama", "int4", 64, ffn_down=ffn_down)
    out = export_onnx(src, tmp_path / "o", progress=False)
    m, inits = _initializers(out)
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    em = _Model(src)
    cfg = em.config
    # q, k, v, o, gate, up per layer, down where it is a matrix (the converter's default; down
    # rows in the bundles are decoded in the graph), plus the head: all int4
    assert em.down_is_matrix(0) == (ffn_down == "auto")
    assert len(nodes) == (6 + em.down_is_matrix(0)) * cfg.n_layers + 1
    for n in nodes:
        attrs = {a.name: a.i for a in n.attribute}
        assert n.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["block_size"] == 64
        assert len(n.input) == 3  # no zero points: the default 8 applies
        b, s = inits[n.input[1]], inits[n.input[2]]
        assert b.dtype == np.uint8 and b.shape == (attrs["N"], attrs["K"] // 64, 32)
        codes = np.stack([b & 15, b >> 4], axis=-1).reshape(attrs["N"], -1, 64)  # low first
        w = ((codes.astype(np.float32) - 8) * s.reshape(attrs["N"], -1, 1)).reshape(attrs["N"], -1)
        key = n.input[1][:-len(".nbits")]
        if key == "output":
            want = em.dense("output")
        else:
            i, name = key.split(".")[1], key.split(".")[2]
            want = em.dense(name, int(i))
        np.testing.assert_array_equal(w, want)
    src8 = tiny.converted("llama", "int8")
    out8 = export_onnx(src8, tmp_path / "o8", progress=False)
    m8, inits8 = _initializers(out8)
    dq = [n for n in m8.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 * cfg.n_layers + 1
    assert all(inits8[n.input[0]].dtype == np.int8 for n in dq)


def test_export_demo_model(tmp_path):
    """The demo (ReLU, tied int8 embedding): logits, and the head's 8-bit MatMulNBits bytes
    ((code - 128) · scale, the operator's default 8-bit zero point) decode to the embedding."""
    from edgellm.export import _Model

    out = export_onnx(DEMO, tmp_path / "demo", progress=False)
    tok = edgellm.load(DEMO).tokenizer
    ids = tok.encode("It is a truth universally acknowledged that a single man")
    _check_runs_like_edgellm(out, DEMO, ids)
    m, inits = _initializers(out)
    (head,) = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in head.attribute}
    assert attrs["bits"] == 8 and len(head.input) == 3
    b, s = inits[head.input[1]], inits[head.input[2]]
    w = (b.astype(np.float32) - 128) * s.reshape(b.shape[0], b.shape[1], 1)
    np.testing.assert_array_equal(w.reshape(attrs["N"], attrs["K"]),
                                  _Model(DEMO).dense("tok_embeddings"))


def test_export_cli_and_refusals(tmp_path, capsys):
    from edgellm.cli import main

    src = tiny.converted("llama", "int4")
    out = tmp_path / "cli"
    assert main(["export", src, "--to", "onnx", "-o", str(out)]) == 0
    assert os.path.isfile(out / "model.onnx")
    before = sorted(os.listdir(tmp_path))
    # an existing output is refused (nothing replaced) unless --force
    assert main(["export", src, "--to", "onnx", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    # not a model directory
    assert main(["export", str(tmp_path / "nope"), "--to", "onnx", "-o",
                 str(tmp_path / "x")]) == 1
    assert "nope" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(ExportError, match="unknown export target"):
        edgellm.export.export(src, tmp_path / "y", to="tflite")


# ---------------------------------------------------------------------------------------------
# Import: ONNX files made by torch.onnx.export from tiny transformers models


def _export_torch(name, root, strip=False, external=False):
    """model.onnx of tiny variant `name` as torch.onnx.export writes it, plus config.json and the
    tokenizer files next to it (the layout optimum writes)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    src = tiny.checkpoint(name)
    out = os.path.join(root, f"{name}-{int(strip)}{int(external)}")
    os.makedirs(out)
    for f in os.listdir(src):
        if not f.endswith((".safetensors", ".index.json")):
            shutil.copy(os.path.join(src, f), out)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()

    class Logits(torch.nn.Module):  # sdpa masks trace to aten::diff, which ONNX lacks
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              use_cache=False).logits

    path = os.path.join(out, "model.onnx")
    with torch.no_grad():
        torch.onnx.export(Logits(model), (torch.tensor([tiny.token_ids(name)]),), path,
                          dynamo=False, input_names=["input_ids"], output_names=["logits"],
                          opset_version=17, dynamic_axes={"input_ids": {0: "b", 1: "s"},
                                                          "logits": {0: "b", 1: "s"}})
    m = onnx.load(path)
    if strip:  # no names to go by: the tracer alone must find every weight
        new = {t.name: f"w{i}" for i, t in enumerate(m.graph.initializer)}
        for t in m.graph.initializer:
            t.name = new[t.name]
        for n in m.graph.node:
            n.name = ""
            for k, i in enumerate(n.input):
                n.input[k] = new.get(i, i)
    onnx.save_model(m, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("onnx-import"))
    cache = {}

    def get(name, strip=False, external=False):
        key = (name, strip, external)
        if key not in cache:
            cache[key] = _export_torch(name, root, strip, external)
        return cache[key]
    return get


def _chunks(path):
    """sha256 of every chunk and the tokenizer (everything but the manifest's provenance)."""
    man = json.load(open(os.path.join(path, "manifest.json")))
    files = [c["file"] for c in man["chunks"]] + [man["tokenizer"]["file"]]
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest()
            for f in files}, man["config"]


IMPORTS = [("llama", False, False), ("llama", True, True), ("qwen2", True, False),
           ("opt", True, False)]  # opt: LayerNorm, biases, learned positions, ReLU


@pytest.mark.slow
@pytest.mark.parametrize("name,strip,external", IMPORTS)
def test_import_matches_onnxruntime_and_hf(tmp_path, exported, name, strip, external):
    from edgellm.converters.convert import convert

    path = exported(name, strip, external)
    dst = convert(path if strip else os.path.dirname(path), tmp_path / "f32", quant="f32",
                  progress=False)
    ids = tiny.token_ids(name)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input_ids": np.array([ids], np.int64)})[0][0]
    got = _edge_logits(dst, ids)
    assert np.abs(got - want).max() < TOL
    # the same weights as the checkpoint the ONNX came from: identical chunks, also quantized
    assert _chunks(dst) == _chunks(tiny.converted(name, "f32"))
    from edgellm.cli import main  # the command line, on the .onnx file itself

    q = str(tmp_path / "int4")
    assert main(["convert", path, "-o", q, "--quant", "int4"]) == 0
    assert _chunks(q) == _chunks(tiny.converted(name, "int4"))
    assert json.load(open(os.path.join(q, "manifest.json")))["provenance"]["source_format"] == \
        "onnx"


@pytest.mark.slow
def test_import_merged_decoder(tmp_path, exported):
    """optimum's decoder_model_merged.onnx layout: the model inside both branches of an If."""
    from edgellm.converters.convert import convert

    path = exported("llama", True, True)  # the export of an earlier test, weights read inline
    m = onnx.load(path)
    h = onnx.helper

    def branch(tag):
        out = {o: f"{tag}/{o}" for n in m.graph.node for o in n.output}
        nodes = []
        for n in m.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for k, i in enumerate(c.input):
                c.input[k] = out.get(i, i)
            for k, o in enumerate(c.output):
                c.output[k] = out[o]
            nodes.append(c)
        return h.make_graph(nodes, tag, [], [h.make_tensor_value_info(
            out["logits"], onnx.TensorProto.FLOAT, None)])

    cond = h.make_node("Constant", [], ["use_cache"], value=h.make_tensor(
        "c", onnx.TensorProto.BOOL, [], [True]))
    node = h.make_node("If", ["use_cache"], ["logits"], then_branch=branch("with_past"),
                       else_branch=branch("without_past"))
    merged = h.make_model(h.make_graph([cond, node], "merged", list(m.graph.input),
                                       list(m.graph.output), list(m.graph.initializer)),
                          opset_imports=m.opset_import)
    d = tmp_path / "merged"
    shutil.copytree(os.path.dirname(path), d)
    os.remove(d / "model.onnx")
    os.remove(d / "model.onnx_data")
    onnx.save_model(merged, str(d / "decoder_model_merged.onnx"))
    ids = tiny.token_ids("llama")
    sess = ort.InferenceSession(str(d / "decoder_model_merged.onnx"),
                                providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input_ids": np.array([ids], np.int64)})[0][0]
    dst = convert(d, tmp_path / "out", quant="f32", progress=False)  # the directory
    assert np.abs(_edge_logits(dst, ids) - want).max() < TOL
    assert _chunks(dst) == _chunks(tiny.converted("llama", "f32"))


def test_round_trip_through_onnx(tmp_path):
    """export --to onnx of a float model, converted back: the same chunks."""
    from edgellm.converters.convert import convert

    src = tiny.converted("llama", "f32")
    out = export_onnx(src, tmp_path / "o", progress=False)
    back = convert(out, tmp_path / "back", quant="f32", progress=False)
    assert _chunks(back) == _chunks(src)


@pytest.mark.slow
def test_import_refusals(tmp_path, exported):
    from edgellm.converters.convert import convert

    path = exported("llama", True, True)
    bad = tmp_path / "bad"
    shutil.copytree(os.path.dirname(path), bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["num_hidden_layers"] = 3  # the graph has 2
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ConvertError, match=r"model\.onnx: cannot map the graph onto llama with "
                                           r"3 layers .* no initializer found .* 15 weight "
                                           r"MatMul/Gemm nodes form 9 groups"):
        convert(bad / "model.onnx", tmp_path / "out", quant="f32", progress=False)
    assert not os.path.exists(tmp_path / "out")
    # external data cut short
    data = bad / "model.onnx_data"
    cfg["num_hidden_layers"] = 2
    json.dump(cfg, open(bad / "config.json", "w"))
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(ConvertError, match="model.onnx_data: external data of .* truncated"):
        convert(bad / "model.onnx", tmp_path / "out", quant="f32", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_import_refuses_quantized_graph(tmp_path):
    from edgellm.converters.convert import convert

    out = export_onnx(tiny.converted("llama", "int8"), tmp_path / "o", progress=False)
    with pytest.raises(ConvertError, match=r"model\.onnx: the graph is already quantized "
                                           r"\(DequantizeLinear\)"):
        convert(out, tmp_path / "back", quant="f32", progress=False)
    assert not os.path.exists(tmp_path / "back")
