"""Calibration, neuron order (hot first, then co-activation) and neuron predictors (converters/calibrate.py,
converters/predictor.py, runtime/predictor.py), checked against NumPy on the source checkpoints'
own weights (tests/reference.py) and against the uncalibrated conversion."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import edgellm
import reference
import tiny
from edgellm.cli import main as cli_main
from edgellm.converters import calibrate
from edgellm.converters.convert import convert
from edgellm.runtime import format
from edgellm.runtime import predictor as rp
from edgellm.runtime.errors import ConvertError, FormatError
from edgellm.runtime.reader import Reader

OPTS = {"tokens": 2048, "seq_len": 64, "epochs": 4}
_CACHE = {}


def calib_text(tmp_root):
    path = os.path.join(tmp_root, "calib.txt")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(tiny.corpus(400, seed=5)))
    return path


def calibrated(name, predictor, quant="f32", **extra):
    """`name` converted with calibration (and a predictor), once per session. Read-only."""
    key = (name, predictor, quant, tuple(sorted(extra.items())))
    if key not in _CACHE:
        root = tiny._root()
        dst = os.path.join(root, "calib", f"{name}-{quant}-{predictor}-{len(_CACHE)}")
        _CACHE[key] = convert(tiny.checkpoint(name), dst, quant=quant, progress=False,
                              predictor=predictor, calib=calib_text(root),
                              calib_options={**OPTS, **extra})
    return _CACHE[key]


def chunk(path, i):
    return load_file(os.path.join(path, format.layer_chunk(i)))


def manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def ffn_inputs(model, ids):
    """FFN inputs (after ffn_norm) of every layer for the tokens ids, via a recording FFN."""
    seen = {}
    for i, L in enumerate(model.runtime.layers):
        def rec(h, f=L.ffn, i=i):
            seen.setdefault(i, []).append(np.array(h))
            return f(h)
        L.ffn = rec
    try:
        model.logits(ids)
    finally:
        for L in model.runtime.layers:
            L.ffn = L.ffn.__defaults__[0]
    return {i: np.concatenate(v) for i, v in seen.items()}


# ---------------------------------------------------------------------------------------------
# Hot-first order


@pytest.mark.parametrize("name", ["llama_relu", "opt"])
def test_reorder_moves_rows_unchanged_and_keeps_logits(name):
    plain, cal = tiny.converted(name, "f32", ffn_down="bundle"), calibrated(name, False)
    cfg = edgellm.load(cal).config
    for i in range(cfg.n_layers):
        a, b = chunk(plain, i), chunk(cal, i)
        perm = b["ffn_perm"]
        assert sorted(perm.tolist()) == list(range(cfg.d_ff))
        assert not np.array_equal(perm, np.arange(cfg.d_ff))  # it did reorder
        # hot first (neurons needed by >= HOT_PREFIX of tokens), then the co-activation chain
        freq = b["ffn_freq"]
        hot = int(np.sum(freq >= calibrate.HOT_PREFIX))
        assert np.all(np.diff(freq[:hot]) <= 0) and np.all(freq[hot:] < calibrate.HOT_PREFIX)
        assert np.array_equal(b["ffn_bundles"], a["ffn_bundles"][perm])  # same bytes, moved
        if "ffn_up.bias" in a:
            assert np.array_equal(b["ffn_up.bias"], a["ffn_up.bias"][perm])
    ids = tiny.token_ids(name, n=24)
    # f32 KV cache: an f16 cache's rounding would amplify the tiny differences below
    before = edgellm.load(plain, kv="f32").logits(ids)
    after = edgellm.load(cal, kv="f32").logits(ids)
    ref = reference.forward(tiny.checkpoint(name), ids)
    # only the order of the FFN's float32 sums changes, so the logits move by float32 rounding
    # (measured ~5e-7 relative); both stay as close to the float64 reference as test_convert asks
    scale = np.abs(ref).max()
    assert np.abs(after - before).max() < 1e-5 * scale
    assert np.abs(after - ref).max() < 1e-4 * scale
    assert np.array_equal(after.argmax(1), before.argmax(1))


def test_coactivation_order_puts_neurons_that_fire_together_side_by_side():
    """neuron_order on planted groups (neurons of a group fire on the same tokens, shuffled
    across the layer): the hot neurons first by frequency, a permutation, and each token's
    active cold neurons in far fewer runs than in frequency order."""
    rng = np.random.default_rng(0)
    n, groups, N = 256, 32, 4000
    group = rng.permutation(np.arange(n) % groups)  # 8 neurons per group, scattered
    fires = rng.random((N, groups)) < rng.uniform(0.02, 0.3, groups)  # group g on token t
    Y = fires[:, group] & (rng.random((N, n)) < 0.95)  # members miss now and then
    Y[:, :5] = rng.random((N, 5)) < 0.8  # a few hot neurons
    freq = Y.mean(0)
    order = calibrate.neuron_order(Y, freq)
    assert sorted(order.tolist()) == list(range(n))
    hot = int(np.sum(freq >= calibrate.HOT_PREFIX))
    assert hot == 5 and np.all(np.diff(freq[order[:hot]]) <= 0)

    def runs(order):
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        cold = np.zeros(n, bool)
        cold[order[hot:]] = True
        total = 0
        for y in Y[:500]:
            p = np.sort(pos[y & cold])
            total += int(p.size > 0) + int(np.sum(np.diff(p) > 1))
        return total

    by_freq = np.argsort(-freq, kind="stable")
    assert runs(order) < 0.5 * runs(by_freq)


def test_frequencies_match_numpy_on_source_weights():
    """ffn_freq of row r == how often source neuron ffn_perm[r] is active (gate·h > 0 with the
    checkpoint's own gate matrix) over the calibration tokens, h recorded from the dense model."""
    name = "llama_relu"
    path = calibrated(name, False)
    m = manifest(path)
    model = edgellm.load(tiny.converted(name, "f32"))
    ids = model.tokenizer.encode(open(calib_text(tiny._root())).read(), add_bos=False)
    W = reference.load_tensors(tiny.checkpoint(name))
    seq_len = m["calibration"]["seq_len"]
    span = seq_len - 1
    counts, n = None, 0
    for s in range(0, OPTS["tokens"] // seq_len):
        seq = [model.tokenizer.bos_id] + ids[s * span:(s + 1) * span]
        hs = ffn_inputs(model, seq)
        if counts is None:
            counts = [0.0] * len(hs)
        for i, h in hs.items():
            g = h @ W[f"model.layers.{i}.mlp.gate_proj.weight"].T
            counts[i] = counts[i] + (g > 0).sum(axis=0)
        n += len(seq)
    assert n == m["calibration"]["tokens"]
    for i, c in enumerate(counts):
        b = chunk(path, i)
        # borderline neurons (|gate·h| ~ 1e-7) may flip between f32 and f64: allow a token or two
        np.testing.assert_allclose(b["ffn_freq"], (c / n)[b["ffn_perm"]], atol=2.5 / n)


# ---------------------------------------------------------------------------------------------
# Low-rank predictors


@pytest.mark.parametrize("name", ["llama_relu", "opt"])
def test_lowrank_predictor_matches_numpy(name):
    path = calibrated(name, True)
    model = edgellm.load(path)
    cfg = model.config
    rng = np.random.default_rng(0)
    for i in range(cfg.n_layers):
        p = rp.Predictor.load(model.reader, cfg, i)
        assert p.kind == "lowrank" and p.top_k is None and not p.needs_gate_rows
        t = chunk(path, i)
        A = t["ffn_pred.a"].astype(np.float64)
        B = t["ffn_pred.b"].astype(np.float64)
        assert A.shape == (p.rank, cfg.d_model) and B.shape == (cfg.d_ff, p.rank)
        assert p.resident_bytes == A.size * 2 + B.size * 2 + cfg.d_ff * 4
        for _ in range(5):
            h = rng.standard_normal(cfg.d_model).astype(np.float32)
            s = B @ (A @ h) + t["ffn_pred.bias"]
            want = np.flatnonzero(s > t["ffn_pred.threshold"][0])
            got = p.active(h)
            assert got.dtype == np.int32 and np.all(np.diff(got) > 0)
            # equal except where the score is within float32 rounding of the threshold
            close = np.abs(s - t["ffn_pred.threshold"][0]) < 1e-4 * np.abs(s).max()
            assert set(got) ^ set(want) <= set(np.flatnonzero(close))


@pytest.mark.parametrize("name", ["llama_relu", "opt"])
def test_predictor_recall_on_heldout_calibration_tokens(name):
    """The recorded recall is reached, and recomputing it here (truth from the checkpoint's own
    weights, prediction from Predictor.active) over the held-out calibration sequences agrees."""
    path = calibrated(name, True)
    m = manifest(path)
    cal = m["calibration"]
    assert cal["predictor"]["target_recall"] == 0.99
    model = edgellm.load(path)
    cfg = model.config
    ids = model.tokenizer.encode(open(calib_text(tiny._root())).read(), add_bos=False)
    W = reference.load_tensors(tiny.checkpoint(name))
    seq_len, span = cal["seq_len"], cal["seq_len"] - (1 if model.tokenizer.add_bos else 0)
    n_seq = cal["tokens"] // seq_len
    n_val = cal["heldout_tokens"] // seq_len
    hit = np.zeros(cfg.n_layers)
    true = np.zeros(cfg.n_layers)
    preds = [rp.Predictor.load(model.reader, cfg, i) for i in range(cfg.n_layers)]
    for s in range(n_seq - n_val, n_seq):
        seq = ([model.tokenizer.bos_id] if model.tokenizer.add_bos else []) + \
            ids[s * span:(s + 1) * span]
        for i, h in ffn_inputs(model, seq).items():
            perm = chunk(path, i)["ffn_perm"]
            if name == "opt":
                pre = f"model.decoder.layers.{i}.fc1." if f"model.decoder.layers.{i}.fc1.weight" \
                    in W else f"decoder.layers.{i}.fc1."
                z = h @ W[pre + "weight"].T + W[pre + "bias"]
            else:
                z = h @ W[f"model.layers.{i}.mlp.gate_proj.weight"].T
            y = (z > 0)[:, perm]  # in bundle-row order
            for t in range(h.shape[0]):
                idx = preds[i].active(h[t])
                hit[i] += y[t, idx].sum()
                true[i] += y[t].sum()
    recall = hit / true
    recorded = [r["recall"] for r in cal["layers"]]
    assert min(recorded) >= 0.99
    np.testing.assert_allclose(recall, recorded, atol=0.003)


def test_silu_threshold_and_topk():
    """SiLU: calibration sets |silu(gate·h)| thresholds for the target sparsity (the gate rows
    stay resident); --predictor adds a low-rank predictor that selects the top k."""
    name = "llama"
    path = calibrated(name, False, sparsity=0.6)
    model = edgellm.load(path)
    cfg = model.config
    W = reference.load_tensors(tiny.checkpoint(name))
    ids = model.tokenizer.encode(" ".join(tiny.corpus(20, seed=9)))[:64]
    hs = ffn_inputs(model, ids)
    for i in range(cfg.n_layers):
        p = rp.Predictor.load(model.reader, cfg, i)
        assert p.kind == "threshold" and p.needs_gate_rows
        assert p.resident_bytes == cfg.d_ff * cfg.d_model * 4  # f32 gate rows
        perm = chunk(path, i)["ffn_perm"]
        g = (hs[i] @ W[f"model.layers.{i}.mlp.gate_proj.weight"].T)[:, perm]
        a = np.abs(reference.silu(g))
        frac = []
        for t in range(len(ids)):
            got = p.active(hs[i][t])
            want = np.flatnonzero(a[t] > p.threshold)
            close = np.flatnonzero(np.abs(a[t] - p.threshold) < 1e-5)
            assert set(got) ^ set(want) <= set(close)
            frac.append(got.size / cfg.d_ff)
        assert abs(np.mean(frac) - 0.4) < 0.1  # 60% sparsity on calibration text, similar here

    path = calibrated(name, True, sparsity=0.6)
    model = edgellm.load(path)
    for i in range(cfg.n_layers):
        p = rp.Predictor.load(model.reader, cfg, i)
        assert p.kind == "lowrank" and p.top_k is not None
        assert 0.4 * cfg.d_ff <= p.top_k <= cfg.d_ff
        got = p.active(hs[i][0])
        assert got.size == p.top_k and np.all(np.diff(got) > 0)
        rec = manifest(path)["calibration"]["layers"][i]
        assert rec["recall"] >= 0.99 and rec["top_k"] == p.top_k
        assert "ffn_act_threshold" in chunk(path, i)


def test_no_predictor():
    model = edgellm.load(tiny.converted("llama_relu", "f32"))
    assert rp.Predictor.load(model.reader, model.config, 0) is None
    model = edgellm.load(calibrated("llama_relu", False))  # ReLU, calibrated, no predictor
    assert rp.Predictor.load(model.reader, model.config, 0) is None


# ---------------------------------------------------------------------------------------------
# The FFN from predicted rows


def test_predicted_ffn_equals_masked_numpy_ffn():
    name = "llama_relu"
    path = calibrated(name, True)
    model = edgellm.load(path)
    cfg = model.config
    L = model.runtime.layers[1]
    p = rp.Predictor.load(model.reader, cfg, 1)
    W = reference.load_tensors(tiny.checkpoint(name))
    perm = chunk(path, 1)["ffn_perm"]
    wg, wu = (W[f"model.layers.1.mlp.{k}_proj.weight"][perm] for k in ("gate", "up"))
    wd = W["model.layers.1.mlp.down_proj.weight"][:, perm]
    h = np.random.default_rng(3).standard_normal((3, cfg.d_model)).astype(np.float32)
    pf = rp.PredictedFFN(L.ffn, p, check=True)
    out = pf(h)
    for t in range(3):
        mask = np.zeros(cfg.d_ff)
        mask[p.active(h[t])] = 1
        want = (np.maximum(wg @ h[t], 0) * (wu @ h[t]) * mask) @ wd.T
        np.testing.assert_allclose(out[t], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    st = pf.stats()
    assert st["tokens"] == 3 and 0 < st["recall"] <= 1 and 0 < st["predicted_fraction"] < 1

    class Everything:  # a predictor that selects every row gives the dense FFN
        d_ff = cfg.d_ff

        def active(self, h):
            return np.arange(cfg.d_ff, dtype=np.int32)

    np.testing.assert_allclose(rp.PredictedFFN(L.ffn, Everything())(h[:1]), L.ffn(h[:1]),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Format and input checks


def test_format_rejects_incomplete_or_misshapen_predictor():
    path = calibrated("llama_relu", True)
    m = manifest(path)
    bad = json.loads(json.dumps(m))
    del bad["chunks"][1]["tensors"]["ffn_pred.threshold"]
    with pytest.raises(FormatError, match="predictor needs"):
        format.validate_manifest(bad, path, os.path.join(path, "manifest.json"))
    bad = json.loads(json.dumps(m))
    bad["chunks"][1]["tensors"]["ffn_pred.b"]["shape"][1] += 1
    with pytest.raises(FormatError, match="ffn_pred.b"):
        format.validate_manifest(bad, path, os.path.join(path, "manifest.json"))
    bad = json.loads(json.dumps(m))
    bad["chunks"][1]["tensors"]["ffn_pred.top_k"] = {"encoding": "i32", "shape": [1],
                                                     "group_size": None}
    with pytest.raises(FormatError, match="exactly one"):
        format.validate_manifest(bad, path, os.path.join(path, "manifest.json"))
    format.validate_manifest(m, path, os.path.join(path, "manifest.json"))  # the real one is fine
    Reader(path, m).verify()


def test_bad_calibration_input_writes_nothing(tmp_path):
    src = tiny.checkpoint("llama_relu")
    dst = tmp_path / "out"
    with pytest.raises(ConvertError, match="missing.txt"):
        convert(src, dst, calib=tmp_path / "missing.txt", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConvertError, match="empty"):
        convert(src, dst, calib=empty, progress=False)
    with pytest.raises(ConvertError, match="recall"):
        convert(src, dst, predictor=True, calib_options={"recall": 1.5}, progress=False)
    with pytest.raises(ConvertError, match="options"):
        convert(src, dst, predictor=True, calib_options={"nonsense": 1}, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Hello.")
    with pytest.raises(ConvertError, match="too short"):
        convert(src, dst, calib=short, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []  # no staging


def test_cli_convert_with_predictor(tmp_path):
    dst = tmp_path / "m"
    rc = cli_main(["convert", tiny.checkpoint("opt"), "-o", str(dst), "--quant", "int8",
                   "--predictor", "--calib", calib_text(tiny._root()), "--calib-tokens", "1024",
                   "--predictor-rank", "16", "--predictor-recall", "0.95"])
    assert rc == 0
    cal = manifest(dst)["calibration"]
    assert cal["tokens"] <= 1024 and cal["predictor"]["rank"] == 16
    assert cal["predictor"]["target_recall"] == 0.95
    assert all(r["recall"] >= 0.95 for r in cal["layers"])
    model = edgellm.load(dst, verify=True)
    assert rp.Predictor.load(model.reader, model.config, 0).rank == 16


# ---------------------------------------------------------------------------------------------
# The demo model (needs its training checkpoint from scripts/train_demo.py)

DEMO = os.path.join(os.path.expanduser(os.environ.get("EDGELLM_DEMO_CACHE", "~/.cache/"
                                                      "edgellm-demo")))


@pytest.mark.slow
def test_demo_predictor_quality(tmp_path):
    hf, held = os.path.join(DEMO, "hf"), os.path.join(DEMO, "text", "heldout.txt")
    if not (os.path.isfile(os.path.join(hf, "model.safetensors")) and os.path.isfile(held)):
        pytest.skip("demo checkpoint and held-out text not present (scripts/get_demo_text.py, "
                    "scripts/train_demo.py)")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_predictor", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                        "predictor.py"))
    if spec is None or not os.path.exists(spec.origin):
        pytest.skip("benchmarks/predictor.py not in this checkout")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dst = tmp_path / "demo"
    convert(hf, dst, quant="int8", predictor=True, progress=False)
    out = tmp_path / "q.json"
    bench.main([str(dst), "--text", held, "--tokens", "2048", "--gen", "128", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["recall_mean"] >= 0.985  # target 0.99 on calibration text; held-out text differs
    assert r["predicted_fraction_mean"] < 0.5
    assert r["greedy_top1_agreement"] >= 0.98
    assert r["perplexity_increase"] <= 0.01
    shutil.rmtree(dst)
