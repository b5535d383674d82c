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


def available_bytes():
    """Memory a new allocation can take without pushing anything out, or None when unknown: the
    kernel's MemAvailable estimate (Linux /proc/meminfo: free memory plus reclaimable page
    cache), lowered to what the memory cgroup still allows (limit - usage, cgroup v2 or v1) when
    the process runs under a limit. Used by edgellm.load's automatic choice between reading the
    weights into memory and mapping them (runtime/reader.py, choose_mapped)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        return None
    if avail is None:
        return None
    left = _cgroup_left()
    return avail if left is None else min(avail, left)


def _cgroup_left():
    """Bytes the process's memory cgroup allows beyond its usage, or None without a limit (the
    group from /proc/self/cgroup: the v2 line "0::PATH" or the v1 line naming "memory")."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files = (f"/sys/fs/cgroup{path}", "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            files = (f"/sys/fs/cgroup/memory{path}", "memory.limit_in_bytes",
                     "memory.usage_in_bytes")
        else:
            continue
        base, limit_file, usage_file = files
        try:
            with open(f"{base}/{limit_file}") as f:
                limit = f.read().strip()
            with open(f"{base}/{usage_file}") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # no limit (v1 writes a huge number)
            continue
        return max(0, int(limit) - usage)
    return None
