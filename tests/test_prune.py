"""Pruning (converters/prune.py), the sparse encodings (runtime/encodings.py Sparse) and their
kernels (runtime/kernels/sparse.py), each against a direct NumPy statement."""

import json
import os

import numpy as np
import pytest

import edgellm
import reference
import tiny
from childpytest import no_jit, pytest_child, python_child
from edgellm.converters import prune
from edgellm.converters.convert import convert
from edgellm.runtime import encodings, format, kernels
from edgellm.runtime.kernels import simd
from edgellm.runtime.kernels import sparse as ksparse
from edgellm.runtime.errors import ConvertError, EdgeLLMError
from edgellm.runtime.reader import Matrix, Reader

VALUES = [("f16", None), ("int8", None), ("int4", 32)]
PATTERNS = ["sp24", "sp50"]


def np_prune(W, pattern, score=None):
    """Independent statement of the patterns: zero the smallest-scoring half of each row
    (sp50), or the two smallest of each group of 4 consecutive weights (sp24)."""
    W = np.array(W, dtype=np.float64)
    score = np.abs(W) if score is None else score
    n, d = W.shape
    out = W.copy()
    for i in range(n):
        if pattern == "sp50":
            out[i, np.argsort(score[i], kind="stable")[:d // 2]] = 0
        else:
            for g in range(0, d, 4):
                out[i, g + np.argsort(score[i, g:g + 4], kind="stable")[:2]] = 0
    return out


def check_pattern(W, pattern):
    n, d = W.shape
    nz = W != 0
    if pattern == "sp24":
        assert (nz.reshape(n, d // 4, 4).sum(axis=2) <= 2).all()
    else:
        assert (nz.sum(axis=1) <= d // 2).all()


def random_layer(n=48, d=128, N=512, seed=0):
    """W [n, d] and inputs X [N, d] with unequal, correlated columns (as LLM activations)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, d)).astype(np.float32) * 0.1
    scales = np.exp(rng.standard_normal(d) * 1.0)  # some inputs much larger than others
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    X = (rng.standard_normal((N, d)) @ mix * scales).astype(np.float32)
    return W, X


def sparse_matrix(W, pattern, value, g):
    c = encodings.codec(f"{pattern}_{value}", g)
    q, s = c.quantize(W)
    return Matrix(q, s, c, W.shape)


# ---------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("value,g", VALUES)
def test_codec_round_trip_and_size(pattern, value, g):
    W, _ = random_layer(n=16, d=128)
    Wp = np_prune(W, pattern).astype(np.float32)
    c = encodings.codec(f"{pattern}_{value}", g)
    q, s = c.quantize(Wp)
    back = c.dequantize(q, s)
    dense = encodings.codec(value, g)
    # the kept values go through the value codec: its bound, and nothing outside the pattern
    assert np.abs(back - Wp).max() <= dense.max_error_bound(Wp)
    assert (back[Wp == 0] == 0).all()
    if value == "f16":
        assert np.array_equal(back, Wp.astype(np.float16).astype(np.float32))
    # bytes: d/2 values and d/8 code bytes per row, scales of d/2 values
    n, d = Wp.shape
    assert q.shape == (n, encodings.nbytes(dense, 1, d // 2) - (
        0 if s is None else s[0].nbytes) + d // 8)
    assert encodings.nbytes(c, n, d) < encodings.nbytes(dense, n, d)


def test_codec_refuses_rows_outside_the_pattern():
    W = np.ones((2, 8), dtype=np.float32)
    W[:, 4:] = 0
    with pytest.raises(EdgeLLMError, match="group 0 has 4"):
        encodings.codec("sp24_f16").quantize(W)
    W[:, :] = 1
    with pytest.raises(EdgeLLMError, match="row 0 has 8"):
        encodings.codec("sp50_f16").quantize(W)
    with pytest.raises(EdgeLLMError, match="divisible by 8"):
        encodings.codec("sp50_int8").quantize(np.zeros((1, 12), np.float32))
    with pytest.raises(EdgeLLMError, match="half the row length"):
        encodings.codec("sp24_int4", 64).check(64)


# ---------------------------------------------------------------------------------------------
# Kernels


def q8_blocks(x):
    """Activations as the int8 decode kernels see them: per block of 32, scale max|x| / 127 and
    values rint(x / scale) (llama.cpp's Q8_0 with a float32 scale), dequantized."""
    xb = np.asarray(x, np.float32).reshape(-1, 32)
    sc = np.abs(xb).max(axis=1) / np.float32(127)
    inv = np.float32(1) / np.where(sc > 0, sc, np.float32(1))
    return (np.rint(xb * inv[:, None]) * sc[:, None]).reshape(np.shape(x)).astype(np.float32)


def int8_activations(pattern, value, T, d):
    """True when decode multiplies these rows with int8 activations (sparse_simd.py)."""
    p, v, _ = ksparse.codes(encodings.codec(f"{pattern}_{value}", None if value != "int4"
                                            else 32))
    return T == 1 and ksparse.simd_int8(p, v, d, kernels.MODE)


def _kernel_cases_tiny(pattern, value, g, T, n=40, d=64):
    rng = np.random.default_rng(T)
    W = np_prune(rng.standard_normal((n, d)), pattern).astype(np.float32)
    m = sparse_matrix(W, pattern, value, g)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dec = m.dequantize()
    # int8 rows at decode meet int8 activations (as the dense int8 kernels): the reference
    # multiplies the same rounded activations
    xr = q8_blocks(x) if int8_activations(pattern, value, T, d) else x
    want = xr.astype(np.float64) @ dec.T.astype(np.float64)
    got = kernels.linear(m, x)
    assert got.shape == (T, n)
    # float32 sums in another order: a few ulps of the sum of |products|
    bound = 1e-5 * (np.abs(xr) @ np.abs(dec).T).max()
    assert np.abs(got - want).max() <= bound
    # and the dense kernels on the same (decoded) weights agree
    f16 = encodings.codec("f16")
    if value == "f16":
        dense = Matrix(*f16.quantize(dec), f16, dec.shape)
        assert np.abs(kernels.linear(dense, x) - got).max() <= 2 * bound


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("value,g", VALUES)
@pytest.mark.parametrize("T", [1, 3])
def test_linear_sparse_tiny(pattern, value, g, T):
    _kernel_cases_tiny(pattern, value, g, T)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("value,g", [("f16", None), ("int8", None), ("int4", 32), ("int4", 64)])
def test_linear_sparse_shapes(pattern, value, g):
    for n, d, T in [(1, 128, 1), (97, 256, 1), (33, 512, 5)]:
        _kernel_cases_tiny(pattern, value, g, T, n=n, d=d)


SIMD_MODES = ["fast", "generic"] if simd.AVAILABLE else []


@pytest.mark.parametrize("mode", SIMD_MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_sparse_int8_simd(pattern, mode, monkeypatch):
    """int8 sparse rows at decode (sparse_simd.py): against NumPy on the block-rounded
    activations, and against the dense int8 kernel on the decoded weights (which re-quantize to
    the same int8 values: the kept values include the row's largest), both to float32
    summation order. Row lengths with a whole number of 32-group steps per half (256, 512,
    1536) and with a tail of 4, 8, 16 or 24 groups (288, 320 and 576, 384, 448); sp50 runs
    vpexpandb where the CPU has VBMI2 (fast), else the float kernels."""
    monkeypatch.setattr(kernels, "MODE", mode)
    rng = np.random.default_rng(3)
    int8 = encodings.codec("int8")
    for n, d in [(37, 256), (5, 288), (9, 320), (6, 384), (5, 448), (33, 576), (3, 512),
                 (7, 1536)]:
        W = np_prune(rng.standard_normal((n, d)) * 0.1, pattern).astype(np.float32)
        W[0, :] = 0  # an all-zero row
        if pattern == "sp50":  # whole 64-position blocks kept, then whole blocks empty
            W[1, :] = 0
            W[1, :d // 2] = rng.standard_normal(d // 2) * 0.1
        m = sparse_matrix(W, pattern, "int8", None)
        dec = m.dequantize()
        x = (rng.standard_normal((1, d)) * np.exp(rng.standard_normal(d))).astype(np.float32)
        x[0, 32:64] = 0  # an all-zero activation block (scale 0)
        got = kernels.linear(m, x)
        simd_path = int8_activations(pattern, "int8", 1, d)
        assert simd_path == (pattern == "sp24" or (mode == "fast" and ksparse.HAVE_VBMI2))
        xr = q8_blocks(x) if simd_path else x
        want = xr.astype(np.float64) @ dec.T.astype(np.float64)
        bound = 1e-5 * (np.abs(xr) @ np.abs(dec).T).max()
        assert np.abs(got - want).max() <= bound, (n, d)
        assert got[0, 0] == 0
        if simd_path:
            dense = Matrix(*int8.quantize(dec), int8, dec.shape)
            assert np.array_equal(dense.q.view(np.int8).astype(np.float32) * dense.s[:, None],
                                  dec)
            assert np.abs(kernels.linear(dense, x) - got).max() <= 2 * bound


def ffn_reference(x, gate, up, down, activation, gated, bias=None, q8=None):
    """q8: rounds the hidden activations before down (as int8 decode kernels do)."""
    x = x.astype(np.float64)
    u = x @ up.T
    if gated:
        h = reference.silu(x @ gate.T) if activation == "silu" else reference.relu(x @ gate.T)
        h = h * u
    else:
        h = reference.relu(u + bias) if activation == "relu" else reference.silu(u + bias)
    if q8 is not None:
        h = q8(h.astype(np.float32)).astype(np.float64)
    return h @ down.T


def _ffn_case_tiny(pattern, value, g, T, gated=True, activation="silu", d=64, n=128):
    rng = np.random.default_rng(7 + T)
    gate, up = (np_prune(rng.standard_normal((n, d)) * 0.2, pattern).astype(np.float32)
                for _ in range(2))
    down = np_prune(rng.standard_normal((d, n)) * 0.2, pattern).astype(np.float32)
    bias = None if gated else rng.standard_normal(n).astype(np.float32)
    c = encodings.codec(f"{pattern}_{value}", g)
    parts = [("gate", c), ("up", c)] if gated else [("up", c)]
    vecs = {"gate": gate, "up": up}
    b, layout = encodings.pack_bundles({p: vecs[p] for p, _ in parts}, parts, d)
    dm = sparse_matrix(down, pattern, value, g)
    dec = {e["name"]: encodings.unpack_bundle_part(b, e, d) for e in layout}
    x = rng.standard_normal((T, d)).astype(np.float32)
    got = kernels.ffn(x, b, layout, d, activation, gated, bias, down=dm)
    if int8_activations(pattern, value, T, d):  # gate/up, then down, on rounded activations
        down_q8 = int8_activations(pattern, value, T, n)
        want = ffn_reference(q8_blocks(x), dec.get("gate"), dec["up"], dm.dequantize(),
                             activation, gated, bias, q8=q8_blocks if down_q8 else None)
    else:
        want = ffn_reference(x, dec.get("gate"), dec["up"], dm.dequantize(), activation, gated,
                             bias)
    assert got.shape == (T, d)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("value,g", VALUES)
@pytest.mark.parametrize("T", [1, 4])
def test_ffn_sparse_tiny(pattern, value, g, T):
    _ffn_case_tiny(pattern, value, g, T)


@pytest.mark.parametrize("T", [1, 4])
def test_ffn_sparse_ungated_relu_with_bias(T):
    _ffn_case_tiny("sp24", "int8", None, T, gated=False, activation="relu")


@pytest.mark.parametrize("mode", SIMD_MODES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_sparse_int8_simd(pattern, gated, mode, monkeypatch):
    """Sparse int8 bundle parts at decode (rows long enough for sparse_simd: d = 288 has a
    tail step; d_ff = 256 for the separate sparse down)."""
    monkeypatch.setattr(kernels, "MODE", mode)
    _ffn_case_tiny(pattern, "int8", None, 1, gated=gated,
                   activation="silu" if gated else "relu", d=288, n=256)


def test_sparse_int8_without_vbmi2(tmp_path):
    """EDGELLM_NO_VBMI2=1 turns vpexpandb and vpermt2b off (what a CPU without AVX-512 VBMI2
    runs): sp50 int8 rows take the float kernels, sp24 still an int8 SIMD one (byte blends, not
    the permute); the linear kernel tests again in a process with that setting and its own Numba
    cache."""
    env = {"EDGELLM_NO_VBMI2": "1", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    pytest_child(__file__, "linear_sparse_int8_simd and fast", timeout=900, **env)
    check = python_child("from edgellm.runtime.kernels import sparse_simd as s; "
                         "print(s.HAVE_VBMI2, s.HAVE_VBMI)", **env)
    assert check.stdout.strip() == "False False", check.stderr[-2000:]


def test_ffn_sparse_needs_a_separate_down():
    c = encodings.codec("sp24_f16")
    b, layout = encodings.pack_bundles({"up": np.zeros((4, 64), np.float32),
                                        "down": np.zeros((4, 64), np.float32)},
                                       [("up", c), ("down", c)], 64)
    with pytest.raises(EdgeLLMError, match="separate ffn_down"):
        kernels.ffn(np.zeros((1, 64), np.float32), b, layout, 64, "relu", False)


def test_no_jit_sparse():
    """The *_tiny kernel tests again with NUMBA_DISABLE_JIT=1 (the kernels as plain Python; int8
    rows then meet float32 activations: the intrinsics of the int8 path cannot run as Python)."""
    assert no_jit(__file__, "tiny and (f16-None-sp24 or int4-32-sp50 or int8-None-sp24)") > 0


# ---------------------------------------------------------------------------------------------
# Methods against their objectives


def recon_error(W, Wp, X):
    """||W X^T - W' X^T||_F: what pruning a linear changes in its outputs on inputs X."""
    return float(np.linalg.norm((W.astype(np.float64) - Wp.astype(np.float64)) @ X.T))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_and_reconstruction_error(pattern):
    W, X = random_layer()
    H = X.T.astype(np.float64) @ X / X.shape[0]
    mag = prune.magnitude(W, pattern)
    wan = prune.wanda(W, pattern, X)
    sgpt = prune.sparsegpt(W, H, pattern)
    # magnitude and Wanda are their scores' masks, as stated independently
    assert np.array_equal(mag, np_prune(W, pattern))
    norms = np.sqrt((X.astype(np.float64) ** 2).sum(axis=0))
    assert np.array_equal(wan, np_prune(W, pattern, np.abs(W) * norms))
    for Wp in (mag, wan, sgpt):
        check_pattern(Wp, pattern)
        # exactly half of every row (the random weights have no zeros of their own)
        assert ((Wp == 0).sum(axis=1) == W.shape[1] // 2).all()
    e_mag, e_wan, e_sgpt = (recon_error(W, Wp, X) for Wp in (mag, wan, sgpt))
    assert e_wan < e_mag
    assert e_sgpt < e_wan
    # Wanda and magnitude keep the original values; SparseGPT updates the kept ones
    assert np.array_equal(wan[wan != 0], W[wan != 0])
    assert not np.array_equal(sgpt[sgpt != 0], W[sgpt != 0])


def test_sparsegpt_is_exact_when_nothing_needs_compensating():
    """Inputs whose pruned columns are always zero: SparseGPT's update then changes nothing
    that matters and its error is zero, as is magnitude's with those columns' weights gone."""
    W, X = random_layer(n=8, d=32)
    X[:, 1::2] = 0  # odd inputs never fire: a 2:4 mask keeping the even ones loses nothing
    H = X.T.astype(np.float64) @ X / X.shape[0]
    Wp = prune.sparsegpt(W, H, "sp24")
    check_pattern(Wp, "sp24")
    assert recon_error(W, Wp, X) < 1e-4 * np.linalg.norm(W @ X.T)


@pytest.mark.parametrize("bad", ["1.2", "120%", "3:4", "0.7", "x"])
def test_pattern_refused(bad):
    with pytest.raises(ConvertError, match="--prune-pattern"):
        prune.options("magnitude", bad)


def test_options_refused_before_work(tmp_path):
    with pytest.raises(ConvertError, match="--prune 'lasso'"):
        prune.options("lasso", "2:4")
    opt = prune.options("magnitude", "2:4")
    with pytest.raises(ConvertError, match="--quant f32"):
        convert(tiny.checkpoint("llama"), tmp_path / "m", quant="f32", progress=False, prune=opt)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ConvertError, match="--calib/--predictor"):
        convert(tiny.checkpoint("llama"), tmp_path / "m", quant="f16", progress=False,
                prune=opt, predictor=True)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    opt = prune.options("wanda", "2:4", calib=str(short), tokens=512)
    with pytest.raises(ConvertError, match="too short"):
        convert(tiny.checkpoint("llama"), tmp_path / "m", quant="f16", progress=False, prune=opt)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# Converted models


@pytest.mark.skipif(not simd.AVAILABLE, reason="the fused call needs the JIT")
@pytest.mark.parametrize("pattern,mode", [("2:4", "fast"), ("2:4", "generic"), ("0.5", "fast")])
def test_fused_decode_of_pruned_int8_model(tmp_path, monkeypatch, pattern, mode):
    """Decode of a pruned int8 model in one call per layer (fused.py with sparse.py's int8
    kernels) gives bit for bit the general path's logits (which the kernel tests check against
    NumPy); every layer is fused where the kernels take its rows (2:4: d >= 256; 50%: with
    VBMI2, in the fast mode)."""
    from test_fused import decode_logits

    monkeypatch.setattr(kernels, "MODE", mode)
    monkeypatch.setitem(tiny.VARIANTS, "llama_wide", dict(d=256, heads=4, kv=2, d_ff=512))
    dst = convert(tiny.build("llama_wide", tmp_path), tmp_path / "m", quant="int8",
                  progress=False, prune=prune.options("magnitude", pattern))
    m = edgellm.load(dst)
    ids = tiny.token_ids("llama", 12)
    general = decode_logits(m, ids, 6, False)
    got = decode_logits(m, ids, 6, True)
    fused = [p is not None for p in m.runtime._fused_plans[0]]
    assert fused == [pattern == "2:4" or (mode == "fast" and ksparse.HAVE_VBMI2)] * len(fused)
    assert np.array_equal(got.view(np.uint32), general.view(np.uint32))


def _linears(model_dir):
    """{(layer, canonical): dense float64 weights decoded from the model} and the manifest."""
    m, cfg = format.read_manifest(model_dir)
    r = Reader(model_dir, m)
    out = {}
    for c in m["chunks"][1:]:
        f = c["file"]
        i = int(f.split("_")[1].split(".")[0])
        for name in ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_down"):
            out[i, name] = r.matrix(f, name).dequantize().astype(np.float64)
        b = r.array(f, "ffn_bundles")
        for p in c["tensors"]["ffn_bundles"]["parts"]:
            out[i, "ffn_" + p["name"]] = encodings.unpack_bundle_part(b, p, cfg.d_model)
    return out, m


HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_o": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj"}


@pytest.mark.parametrize("method,pattern", [("magnitude", "2:4"), ("magnitude", "0.5"),
                                            ("wanda", "2:4"), ("sparsegpt", "0.5")])
def test_converted_model_logits_equal_numpy_forward_with_pruned_weights(tmp_path, method,
                                                                        pattern):
    src = tiny.checkpoint("llama")
    dst = tmp_path / "m"
    convert(src, dst, quant="f16", progress=False,
            prune=prune.options(method, pattern, tokens=512))
    lin, m = _linears(dst)
    pat = prune.parse_pattern(pattern)
    rep = m["provenance"]["quantization"]["pruning"]
    assert rep["method"] == method and rep["mean_zero_fraction"] == 0.5
    W = reference.load_tensors(src)
    for (i, name), w in lin.items():
        enc = [e for e in ([m["chunks"][i + 1]["tensors"].get(name)]) if e]
        assert not enc or enc[0]["encoding"] == f"{pat}_f16"
        check_pattern(w, pat)
        assert ((w == 0).sum(axis=1) >= w.shape[1] // 2).all()
        key = f"model.layers.{i}.{HF[name]}.weight"
        if method == "magnitude":  # the source weights' own magnitude mask, values as f16
            want = np_prune(W[key], pat).astype(np.float16).astype(np.float64)
            assert np.array_equal(w, want), (i, name)
        W[key] = w  # the pruned weights as stored
    r = Reader(str(dst), m)  # and the embedding and head as stored (f16)
    W["model.embed_tokens.weight"] = r.matrix(format.EMBED_CHUNK, "tok_embeddings").dequantize()
    W["lm_head.weight"] = r.matrix(format.EMBED_CHUNK, "output").dequantize()
    ids = tiny.token_ids("llama", n=16)
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    want = reference._llama(c, W, np.asarray(ids)).astype(np.float32)
    got = edgellm.load(str(dst), kv="f32").logits(ids)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_pruned_model_is_smaller_and_reads_less(tmp_path):
    src = tiny.checkpoint("llama")
    convert(src, tmp_path / "dense", quant="int8", progress=False)
    convert(src, tmp_path / "sparse", quant="int8", progress=False,
            prune=prune.options("magnitude", "2:4"))

    def layer_bytes(d):
        m, _ = format.read_manifest(d)
        return sum(c["size"] for c in m["chunks"][1:])

    # int8 rows: d bytes dense, d/2 + d/8 sparse (plus the unchanged norms and scales)
    assert layer_bytes(tmp_path / "sparse") < 0.7 * layer_bytes(tmp_path / "dense")
