"""Layer dropping with and without healing, and distilled students, measured side by side.

    python benchmarks/distill.py --teacher ~/.cache/edgellm-demo/hf \\
        --text ~/.cache/edgellm-demo/text/train.txt \\
        --eval-text ~/.cache/edgellm-demo/text/heldout.txt --out /tmp/distill-demo \\
        --steps 300 --json demo.json
    python benchmarks/distill.py measure DIR [DIR ...] --max-tokens 2048 [--json rows.jsonl]

`measure` gives models built elsewhere (`edgellm distill`, `edgellm convert --drop-layers`) the
rows of benchmarks/quant.py (the SmolLM2 table of docs/COMPRESSION.md): perplexity on the shipped
held-out text (ctx 512, stride 256, the first --max-tokens tokens), size, weight bytes read per
decoded token, decode CPU ms per token (process time, best of 3 runs of 16 greedy tokens).

Every variant is written as an edgellm model (--quant, int8 by default) in --out (kept, so a run
can be resumed: existing variants are measured again, not rebuilt) and measured with the recipe
report's row (converters/recipe.py measure): size on disk, perplexity on --eval-text
(--eval-tokens tokens in windows of --ctx, stride ctx/2), weight bytes read per decoded token,
greedy decode tokens/s (indicative on a shared machine), and the time the variant took to build.

Variants (--variants, comma-separated; default all):
    base            the teacher converted
    drop1, drop2    --drop-layers 1 / 2 (angular, shipped calibration text)
    drop1-heal      drop1 fine-tuned against the teacher (every weight)
    drop2-heal      the same for drop2
    drop2-lora      drop2 healed with rank-8 LoRA adapters
    layers2         a 2-layer student (first and last layers) distilled from the teacher
    neurons50       a student with half of each layer's FFN neurons, distilled
    neurons50-init  that student before training (weight selection only)
    base-tuned      the control: base itself trained the same way against the teacher (how
                    much of a healed model's gain is the extra training on in-domain text)
"""

import argparse
import json
import os
import sys
import time

ALL = ["base", "drop1", "drop1-heal", "drop2", "drop2-heal", "drop2-lora", "layers2",
       "neurons50-init", "neurons50", "base-tuned"]


def build(name, a, out):
    from edgellm.converters import distill
    from edgellm.converters.convert import convert

    dst = os.path.join(out, name)
    if os.path.isdir(dst):
        return dst, None
    t0 = time.perf_counter()

    def opts(**kw):
        return distill.Options(**{"steps": a.steps, "seq_len": a.seq_len, "batch": a.batch,
                                  "max_tokens": a.max_tokens, "threads": a.threads, **kw})

    def dist(**kw):
        o = kw.pop("options", None) or opts()
        return distill.distill(a.teacher, dst, a.text, options=o, quant=a.quant,
                               progress=True, **kw)

    if name == "base":
        convert(a.teacher, dst, quant=a.quant, progress=False)
    elif name in ("drop1", "drop2"):
        convert(a.teacher, dst, quant=a.quant, drop_layers=int(name[-1]), progress=False)
    elif name in ("drop1-heal", "drop2-heal"):
        dist(student=build(name[:5], a, out)[0])
    elif name == "base-tuned":
        dist(student=build("base", a, out)[0])
    elif name == "drop2-lora":
        dist(student=build("drop2", a, out)[0], options=opts(lora=8))
    elif name == "layers2":
        dist(layers=2)
    elif name == "neurons50":
        dist(neurons=0.5)
    elif name == "neurons50-init":
        dist(neurons=0.5, options=opts(steps=0))
    else:
        sys.exit(f"unknown variant {name!r} (known: {', '.join(ALL)})")
    return dst, round(time.perf_counter() - t0, 1)


def measure(argv):
    """benchmarks/quant.py's row for each model directory given."""
    p = argparse.ArgumentParser(prog="distill.py measure")
    p.add_argument("models", nargs="+")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=0,
                   help="tokens of quant.py's decode-path perplexity (default 0: skip)")
    p.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import quant  # benchmarks/quant.py: the same measurements as the quantization rows

    import edgellm
    from edgellm import evaluate

    text = evaluate.read_text(evaluate.heldout_text_path())
    for d in a.models:
        m = edgellm.load(d)
        r = evaluate.perplexity(m, text, max_tokens=a.max_tokens)
        ms = quant.decode_cpu_ms(m)
        dppl = quant.decode_ppl(m, text, a.decode_tokens) if a.decode_tokens else None
        size, per_tok = quant.weight_bytes(d)
        row = {"model": os.path.abspath(d), "n_layers": m.config.n_layers,
               "d_ff": m.config.d_ff, "perplexity": round(r["perplexity"], 3),
               "decode_path_ppl": None if dppl is None else round(dppl, 3),
               "size_MB": round(size / 1e6, 2), "bytes_per_token_MB": round(per_tok / 1e6, 2),
               "decode_cpu_ms": round(ms, 2), "eval_tokens": r["tokens"]}
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del m


def main():
    if sys.argv[1:2] == ["measure"]:
        return measure(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--text", required=True, help="training text")
    p.add_argument("--eval-text", required=True, help="held-out text for perplexity")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(ALL))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="training text tokens used")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quant", default="int8")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from edgellm.converters import recipe
    from edgellm.evaluate import read_text
    from edgellm.runtime import format

    os.makedirs(a.out, exist_ok=True)
    s = {"report": True, "eval_ctx": a.ctx, "eval_tokens": a.eval_tokens,
         "decode_tokens": a.decode_tokens}
    eval_text = read_text(a.eval_text)
    rows = []
    for name in a.variants.split(","):
        dst, seconds = build(name, a, a.out)
        row = {"variant": name, "build_seconds": seconds, **recipe.measure(dst, s, eval_text)}
        m, _ = format.read_manifest(dst)
        d = (m.get("provenance") or {}).get("distill")
        if d:
            row["train_heldout_before"] = d["heldout_before"]
            row["train_heldout_after"] = d["heldout_after"]
            row["kept_layers"] = d.get("kept_layers")
            row["distill_seconds"] = d["seconds"]
        lm = (m.get("provenance") or {}).get("layer_map")
        if lm:
            row["layer_map"] = lm
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    base = next((r["perplexity"] for r in rows if r["variant"] == "base"), None)
    print("| variant | layers | d_ff | size MB | perplexity | MB read/token | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f" ({100 * (r['perplexity'] / base - 1):+.1f}%)" if base else ""
        print(f"| {r['variant']} | {r['n_layers']} | {r['d_ff']} | {r['size_bytes'] / 1e6:.2f} | "
              f"{r['perplexity']:.2f}{rel} | {r['bytes_per_token'] / 1e6:.2f} | "
              f"{r['decode_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
