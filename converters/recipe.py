"""Compression recipes: `edgellm convert SRC -o DST --recipe recipe.toml`.

A recipe is a TOML file: optional settings under [recipe] and an ordered list of [[step]]
tables, each with a `kind` and its options. For example

    [recipe]
    calib = "my-text.txt"      # calibration text (default: the shipped Austen sample)
    eval_tokens = 2048         # held-out tokens scored per report row

    [[step]]
    kind = "drop_layers"
    n = 4
    metric = "angular"         # or "bi"

    [[step]]
    kind = "quantize"
    quant = "int4"
    group_size = 32

    [[step]]
    kind = "predictor"
    recall = 0.99

The whole recipe is checked before any work (unknown keys or steps, values out of range, a group
size that does not divide the model's rows, a layer count the model does not have, a calibration
text too short), each failure a ConvertError naming the recipe file and the step. Then every step
turns the current model directory into a new one in a work directory next to DST: the source is
first converted (`base` encoding, f32 by default) unless it is already an edgellm directory or the
first step is a `quantize` step. After each step, and for the starting model, a report row is
measured: size on disk, perplexity on held-out text (edgellm/evaluate.py), weight bytes read per
decoded token, decode tokens/s and the step's time. The final model is staged, verified and
renamed to DST with the recipe and the report in its manifest's provenance (`recipe`,
`recipe_report`). Nothing is left behind on failure.

Steps and what they map to:
    quantize       convert's --quant/--group-size (and --method where the converter has it):
                   the current model is exported to a float32 Hugging Face directory and
                   converted again (exact: f32)
    prune          convert's --prune/--sparsity (unstructured or 2:4 pruning), when present;
                   its `quant` encodes the kept weights: quantize and lowrank may not follow it
                   (they convert again from a dense export, losing the sparse encoding), nor
                   may prune, prune_neurons, predictor, heal or distill
    drop_layers    converters/structural.py drop_by_metric
    prune_neurons  converters/structural.py prune_neurons
    predictor      converters/calibrate.py (hot-first order and low-rank predictors)
    heal           converters/distill.py: fine-tune the current model against the original
                   (the recipe's source) as the teacher, on `text` (default: the calibration
                   text); needs torch (the [train] extra)
    distill        converters/distill.py: a student selected from the current model's weights
                   (layers, keep_layers, neurons, heads), trained against it
    lowrank        convert's --low-rank F (converters/lowrank.py): the attention projections
                   factorized to keep `fraction` of their weights, the factors and the rest
                   encoded in `quant` by `method` (rtn; gptq for int4/int3; awq for int4;
                   smoothquant or w8a8 for int8); only
                   drop_layers, prune_neurons and predictor may follow it (they keep the
                   factors; the others convert again from a dense export, which would multiply
                   the factors back)
To add a step: an entry in STEPS (its options and their checks) and a function in RUNNERS.
"""

import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import tomllib

from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError

from . import calibrate, quantize, structural, writer

log = logging.getLogger(__name__)

MIN_CALIB_TOKENS = 512  # two calibration sequences of the default 256 tokens
BASES = ("f32", "f16", "int8", "keep")

# option -> (type(s), default, check(value) -> error text or None); default REQUIRED: must be given
REQUIRED = object()


def _between(lo, hi, what):
    return lambda v: None if lo < v < hi else f"must be {what}, got {v!r}"


def _positive(v):
    return None if v >= 1 else f"must be a positive integer, got {v!r}"


def _one_of(*names):
    return lambda v: None if v in names else f"must be one of {', '.join(names)}, got {v!r}"


SETTINGS = {
    "calib": (str, None, None),
    # the layerwise pass refuses fewer than 256 calibration tokens (converters/layerwise.py)
    "calib_tokens": (int, 4096, lambda v: None if v >= 256 else f"must be >= 256, got {v!r}"),
    "eval": (str, None, None),
    "eval_tokens": (int, 2048, lambda v: None if v >= 16 else f"must be >= 16, got {v!r}"),
    "eval_ctx": (int, 256, lambda v: None if v >= 16 else f"must be >= 16, got {v!r}"),
    "decode_tokens": (int, 32, _positive),
    "base": (str, "f32", _one_of(*BASES)),
    "report": (bool, True, None),  # measure each step (perplexity, speed)
}

STEPS = {
    "quantize": {"quant": (str, REQUIRED, _one_of(*quantize.QUANTS, quantize.KEEP)),
                 # method: rtn, or gptq / awq (converters/calibquant.py)
                 "group_size": (int, 32, None),
                 "method": (str, "rtn", None)},
    # converters/prune.py: half of every linear's weights, stored in the sparse encodings
    "prune": {"method": (str, REQUIRED, _one_of("magnitude", "wanda", "sparsegpt")),
              "sparsity": ((int, float), 0.5, _between(0, 1, "a fraction between 0 and 1")),
              "pattern": (str, "unstructured", _one_of("unstructured", "2:4")),
              "quant": (str, "f16", None)},
    "drop_layers": {"n": (int, REQUIRED, _positive),
                    "metric": (str, "angular", _one_of(*structural.METRICS))},
    "prune_neurons": {"fraction": ((int, float), REQUIRED,
                                   _between(0, 1, "a fraction between 0 and 1"))},
    "predictor": {"recall": ((int, float), 0.99, None), "rank": (int, None, _positive),
                  "sparsity": ((int, float), None, None)},
}
# heal and distill: converters/distill.py's training options (checked by distill.Options)
TRAIN = {"steps": (int, 100, None), "seq_len": (int, 128, None), "batch": (int, 4, None),
         "lr": ((int, float), None, None), "temperature": ((int, float), 2.0, None),
         "alpha": ((int, float), None, None), "lora": (int, 0, None), "text": (str, None, None),
         "threads": (int, 1, None), "seed": (int, 0, None), "max_tokens": (int, None, None)}
STEPS["heal"] = dict(TRAIN)
STEPS["distill"] = {**TRAIN, "layers": (int, None, None), "keep_layers": ((str, list), None, None),
                    "neurons": ((int, float), None, None), "heads": (int, None, None)}
STEPS["lowrank"] = {"fraction": ((int, float), REQUIRED,
                                 _between(0, 1, "a fraction between 0 and 1 (exclusive) of the "
                                          "attention weights to keep")),
                    "quant": (str, "int8", _one_of(*quantize.QUANTS)),
                    # awq (int4) and smoothquant / w8a8 (int8): scales folded, then factorized
                    "method": (str, "rtn", _one_of("rtn", "gptq", "awq", "smoothquant", "w8a8")),
                    "group_size": (int, 32, None)}
# steps that keep factorized projections as they are (they copy the attention tensors; their
# calibration passes run the runtime or a float32 export, which holds the factors' product)
AFTER_LOWRANK = ("drop_layers", "prune_neurons", "predictor")
NOT_YET = {}  # named in the issue, not available in this edgellm: refused with the reason


# ---------------------------------------------------------------------------------------------
# Parsing and checking


def load(path):
    """Read and check the recipe file's structure. Returns {"settings", "steps", "path"}."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a valid TOML recipe ({e})") from None
    return parse(raw, path)


def parse(raw, path="recipe"):
    """Check a recipe already read into a dict (the TOML's structure): defaults filled in."""
    def bad(msg):
        raise ConvertError(f"{path}: {msg}")

    unknown = set(raw) - {"recipe", "step"}
    if unknown:
        bad(f"unknown top-level keys {sorted(unknown)} (a recipe has [recipe] and [[step]] "
            "tables)")
    settings = _options(raw.get("recipe", {}), SETTINGS, "[recipe]", bad)
    steps = raw.get("step")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        bad("a recipe needs at least one [[step]] table")
    out = []
    for k, s in enumerate(steps, 1):
        kind = s.get("kind")
        if not isinstance(kind, str):  # e.g. kind = [1]: not hashable
            bad(f"step {k}: kind must be a string, got {kind!r}")
        where = f"step {k} ({kind})"
        if kind in NOT_YET:
            bad(f"{where}: {NOT_YET[kind]}")
        if kind not in STEPS:
            bad(f"step {k}: unknown kind {kind!r} (known: {', '.join(STEPS)})")
        opts = _options({n: v for n, v in s.items() if n != "kind"}, STEPS[kind], where, bad)
        out.append({"kind": kind, **opts})
    return {"settings": settings, "steps": out, "path": os.path.abspath(path)
            if os.path.exists(path) else path}


def _options(given, schema, where, bad):
    if not isinstance(given, dict):
        bad(f"{where} must be a table")
    unknown = set(given) - set(schema)
    if unknown:
        bad(f"{where}: unknown options {sorted(unknown)} (known: {', '.join(schema)})")
    out = {}
    for name, (types, default, check) in schema.items():
        if name not in given:
            if default is REQUIRED:
                bad(f"{where}: {name} is required")
            out[name] = default
            continue
        v = given[name]
        if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):
            tn = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            bad(f"{where}: {name} must be {tn}, got {v!r}")
        err = check(v) if check else None
        if err:
            bad(f"{where}: {name} {err}")
        out[name] = v
    return out


def source_info(src):
    """(ModelConfig-like dict, (tokenizer kind, bytes)) of a source, without converting it."""
    from . import arch
    from .convert import find_tokenizer
    from .sources import gguf as gguf_source

    src = os.fspath(src)
    if structural.is_model_dir(src):
        m, cfg = format.read_manifest(src)
        path = format.safe_path(src, m["tokenizer"]["file"])
        with open(path, "rb") as f:
            return cfg.to_dict(), (m["tokenizer"]["kind"], f.read())
    if gguf_source.is_gguf(src):
        with gguf_source.GGUFSource(src) as source:
            cfg = source.spec().config
            kind, _, data, _, _ = source.tokenizer()
        return cfg.to_dict(), (kind, data)
    spec = arch.from_hf_dir(src)
    tok, path, _ = find_tokenizer(src, spec)
    with open(path, "rb") as f:
        return spec.config.to_dict(), (tok["kind"], f.read())


def encode_text(tokenizer, text):
    """Token ids of text (no special tokens) with a source_info tokenizer (kind, bytes)."""
    kind, data = tokenizer
    if kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        return sp.encode(text)
    import tokenizers

    t = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    return t.encode(text, add_special_tokens=False).ids


def count_tokens(tokenizer, text):
    return len(encode_text(tokenizer, text))


def check(recipe, src):
    """Check the recipe against the source model before any work; returns the source info."""
    from edgellm.runtime.config import ModelConfig

    from .convert import convert as convert_fn

    path = recipe["path"]

    def bad(msg):
        raise ConvertError(f"{path}: {msg}")

    cfg, tok = source_info(src)
    s = recipe["settings"]
    n_layers, d = cfg["n_layers"], cfg["d_model"]
    is_edge = structural.is_model_dir(src)
    params = inspect.signature(convert_fn).parameters
    needs_calib = False
    pruned = None  # the step that stored weights in the sparse encodings
    factorized = None  # the lowrank step: only AFTER_LOWRANK steps may follow it
    predicted = None  # the step that trained predictors
    for k, st in enumerate(recipe["steps"], 1):
        where = f"step {k} ({st['kind']})"
        kind = st["kind"]
        if factorized and kind not in AFTER_LOWRANK:
            bad(f"{where}: comes after {factorized}; only {', '.join(AFTER_LOWRANK)} may follow "
                f"it ({kind} converts the weights again from a dense export, which multiplies "
                "the factors back: put it before the lowrank step)")
        if kind in ("heal", "distill"):
            if pruned or predicted:  # training writes dense weights, without predictors
                bad(f"{where}: must come before {pruned or predicted} (training rewrites every "
                    "weight densely: it would refill pruned weights and drop predictors)")
            from . import distill

            try:
                distill.require_torch()
                distill.train_options(st)
                if kind == "distill":
                    n_layers = len(distill.step_plan(st, {**cfg, "n_layers": n_layers})["layers"])
                distill.split_tokens(distill.token_ids(tok, calibrate.read_text(
                    _train_text(st, s))), st["seq_len"])
            except ConvertError as e:
                bad(f"{where}: {e}")
        if pruned and kind in ("quantize", "lowrank"):
            # (keeping the sparse encoding would mean pruning the export again: refused instead)
            fix = ("choose the encoding with the prune step's quant option" if kind == "quantize"
                   else "prune and lowrank do not combine in one recipe")
            bad(f"{where}: comes after {pruned}; {kind} converts the weights again from a "
                f"dense export, which would store the pruned weights densely and lose the "
                f"sparse encoding ({fix})")
        if pruned and kind in ("prune_neurons", "predictor", "prune"):
            # cutting or reordering FFN rows would break the 2:4 / 50% groups of a pruned ffn_down
            bad(f"{where}: must come before {pruned} (the sparse encodings of weight pruning do "
                "not survive removing or reordering neurons)")
        if kind == "quantize":
            try:
                quantize.check_quant(st["quant"], st["group_size"])
            except ConvertError as e:
                bad(f"{where}: {e}")
            if st["quant"] in ("int4", "int3") and d % st["group_size"]:
                bad(f"{where}: group_size {st['group_size']} does not divide the model's "
                    f"d_model {d}")
            if st["quant"] == quantize.KEEP and (k > 1 or is_edge):
                bad(f"{where}: quant 'keep' keeps a GGUF file's blocks, so it can only be the "
                    "first step on a GGUF source")
            if st["method"] != "rtn":
                from . import calibquant

                try:
                    o = calibquant.options(st["method"], st["quant"], st["group_size"],
                                           s["calib"], {"tokens": s["calib_tokens"]})
                    calibquant.check_shapes(o, ModelConfig(**cfg))
                except ConvertError as e:
                    bad(f"{where}: {e}")
                needs_calib = True
        elif kind == "prune":
            if "prune" not in params:
                bad(f"{where}: needs `edgellm convert --prune`, which this edgellm does not have "
                    "yet")
            if st["sparsity"] != 0.5:
                bad(f"{where}: sparsity {st['sparsity']!r}: the sparse encodings keep exactly "
                    "half of each row (sparsity 0.5, unstructured or 2:4)")
            try:
                pruning = _prune_options(st, s)
                from . import prune as prune_module

                prune_module.check_compatible(pruning, st["quant"])
            except ConvertError as e:
                bad(f"{where}: {e}")
            needs_calib = st["method"] != "magnitude" or needs_calib
            pruned = where
        elif kind == "lowrank":
            from . import calibquant

            try:
                quantize.check_quant(st["quant"], st["group_size"])
                o = calibquant.options(st["method"], st["quant"], st["group_size"], s["calib"],
                                       {"tokens": s["calib_tokens"]}, low_rank=st["fraction"])
                calibquant.check_shapes(o, ModelConfig(**cfg))
            except ConvertError as e:
                bad(f"{where}: {e}")
            if st["quant"] in ("int4", "int3") and d % st["group_size"]:
                bad(f"{where}: group_size {st['group_size']} does not divide the model's "
                    f"d_model {d}")
            needs_calib = True
            factorized = where
        elif kind == "drop_layers":
            try:
                structural.check_drop(st["n"], n_layers, where)
            except ConvertError as e:
                bad(str(e))
            n_layers -= st["n"]
            needs_calib = True
        elif kind == "prune_neurons":
            needs_calib = True
        elif kind == "predictor":
            predicted = where
            if not 0.5 <= st["recall"] < 1:
                bad(f"{where}: recall must be in [0.5, 1), got {st['recall']!r}")
            if st["sparsity"] is not None and not 0 <= st["sparsity"] < 1:
                bad(f"{where}: sparsity must be in [0, 1), got {st['sparsity']!r}")
            needs_calib = True
    for key in ("calib", "eval"):
        if s[key] is not None and not os.path.isfile(s[key]):
            bad(f"[recipe] {key}: {s[key]}: no such file")
    if needs_calib:
        text = calibrate.read_text(s["calib"] or calibrate.default_text())
        n = count_tokens(tok, text)
        if n < MIN_CALIB_TOKENS:
            bad(f"[recipe] calib: the calibration text {s['calib'] or calibrate.default_text()} "
                f"is too short ({n} tokens; at least {MIN_CALIB_TOKENS} are needed)")
    if s["report"]:
        from edgellm.evaluate import read_text as read_eval

        read_eval(s["eval"] or _eval_text())
    return cfg


def _eval_text():
    from edgellm.evaluate import heldout_text_path

    return heldout_text_path()


# ---------------------------------------------------------------------------------------------
# Steps


def _calib_opts(s, **extra):
    return calibrate.CalibOptions(text=s["calib"], tokens=s["calib_tokens"], **extra).check()


def _convert_again(cur, out, work, **kw):
    """convert(cur, out, **kw), an edgellm model directory cur first exported to a float32
    Hugging Face directory in work (exact), removed afterwards. (What the quantize, prune and
    lowrank steps do: whatever encoding cur had is replaced.)"""
    from edgellm.export import export

    from .convert import convert

    src = cur
    if structural.is_model_dir(cur):
        src = os.path.join(work, os.path.basename(out) + "-hf")
        export(cur, src, to="hf", progress=False)
    convert(src, out, progress=False, **kw)
    if src != cur:
        shutil.rmtree(src, ignore_errors=True)


def _quantize(cur, out, st, s, work):
    kw = {}
    if st["method"] != "rtn":  # calibrated on the recipe's text (calib=None: the shipped one)
        kw = {"method": st["method"], "method_options": {"tokens": s["calib_tokens"]},
              "calib": s["calib"]}
    _convert_again(cur, out, work, quant=st["quant"], group_size=st["group_size"], **kw)
    return {}


def _prune(cur, out, st, s, work):
    _convert_again(cur, out, work, quant=st["quant"], prune=_prune_options(st, s))
    return {}


def _lowrank(cur, out, st, s, work):
    _convert_again(cur, out, work, quant=st["quant"], group_size=st["group_size"],
                   method=st["method"], method_options={"tokens": s["calib_tokens"]},
                   calib=s["calib"], low_rank=st["fraction"])
    m, _ = format.read_manifest(out)
    rec = m["provenance"]["quantization"]["calibrated"]["low_rank"]
    return {"ranks": [lay["ranks"] for lay in rec["layers"]]}


def _prune_options(st, s):
    from . import prune as pruning

    return pruning.options(st["method"], "2:4" if st["pattern"] == "2:4" else "0.5",
                           calib=s["calib"], tokens=s["calib_tokens"])


def _drop(cur, out, st, s, work):
    return structural.drop_by_metric(cur, out, st["n"], st["metric"], _calib_opts(s))


def _prune_neurons(cur, out, st, s, work):
    return structural.prune_neurons(cur, out, st["fraction"], _calib_opts(s))


def _train_text(st, s):
    return st["text"] or s["calib"] or calibrate.default_text()


def _trained_quant(s):
    """The encoding a heal/distill step writes: the recipe's base (f32 for a GGUF's blocks)."""
    return "f32" if s["base"] == "keep" else s["base"]


def _heal(cur, out, st, s, work, teacher=None):
    from . import distill

    info = distill.distill(teacher, out, _train_text(st, s), student=cur,
                           options=distill.train_options(st), quant=_trained_quant(s))
    return {k: info[k] for k in ("teacher", "heldout_before", "heldout_after", "seconds")}


def _distill(cur, out, st, s, work):
    from . import distill

    p = {k: st[k] for k in ("layers", "keep_layers", "neurons", "heads")}
    if isinstance(p["keep_layers"], list):
        p["keep_layers"] = ",".join(str(i) for i in p["keep_layers"])
    info = distill.distill(cur, out, _train_text(st, s), options=distill.train_options(st),
                           quant=_trained_quant(s), **p)
    return {k: info.get(k) for k in ("kept_layers", "neurons", "heads", "heldout_before",
                                     "heldout_after", "seconds")}


def _predictor(cur, out, st, s, work):
    extra = {"predictor": True, "recall": st["recall"]}
    if st["rank"] is not None:
        extra["rank"] = st["rank"]
    if st["sparsity"] is not None:
        extra["sparsity"] = st["sparsity"]
    return calibrate_model(cur, out, _calib_opts(s, **extra))


RUNNERS = {"quantize": _quantize, "prune": _prune, "drop_layers": _drop,
           "prune_neurons": _prune_neurons, "predictor": _predictor, "heal": _heal,
           "distill": _distill, "lowrank": _lowrank}


def calibrate_model(model_dir, dst, opts):
    """A calibrated copy of model_dir (hot-first rows, thresholds, predictors with
    opts.predictor). Returns the calibration summary."""
    m, cfg = format.read_manifest(model_dir)
    with writer.Staging(dst) as stg:
        structural._copy_common(model_dir, m, stg)
        for i in range(cfg.n_layers):
            stg.copy(format.safe_path(model_dir, format.layer_chunk(i)), format.layer_chunk(i))
        stg.write_manifest(m)
        out = calibrate.calibrate(stg.tmp, copy.deepcopy(m), cfg, opts, stg.write_chunk)
        stg.write_manifest(out)
        stg.commit()
    cal = out["calibration"]
    return {"mean_recall": cal.get("mean_recall"), "tokens": cal.get("tokens"),
            "seconds": cal.get("seconds")}


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(model_dir, s, eval_text):
    """One report row: size, perplexity on held-out text, bytes/token, decode tokens/s."""
    import edgellm
    from edgellm.evaluate import perplexity
    from edgellm.model import stats_summary
    from edgellm.runtime.plan import Sizes

    m, cfg = format.read_manifest(model_dir)
    sz = Sizes.of(m, cfg)
    row = {"size_bytes": structural.model_bytes(model_dir),
           # dense decode reads every layer's weights, the head and one embedding row
           "bytes_per_token": sum(sz.attn) + sum(sz.ffn) + _down_bytes(m) + sz.small + sz.head
           + sz.embed_row + _factor_bytes(m),
           "n_layers": cfg.n_layers, "d_ff": cfg.d_ff}
    if not s["report"]:
        return row
    ctx = min(s["eval_ctx"], cfg.max_context)
    model = edgellm.load(model_dir, n_ctx=ctx)
    r = perplexity(model, eval_text, ctx=ctx, max_tokens=s["eval_tokens"])
    row.update({"perplexity": round(r["perplexity"], 4), "eval_tokens": r["tokens"]})
    prompt = model.tokenizer.encode(eval_text)[:min(16, ctx // 2)]
    n = max(1, min(s["decode_tokens"], ctx - len(prompt) - 1))
    list(model.generate(prompt, max_tokens=n, temperature=0.0))
    row["decode_tokens_per_s"] = round(stats_summary(model.last_stats)["decode_tokens_per_s"], 2)
    return row


def _down_bytes(m):
    from edgellm.runtime.plan import tensor_bytes

    return sum(tensor_bytes(c, "ffn_down") for c in m["chunks"][1:])


def _factor_bytes(m):
    """Low-rank factors (plan.Sizes counts the attention projections by their plain names)."""
    from edgellm.runtime.plan import ATTN, tensor_bytes

    return sum(tensor_bytes(c, p + part) for c in m["chunks"][1:] for p in ATTN
               for part in (".left", ".right"))


# ---------------------------------------------------------------------------------------------


def run(src, dst, recipe_path, overwrite=False, progress=True, command=None):
    """Apply the recipe at recipe_path to src, writing dst. Returns the report (a list of rows,
    the first for the starting model)."""
    from .convert import convert

    src, dst = os.fspath(src), os.fspath(dst)
    recipe = load(recipe_path)
    check(recipe, src)
    writer.check_destination(dst, overwrite, src)
    s = recipe["settings"]
    eval_text = None
    if s["report"]:
        from edgellm.evaluate import read_text as read_eval

        eval_text = read_eval(s["eval"] or _eval_text())
    steps = list(recipe["steps"])
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".recipe-", dir=parent)
    report = []
    try:
        t0 = time.perf_counter()
        cur = src
        if not structural.is_model_dir(src):
            first = steps[0]
            base = os.path.join(work, "step0")
            if first["kind"] in ("quantize", "lowrank"):  # straight from the source
                steps.pop(0)
                _say(progress, f"step 1/{len(recipe['steps'])}: {first['kind']} {_opts(first)}")
                info = RUNNERS[first["kind"]](src, base, first, s, work)
                label = {"step": 1, "kind": first["kind"], **_opts(first),
                         **({"info": info} if info else {})}
            else:
                _say(progress, f"converting {src} ({s['base']})")
                convert(src, base, quant=s["base"], progress=False)
                label = {"step": 0, "kind": "convert", "quant": s["base"]}
            cur = base
        else:
            label = {"step": 0, "kind": "source"}
        # the teacher of heal steps: the source itself when torch can load it, else its
        # conversion (kept until the end)
        origin = src if structural.is_model_dir(src) or os.path.isfile(
            os.path.join(src, "config.json")) else cur
        row = {**label, "seconds": round(time.perf_counter() - t0, 2)}
        row.update(measure(cur, s, eval_text))
        report.append(row)
        _say(progress, _row_text(row))
        offset = len(recipe["steps"]) - len(steps)
        for k, st in enumerate(steps, offset + 1):
            _say(progress, f"step {k}/{len(recipe['steps'])}: {st['kind']} {_opts(st)}")
            out = os.path.join(work, f"step{k}")
            t0 = time.perf_counter()
            kw = {"teacher": origin} if st["kind"] == "heal" else {}
            info = RUNNERS[st["kind"]](cur, out, st, s, work, **kw)
            row = {"step": k, "kind": st["kind"], **_opts(st),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if info:
                row["info"] = info
            row.update(measure(out, s, eval_text))
            report.append(row)
            _say(progress, _row_text(row))
            if cur not in (src, origin):
                shutil.rmtree(cur, ignore_errors=True)
            cur = out
        m, _ = format.read_manifest(cur)
        prov = dict(m.get("provenance") or {})
        prov.update({"command": command or f"edgellm convert {src} -o {dst} --recipe "
                     f"{recipe_path}",
                     "recipe_source": os.path.abspath(src),
                     "recipe": {"file": recipe["path"], "settings": s,
                                "steps": recipe["steps"]},
                     "recipe_report": report})
        structural.copy_model(cur, dst, overwrite=overwrite, provenance=prov)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _opts(st):
    return {k: v for k, v in st.items() if k != "kind"}


def _say(progress, msg):
    if progress:
        import sys

        print(msg, file=sys.stderr, flush=True)


def _row_text(r):
    ppl = f"ppl {r['perplexity']:.3f}  " if "perplexity" in r else ""
    tps = (f"decode {r['decode_tokens_per_s']:.1f} tok/s  "
           if "decode_tokens_per_s" in r else "")
    return (f"  -> {r['size_bytes'] / 1e6:.2f} MB  {ppl}{r['bytes_per_token'] / 1e6:.2f} MB/token"
            f"  {tps}{r['seconds']:.1f} s")


def report_table(report):
    """The report as a Markdown table."""
    lines = ["| step | kind | options | size MB | perplexity | MB/token | decode tok/s | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report:
        opts = ", ".join(f"{k}={v}" for k, v in r.items()
                         if k not in ("step", "kind", "seconds", "info", "size_bytes",
                                      "bytes_per_token", "perplexity", "eval_tokens",
                                      "decode_tokens_per_s", "n_layers", "d_ff"))
        lines.append(f"| {r['step']} | {r['kind']} | {opts} | {r['size_bytes'] / 1e6:.2f} | "
                     f"{r.get('perplexity', '-')} | {r['bytes_per_token'] / 1e6:.2f} | "
                     f"{r.get('decode_tokens_per_s', '-')} | {r['seconds']} |")
    return "\n".join(lines)


def dumps(report):
    return json.dumps(report, indent=1)

