"""Fuzz targets: one per reader of untrusted files. Each takes bytes and must end in a loaded object
or an EdgeLLMError; any other exception, a hang, an unbounded allocation or a file opened outside
the model directory is a finding.

    manifest   manifest.json of a model directory -> edgellm.load + one forward pass
    chunk      a chunk file's safetensors header (or whole file) -> edgellm.load (mapped or streamed)
    gguf       a GGUF file -> convert (the import path) -> edgellm.load
    tokenizer  tokenizer.model / tokenizer.json in a model directory -> load, encode, decode, stream
    session    a session file -> load_session + a generation continuing it
    recipe     a recipe.toml (convert --recipe) -> recipe.load + recipe.check against a source
               (no conversion run: its steps are the converters'; files a recipe names are the
               user's own choice, so its reads are not watched)

The first byte of an input picks a mode: the rest is either the file's bytes as they are, or a
list of structured edits (JSON values replaced, deleted, copied) applied to a valid seed file, so
the fuzzer also reaches the checks behind the JSON parser. Inputs are decoded by Input below (no
atheris needed): tests/fuzz/test_fuzz.py replays the regression corpus with plain pytest, and
tests/fuzz/fuzz.py drives the same functions with atheris.

Reads are watched with an audit hook: opening any path outside the model directory, the workspace
scratch files and the Python installation is a finding (ReadOutside).
"""

import atexit
import copy
import json
import os
import shutil
import struct
import sys
import tempfile

import numba

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import edgellm  # noqa: E402
from edgellm.runtime.errors import EdgeLLMError  # noqa: E402

TARGETS = ("manifest", "chunk", "gguf", "tokenizer", "session", "recipe")


class ReadOutside(AssertionError):
    """A reader opened a file outside the model directory."""


# ---------------------------------------------------------------------------------------------
# Input decoding


class Input:
    """Consumes an input's bytes as small choices; past the end every choice is 0."""

    def __init__(self, data):
        self.data, self.pos = bytes(data), 0

    def byte(self):
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, n):
        """A choice in [0, n)."""
        if n <= 1:
            return 0
        v = self.byte() if n <= 256 else self.byte() << 8 | self.byte()
        return v % n

    def take(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self):
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


STRINGS = ["", "../canary", "../../etc/passwd", "/etc/passwd", "..", ".", "a/b", "x\x00y",
           "embed.safetensors", "layer_000.safetensors", "layer_001.safetensors",
           "manifest.json", "tokenizer.model", "tokenizer.json", "f32", "f16", "int8", "int4",
           "q8_0", "q4_1", "i32", "bundle", "F32", "F16", "I8", "U8", "I32", "BF16", "F64",
           "sentencepiece", "hf", "gate", "up", "down", "rms", "layer", "relu", "silu", "rope",
           "learned", "linear", "llama3", "edgellm", "edgellm-session", "user", "assistant",
           "system", "{{ x }}", "{% for i in range(999999999) %}{% endfor %}", "\udcff" * 3,
           "x" * 300]
NUMBERS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 255, 256, 4096, 65535, 2**31 - 1, 2**31,
           2**32, 2**53, 2**63 - 1, 2**63, 2**64, 10**30, -2**63, 0.5, -0.0, 1e-300, 1e308,
           float("inf"), float("nan")]


def _value(inp, nodes):
    k = inp.int(8)
    if k == 0:
        return STRINGS[inp.int(len(STRINGS))]
    if k in (1, 2):
        return NUMBERS[inp.int(len(NUMBERS))]
    if k == 3:
        return [None, True, False, [], {}, [0], [1, 1], [2**40, 2**40], [[]]][inp.int(9)]
    if k == 4 and nodes:  # a copy of another part of the document: keeps the structure plausible
        return copy.deepcopy(nodes[inp.int(len(nodes))][2])
    if k == 5:
        return inp.take(inp.int(16)).decode("utf-8", "replace")
    if k == 6:
        return [NUMBERS[inp.int(len(NUMBERS))] for _ in range(inp.int(4))]
    return inp.int(65536) - 1024


def _nodes(obj):
    """Every (container, key, value) in a JSON document."""
    out, todo = [], [obj]
    while todo:
        o = todo.pop()
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            out.append((o, k, v))
            todo.append(v)
    return out


def edit_json(obj, inp):
    """Apply 1..8 edits chosen by the input to a JSON document (in place); returns it."""
    for _ in range(1 + inp.int(8)):
        nodes = _nodes(obj)
        if not nodes:
            break
        parent, key, _ = nodes[inp.int(len(nodes))]
        op = inp.int(4)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, dict):  # a new key (a name seen elsewhere, or junk)
            names = [k for _, k, _ in nodes if isinstance(k, str)] + STRINGS[:8]
            parent[names[inp.int(len(names))]] = _value(inp, nodes)
        elif op == 2 and isinstance(parent, list):
            parent.append(_value(inp, nodes))
        else:
            parent[key] = _value(inp, nodes)
    return obj


def dump_json(obj):
    return json.dumps(obj).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Workspace: a pristine tiny model and scratch directories, built once per process


class Workspace:
    def __init__(self):
        import tiny

        self.root = tempfile.mkdtemp(prefix="edgellm-fuzz-")
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self.base = tiny.converted("llama", "int8")  # ~350 KB: 2 layers, int8, sentencepiece
        self.hf_base = tiny.converted("qwen2", "f16")  # a tokenizer.json model
        self.model = os.path.join(self.root, "model")
        self.out = os.path.join(self.root, "out")
        with open(os.path.join(self.root, "canary"), "w") as f:
            f.write("a file next to the model directory: no reader may open it\n")
        with open(os.path.join(self.base, "manifest.json"), "rb") as f:
            self.manifest = json.load(f)
        self._model = None
        self.allowed = [os.path.realpath(p) + os.sep for p in
                        {sys.prefix, sys.base_prefix, os.path.dirname(os.__file__),
                         os.path.dirname(os.path.dirname(edgellm.__file__))}] + \
            ["/dev/", "/proc/", "/sys/"]
        # Numba's own cache folder (NUMBA_CACHE_DIR), where kernels and their stamps are read
        # when a target is the first to compile or load them
        if numba.config.CACHE_DIR:
            self.allowed.append(os.path.realpath(numba.config.CACHE_DIR) + os.sep)

    def fresh(self, base=None):
        """An unmodified copy of the tiny model at self.model."""
        shutil.rmtree(self.model, ignore_errors=True)
        shutil.rmtree(self.out, ignore_errors=True)
        shutil.copytree(base or self.base, self.model)
        return self.model

    def write(self, name, data):
        with open(os.path.join(self.model, name), "wb") as f:
            f.write(data)

    def loaded(self):
        """The pristine model, loaded (for session files)."""
        if self._model is None:
            self._model = edgellm.load(self.base, n_ctx=64)
        return self._model


_WS = None
_WATCH = None  # the directories readers may open while a target runs, else None


def workspace():
    global _WS
    if _WS is None:
        _WS = Workspace()
        sys.addaudithook(_audit)
    return _WS


def _audit(event, args):
    if _WATCH is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    ok = [r + os.sep for r in _WATCH] + [_WS.out + os.sep, _WS.out + ".", _WS.root + os.sep +
                                          "src"] + _WS.allowed
    if not any(path.startswith(p) for p in ok) and path not in _WATCH:
        raise ReadOutside(f"opened {path} (outside {_WATCH})")


class watch:
    """Audit file opens against `root` while the target's reader runs."""

    def __init__(self, *roots):
        self.roots = [os.path.realpath(r) for r in roots]

    def __enter__(self):
        global _WATCH
        _WATCH = self.roots

    def __exit__(self, *exc):
        global _WATCH
        _WATCH = None


def use(model, text="Hello world 123"):
    """Exercise a loaded model briefly: a forward pass and two generated tokens."""
    model.logits([min(1, model.config.vocab_size - 1)])
    model.complete(text, max_tokens=2, temperature=0)


# ---------------------------------------------------------------------------------------------
# Targets


def manifest(data):
    ws = workspace()
    inp = Input(data)
    mode = inp.byte() % 2
    ws.fresh()
    if mode == 0:
        raw = inp.rest()
    else:
        raw = dump_json(edit_json(copy.deepcopy(ws.manifest), inp))
    ws.write("manifest.json", raw)
    with watch(ws.model):
        m = edgellm.load(ws.model, n_ctx=32)
        use(m)


def _split_chunk(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def chunk(data):
    """A chunk file with a fuzzed header (raw or edited JSON) or fuzzed whole; the manifest's
    size follows the file unless the input says otherwise, so the header checks are reached."""
    ws = workspace()
    inp = Input(data)
    b = inp.byte()
    mode, which, streamed, keep_size = b % 3, b // 3 % 3, b // 9 % 2, b // 18 % 2
    file = ["embed.safetensors", "layer_000.safetensors", "layer_001.safetensors"][which]
    ws.fresh()
    with open(os.path.join(ws.base, file), "rb") as f:
        blob = f.read()
    header, body = _split_chunk(blob)
    if mode == 0:  # raw header bytes
        h = inp.rest()
        blob = struct.pack("<Q", len(h)) + h + body
    elif mode == 1:  # edited header
        h = dump_json(edit_json(header, inp))
        cut = inp.int(4)  # sometimes a body shorter by a few bytes
        blob = struct.pack("<Q", len(h)) + h + (body[:-cut] if cut else body)
    else:  # the whole file
        blob = inp.rest()
    ws.write(file, blob)
    if not keep_size:
        man = copy.deepcopy(ws.manifest)
        for c in man["chunks"]:
            if c["file"] == file:
                c["size"] = len(blob)
        ws.write("manifest.json", dump_json(man))
    with watch(ws.model):
        if streamed:
            m = edgellm.load(ws.model, n_ctx=32, dram_budget=None, mode="naive", io_threads=1)
        else:
            m = edgellm.load(ws.model, n_ctx=32)
        try:
            use(m)
        finally:
            if m.stream is not None:
                m.stream.close()


_GGUF_SEEDS = {}


def gguf_seeds():
    """Two valid GGUF files (gpt2 BPE and llama sentencepiece vocabularies), made once."""
    if not _GGUF_SEEDS:
        import test_gguf

        d = os.path.join(workspace().root, "seeds")
        os.makedirs(d, exist_ok=True)
        for name, make in (("bpe", lambda p: test_gguf.write_tiny_gguf(p)),
                           ("sp", lambda p: test_gguf.write_gguf_from_hf("llama", p, sp=True))):
            path = os.path.join(d, name + ".gguf")
            make(path)
            with open(path, "rb") as f:
                _GGUF_SEEDS[name] = f.read()
    return _GGUF_SEEDS


def gguf(data):
    """A GGUF file through the import path: convert, then load the result."""
    from edgellm.converters.convert import convert

    ws = workspace()
    inp = Input(data)
    b = inp.byte()
    quant = ("f32", "keep", "int8")[b % 3]
    src_dir = os.path.join(ws.root, "src")
    os.makedirs(src_dir, exist_ok=True)
    src = os.path.join(src_dir, "model.gguf")
    with open(src, "wb") as f:
        f.write(inp.rest())
    shutil.rmtree(ws.out, ignore_errors=True)
    with watch(src_dir):
        dst = convert(src, ws.out, quant=quant, progress=False)
        use(edgellm.load(dst, n_ctx=32))


def tokenizer(data):
    """A tokenizer file (sentencepiece or tokenizer.json, raw or JSON-edited) in a model."""
    ws = workspace()
    inp = Input(data)
    b = inp.byte()
    kind, mode = b % 2, (b >> 1) % 2
    if kind == 0:  # sentencepiece protobuf: bytes only
        ws.fresh(ws.base)
        ws.write("tokenizer.model", inp.rest())
    else:
        ws.fresh(ws.hf_base)
        if mode == 0:
            ws.write("tokenizer.json", inp.rest())
        else:
            with open(os.path.join(ws.hf_base, "tokenizer.json"), "rb") as f:
                doc = json.load(f)
            ws.write("tokenizer.json", dump_json(edit_json(doc, inp)))
    with watch(ws.model):
        m = edgellm.load(ws.model, n_ctx=32)
        tok = m.tokenizer
        for text in ("Hello wörld 123  \t\n", "", "<s></s><unk>", "\U0001f600 ĉ"):
            ids = tok.encode(text)
            tok.decode(ids)
            s = tok.streamer(ids[:2])
            "".join(s.push(i) for i in ids) + s.flush()
        use(m)


_SESSION = {}


def session_seed():
    """(tensors, metadata) of a valid session file of the tiny model, made once."""
    if not _SESSION:
        from safetensors.numpy import load_file
        from safetensors import safe_open

        from edgellm.session import save_session

        ws = workspace()
        m = ws.loaded()
        cache = m.new_cache()
        msgs = [{"role": "user", "content": "Hi there"}]
        ids = m.tokenizer.encode("Hi there")
        list(m.generate(ids, max_tokens=3, temperature=0, cache=cache))
        path = os.path.join(ws.root, "seed.session")
        save_session(path, m, cache, msgs, tokens=ids + m.last_stats["token_ids"])
        with safe_open(path, framework="np") as f:
            meta = f.metadata()
        _SESSION.update(tensors=load_file(path), meta=meta, path=path)
    return _SESSION


def session(data):
    """A session file (raw bytes, or edited metadata/tensors with a valid checksum) loaded into
    the tiny model, then continued for two tokens."""
    import numpy as np
    from safetensors.numpy import save_file

    from edgellm import session as sess

    ws = workspace()
    seed = session_seed()
    m = ws.loaded()
    inp = Input(data)
    mode = inp.byte() % 2
    path = os.path.join(ws.root, "model-session", "talk.session")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == 0:
        with open(path, "wb") as f:
            f.write(inp.rest())
    else:
        meta = dict(seed["meta"])
        tensors = dict(seed["tensors"])
        for _ in range(1 + inp.int(4)):
            what = inp.int(6)
            if what == 0:  # a metadata value
                k = sorted(meta)[inp.int(len(meta))]
                meta[k] = str(_value(inp, [])).encode("utf-8", "replace").decode()  # no surrogates
            elif what == 1:  # the messages, edited as JSON
                try:
                    msgs = json.loads(meta["messages"])
                except ValueError:  # replaced by an earlier edit
                    msgs = []
                meta["messages"] = json.dumps(edit_json(msgs, inp))
            elif what == 2 and tensors:  # a tensor dropped
                del tensors[sorted(tensors)[inp.int(len(tensors))]]
            elif what == 3 and tensors:  # a tensor cut along its first axis
                k = sorted(tensors)[inp.int(len(tensors))]
                tensors[k] = tensors[k][:inp.int(max(1, tensors[k].shape[0] + 2))] \
                    if tensors[k].ndim else tensors[k]
            elif what == 4 and tensors:  # a tensor of another dtype
                k = sorted(tensors)[inp.int(len(tensors))]
                dt = [np.float32, np.float16, np.int8, np.int32, np.uint8, np.int64,
                      np.float64][inp.int(7)]
                tensors[k] = tensors[k].astype(dt)
            elif what == 5 and tensors:  # token ids replaced (out of range, negative ...)
                k = "history" if inp.int(2) else "kv/tokens"
                if k in tensors:
                    t = tensors[k].copy()
                    if t.size:
                        v = NUMBERS[inp.int(12)] if inp.int(2) else -1
                        try:  # (a harness limit, not a finding: -1 does not fit a uint8)
                            t[inp.int(t.size)] = v
                        except (OverflowError, ValueError):
                            pass
                    tensors[k] = t
        meta["checksum"] = sess._checksum(tensors)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=meta)
    with watch(os.path.dirname(path), m.path):
        s = sess.load_session(path, m)
        ids = (s.tokens or [1]) + [1]
        list(m.generate(ids, max_tokens=2, temperature=0, cache=s.cache))


RECIPE = b"""[recipe]
eval_tokens = 64
eval_ctx = 32
decode_tokens = 2
base = "f32"
report = true

[[step]]
kind = "drop_layers"
n = 1
metric = "angular"

[[step]]
kind = "quantize"
quant = "int4"
group_size = 32

[[step]]
kind = "prune_neurons"
fraction = 0.25

[[step]]
kind = "predictor"
recall = 0.9
rank = 8
"""


def recipe(data):
    """A recipe file (raw TOML, or the seed's tables edited) read and checked against the tiny
    llama checkpoint."""
    import tomllib

    import tiny
    from edgellm.converters import recipe as rc

    ws = workspace()
    inp = Input(data)
    mode = inp.byte() % 2
    path = os.path.join(ws.root, "recipe.toml")
    if mode == 0:
        with open(path, "wb") as f:
            f.write(inp.rest())
        r = rc.load(path)
    else:
        r = rc.parse(edit_json(tomllib.loads(RECIPE.decode()), inp), path)
    rc.check(r, tiny.checkpoint("llama"))


# ---------------------------------------------------------------------------------------------


def seeds(target):
    """Valid inputs each target starts from (written to the fuzzer's corpus on first run)."""
    ws = workspace()
    if target == "manifest":
        return [b"\x00" + open(os.path.join(ws.base, "manifest.json"), "rb").read(), b"\x01"]
    if target == "chunk":
        out = []
        for which in range(3):
            f = ["embed.safetensors", "layer_000.safetensors", "layer_001.safetensors"][which]
            with open(os.path.join(ws.base, f), "rb") as fh:
                header, _ = _split_chunk(fh.read())
            out.append(bytes([3 * which]) + dump_json(header))
            out.append(bytes([1 + 3 * which]))
        out.append(bytes([15]) + dump_json(header))  # layer_001, streamed
        return out
    if target == "gguf":
        return [b"\x00" + v for v in gguf_seeds().values()] + [b"\x01" + gguf_seeds()["bpe"]]
    if target == "tokenizer":
        with open(os.path.join(ws.base, "tokenizer.model"), "rb") as f:
            sp = f.read()
        with open(os.path.join(ws.hf_base, "tokenizer.json"), "rb") as f:
            js = f.read()
        return [b"\x00" + sp, b"\x01" + js, b"\x03"]
    if target == "session":
        with open(session_seed()["path"], "rb") as f:
            return [b"\x00" + f.read(), b"\x01"]
    if target == "recipe":
        return [b"\x00" + RECIPE, b"\x01"]
    raise ValueError(target)


def run(target, data):
    """Run one input; True when it ended in a loaded object, False for an EdgeLLMError. Anything
    else propagates (a finding)."""
    try:
        globals()[target](data)
        return True
    except EdgeLLMError:
        return False
