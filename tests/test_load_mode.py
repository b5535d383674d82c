"""How edgellm.load holds a resident model's weights: read into memory or mapped.

mmap="auto" (the default) reads the chunks into memory when the weights take at most
READ_FRACTION of the available memory and maps them otherwise; True / False force it; the CLI's
--mmap {auto,on,off} passes it. The available memory is monkeypatched (runtime/memory.py), so
these tests do not depend on the machine. Both modes give the same logits (same kernels on the
same bytes); a chunk changed on disk is an error for a mapped model and nothing for a copy.
"""

import os

import numpy as np
import pytest

import edgellm
import tiny
from edgellm import cli
from edgellm.runtime import format, memory, reader
from edgellm.runtime.errors import EdgeLLMError, FormatError

DEMO = cli.demo_model_path()


def demo_bytes():
    manifest, _ = format.read_manifest(DEMO)
    return reader.weight_bytes(manifest)


def available(monkeypatch, n):
    monkeypatch.setattr(memory, "available_bytes", lambda: n)


def test_weight_bytes_are_the_chunk_files():
    manifest, _ = format.read_manifest(DEMO)
    on_disk = sum(os.path.getsize(os.path.join(DEMO, c["file"])) for c in manifest["chunks"])
    assert reader.weight_bytes(manifest) == on_disk


def test_auto_reads_what_fits_and_maps_what_does_not(monkeypatch):
    n = demo_bytes()
    limit = int(np.ceil(n / reader.READ_FRACTION))  # the least memory in which the weights fit
    available(monkeypatch, limit)
    m = edgellm.load(DEMO)
    assert m.weights["load"] == "read" and not m.reader.mapped
    assert m.weights["bytes"] == n and "auto" in m.weights["why"]
    assert all(m.reader.read_in(c["file"]) for c in m.manifest["chunks"])
    available(monkeypatch, limit - 1)
    m = edgellm.load(DEMO)
    assert m.weights["load"] == "mapped" and m.reader.mapped
    assert not any(m.reader.read_in(c["file"]) for c in m.manifest["chunks"])
    available(monkeypatch, None)  # unknown (not Linux): map, as before the rule
    assert edgellm.load(DEMO).weights["load"] == "mapped"


def test_forced_modes_ignore_the_memory(monkeypatch):
    available(monkeypatch, 1)  # nothing fits
    m = edgellm.load(DEMO, mmap=False)
    assert m.weights["load"] == "read" and "forced" in m.weights["why"]
    available(monkeypatch, 1 << 50)  # everything fits
    m = edgellm.load(DEMO, mmap=True)
    assert m.weights["load"] == "mapped" and "forced" in m.weights["why"]


def test_a_budget_streams_whatever_the_rule(monkeypatch):
    available(monkeypatch, 1 << 50)
    m = edgellm.load(DEMO, dram_budget="5MB", mode="naive")
    assert m.weights["load"] == "streamed"


@pytest.mark.parametrize("bad", ["yes", "on", 1, None])
def test_a_bad_mmap_value_is_refused_naming_it(bad):
    with pytest.raises(EdgeLLMError, match=r"mmap must be 'auto', True or False, got"):
        edgellm.load(DEMO, mmap=bad)
    with pytest.raises(EdgeLLMError, match="mmap must be"):
        edgellm.load(DEMO, mmap=bad, dram_budget="5MB", mode="naive")


def test_the_cli_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["run", DEMO, "-p", "x", "--mmap", "maybe"])
    assert e.value.code == 2
    assert "--mmap: invalid choice: 'maybe'" in capsys.readouterr().err
    for sub in (["run", DEMO, "-p", "x"], ["chat", DEMO], ["eval", DEMO], ["bench", DEMO],
                ["serve", DEMO]):
        a = cli.build_parser().parse_args(sub + ["--mmap", "off"])
        assert cli.load_from_args(a) == {"mmap": False}, sub
        assert cli.load_from_args(cli.build_parser().parse_args(sub)) == {"mmap": "auto"}, sub
    assert cli.load_from_args(cli.build_parser().parse_args(["demo"])) == {"mmap": "auto"}


def test_the_choice_is_shown(capsys):
    assert cli.main(["run", DEMO, "-p", "It is", "-n", "2", "--stats", "--mmap", "on"]) == 0
    err = capsys.readouterr().err
    assert "weights mapped from the files (forced (mmap=True))" in err, err


@pytest.mark.parametrize("name,quant", [("llama", "int4"), ("llama", "int8")])
def test_logits_are_the_same_read_or_mapped(name, quant):
    path = tiny.converted(name, quant, 32)
    ids = tiny.token_ids(name, 10)
    read = edgellm.load(path, mmap=False)
    mapped = edgellm.load(path, mmap=True)
    assert read.weights["load"] == "read" and mapped.weights["load"] == "mapped"
    np.testing.assert_array_equal(read.logits(ids), mapped.logits(ids))
    # decode (the fused one-token path) too
    a = read.complete(ids, max_tokens=6, temperature=0)
    assert read.last_stats["token_ids"] and a == mapped.complete(ids, max_tokens=6, temperature=0)


def test_a_chunk_changed_under_a_copy_changes_nothing(tmp_path, monkeypatch):
    """Read into memory, a chunk written to on disk is neither read nor an error; a chunk of a
    read model not read yet is still checked (it will be read from the file as it is then)."""
    path = tmp_path / "demo"
    path.mkdir()
    for f in os.listdir(DEMO):
        if os.path.isfile(os.path.join(DEMO, f)):
            (path / f).write_bytes(open(os.path.join(DEMO, f), "rb").read())
    m = edgellm.load(path, mmap=False)
    want = m.complete("It is", max_tokens=4, temperature=0)
    chunk = path / "layer_001.safetensors"
    with open(chunk, "r+b") as f:
        f.seek(os.path.getsize(chunk) - 64)
        f.write(bytes(64))
    assert m.complete("It is", max_tokens=4, temperature=0) == want
    manifest, _ = format.read_manifest(path)
    r = reader.Reader(path, manifest, mapped=False)
    r.array("embed.safetensors", "tok_embeddings")  # one chunk read, the others not yet
    os.utime(path / "layer_002.safetensors", ns=(1, 1))
    with pytest.raises(FormatError, match="layer_002.safetensors.*changed on disk"):
        r.check_unchanged()
