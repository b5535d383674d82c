"""Prefill tokens/s with the integer GEMM (runtime/kernels/qgemm.py) and without it (the float
tiles + BLAS, EDGELLM_NO_GEMM=1's switch), side by side in one process: each repeat times the
float path, then the GEMM, on the same prompt (a script, not a test; timings are never asserted).

    python benchmarks/prefill_gemm.py MODEL [MODEL ...] --prompt 128,512 --repeats 3 --clock cpu

The CPU's switches pick other tiles on this machine (docs/PERFORMANCE.md): EDGELLM_NO_AVX512=1
the 256-bit vpdpbusd ones; an AVX2 CPU as Numba's target (NUMBA_CPU_NAME=haswell
NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c,... with OPENBLAS_CORETYPE=Haswell for BLAS and a
NUMBA_CACHE_DIR of its own) vpmaddubsw + vpmaddwd.
"""

import argparse
import os
import statistics
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # BLAS reads these at import; --threads sets Numba's

import numpy as np  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="edgellm model directories")
    ap.add_argument("--prompt", default="128,512", help="prompt lengths (tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="process CPU time (on a shared machine, with --threads 1) or wall time")
    args = ap.parse_args(argv)
    import edgellm
    from edgellm.runtime.kernels import qgemm, simd

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    lengths = [int(t) for t in args.prompt.split(",") if t.strip()]
    print(f"threads {args.threads}, clock {args.clock}, medians of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}; kernels {simd.flavour()}, GEMM tiles "
          f"{qgemm.RM} x {qgemm.RN} of {8 * qgemm.WIDTH} bits"
          + ("" if qgemm.FASTER else " (measured here, although use_gemm does not take them)"))
    if not qgemm.TILES:
        print("the integer GEMM does not run on this CPU")
        return 1
    qgemm.FASTER = True  # measure the tiles wherever they run
    for path in args.models:
        m = edgellm.load(path, n_ctx=max(lengths) + 1, threads=args.threads)
        rt = m.runtime
        vocab = rt.cfg.vocab_size
        rng = np.random.default_rng(0)
        for T in lengths:
            ids = rng.integers(min(100, vocab - 1), vocab, T)
            for on in (False, True):  # compile and warm both paths
                qgemm.ENABLED = on
                rt.reset()
                rt.forward(ids[:32])
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for on in (False, True):
                    qgemm.ENABLED = on
                    rt.reset()
                    t0 = clock()
                    rt.forward(ids)
                    runs[on].append(T / (clock() - t0))
            qgemm.ENABLED = True
            a, b = statistics.median(runs[False]), statistics.median(runs[True])
            print(f"{os.path.basename(os.path.normpath(path))}  prompt {T}: float tiles + BLAS "
                  f"{a:.1f} tok/s, integer GEMM {b:.1f} tok/s, {b / a:.2f}x  (runs "
                  f"{[round(x, 1) for x in runs[False]]} / {[round(x, 1) for x in runs[True]]}; "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
