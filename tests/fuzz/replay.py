"""Replay regression inputs in a child process with a cap on its address space.

    python tests/fuzz/replay.py --limit-mb N TARGET PATH [TARGET PATH ...]

An input that once made a reader allocate without bound (a manifest's n_layers near 2^63 took
21 GB) must fail its own test, not have the kernel kill the whole pytest run: tests/fuzz/test_fuzz.py
runs the corpus through this script. RLIMIT_AS turns a runaway allocation into a MemoryError here.
One line per input on stdout, `REPLAY {json}` with the input, "result" (loaded, refused: an
EdgeLLMError, or finding: anything else) and for a finding its traceback. A line `REPLAY-START`
precedes each input, so that the caller can name the input a hard crash stopped at.
"""

import json
import os
import resource
import sys
import traceback


def cap(limit_mb):
    """Cap this process's address space (and its children's) at limit_mb MB."""
    n = limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (n, n))


def main(argv):
    if len(argv) < 4 or argv[0] != "--limit-mb" or len(argv) % 2:
        sys.exit(__doc__)
    limit_mb, pairs = int(argv[1]), list(zip(argv[2::2], argv[3::2]))
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import targets  # the workspace's seed models are built once, before the cap

    targets.workspace()
    cap(limit_mb)
    for target, path in pairs:
        print("REPLAY-START " + json.dumps({"target": target, "path": path}), flush=True)
        with open(path, "rb") as f:
            data = f.read()
        out = {"target": target, "path": path}
        try:
            out["result"] = "loaded" if targets.run(target, data) else "refused"
        except BaseException as e:  # noqa: BLE001 - every other exception is a finding
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            out["result"] = "finding"
            out["memory"] = isinstance(e, MemoryError)
            out["traceback"] = traceback.format_exc()[-4000:]
        print("REPLAY " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
