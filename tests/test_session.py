"""Session files: a conversation saved with its KV cache continues exactly as if never saved, and
files for another model, from a newer version, damaged or half-written are refused clearly."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import edgellm
import tiny
from edgellm.chat import Conversation
from edgellm.cli import demo_model_path
from edgellm.sampling import SamplingParams
from edgellm import session
from edgellm.session import SessionError, load_session, save_session

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def demo():
    return edgellm.load(demo_model_path())


def chat(model, questions, conv=None):
    conv = conv or Conversation(model, system="Be brief.", max_tokens=16, params=GREEDY)
    answers = ["".join(conv.ask(q)) for q in questions]
    return conv, answers


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_saved_session_continues_like_the_original(tmp_path, kv):
    model = edgellm.load(demo_model_path(), kv=kv)
    conv, _ = chat(model, ["Who is Mr Darcy?", "And Jane?"])
    path = save_session(tmp_path / "a.session", model, conv.cache, conv.messages, conv.ids)

    # another process would load the model again: a fresh Model, a fresh cache
    other = edgellm.load(demo_model_path(), kv=kv)
    s = load_session(path, other)
    assert s.messages == conv.messages and s.tokens == conv.ids
    assert s.cache.tokens == conv.cache.tokens
    for k, v in conv.cache.state().items():
        assert np.array_equal(s.cache.state()[k], v), k
    restored = Conversation(other, system="Be brief.", max_tokens=16, params=GREEDY)
    restored.restore(s.messages, s.cache, s.tokens)
    _, (a,) = chat(other, ["What happened next?"], restored)
    _, (b,) = chat(model, ["What happened next?"], conv)
    assert a == b
    # the restored cache was used: only the new turn's tokens were prefilled
    assert restored.turns[-1]["cached_tokens"] == conv.turns[-1]["cached_tokens"] > 0


def test_session_after_the_window_slid(tmp_path):
    """A conversation longer than the context (the window has slid) saves and continues with its
    cache reused: the window's bookkeeping is in the file."""
    model = edgellm.load(demo_model_path(), n_ctx=96)
    conv, _ = chat(model, ["Tell me more."] * 5)
    assert conv.cache.n_dropped > 0
    path = save_session(tmp_path / "w.session", model, conv.cache, conv.messages, conv.ids)
    other = edgellm.load(demo_model_path(), n_ctx=96)
    s = load_session(path, other)
    restored = Conversation(other, system="Be brief.", max_tokens=16, params=GREEDY)
    restored.restore(s.messages, s.cache, s.tokens)
    _, (a,) = chat(other, ["And then?"], restored)
    _, (b,) = chat(model, ["And then?"], conv)
    assert a == b
    assert restored.turns[-1]["cached_tokens"] == conv.turns[-1]["cached_tokens"] > model.n_ctx


def test_session_of_another_kv_encoding_is_converted(tmp_path, demo):
    """load_state converts between encodings: an int8 session loads into an f16 model."""
    q = edgellm.load(demo_model_path(), kv="int8")
    conv, _ = chat(q, ["Who is Mr Darcy?"])
    path = save_session(tmp_path / "q.session", q, conv.cache, conv.messages, conv.ids)
    s = load_session(path, demo)
    assert s.cache.tokens == conv.cache.tokens and s.cache.kv == demo.runtime.cache.kv


def test_file_is_plain_safetensors_with_versioned_metadata(tmp_path, demo):
    conv, _ = chat(demo, ["Hello — how are you? ✓"])
    path = save_session(tmp_path / "a.session", demo, conv.cache, conv.messages, conv.ids)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))  # safetensors: a length, a JSON header, raw arrays
    meta = header["__metadata__"]
    assert meta["format"] == "edgellm-session" and meta["version"] == "1"
    assert json.loads(meta["messages"]) == conv.messages
    assert int(meta["n_ctx"]) == demo.n_ctx
    tensors = load_file(path)
    assert tensors["history"].tolist() == conv.ids
    assert tensors["kv/tokens"].tolist() == conv.cache.tokens
    assert not [p for p in os.listdir(tmp_path) if p != "a.session"]  # no temporary left


def test_refuses_another_model(tmp_path, demo):
    conv, _ = chat(demo, ["Hello"])
    path = save_session(tmp_path / "a.session", demo, conv.cache, conv.messages)
    other = edgellm.load(tiny.converted("llama", "f32"))
    with pytest.raises(SessionError, match="a.session.*another model"):
        load_session(path, other)


def test_refuses_a_newer_version_and_foreign_files(tmp_path, demo):
    conv, _ = chat(demo, ["Hello"])
    path = str(save_session(tmp_path / "a.session", demo, conv.cache, conv.messages))
    with safe_open(path, "np") as f:
        meta = f.metadata()
    newer = str(tmp_path / "newer.session")
    save_file(load_file(path), newer, metadata=dict(meta, version="2"))
    with pytest.raises(SessionError, match="newer.session.*newer edgellm"):
        load_session(newer, demo)
    # a model chunk is a safetensors file, but not a session
    with pytest.raises(SessionError, match="not an edgellm session file"):
        load_session(os.path.join(demo_model_path(), "embed.safetensors"), demo)
    with pytest.raises(SessionError, match="missing.session.*no such file"):
        load_session(tmp_path / "missing.session", demo)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "messages", "history",
                                    "kv/tokens"])
def test_refuses_a_damaged_file(tmp_path, demo, damage):
    conv, _ = chat(demo, ["Hello"])
    path = str(save_session(tmp_path / "a.session", demo, conv.cache, conv.messages, conv.ids))
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-10] ^= 0x40  # inside the last array
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(300))
    else:
        with safe_open(path, "np") as f:
            meta = f.metadata()
        tensors = load_file(path)
        if damage == "messages":
            meta["messages"] = '{"role": 1}'
        else:  # a token id past the vocabulary, the checksum made right (a fuzzer's finding)
            tensors[damage][-1] = demo.config.vocab_size
            meta["checksum"] = session._checksum(tensors)
        save_file(tensors, path, metadata=meta)
        data = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(data))
    with pytest.raises(SessionError, match="a.session") as e:
        load_session(path, demo)
    assert "damaged" in str(e.value) or "not a readable session file" in str(e.value)


def test_refuses_a_session_longer_than_the_context(tmp_path, demo):
    conv, _ = chat(demo, ["Tell me about the ball at Netherfield."])
    path = save_session(tmp_path / "a.session", demo, conv.cache, conv.messages, conv.ids)
    small = edgellm.load(demo_model_path(), n_ctx=16)
    with pytest.raises(SessionError, match="context of 16"):
        load_session(path, small)


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, demo, monkeypatch):
    conv, _ = chat(demo, ["Hello"])
    path = tmp_path / "a.session"
    save_session(path, demo, conv.cache, conv.messages)
    before = path.read_bytes()

    import safetensors.numpy

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(SessionError, match="a.session.*No space left"):
        save_session(path, demo, conv.cache, conv.messages + [conv.messages[-1]])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.session"]
    with pytest.raises(SessionError, match="does not exist"):
        save_session(tmp_path / "no" / "dir.session", demo, conv.cache, conv.messages)


def test_empty_conversation_round_trips(tmp_path, demo):
    cache = demo.new_cache()
    path = save_session(tmp_path / "e.session", demo, cache, [])
    s = load_session(path, demo)
    assert s.messages == [] and s.cache.pos == 0 and s.tokens is None
