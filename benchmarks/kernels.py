"""Decode matvec micro-benchmark on TinyLlama-1.1B shapes (not a test; timings are never asserted).

One token of TinyLlama-1.1B is 22 layers x 7 matrix-vector products: q, o 2048x2048; k, v
256x2048; gate, up 5632x2048; down 2048x5632 (154 in all). This times them per encoding and
thread count, each layer with its own weights (so nothing is served from cache), and prints
ms/token, the weight bytes read per second and the ratio to llama.cpp's whole token.

    python benchmarks/kernels.py                       # f16, int8, int4; 1 and 2 threads
    python benchmarks/kernels.py --enc int4 --threads 2 --kernels simd,portable --ffn
    python benchmarks/kernels.py --json out.json
    python benchmarks/kernels.py --enc int4 --kernels simd,rows16   # stored rows vs packed

--ffn also times the same token with the FFN computed from row-column bundles (kernels.ffn,
gate/up/down of one neuron in one row) instead of three matvecs, then the FFN alone (ms per
layer, bytes read per second): "ffn/layer" with the down columns in the bundles, "ffn-split"
with gate/up bundles and the down projection as a matrix (edgellm convert --ffn-down matrix). --kernels portable times the
fallback kernels (float32 activations, no SIMD intrinsics).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numba
import numpy as np

from edgellm.runtime import encodings, kernels
from edgellm.runtime.kernels import halfs, matvec, qmatvec, rows16, simd
from edgellm.runtime.reader import Matrix

D, DFF, KV = 2048, 5632, 256
SHAPES = [(D, D), (KV, D), (KV, D), (D, D), (DFF, D), (DFF, D), (D, DFF)]  # q k v o gate up down
LLAMA_CPP_MS = 59.0  # llama.cpp TinyLlama-1.1B Q4_0, 2 threads, whole token (DESIGN.md)


def set_threads(t):
    """Numba's thread count, and OpenBLAS's (prefill) when NumPy's bundled OpenBLAS is found."""
    numba.set_num_threads(t)
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "libscipy_openblas*.so"))
    for lib in libs:
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(ctypes.CDLL(lib), name, None)
            if fn is not None:
                fn(ctypes.c_int(t))
                return


def random_matrix(rng, enc, n, d, g=32):
    """Random weights in the stored layout (random bytes; valid float16 values and scales)."""
    c = encodings.codec(enc, g if enc == "int4" else None)
    if enc == "f16":
        q = (rng.integers(0, 1 << 16, size=(n, d), dtype=np.uint16) & 0xBBFF).view(np.float16)
        return Matrix(q, None, c, (n, d))
    if enc == "int8":
        q = rng.integers(-127, 128, size=(n, d), dtype=np.int8)
        return Matrix(q, (rng.random(n, dtype=np.float32) * 0.01), c, (n, d))
    q = rng.integers(0, 256, size=(n, d // 2), dtype=np.uint8)
    s = (rng.random((n, d // g), dtype=np.float32) * 0.01).astype(np.float16)
    return Matrix(q, s, c, (n, d))


def random_bundles(rng, enc, g=32, down=True):
    """Bundles of DFF neurons: gate, up and down parts, or gate and up only (down=False: the
    down projection a matrix of its own, edgellm convert --ffn-down matrix)."""
    c = encodings.codec(enc, g if enc == "int4" else None)
    parts = [("gate", c), ("up", c)] + ([("down", c)] if down else [])
    layout, stride = encodings.bundle_layout(parts, D)
    b = rng.integers(0, 256, size=(DFF, stride), dtype=np.uint8)
    for e in layout:  # make every value and scale a sane number
        q, s = encodings.bundle_part(b, e, D)
        if enc == "f16":
            q[...] = (q.view(np.uint16) & 0xBBFF).view(np.float16)
        elif enc == "int8":
            q[q == -128] = 0
        if s is not None:
            s[...] = (rng.random(s.shape, dtype=np.float32) * 0.01).astype(s.dtype)
    return b, layout


def make_matvec(kind, m):
    """A function x f32[d] -> f32[n] for one matrix and kernel kind."""
    n, d = m.shape
    out = np.empty(n, dtype=np.float32)
    lut = halfs.F16_TO_F32
    enc = m.codec.name
    if kind == "api":
        return lambda x: kernels.linear(m, x.reshape(-1, d))
    if kind == "portable":
        if enc == "f16":
            q = m.q.view(np.uint16)
            return lambda x: matvec.matvec_f16(q, x, lut, out)
        if enc == "int8":
            return lambda x: matvec.matvec_int8(m.q, m.s, x, out)
        s = m.s.view(np.uint16)
        return lambda x: matvec.matvec_int4(m.q, s, m.codec.group_size, x, lut, out)
    if kind == "rows16":  # int4 packed 16 rows a group (kernels/rows16.py, a resident load's)
        pv, ps = rows16.pack(m.q, m.s)
        gshift = (m.codec.group_size // 32).bit_length() - 1
        return lambda x: rows16.matvec(pv, ps, gshift, x, lut, out, True)
    avx2 = kind == "simd"  # "generic": the portable-IR flavor of the intrinsics
    if enc == "f16":
        q = m.q.view(np.uint16)
        return lambda x: qmatvec.matvec_f16(q, x, lut, out, avx2)
    if enc == "int8":
        return lambda x: qmatvec.matvec_int8(m.q, m.s, x, out, avx2)
    s = m.s.view(np.uint16)
    return lambda x: qmatvec.matvec_int4(m.q, s, m.codec.group_size, x, lut, out, avx2)


def time_token(fns, xs, repeats):
    for f, x in zip(fns, xs):  # warm up (compile) once
        f(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f, x in zip(fns, xs):
            f(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--enc", default="f16,int8,int4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kernels", default="simd",
                    help="comma list of simd, generic, portable, api, rows16 (int4 packed "
                         "16 rows a group, where the CPU has AVX-512 VNNI)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ffn", action="store_true", help="also time attention matvecs + ffn()")
    ap.add_argument("--prefill", type=int, default=0, metavar="T",
                    help="also time linear() on T rows at once (dequantized tiles + BLAS)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    threads = [int(t) for t in args.threads.split(",")]
    results = []
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores (other processes skew timings, "
          f"2-thread ones most)")
    print(f"numba {numba.__version__}, fast kernels {simd.flavour()}, "
          f"f16 SIMD {simd.HAVE_F16}, {args.layers} layers x 7 matvecs "
          f"(per token: x {22 / args.layers:.2f} to 22 layers)")
    print(f"{'enc':5} {'kernel':9} {'thr':>3} {'ms/token':>9} {'GB/s':>6} {'vs llama.cpp':>12}")
    for enc in args.enc.split(","):
        mats = [[random_matrix(rng, enc, n, d) for n, d in SHAPES] for _ in range(args.layers)]
        nbytes = sum(m.nbytes for layer in mats for m in layer) * 22 / args.layers
        xs = [rng.standard_normal(d).astype(np.float32) for _, d in SHAPES] * args.layers
        bundles = None
        if args.ffn:
            bundles = [random_bundles(rng, enc) for _ in range(args.layers)]
        for kind in args.kernels.split(","):
            if kind in ("simd", "generic") and enc == "f16" and not simd.HAVE_F16:
                continue
            if kind == "rows16" and (enc != "int4" or not rows16.ENABLED):
                continue
            fns = [make_matvec(kind, m) for layer in mats for m in layer]
            for t in threads:
                set_threads(t)
                sec = time_token(fns, xs, args.repeats) * 22 / args.layers
                row = {"enc": enc, "kernel": kind, "threads": t, "ms_per_token": sec * 1e3,
                       "gb_per_s": nbytes / sec / 1e9, "bytes_per_token": nbytes,
                       "llama_cpp_ratio": LLAMA_CPP_MS / (sec * 1e3)}
                results.append(row)
                print(f"{enc:5} {kind:9} {t:3d} {sec * 1e3:9.1f} {nbytes / sec / 1e9:6.1f} "
                      f"{LLAMA_CPP_MS / (sec * 1e3):11.2f}x")
        if args.prefill:
            T = args.prefill
            fns = [make_matvec("api", m) for layer in mats for m in layer]
            xT = [rng.standard_normal((T, d)).astype(np.float32) for _, d in SHAPES] * args.layers
            for mode in [k for k in args.kernels.split(",") if k in ("portable", "api", "simd")]:
                kernels.MODE = "portable" if mode == "portable" else "fast"
                for t in threads:
                    set_threads(t)
                    sec = time_token(fns, xT, max(1, args.repeats // 2)) * 22 / args.layers
                    kind = f"prefill{T}" + ("p" if mode == "portable" else "")
                    results.append({"enc": enc, "kernel": kind, "threads": t,
                                    "ms_per_token": sec * 1e3 / T, "tokens_per_s": T / sec})
                    print(f"{enc:5} {kind:9} {t:3d} {sec * 1e3 / T:9.1f} {'':6} "
                          f"{'':11}  ({T / sec:.0f} tokens/s)")
            kernels.MODE = "fast"
        if bundles is not None:
            attn = [make_matvec("api", m) for layer in mats for m in layer[:4]]
            ax = [x for x in xs[:4]] * args.layers
            x1 = rng.standard_normal((1, D)).astype(np.float32)
            fns, inputs = [], []
            for li, (b, layout) in enumerate(bundles):
                fns += attn[4 * li:4 * li + 4]
                inputs += ax[4 * li:4 * li + 4]
                fns.append(lambda x, b=b, layout=layout: kernels.ffn(x, b, layout, D, "silu",
                                                                       True))
                inputs.append(x1)
            fbytes = (sum(m.nbytes for layer in mats for m in layer[:4])
                      + sum(b.nbytes for b, _ in bundles)) * 22 / args.layers
            for t in threads:
                set_threads(t)
                sec = time_token(fns, inputs, args.repeats) * 22 / args.layers
                results.append({"enc": enc, "kernel": "api+ffn", "threads": t,
                                "ms_per_token": sec * 1e3, "gb_per_s": fbytes / sec / 1e9,
                                "bytes_per_token": fbytes,
                                "llama_cpp_ratio": LLAMA_CPP_MS / (sec * 1e3)})
                print(f"{enc:5} {'api+ffn':9} {t:3d} {sec * 1e3:9.1f} {fbytes / sec / 1e9:6.1f} "
                      f"{LLAMA_CPP_MS / (sec * 1e3):11.2f}x")
            # the FFN alone, per layer: ms and bytes read per second, bundles with the down
            # columns, then gate/up bundles and the down matrix (--ffn-down matrix)
            ffns, fin = fns[4::5], inputs[4::5]
            split = [(random_bundles(rng, enc, down=False), layer[6]) for layer in mats]
            sfns = [lambda x, b=b, m=m: kernels.ffn(x, b[0], b[1], D, "silu", True, None, m)
                    for b, m in split]
            for name, fl, nb in (("ffn/layer", ffns, bundles[0][0].nbytes),
                                 ("ffn-split", sfns, split[0][0][0].nbytes + split[0][1].nbytes)):
                for t in threads:
                    set_threads(t)
                    sec = time_token(fl, fin, args.repeats) / args.layers
                    results.append({"enc": enc, "kernel": name, "threads": t,
                                    "ms_per_layer": sec * 1e3, "gb_per_s": nb / sec / 1e9,
                                    "bytes_per_layer": nb})
                    print(f"{enc:5} {name:9} {t:3d} {sec * 1e3:9.2f} {nb / sec / 1e9:6.1f} "
                          f"{'':11}  (one layer's FFN, {nb / 1e6:.1f} MB)")
        del mats, bundles
    print(f"llama.cpp reference: {LLAMA_CPP_MS} ms/token (TinyLlama-1.1B Q4_0, 2 threads, whole "
          f"token, DESIGN.md); ratio > 1 means faster than that whole token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "cpu_count": os.cpu_count(), "load_average": load,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
