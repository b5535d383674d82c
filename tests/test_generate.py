"""Generation through the KV cache agrees with recomputing from scratch; streaming, stop strings,
limits and the command line behave as documented."""

import time

import numpy as np
import pytest

import edgellm
import tiny
from clirun import edgellm_cli
from edgellm.runtime.errors import ContextLengthError, EdgeLLMError


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request):
    return edgellm.load(tiny.converted(request.param, "f32"))


def test_cached_decode_equals_full_recompute(model):
    """Greedy tokens via the KV cache == argmax of logits recomputed over the whole sequence."""
    ids = model.tokenizer.encode("the quick brown fox")
    list(model.generate(ids, max_tokens=12, temperature=0, repetition_penalty=1.0))
    n = model.last_stats["generated_tokens"]
    seq = list(ids)
    for _ in range(n):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    # the streamed text is the decoding of exactly those tokens, spacing after the prompt included
    text = model.complete(ids, max_tokens=n, temperature=0, repetition_penalty=1.0)
    dec = model.tokenizer.decode
    assert dec(ids) + text == dec(seq)


def test_logits_of_prefix_match_block_prefill(model):
    """Prefill in blocks (all positions at once) equals token-by-token decode."""
    ids = model.tokenizer.encode("a b c d e f g h i j")
    full = model.logits(ids)
    rt = model.runtime
    rt.reset()
    step = np.concatenate([rt.forward([t], all_logits=True) for t in ids])
    rt.reset()
    scale = max(1.0, np.abs(full).max())
    assert np.abs(full - step).max() < 1e-4 * scale


def test_kv_cache_reused_across_calls(model):
    """A prompt that extends the previous conversation only runs its new tokens, and the result is
    the same as from an empty cache."""
    first = model.tokenizer.encode("the quick brown fox")
    list(model.generate(first, max_tokens=5, temperature=0))
    turn = first + model.last_stats["token_ids"] + model.tokenizer.encode("jumps", add_bos=False)
    again = model.complete(turn, max_tokens=8, temperature=0)
    assert model.last_stats["cached_tokens"] >= len(first)
    fresh = edgellm.load(model.path)
    assert fresh.complete(turn, max_tokens=8, temperature=0) == again
    assert fresh.last_stats["cached_tokens"] == 0


def test_streamed_pieces_concatenate_to_the_decoding(model):
    pieces = list(model.generate("hello", max_tokens=20, temperature=1.0, seed=3))
    assert "".join(pieces) == model.complete("hello", max_tokens=20, temperature=1.0, seed=3)
    assert model.last_stats["generated_tokens"] <= 20


def test_seed_reproduces_and_differs(model):
    a = model.complete("hello", max_tokens=16, temperature=1.5, seed=1)
    assert a == model.complete("hello", max_tokens=16, temperature=1.5, seed=1)
    others = {model.complete("hello", max_tokens=16, temperature=1.5, seed=s) for s in range(2, 6)}
    assert others - {a}


def test_stop_string_ends_generation(model):
    text = model.complete("hello", max_tokens=30, temperature=0)
    if len(text) < 4:
        pytest.skip("too little text generated to pick a stop string")
    stop = text[2:4]
    out = model.complete("hello", max_tokens=30, temperature=0, stop=[stop])
    assert out == text[:text.find(stop)]
    assert model.last_stats["finish_reason"] == "stop"


def test_context_limit_is_a_clear_error():
    m = edgellm.load(tiny.converted("llama", "f32"), n_ctx=16)
    with pytest.raises(ContextLengthError, match="16"):
        m.complete(list(range(3, 30)), max_tokens=4)
    # with the sliding window off, generation that reaches the end of the context stops with
    # finish_reason "length" (tests/test_kvcache.py covers the window)
    m.complete(list(range(3, 10)), max_tokens=100, temperature=0, context_shift=False)
    assert m.last_stats["generated_tokens"] <= 16 - 7 + 1
    assert m.last_stats["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("kw", [{"max_tokens": -1}, {"temperature": -0.5}, {"top_p": 2.0}])
def test_bad_generation_parameters(kw, model):
    with pytest.raises(EdgeLLMError):
        model.complete("hi", **kw)



def test_cli_run_and_inspect():
    d = tiny.converted("llama", "int8")
    r = edgellm_cli("run", d, "-p", "hello", "-n", "8", "--temperature", "0", "--stats")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "decode" in r.stderr
    r = edgellm_cli("inspect", d, "--verify")
    assert r.returncode == 0, r.stderr
    assert "int8" in r.stdout and "checksums    OK" in r.stdout


def test_cli_reports_bad_model_dir_without_traceback(tmp_path):
    r = edgellm_cli("run", str(tmp_path), "-p", "x")
    assert r.returncode == 1
    assert "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_bos_written_by_a_template_is_not_doubled():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edgellm.runtime.tokenizer import Tokenizer

    hf = HFTokenizer(WordLevel({"<s>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    hf.add_special_tokens(["<s>"])
    tok = Tokenizer(hf, "tokenizers", bos_id=0, eos_ids=[], add_bos=True, vocab_size=4)
    assert tok.encode("hello world") == [0, 1, 2]
    assert tok.encode("<s>hello world") == [0, 1, 2]  # the template's own BOS is kept, not doubled
    assert tok.encode("hello <s>", add_bos=False) == [1, 0]


def test_warmup_tells_why_it_takes_long(model, monkeypatch):
    """warmup() calls its notice when it runs past NOTICE_AFTER (a first run compiling the
    kernels), not when it ends sooner, and leaves the model as it was."""
    import edgellm.model as api

    ids = model.tokenizer.encode("the quick brown fox")
    before = model.logits(ids)
    told = []
    monkeypatch.setattr(api, "NOTICE_AFTER", 60.0)
    model.warmup(notice=lambda: told.append(1))
    assert told == []
    monkeypatch.setattr(api, "NOTICE_AFTER", 0.0)
    real = model._warmup
    monkeypatch.setattr(model, "_warmup", lambda: (time.sleep(0.5), real())[1])
    model.warmup(notice=lambda: told.append(1))
    assert told == [1]
    np.testing.assert_array_equal(model.logits(ids), before)
