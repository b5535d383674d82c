"""The KV cache: f16/int8 encodings read by the attention kernel, their error against f32, and
the sliding window with attention sinks (bookkeeping, re-rotated keys, generation past n_ctx,
prefix reuse across shifts)."""

from types import SimpleNamespace

import numpy as np
import pytest

import edgellm
import tiny
from childpytest import no_jit
from clirun import edgellm_cli
from edgellm.cli import demo_model_path
from edgellm.runtime import encodings, kernels, kvcache
from edgellm.runtime.errors import ContextLengthError, EdgeLLMError
from edgellm.runtime.kernels import reference as ref

DEMO = demo_model_path()
KVS = ["f32", "f16", "int8"]


def encode(kv, x):
    """x f32[KVH, C, hd] as a cache of encoding kv stores it: (values, scales or None)."""
    c = kvcache.KVCache(SimpleNamespace(n_kv_heads=x.shape[0], head_dim=x.shape[2],
                                        n_layers=1), x.shape[1], kv)
    return c._encode(x)


# ---------------------------------------------------------------------------------------------
# the kernel reads every encoding as stored


@pytest.mark.parametrize("kv", ["f16", "int8"])
@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("T,start", [(1, 0), (1, 29), (5, 11)])
@pytest.mark.parametrize("hd", [16, 64, 96])  # int8: one scale per row (16), blocks of 32
def test_attention_encoded_cache(kv, ratio, T, start, hd):
    rng = np.random.default_rng(ratio * 100 + T + start + hd)
    kvh, C = 2, 40
    q = rng.standard_normal((T, kvh * ratio, hd)).astype(np.float32)
    kc, ks = encode(kv, rng.standard_normal((kvh, C, hd)).astype(np.float32))
    vc, vs = encode(kv, rng.standard_normal((kvh, C, hd)).astype(np.float32))
    if ks is not None:  # beyond the block: must never be read
        ks[:, start + T:] = np.nan
        vs[:, start + T:] = np.nan
    else:
        kc[:, start + T:] = np.nan
        vc[:, start + T:] = np.nan
    out = kernels.attention(q, kc, vc, start, ks, vs)
    # the reference dequantizes the same stored values exactly, so only the float32 summation
    # order differs: softmax weights sum to 1, |v| = O(1), <= 40 keys: 1e-5 as for f32
    np.testing.assert_allclose(out, ref.attention(q, kc, vc, start, ks, vs), rtol=1e-5,
                               atol=1e-5)


def test_attention_encoded_cache_tiny():
    test_attention_encoded_cache("f16", 3, 2, 1, 64)
    test_attention_encoded_cache("int8", 3, 2, 1, 64)


@pytest.mark.parametrize("T,kvh,hd", [(1, 2, 64), (7, 3, 96), (5, 2, 16), (3, 1, 24)])
def test_store_int8_equals_the_codec(T, kvh, hd):
    """The int8 store kernel encodes each block exactly as encodings.Int8 (bit for bit)."""
    rng = np.random.default_rng(T * hd)
    x = (rng.standard_normal((T, kvh, hd)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    x[0, 0, :8] = 0.0
    blk = kvcache.int8_block(hd)
    if blk == hd:
        x[-1, -1] = 0.0  # an all-zero block: scale 0, values 0
    c = kvcache.KVCache(SimpleNamespace(n_kv_heads=kvh, head_dim=hd, n_layers=1), 10, "int8")
    c.store(0, 2, x, x)
    q, s = encodings.codec("int8").quantize(x.transpose(1, 0, 2).reshape(-1, blk))
    np.testing.assert_array_equal(c.k[0][:, 2:2 + T].reshape(-1, blk), q)
    np.testing.assert_array_equal(c.k_scale[0][:, 2:2 + T].reshape(-1), s)
    assert not c.k[0][:, :2].any() and not c.k[0][:, 2 + T:].any()


def test_store_int8_tiny():
    test_store_int8_equals_the_codec(2, 2, 64)


def test_attention_rejects_mismatched_caches():
    q = np.zeros((1, 2, 32), np.float32)
    k = np.zeros((1, 8, 32), np.int8)
    with pytest.raises(EdgeLLMError, match="scales"):
        kernels.attention(q, k, k, 0)  # int8 without its scales


def test_no_jit_subset():
    """The *_tiny tests again with NUMBA_DISABLE_JIT=1 (this test's name must not match 'tiny')."""
    assert no_jit(__file__, "tiny and not no_jit") == 3


# ---------------------------------------------------------------------------------------------
# encodings: memory, bad input


def test_memory_per_token():
    cfg = edgellm.load(DEMO).config  # 4 layers, 2 kv heads x 64
    per = {kv: kvcache.bytes_per_token(cfg, kv) for kv in KVS}
    assert per == {"f32": 4096, "f16": 2048, "int8": 2 * 4 * 2 * (64 + 2 * 4)}
    for kv in KVS:
        c = kvcache.KVCache(cfg, 50, kv)
        assert c.nbytes() == 50 * per[kv]


def test_bad_encoding_and_out_of_range_values():
    with pytest.raises(EdgeLLMError, match="kv='int4'"):
        edgellm.load(DEMO, kv="int4")
    c = kvcache.KVCache(SimpleNamespace(n_kv_heads=1, head_dim=4, n_layers=1), 8, "f16")
    big = np.full((1, 1, 4), 1e6, np.float32)
    with pytest.raises(EdgeLLMError, match="float16 range.*f32"):
        c.store(0, 0, big, big)


# ---------------------------------------------------------------------------------------------
# error of f16 and int8 against f32, teacher-forced


def own_text(model, n, seed=0):
    """n token ids sampled from the model itself (temperature 1): text it finds typical."""
    ids = [model.tokenizer.bos_id]
    while len(ids) < n:
        model.complete(ids, max_tokens=n - len(ids), temperature=1.0, top_k=0, top_p=1.0,
                       min_p=0.0, repetition_penalty=1.0, seed=seed + len(ids),
                       context_shift=False)
        ids += model.last_stats["token_ids"] or [3]
    return ids[:n]


def logit_errors(path, n):
    ids = own_text(edgellm.load(path, kv="f32"), n)
    base = edgellm.load(path, kv="f32", n_ctx=n).logits(ids)
    out = {}
    for kv in ("f16", "int8"):
        lg = edgellm.load(path, kv=kv, n_ctx=n).logits(ids)
        out[kv] = (float(np.abs(lg - base).max() / np.abs(base).max()),
                   float((lg.argmax(-1) == base.argmax(-1)).mean()))
    return out


# Bounds on max |logit difference| / max |logit| and on top-1 agreement, per model (measured:
# docs/INTERNALS.md, "KV cache"). f16 keeps 11 significant bits: each cached value is off by
# <= 2^-11 relative and the logits, a smooth function of them through a few layers, moved by
# 1.4e-4 (demo) and 6e-4 (random tiny models) of their size; bounds 10x and 5x that. int8 steps
# are max|x|/127 per block of 32, 16 times coarser: measured 2.3e-3 (demo), 1e-2 and 1.5e-2
# (tiny); bounds 2e-2 and 4e-2. Top-1 changes only where the two best logits are closer than
# the error: measured for int8 99.7% (demo) and 97.5-98% (the random tiny models, whose logits
# are nearly flat, so near-ties are common), for f16 99.5-100%; bounds a few flips below.
@pytest.mark.parametrize("path,n,f16,int8", [
    (DEMO, 300, (2e-3, 0.99), (2e-2, 0.97)),
    (tiny.converted("llama", "f32"), 200, (3e-3, 0.98), (4e-2, 0.94)),
    (tiny.converted("llama_relu", "f32"), 200, (3e-3, 0.98), (4e-2, 0.94)),
], ids=["demo", "hf-llama", "hf-llama-hd32"])
def test_logit_error_against_f32(path, n, f16, int8):
    err = logit_errors(path, n)
    assert err["f16"][0] < f16[0] and err["f16"][1] >= f16[1], err
    assert err["int8"][0] < int8[0] and err["int8"][1] >= int8[1], err


# ---------------------------------------------------------------------------------------------
# sliding window: bookkeeping


def filled_cache(P, kv="f32", n_ctx=32):
    """A cache of P tokens 100.. whose value rows hold their position (keys: position + 0.5)."""
    cfg = SimpleNamespace(n_kv_heads=2, head_dim=4, n_layers=2)
    c = kvcache.KVCache(cfg, n_ctx, kv)
    pos = np.arange(P, dtype=np.float32)[:, None, None] * np.ones((1, 2, 4), np.float32)
    for layer in range(2):
        c.store(layer, 0, pos + 0.5, pos)
    c.tokens = list(range(100, 100 + P))
    return c


def test_shift_bookkeeping():
    c = filled_cache(20)
    calls = []

    def rotate(keys, delta):
        calls.append((keys.copy(), delta))
        return keys

    c.shift(6, 4, rotate)
    assert c.pos == 14 and c.sinks == 4 and c.n_dropped == 6
    assert c.tokens == [100, 101, 102, 103] + list(range(110, 120))
    for layer in range(2):  # values moved down, sinks untouched
        assert list(c.v[layer][0, :14, 0]) == [0, 1, 2, 3] + list(range(10, 20))
        assert list(c.k[layer][1, :14, 3]) == [0.5, 1.5, 2.5, 3.5] + [p + .5 for p in
                                                                       range(10, 20)]
    # every layer's moved keys (positions 10..19) were rotated back by 6 positions
    assert len(calls) == 2 and all(d == 6 for _, d in calls)
    assert all(list(k[0, :, 0]) == [p + .5 for p in range(10, 20)] for k, _ in calls)
    # a second shift keeps the first one's sinks (the dropped tokens are all after them)
    c.shift(3, 2, lambda k, d: k)
    assert c.sinks == 4 and c.n_dropped == 9
    assert c.tokens == [100, 101, 102, 103] + list(range(113, 120))
    with pytest.raises(EdgeLLMError, match="cannot drop"):
        c.shift(20, 4, lambda k, d: k)


def test_match_after_shift():
    conv = list(range(100, 120))

    def shifted():
        c = filled_cache(20)
        c.shift(6, 4, lambda k, d: k)
        return c

    c = shifted()  # the same conversation continued: all of it is covered
    assert c.match(conv + [7, 8]) == 20 and c.pos == 14 and c.n_dropped == 6
    c = shifted()  # diverges inside the kept window at conversation index 15
    assert c.match(conv[:15] + [1, 2]) == 15 and c.pos == 9 and c.n_dropped == 6
    assert c.tokens == [100, 101, 102, 103, 110, 111, 112, 113, 114]
    c = shifted()  # diverges among the dropped tokens: only the sinks are still valid
    assert c.match(conv[:7] + [55] + conv[8:]) == 4 and c.pos == 4 and c.n_dropped == 0
    c = shifted()  # the cached tokens themselves, as a new conversation, are not a prefix
    assert c.match(list(c.tokens) + [5]) == 4 and c.pos == 4 and c.n_dropped == 0
    c = shifted()  # a shorter prompt that ends inside the dropped part
    assert c.match(conv[:8]) == 4 and c.n_dropped == 0
    c = shifted()  # rewinding into the sinks: a plain prefix again
    c.rewind(2)
    assert c.tokens == [100, 101] and c.sinks == 0 and c.n_dropped == 0


@pytest.mark.parametrize("src,dst", [("f32", "f32"), ("int8", "int8"), ("f32", "f16"),
                                     ("f16", "int8"), ("int8", "f32")])
def test_state_round_trip(src, dst):
    """state() -> load_state() keeps tokens, window and values (converted across encodings)."""
    c = filled_cache(20, src)
    c.shift(6, 4, lambda k, d: k)
    st = c.state()
    d = filled_cache(0, dst)
    d.load_state(st)
    assert d.tokens == c.tokens and (d.sinks, d.n_dropped, d.dropped_hash) == (
        c.sinks, c.n_dropped, c.dropped_hash)
    assert d.match(list(range(100, 120)) + [1]) == 20  # the restored window still matches
    for layer in range(2):
        a = c._decode(c.k[layer][:, :14], None if c.k_scale[layer] is None
                      else c.k_scale[layer][:, :14])
        b = d._decode(d.k[layer][:, :14], None if d.k_scale[layer] is None
                      else d.k_scale[layer][:, :14])
        # values <= 19.5: one int8 step (19.5 / 127) or f16 ulp covers a re-encoding
        np.testing.assert_allclose(a, b, atol=19.5 / 127 if "int8" in (src, dst) else 0.01)


# ---------------------------------------------------------------------------------------------
# sliding window: re-rotated keys give the attention of the kept tokens at their new positions


@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("path", [DEMO, tiny.converted("llama_rope_llama3", "f32")],
                         ids=["demo", "hf-llama3-rope"])
def test_shift_equals_fresh_attention(kv, path):
    m = edgellm.load(path, kv=kv, n_ctx=64)
    rt, cfg = m.runtime, m.config
    KVH, hd, H = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    P, sinks, n_drop = 50, 4, 20
    rng = np.random.default_rng(0)
    kraw = rng.standard_normal((P + 1, KVH, hd)).astype(np.float32)  # keys before RoPE
    v = rng.standard_normal((P + 1, KVH, hd)).astype(np.float32)
    cos, sin = ref.rope_tables(hd, 64, cfg.rope_theta, cfg.rope_scaling)
    rt.cache = cache = rt.new_cache()
    cache.store(0, 0, ref.apply_rope(kraw[:P], cos, sin, np.arange(P)), v[:P])
    cache.tokens = list(range(P))
    rt.shift(n_drop, sinks)
    new = P - n_drop  # the next token's position
    cache.store(0, new, ref.apply_rope(kraw[P:], cos, sin, [new]), v[P:])
    q = ref.apply_rope(rng.standard_normal((1, H, hd)).astype(np.float32), cos, sin, [new])
    kept = np.r_[0:sinks, sinks + n_drop:P + 1]
    # the fresh computation: kept tokens' keys rotated once, at their new positions 0..new
    k_fresh = ref.apply_rope(kraw[kept], cos, sin, np.arange(new + 1)).transpose(1, 0, 2)
    v_fresh = v[kept].transpose(1, 0, 2)
    expected = ref.attention(q, k_fresh, v_fresh, new)
    kc, vc, ks, vs = cache.layer(0)
    got = kernels.attention(q, kc, vc, new, ks, vs)
    stored_k = cache._decode(kc[:, :new + 1], None if ks is None else ks[:, :new + 1])
    stored_v = cache._decode(vc[:, :new + 1], None if vs is None else vs[:, :new + 1])
    if kv == "f32":
        # rotating by p then by -delta instead of once by p - delta: a few float32 roundings
        # of |k| ~ 1 (tables and products), 1e-6 relative
        np.testing.assert_allclose(stored_k, k_fresh, atol=1e-5)
        np.testing.assert_array_equal(stored_v, v_fresh)  # values move unchanged
        np.testing.assert_allclose(got, expected, atol=2e-5)
        return
    # encoded: a moved key was encoded, decoded, rotated and encoded again. Encoding errs by
    # <= b per element (codec bound of its row or block); a rotation mixes element i with
    # i + hd/2, so the first error becomes <= 2b, plus b for the second encoding: 3b (b of
    # the largest |k| of the row, as codec.max_error_bound computes it), plus the f32 term.
    codec = encodings.codec("f16" if kv == "f16" else "int8")
    b = max(codec.max_error_bound(k_fresh[h, j:j + 1]) for h in range(KVH)
            for j in range(new + 1))
    assert np.abs(stored_k - k_fresh).max() <= 3 * b + 1e-5
    # values are moved as stored: their error is the encoding's alone
    assert np.abs(stored_v - v_fresh).max() <= max(codec.max_error_bound(v_fresh[h])
                                                   for h in range(KVH)) + 1e-7
    # and the kernel computes exactly the attention over what is stored
    np.testing.assert_allclose(got, ref.attention(q, kc, vc, new, ks, vs), atol=2e-5)


def test_shift_tiny():
    test_shift_equals_fresh_attention("f16", DEMO)
    test_shift_equals_fresh_attention("int8", DEMO)


# ---------------------------------------------------------------------------------------------
# sliding window: generation


PROMPT = "It is a truth universally acknowledged"


@pytest.mark.parametrize("kv", KVS)
def test_generation_runs_past_the_context(kv):
    m = edgellm.load(DEMO, kv=kv, n_ctx=64)
    before = m.default_cache.nbytes()
    n_prompt = len(m.tokenizer.encode(PROMPT))
    text = m.complete(PROMPT, max_tokens=300, temperature=0)
    s, c = m.last_stats, m.default_cache
    assert s["generated_tokens"] == 300 and s["finish_reason"] == "length", s
    assert not s["context_full"] and s["shifts"] >= (n_prompt + 300 - 64) // 16
    assert c.pos <= 64 and c.nbytes() == before  # bounded memory
    assert c.sinks == 4 and c.n_dropped + c.pos == n_prompt + 299  # last token not fed yet
    assert len(text) > 300  # it kept producing text


def test_window_off_stops_at_the_context():
    m = edgellm.load(DEMO, n_ctx=64)
    n_prompt = len(m.tokenizer.encode(PROMPT))
    m.complete(PROMPT, max_tokens=300, temperature=0, context_shift=False)
    s = m.last_stats
    assert s["finish_reason"] == "length" and s["context_full"] and s["shifts"] == 0
    assert s["generated_tokens"] == 64 - n_prompt + 1


def test_new_prompt_tokens_make_room_by_shifting():
    """A continued conversation whose new tokens do not fit shifts before its prefill; new
    tokens that cannot fit even then are a ContextLengthError, window or not."""
    m = edgellm.load(DEMO, n_ctx=64)
    prompt = m.tokenizer.encode(PROMPT)
    m.complete(prompt, max_tokens=50, temperature=0, context_shift=False)
    conv = prompt + m.last_stats["token_ids"]
    extra = m.tokenizer.encode(" She said that the house was very fine indeed, and the rest "
                               "of them went to town", add_bos=False)
    assert m.default_cache.pos == len(conv) - 1 and m.default_cache.pos + len(extra) > 64
    m.complete(conv + extra, max_tokens=5, temperature=0)
    s, c = m.last_stats, m.default_cache
    assert s["cached_tokens"] == len(conv) - 1 and s["shifts"] >= 1
    assert c.pos <= 64 and c.n_dropped + c.pos == len(conv) + len(extra) + 4
    with pytest.raises(ContextLengthError, match="context holds 64"):
        m.complete(conv + list(range(5, 70)), max_tokens=5)
    with pytest.raises(ContextLengthError):  # the window off: the prompt must fit as it is
        edgellm.load(DEMO, n_ctx=64).complete(conv + extra, max_tokens=5, context_shift=False)


def test_learned_positions_refuse_the_window():
    m = edgellm.load(tiny.converted("opt", "f32"), n_ctx=24)
    with pytest.raises(EdgeLLMError, match="rotary.*learned"):
        m.complete("a b", max_tokens=50, context_shift=True)
    m.complete("a b", max_tokens=50, temperature=0)  # default: off for learned positions
    s = m.last_stats
    assert s["finish_reason"] == "stop" or s["context_full"], s


def test_bad_window_parameters():
    m = edgellm.load(DEMO, n_ctx=64)
    for kw in ({"sinks": -1}, {"shift_size": 0}, {"sinks": 40, "shift_size": 30}):
        with pytest.raises(EdgeLLMError, match="sliding window"):
            m.complete(PROMPT, max_tokens=2, **kw)


def test_reuse_across_a_shift():
    """A conversation continued after shifts reuses the window; a different conversation that
    happens to start with the window's tokens gets a fresh computation, as from an empty
    cache."""
    m = edgellm.load(DEMO, n_ctx=64)
    prompt = m.tokenizer.encode(PROMPT)
    m.complete(prompt, max_tokens=120, temperature=0)
    gen = m.last_stats["token_ids"]
    assert m.last_stats["shifts"] > 0
    cache = m.default_cache
    window = list(cache.tokens)
    snapshot = cache.state()

    # the conversation continued: everything but the new tokens is covered by the cache
    turn = prompt + gen + m.tokenizer.encode(" And", add_bos=False)
    got = m.complete(turn, max_tokens=10, temperature=0)
    assert m.last_stats["cached_tokens"] == len(prompt) + len(gen) - 1
    # ... and equals running the new tokens on a copy of that cache directly
    rt = m.runtime
    rt.cache = copy = rt.new_cache()
    copy.load_state(snapshot)
    logits = rt.forward(turn[len(prompt) + len(gen) - 1:])[-1]
    assert m.tokenizer.decode([int(np.argmax(logits))]).strip() in got

    # the window's tokens as a new conversation: not reused beyond the sinks
    other = window + [int(t) for t in m.tokenizer.encode(" the", add_bos=False)]
    m.default_cache.load_state(snapshot)
    mine = m.complete(other, max_tokens=10, temperature=0)
    assert m.last_stats["cached_tokens"] <= 4
    fresh = edgellm.load(DEMO, n_ctx=64)
    assert fresh.complete(other, max_tokens=10, temperature=0) == mine



def test_cli_window_options():
    r = edgellm_cli("run", DEMO, "-p", PROMPT, "-n", "100", "--ctx", "32", "--temperature",
                    "0", "--kv", "int8", "--no-context-shift")
    assert r.returncode == 0, r.stderr
    assert "context of 32 tokens is full" in r.stderr and "--no-context-shift" in r.stderr
    r = edgellm_cli("run", DEMO, "-p", PROMPT, "-n", "100", "--ctx", "32", "--temperature",
                    "0", "--sinks", "2", "--shift-size", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert "is full" not in r.stderr and "decode        99 tokens" in r.stderr
