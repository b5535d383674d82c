"""Command-line pieces for running under a DRAM budget: options, `edgellm plan`, flash stats."""

import json
import sys

from .runtime.errors import EdgeLLMError


def add_stream_args(p):
    g = p.add_argument_group("DRAM budget and flash streaming (docs/INTERNALS.md, Streaming)")
    g.add_argument("--dram-budget", default=None, metavar="SIZE",
                   help="memory for the model, e.g. 800MB, 1.5GB, 512MiB; weights beyond it "
                   "stream from flash")
    g.add_argument("--mode", choices=["window", "dense", "naive"], default=None,
                   help="window: only predicted neurons, recently used ones cached (default when "
                   "the model has predictors); dense: every neuron, exact; naive: every FFN row "
                   "read every token (baseline)")
    g.add_argument("--window", type=int, default=None, metavar="K",
                   help="tokens a neuron stays cached after its last use (default 5)")
    g.add_argument("--io-threads", type=int, default=None,
                   help="parallel flash reads (default: up to 32, their memory at most 1/8 "
                   "of the budget)")
    g.add_argument("--cold", action="store_true", help="drop read pages from the page cache "
                   "(measure the device, not the cache)")
    g.add_argument("--stats-json", default=None, metavar="FILE",
                   help="write flash and speed statistics as JSON")


def stream_from_args(a):
    """Model.load keywords from the options (none of them: the plain mapped runtime)."""
    out = {}
    if getattr(a, "dram_budget", None) is not None or getattr(a, "mode", None) is not None:
        out = {"dram_budget": a.dram_budget, "mode": a.mode, "window": a.window,
               "io_threads": a.io_threads, "cold": a.cold}
    return out


def report(model, a, per_token=False, show=None):
    """--stats (or show=True): flash figures per token and in total; --stats-json FILE: the
    same as JSON."""
    from .model import stats_summary

    st = model.last_stats
    f = dict(st.get("flash") or {})
    s = stats_summary(st)
    f.setdefault("tokens", st.get("generated_tokens", 0))
    f.setdefault("tokens_per_s", s["decode_tokens_per_s"])
    f["generated_tokens"] = st.get("generated_tokens", 0)
    f["decode_tokens_per_s"] = s["decode_tokens_per_s"]
    f["prefill_tokens_per_s"] = s["prefill_tokens_per_s"]
    if "peak_rss_bytes" not in f:
        import resource

        f["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        f["dram_budget_bytes"] = None
    if show is None:
        show = getattr(a, "stats", False)
    if show and st.get("flash"):
        print(text(f, per_token), file=sys.stderr)
    if getattr(a, "stats_json", None):
        with open(a.stats_json, "w") as out:
            json.dump(f, out, indent=2)


def text(f, per_token=False):
    from .runtime.plan import human

    lines = []
    if per_token:
        lines.append("step tokens   bytes read  loaded  active  hit    io ms  mem ms  compute ms")
        for i, s in enumerate(f["per_step"]):
            hit = f"{s['hits'] / s['neurons_active']:.2f}" if s["neurons_active"] else "  - "
            lines.append(f"{i:4d} {s['tokens']:6d} {s['bytes_read']:12d} {s['neurons_loaded']:7d} "
                         f"{s['neurons_active']:7d} {hit:5} {s['io_s'] * 1e3:8.2f} "
                         f"{s['mem_s'] * 1e3:7.2f} {s['compute_s'] * 1e3:11.2f}")
    hit = f"{f['hit_rate']:.3f}" if f.get("hit_rate") is not None else "-"
    lines += [
        f"flash      mode {f['mode']}, budget {human(f['dram_budget_bytes'])}, allocated "
        f"{human(f['allocated_bytes'])}, peak RSS {human(f['peak_rss_bytes'])}",
        f"read       {human(f['bytes_read'])} in {f['reads']} reads; per decode token "
        f"{human(f['bytes_read_per_token'])}, {f['neurons_loaded_per_token']:.0f} neurons "
        f"loaded, hit rate {hit}",
        f"time       io {f['io_s'] * 1e3:.1f} ms, memory management {f['mem_s'] * 1e3:.1f} ms, "
        f"compute {f['compute_s'] * 1e3:.1f} ms",
    ]
    return "\n".join(lines)


def cmd_plan(a):
    from .runtime import format
    from .runtime.reader import Reader
    from .runtime.streaming import open_stream

    manifest, cfg = format.read_manifest(a.model)
    n_ctx = a.ctx or min(cfg.max_context, 4096)
    stream = open_stream(Reader(a.model, manifest), cfg, a.dram_budget, a.mode, n_ctx=n_ctx,
                         window=a.window, plan_only=True)
    if a.json:
        print(json.dumps(stream.to_dict(), indent=2))
    else:
        print(stream.table())


def add_plan_parser(sub):
    p = sub.add_parser("plan", help="what stays in DRAM and what streams, for a budget",
                       description="Print the plan for a DRAM budget: bytes per part, resident "
                       "or streamed, expected bytes read per token; refuses a budget that cannot "
                       "work and says the minimum.")
    p.add_argument("model", help="edgellm model directory")
    p.add_argument("--dram-budget", required=True, metavar="SIZE", help="e.g. 800MB, 512MiB")
    p.add_argument("--mode", choices=["window", "dense", "naive"], default=None)
    p.add_argument("--window", type=int, default=None, metavar="K")
    p.add_argument("--ctx", type=int, default=None, help="context length (KV cache size)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)


def add_bench_parser(sub):
    from .cli import DEMO_PROMPT, add_kv_args, add_load_args

    b = sub.add_parser("bench", help="prefill and decode speed, and flash reads under a DRAM "
                       "budget",
                       description="Load a model, compile its kernels, prefill a short prompt "
                       "and generate N tokens greedily; print load time, prefill and decode "
                       "tokens/s and, under --dram-budget or --mode, the flash statistics "
                       "(bytes read per token, neurons loaded, cache hit rate, time split).")
    b.add_argument("model", help="edgellm model directory")
    b.add_argument("-p", "--prompt", default=DEMO_PROMPT, help=f"default {DEMO_PROMPT!r}")
    b.add_argument("-n", type=int, default=64, help="tokens to generate (default 64)")
    b.add_argument("--ctx", type=int, default=None, help="context length (default: model's, "
                   "capped at 4096)")
    b.add_argument("--threads", type=int, default=None, help="threads (default: one per core)")
    b.add_argument("--stats", action="store_true", help="also print the flash figures of every "
                   "step")
    add_load_args(b)
    add_kv_args(b)
    add_stream_args(b)
    b.set_defaults(func=cmd_bench)


def cmd_bench(a):
    """edgellm bench: `edgellm run --stats` without the text, greedy, flash figures always."""
    import time

    from . import load
    from .cli import kv_from_args, load_from_args, print_stats, warm_up
    from .sampling import SamplingParams

    if a.n < 1:
        raise EdgeLLMError(f"-n must be at least 1, got {a.n}")
    t0 = time.perf_counter()
    model = load(a.model, n_ctx=a.ctx, threads=a.threads, **kv_from_args(a),
                 **load_from_args(a), **stream_from_args(a))
    load_s = time.perf_counter() - t0
    warm = warm_up(model)
    print(f"model      {a.model}" + (f" (compiled kernels in {warm:.1f} s)" if warm > 1.0 else ""),
          file=sys.stderr)
    model.complete(a.prompt, max_tokens=a.n, params=SamplingParams(temperature=0.0, repetition_penalty=1.0))
    print_stats(model.last_stats, load_s, model.weights)
    report(model, a, per_token=a.stats, show=True)
