"""Recipes (converters/recipe.py): steps in order, a report per step, the recipe and report in
the manifest's provenance; impossible recipes refused before any work."""

import json
import os

import numpy as np
import pytest

import edgellm
from edgellm.converters import recipe, structural
from edgellm.runtime.errors import ConvertError

import tiny
from clirun import edgellm_cli

FAST = """
[recipe]
calib_tokens = 512
eval_tokens = 64
eval_ctx = 64
decode_tokens = 4
"""


def _write(tmp_path, body, name="r.toml"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


ROUND_TRIP = FAST + """
[[step]]
kind = "drop_layers"
n = 1
metric = "bi"

[[step]]
kind = "prune_neurons"
fraction = 0.5

[[step]]
kind = "quantize"
quant = "int8"

[[step]]
kind = "predictor"
recall = 0.9
"""


def test_recipe_round_trip(tmp_path):
    src = tiny.checkpoint("llama")
    path = _write(tmp_path, ROUND_TRIP)
    report = recipe.run(src, tmp_path / "out", path, progress=False)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    prov = m["provenance"]
    # the recipe stored is the recipe read, defaults filled in; the report is the one returned
    assert prov["recipe"]["steps"] == recipe.load(path)["steps"]
    assert prov["recipe"]["settings"] == recipe.load(path)["settings"]
    assert prov["recipe_report"] == json.loads(json.dumps(report))
    assert [r["kind"] for r in report] == ["convert", "drop_layers", "prune_neurons", "quantize",
                                           "predictor"]
    for r in report:
        for k in ("size_bytes", "perplexity", "bytes_per_token", "decode_tokens_per_s",
                  "seconds"):
            assert r[k] >= 0, (r["kind"], k)
        assert np.isfinite(r["perplexity"])
    # each step did what it says, in order
    assert [r["n_layers"] for r in report] == [2, 1, 1, 1, 1]
    assert [r["d_ff"] for r in report] == [128, 128, 64, 64, 64]
    assert report[-1]["size_bytes"] == structural.model_bytes(tmp_path / "out")
    assert report[3]["size_bytes"] < report[2]["size_bytes"] < report[1]["size_bytes"]
    cfg = m["config"]
    assert (cfg["n_layers"], cfg["d_ff"]) == (1, 64)
    layer = m["chunks"][1]["tensors"]
    assert layer["attn_q"]["encoding"] == "int8"
    assert "ffn_pred.a" in layer and m["calibration"]["predictor"]["target_recall"] == 0.9
    model = edgellm.load(tmp_path / "out")
    assert model.runtime.layers[0].ffn is not None
    # nothing else left next to the output
    assert sorted(os.listdir(tmp_path)) == ["out", "r.toml"]


def test_first_quantize_step_converts_the_source_directly(tmp_path):
    path = _write(tmp_path, FAST.replace("eval_tokens = 64", "report = false") + """
[[step]]
kind = "quantize"
quant = "int4"
group_size = 64
""")
    report = recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    assert [(r["step"], r["kind"]) for r in report] == [(1, "quantize")]
    assert "perplexity" not in report[0]  # report = false: sizes only
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["chunks"][1]["tensors"]["attn_q"]["group_size"] == 64


BAD = {
    "unknown step": ('[[step]]\nkind = "shrink"\n', "step 1: unknown kind 'shrink'"),
    "sparsity 120%": ('[[step]]\nkind = "prune"\nmethod = "wanda"\nsparsity = 1.2\n',
                      "sparsity must be a fraction between 0 and 1"),
    "neurons 120%": ('[[step]]\nkind = "prune_neurons"\nfraction = 1.2\n',
                     "fraction must be a fraction between 0 and 1"),
    "group size not a multiple of 32": ('[[step]]\nkind = "quantize"\nquant = "int4"\n'
                                        'group_size = 48\n', "multiple of 32"),
    "group size not dividing d_model": ('[[step]]\nkind = "quantize"\nquant = "int4"\n'
                                        'group_size = 128\n', "does not divide the model's "
                                                              "d_model 64"),
    "too many layers": ('[[step]]\nkind = "drop_layers"\nn = 1\n[[step]]\nkind = '
                        '"drop_layers"\nn = 1\n', "step 2 .*cannot drop 1 of the model's 1"),
    "unknown option": ('[[step]]\nkind = "drop_layers"\nn = 1\nlayers = 3\n',
                       r"unknown options \['layers'\]"),
    "missing option": ('[[step]]\nkind = "drop_layers"\n', "n is required"),
    "wrong type": ('[[step]]\nkind = "prune_neurons"\nfraction = "half"\n',
                   "fraction must be int or float"),
    "low-rank fraction 120%": ('[[step]]\nkind = "lowrank"\nfraction = 1.2\n',
                               "fraction must be a fraction between 0 and 1"),
    "no steps": ('[recipe]\ncalib_tokens = 512\n', "at least one"),
    "bad toml": ('[[step]\nkind = 1\n', "not a valid TOML recipe"),
    "neurons after weight pruning": ('[[step]]\nkind = "prune"\nmethod = "magnitude"\n'
                                     '[[step]]\nkind = "prune_neurons"\nfraction = 0.5\n',
                                     "step 2 .*must come before step 1"),
    "quantize after weight pruning": ('[[step]]\nkind = "prune"\nmethod = "magnitude"\n'
                                      'pattern = "2:4"\n[[step]]\nkind = "quantize"\n'
                                      'quant = "int8"\n', r"step 2 \(quantize\): comes after "
                                      r"step 1 \(prune\).*lose the\s+sparse encoding"),
    "low-rank after weight pruning": ('[[step]]\nkind = "prune"\nmethod = "magnitude"\n'
                                      '[[step]]\nkind = "lowrank"\nfraction = 0.5\n',
                                      r"step 2 \(lowrank\): comes after step 1 \(prune\)"
                                      r".*lose the\s+sparse encoding"),
    "keep later": ('[[step]]\nkind = "drop_layers"\nn = 1\n[[step]]\nkind = "quantize"\n'
                   'quant = "keep"\n', "only be the first step on a GGUF"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_are_refused_before_any_work(tmp_path, case):
    body, msg = BAD[case]
    path = _write(tmp_path, body)
    with pytest.raises(ConvertError, match=msg) as e:
        recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    assert str(e.value).startswith(path)  # the message names the recipe file
    assert sorted(os.listdir(tmp_path)) == ["r.toml"]


def test_calibration_text_too_short_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words of calibration text.")
    path = _write(tmp_path, f'[recipe]\ncalib = "{short}"\n[[step]]\nkind = "drop_layers"\n'
                            'n = 1\n')
    with pytest.raises(ConvertError, match="too short"):
        recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    assert not (tmp_path / "out").exists()
    missing = _write(tmp_path, '[recipe]\ncalib = "/nonexistent.txt"\n[[step]]\n'
                               'kind = "prune_neurons"\nfraction = 0.5\n', "m.toml")
    with pytest.raises(ConvertError, match="no such file"):
        recipe.run(tiny.checkpoint("llama"), tmp_path / "out", missing, progress=False)


def test_cli_recipe_on_an_edgellm_directory(tmp_path):
    body = FAST.replace("eval_tokens = 64", "report = false")  # sizes only: fast
    path = _write(tmp_path, body + '[[step]]\nkind = "prune_neurons"\nfraction = 0.25\n')
    model = tiny.converted("llama", "int8")
    r = edgellm_cli("convert", model, "-o", str(tmp_path / "out"), "--recipe", path)
    assert r.returncode == 0, r.stderr
    assert "| 1 | prune_neurons | fraction=0.25 |" in r.stdout
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["config"]["d_ff"] == 96
    assert [r["kind"] for r in m["provenance"]["recipe_report"]] == ["source", "prune_neurons"]
    assert "--recipe" in m["provenance"]["command"]
    bad = _write(tmp_path, '[[step]]\nkind = "shrink"\n', "bad.toml")
    r = edgellm_cli("convert", model, "-o", str(tmp_path / "bad"), "--recipe", bad)
    assert r.returncode != 0 and "unknown kind 'shrink'" in r.stderr


def test_gptq_step_runs_through_the_converter(tmp_path):
    """A quantize step with method gptq after a structural step: the working model is exported
    and converted again with --method gptq (converters/calibquant.py)."""
    path = _write(tmp_path, FAST.replace("eval_tokens = 64", "report = false") + """
[[step]]
kind = "drop_layers"
n = 1

[[step]]
kind = "quantize"
quant = "int4"
method = "gptq"
""")
    recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["config"]["n_layers"] == 1
    assert m["chunks"][1]["tensors"]["attn_q"]["encoding"] == "int4"
    assert "gptq" in json.dumps(m["provenance"]).lower()
    bad = _write(tmp_path, '[[step]]\nkind = "quantize"\nquant = "int8"\nmethod = "awq"\n',
                 "bad.toml")
    with pytest.raises(ConvertError, match="step 1 \\(quantize\\): .*awq"):
        recipe.run(tiny.checkpoint("llama"), tmp_path / "bad", bad, progress=False)


def test_prune_step_runs_through_the_converter(tmp_path):
    """A prune step (converters/prune.py, `edgellm convert --prune`) after a structural step."""
    import inspect

    from edgellm.converters.convert import convert

    if "prune" not in inspect.signature(convert).parameters:
        pytest.skip("this edgellm has no `convert --prune`")
    path = _write(tmp_path, FAST.replace("eval_tokens = 64", "report = false") + """
[[step]]
kind = "prune_neurons"
fraction = 0.25

[[step]]
kind = "prune"
method = "wanda"
pattern = "2:4"
quant = "int8"
""")
    recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["config"]["d_ff"] == 96
    assert m["chunks"][1]["tensors"]["attn_q"]["encoding"].startswith("sp24")
    edgellm.load(tmp_path / "out").logits([3, 4, 5])
