"""Size versus perplexity of compressed models (docs/compression.png, docs/COMPRESSION.md).

    python benchmarks/compression_plot.py ROWS.jsonl... [-o docs/compression.png]

Each input line is one measured model, as benchmarks/quant.py --json writes them:
{"source": "demo" | "smollm2" | ..., "variant": "int4 GPTQ", "size_MB": 78.4, "perplexity": 48.1}
(other keys ignored; "ppl" is accepted for "perplexity", "size_mb" for "size_MB"). One panel per
source, size on the x axis, perplexity (a log axis when it spans more than 3x), each point labelled with its variant; a
later line for the same (source, variant) replaces an earlier one. Needs matplotlib (the bench
extra).
"""

import argparse
import json
import sys


def read_rows(paths):
    rows = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    key = (str(r["source"]), str(r["variant"]))
                    size = float(r.get("size_MB", r.get("size_mb")))
                    ppl = float(r.get("perplexity", r.get("ppl")))
                except (ValueError, KeyError, TypeError) as e:
                    sys.exit(f"{p}:{n}: not a row with source, variant, size_MB, perplexity ({e})")
                rows[key] = (size, ppl)
    return rows


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sources = sorted({s for s, _ in rows})
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 4.2), squeeze=False)
    for ax, src in zip(axes[0], sources):
        pts = sorted((*rows[(s, v)], v) for s, v in rows if s == src)
        seen = {}
        for size, ppl, v in pts:
            k = seen[round(size, 1)] = seen.get(round(size, 1), -1) + 1  # same size: stack labels
            ax.scatter(size, ppl, s=18)
            ax.annotate(v, (size, ppl), fontsize=7, xytext=(4, 2 + 9 * k),
                        textcoords="offset points")
        ax.set_xscale("log")
        ppls = [p for _, p, _ in pts]
        logy = max(ppls) > 3 * min(ppls)  # a narrow range reads better on a linear axis
        if logy:
            ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis) if logy else (ax.xaxis,):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("perplexity (held-out text)")
        ax.set_title(src, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("rows", nargs="+", help="JSON-lines files of measured rows")
    p.add_argument("-o", "--output", default="docs/compression.png")
    a = p.parse_args()
    rows = read_rows(a.rows)
    if not rows:
        sys.exit("no rows")
    try:
        print(plot(rows, a.output))
    except ImportError:
        sys.exit("matplotlib is needed for the plot (pip install edgellm[bench])")


if __name__ == "__main__":
    main()
