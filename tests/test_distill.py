"""edgellm distill and healing (converters/distill.py): the objective against NumPy, weight
selection and LoRA merging against the teacher's own forward, training lowering the KL to the
teacher / the perplexity measured by the edgellm runtime on the written model, the recipe's heal
step, and bad input refused before any work."""

import os
import sys

import numpy as np
import pytest

import tiny

torch = pytest.importorskip("torch", reason="edgellm distill needs torch (the [train] extra)")
pytest.importorskip("transformers", reason="edgellm distill needs transformers ([train])")

import edgellm  # noqa: E402
from edgellm import cli  # noqa: E402
from edgellm.converters import distill, recipe, structural  # noqa: E402
from edgellm.runtime.errors import ConvertError  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    train = d / "train.txt"
    train.write_text("\n".join(tiny.corpus(400, seed=0)))
    held = d / "held.txt"
    held.write_text("\n".join(tiny.corpus(60, seed=7)))
    return str(train), str(held)


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 1.0), (0.5, 0.0),
                                               (2.0, 0.9)])
def test_objective_is_the_stated_one(temperature, alpha):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 7, 50)).astype(np.float32) * 3
    t = rng.normal(size=(2, 7, 50)).astype(np.float32) * 3
    y = rng.integers(0, 50, size=(2, 7))
    loss, kl, ce = distill.objective(torch.from_numpy(s), torch.from_numpy(t),
                                     torch.from_numpy(y), temperature, alpha)
    lps, lpt = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
    kl_ref = (np.exp(lpt) * (lpt - lps)).sum(-1).mean()
    ce_ref = -np.take_along_axis(np_log_softmax(s), y[..., None], -1).mean()
    ref = alpha * temperature ** 2 * kl_ref + (1 - alpha) * ce_ref
    assert float(kl) == pytest.approx(kl_ref, rel=1e-5)
    assert float(ce) == pytest.approx(ce_ref, rel=1e-5)
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def _hf(name, tmp_path):
    model, _ = distill.load_hf(tiny.checkpoint(name), str(tmp_path), "t")
    return model.eval()


def test_lora_merge_equals_unmerged_forward(tmp_path):
    model = _hf("llama", tmp_path)
    x = torch.from_numpy(np.array([tiny.token_ids("llama", 16)]))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    n = distill.add_lora(model, 4, 8.0)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)  # B = 0: the model it adapts
        for mod in model.modules():
            if hasattr(mod, "lora_b"):
                mod.lora_b.normal_(0, 0.05)
        unmerged = model(input_ids=x).logits
    assert (unmerged - ref).abs().max() > 1e-2  # the adapters do change the output
    distill.merge_lora(model)
    assert not any(hasattr(m, "lora_a") for m in model.modules())
    with torch.no_grad():
        merged = model(input_ids=x).logits
    np.testing.assert_allclose(merged.numpy(), unmerged.numpy(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_equal_to_the_teacher_has_no_kl_and_no_kl_gradient(tmp_path, temperature):
    """The KL term compares the two models at the same positions: a copy of the teacher has KL 0
    and a zero gradient; the CE term's gradient does not vanish there (why healing defaults to
    alpha 1: with alpha 0.5 it pulls the student away from the teacher, towards the text)."""
    import copy

    teacher = _hf("llama", tmp_path)
    student = copy.deepcopy(teacher).train()
    w = torch.from_numpy(np.array([tiny.token_ids("llama", 33, seed=1)]))
    x, y = w[:, :-1], w[:, 1:]
    with torch.no_grad():
        t = teacher(input_ids=x).logits

    def grad_norm(alpha):
        student.zero_grad()
        loss, kl, _ = distill.objective(student(input_ids=x).logits, t, y, temperature, alpha)
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        return float(kl.detach()), float(g.norm())

    kl, g_kl = grad_norm(1.0)
    assert abs(kl) < 1e-6 and g_kl < 1e-5
    _, g_half = grad_norm(0.5)
    assert g_half > 0.1


def test_healing_trains_kl_only_by_default_and_can_freeze_embeddings(tmp_path, texts):
    from safetensors.numpy import load_file

    teacher = tiny.converted("llama", "f32")
    dropped = structural.drop_layers(teacher, str(tmp_path / "d"), [1])
    out = str(tmp_path / "healed")
    info = distill.distill(teacher, out, texts[0], student=dropped, quant="f32", progress=False,
                           options=distill.Options(steps=3, seq_len=16, lr=1e-2,
                                                   freeze_embeddings=True))
    assert info["options"]["alpha"] == 1.0 and info["options"]["freeze_embeddings"]
    before, after = load_file(f"{dropped}/embed.safetensors"), load_file(f"{out}/embed.safetensors")
    for name in ("tok_embeddings", "output"):  # untied: both kept
        np.testing.assert_array_equal(after[name], before[name])
    assert not np.array_equal(after["norm.weight"], before["norm.weight"])  # the rest trained
    sel = distill.distill(teacher, str(tmp_path / "sel"), texts[0], keep_layers="0",
                          quant="f32", progress=False,
                          options=distill.Options(steps=1, seq_len=16))
    assert sel["options"]["alpha"] == 0.5 and not sel["options"]["freeze_embeddings"]


def test_selection_equals_the_teacher_without_the_rest(tmp_path):
    """A student of kept heads and neurons computes what the teacher computes with the other
    heads' o columns and the other neurons' down columns zeroed (exactly the removed terms)."""
    teacher = _hf("llama", tmp_path)  # 4 heads in 2 key/value groups, d_ff 128
    x = torch.from_numpy(np.array([tiny.token_ids("llama", 20, seed=3)]))
    cfg, _ = distill.model_info(tiny.checkpoint("llama"), "teacher")
    plan = distill.plan_selection(cfg, neurons=0.5, heads=2)
    assert plan == {"layers": [0, 1], "d_ff": 64, "heads": 2, "kv_heads": 1}
    student, rec = distill.select_student(teacher, plan, [x])
    hd = cfg["head_dim"]
    zeroed = _hf("llama", tmp_path / "z")
    with torch.no_grad():
        for i, layer in enumerate(distill.decoder_layers(zeroed)):
            s_layer = distill.decoder_layers(student)[i]
            t_down = distill.decoder_layers(teacher)[i].mlp.down_proj.weight
            kept = [j for j in range(t_down.shape[1])
                    if any(torch.equal(t_down[:, j], s_layer.mlp.down_proj.weight[:, k])
                           for k in range(64))]
            assert len(kept) == 64
            drop = sorted(set(range(128)) - set(kept))
            layer.mlp.down_proj.weight[:, drop] = 0
            o = distill.decoder_layers(teacher)[i].self_attn.o_proj.weight
            groups = [g for g in range(2) if torch.equal(
                o[:, g * 2 * hd:(g + 1) * 2 * hd], s_layer.self_attn.o_proj.weight)]
            assert len(groups) == 1
            other = 1 - groups[0]
            layer.self_attn.o_proj.weight[:, other * 2 * hd:(other + 1) * 2 * hd] = 0
        ref = zeroed(input_ids=x).logits
        out = student(input_ids=x).logits
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-4, rtol=1e-4)
    assert rec["neurons"]["kept"] == 64 and rec["heads"]["kv_kept"] == 1


def _runtime_heldout(teacher_dir, student_dir, ids, seq_len):
    """KL(teacher || student) and the student's cross-entropy over the windows distill.heldout
    uses, from the edgellm runtime's logits (NumPy)."""
    t = edgellm.load(teacher_dir)
    s = edgellm.load(student_dir)
    kl = nll = 0.0
    n = 0
    for b in range(0, len(ids) - 1, seq_len):
        w = ids[b:b + seq_len + 1]
        if len(w) < 2:
            break
        ls = np_log_softmax(s.logits(list(w[:-1])))
        lt = np_log_softmax(t.logits(list(w[:-1])))
        kl += (np.exp(lt) * (lt - ls)).sum()
        nll -= ls[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    return kl / n, nll / n


@pytest.mark.slow
def test_distilling_lowers_the_kl_to_the_teacher(tmp_path, texts):
    train, _ = texts
    teacher = tiny.converted("llama", "f32")
    # the initialized student (layer 0 of 2) is the teacher without layer 1
    init = structural.drop_layers(teacher, str(tmp_path / "init"), [1])
    out = str(tmp_path / "student")
    opts = distill.Options(steps=40, seq_len=32, batch=4, lr=3e-3, alpha=1.0, temperature=1.0)
    info = distill.distill(teacher, out, train, keep_layers="0", options=opts, quant="f32",
                           progress=False)
    _, tok = distill.model_info(teacher, "teacher")
    _, held = distill.split_tokens(distill.token_ids(tok, open(train).read()), 32)
    kl0, ce0 = _runtime_heldout(teacher, init, held, 32)
    kl1, ce1 = _runtime_heldout(teacher, out, held, 32)
    # the written model is the trained one (edgellm's forward vs torch's, float32)
    assert kl0 == pytest.approx(info["heldout_before"]["kl"], rel=1e-3, abs=1e-5)
    assert kl1 == pytest.approx(info["heldout_after"]["kl"], rel=1e-3, abs=1e-5)
    assert ce1 == pytest.approx(info["heldout_after"]["ce"], rel=1e-4)
    assert kl1 < 0.8 * kl0
    m, cfg = edgellm.runtime.format.read_manifest(out)
    d = m["provenance"]["distill"]
    assert cfg.n_layers == 1 and d["kept_layers"] == [0] and d["options"]["steps"] == 40
    assert d["teacher"] == os.path.abspath(teacher) and len(d["losses"]) == 20


@pytest.mark.slow
def test_recipe_drop_heal_distill_int8(tmp_path, texts):
    train, held = texts
    r = tmp_path / "r.toml"
    r.write_text(f'[recipe]\neval = "{held}"\neval_tokens = 256\neval_ctx = 64\n'
                 f'decode_tokens = 4\ncalib = "{train}"\ncalib_tokens = 512\n'
                 '[[step]]\nkind = "drop_layers"\nn = 1\n'
                 # alpha 0.5: the tiny teacher is random, only the CE term lowers perplexity
                 f'[[step]]\nkind = "heal"\nsteps = 30\nseq_len = 32\nlr = 3e-3\nlora = 4\n'
                 'alpha = 0.5\n'
                 '[[step]]\nkind = "distill"\nneurons = 0.5\nsteps = 5\nseq_len = 32\n'
                 '[[step]]\nkind = "quantize"\nquant = "int8"\n')
    dst = str(tmp_path / "out")
    report = recipe.run(tiny.checkpoint("llama_relu"), dst, str(r), progress=False)
    ppl = {row["kind"]: row["perplexity"] for row in report}
    assert ppl["heal"] < 0.8 * ppl["drop_layers"]  # held-out text, edgellm's runtime
    assert ppl["quantize"] == pytest.approx(ppl["distill"], rel=0.02)
    heal = report[2]["info"]
    assert heal["teacher"] == os.path.abspath(tiny.checkpoint("llama_relu"))
    assert heal["heldout_after"]["ce"] < heal["heldout_before"]["ce"]
    m, cfg = edgellm.runtime.format.read_manifest(dst)
    assert [r["d_ff"] for r in report] == [256, 256, 256, 128, 128]
    assert cfg.n_layers == 1 and m["provenance"]["recipe_report"][2]["kind"] == "heal"
    assert [x for x in os.listdir(tmp_path) if x not in ("r.toml", "out")] == []


def test_cli_heal_with_lora(tmp_path, texts, capsys, monkeypatch):
    train, _ = texts
    teacher = tiny.converted("llama", "f32")
    dropped = structural.drop_layers(teacher, str(tmp_path / "d"), [0])
    out = str(tmp_path / "healed")
    argv = ["distill", teacher, "-o", out, "--text", train, "--student", dropped, "--steps", "3",
            "--seq-len", "16", "--lora", "2", "--quant", "int8"]
    monkeypatch.setattr(sys, "argv", ["edgellm", *argv])  # the command recorded
    assert cli.main(argv) in (0, None)
    assert "wrote" in capsys.readouterr().out
    m, cfg = edgellm.runtime.format.read_manifest(out)
    d = m["provenance"]["distill"]
    assert cfg.n_layers == 1 and d["init"] == os.path.abspath(dropped)
    # rank 2 on q, o (64 -> 64), k, v (64 -> 32), gate, up, down (64 <-> 128) of one layer
    assert d["lora_trainable_params"] == 2 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert m["provenance"]["command"].startswith("edgellm distill")
    assert sorted(os.listdir(tmp_path)) == ["d", "healed"]


BAD = {
    "missing teacher": (["/nonexistent/teacher"], "teacher /nonexistent/teacher: no such"),
    "text too short": (["--layers", "1", "--text", "SHORT"], "text is too short"),
    "missing text": (["--layers", "1", "--text", "/nonexistent.txt"], "nonexistent.txt"),
    "repeated layer": (["--keep-layers", "0,0"], "repeated"),
    "layer out of range": (["--keep-layers", "0,2"], "layers 0 to 1"),
    "not a list": (["--keep-layers", "a,b"], "layer indices separated by commas"),
    "both layer options": (["--layers", "1", "--keep-layers", "0"], "not both"),
    "too many layers": (["--layers", "3"], "between 1 and the teacher's 2"),
    "neurons": (["--neurons", "1.5"], "fraction of FFN neurons"),
    "heads": (["--heads", "3"], "multiple of 2"),
    "seq-len": (["--layers", "1", "--seq-len", "1000"], "longer than the teacher's context"),
    "alpha": (["--layers", "1", "--alpha", "2"], "--alpha"),
    "student and selection": (["--student", "TEACHER", "--layers", "1"], "one or the other"),
    "steps": (["--layers", "1", "--steps", "-1"], "--steps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused_before_any_work(case, tmp_path, texts, capsys, monkeypatch):
    args, message = BAD[case]
    teacher = tiny.checkpoint("llama")
    short = tmp_path / "short.txt"
    short.write_text("Hello world. " * 5)
    args = [a.replace("SHORT", str(short)).replace("TEACHER", teacher) for a in args]
    if args[0].startswith("/nonexistent/"):
        teacher, args = args[0], args[1:]
    if "--text" not in args:
        args += ["--text", texts[0]]
    # nothing may be trained or loaded: any torch model construction fails the test
    monkeypatch.setattr(distill, "load_hf", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    assert cli.main(["distill", teacher, "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert "edgellm: error:" in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["short.txt"]


def test_a_weight_pruned_student_is_refused(tmp_path, texts):
    from edgellm.converters import prune
    from edgellm.converters.convert import convert

    pruned = convert(tiny.checkpoint("llama"), str(tmp_path / "p"), quant="int8",
                     prune=prune.options("magnitude", "2:4"), progress=False)
    with pytest.raises(ConvertError, match="stored pruned .* Heal before pruning"):
        distill.distill(tiny.checkpoint("llama"), str(tmp_path / "o"), texts[0], student=pruned)
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_recipe_refuses_bad_heal_steps(tmp_path, texts):
    short = tmp_path / "short.txt"
    short.write_text("Hello world. " * 5)
    cases = {
        'kind = "heal"\nsteps = -2\n': "--steps",
        f'kind = "heal"\ntext = "{short}"\n': "text is too short",
        'kind = "distill"\nkeep_layers = [0, 5]\n': "layers 0 to 1",
        'kind = "heal"\nlora = "big"\n': "lora must be int",
    }
    for body, message in cases.items():
        r = tmp_path / "r.toml"
        r.write_text(f"[[step]]\n{body}")
        with pytest.raises(ConvertError, match=message):
            recipe.run(tiny.checkpoint("llama"), str(tmp_path / "o"), str(r), progress=False)
    r.write_text('[[step]]\nkind = "prune"\nmethod = "magnitude"\n[[step]]\nkind = "heal"\n')
    with pytest.raises(ConvertError, match="step 2 .*must come before step 1"):
        recipe.run(tiny.checkpoint("llama"), str(tmp_path / "o"), str(r), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["r.toml", "short.txt"]


def test_without_torch_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ConvertError, match=r"edgellm\[train\]"):
        distill.require_torch()
