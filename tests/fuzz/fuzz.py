"""Coverage-guided fuzzing of one reader with atheris (libFuzzer for Python).

    python tests/fuzz/fuzz.py TARGET [--seconds S] [--corpus DIR] [--findings DIR] [libFuzzer flags]
    python tests/fuzz/fuzz.py manifest --seconds 600

TARGET is one of targets.TARGETS. The corpus directory (default: $EDGELLM_FUZZ_DIR/TARGET or
/tmp/edgellm-fuzz/TARGET) gets the target's seeds on first use and grows as libFuzzer finds new
coverage. An input that raises anything but an EdgeLLMError is a finding: it is written to the
findings directory (one file per distinct exception type and place) and fuzzing goes on; hangs,
out-of-memory and hard crashes are libFuzzer's own artifacts, written there too (libFuzzer then
stops: scripts/fuzz restarts it). After --seconds, a line `FUZZ-SUMMARY {json}` gives the
executions and findings, and the exit status is 1 when there was a finding.

Short bounded runs of every target run in CI (tests/fuzz/test_fuzz.py); long runs: scripts/fuzz.
"""

import argparse
import atexit
import hashlib
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# Numba cannot compile instrumented bytecode: import every kernel module first, uninstrumented
import edgellm.runtime.kernels  # noqa: E402

for _m in pkgutil.iter_modules(edgellm.runtime.kernels.__path__):
    importlib.import_module("edgellm.runtime.kernels." + _m.name)

# instrument every module the targets reach (lazy imports included: load them here)
with atheris.instrument_imports(include=["edgellm", "safetensors", "gguf", "targets"]):
    import targets
    import edgellm.converters.convert  # noqa: F401
    import edgellm.converters.sources.gguf  # noqa: F401
    import edgellm.model  # noqa: F401
    import edgellm.runtime.streaming  # noqa: F401
    import edgellm.session  # noqa: F401
    import edgellm.template  # noqa: F401
    import edgellm.converters.recipe  # noqa: F401
    import gguf  # noqa: F401
    import safetensors.numpy  # noqa: F401

from edgellm.runtime.errors import EdgeLLMError  # noqa: E402

# the largest seed of each target is below this (the tokenizer.model and the sentencepiece GGUF)
MAX_LEN = {"manifest": 16384, "chunk": 8192, "gguf": 600000, "tokenizer": 300000,
           "session": 16384, "recipe": 4096}


def where(exc):
    """The innermost frame of the traceback inside edgellm (else the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/edgellm/" in f.filename or "/runtime/" in f.filename
            or "/converters/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno}" if f else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=targets.TARGETS)
    ap.add_argument("--corpus")
    ap.add_argument("--findings")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    a, rest = ap.parse_known_args()
    base = os.environ.get("EDGELLM_FUZZ_DIR", "/tmp/edgellm-fuzz")
    corpus = a.corpus or os.path.join(base, a.target)
    findings = a.findings or os.path.join(base, "findings", a.target)
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(findings, exist_ok=True)
    if not os.listdir(corpus):
        for i, s in enumerate(targets.seeds(a.target)):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(s)

    # the seeds once before fuzzing: Numba compiles the kernels they use (a minute when its
    # cache is stale), which would otherwise count against libFuzzer's per-input timeout
    for s in targets.seeds(a.target):
        try:
            targets.run(a.target, s)
        except Exception:  # noqa: BLE001 - the fuzzer reports it properly below
            pass

    stats = {"target": a.target, "execs": 0, "loaded": 0, "refused": 0, "findings": {}}

    deadline = time.monotonic() + a.seconds if a.seconds else None

    def one(data):
        if deadline is not None and time.monotonic() > deadline:
            report()
            atexit._run_exitfuncs()  # temporary directories; os._exit and libFuzzer skip them
            os._exit(1 if stats["findings"] else 0)
        stats["execs"] += 1
        try:
            if targets.run(a.target, data):
                stats["loaded"] += 1
            else:
                stats["refused"] += 1
        except (Exception, MemoryError) as e:  # noqa: BLE001 - every other exception is a finding
            key = f"{type(e).__name__}@{where(e)}"
            if key not in stats["findings"]:
                name = hashlib.sha1(key.encode()).hexdigest()[:10]
                with open(os.path.join(findings, f"{name}-{hashlib.sha1(data).hexdigest()}"),
                          "wb") as f:
                    f.write(data)
                print(f"\nFINDING {key}: {str(e)[:300]}", file=sys.stderr, flush=True)
                traceback.print_exc()
                stats["findings"][key] = name
        except BaseException as e:  # e.g. a Rust panic (pyo3's PanicException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            key = f"{type(e).__name__}@{where(e)}"
            stats["findings"].setdefault(key, "panic")
            with open(os.path.join(findings, f"panic-{hashlib.sha1(data).hexdigest()}"),
                      "wb") as f:
                f.write(data)
            print(f"\nFINDING {key}: {str(e)[:300]}", file=sys.stderr, flush=True)

    def report():
        print("\nFUZZ-SUMMARY " + json.dumps(stats), file=sys.stderr, flush=True)

    # a hang: 5 minutes on one input (generous: the machine running it may be busy)
    flags = [f"-max_len={MAX_LEN[a.target]}", "-rss_limit_mb=3000", "-timeout=300",
             f"-artifact_prefix={findings}/", "-print_final_stats=1"]
    atheris.Setup([sys.argv[0]] + flags + rest + [corpus], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
