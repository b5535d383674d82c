"""`edgellm eval` (edgellm/evaluate.py): strided perplexity.

- the windows: every text token after the first is scored exactly once, with all of its left
  context inside its window, and windows are at most ctx tokens;
- perplexity of a tiny f32 model equals an independent computation with transformers (its own
  forward over the same windows, written here from the definition) and, when one window covers
  the text, the full-context perplexity;
- the CLI's --json object and its errors; the shipped held-out text is there and documented.
"""

import json
import math
import os

import numpy as np
import pytest

import edgellm
import tiny
from edgellm import cli
from edgellm.evaluate import heldout_text_path, perplexity, windows
from edgellm.runtime.errors import EdgeLLMError


@pytest.mark.parametrize("n,ctx,stride,prefix", [(100, 16, 8, 0), (100, 16, 15, 1),
                                                 (37, 10, 3, 1), (5, 64, 32, 0), (64, 64, 1, 0)])
def test_windows_score_each_token_once(n, ctx, stride, prefix):
    plan = windows(n, ctx, stride, prefix)
    scored = [i for _, e, f in plan for i in range(f, e)]
    assert scored == list(range(0 if prefix else 1, n))
    prev_end = 0
    for b, e, f in plan:
        assert e - b + prefix <= ctx and b <= f and (f == prev_end or (f, prev_end) == (1, 0))
        prev_end = e
        if b > 0:  # past the first window: at least ctx - prefix - stride tokens of context
            assert f - b >= min(ctx - prefix - stride, n)


def test_window_options_checked():
    with pytest.raises(EdgeLLMError, match="stride"):
        windows(100, 16, 17)
    with pytest.raises(EdgeLLMError, match="stride"):
        windows(100, 16, 0)


def _text():
    return " ".join(tiny.corpus(n=60))


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # sentencepiece with BOS; BPE without
def test_perplexity_matches_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)  # see test_transformers.py
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny.checkpoint(name),
                                                           dtype=torch.float32).eval()
    model = edgellm.load(tiny.converted(name, "f32"), kv="f32")  # an f32 reference throughout
    text = _text()
    ctx, stride = 48, 20
    got = perplexity(model, text, ctx=ctx, stride=stride)

    # independent: the text's ids, windows of ctx tokens moved by stride, each scoring the tokens
    # the previous window did not, with torch's cross-entropy
    tok = model.tokenizer
    ids = tok.encode(text, add_bos=False)
    bos = [tok.bos_id] if tok.add_bos else []
    total, count, prev_end, b = 0.0, 0, 0 if bos else 1, 0
    while True:
        e = min(b + ctx - len(bos), len(ids))
        x = torch.tensor([bos + ids[b:e]])
        with torch.no_grad():
            logits = hf(x).logits[0].double()
        n_new = e - prev_end
        targets = x[0, -n_new:]
        preds = logits[-n_new - 1:-1]
        total += float(torch.nn.functional.cross_entropy(preds, targets, reduction="sum"))
        count += n_new
        prev_end = e
        if e == len(ids):
            break
        b += stride
    want = math.exp(total / count)
    assert got["tokens"] == count and got["bos"] == bool(bos)
    assert got["windows"] > 3
    assert abs(got["perplexity"] - want) <= 1e-5 * want, (got["perplexity"], want)


def test_one_window_is_full_context_perplexity():
    model = edgellm.load(tiny.converted("llama", "f32"))
    text = " ".join(tiny.corpus(n=5))
    ids = model.tokenizer.encode(text)  # with BOS
    assert len(ids) < 200
    logits = model.logits(ids).astype(np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))[:, None] \
        - logits.max(1)[:, None]
    want = math.exp(-np.mean(lp[np.arange(len(ids) - 1), ids[1:]]))
    got = perplexity(model, text, ctx=256, stride=128)
    assert got["windows"] == 1 and got["tokens"] == len(ids) - 1
    assert got["perplexity"] == pytest.approx(want, rel=1e-9)


def test_errors():
    model = edgellm.load(tiny.converted("llama", "f32"))
    with pytest.raises(EdgeLLMError, match="larger than the model's context"):
        perplexity(model, _text(), ctx=100000)
    with pytest.raises(EdgeLLMError, match="too short"):
        perplexity(model, "", ctx=32)
    with pytest.raises(EdgeLLMError, match="max-tokens"):
        perplexity(model, _text(), max_tokens=1)


def test_cli_json(capsys, tmp_path):
    path = tiny.converted("llama", "f32")
    text = tmp_path / "t.txt"
    text.write_text(_text(), encoding="utf-8")
    assert cli.main(["eval", path, "--ppl", str(text), "--ctx", "64", "--stride", "32",
                     "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "tokens_per_s"} <= set(r)
    want = perplexity(edgellm.load(path), _text(), ctx=64, stride=32)
    assert r["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9)
    assert r["tokens"] == want["tokens"] and r["tokens_per_s"] > 0


def test_cli_errors(capsys, tmp_path):
    path = tiny.converted("llama", "f32")
    assert cli.main(["eval", path, "--ppl", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert cli.main(["eval", path, "--ppl", str(empty)]) == 1
    assert "empty.txt: the text is empty" in capsys.readouterr().err
    assert cli.main(["eval", path, "--ppl", str(empty.with_name("x")), "--ctx", "1"]) == 1


def test_heldout_text_shipped():
    path = heldout_text_path()
    text = open(path, encoding="utf-8").read()
    assert 30_000 <= len(text.encode()) <= 100_000
    readme = open(os.path.join(os.path.dirname(path), "README.md"), encoding="utf-8").read()
    assert os.path.basename(path) in readme and "public domain" in readme.lower()


def test_demo_on_heldout_text(capsys):
    """The shipped text and the demo model, through the CLI's default text."""
    assert cli.main(["eval", cli.demo_model_path(), "--max-tokens", "600", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["text"] == heldout_text_path() and r["tokens"] == 600
    assert 1 < r["perplexity"] < 4096  # better than uniform over the demo's 4096 tokens
