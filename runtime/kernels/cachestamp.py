"""Stale entries of Numba's on-disk cache after an edit of a kernel file that other files call.

Numba's cache (cache=True) checks a function against its own source file only, yet a cached
kernel holds the machine code of every compiled function it calls, inlined: after an edit of
ffn.py, the cached fused decode still runs the old ffn code, and Numba does not notice (its
documentation, "Cache invalidation fails to recognize changes in functions defined in a
different file"; numba issue #1833). CALLS says which kernel files each kernel file calls into;
drop_stale() keeps, beside the cache, one hash per kernel file of every file it reaches through
CALLS (and of simd.py's CPU choices), and deletes that file's cache entries when it changes.
So an edit recompiles only the kernels that reach the edited file: simd.py is reached by nearly
all of them, fused.py by none (Numba itself recompiles fused.py's own kernels).
tests/test_cachestamp.py checks CALLS against the compiled functions' references.
"""

import glob
import hashlib
import json
import os

import numba

HERE = os.path.dirname(os.path.abspath(__file__))

# kernel file -> the kernel files its compiled functions call (directly)
CALLS = {
    "attention": ("simd",),
    "ffn": ("matvec", "qmatvec", "rows16", "simd"),
    "fused": ("attention", "ffn", "norms", "qmatvec", "rope", "rows16", "simd", "sparse",
              "teal"),
    "qgemm": ("rows16", "simd"),
    "qmatvec": ("simd",),
    "rows16": ("simd",),
    "sparse": ("ffn", "simd", "sparse_simd"),
    "sparse_simd": ("simd",),
    "teal": ("ffn", "simd"),
    "team": ("attention", "ffn", "fused", "norms", "simd"),
    "tiles": ("matvec", "simd"),
    "w8a8": ("ffn", "simd"),
}
STAMPS = "kernel-stamps.json"


def reached(name, calls=CALLS):
    """The kernel files name's compiled functions reach through calls (itself not included)."""
    out, todo = set(), list(calls.get(name, ()))
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(calls.get(n, ()))
    out.discard(name)
    return sorted(out)


def stamps(choices, folder=HERE):
    """{kernel file: hash of the files it reaches and of choices} for every .py in folder."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        h = hashlib.sha256(choices.encode())
        for dep in reached(name):
            with open(os.path.join(folder, dep + ".py"), "rb") as f:
                h.update(f"\0{dep}\0".encode() + f.read())
        out[name] = h.hexdigest()
    return out


def cache_dir(folder=HERE):
    """Where Numba caches the kernels of folder (numba.core.caching's two locators)."""
    own = numba.config.CACHE_DIR
    if not own:
        return os.path.join(folder, "__pycache__")
    try:
        from numba.core.caching import _CacheLocator

        return os.path.join(own, _CacheLocator.get_suitable_cache_subpath(
            os.path.join(folder, "simd.py")))
    except (ImportError, AttributeError):  # another Numba layout: the whole directory
        return own


def drop_stale(choices, folder=HERE, cache=None):
    """Delete the cache entries of every kernel file whose stamp changed; returns their names.
    choices: the CPU choices the kernels were compiled with (simd.py's feature flags)."""
    cache = cache or cache_dir(folder)
    try:
        new = stamps(choices, folder)
        try:
            with open(os.path.join(cache, STAMPS)) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        stale = [n for n in new if old.get(n) != new[n]]
        if not stale:
            return []
        for name in stale:
            for path in glob.glob(os.path.join(glob.escape(cache), "**", name + ".*.nb[ic]"),
                                  recursive=True):
                try:
                    os.remove(path)
                except FileNotFoundError:  # another process dropping it too
                    pass
            # A process still running the old code may save entries later: Numba before its
            # content-hash source stamps (0.59-era) keyed them on file mtimes, which a new mtime
            # invalidates. Not for a cache directory of one's own (not stale for its other users).
            if not numba.config.CACHE_DIR:
                os.utime(os.path.join(folder, name + ".py"))
        os.makedirs(cache, exist_ok=True)
        tmp = os.path.join(cache, f"{STAMPS}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(new, f, indent=0, sort_keys=True)
        os.replace(tmp, os.path.join(cache, STAMPS))
        return stale
    except OSError:  # a read-only install: its files do not change either
        return []
