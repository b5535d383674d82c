"""Flash streaming benchmark: tokens/s, bytes read per token and peak memory against DRAM budget.

For each budget (a fraction of the model's size on disk) and each engine, one fresh process
prefills a short prompt and generates -n tokens greedily, and reports JSON:

    window     edgellm --mode window (the model's predictors; --oracle: the true active set of a
               ReLU model, which reads every gate row outside the counts: for cache studies only)
    dense      edgellm --mode dense (every neuron, exact, streams what does not fit)
    naive      edgellm --mode naive (every FFN row read every token: the paper's baseline)
    llama.cpp  llama-cpp-python with mmap on the same model as GGUF (--gguf FILE, or --gguf auto:
               exported next to the JSON output by `edgellm export`)

--cgroup runs each process in its own memory cgroup (cgroup v1 or v2, created under this
process's cgroup; needs root) limited to budget + that engine's baseline: the memory the cgroup
is charged for by a process of that engine that has loaded its code and no model weights
(edgellm: interpreter, NumPy, Numba and the compiled kernels; llama.cpp: interpreter and
libllama). Page cache counts against the limit, so llama.cpp's mapped weights compete with its
own memory there, as on a device with that much DRAM. The cgroup's peak (max_usage) minus the
baseline is the engine's peak memory against the budget.
--cold drops the model's pages from the page cache before each run and edgellm reads with
fadvise(DONTNEED). Bytes read per token: edgellm's own count (decode steps); "dev MB/tok" is what
the kernel read from the device for the whole process (/proc/self/io read_bytes during the
generation, per generated token), the only figure there is for llama.cpp.
Timings on a shared machine are indicative; compare ratios within one run.

    python benchmarks/flash.py MODEL --fractions 0.5 0.25 --gguf auto --cgroup --cold \
        --json out.json --plot docs/flash.png

llama.cpp has no gated-ReLU llama architecture (edgellm export refuses a ReLU model); for a ReLU
model --gguf auto writes the same tensors as a llama GGUF (which llama.cpp computes with SiLU):
the same bytes and the same amount of work, other outputs. Speed, reads and memory compare;
text does not.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])

def io_read():
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes"):
                return int(line.split()[1])
    except OSError:
        return None

def cgroup_usage():
    for ln in open("/proc/self/cgroup").read().splitlines():
        _, ctrl, path = ln.split(":", 2)
        if ctrl == "memory":
            return int(open("/sys/fs/cgroup/memory" + path + "/memory.usage_in_bytes").read())
        if ctrl == "" and os.path.exists("/sys/fs/cgroup" + path + "/memory.current"):
            return int(open("/sys/fs/cgroup" + path + "/memory.current").read())
    return None

res = {}
if args["engine"] == "llama.cpp":
    sys.path.insert(0, args["benchmarks"])
    if args.get("baseline"):  # the engine's code, no model
        import llama_cpp
        llama_cpp.llama_backend_init()
        print(json.dumps({"cgroup_usage": cgroup_usage()}))
        sys.exit(0)
    from engines import Llama
    import numpy as np
    t = time.perf_counter()
    llm = Llama(args["gguf"], n_ctx=args["ctx"], threads=args["threads"])
    res["load_s"] = time.perf_counter() - t
    ids = llm.llm.tokenize(args["prompt"].encode(), add_bos=True)
    io0 = io_read()
    t = time.perf_counter()
    logits = llm.prefill(ids)
    t1 = time.perf_counter()
    for _ in range(args["n"] - 1):
        logits = llm.step(int(np.argmax(logits)))
    t2 = time.perf_counter()
    io1 = io_read()
    n = args["n"]
    res.update({"tokens": n - 1, "tokens_per_s": (n - 1) / (t2 - t1),
                "prefill_tokens_per_s": len(ids) / (t1 - t), "bytes_read_per_token": None})
else:
    import gc
    import edgellm
    if args.get("baseline"):  # the engine's code and kernels for this mode, then no model
        from edgellm.runtime import format, plan
        man, cfg = format.read_manifest(args["model"])
        low = plan.minimum_budget(man, cfg, args["engine"], n_ctx=args["ctx"])
        m = edgellm.load(args["model"], n_ctx=args["ctx"], threads=args["threads"],
                         dram_budget=max(low, args["budget"]), mode=args["engine"], cold=True)
        m.warmup()
        m.complete(args["prompt"], max_tokens=8, temperature=0, repetition_penalty=1.0)
        m.stream.close(); del m; gc.collect()  # its arrays freed; its pages were never cached
        print(json.dumps({"cgroup_usage": cgroup_usage()}))
        sys.exit(0)
    t = time.perf_counter()
    m = edgellm.load(args["model"], n_ctx=args["ctx"], threads=args["threads"],
                     dram_budget=args["budget"], mode=args["engine"],
                     oracle=args["oracle"] and args["engine"] == "window",
                     io_threads=args["io_threads"], cold=args["cold"])
    res["load_s"] = time.perf_counter() - t
    m.warmup()
    io0 = io_read()
    m.complete(args["prompt"], max_tokens=args["n"], temperature=0, repetition_penalty=1.0)
    io1 = io_read()
    f = m.last_stats["flash"]  # per-token figures over the decode steps
    res.update({k: f[k] for k in ("tokens", "tokens_per_s", "bytes_read_per_token",
                                  "neurons_loaded_per_token", "neurons_active_per_token",
                                  "hit_rate", "io_s", "mem_s", "compute_s", "allocated_bytes",
                                  "plan_bytes")})
    dec = f["per_step"][f["decode_from_step"]:]
    res["reads_per_token"] = sum(x["reads"] for x in dec) / max(1, sum(x["tokens"] for x in dec))
    res["compute_s_per_token"] = sum(x["compute_s"] for x in dec) / max(1, len(dec))
    s = m.last_stats
    res["prefill_tokens_per_s"] = s["prompt_tokens"] / s["prefill_s"]
    n = s["generated_tokens"]
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        res["peak_rss_bytes"] = int(line.split()[1]) * 1024
res["dev_bytes_per_token"] = (io1 - io0) / n if io0 is not None else None
print(json.dumps(res))
"""


def model_bytes(path):
    m = json.load(open(os.path.join(path, "manifest.json")))
    return sum(c["size"] for c in m["chunks"])


def drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a model just written) are not dropped, only clean ones
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model_files(model, gguf):
    out = [os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors")]
    return out + ([gguf] if gguf else [])


def export_gguf(model, out):
    """The model as GGUF for llama.cpp (`edgellm export --to gguf`); a ReLU llama is written as
    a llama GGUF, see the module docstring."""
    from edgellm import export as ex

    check = ex._check_gguf_supported

    def relu_as_silu(m):
        from dataclasses import replace

        cfg = m.config
        if cfg.activation == "relu":
            m.config = replace(cfg, activation="silu")
        try:
            check(m)
        finally:
            m.config = cfg

    ex._check_gguf_supported = relu_as_silu
    try:
        ex.export(model, out, to="gguf", overwrite=True, progress=False)
    finally:
        ex._check_gguf_supported = check
    return out


class Cgroup:
    """A memory cgroup under this process's own, limit in bytes (cgroup v1 memory controller,
    as on these machines, or cgroup v2)."""

    def __init__(self, name, limit=None):
        lines = open("/proc/self/cgroup").read().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if ln.split(":")[1] == "memory"]
        if v1:
            self.path = "/sys/fs/cgroup/memory" + v1[0].rstrip("/") + "/" + name
            files = {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes",
                     "peak": "memory.max_usage_in_bytes", "oom": "memory.failcnt"}
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            own = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")][0]
            self.path = "/sys/fs/cgroup" + own.rstrip("/") + "/" + name
            files = {"limit": "memory.max", "swap": "memory.swap.max", "peak": "memory.peak",
                     "oom": "memory.events"}
        else:
            raise SystemExit("no memory cgroup controller found (--cgroup)")
        self.files = files
        os.mkdir(self.path)
        if limit is not None:
            self._write("limit", limit)
            self._write("swap", limit if v1 else 0)  # no swap: v1 counts memory + swap

    def _write(self, what, value):
        try:
            with open(os.path.join(self.path, self.files[what]), "w") as f:
                f.write(str(value))
        except OSError:
            if what != "swap":  # swap accounting may be off; the memory limit is what matters
                raise

    def enter(self):  # in the child, before exec
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def read(self, what):
        try:
            return open(os.path.join(self.path, self.files[what])).read().strip()
        except OSError:
            return None

    def peak(self):
        v = self.read("peak")
        return int(v) if v is not None else None

    def remove(self):
        for _ in range(50):  # the exited child may take a moment to leave
            try:
                os.rmdir(self.path)
                return
            except OSError as e:
                err = e
                time.sleep(0.1)
        print(f"could not remove cgroup {self.path}: {err}", file=sys.stderr)


def child(args, cfg, cg=None, timeout=None):
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                          text=True, preexec_fn=cg.enter if cg else None, timeout=timeout)


def measure_baseline(args, engine, budget):
    """What the cgroup is charged for by a process of this engine with its code loaded and no
    model weights. edgellm (per mode: window loads more code than naive): the model run for a
    few tokens in that mode at `budget` (or the mode's minimum), then closed and dropped, all
    reads cold so that no page stays cached. None without --cgroup."""
    if not args.cgroup:
        return None
    out = []
    for k in range(2):  # the first run is also charged for library pages it reads first
        cg = Cgroup(f"edgellm-bench-{os.getpid()}-base{k}")
        try:
            r = child(args, {"engine": engine, "baseline": True, "benchmarks": HERE,
                             "model": args.model, "ctx": args.ctx, "threads": args.threads,
                             "budget": budget, "prompt": args.prompt}, cg)
            if r.returncode != 0:
                raise SystemExit(f"baseline of {engine} failed: {r.stderr.strip()[-2000:]}")
            out.append(json.loads(r.stdout.strip().splitlines()[-1])["cgroup_usage"])
        finally:
            cg.remove()
    return min(out)


def run_one(args, engine, budget, baseline):
    cfg = {"engine": engine, "model": args.model, "gguf": args.gguf, "budget": budget,
           "ctx": args.ctx, "threads": args.threads, "n": args.n, "prompt": args.prompt,
           "oracle": args.oracle, "io_threads": args.io_threads, "cold": args.cold,
           "benchmarks": HERE}
    if args.cold:
        drop_cache(model_files(args.model, args.gguf))
    cg = None
    res = {"engine": engine, "budget_bytes": budget}
    if args.cgroup:
        cg = Cgroup(f"edgellm-bench-{os.getpid()}-{engine.replace('.', '')}", budget + baseline)
        res["baseline_bytes"] = baseline
        res["cgroup_limit_bytes"] = budget + baseline
    t = time.perf_counter()
    try:
        r = child(args, cfg, cg, args.timeout)
    finally:
        res["wall_s"] = time.perf_counter() - t
        if cg:
            res["cgroup_peak_bytes"] = cg.peak()
            res["peak_over_baseline_bytes"] = cg.peak() - baseline
            cg.remove()
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or [f"exit {r.returncode}"]
        res["error"] = lines[-1]
        if r.returncode < 0:
            res["error"] = f"killed by signal {-r.returncode} (out of memory in the cgroup?)"
        return res
    res.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return res


def medians(runs):
    """One row per (budget, engine): the median of each numeric figure over its runs that did
    not fail (tokens/s also as min and max), or the first error when all failed."""
    import statistics

    out = []
    keys = []
    for r in runs:
        if (r["budget_bytes"], r["engine"]) not in keys:
            keys.append((r["budget_bytes"], r["engine"]))
    for key in keys:
        group = [r for r in runs if (r["budget_bytes"], r["engine"]) == key]
        ok = [r for r in group if "error" not in r]
        if not ok:
            out.append(dict(group[0], runs=len(group), failed=len(group)))
            continue
        row = dict(ok[0])
        for k, v in ok[0].items():
            vals = [r.get(k) for r in ok]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    all(isinstance(x, (int, float)) for x in vals):
                row[k] = statistics.median(vals)
        for k in ("peak_over_baseline_bytes", "cgroup_peak_bytes", "peak_rss_bytes"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:  # memory: the worst run, not the median
                row[k] = max(vals)
        row["tokens_per_s_min"] = min(r["tokens_per_s"] for r in ok)
        row["tokens_per_s_max"] = max(r["tokens_per_s"] for r in ok)
        row["runs"], row["failed"] = len(group), len(group) - len(ok)
        out.append(row)
    return out


def plot(rows, size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in sorted({r["engine"] for r in rows}):
        rr = sorted((r for r in rows if r["engine"] == engine and "error" not in r),
                    key=lambda r: r["budget_bytes"])
        if not rr:
            continue
        x = [r["budget_bytes"] / 1e6 for r in rr]
        a.plot(x, [r["tokens_per_s"] for r in rr], "o-", label=engine)
        y = [(r.get("bytes_read_per_token") if r.get("bytes_read_per_token") is not None
              else r.get("dev_bytes_per_token") or 0) / 1e6 for r in rr]
        b.plot(x, y, "o-", label=engine + (" (device reads)" if engine == "llama.cpp" else ""))
    a.set_xlabel("DRAM budget (MB)"), a.set_ylabel("decode tokens/s"), a.legend()
    b.set_xlabel("DRAM budget (MB)"), b.set_ylabel("MB read from flash per token"), b.legend()
    a.set_yscale("log"), b.set_yscale("log")
    fig.suptitle(f"model {size / 1e6:.1f} MB on disk; cold cache, budget enforced by a memory "
                 "cgroup (indicative: shared machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Flash devices for the cost model (docs/PERFORMANCE.md, "Cost model", gives the sources):
# sequential read bandwidth (bytes/s) and 4 KiB random reads per second at queue depth.
DEVICES = {
    "Pi 5, A2 microSD (SDR104)": {"bw": 90e6, "iops": 5_000},
    "Pi 5, NVMe (PCIe 2.0 x1)": {"bw": 450e6, "iops": 100_000},
    "laptop NVMe (PCIe 4.0 x4)": {"bw": 7_000e6, "iops": 800_000},
}


def cost_model(rows):
    """Tokens/s a device's flash allows from the measured reads of each engine: a token needs
    max(bytes / bandwidth, reads / IOPS) seconds of I/O (reads overlap: the reader keeps up to
    32 in flight). Each read moves at least a 4 KiB page. Also shown with this machine's
    measured compute per token added (I/O not overlapped with compute: a lower bound)."""
    out = [f"{'budget MB':>9} {'engine':9} {'MB/tok':>7} {'reads/tok':>9}  "
           + "  ".join(f"{d[:26]:>26}" for d in DEVICES)]
    for r in rows:
        if "error" in r or r.get("bytes_read_per_token") is None:
            continue
        b, n = r["bytes_read_per_token"], r.get("reads_per_token") or 0
        b = max(b, n * 4096)
        cells = []
        for d in DEVICES.values():
            io = max(b / d["bw"], n / d["iops"])
            c = r.get("compute_s_per_token") or 0.0
            cells.append(f"{1 / io:9.1f} ({1 / (io + c):6.1f} w/ cpu)" if io else "-")
        out.append(f"{r['budget_bytes'] / 1e6:9.2f} {r['engine']:9} {b / 1e6:7.3f} {n:9.0f}  "
                   + "  ".join(f"{c:>26}" for c in cells))
    return "\n".join(out)


def table(rows):
    naive = {r["budget_bytes"]: r for r in rows if r["engine"] == "naive" and "error" not in r}
    out = [f"{'budget MB':>9} {'engine':9} {'tok/s':>7} {'x naive':>7} {'MB read/tok':>11} "
           f"{'% naive':>7} {'dev MB/tok':>10} {'peak MB':>8} {'limit MB':>8} {'alloc MB':>8} "
           f"{'reads/tok':>9} {'tok/s range':>13} runs"]
    for r in rows:
        mb = f"{r['budget_bytes'] / 1e6:9.2f}"
        if "error" in r:
            out.append(f"{mb} {r['engine']:9} {r['error'][:120]}")
            continue
        nv = naive.get(r["budget_bytes"])
        rb, dev = r.get("bytes_read_per_token"), r.get("dev_bytes_per_token")
        peak = r.get("peak_over_baseline_bytes")

        def f(v, scale=1e6, w=8, p=2):
            return f"{v / scale:{w}.{p}f}" if v is not None else f"{'-':>{w}}"

        out.append(
            f"{mb} {r['engine']:9} {r['tokens_per_s']:7.1f} "
            f"{r['tokens_per_s'] / nv['tokens_per_s'] if nv else float('nan'):7.2f} "
            f"{f(rb, w=11, p=3)} "
            f"{100 * rb / nv['bytes_read_per_token'] if nv and rb is not None else float('nan'):7.1f} "
            f"{f(dev, w=10, p=3)} {f(peak)} "
            f"{f(r['budget_bytes'])} {f(r.get('allocated_bytes'))} "
            f"{f(r.get('reads_per_token'), 1, 9, 0)} "
            f"{r.get('tokens_per_s_min', r['tokens_per_s']):6.1f}-"
            f"{r.get('tokens_per_s_max', r['tokens_per_s']):<6.1f} "
            f"{r.get('runs', 1) - r.get('failed', 0)}/{r.get('runs', 1)}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--engines", nargs="+", default=["window", "naive", "llama.cpp"],
                   choices=["window", "dense", "naive", "llama.cpp"])
    p.add_argument("--oracle", action="store_true", help="window mode with the true active set")
    p.add_argument("--gguf", default=None, help="the same model as GGUF (for llama.cpp); auto: "
                   "export it (next to --json, else in the current directory)")
    p.add_argument("--cgroup", action="store_true", help="enforce budget + baseline in a cgroup")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--ctx", type=int, default=128, help="context (KV cache) length, part of the "
                   "budget (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=None, help="default: the runtime's (32)")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="runs per engine and budget (engines "
                   "interleaved; llama.cpp once); the table shows medians and the tokens/s range")
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    args.model = os.path.abspath(args.model)
    size = model_bytes(args.model)
    if args.gguf == "auto" and "llama.cpp" in args.engines:
        out = os.path.join(os.path.dirname(os.path.abspath(args.json or "x")),
                           os.path.basename(args.model.rstrip("/")) + ".gguf")
        args.gguf = export_gguf(args.model, out)
    if args.gguf:
        args.gguf = os.path.abspath(args.gguf)
    engines = [e for e in args.engines if e != "llama.cpp" or args.gguf]
    baselines = {e: measure_baseline(args, e, int(size * max(args.fractions)))
                 for e in engines}
    print(f"model {size / 1e6:.2f} MB" + (f", GGUF {os.path.getsize(args.gguf) / 1e6:.2f} MB"
                                          if args.gguf else "")
          + "; baselines (outside the budget): "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in baselines.items() if v), file=sys.stderr)
    runs = []
    for frac in args.fractions:
        budget = int(size * frac)
        for rep in range(args.repeat):  # engines interleaved: each repeat sees similar load
            for engine in engines:
                if engine == "llama.cpp" and rep:  # minutes per run: once
                    continue
                r = run_one(args, engine, budget, baselines[engine])
                r["fraction"], r["repeat"] = frac, rep
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    rows = medians(runs)
    print(table(rows))
    print("\npredicted tokens/s from flash I/O alone (and with this machine's compute per token)")
    print(cost_model(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "model_bytes": size, "gguf": args.gguf,
                       "gguf_bytes": os.path.getsize(args.gguf) if args.gguf else None,
                       "baseline_bytes": baselines, "args": vars(args), "rows": rows,
                       "runs": runs}, f, indent=2)
    if args.plot:
        try:
            plot(rows, size, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
