"""converters/layerwise.py: the layer-by-layer calibration pass against the runtime's forward.

- identity transform: the hidden states the pass propagates equal the runtime's hidden states
  (Transformer._layers, f32 weights and KV cache) for every calibration sequence;
- a transform that replaces every linear by its int8 round trip (the down projection quantized
  along d, as the bundles store it) propagates exactly what the runtime computes from the
  int8-converted model: the pass really runs the transformed layers, in order;
- the inputs it exposes are what the linears consume (checked against the layer's own output);
- bad calibration input is refused with a ConvertError.
"""

import numpy as np
import pytest

import edgellm
import tiny
from edgellm.converters import layerwise
from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError
from edgellm.runtime.kernels import qgemm


def _walk_hidden(name, transform=None, tokens=512, seq_len=48):
    with layerwise.open_source(tiny.checkpoint(name)) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, tokens=tokens, seq_len=seq_len)
        walk = layerwise.Walk(source, spec, seqs)
        for layer in walk.layers():
            if transform:
                transform(layer)
        return seqs, [h.copy() for h in walk.hidden]


def _runtime_hidden(model_dir, seqs, embed_from=None):
    m = edgellm.load(model_dir, kv="f32")
    if embed_from is not None:  # the pass reads the source's f32 embedding
        m.runtime.embed = edgellm.load(embed_from, kv="f32").runtime.embed
    out = []
    for s in seqs:
        m.runtime.reset()
        out.append(m.runtime._layers(np.asarray(s)))
    return out


def _close(a, b):
    scale = np.abs(b).max()
    return np.abs(a - b).max() <= 1e-4 * scale


@pytest.mark.parametrize("name", ["llama", "opt", "llama_attn_bias", "llama_relu"])
def test_identity_matches_runtime(name):
    seqs, hidden = _walk_hidden(name)
    assert len(seqs) >= 2
    ref = _runtime_hidden(tiny.converted(name, "f32"), seqs)
    for h, r in zip(hidden, ref):
        assert h.shape == r.shape
        assert _close(h, r), np.abs(h - r).max()


def _int8_round_trip(layer):
    c = encodings.codec("int8")
    for n in layerwise.LINEARS:
        if n not in layer.weights:
            continue
        w = layer.weights[n]
        if n == "ffn_down":  # bundles quantize the down columns along d
            layer.set(n, c.dequantize(*c.quantize(w.T)).T)
        else:
            layer.set(n, c.dequantize(*c.quantize(w)))


def test_transformed_layers_propagate(monkeypatch):
    monkeypatch.setattr(qgemm, "ENABLED", False)  # float activations (no int8 GEMM): see below
    seqs, hidden = _walk_hidden("llama", _int8_round_trip)
    ref = _runtime_hidden(tiny.converted("llama", "int8", ffn_down="bundle"), seqs,
                          embed_from=tiny.converted("llama", "f32"))
    f32 = _runtime_hidden(tiny.converted("llama", "f32"), seqs)
    for h, r, f in zip(hidden, ref, f32):
        # int8 decode of prefill is exact f32 math on the decoded weights: far closer to the
        # int8 model than the int8 model is to the f32 one
        assert _close(h, r), np.abs(h - r).max()
        assert np.abs(h - r).max() < 0.05 * np.abs(f - r).max()


def test_inputs_are_what_the_linears_consume():
    def check(layer):
        x_in = layer.walk.x.copy()
        W = layer.weights
        a = layer.inputs("attn_o")
        act = layer.inputs("ffn_down")
        out = x_in + a @ W["attn_o"].T + act @ W["ffn_down"].T
        assert np.allclose(layer.output(), out, atol=1e-4 * np.abs(out).max())
        h = layer.inputs("ffn_up")
        g = h @ W["ffn_gate"].T
        assert np.allclose(act, g / (1 + np.exp(-g)) * (h @ W["ffn_up"].T), atol=1e-5)
        H = layer.hessian("attn_q")
        X = layer.inputs("attn_k").astype(np.float64)
        assert np.allclose(H, X.T @ X / X.shape[0])
        # setting a weight upstream recomputes the inputs downstream
        layer.set("attn_v", W["attn_v"] * 0)
        assert not layer.inputs("attn_o").any()
        assert layer.n_tokens == X.shape[0]

    _walk_hidden("llama", check)


def test_bad_calibration(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only", encoding="utf-8")
    with layerwise.open_source(tiny.checkpoint("llama")) as (spec, source, tok):
        with pytest.raises(ConvertError, match="too short"):
            layerwise.sequences(tok, spec.config, text=short)
        with pytest.raises(ConvertError, match="tokens"):
            layerwise.sequences(tok, spec.config, tokens=10)
        with pytest.raises(ConvertError, match="cannot read"):
            layerwise.sequences(tok, spec.config, text=tmp_path / "missing.txt")
        walk = layerwise.Walk(source, spec, layerwise.sequences(tok, spec.config, tokens=256))
        layer = next(walk.layers())
        with pytest.raises(ConvertError, match="shape"):
            layer.set("attn_q", np.zeros((3, 3), np.float32))
        with pytest.raises(ConvertError, match="no linear"):
            layer.inputs("ffn_nothing")
