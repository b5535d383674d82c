"""Size versus perplexity of compressed models (docs/compression.png, docs/COMPRESSION.md).

    python benchmarks/compression_plot.py ROWS.jsonl... [-o docs/compression.png]

Each input line is one measured model, as benchmarks/quant.py --json writes them:
{"source": "demo" | "smollm2" | ..., "variant": "int4 GPTQ", "size_MB": 78.4, "perplexity": 48.1}
(other keys ignored; "ppl" is accepted for "perplexity", "size_mb" for "size_MB"). One panel per
source (rows measured against another reference belong to another source name), size on the x
axis, perplexity (a log axis when it spans more than 3x), each point labelled with its variant
and coloured by its family (quantization, weight pruning, low-rank, layers/distillation: from
the variant's name); a later line for the same (source, variant) replaces an earlier one. Needs
matplotlib (the bench extra).
"""

import argparse
import json
import sys

# family -> (words in a variant name, colour); the first family whose word matches, else the last
FAMILIES = (("weight pruning", ("magnitude", "wanda", "sparsegpt"), "tab:red"),
            ("low-rank", ("low-rank",), "tab:purple"),
            ("layers, distillation", ("drop", "heal", "student", "distil", "neurons"), "tab:green"),
            ("quantization", (), "tab:blue"))


def family(variant):
    v = variant.lower()
    return next((f for f in FAMILIES if any(w in v for w in f[1])), FAMILIES[-1])


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


def _label_groups(pts, logy, span):
    """Points of the same size whose perplexities are within 3% of the axis span share one
    label ("int4 RTN / int4 AWQ"), so that labels do not print over each other."""
    import math

    def y(p):
        return math.log(p) if logy else p

    tol = 0.03 * (math.log(span) if logy else span) if span > (1 if logy else 0) else 0
    groups = []
    for size, ppl, v in sorted(pts, key=lambda p: (round(p[0], 1), p[1])):
        g = groups[-1] if groups else None
        if g and round(g[0], 1) == round(size, 1) and abs(y(ppl) - y(g[3])) <= tol:
            g[2].append(v)
            g[3] = ppl
        else:
            groups.append([size, ppl, [v], ppl])
    return [(s, p, names) for s, p, names, _ in groups]


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sources = sorted({s for s, _ in rows})
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 4.2), squeeze=False)
    for ax, src in zip(axes[0], sources):
        pts = sorted((*rows[(s, v)], v) for s, v in rows if s == src)
        sizes, ppls = [p[0] for p in pts], [p[1] for p in pts]
        logx = max(sizes) > 3 * min(sizes)  # a narrow range reads better on a linear axis
        logy = max(ppls) > 3 * min(ppls)
        for size, ppl, v in pts:
            ax.scatter(size, ppl, s=18, color=family(v)[2])
        for size, ppl, names in _label_groups(pts, logy, max(ppls) / min(ppls)
                                              if logy else max(ppls) - min(ppls)):
            ax.annotate(" / ".join(names), (size, ppl), fontsize=7, xytext=(4, -3),
                        textcoords="offset points")
        for axis, log in ((ax.xaxis, logx), (ax.yaxis, logy)):
            if log:
                (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
                axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("perplexity (held-out text)")
        ax.set_title(src, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    used = [f for f in FAMILIES if any(family(v) is f for _, v in rows)]
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=name)
               for name, _, c in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
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
