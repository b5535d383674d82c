"""Session files: a conversation and its KV cache, saved to disk and restored later.

    save_session("talk.session", model, cache, messages)
    cache, messages, tokens = load_session("talk.session", model)

The file is a safetensors file (no pickle: loading it runs no code). Its tensors are the KV cache's
state() arrays under "kv/<name>", plus "history" (the conversation's token ids, when given); its
metadata holds the format name and version, the model's fingerprint, n_ctx, the messages as JSON
and a sha256 of the tensor bytes. A file is refused, with an error naming it, when it was made for
another model, by a newer edgellm, or is damaged. Files are written to a temporary name in the
same directory and renamed, so a failed save never leaves a half-written file.
"""

import hashlib
import json
import os
import tempfile
from typing import NamedTuple

import numpy as np

from .runtime import format
from .runtime.errors import EdgeLLMError
from .template import check_messages

FORMAT = "edgellm-session"
VERSION = 1


class SessionError(EdgeLLMError):
    """A session file that cannot be loaded (or saved); the message names the file."""

    def __init__(self, path, message):
        self.path = str(path)
        super().__init__(f"session file {path}: {message}")


class Session(NamedTuple):
    cache: object  # a KVCache of the model, holding the saved keys and values
    messages: list  # [{"role": ..., "content": ...}, ...]
    tokens: list  # the conversation's token ids as saved (None if the file has none)


def model_fingerprint(model):
    """sha256 of what decides the cached keys and values: the config, the checksums of the weight
    chunks and the tokenizer file (its ids are what the cache holds)."""
    m = model.manifest
    h = hashlib.sha256()
    h.update(json.dumps({"config": m["config"], "chunks": [c["sha256"] for c in m["chunks"]],
                         "tokenizer": m["tokenizer"]}, sort_keys=True).encode())
    with open(format.safe_path(model.path, m["tokenizer"]["file"]), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_session(path, model, cache, messages, tokens=None):
    """Write the conversation (messages, and optionally its token ids) with the KV cache of
    `model` to `path`, atomically. Returns the path."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tensors = {f"kv/{k}": np.ascontiguousarray(v) for k, v in cache.state().items()}
    if tokens is not None:
        tensors["history"] = np.asarray(tokens, np.int32)
    meta = {
        "format": FORMAT, "version": str(VERSION),
        "model": model_fingerprint(model), "model_path": os.path.abspath(model.path),
        "n_ctx": str(cache.n_ctx), "messages": json.dumps(list(messages), ensure_ascii=False),
        "checksum": _checksum(tensors),
    }
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SessionError(path, f"the folder {folder} does not exist")
    tmp = None
    try:  # the temporary file made inside: a Ctrl-C right after it is made still removes it
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".session-", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # save_file's I/O errors (a full disk) are the latter
        raise SessionError(path, f"cannot write: {getattr(e, 'strerror', None) or e}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_session(path, model):
    """Read a session file written by save_session for this model. Returns Session(cache,
    messages, tokens): a new KVCache of `model` holding the saved keys and values."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SessionError(path, "no such file")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SessionError(path, f"not a readable session file ({e})") from None
    if meta.get("format") != FORMAT:
        raise SessionError(path, "not an edgellm session file")
    try:
        version = int(meta["version"])
    except (KeyError, ValueError):
        raise SessionError(path, "damaged: no valid format version") from None
    if version > VERSION:
        raise SessionError(path, f"written by a newer edgellm (session format v{version}; this "
                           f"version reads up to v{VERSION}): upgrade edgellm")
    if meta.get("checksum") != _checksum(tensors):
        raise SessionError(path, "damaged: the checksum of its contents does not match")
    if meta.get("model") != model_fingerprint(model):
        raise SessionError(path, f"made for another model ({meta.get('model_path', '?')}); "
                           f"it cannot be loaded into {model.path}")
    try:
        messages = json.loads(meta["messages"])
        if not isinstance(messages, list):
            raise ValueError("not a list")
        if messages:
            check_messages(messages)
    except (KeyError, ValueError, EdgeLLMError) as e:
        raise SessionError(path, f"damaged: bad messages ({e})") from None

    state = {k[3:]: v for k, v in tensors.items() if k.startswith("kv/")}
    _check_state(path, state, model)
    vocab = model.config.vocab_size
    for name, ids in (("kv/tokens", state["tokens"]), ("history", tensors.get("history"))):
        # (a cached id is never embedded again: it would first fail where the answer is decoded)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise SessionError(path, f"damaged: {name} holds a token id outside 0..{vocab - 1}")
    cache = model.new_cache()
    n = len(state["tokens"])
    if n > cache.n_ctx:
        raise SessionError(path, f"holds {n} tokens, more than this model's context of "
                           f"{cache.n_ctx} (saved with n_ctx {meta.get('n_ctx')}; use a larger "
                           "context, e.g. --ctx)")
    try:
        cache.load_state(state)
    except (ValueError, KeyError, EdgeLLMError) as e:
        raise SessionError(path, f"cannot restore the KV cache: {e}") from None
    history = tensors.get("history")
    tokens = [int(t) for t in history] if history is not None else None
    return Session(cache, messages, tokens)


ENCODING_OF = {"float32": "f32", "float16": "f16", "int8": "int8"}  # KV dtype -> encoding


def _check_state(path, state, model):
    """The saved arrays must be what state() of a KV cache of this model gives, in the encoding
    the file was saved with (load_state converts to the model's): the same names, dtypes and
    shapes, except along the token axis (the axis that is empty in an empty cache)."""
    from .runtime.kvcache import KVCache

    tokens, keys = state.get("tokens"), state.get("k.0")
    if tokens is None or tokens.ndim != 1 or keys is None:
        raise SessionError(path, "damaged: no token list or no keys")
    encoding = ENCODING_OF.get(keys.dtype.name)
    if encoding is None:
        raise SessionError(path, f"keys stored as {keys.dtype.name}, not a KV cache encoding")
    want = KVCache(model.config, 1, kv=encoding).state()  # empty: its token axes have size 0
    if set(state) != set(want):
        diff = sorted(set(state) ^ set(want))
        raise SessionError(path, f"its KV cache layout differs from this model's ({encoding}: "
                           f"{', '.join(diff[:4])}): another model or edgellm version?")
    n = tokens.shape[0]
    for k, w in want.items():
        got = state[k]
        shape = tuple(n if e == 0 else e for e in w.shape)
        if got.dtype != w.dtype or got.shape != shape:
            raise SessionError(path, f"KV array {k} is {got.dtype.name}{list(got.shape)}; this "
                               f"model needs {w.dtype.name}{list(shape)}")
