"""Bad input gives a clear error (an EdgeLLMError naming the file or parameter), and a conversion
that fails leaves nothing behind: no destination, no staging directory."""

import json
import os
import shutil

import pytest

import edgellm
import reference
import tiny
from edgellm.converters import writer
from edgellm.converters.convert import convert
from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError, EdgeLLMError, FormatError
from edgellm.runtime.reader import Reader


def model_copy(tmp_path, name="llama", quant="int8"):
    dst = tmp_path / "model"
    shutil.copytree(tiny.converted(name, quant), dst)
    return dst


def source_copy(tmp_path, name="llama"):
    dst = tmp_path / "src"
    shutil.copytree(tiny.checkpoint(name), dst)
    return dst


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def convert_fails(tmp_path, src, match, exc=ConvertError, **kwargs):
    """Convert into an empty directory; check the error and that nothing at all was written."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(exc, match=match) as info:
        convert(src, out / "model", progress=False, **kwargs)
    assert isinstance(info.value, EdgeLLMError) or exc is not ConvertError
    assert os.listdir(out) == []  # no destination, no DST.tmp-* staging directory
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# A converted model directory, damaged


def test_corrupt_chunk_loads_but_fails_verification(tmp_path):
    dst = model_copy(tmp_path)
    chunk = dst / "layer_000.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: size and header still agree with the manifest
    chunk.write_bytes(bytes(data))
    edgellm.load(dst).logits([1, 2, 3])  # loading does not read every byte
    with pytest.raises(FormatError, match="checksum mismatch") as e:
        edgellm.load(dst, verify=True)
    assert "layer_000.safetensors" in str(e.value)
    m, _ = format.read_manifest(dst)
    with pytest.raises(FormatError, match="layer_000.safetensors: checksum"):
        Reader(dst, m).verify()


def test_truncated_chunk_fails_to_load(tmp_path):
    dst = model_copy(tmp_path)
    chunk = dst / "layer_001.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(FormatError, match="layer_001.safetensors.*truncated"):
        edgellm.load(dst)


def test_wrong_format_version(tmp_path):
    dst = model_copy(tmp_path)
    edit_json(dst / "manifest.json", lambda m: m.update(version=2))
    with pytest.raises(FormatError, match="manifest.json.*version 2 is not supported"):
        edgellm.load(dst)


@pytest.mark.parametrize("where", ["chunk", "tokenizer"])
def test_path_traversal_in_manifest(tmp_path, where):
    dst = model_copy(tmp_path)
    shutil.copy(dst / "tokenizer.model", tmp_path / "tokenizer.model")  # a real file outside
    shutil.copy(dst / "layer_000.safetensors", tmp_path / "x")

    def evil(m):
        if where == "chunk":
            m["chunks"][1]["file"] = "../x"
        else:
            m["tokenizer"]["file"] = "../tokenizer.model"

    edit_json(dst / "manifest.json", evil)
    # chunk names are fixed by the format, so a chunk "../x" is refused as the wrong name
    match = ("chunks must list embed.safetensors then 2 layer chunks" if where == "chunk"
             else "'../tokenizer.model' must be a plain name inside the model directory")
    with pytest.raises(FormatError, match=match) as e:
        edgellm.load(dst)
    assert "manifest.json" in str(e.value)


def test_symlink_leaving_the_model_directory(tmp_path):
    dst = model_copy(tmp_path)
    shutil.copy(dst / "tokenizer.model", tmp_path / "elsewhere.model")
    (dst / "tokenizer.model").unlink()
    (dst / "tokenizer.model").symlink_to(tmp_path / "elsewhere.model")
    with pytest.raises(FormatError, match="points outside the model directory"):
        edgellm.load(dst)


def test_missing_tokenizer_file_in_model(tmp_path):
    dst = model_copy(tmp_path)
    (dst / "tokenizer.model").unlink()
    with pytest.raises(FormatError, match="tokenizer.model.*missing"):
        edgellm.load(dst)


# ---------------------------------------------------------------------------------------------
# A source checkpoint that cannot be converted: refused before anything is written


def test_unsupported_architecture(tmp_path):
    src = source_copy(tmp_path)
    edit_json(src / "config.json", lambda c: c.update(model_type="gpt_neox"))
    msg = convert_fails(tmp_path, src, "model_type 'gpt_neox' is not supported")
    assert "config.json" in msg and "llama" in msg


@pytest.mark.parametrize("variant,change,match", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"intermediate_size": None}, "missing required key.*intermediate_size"),
    ("llama", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ("llama", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ("llama", {"rope_scaling": {"type": "llama3", "factor": 4.0}}, "llama3 rope scaling needs"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "already quantized"),
    ("llama", {"model_type": None}, "missing required key model_type"),
    ("opt", {"word_embed_proj_dim": 32}, "word_embed_proj_dim 32 != hidden_size 64"),
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before"),
    ("opt", {"activation_function": "gelu"}, "activation_function='gelu'"),
])
def test_unsupported_config(tmp_path, variant, change, match):
    src = source_copy(tmp_path, variant)

    def apply(c):
        for k, v in change.items():
            if v is None:
                c.pop(k)
            else:
                c[k] = v

    edit_json(src / "config.json", apply)
    assert "config.json" in convert_fails(tmp_path, src, match)


def test_config_not_json(tmp_path):
    src = source_copy(tmp_path)
    (src / "config.json").write_text("{not json")
    convert_fails(tmp_path, src, "config.json: cannot read JSON")


def test_config_missing(tmp_path):
    src = source_copy(tmp_path)
    (src / "config.json").unlink()
    convert_fails(tmp_path, src, "config.json: missing")


def test_missing_shard(tmp_path):
    src = source_copy(tmp_path, "llama_sharded")
    (src / "model-00002-of-00003.safetensors").unlink()
    convert_fails(tmp_path, src, "model-00002-of-00003.safetensors: shard listed in "
                                 "model.safetensors.index.json is missing")


def test_no_weights(tmp_path):
    src = source_copy(tmp_path)
    (src / "model.safetensors").unlink()
    convert_fails(tmp_path, src, "model.safetensors: missing")


def test_missing_tensor(tmp_path):
    src = source_copy(tmp_path)
    W = reference.load_tensors(src)
    del W["model.layers.1.mlp.up_proj.weight"]
    tiny.write_safetensors(src / "model.safetensors", W, "F32")
    convert_fails(tmp_path, src, "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                 "is missing")


def test_tensor_shape_disagrees_with_config(tmp_path):
    src = source_copy(tmp_path)
    edit_json(src / "config.json", lambda c: c.update(intermediate_size=256))
    convert_fails(tmp_path, src, r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight "
                                 r"has shape \[128, 64\], the config implies \[256, 64\]")


def test_truncated_source(tmp_path):
    src = source_copy(tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    convert_fails(tmp_path, src, "model.safetensors: tensor .* lies outside the file")


def test_source_without_tokenizer(tmp_path):
    src = source_copy(tmp_path)
    (src / "tokenizer.model").unlink()
    convert_fails(tmp_path, src, r"no tokenizer file \(tokenizer.model or tokenizer.json\)")


def test_tokenizer_model_that_is_not_sentencepiece(tmp_path):
    src = source_copy(tmp_path)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    convert_fails(tmp_path, src, "tokenizer.model: not a sentencepiece model")


@pytest.mark.parametrize("kwargs,match", [
    ({"quant": "int2"}, "quant 'int2' is not supported"),
    ({"quant": "int4", "group_size": 48}, "group_size must be a positive multiple of 32"),
])
def test_bad_quantization_options(tmp_path, kwargs, match):
    convert_fails(tmp_path, tiny.checkpoint("llama"), match, **kwargs)


def test_destination_inside_source_refused(tmp_path):
    src = source_copy(tmp_path)
    with pytest.raises(ConvertError, match="must not be the source directory"):
        convert(src, src / "out", progress=False)
    assert not (src / "out").exists()


def test_f16_overflow_names_the_tensor(tmp_path):
    src = source_copy(tmp_path)
    W = reference.load_tensors(src)
    W["model.layers.0.self_attn.v_proj.weight"][0, 0] = 1e5
    tiny.write_safetensors(src / "model.safetensors", W, "F32")
    convert_fails(tmp_path, src, "model.layers.0.self_attn.v_proj.weight: value out of float16 "
                                 "range", quant="f16")


# ---------------------------------------------------------------------------------------------
# Interrupted conversions


def interrupt_at(monkeypatch, chunk, exc):
    real = writer.Staging.write_chunk

    def write_chunk(self, file, entries, arrays):
        if file == chunk:
            raise exc
        return real(self, file, entries, arrays)

    monkeypatch.setattr(writer.Staging, "write_chunk", write_chunk)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, exc):
    interrupt_at(monkeypatch, "layer_001.safetensors", exc)
    convert_fails(tmp_path, tiny.checkpoint("llama"), None if isinstance(exc, KeyboardInterrupt)
                  else "disk on fire", exc=type(exc))


def test_failed_overwrite_keeps_the_old_model(tmp_path, monkeypatch):
    dst = tmp_path / "model"
    convert(tiny.checkpoint("llama"), dst, quant="int8", progress=False)
    before = (dst / "manifest.json").read_text()
    interrupt_at(monkeypatch, "layer_001.safetensors", RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError):
        convert(tiny.checkpoint("llama"), dst, quant="f32", progress=False, overwrite=True)
    assert (dst / "manifest.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["model"]
    edgellm.load(dst, verify=True)


def test_verification_failure_leaves_nothing(tmp_path, monkeypatch):
    # a chunk changed between writing and verification: the staged model is never renamed
    real = writer.Staging.verify

    def tamper_then_verify(self):
        p = os.path.join(self.tmp, "layer_000.safetensors")
        data = bytearray(open(p, "rb").read())
        data[-1] ^= 1
        open(p, "wb").write(bytes(data))
        return real(self)

    monkeypatch.setattr(writer.Staging, "verify", tamper_then_verify)
    convert_fails(tmp_path, tiny.checkpoint("llama"), "checksum mismatch", exc=FormatError)


def test_context_above_the_models_is_capped_with_a_warning(capsys):
    from edgellm import cli

    demo = cli.demo_model_path()
    limit = format.read_manifest(demo)[1].max_context
    with pytest.warns(UserWarning, match=f"trained context of {limit} tokens"):
        m = edgellm.load(demo, n_ctx=limit + 1)
    assert m.n_ctx == limit
    assert cli.main(["run", demo, "-p", "Hi", "-n", "1", "--ctx", str(limit * 4)]) == 0
    assert f"edgellm: warning: n_ctx {limit * 4} is above" in capsys.readouterr().err
