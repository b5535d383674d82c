"""Process memory: giving freed heap back to the system, and measuring what a process holds.

Used where a DRAM budget must hold (runtime/plan.py, `edgellm serve --dram-budget`) and by the
benchmarks that check it (benchmarks/serve_budget.py).
"""

import ctypes
import ctypes.util

_libc = None


def trim():
    """Return the C heap's free pages to the system (glibc malloc_trim; a no-op elsewhere).

    Some loads leave large free holes in the heap: the Hugging Face tokenizer parses its JSON into
    a temporary tree (SmolLM2's 1.6 MB tokenizer.json: 27 MB resident after loading, 13 MB after
    trimming, measured). glibc keeps freed pages below the heap's top mapped, where a memory
    cgroup still charges them."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
        if _libc is not False and not hasattr(_libc, "malloc_trim"):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def anonymous_bytes(pid="self"):
    """Anonymous (not file-backed) resident bytes of a process (Linux smaps_rollup), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
