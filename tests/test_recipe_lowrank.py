"""The recipe `lowrank` step (converters/recipe.py -> convert --low-rank, converters/lowrank.py):
it round-trips (recipe and report in the provenance, the report lists the step with its ranks
and counts the factors' bytes), and bad values are refused before any work with a message
naming the recipe file and the step."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import edgellm
import tiny
from edgellm.converters import recipe
from edgellm.runtime.errors import ConvertError
from test_recipe import FAST  # the recipe settings that keep a test fast


LOWRANK = FAST + """
[[step]]
kind = "drop_layers"
n = 1

[[step]]
kind = "lowrank"
fraction = 0.6
quant = "int8"
"""


def _write(tmp_path, body, name="r.toml"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def _factor_bytes(model_dir):
    """Bytes of the .left/.right tensors (codes and scales) in the layer chunks."""
    m = json.load(open(os.path.join(model_dir, "manifest.json")))
    n = 0
    for c in m["chunks"][1:]:
        t = load_file(os.path.join(model_dir, c["file"]))
        n += sum(a.nbytes for k, a in t.items() if ".left" in k or ".right" in k)
    return n


def test_lowrank_step_round_trip(tmp_path):
    path = _write(tmp_path, LOWRANK)
    report = recipe.run(tiny.checkpoint("llama"), tmp_path / "out", path, progress=False)
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    prov = m["provenance"]
    assert prov["recipe"]["steps"] == recipe.load(path)["steps"]
    assert prov["recipe_report"] == json.loads(json.dumps(report))
    assert [r["kind"] for r in report] == ["convert", "drop_layers", "lowrank"]
    row = report[-1]
    assert (row["fraction"], row["quant"], row["method"]) == (0.6, "int8", "rtn")
    assert np.isfinite(row["perplexity"]) and row["decode_tokens_per_s"] > 0
    # the step factorized the attention of the one layer left, with the ranks it reports
    layer = m["chunks"][1]["tensors"]
    ranks = row["info"]["ranks"]
    assert len(ranks) == 1 and m["config"]["n_layers"] == 1
    for p, r in ranks[0].items():
        if r is None:
            assert p in layer and p + ".left" not in layer
        else:
            assert layer[p + ".left"]["shape"][1] == r == layer[p + ".right"]["shape"][0]
            assert layer[p + ".left"]["encoding"] == "int8"
    assert any(r is not None for r in ranks[0].values())
    # bytes read per token count the factors (plan.Sizes knows only the plain names)
    fb = _factor_bytes(tmp_path / "out")
    assert fb > 0
    layer_bytes = sum(c["size"] for c in m["chunks"][1:])
    assert fb < row["bytes_per_token"] and row["bytes_per_token"] > layer_bytes
    edgellm.load(tmp_path / "out").logits([3, 4, 5])
    assert sorted(os.listdir(tmp_path)) == ["out", "r.toml"]


BAD = {
    "fraction 0": ("fraction = 0\n", "fraction must be a fraction between 0 and 1"),
    "fraction negative": ("fraction = -0.5\n", "fraction must be a fraction between 0 and 1"),
    "fraction 120%": ("fraction = 1.2\n", "fraction must be a fraction between 0 and 1"),
    "fraction 1": ("fraction = 1\n", "fraction must be a fraction between 0 and 1"),
    "fraction a string": ('fraction = "half"\n', "fraction must be int or float"),
    "no fraction": ("quant = \"int8\"\n", "fraction is required"),
    "gptq to int8": ('fraction = 0.5\nmethod = "gptq"\nquant = "int8"\n', "int4 or int3"),
    "unknown method": ('fraction = 0.5\nmethod = "spqr"\nquant = "int4"\n',
                       "method must be one of"),
    "awq to int8": ('fraction = 0.5\nmethod = "awq"\nquant = "int8"\n', "int4 or int3"),
    "group size": ('fraction = 0.5\nquant = "int4"\ngroup_size = 128\n',
                   "does not divide the model's d_model 64"),
    "a step after it": ('fraction = 0.5\n[[step]]\nkind = "quantize"\nquant = "int8"\n',
                        r"step 2 \(quantize\): comes after step 1 \(lowrank\)"),
    # checked as convert checks it (calibquant.check_shapes): q_dim 96 is 1.5 groups of 64
    "gptq group size and q_dim": ('fraction = 0.5\nmethod = "gptq"\nquant = "int4"\n'
                                  'group_size = 64\n', "group size 64 does not divide q_dim",
                                  "llama_odd_heads"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lowrank_steps_refused_before_any_work(tmp_path, case):
    body, msg, *source = BAD[case]
    path = _write(tmp_path, '[[step]]\nkind = "lowrank"\n' + body)
    with pytest.raises(ConvertError, match=msg) as e:
        recipe.run(tiny.checkpoint(*source or ["llama"]), tmp_path / "out", path, progress=False)
    assert str(e.value).startswith(path)  # names the recipe file
    if case != "a step after it":
        assert "step 1 (lowrank)" in str(e.value)  # and the step
    assert sorted(os.listdir(tmp_path)) == ["r.toml"]
