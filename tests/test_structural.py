"""Structural compression (converters/structural.py): layer dropping and FFN neuron pruning.

The yardstick is tests/reference.py, a plain NumPy forward pass straight from a Hugging Face
checkpoint: a dropped or pruned edgellm model must compute what that reference computes on the
source checkpoint with the same layers removed, or the same neurons removed."""

import json
import os

import numpy as np
import pytest

import edgellm
from edgellm.converters import calibrate, structural
from edgellm.converters.convert import convert
from edgellm.runtime.errors import ConvertError

import reference
import tiny
from clirun import edgellm_cli

tiny.VARIANTS.setdefault("llama_5layers", dict(layers=5))
NEAR_IDENTITY = (2, 3)  # layers whose attention output and FFN output are scaled by 1e-3


def _opts(tokens=512):
    return calibrate.CalibOptions(tokens=tokens).check()


def _write_checkpoint(src, dst, tensors, config):
    """A copy of checkpoint src with other weights and config (tokenizer files kept)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f not in ("model.safetensors", "config.json"):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    tiny.write_safetensors(os.path.join(dst, "model.safetensors"),
                           {k: v.astype(np.float32) for k, v in tensors.items()}, "F32")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def near_identity(tmp_path_factory):
    """A 5-layer tiny Llama whose layers 2 and 3 barely change the residual stream."""
    root = tmp_path_factory.mktemp("near_identity")
    base = tiny.build("llama_5layers", root / "base")
    W = reference.load_tensors(base)
    for i in NEAR_IDENTITY:
        W[f"model.layers.{i}.self_attn.o_proj.weight"] *= 1e-3
        W[f"model.layers.{i}.mlp.down_proj.weight"] *= 1e-3
    src = _write_checkpoint(base, str(root / "hf"), W, _config(base))
    return src, convert(src, str(root / "f32"), quant="f32", progress=False)


def _without_layers(src, dst, drop):
    """The reference checkpoint with layers `drop` removed and the rest renumbered."""
    W, c = reference.load_tensors(src), _config(src)
    kept = [i for i in range(c["num_hidden_layers"]) if i not in drop]
    out = {k: v for k, v in W.items() if not k.startswith("model.layers.")}
    for j, i in enumerate(kept):
        p = f"model.layers.{i}."
        out.update({f"model.layers.{j}." + k[len(p):]: v for k, v in W.items()
                    if k.startswith(p)})
    c["num_hidden_layers"] = len(kept)
    return _write_checkpoint(src, dst, out, c)


@pytest.mark.parametrize("metric", ["angular", "bi"])
def test_drop_picks_the_near_identity_block(near_identity, tmp_path, metric):
    src, model = near_identity
    rec = structural.drop_by_metric(model, tmp_path / "out", 2, metric, _opts())
    assert rec["dropped"] == list(NEAR_IDENTITY)
    scores = rec["scores"]
    # angular: one distance per block start (5 - 2 + 1); bi: one influence per layer
    assert len(scores) == (4 if metric == "angular" else 5)
    if metric == "angular":
        assert scores[2] < 0.1 * min(s for i, s in enumerate(scores) if i != 2)
    else:
        assert max(scores[2], scores[3]) < 0.1 * min(scores[i] for i in (0, 1, 4))
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["config"]["n_layers"] == 3
    assert m["provenance"]["layer_map"] == [0, 1, 4]
    assert m["provenance"]["structural"][-1]["metric"] == metric
    # the dropped model computes what the reference computes without those layers
    ids = tiny.token_ids("llama", n=16)
    ref = reference.forward(_without_layers(src, str(tmp_path / "ref"), NEAR_IDENTITY), ids)
    out = edgellm.load(tmp_path / "out", kv="f32").logits(ids)
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_drop_one_layer_is_one_of_the_near_identity_ones(near_identity, tmp_path):
    _, model = near_identity
    drop, scores = structural.drop_scores(model, 1, "angular", _opts())
    assert drop[0] in NEAR_IDENTITY and len(scores) == 5


def test_scores_from_states_match_a_direct_statement():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((50, 8)) for _ in range(5)]

    def ang(a, b):
        c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return np.mean(np.arccos(np.clip(c, -1, 1))) / np.pi

    got = structural.layer_scores(iter(xs), 2, "angular")
    np.testing.assert_allclose(got, [ang(xs[i], xs[i + 2]) for i in range(3)], rtol=1e-5)
    got = structural.layer_scores(iter(xs), 1, "bi")
    want = [1 - np.mean((xs[i] * xs[i + 1]).sum(1) / np.linalg.norm(xs[i], axis=1)
                        / np.linalg.norm(xs[i + 1], axis=1)) for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert structural.choose_layers([0.5, 0.1, 0.3], 2, "angular") == [1, 2]
    assert structural.choose_layers([0.5, 0.1, 0.3, 0.05], 2, "bi") == [1, 3]


def test_drops_compose_and_keep_the_source_layer_map(near_identity, tmp_path):
    _, model = near_identity
    structural.drop_layers(model, tmp_path / "a", [0])
    structural.drop_layers(tmp_path / "a", tmp_path / "b", [2])  # source layer 3
    m = json.load(open(tmp_path / "b" / "manifest.json"))
    assert m["provenance"]["layer_map"] == [1, 2, 4]
    assert [s["dropped_source_layers"] for s in m["provenance"]["structural"]] == [[0], [3]]
    src = json.load(open(os.path.join(model, "manifest.json")))
    # the chunks are the source's bytes, renamed
    assert [c["sha256"] for c in m["chunks"][1:]] == [src["chunks"][i + 1]["sha256"]
                                                      for i in (1, 2, 4)]


def test_bad_structural_requests_are_refused_before_work(near_identity, tmp_path):
    _, model = near_identity
    cases = [
        (lambda: structural.drop_layers(model, tmp_path / "x", [5]), "between 0 and 4"),
        (lambda: structural.drop_layers(model, tmp_path / "x", range(5)), "at least one"),
        (lambda: structural.drop_by_metric(model, tmp_path / "x", 5, "angular", _opts()),
         "at least one"),
        (lambda: structural.drop_by_metric(model, tmp_path / "x", 1, "cosine", _opts()),
         "angular, bi"),
        (lambda: structural.prune_neurons(model, tmp_path / "x", 1.2), "between 0 and 1"),
        (lambda: structural.prune_neurons(model, tmp_path / "x", 0), "between 0 and 1"),
        (lambda: convert(model, tmp_path / "x", drop_layers=9), "at least one"),
    ]
    for call, msg in cases:
        with pytest.raises(ConvertError, match=msg):
            call()
        assert not (tmp_path / "x").exists()
    assert os.listdir(tmp_path) == []  # no work directories left behind


def _without_neurons(src, dst, kept):
    """The reference checkpoint keeping, per layer, only the FFN neurons kept[i]."""
    W, c = reference.load_tensors(src), _config(src)
    opt = c["model_type"] == "opt"
    for i, k in enumerate(kept):
        if opt:
            p = f"model.decoder.layers.{i}."
            W[p + "fc1.weight"] = W[p + "fc1.weight"][k]
            W[p + "fc1.bias"] = W[p + "fc1.bias"][k]
            W[p + "fc2.weight"] = W[p + "fc2.weight"][:, k]
        else:
            p = f"model.layers.{i}.mlp."
            W[p + "gate_proj.weight"] = W[p + "gate_proj.weight"][k]
            W[p + "up_proj.weight"] = W[p + "up_proj.weight"][k]
            W[p + "down_proj.weight"] = W[p + "down_proj.weight"][:, k]
    c["ffn_dim" if opt else "intermediate_size"] = len(kept[0])
    return _write_checkpoint(src, dst, W, c)


def _chunk(path, i):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, f"layer_{i:03d}.safetensors"))


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_neuron_pruning_equals_numpy_forward_without_those_neurons(name, tmp_path):
    src, model = tiny.checkpoint(name), tiny.converted(name, "f32")
    d_ff = tiny.spec(name)["d_ff"]
    rec = structural.prune_neurons(model, tmp_path / "p", 0.5, _opts())
    assert rec["kept"] == d_ff // 2 and rec["calibrated_here"]
    m = json.load(open(tmp_path / "p" / "manifest.json"))
    assert m["config"]["d_ff"] == d_ff // 2
    L = m["config"]["n_layers"]
    kept = [_chunk(tmp_path / "p", i)["ffn_perm"] for i in range(L)]
    # the neurons kept are the most often needed ones: compare with the frequencies the
    # calibration measures on the unpruned model (ffn_freq of row r is source neuron perm[r])
    calibrated = convert(src, tmp_path / "cal", quant="f32", calib=calibrate.default_text(),
                         calib_options={"tokens": 512}, progress=False)
    for i in range(L):
        c = _chunk(calibrated, i)
        freq = np.empty(d_ff, np.float32)
        freq[c["ffn_perm"]] = c["ffn_freq"]
        assert len(set(kept[i].tolist())) == d_ff // 2
        pruned = np.setdiff1d(np.arange(d_ff), kept[i])
        assert freq[kept[i]].min() >= freq[pruned].max()
    ids = tiny.token_ids(name, n=16)
    ref = reference.forward(_without_neurons(src, str(tmp_path / "ref"), kept), ids)
    out = edgellm.load(tmp_path / "p", kv="f32").logits(ids)
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # and it is not the unpruned model's output
    full = reference.forward(src, ids)
    assert np.abs(full - ref).max() > 1e-2


def test_pruning_an_int4_model_keeps_the_row_bytes(tmp_path):
    model = tiny.converted("llama", "int4", 32)
    structural.prune_neurons(model, tmp_path / "cal", 0.25, _opts())
    m = json.load(open(tmp_path / "cal" / "manifest.json"))
    assert m["config"]["d_ff"] == 96
    for i in range(m["config"]["n_layers"]):
        a, b = _chunk(model, i), _chunk(tmp_path / "cal", i)
        # pruned row r holds source neuron perm[r], byte for byte
        np.testing.assert_array_equal(b["ffn_bundles"], a["ffn_bundles"][b["ffn_perm"]])


def test_cli_drop_layers(near_identity, tmp_path):
    _, model = near_identity
    r = edgellm_cli("convert", model, "-o", str(tmp_path / "out"), "--drop-layers", "2",
                    "--drop-metric", "bi", "--calib-tokens", "512")
    assert r.returncode == 0, r.stderr
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["provenance"]["layer_map"] == [0, 1, 4]
    assert "--drop-layers 2" in m["provenance"]["command"]
    r = edgellm_cli("convert", model, "-o", str(tmp_path / "bad"), "--prune-neurons", "1.5")
    assert r.returncode != 0 and "between 0 and 1" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_pruning_a_kept_gguf_reencodes_its_down_matrix(tmp_path):
    """--quant keep stores the down projection as a matrix quantized along d_ff (GGUF Q8_0
    blocks): pruning keeps its columns of the kept neurons, re-encoded in q8_0."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file
    from test_gguf import write_gguf_from_hf

    from edgellm.runtime import encodings

    src = write_gguf_from_hf("llama", tmp_path / "q.gguf", gguf.GGMLQuantizationType.Q8_0)
    keep = convert(src, tmp_path / "keep", quant="keep", progress=False)
    structural.prune_neurons(keep, tmp_path / "p", 0.5, _opts())
    m = json.load(open(tmp_path / "p" / "manifest.json"))
    c = encodings.codec("q8_0")
    for i in range(m["config"]["n_layers"]):
        e = m["chunks"][i + 1]["tensors"]["ffn_down"]
        assert e["encoding"] == "q8_0" and e["shape"] == [64, 64]
        a = load_file(os.path.join(keep, f"layer_{i:03d}.safetensors"))
        b = load_file(tmp_path / "p" / f"layer_{i:03d}.safetensors")
        want = c.dequantize(a["ffn_down"], a["ffn_down.scales"])[:, b["ffn_perm"]]
        got = c.dequantize(b["ffn_down"], b["ffn_down.scales"])
        # re-rounded to q8_0 blocks of the kept columns: within one rounding of those values
        assert np.abs(got - want).max() <= c.max_error_bound(want)
        np.testing.assert_array_equal(b["ffn_bundles"], a["ffn_bundles"][b["ffn_perm"]])
    assert any("re-encoded in q8_0" in n for n in m["provenance"]["structural"][-1]["notes"])
    assert edgellm.load(tmp_path / "p").logits([3, 4, 5]).shape[0] == 3
