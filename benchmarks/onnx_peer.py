"""edgellm and onnxruntime side by side on the same weights: an edgellm model exported with
`edgellm export --to onnx`, both engines in one run, 1 thread by default.

Per model: the exported graph's weight kinds, the largest logit difference and top-1 agreement
over a prompt (all positions), prefill tokens/s and decode tokens/s (median of --repeat runs;
CPU time with --clock cpu, which is steadier on a shared machine).

    python benchmarks/onnx_peer.py edgellm/data/demo [MODEL ...] [--threads 1] [--clock cpu]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="edgellm model directories")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--ort-default", action="store_true",
                   help="leave onnxruntime's int8-activation matmul fusion on (not exact)")
    a = p.parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[k] = str(a.threads)
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engines import Edge, Onnx

    import edgellm
    from edgellm.export_onnx import export_onnx

    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    for path in a.models:
        tmp = tempfile.mkdtemp(prefix="onnx-peer-")
        report = {}
        t0 = time.perf_counter()
        out = export_onnx(path, os.path.join(tmp, "onnx"), progress=False, report=report)
        export_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        tok = edgellm.load(path).tokenizer
        text = ("It is a truth universally acknowledged, that a single man in possession of a good "
                "fortune, must be in want of a wife. However little known the feelings or views "
                "of such a man may be on his first entering a neighbourhood, this truth is so "
                "well fixed in the minds of the surrounding families.")
        ids = tok.encode(text)[:a.prompt_tokens]
        n_ctx = len(ids) + a.decode + 8
        engines = [Edge(path, n_ctx, a.threads), Onnx(out, n_ctx, a.threads,
                                                     exact=not a.ort_default)]
        logits = [e.all_logits(ids) for e in engines]
        diff = float(np.abs(logits[0] - logits[1]).max())
        agree = float(np.mean(logits[0].argmax(-1) == logits[1].argmax(-1)))
        rows = {}
        for e in engines:
            pre, dec = [], []
            for _ in range(a.repeat):
                t = clock()
                last = e.prefill(ids)
                pre.append(len(ids) / (clock() - t))
                t = clock()
                tokn = int(last.argmax())
                for _ in range(a.decode):
                    tokn = int(e.step(tokn).argmax())
                dec.append(a.decode / (clock() - t))
            rows[e.name] = (statistics.median(pre), statistics.median(dec))
        print(f"\n{path}")
        print(f"  onnx export {export_s:.1f} s, {size / 1e6:.1f} MB; weights: "
              f"{'; '.join(sorted(set(report['tensors'].values())))}")
        print(f"  logits over {len(ids)} prompt tokens: max |diff| {diff:.2e}, top-1 agreement "
              f"{agree:.3f}")
        for name, (pre, dec) in rows.items():
            print(f"  {name:12} prefill {pre:8.1f} tokens/s   decode {dec:7.1f} tokens/s "
                  f"({a.clock} clock, {a.threads} thread(s), median of {a.repeat})")
        del engines
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
