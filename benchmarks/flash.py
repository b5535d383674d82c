"""Flash streaming benchmark: tokens/s, bytes read per token and peak memory against DRAM budget.

For each budget (a fraction of the model's size on disk) and each engine, one fresh process runs
a greedy generation and reports JSON:

    window     edgellm --mode window (the model's predictors; --oracle: the true active set of a
               ReLU model, which reads every gate row outside the counts: for cache studies only)
    dense      edgellm --mode dense (every neuron, exact, streams what does not fit)
    naive      edgellm --mode naive (every FFN row read every token: the paper's baseline)
    llama.cpp  llama-cpp-python with mmap on the same model as GGUF (--gguf FILE)

--cgroup runs each process in a memory cgroup of budget + baseline bytes (page cache counts;
created under this process's own cgroup, needs root) so the budget is enforced, not assumed.
--cold drops the model's pages from the page cache before each run and edgellm reads with
fadvise(DONTNEED). Timings on a shared machine are indicative; compare ratios within one run.

    python benchmarks/flash.py MODEL --fractions 0.5 0.25 --engines window naive --oracle \
        [--gguf MODEL.gguf] [--cgroup] [--cold] [--json out.json] [--plot docs/flash.png]
"""

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])
if args["engine"] == "llama.cpp":
    from llama_cpp import Llama
    t = time.perf_counter()
    llm = Llama(args["gguf"], n_ctx=args["ctx"], n_threads=args["threads"], use_mmap=True,
                verbose=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    out = llm(args["prompt"], max_tokens=args["n"], temperature=0.0)
    dt = time.perf_counter() - t
    n = out["usage"]["completion_tokens"]
    res = {"tokens": n, "tokens_per_s": n / dt, "bytes_read_per_token": None}
else:
    import edgellm
    m = edgellm.load(args["model"], n_ctx=args["ctx"], threads=args["threads"],
                     dram_budget=args["budget"], mode=args["engine"],
                     oracle=args["oracle"] and args["engine"] == "window",
                     io_threads=args["io_threads"], cold=args["cold"])
    m.warmup()
    m.complete(args["prompt"], max_tokens=args["n"], temperature=0)
    f = m.last_stats["flash"]  # per-token figures over the decode steps
    res = {k: f[k] for k in ("tokens", "tokens_per_s", "bytes_read_per_token",
                             "neurons_loaded_per_token", "neurons_active_per_token", "hit_rate",
                             "io_s", "mem_s", "compute_s", "allocated_bytes", "plan_bytes")}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        res["peak_rss_bytes"] = int(line.split()[1]) * 1024
res["io_read_bytes"] = None
try:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes"):
            res["io_read_bytes"] = int(line.split()[1])
except OSError:
    pass
print(json.dumps(res))
"""


def model_bytes(path):
    m = json.load(open(os.path.join(path, "manifest.json")))
    return sum(c["size"] for c in m["chunks"])


def drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model_files(model, gguf):
    out = [os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors")]
    return out + ([gguf] if gguf else [])


class Cgroup:
    """A memory cgroup under this process's own, limit in bytes (cgroup v1 memory controller,
    as on these machines, or cgroup v2)."""

    def __init__(self, name, limit):
        lines = open("/proc/self/cgroup").read().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if ln.split(":")[1] == "memory"]
        if v1:
            self.path = "/sys/fs/cgroup/memory" + v1[0].rstrip("/") + "/" + name
            files = {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes",
                     "peak": "memory.max_usage_in_bytes"}
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            own = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")][0]
            self.path = "/sys/fs/cgroup" + own.rstrip("/") + "/" + name
            files = {"limit": "memory.max", "swap": "memory.swap.max", "peak": "memory.peak"}
        else:
            raise SystemExit("no memory cgroup controller found")
        self.files = files
        os.mkdir(self.path)
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

    def peak(self):
        try:
            return int(open(os.path.join(self.path, self.files["peak"])).read())
        except OSError:
            return None

    def remove(self):
        try:
            os.rmdir(self.path)
        except OSError as e:
            print(f"could not remove cgroup {self.path}: {e}", file=sys.stderr)


def run_one(args, engine, budget, baseline):
    cfg = {"engine": engine, "model": args.model, "gguf": args.gguf, "budget": budget,
           "ctx": args.ctx, "threads": args.threads, "n": args.n, "prompt": args.prompt,
           "oracle": args.oracle, "io_threads": args.io_threads, "cold": args.cold}
    if args.cold:
        drop_cache(model_files(args.model, args.gguf))
    cg = None
    if args.cgroup:
        cg = Cgroup(f"edgellm-bench-{os.getpid()}-{engine.replace('.', '')}", budget + baseline)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                       text=True, preexec_fn=cg.enter if cg else None, timeout=args.timeout)
    res = {"engine": engine, "budget_bytes": budget, "wall_s": time.perf_counter() - t}
    if cg:
        res["cgroup_limit_bytes"] = budget + baseline
        res["cgroup_peak_bytes"] = cg.peak()
        cg.remove()
    if r.returncode != 0:
        res["error"] = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        if r.returncode < 0:
            res["error"] = f"killed by signal {-r.returncode} (out of memory?)"
        return res
    res.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return res


def measure_baseline(args):
    """Peak RSS of a process that imports edgellm and runs the demo model's kernels: the process's
    own memory, outside the budget (../shared/DESIGN.md, The runtime)."""
    code = ("import edgellm, resource\nfrom edgellm.cli import demo_model_path\n"
            "m = edgellm.load(demo_model_path()); m.warmup()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1])


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in sorted({r["engine"] for r in rows}):
        rr = sorted((r for r in rows if r["engine"] == engine and "error" not in r),
                    key=lambda r: r["budget_bytes"])
        x = [r["budget_bytes"] / 1e6 for r in rr]
        a.plot(x, [r["tokens_per_s"] for r in rr], "o-", label=engine)
        b.plot(x, [(r.get("bytes_read_per_token") or 0) / 1e6 for r in rr], "o-", label=engine)
    a.set_xlabel("DRAM budget (MB)"), a.set_ylabel("tokens/s"), a.legend()
    b.set_xlabel("DRAM budget (MB)"), b.set_ylabel("MB read per token"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--engines", nargs="+", default=["window", "naive", "llama.cpp"],
                   choices=["window", "dense", "naive", "llama.cpp"])
    p.add_argument("--oracle", action="store_true", help="window mode with the true active set")
    p.add_argument("--gguf", default=None, help="the same model as GGUF (for llama.cpp)")
    p.add_argument("--cgroup", action="store_true", help="enforce budget + baseline in a cgroup")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--prompt", default="It is a truth universally acknowledged")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    size = model_bytes(args.model)
    baseline = measure_baseline(args)
    rows = []
    print(f"model {size / 1e6:.2f} MB; process baseline {baseline / 1e6:.1f} MB (outside the "
          f"budget)", file=sys.stderr)
    for frac in args.fractions:
        budget = int(size * frac)
        for engine in args.engines:
            if engine == "llama.cpp" and not args.gguf:
                continue
            r = run_one(args, engine, budget, baseline)
            r["fraction"] = frac
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "per_step"}), flush=True)
    print(f"\n{'budget':>10} {'engine':10} {'tok/s':>8} {'MB read/tok':>12} {'peak RSS MB':>12} "
          f"{'cgroup peak MB':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['budget_bytes'] / 1e6:10.2f} {r['engine']:10} error: {r['error']}")
            continue
        rb = r.get("bytes_read_per_token")
        cg = r.get("cgroup_peak_bytes")
        print(f"{r['budget_bytes'] / 1e6:10.2f} {r['engine']:10} {r['tokens_per_s']:8.1f} "
              f"{rb / 1e6 if rb is not None else float('nan'):12.3f} "
              f"{r['peak_rss_bytes'] / 1e6:12.1f} "
              f"{cg / 1e6 if cg else float('nan'):15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "model_bytes": size, "baseline_bytes": baseline,
                       "rows": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
