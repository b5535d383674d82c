"""Low-rank attention projections (converters/lowrank.py, runtime/lowrank.py, FORMAT.md §3.4)
against direct NumPy statements:

- the whitened truncation's output error on the calibration inputs is the sum of the dropped
  singular values (its objective), and below a plain SVD truncation of the weights at the same
  rank;
- rank planning keeps within the budget;
- the runtime's two products equal an independent NumPy forward pass (tests/reference.py) of the
  checkpoint whose projections are left · right, in prefill and decode, f32 and int8;
- malformed factors in a manifest, and bad options, are refused.
(--low-rank with --method gptq: tests/test_lowrank_gptq.py.)
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import edgellm
import reference
import tiny
from edgellm.converters import layerwise, lowrank
from edgellm.converters.convert import convert
from edgellm.runtime.errors import ConvertError, FormatError

HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_o": "self_attn.o_proj"}


@pytest.fixture(scope="module")
def layer0():
    with layerwise.open_source(tiny.checkpoint("llama_relu")) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=1024, seq_len=128)
        layer = next(layerwise.Walk(source, spec, seqs).layers())
        yield ({n: layer.inputs(n).astype(np.float64) for n in lowrank.PROJ},
               {n: layer.weights[n].copy() for n in lowrank.PROJ},
               {n: layer.hessian(n).copy() for n in lowrank.PROJ})


@pytest.mark.parametrize("name", ["attn_q", "attn_o"])
def test_whitened_truncation_objective(layer0, name):
    X, W, H = layer0
    X, w = X[name], W[name].astype(np.float64)
    r = w.shape[0] // 4
    S = lowrank.whitening(H[name])
    U, sig, Vt = lowrank.svd(w, S)
    left, right = lowrank.factors(U, sig, Vt, S, r)
    assert left.shape == (w.shape[0], r) and right.shape == (r, w.shape[1])
    err = np.linalg.norm(X @ (w - left.astype(np.float64) @ right).T) ** 2 / X.shape[0]
    # the objective: dropped sigma^2 (exact up to the damping added to H)
    assert err == pytest.approx(float((sig[r:] ** 2).sum()), rel=0.05)
    u, s, vt = np.linalg.svd(w, full_matrices=False)  # plain SVD of the weights
    plain = np.linalg.norm(X @ (w - (u[:, :r] * s[:r]) @ vt[:r]).T) ** 2 / X.shape[0]
    assert err < 0.9 * plain


def test_plan_keeps_the_budget():
    rng = np.random.default_rng(0)
    shapes = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576),
              "attn_o": (576, 576)}
    spectra = {k: np.sort(rng.random(min(s)) ** 3)[::-1] for k, s in shapes.items()}
    total = sum(n * d for n, d in shapes.values())
    for f in (0.3, 0.5, 0.8):
        ranks = lowrank.plan(shapes, spectra, f)
        used = sum(n * d if ranks[k] is None else ranks[k] * (n + d)
                   for k, (n, d) in shapes.items())
        assert used <= f * total
        assert all(r is None or r % 32 == 0 for r in ranks.values())
        assert all(r is None or r * sum(shapes[k]) < shapes[k][0] * shapes[k][1]
                   for k, r in ranks.items())
    with pytest.raises(ConvertError, match="larger fraction"):
        lowrank.plan(shapes, spectra, 0.01)


def _product_checkpoint(src, model_dir, root):
    """A copy of HF checkpoint src whose factorized projections are left · right."""
    dst = os.path.join(root, "product")
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    w = load_file(f)
    man = json.load(open(os.path.join(model_dir, "manifest.json")))
    n = 0
    for i, c in enumerate(man["chunks"][1:]):
        t = load_file(os.path.join(model_dir, c["file"]))
        for p, hf in HF.items():
            if p + ".left" in c["tensors"]:
                w[f"model.layers.{i}.{hf}.weight"] = (t[p + ".left"].astype(np.float64)
                                                     @ t[p + ".right"]).astype(np.float32)
                n += 1
    save_file(w, f)
    return dst, n


@pytest.fixture(scope="module")
def lowrank_f32(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr")
    src = tiny.checkpoint("llama")
    dst = convert(src, root / "lr", quant="f32", low_rank=0.6, progress=False,
                  method_options={"tokens": 512})
    return src, dst, root


def test_runtime_matches_numpy(lowrank_f32):
    src, dst, root = lowrank_f32
    ref_dir, n = _product_checkpoint(src, dst, root)
    assert n >= 2  # some projections really are factorized
    ids = tiny.token_ids("llama", 12)
    want = reference.forward(ref_dir, ids)
    m = edgellm.load(dst, kv="f32")
    assert any(hasattr(L.q, "rank") or hasattr(L.o, "rank") for L in m.runtime.layers)
    tol = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(m.logits(ids), want, rtol=1e-4, atol=tol)  # prefill
    rt = m.runtime
    rt.reset()
    dec = np.concatenate([rt.forward([t]) for t in ids])  # decode (the per-op path)
    np.testing.assert_allclose(dec, want, rtol=1e-4, atol=tol)
    # not the unfactorized model (the test could fail)
    assert np.abs(reference.forward(src, ids) - want).max() > 100 * tol
    # provenance: ranks and errors per layer
    rec = json.load(open(os.path.join(dst, "manifest.json")))["provenance"]["quantization"]
    assert rec["calibrated"]["low_rank"]["fraction"] == 0.6


def test_int8_factors_decode(tmp_path, lowrank_f32):
    src, f32, _ = lowrank_f32
    dst = convert(src, tmp_path / "lr8", quant="int8", low_rank=0.6, progress=False,
                  method_options={"tokens": 512})
    ids = tiny.token_ids("llama", 12)
    a = edgellm.load(f32, kv="f32").logits(ids)
    m = edgellm.load(dst, kv="f32")
    b = m.logits(ids)
    assert np.abs(b - a).max() < 0.05 * np.abs(a).max()  # int8 rounding of the factors
    rt = m.runtime
    rt.reset()
    dec = np.concatenate([rt.forward([t]) for t in ids])
    assert np.abs(dec - b).max() < 0.05 * np.abs(a).max()  # + int8 activations at decode
    size = sum(c["size"] for c in json.load(open(os.path.join(dst, "manifest.json")))["chunks"])
    dense = convert(src, tmp_path / "d8", quant="int8", progress=False)
    assert size < sum(c["size"] for c in
                      json.load(open(os.path.join(dense, "manifest.json")))["chunks"])


def _manifest_edit(model_dir, tmp_path, edit):
    dst = tmp_path / "bad"
    shutil.copytree(model_dir, dst)
    p = dst / "manifest.json"
    man = json.load(open(p))
    edit(man)
    json.dump(man, open(p, "w"))
    return dst


def test_bad_factors_refused(tmp_path, lowrank_f32):
    _, dst, _ = lowrank_f32
    man = json.load(open(os.path.join(dst, "manifest.json")))
    i, p = next((i, p) for i, c in enumerate(man["chunks"]) for p in lowrank.PROJ
                if p + ".left" in c["tensors"])

    def wrong_rank(m):
        m["chunks"][i]["tensors"][p + ".left"]["shape"][1] += 8

    def no_right(m):
        del m["chunks"][i]["tensors"][p + ".right"]

    for edit, msg in ((wrong_rank, "shape"), (no_right, "missing")):
        bad = _manifest_edit(dst, tmp_path, edit)
        with pytest.raises(FormatError, match=msg):
            edgellm.load(bad)
        shutil.rmtree(bad)


def test_bad_options(tmp_path):
    src = tiny.checkpoint("llama")
    for kw, msg in (({"low_rank": 1.5}, "fraction"), ({"low_rank": 0.0}, "fraction"),
                    ({"low_rank": 0.5, "quant": "int8", "method": "awq"}, "int4 or int3")):
        kw = {"quant": "int8", **kw}
        with pytest.raises(ConvertError, match=msg):
            convert(src, tmp_path / "x", progress=False, **kw)
        assert not os.path.exists(tmp_path / "x")
